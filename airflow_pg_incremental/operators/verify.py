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
        from airflow_pg_incremental.metrics import emit

        emit(self.cluster, {"verify.ok": 0 if res["failed"] else 1})
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


class PgBackupFreshnessOperator(_PgBackupBase):
    """The backup-age check: fails (and so alerts, like a breached RPO) when the newest complete
    backup of `cluster` (full, incremental, differential, or synthetic: dated by the backup it stands
    for) finished more than `max_age_hours` ago:
    backups stopped being taken, or keep failing. Emits `backup.age_seconds` and `backup.stale`.
    XCom: {cluster, backup_id, kind, finished_at, age_s, max_age_s, stale}."""

    ui_color = "#e0ecd9"

    def __init__(self, *, max_age_hours: float = 192, postgres_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(postgres_conn_id=postgres_conn_id or "", **kwargs)
        self.max_age_hours = max_age_hours

    def execute(self, context: Context) -> dict:
        import datetime as dt

        from airflow_pg_incremental.core.metadata import list_backups, require_cluster
        from airflow_pg_incremental.metrics import emit

        repo = self._repo()
        require_cluster(repo, self.cluster)
        backups = list_backups(repo, self.cluster)
        limit = float(self.max_age_hours) * 3600
        newest = backups[-1] if backups else None
        age = None
        if newest and newest.get("finished_at"):
            age = (dt.datetime.now(dt.timezone.utc) - dt.datetime.fromisoformat(newest["finished_at"])).total_seconds()
        stale = age is None or age > limit
        emit(self.cluster, {"backup.age_seconds": age, "backup.stale": 1 if stale else 0})
        out = {"cluster": self.cluster, "backup_id": (newest or {}).get("backup_id"), "kind": (newest or {}).get("kind"),
               "finished_at": (newest or {}).get("finished_at"), "age_s": round(age) if age is not None else None,
               "max_age_s": limit, "stale": stale}
        if newest is None:
            raise AirflowFailException(f"cluster {self.cluster!r} has no complete backup: run its weekly full DAG "
                                       "(and look at why its backups fail: their task logs and alerts)")
        if stale:
            raise AirflowFailException(
                f"the newest backup of {self.cluster!r}, {newest['backup_id']} ({newest.get('kind')}), finished "
                f"{age / 3600:.1f} h ago, more than {self.max_age_hours:g} h (max_backup_age_hours): backups are "
                "not being taken or keep failing; look at the weekly/daily DAGs' runs and alerts")
        self.log.info("newest backup %s (%s) finished %.1f h ago (limit %g h)", newest["backup_id"],
                      newest.get("kind"), age / 3600, float(self.max_age_hours))
        return out
