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
        from airflow_pg_incremental.core.restoretest import run_restore_test

        repo = self._repo()
        target, note = self._target(context, repo)
        if note:
            self.log.info("%s", note)
        rec = run_restore_test(repo, self.cluster, target, checks=list(self.checks), databases=self.databases,
                               amcheck=self.amcheck, catalog=self._catalog(), airflow=self._airflow_ids(context),
                               scratch_parent=self.scratch_dir, timeout_s=self.timeout_s)
        out = {k: rec.get(k) for k in ("cluster", "ok", "target_kind", "target_value", "backup_id", "chain",
                                       "restore_seconds", "timings", "reached_lsn", "stopped_at", "error",
                                       "scratch_removed")}
        out["note"] = note
        out["checks"] = [_check_summary(c) for c in rec.get("checks", [])]
        for c in out["checks"]:
            self.log.info("check %s: %s -> %s", "passed" if c["ok"] else "FAILED", c["sql"], c.get("result"))
        _gauges(self.cluster, {"restore_test.rto_seconds": rec.get("restore_seconds"),
                               **{f"restore_test.{k}_seconds": v for k, v in (rec.get("timings") or {}).items()},
                               "restore_test.ok": 1 if rec["ok"] else 0})
        if not rec["ok"]:
            raise _fail(f"restore test of {self.cluster} to {target.kind} {target.value or ''} FAILED: {rec['error']}")
        return out


    def _target(self, context: Context, repo):
        """(target, note): a run triggered by a new backup (an Asset event, no data interval) tests
        the end of the archive; a scheduled or backfilled run the end of its data interval, or the
        end of the archive when that interval is not archived yet (said in the note and the XCom)."""
        from airflow_pg_incremental.core.errors import TargetBeyondArchive
        from airflow_pg_incremental.core.pitr import parse_target, plan_restore

        run_type = str(getattr(context.get("dag_run"), "run_type", "") or "")
        if not self.target_time and (context.get("triggering_asset_events") or "asset" in run_type):
            return parse_target("latest"), "triggered by a new backup: testing the end of the archive (latest)"
        when = self.target_time or context.get("data_interval_end") or context.get("run_after") or \
            dt.datetime.now(dt.timezone.utc)
        when = when if isinstance(when, str) else when.isoformat()
        target = parse_target("time", when)
        try:
            plan_restore(repo, self.cluster, target)
        except TargetBeyondArchive as e:
            return parse_target("latest"), (f"{when} (the end of this run's data interval) is not archived yet: "
                                            f"testing the end of the archive instead ({e})")
        return target, None


def _check_summary(c: dict) -> dict:
    """A check's result for the XCom and the log: its first row (short), or its error."""
    out = {"sql": c["sql"], "ok": c["ok"]}
    if c["ok"]:
        first = (c.get("rows") or [[]])[0]
        out["result"] = ", ".join(str(v)[:80] for v in first[:5])
    else:
        out["result"] = str(c.get("error") or "")[:300]
    return out


class PgRestoreOperator(StopsEngineOnKill, BaseOperator):
    """On-demand restore, driven by the restore DAG's params form. Every value is validated and
    the restore is planned (backup, chain, WAL range, window) before anything is touched; a dry run
    stops there and prints the plan. The restored copy is left stopped in `destination`, at the
    target, with archive_mode=off: start it with pg_ctl where you need it."""

    template_fields: Sequence[str] = ("cluster", "target_type", "target_value", "destination", "action", "dry_run",
                                      "backup_id", "tablespaces")
    ui_color = "#f5e6d3"

    def __init__(self, *, clusters: dict[str, dict], cluster: str, target_type: str = "latest",
                 target_value: str | None = None, destination: str = "", action: str = "promote",
                 dry_run: Any = True, backup_id: str | None = None, timeout_s: float = 6 * 3600,
                 tablespace_map: dict | None = None, tablespaces_in_place: bool = False,
                 tablespaces: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.tablespace_map = tablespace_map  # {tablespace name or OID: directory}
        self.tablespaces_in_place = tablespaces_in_place
        self.tablespaces = tablespaces  # the form's text: "name=/dir, 16390=/dir2" or "in place"
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
        from airflow_pg_incremental.core.copies import restore_with_fallback
        from airflow_pg_incremental.core.errors import PgIncrError
        from airflow_pg_incremental.core.pitr import parse_target, plan_restore, restore_pitr
        from airflow_pg_incremental.core.restore import check_target_dir
        from airflow_pg_incremental.hooks.repository import REPOSITORY_OPTIONS, PgBackupRepositoryHook

        dry = str(self.dry_run).lower() in ("true", "1", "yes", "on")
        self._parse_tablespaces()
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
            repos = [PgBackupRepositoryHook(c["repository"], c.get("aws_conn_id"),
                                            **{k: c.get(k) for k in REPOSITORY_OPTIONS}
                                            ).get_repository(must_exist=False)
                     for c in [cfg, *cfg.get("copies", [])]]
            # the first repository that serves (the copies when it is unreachable or damaged)
            plan = restore_with_fallback(repos, plan_restore, self.cluster, target, backup_id)
            repo = next(r for r in repos if r.url == plan["repository"])
            if dest is not None:  # tablespaces without a place are refused now, with the ways out
                from airflow_pg_incremental.core.metadata import resolve_backup
                from airflow_pg_incremental.core.tablespaces import plan_tablespaces

                plan_tablespaces(resolve_backup(repo, self.cluster, plan["backup_id"]), self.tablespace_map,
                                 self.tablespaces_in_place, dest)
        except PgIncrError as e:
            self._record(context, ok=False, dry_run=dry, error=f"refused: {e}")
            raise _fail(f"restore refused, nothing was touched: {e}") from None
        self.log.info("restore plan for %s: backup %s (chain %s), target %s %s, action %s -> %s",
                      self.cluster, plan["backup_id"], " -> ".join(b["backup_id"] for b in plan["chain"]),
                      target.kind, target.value or "", target.action, dest or "(no destination given)")
        self.log.info("WAL needed: %s .. %s (%s; the archive ends at %s); %s", plan["wal_from"], plan["wal_to"],
                      "exactly what the target needs" if plan["wal_to_is"] == "exact" else
                      "at most: the first commit after the target decides", plan["archive_end_segment"],
                      plan["window_text"])
        if plan["fell_back"]:
            self.log.warning("planned from the copy %s: %s", plan["repository"],
                             "; ".join(f"{f['repository']}: {f['error']}" for f in plan["fell_back"]))
        small = {"cluster": self.cluster, "dry_run": dry, "destination": str(dest) if dest else None,
                 "repository": plan["repository"], "fell_back": plan["fell_back"],
                 "backup_id": plan["backup_id"],
                 "chain": [b["backup_id"] for b in plan["chain"]], "wal_from": plan["wal_from"],
                 "wal_to": plan["wal_to"], "wal_to_is": plan["wal_to_is"], "window": plan["window_text"],
                 "target": plan["target"]}
        if dry:
            self.log.info("dry run: nothing restored")
            self._record(context, ok=True, dry_run=True, backup_id=plan["backup_id"], chain=small["chain"])
            return small
        from airflow_pg_incremental.core import procs
        from airflow_pg_incremental.core.server import default_os_user

        procs.register_dir(dest, keep_root=dest.exists())  # a killed restore leaves nothing in it
        try:
            rest = repos[repos.index(repo):]  # from the one that planned, the later copies after it
            rep = restore_with_fallback(rest, restore_pitr, self.cluster, target, dest, backup_id=backup_id,
                                        timeout_s=self.timeout_s, os_user=default_os_user(),
                                        tablespace_map=self.tablespace_map,
                                        tablespaces_in_place=self.tablespaces_in_place)
        except PgIncrError as e:
            self._record(context, ok=False, backup_id=plan["backup_id"], chain=small["chain"], error=str(e))
            raise _fail(f"restore of {self.cluster} failed: {e}") from None
        finally:
            procs.forget_dir(dest)
        small.update({k: rep.get(k) for k in ("state", "reached_lsn", "stopped_at", "restore_seconds", "timings",
                                              "repository")})
        small["fell_back"] = plan["fell_back"] + rep.get("fell_back", [])
        self._record(context, ok=True, backup_id=rep.get("backup_id"), chain=rep.get("chain"),
                     **{k: rep.get(k) for k in ("reached_lsn", "stopped_at", "restore_seconds", "timings")})
        return small

    def _parse_tablespaces(self) -> None:
        """The form's tablespaces field: `in place`, or `name=/dir` pairs separated by commas."""
        text = (self.tablespaces or "").strip()
        if not text:
            return
        if text.lower().replace("_", " ").replace("-", " ") == "in place":
            self.tablespaces_in_place = True
            return
        mapping = dict(self.tablespace_map or {})
        for item in (x.strip() for x in text.split(",") if x.strip()):
            key, sep, directory = item.partition("=")
            if not sep or not key.strip() or not directory.strip():
                raise _fail(f"tablespaces: {item!r} is not NAME_OR_OID=/new/directory (or write `in place`)")
            mapping[key.strip()] = directory.strip()
        self.tablespace_map = mapping

    def _record(self, context: Context, **row) -> None:
        """The restore (or its refusal, or a dry run) in the cluster's catalog, when it has one; a
        catalog that cannot be written is logged, never hides the restore's own outcome."""
        cfg = self.clusters.get(self.cluster) or {}
        if not cfg.get("catalog_conn_id"):
            return
        try:
            from airflow_pg_incremental.hooks.repository import PgClusterHook

            ti = context.get("ti")
            PgClusterHook(cfg["catalog_conn_id"]).get_catalog(cfg.get("catalog_schema") or "pgincr").record_restore(
                cluster=self.cluster, target_kind=self.target_type, target_value=self.target_value or None,
                destination=self.destination or None, dag_id=getattr(ti, "dag_id", None),
                run_id=getattr(ti, "run_id", None), **row)
        except Exception as e:
            self.log.error("could not record the restore in the catalog: %s", e)


def _gauges(cluster: str, values: dict) -> None:
    """Airflow metrics (statsd/otel when configured); never fails the task."""
    try:
        from airflow.sdk.observability.stats import Stats

        for name, v in values.items():
            if v is not None:
                Stats.gauge(f"pgincr.{cluster}.{name}", float(v))
    except Exception:
        pass
