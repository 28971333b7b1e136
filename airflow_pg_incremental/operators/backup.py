"""Operators for base backups. Each resolves connections, calls one engine function, and returns a
small JSON dict as XCom."""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseOperator, Context


class StopsEngineOnKill:
    """on_kill for operators that run the engine: Airflow's supervisor stops a task with SIGTERM,
    whose handler calls on_kill() in the task's main thread and then lets execute() go on. The
    PostgreSQL servers the engine started (restores, restore tests) run in a session of their own
    and would outlive the task, so: stop every server and child program the engine started in this
    process, remove its scratch directories (core.procs.terminate_all), then, in the main thread,
    raise AirflowTaskTerminated so that execute() ends at once (its own cleanup runs on the way
    out). From another thread, the engine refuses to start anything more instead."""

    def on_kill(self) -> None:
        from airflow_pg_incremental.core import procs

        done = procs.terminate_all(f"task {self.task_id} killed")
        self.log.warning("Task killed: stopped %d server(s), killed %d child program(s), removed %d scratch "
                         "director(ies) the engine had started%s", done["servers"], done["children"], done["dirs"],
                         f"; errors: {'; '.join(done['errors'])}" if done["errors"] else "")
        # not when an exception is on its way out already: the task runner calls on_kill from its
        # `except AirflowTaskTimeout` too (execution_timeout), and that timeout must stay what fails the task
        if threading.current_thread() is threading.main_thread() and sys.exc_info()[1] is None:
            from airflow.sdk.exceptions import AirflowTaskTerminated

            raise AirflowTaskTerminated(f"task {self.task_id} was killed; what it had started was stopped")


class _PgBackupBase(StopsEngineOnKill, BaseOperator):
    """`postgres_conn_id`: the server backups are read from; when it is a streaming standby,
    `primary_conn_id` is its primary, which checkpoints first (so the backup starts now) and
    archives the WAL (see core.standby)."""

    template_fields: Sequence[str] = ("cluster", "postgres_conn_id", "repository", "aws_conn_id", "catalog_conn_id",
                                      "primary_conn_id", "encryption_key_conn_id")
    ui_color = "#d3e4f5"

    def __init__(self, *, cluster: str, postgres_conn_id: str, repository: str, aws_conn_id: str | None = None,
                 catalog_conn_id: str | None = None, catalog_schema: str = "pgincr",
                 primary_conn_id: str | None = None, encryption_key_conn_id: str | None = None,
                 s3_sse: str | None = None, s3_sse_kms_key_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # the repository's encryption key (a connection's password) and S3 server-side encryption
        self.encryption_key_conn_id = encryption_key_conn_id
        self.s3_sse = s3_sse
        self.s3_sse_kms_key_id = s3_sse_kms_key_id
        self.cluster = cluster
        self.postgres_conn_id = postgres_conn_id
        self.primary_conn_id = primary_conn_id
        self.repository = repository
        self.aws_conn_id = aws_conn_id
        self.catalog_conn_id = catalog_conn_id
        self.catalog_schema = catalog_schema

    # engine objects, built at execute time only (no I/O in constructors)
    def _conninfo(self):
        from airflow_pg_incremental.hooks.repository import PgClusterHook

        return PgClusterHook(self.postgres_conn_id).get_conninfo()

    def _primary(self):
        if not self.primary_conn_id:
            return None
        from airflow_pg_incremental.hooks.repository import PgClusterHook

        return PgClusterHook(self.primary_conn_id).get_conninfo()

    def _repo(self, must_exist: bool = True):
        from airflow_pg_incremental.hooks.repository import PgBackupRepositoryHook

        return PgBackupRepositoryHook(self.repository, self.aws_conn_id, **self._repository_options()
                                      ).get_repository(must_exist=must_exist)

    def _repository_options(self) -> dict:
        return {"encryption_key_conn_id": self.encryption_key_conn_id, "s3_sse": self.s3_sse,
                "s3_sse_kms_key_id": self.s3_sse_kms_key_id}

    def _catalog(self):
        if not self.catalog_conn_id:
            return None
        from airflow_pg_incremental.hooks.repository import PgClusterHook

        return PgClusterHook(self.catalog_conn_id).get_catalog(self.catalog_schema)

    @staticmethod
    def _airflow_ids(context: Context) -> dict:
        ti = context["ti"]
        return {"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id,
                "try_number": getattr(ti, "try_number", None)}


def _backup_metrics(cluster: str, meta: dict) -> None:
    from airflow_pg_incremental.metrics import emit

    emit(cluster, {"backup.raw_bytes": meta.get("raw_bytes"), "backup.stored_bytes": meta.get("stored_bytes"),
                   "backup.duration_seconds": meta.get("duration_s")})


class PgBackupPreflightOperator(_PgBackupBase):
    """Checks before a backup: server reachable with the connection's credentials, REPLICATION
    attribute, wal_level, binaries of the server's major version, repository
    writable, WAL archiving in place (pull: the replication slot, created before the backup, and
    max_slot_wal_keep_size reported; push: archive_command pushes into this repository). Also removes leftovers of interrupted backups older than `cleanup_after_s`. With
    `create_repository`, a location that holds no repository yet gets one (otherwise that is an
    error: a mistyped repository is never created)."""

    template_fields: Sequence[str] = (*_PgBackupBase.template_fields, "slot_name")

    def __init__(self, *, cleanup_after_s: float = 6 * 3600, wal_mode: str = "pull", slot_name: str | None = None,
                 create_repository: bool = False, max_slot_retained_bytes: int = 8 << 30, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.cleanup_after_s = cleanup_after_s
        self.wal_mode = wal_mode
        self.slot_name = slot_name
        self.create_repository = create_repository
        self.max_slot_retained_bytes = max_slot_retained_bytes

    def execute(self, context: Context) -> dict:
        from airflow_pg_incremental.core.capture import default_slot_name
        from airflow_pg_incremental.core.preflight import preflight_full

        slot = (self.slot_name or default_slot_name(self.cluster)) if self.wal_mode == "pull" else None
        return preflight_full(self._conninfo(), self._repo(must_exist=not self.create_repository), self.cluster,
                              cleanup_after_s=self.cleanup_after_s, slot=slot, catalog=self._catalog(),
                              create_repository=bool(self.create_repository), wal_mode=self.wal_mode,
                              max_slot_retained_bytes=int(self.max_slot_retained_bytes), primary=self._primary())


class PgBaseBackupOperator(_PgBackupBase):
    """Full base backup (pg_basebackup, tar streamed through zstd into the repository).

    XCom: {backup_id, kind, start_lsn, stop_lsn, timeline, raw_bytes, stored_bytes, duration_s, ...}.
    """

    template_fields: Sequence[str] = (*_PgBackupBase.template_fields, "compression_level", "compression")

    def __init__(self, *, compression_level: int = 3, compression_threads: int | None = None,
                 compression: str = "auto", progress_interval: float = 10.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.compression_level = compression_level
        self.compression_threads = compression_threads  # None: the worker's cores (at most 8)
        self.compression = compression  # auto | server | client (core/backup_stream.py)
        self.progress_interval = progress_interval

    def execute(self, context: Context) -> dict:
        from airflow_pg_incremental.core.backup import summary, take_full_backup

        meta = take_full_backup(self._conninfo(), self._repo(), self.cluster,
                                compression_level=int(self.compression_level), threads=self.compression_threads,
                                compression=self.compression, catalog=self._catalog(),
                                airflow=self._airflow_ids(context),
                                progress_interval=self.progress_interval, primary=self._primary())
        _backup_metrics(self.cluster, meta)
        return summary(meta)


class PgIncrementalBackupOperator(PgBaseBackupOperator):
    """Block-level incremental (parent = newest backup of the chain) or differential (parent = the
    chain's full) backup, PostgreSQL 17+. A preflight decides first; when an incremental is not
    possible (summarize_wal off, WAL summaries not covering the parent's start, timeline or system
    change, checksums switched, parent missing or damaged, chain too long, parent older than
    wal_summary_keep_time) it takes a full backup and says why in the log and the XCom. On
    PostgreSQL 16 and older it takes nothing and says so: the WAL archive is the incremental.

    XCom: the backup summary plus {"plan": {"requested", "kind", "reason", "parent_id", "chain"}}.
    """

    template_fields: Sequence[str] = (*PgBaseBackupOperator.template_fields, "incremental_kind")

    def __init__(self, *, incremental_kind: str = "incremental", max_chain_length: int = 14, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.incremental_kind = incremental_kind
        self.max_chain_length = max_chain_length

    def execute(self, context: Context) -> dict:
        from airflow_pg_incremental.core.backup import summary
        from airflow_pg_incremental.core.incremental import take_planned_backup

        meta = take_planned_backup(self._conninfo(), self._repo(), self.cluster, kind=self.incremental_kind,
                                   max_chain_length=int(self.max_chain_length),
                                   compression_level=int(self.compression_level), threads=self.compression_threads,
                                   compression=self.compression, catalog=self._catalog(),
                                   airflow=self._airflow_ids(context),
                                   progress_interval=self.progress_interval, primary=self._primary())
        if meta["kind"] == "none":
            self.log.info("No block-level incremental: %s", meta["reason"])
            return {"cluster": self.cluster, "kind": "none", "backup_id": None, "reason": meta["reason"],
                    "plan": {k: meta["plan"].get(k) for k in ("requested", "kind", "reason")}}
        _backup_metrics(self.cluster, meta)
        out = summary(meta)
        out["plan"] = meta.get("plan")
        if out["plan"] and out["plan"].get("reason"):
            self.log.warning("Took a %s backup instead of %s: %s", meta["kind"], self.incremental_kind,
                             out["plan"]["reason"])
        return out


# what makes a chain impossible to combine (the weekly DAG then takes a server full instead)
def _uncombinable():
    from airflow_pg_incremental.core.errors import BackupNotFound, ChecksumMismatch, ConfigError, ObjectNotFound, \
        RestoreError

    return (BackupNotFound, ChecksumMismatch, ConfigError, ObjectNotFound, RestoreError)


class PgSyntheticFullOperator(PgBaseBackupOperator):
    """Synthetic full backup: the restore chain of backup `upto` (full or synthetic full +
    incrementals, PostgreSQL 17+) combined on the worker, never on the database server, into a new
    full (kind `synthetic`, standing for `upto`: same LSNs and point in time). Restores of `upto`
    and of later incrementals start from it; the next incremental still builds on `upto`. Needs
    the cluster's size free in `scratch_dir` (the worker's temporary directory by default).

    With `incremental_task_id` (incremental-forever weekly runs): the backup to stand for is the one
    that task took (its XCom); when there is no chain to combine (that task took a full: no full
    yet, summarize_wal off, ...; or took nothing: PostgreSQL < 17), or the chain cannot be combined
    (a broken or damaged link), a server full is taken instead (`postgres_conn_id`), and why is
    logged and returned as `fallback_reason`. Without it, nothing to combine is not an error: the
    XCom says `kind: none` and why.

    XCom: the synthetic (or full) backup's summary plus {full_mode: synthetic|server,
    fallback_reason, stop_wal_file, restore_chain (what a restore of it combines), parent_chain
    (the chain of parents the next incremental builds on)}.
    """

    template_fields: Sequence[str] = (*PgBaseBackupOperator.template_fields, "upto", "scratch_dir")
    ui_color = "#d3ecf5"

    def __init__(self, *, upto: str | None = "latest", incremental_task_id: str | None = None,
                 scratch_dir: str | None = None, postgres_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(postgres_conn_id=postgres_conn_id or "", **kwargs)
        self.upto = upto
        self.incremental_task_id = incremental_task_id
        self.scratch_dir = scratch_dir

    def execute(self, context: Context) -> dict:
        repo = self._repo()
        if self.incremental_task_id:
            inc = context["ti"].xcom_pull(task_ids=self.incremental_task_id) or {}
            if inc.get("kind") == "full":  # the planner took a full: that is this run's full
                why = (inc.get("plan") or {}).get("reason") or inc.get("reason") or "the planner chose a full"
                return self._fallback(context, repo, f"no incremental to combine: {self.incremental_task_id} took a "
                                                     f"server full ({why})", taken=inc["backup_id"])
            if not inc.get("backup_id"):
                return self._fallback(context, repo, f"no incremental to combine: {self.incremental_task_id} took "
                                                     f"no backup ({inc.get('reason') or 'see its log'})")
            upto = inc["backup_id"]
        else:
            upto = str(self.upto or "").strip() or "latest"
        try:
            meta = self._synthesize(context, repo, upto)
        except _uncombinable() as e:
            if not self.incremental_task_id:
                raise
            return self._fallback(context, repo, f"the chain of {upto} cannot be combined: {e}")
        if meta["kind"] == "none":
            self.log.info("Nothing to synthesize: %s", meta["reason"])
            return {**meta, "full_mode": "synthetic", "fallback_reason": None}
        _backup_metrics(self.cluster, meta)
        return self._result(repo, meta, "synthetic", None)

    def _synthesize(self, context: Context, repo, upto: str) -> dict:
        from airflow_pg_incremental.core.synthetic import plan_synthesis, synthesize

        plan = plan_synthesis(repo, self.cluster, upto)  # refusals (PostgreSQL < 17, broken chain) first
        if not plan["skip"]:
            self.log.info("Combining %s on this worker into a synthetic full standing for %s",
                          " -> ".join(plan["chain"]), plan["stands_for"])
        return synthesize(repo, self.cluster, upto, compression_level=int(self.compression_level),
                          threads=self.compression_threads, scratch_dir=self.scratch_dir or None,
                          catalog=self._catalog(), airflow=self._airflow_ids(context),
                          progress_interval=self.progress_interval)

    def _fallback(self, context: Context, repo, reason: str, taken: str | None = None) -> dict:
        """A server full instead of a synthetic one (or the full `taken` already this run), saying why."""
        from airflow_pg_incremental.core.backup import take_full_backup
        from airflow_pg_incremental.core.metadata import load_backup

        if taken:
            self.log.warning("No synthetic full this run: %s", reason)
            meta = load_backup(repo, self.cluster, taken)
        else:
            self.log.warning("Taking a server full instead of a synthetic full: %s", reason)
            meta = take_full_backup(self._conninfo(), repo, self.cluster,
                                    compression_level=int(self.compression_level), threads=self.compression_threads,
                                    compression=self.compression, catalog=self._catalog(),
                                    airflow=self._airflow_ids(context), progress_interval=self.progress_interval,
                                    primary=self._primary())
            _backup_metrics(self.cluster, meta)
        return self._result(repo, meta, "server", reason)

    def _result(self, repo, meta: dict, mode: str, reason: str | None) -> dict:
        from airflow_pg_incremental.core import backup, synthetic
        from airflow_pg_incremental.core.incremental import resolve_chain
        from airflow_pg_incremental.core.metadata import load_backup

        out = synthetic.summary(meta) if meta["kind"] == "synthetic" else backup.summary(meta)
        stands = load_backup(repo, self.cluster, meta["stands_for"]) if meta["kind"] == "synthetic" else meta
        out.update({"full_mode": mode, "fallback_reason": reason, "stop_wal_file": meta.get("stop_wal_file"),
                    "restore_chain": [b["backup_id"] for b in resolve_chain(repo, self.cluster, meta)],
                    "parent_chain": [b["backup_id"] for b in resolve_chain(repo, self.cluster, stands,
                                                                           synthetic=False)]})
        return out
