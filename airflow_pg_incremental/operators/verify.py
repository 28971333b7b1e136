"""Operator for backup verification. Thin: resolves connections, calls core.verify.verify_backup."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context
from airflow.sdk.exceptions import AirflowException, AirflowFailException

from airflow_pg_incremental.operators.backup import _PgBackupBase

_NO_ID = ("", "none", "null", "all")


class PgBackupVerifyOperator(_PgBackupBase):
    """Verifies backups in the repository without touching the database server: every object is
    re-read (sizes, SHA-256, zstd checksums), the base is staged in a temporary directory and
    checked by ``pg_verifybackup`` (removed afterwards), and with ``check_wal`` the WAL archive is
    checked to cover each backup (and the newest backup's end up to the newest archived segment),
    and every archived segment in that range is read (zstd checksum, size, page header: system
    identifier, position, timeline).
    Each result is recorded in the catalog (``catalog_conn_id``) when one is configured.

    ``backup_id`` (templated): one backup, e.g. ``"{{ ti.xcom_pull(task_ids='full_backup')['backup_id'] }}"``,
    or ``'latest'``; with ``chain`` its whole chain (full -> ... -> it) is verified too. None, ''
    or 'None' (an XCom without a backup id renders so): every backup of the cluster. With
    ``only_unverified`` (and a catalog) backups whose last verification passed are skipped.
    Run it after the WAL of the backup was archived (e.g. downstream of the WAL capture/sensor),
    or set ``check_wal=False``.

    Fails when any check fails, naming the backup and the object or check; damaged objects fail
    (damaged WAL objects and unreadable metadata included) without retry (AirflowFailException),
    WAL gaps (a late capture may fill them) and unrecorded results with AirflowException.
    XCom: {cluster, verified, failed, skipped, duration_s}.
    """

    template_fields: Sequence[str] = (*_PgBackupBase.template_fields, "backup_id")
    ui_color = "#d5f0d3"

    def __init__(self, *, backup_id: str | None = None, chain: bool = True, check_wal: bool = True,
                 only_unverified: bool = True, staging_parent: str | None = None,
                 postgres_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(postgres_conn_id=postgres_conn_id or "", **kwargs)
        self.backup_id = backup_id
        self.chain = chain
        self.check_wal = check_wal
        self.only_unverified = only_unverified
        self.staging_parent = staging_parent

    def execute(self, context: Context) -> dict:
        from airflow_pg_incremental.core.verify import verify_backup

        bid = self.backup_id
        bid = None if bid is None or str(bid).strip().lower() in _NO_ID else str(bid).strip()
        ids = self._airflow_ids(context)
        repo = self._repo()
        res = verify_backup(repo, self.cluster, bid, catalog=self._catalog(), chain=bool(self.chain),
                            check_wal=bool(self.check_wal), only_unverified=bool(self.only_unverified),
                            staging_parent=self.staging_parent or None,
                            airflow={"dag_id": ids["dag_id"], "run_id": ids["run_id"]})
        out = {k: res[k] for k in ("cluster", "verified", "failed", "skipped", "duration_s")}
        if res["failed"]:
            lines = [(f"{f['check']} check: " if f["backup_id"] in f["message"] else
                      f"backup {f['backup_id']}: {f['check']} check: ") + f["message"] for f in res["failed"]]
            more = f" (and {len(lines) - 5} more)" if len(lines) > 5 else ""
            msg = (f"verification of cluster {self.cluster!r} FAILED for {len({f['backup_id'] for f in res['failed']})}"
                   f" backup(s): " + " | ".join(lines[:5]) + more)
            for line in lines:
                self.log.error("%s", line)
            damaged = any(f["check"] != "wal" for f in res["failed"])
            raise (AirflowFailException if damaged else AirflowException)(msg)
        if res.get("catalog_errors"):
            raise AirflowException(f"backups of cluster {self.cluster!r} verified OK ({', '.join(res['verified'])}) "
                                   f"but the results could not be recorded in the catalog: "
                                   f"{'; '.join(res['catalog_errors'])}")
        self._announce(context, repo, bid, res)
        return out

    def _announce(self, context: Context, repo, backup_id: str | None, res: dict) -> None:
        """The outlets' Asset events carry what was verified (the Assets page shows it; a DAG
        triggered by the event can read it from triggering_asset_events)."""
        if not self.outlets:
            return
        extra = {"cluster": self.cluster, "verified": res["verified"], "skipped": res["skipped"]}
        if backup_id:
            from airflow_pg_incremental.core.incremental import resolve_chain
            from airflow_pg_incremental.core.metadata import resolve_backup

            meta = resolve_backup(repo, self.cluster, backup_id)
            extra.update({k: meta.get(k) for k in ("backup_id", "kind", "parent_id", "start_lsn", "stop_lsn",
                                                  "timeline", "raw_bytes", "stored_bytes", "finished_at",
                                                  "pg_major")})
            extra["chain"] = [b["backup_id"] for b in resolve_chain(repo, self.cluster, meta)]
        events = context.get("outlet_events")
        for asset in self.outlets:
            try:
                events[asset].extra = extra
            except Exception as e:  # the event is still emitted, only without its details
                self.log.warning("could not attach the backup's details to the Asset event: %s", e)
