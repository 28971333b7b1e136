"""Restore tests and the on-demand restore. Thin: validate, call one engine function, small XCom."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context

from airflow_pg_incremental.operators.backup import StopsEngineOnKill, _PgBackupBase


def _fail(msg: str):
    from airflow.sdk.exceptions import AirflowFailException

    return AirflowFailException(msg)


class PgRestoreTestOperator(_PgBackupBase):
    """Proves the backups: restores the cluster to the end of the run's data interval (so a
    backfill over past intervals proves PITR for each of them) on a scratch copy (own directory,
    own port, private socket, archive_mode=off, removed afterwards), runs the check queries and
    amcheck, records the restore time (RTO), the point reached and the outcome in the catalog.
    When the interval end lies beyond the archived WAL (the newest hour is not captured yet) it
    tests 'latest' and says so. Fails the task when the restore or a check fails."""

    template_fields: Sequence[str] = (*_PgBackupBase.template_fields, "target_time", "checks")
    ui_color = "#d5f5d3"

    def __init__(self, *, target_time: str | None = None, checks: list[str] | None = None,
                 databases: list[str] | None = None, amcheck: bool = True, scratch_dir: str | None = None,
                 timeout_s: float = 3600, postgres_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(postgres_conn_id=postgres_conn_id or "", **kwargs)
        self.target_time = target_time
        self.checks = checks or ["SELECT 1"]
        self.databases = databases
        self.amcheck = amcheck
        self.scratch_dir = scratch_dir
        self.timeout_s = timeout_s

    def execute(self, context: Context) -> dict:
        from airflow_pg_incremental.core.errors import TargetBeyondArchive
        from airflow_pg_incremental.core.pitr import parse_target, plan_restore
        from airflow_pg_incremental.core.restoretest import run_restore_test

        when = self.target_time or context.get("data_interval_end") or context.get("run_after") or \
            dt.datetime.now(dt.timezone.utc)
        when = when if isinstance(when, str) else when.isoformat()
        repo = self._repo()
        target = parse_target("time", when)
        note = None
        try:
            plan_restore(repo, self.cluster, target)
        except TargetBeyondArchive as e:
            note = f"{when} is beyond the archived WAL: testing the end of the archive instead ({e})"
            self.log.warning("%s", note)
            target = parse_target("latest")
        rec = run_restore_test(repo, self.cluster, target, checks=list(self.checks), databases=self.databases,
                               amcheck=self.amcheck, catalog=self._catalog(), airflow=self._airflow_ids(context),
                               scratch_parent=self.scratch_dir, timeout_s=self.timeout_s)
        out = {k: rec.get(k) for k in ("cluster", "ok", "target_kind", "target_value", "backup_id", "chain",
                                       "restore_seconds", "timings", "reached_lsn", "stopped_at", "error",
                                       "scratch_removed")}
        out["note"] = note
        out["checks"] = [{"sql": c["sql"], "ok": c["ok"]} for c in rec.get("checks", [])]
        _gauges(self.cluster, {"restore_test.rto_seconds": rec.get("restore_seconds"),
                               **{f"restore_test.{k}_seconds": v for k, v in (rec.get("timings") or {}).items()},
                               "restore_test.ok": 1 if rec["ok"] else 0})
        if not rec["ok"]:
            raise _fail(f"restore test of {self.cluster} to {target.kind} {target.value or ''} FAILED: {rec['error']}")
        return out


class PgRestoreOperator(StopsEngineOnKill, BaseOperator):
    """On-demand restore, driven by the restore DAG's params form. Every value is validated and
    the restore is planned (backup, chain, WAL range, window) before anything is touched; a dry run
    stops there and prints the plan. The restored copy is left stopped in `destination`, at the
    target, with archive_mode=off: start it with pg_ctl where you need it."""

    template_fields: Sequence[str] = ("cluster", "target_type", "target_value", "destination", "action", "dry_run",
                                      "backup_id")
    ui_color = "#f5e6d3"

    def __init__(self, *, clusters: dict[str, dict], cluster: str, target_type: str = "latest",
                 target_value: str | None = None, destination: str = "", action: str = "promote",
                 dry_run: Any = True, backup_id: str | None = None, timeout_s: float = 6 * 3600,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clusters = clusters  # name -> {repository, aws_conn_id}
        self.cluster = cluster
        self.target_type = target_type
        self.target_value = target_value
        self.destination = destination
        self.action = action
        self.dry_run = dry_run
        self.backup_id = backup_id
        self.timeout_s = timeout_s

    def execute(self, context: Context) -> dict:
        from airflow_pg_incremental.core.errors import PgIncrError
        from airflow_pg_incremental.core.pitr import parse_target, plan_restore, restore_pitr
        from airflow_pg_incremental.core.restore import check_target_dir
        from airflow_pg_incremental.hooks.repository import PgBackupRepositoryHook

        dry = str(self.dry_run).lower() in ("true", "1", "yes", "on")
        if self.cluster not in self.clusters:
            raise _fail(f"unknown cluster {self.cluster!r}; configured: {', '.join(sorted(self.clusters))}")
        cfg = self.clusters[self.cluster]
        value = (self.target_value or "").strip() or None
        backup_id = (self.backup_id or "").strip() or None
        try:
            if self.target_type == "backup":
                if not value and not backup_id:
                    raise _fail("target type 'backup' needs the backup id in target_value")
                backup_id = backup_id or value
                target = parse_target("immediate", action=self.action)
            else:
                target = parse_target(self.target_type, value, action=self.action)
            if not self.destination and not dry:
                raise _fail("destination directory is required (a dry run needs none)")
            dest = check_target_dir(self.destination) if self.destination else None
            repo = PgBackupRepositoryHook(cfg["repository"], cfg.get("aws_conn_id")).get_repository()
            plan = plan_restore(repo, self.cluster, target, backup_id)
        except PgIncrError as e:
            raise _fail(f"restore refused, nothing was touched: {e}") from None
        self.log.info("restore plan for %s: backup %s (chain %s), WAL %s .. %s, target %s %s, action %s -> %s",
                      self.cluster, plan["backup_id"], " -> ".join(b["backup_id"] for b in plan["chain"]),
                      plan["wal_from"], plan["wal_to"], target.kind, target.value or "", target.action,
                      dest or "(no destination given)")
        small = {"cluster": self.cluster, "dry_run": dry, "destination": str(dest) if dest else None,
                 "backup_id": plan["backup_id"],
                 "chain": [b["backup_id"] for b in plan["chain"]], "wal_from": plan["wal_from"],
                 "wal_to": plan["wal_to"], "target": plan["target"]}
        if dry:
            self.log.info("dry run: nothing restored")
            return small
        from airflow_pg_incremental.core import procs
        from airflow_pg_incremental.core.server import default_os_user

        procs.register_dir(dest, keep_root=dest.exists())  # a killed restore leaves nothing in it
        try:
            rep = restore_pitr(repo, self.cluster, target, dest, backup_id=backup_id, timeout_s=self.timeout_s,
                               os_user=default_os_user())
        except PgIncrError as e:
            raise _fail(f"restore of {self.cluster} failed: {e}") from None
        finally:
            procs.forget_dir(dest)
        small.update({k: rep.get(k) for k in ("state", "reached_lsn", "stopped_at", "restore_seconds", "timings")})
        return small


def _gauges(cluster: str, values: dict) -> None:
    """Airflow metrics (statsd/otel when configured); never fails the task."""
    try:
        from airflow.sdk.observability.stats import Stats

        for name, v in values.items():
            if v is not None:
                Stats.gauge(f"pgincr.{cluster}.{name}", float(v))
    except Exception:
        pass
