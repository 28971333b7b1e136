"""Copies of the repository (3-2-1): what the cluster's repository holds, brought into a second
repository, each backup verified there on arrival."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context

from airflow_pg_incremental.operators.backup import _PgBackupBase


class PgRepositoryCopyOperator(_PgBackupBase):
    """Copy `cluster` from `repository` into `copy_repository` (core.copies.copy_cluster: only what
    the copy lacks; WAL first, each zstd frame checked; every backup object checked against the
    SHA-256 recorded when it was written, backup.json last). Each backup new in the copy is then
    verified there (its objects, pg_verifybackup, its WAL in the copy). Fails, naming them, when
    the source holds damaged objects or a copied backup fails its verification.

    XCom: {cluster, source, copy, wal_copied, backups_copied, bytes, verified, duration_s}."""

    template_fields: Sequence[str] = (*_PgBackupBase.template_fields, "copy_repository", "copy_aws_conn_id")
    ui_color = "#d9f5e3"

    def __init__(self, *, copy_repository: str, copy_aws_conn_id: str | None = None, verify: bool = True,
                 postgres_conn_id: str | None = None, copy_options: dict | None = None, **kwargs: Any) -> None:
        super().__init__(postgres_conn_id=postgres_conn_id or "", **kwargs)
        self.copy_repository = copy_repository
        self.copy_aws_conn_id = copy_aws_conn_id
        # the copy's encryption_key_conn_id, s3_sse, s3_sse_kms_key_id (default: the source's)
        self.copy_options = copy_options
        self.verify = verify

    def execute(self, context: Context) -> dict:
        from airflow_pg_incremental.core.copies import copy_cluster
        from airflow_pg_incremental.hooks.repository import PgBackupRepositoryHook

        opts = self._repository_options() if self.copy_options is None else self.copy_options
        dst = PgBackupRepositoryHook(self.copy_repository, self.copy_aws_conn_id, **opts).get_repository()
        rep = copy_cluster(self._repo(), dst, self.cluster)
        rep["verified"] = self._verify_copied(dst, rep["backups_copied"]) if self.verify else []
        return {k: rep[k] for k in ("cluster", "source", "copy", "wal_copied", "backups_copied", "bytes", "verified",
                                    "duration_s")}

    def _verify_copied(self, dst, ids: list[str]) -> list[str]:
        from airflow_pg_incremental.core.errors import PgIncrError
        from airflow_pg_incremental.core.verify import verify_backup

        ok = []
        for bid in ids:
            rep = verify_backup(dst, self.cluster, bid, chain=False, check_wal=True)
            if rep["failed"]:
                raise PgIncrError(f"backup {bid} copied into {dst.url} fails verification there: "
                                  + "; ".join(f"{f['check']}: {f['message']}" for f in rep["failed"])[:1500])
            ok.append(bid)
        return ok
