"""One factory builds every DAG of every cluster from one configuration file.

Configuration (YAML or JSON)::

    defaults:                      # optional, merged into every cluster
      catalog_conn_id: pgincr_catalog
      compression_level: 3
    clusters:
      - name: main                 # cluster name: becomes part of object keys and DAG ids
        postgres_conn_id: pg_main  # the server to back up (needs REPLICATION)
        repository: s3://pg-backups/prod     # or an absolute local directory
        aws_conn_id: aws_backups   # for s3:// repositories (extra may hold endpoint_url)
        schedules:
          weekly_full: "0 2 * * 0"

A second cluster is one more entry. Building DAGs reads only this file: no connection, no
network, no database at parse time.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_pg_incremental.core.errors import ConfigError
from airflow_pg_incremental.core.names import validate_cluster

DEFAULT_SCHEDULES = {"weekly_full": "0 2 * * 0", "daily_incremental": "0 2 * * 1-6", "hourly_wal": "5 * * * *",
                     "restore_test": "30 6 * * *", "retention": "0 5 * * *"}
_CLUSTER_KEYS = {"name", "postgres_conn_id", "repository", "aws_conn_id", "catalog_conn_id", "catalog_schema",
                 "schedules", "compression_level", "compression_threads", "compression", "tags", "owner", "start_date",
                 "retries", "retry_delay_minutes", "cleanup_after_hours", "description", "wal_mode", "slot_name",
                 "rpo_minutes", "max_slot_retained_gb", "wal_wait_minutes", "deferrable", "incremental_kind",
                 "max_chain_length", "notifiers", "restore_test_checks", "restore_test_databases", "retention",
                 "scratch_dir", "create_repository", "restore_queue", "restore_pool", "backup_pool",
                 "max_backup_age_hours", "full_mode", "primary_conn_id", "copies", "encryption_key_conn_id",
                 "s3_sse", "s3_sse_kms_key_id"}


@dataclass
class ClusterConfig:
    name: str
    postgres_conn_id: str
    repository: str
    primary_conn_id: str | None = None  # postgres_conn_id is a streaming standby: backups are read from it; this,
                                        # its primary, checkpoints first and switches and archives the WAL
    aws_conn_id: str | None = None
    catalog_conn_id: str | None = None
    catalog_schema: str = "pgincr"
    schedules: dict = field(default_factory=lambda: dict(DEFAULT_SCHEDULES))
    compression_level: int = 3
    compression_threads: int | None = None  # None: the worker's cores, at most 8
    compression: str = "auto"  # auto | server | client: where zstd runs (core/backup_stream.py)
    tags: list = field(default_factory=list)
    owner: str = "dba"
    start_date: str = "2026-01-01"
    retries: int = 1
    retry_delay_minutes: float = 5
    cleanup_after_hours: float = 6
    description: str = ""
    wal_mode: str = "pull"            # pull: capture through a replication slot; push: archive_command
    slot_name: str | None = None      # default pgincr_<cluster>
    rpo_minutes: float = 90           # the freshness check fails when the newest WAL is older
    max_backup_age_hours: float = 192  # the backup-age check fails when the newest backup is older (8 days:
                                       # weekly fulls; 26 with daily incrementals on PostgreSQL 17+)
    max_slot_retained_gb: float = 8   # warn when the slot holds more WAL on the server
    wal_wait_minutes: float = 30      # how long to wait for a segment to be archived
    deferrable: bool = True           # sensors defer to the triggerer instead of holding a worker slot
    incremental_kind: str = "incremental"  # or "differential" (parent = the chain's full)
    max_chain_length: int = 14        # a full is taken instead once the chain is this long
    full_mode: str = "server"         # weekly full: server (pg_basebackup) or synthetic (incremental-forever: an
                                      # incremental, combined on the worker into a synthetic full; PostgreSQL 17+)
    notifiers: list = field(default_factory=list)  # [{"class": "...SmtpNotifier", "kwargs": {...}}]
    restore_test_checks: list = field(default_factory=lambda: ["SELECT count(*) FROM pg_class"])
    restore_test_databases: list = field(default_factory=lambda: ["postgres"])
    retention: dict = field(default_factory=dict)   # keep_full_chains, recovery_window_days, min_redundancy, pinned
    scratch_dir: str | None = None    # where restore tests build their scratch copies (default: temp dir)
    create_repository: bool = False   # the backup preflight creates the repository when none is there yet
    restore_queue: str | None = None  # executor queue of restore and restore-test tasks (e.g. a Celery queue
                                      # served only by the workers on the hosts meant for restores)
    restore_pool: str | None = None   # Airflow pool of restore and restore-test tasks (bounds them per host)
    backup_pool: str | None = None    # Airflow pool of backup and capture tasks (e.g. one per repository or
                                      # network link, so a fleet's weekly fulls do not all start at once)
    copies: list = field(default_factory=list)  # [{"repository": ..., "aws_conn_id": ...}]: second repositories
    encryption_key_conn_id: str | None = None  # encryption at rest: the connection whose password is the
                                               # repository key (extra {"old_keys": [...]} after a rotation)
    s3_sse: str | None = None                  # S3 server-side encryption of writes: AES256 | aws:kms
    s3_sse_kms_key_id: str | None = None       # the KMS key of aws:kms (default: the account's)

    @property
    def dag_prefix(self) -> str:
        return f"pgincr_{self.name}"

    def repository_options(self) -> dict:
        """The repository's encryption key connection and S3 server-side encryption (every task that
        opens the repository gets them)."""
        return {k: getattr(self, k) for k in REPOSITORY_OPTION_KEYS if getattr(self, k)}

    def repo_kwargs(self) -> dict:
        return {"repository": self.repository, "aws_conn_id": self.aws_conn_id, **self.repository_options()}

    def engine_kwargs(self) -> dict:
        return {"cluster": self.name, "postgres_conn_id": self.postgres_conn_id, **self.repo_kwargs(),
                "catalog_conn_id": self.catalog_conn_id, "catalog_schema": self.catalog_schema}

    def backup_kwargs(self) -> dict:
        """engine_kwargs of the backup tasks: read from postgres_conn_id, with its primary."""
        return {**self.engine_kwargs(), "primary_conn_id": self.primary_conn_id}

    def wal_kwargs(self) -> dict:
        """engine_kwargs of the WAL tasks (switch, capture, freshness): the primary when the backups
        are read from a standby."""
        return {**self.engine_kwargs(), "postgres_conn_id": self.primary_conn_id or self.postgres_conn_id}


def parse_config(raw: dict) -> list[ClusterConfig]:
    if not isinstance(raw, dict) or not isinstance(raw.get("clusters"), list) or not raw["clusters"]:
        raise ConfigError("configuration needs a non-empty 'clusters' list")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError("'defaults' must be a mapping")
    if not isinstance(defaults.get("schedules") or {}, dict):
        raise ConfigError("defaults.schedules must be a mapping of DAG kind to schedule")
    out, seen = [], set()
    for i, entry in enumerate(raw["clusters"]):
        if not isinstance(entry, dict):
            raise ConfigError(f"clusters[{i}] must be a mapping")
        if not isinstance(entry.get("schedules") or {}, dict):
            raise ConfigError(f"clusters[{i}].schedules must be a mapping of DAG kind to schedule")
        merged = {**defaults, **entry}
        merged["schedules"] = {**DEFAULT_SCHEDULES, **(defaults.get("schedules") or {}), **(entry.get("schedules") or {})}
        unknown = set(merged) - _CLUSTER_KEYS
        if unknown:
            raise ConfigError(f"clusters[{i}]: unknown keys {sorted(unknown)}; allowed: {sorted(_CLUSTER_KEYS)}")
        for req in ("name", "postgres_conn_id", "repository"):
            if not merged.get(req):
                raise ConfigError(f"clusters[{i}]: '{req}' is required")
        for key in ("name", "postgres_conn_id", "repository", "aws_conn_id", "catalog_conn_id", "catalog_schema",
                    "owner", "start_date", "description", "restore_queue", "restore_pool", "backup_pool",
                    "primary_conn_id", "encryption_key_conn_id", "s3_sse", "s3_sse_kms_key_id"):
            if merged.get(key) is not None and not isinstance(merged[key], str):
                raise ConfigError(f"clusters[{i}].{key} must be a string, got {type(merged[key]).__name__}")
        for key in ("compression_level", "compression_threads", "retries", "retry_delay_minutes",
                    "cleanup_after_hours"):
            if key == "compression_threads" and merged.get(key) is None:
                continue
            if key in merged and (isinstance(merged[key], bool) or not isinstance(merged[key], (int, float))):
                raise ConfigError(f"clusters[{i}].{key} must be a number")
        for key in ("deferrable", "create_repository"):
            if key in merged and not isinstance(merged[key], bool):
                raise ConfigError(f"clusters[{i}].{key} must be true or false")
        if not isinstance(merged.get("tags", []), list):
            raise ConfigError(f"clusters[{i}].tags must be a list")
        # core.backup_stream.MODES, spelled out: importing it would load zstandard at DAG parse time
        if merged.get("compression", "auto") not in ("auto", "server", "client"):
            raise ConfigError(f"clusters[{i}].compression must be 'auto', 'server' or 'client' (where zstd runs: "
                              "auto = on the database server when it supports zstd, else on the worker)")
        if merged.get("full_mode", "server") not in ("server", "synthetic"):
            raise ConfigError(f"clusters[{i}].full_mode must be 'server' (the weekly full is read from the server) or "
                              "'synthetic' (incremental-forever: the weekly run takes an incremental and combines "
                              "its chain on the worker into a synthetic full; PostgreSQL 17+ with summarize_wal)")
        if merged.get("incremental_kind", "incremental") not in ("incremental", "differential"):
            raise ConfigError(f"clusters[{i}].incremental_kind must be 'incremental' or 'differential'")
        if "max_chain_length" in merged and (not isinstance(merged["max_chain_length"], int)
                                             or isinstance(merged["max_chain_length"], bool)
                                             or merged["max_chain_length"] < 2):
            raise ConfigError(f"clusters[{i}].max_chain_length must be an integer >= 2")
        if not isinstance(merged.get("notifiers", []), list) or any(
                not isinstance(n, dict) or not isinstance(n.get("class"), str) for n in merged.get("notifiers", [])):
            raise ConfigError(f"clusters[{i}].notifiers must be a list of {{class: 'dotted.path', kwargs: {{...}}}}")
        for key in ("restore_test_checks", "restore_test_databases"):
            if key in merged and (not isinstance(merged[key], list) or
                                  not all(isinstance(x, str) for x in merged[key])):
                raise ConfigError(f"clusters[{i}].{key} must be a list of strings")
        if not isinstance(merged.get("retention", {}), dict):
            raise ConfigError(f"clusters[{i}].retention must be a mapping")
        if merged.get("wal_mode", "pull") not in ("pull", "push"):
            raise ConfigError(f"clusters[{i}].wal_mode must be 'pull' (replication slot) or 'push' (archive_command)")
        for key in ("rpo_minutes", "max_slot_retained_gb", "wal_wait_minutes", "max_backup_age_hours"):
            if key in merged and (isinstance(merged[key], bool) or not isinstance(merged[key], (int, float))
                                  or merged[key] <= 0):
                raise ConfigError(f"clusters[{i}].{key} must be a positive number")
        validate_cluster(merged["name"])
        if merged["name"] in seen:
            raise ConfigError(f"cluster {merged['name']!r} is listed twice")
        seen.add(merged["name"])
        repo = merged["repository"]
        if not (repo.startswith("s3://") or os.path.isabs(repo.removeprefix("file://"))):
            raise ConfigError(f"cluster {merged['name']}: repository {repo!r} must be s3://bucket/prefix or an "
                              "absolute directory")
        if repo.startswith("s3://") and not merged.get("aws_conn_id"):
            merged["aws_conn_id"] = "aws_default"
        _check_sse(merged, f"clusters[{i}]", repo)
        merged["copies"] = _parse_copies(merged.get("copies"), i, repo, merged)
        out.append(ClusterConfig(**merged))
    return out


def _check_sse(d: dict, where: str, repository: str) -> None:
    """s3_sse / s3_sse_kms_key_id: S3 server-side encryption, for s3:// repositories only."""
    if d.get("s3_sse") not in (None, "AES256", "aws:kms"):
        raise ConfigError(f"{where}.s3_sse must be AES256 (SSE-S3) or aws:kms (SSE-KMS, with s3_sse_kms_key_id)")
    if d.get("s3_sse_kms_key_id") and d.get("s3_sse") != "aws:kms":
        raise ConfigError(f"{where}.s3_sse_kms_key_id needs s3_sse: aws:kms")
    if d.get("s3_sse") and not repository.startswith("s3://"):
        raise ConfigError(f"{where}.s3_sse applies to s3:// repositories only ({repository} is local); "
                          "encryption_key_conn_id encrypts both kinds")


REPOSITORY_OPTION_KEYS = ("encryption_key_conn_id", "s3_sse", "s3_sse_kms_key_id")  # = hooks.REPOSITORY_OPTIONS
_COPY_KEYS = {"repository", "aws_conn_id", *REPOSITORY_OPTION_KEYS}


def _parse_copies(copies, i: int, repository: str, cluster: dict | None = None) -> list[dict]:
    """`copies: [{repository: s3://other-bucket/prefix, aws_conn_id: aws_dr}, ...]`: second repositories;
    each may name its own encryption_key_conn_id (default: the cluster's) and s3_sse."""
    if copies is None:
        return []
    if not isinstance(copies, list):
        raise ConfigError(f"clusters[{i}].copies must be a list of {{repository: ..., aws_conn_id: ...}}")
    out = []
    for n, c in enumerate(copies):
        if not isinstance(c, dict) or not isinstance(c.get("repository"), str) or set(c) - _COPY_KEYS:
            raise ConfigError(f"clusters[{i}].copies[{n}] must be {{repository: s3://...|/dir, aws_conn_id: ...}}")
        url = c["repository"]
        if not (url.startswith("s3://") or os.path.isabs(url.removeprefix("file://"))):
            raise ConfigError(f"clusters[{i}].copies[{n}].repository {url!r} must be s3://bucket/prefix or an "
                              "absolute directory")
        if url.rstrip("/") == repository.rstrip("/"):
            raise ConfigError(f"clusters[{i}].copies[{n}] is the cluster's own repository: a copy goes elsewhere")
        aws = c.get("aws_conn_id") or ("aws_default" if url.startswith("s3://") else None)
        _check_sse(c, f"clusters[{i}].copies[{n}]", url)
        key_conn = c["encryption_key_conn_id"] if "encryption_key_conn_id" in c else (cluster or {}).get(
            "encryption_key_conn_id")
        opts = {"encryption_key_conn_id": key_conn, "s3_sse": c.get("s3_sse"),
                "s3_sse_kms_key_id": c.get("s3_sse_kms_key_id")}
        out.append({"repository": url, "aws_conn_id": aws, **{k: v for k, v in opts.items() if v}})
    return out


def load_config(path: str | os.PathLike) -> list[ClusterConfig]:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read pgincr configuration {p}: {e.strerror}") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"pgincr configuration {p} is not valid JSON: {e}") from None
    except Exception as e:  # yaml.YAMLError
        raise ConfigError(f"pgincr configuration {p} is not valid YAML: {e}") from None
    try:
        return parse_config(raw)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def _default_args(cl: ClusterConfig) -> dict:
    from airflow_pg_incremental.callbacks import build_notifiers, record_failure

    return {"owner": cl.owner, "retries": cl.retries, "retry_delay": dt.timedelta(minutes=cl.retry_delay_minutes),
            # alerts: recorded in the catalog, then every configured notifier (SMTP, Slack, ...)
            "on_failure_callback": [record_failure(cl.name, cl.catalog_conn_id, cl.catalog_schema),
                                    *build_notifiers(cl.notifiers)]}


def _interval_timetable(spec: str):
    """A schedule whose runs have a data interval: a cron expression, or PT<n>S/M/H."""
    import re

    from airflow.sdk import CronDataIntervalTimetable, DeltaDataIntervalTimetable

    m = re.fullmatch(r"PT(\d+)([SMH])", spec.strip())
    if m:
        unit = {"S": "seconds", "M": "minutes", "H": "hours"}[m.group(2)]
        return DeltaDataIntervalTimetable(dt.timedelta(**{unit: int(m.group(1))}))
    return CronDataIntervalTimetable(spec, timezone="UTC")


def _start(cl: ClusterConfig) -> dt.datetime:
    d = dt.datetime.fromisoformat(str(cl.start_date))
    return d if d.tzinfo else d.replace(tzinfo=dt.timezone.utc)


def backups_asset(cluster: str):
    from airflow.sdk import Asset

    return Asset(name=f"pgincr_{cluster}_backups", uri=f"pgincr://{cluster}/backups")


def _dag(cl: ClusterConfig, kind: str, description: str, tags: list[str], doc_md: str, schedule: Any = "config",
         dag_id: str | None = None):
    """A DAG of `cl` with the settings every pgincr DAG shares."""
    from airflow.sdk import DAG

    return DAG(dag_id=dag_id or f"{cl.dag_prefix}_{kind}", description=description,
               schedule=cl.schedules.get(kind) if schedule == "config" else schedule,
               start_date=_start(cl), catchup=False, max_active_runs=1, default_args=_default_args(cl),
               tags=["pgincr", *tags, cl.name, *cl.tags], doc_md=doc_md)


def _backup_routing(cl: ClusterConfig) -> dict:
    """The pool of the tasks that read the server and write the repository (backups, capture)."""
    return {"pool": cl.backup_pool} if cl.backup_pool else {}


def _restore_routing(cl: ClusterConfig) -> dict:
    """Where restore and restore-test tasks run: the executor queue of the hosts meant for restores
    (CeleryExecutor: the workers started with `airflow celery worker --queues <queue>`) and a pool."""
    out = {}
    if cl.restore_queue:
        out["queue"] = cl.restore_queue
    if cl.restore_pool:
        out["pool"] = cl.restore_pool
    return out


def _verify_task(cl: ClusterConfig, backup_template: str, outlets):
    from airflow_pg_incremental.operators.verify import PgBackupVerifyOperator

    return PgBackupVerifyOperator(task_id="verify", cluster=cl.name, **cl.repo_kwargs(),
                                  catalog_conn_id=cl.catalog_conn_id,
                                  catalog_schema=cl.catalog_schema, backup_id=backup_template, outlets=outlets)


def _wal_tasks(cl: ClusterConfig, segment_template: str, upto_template: str, outlets=None):
    """switch → (pull: capture up to the switch) → wait until `segment` is archived."""
    from airflow_pg_incremental.operators.wal import (
        PgWalCaptureOperator,
        PgWalSwitchOperator,
    )
    from airflow_pg_incremental.sensors.wal import WalArchivedSensor

    common = cl.wal_kwargs()
    switch = PgWalSwitchOperator(task_id="wal_switch", **common)
    tasks = [switch]
    if cl.wal_mode == "pull":
        tasks.append(PgWalCaptureOperator(task_id="wal_capture", upto_lsn=upto_template, slot_name=cl.slot_name,
                                          max_slot_retained_bytes=int(cl.max_slot_retained_gb * (1 << 30)),
                                          compression_level=cl.compression_level, **_backup_routing(cl),
                                          **common))
    tasks.append(WalArchivedSensor(task_id="wal_archived", cluster=cl.name, **cl.repo_kwargs(),
                                   segment=segment_template, deferrable=cl.deferrable,
                                   poke_interval=10, timeout=cl.wal_wait_minutes * 60, outlets=outlets or []))
    for a, b in zip(tasks, tasks[1:]):
        a >> b
    return tasks


def _preflight(cl: ClusterConfig):
    from airflow_pg_incremental.operators.backup import PgBackupPreflightOperator

    return PgBackupPreflightOperator(task_id="preflight", cleanup_after_s=cl.cleanup_after_hours * 3600,
                                     wal_mode=cl.wal_mode, slot_name=cl.slot_name,
                                     create_repository=cl.create_repository,
                                     max_slot_retained_bytes=int(cl.max_slot_retained_gb * (1 << 30)),
                                     **cl.backup_kwargs())


def _incremental_task(cl: ClusterConfig):
    from airflow_pg_incremental.operators.backup import PgIncrementalBackupOperator

    return PgIncrementalBackupOperator(task_id="incremental_backup", incremental_kind=cl.incremental_kind,
                                       max_chain_length=cl.max_chain_length, compression_level=cl.compression_level,
                                       compression_threads=cl.compression_threads, compression=cl.compression,
                                       **_backup_routing(cl), **cl.backup_kwargs())


WEEKLY_DOC = {
    "server": """Full base backup of cluster **{name}** into `{repository}` (full_mode: server): the start of a new
chain. The backup counts only once its WAL is archived and it is verified; then the backups Asset
event starts the restore test. The XCom of `full_backup` holds the backup id, LSNs and sizes.""",
    "synthetic": """Incremental-forever weekly full of cluster **{name}** into `{repository}` (full_mode: synthetic):
the database server sends only an incremental; the worker combines that incremental's chain into a
**synthetic full** (kind `synthetic`, standing for the incremental: same LSNs and point in time),
so restores combine a short chain while the server never sends a full again. The next incremental
still builds on the incremental (PostgreSQL's WAL summaries were computed against it).

A **server full** is taken instead, and the reason is in the log and in the XCom of `synthetic_full`
(`fallback_reason`), when the chain cannot be combined: no full backup yet, PostgreSQL older than 17,
summarize_wal off (the incremental planner took a full), or a broken or damaged chain. The backup
counts only once its WAL is archived and it is verified; then the backups Asset event starts the
restore test, which restores the synthetic full. The XCom of `synthetic_full` holds the backup id,
what it stands for, the restore chain and the chain of parents.""",
}


def build_weekly_full(cl: ClusterConfig):
    """The weekly full: read from the server (full_mode server), or an incremental combined on the
    worker into a synthetic full (full_mode synthetic, incremental-forever)."""
    with _dag(cl, "weekly_full", f"Weekly {'synthetic ' if cl.full_mode == 'synthetic' else ''}full backup of "
              f"{cl.name}", ["backup"] + (["synthetic"] if cl.full_mode == "synthetic" else []),
              WEEKLY_DOC[cl.full_mode].format(name=cl.name, repository=cl.repository)) as dag:
        pre = _preflight(cl)
        tasks = [pre, *_weekly_backup_tasks(cl)]
        task_id = tasks[-1].task_id
        # a backup counts as complete only once the WAL that makes it consistent is archived
        wal = _wal_tasks(cl, segment_template=f"{{{{ ti.xcom_pull(task_ids='{task_id}')['stop_wal_file'] }}}}",
                         upto_template="{{ ti.xcom_pull(task_ids='wal_switch')['lsn'] }}")
        # verified, then announced: the Asset event triggers the restore test
        ver = _verify_task(cl, f"{{{{ ti.xcom_pull(task_ids='{task_id}')['backup_id'] }}}}",
                           [backups_asset(cl.name)])
        for a, b in zip(tasks, tasks[1:] + [wal[0]]):
            a >> b
        wal[-1] >> ver
    return dag


def _weekly_backup_tasks(cl: ClusterConfig) -> list:
    from airflow_pg_incremental.operators.backup import PgBaseBackupOperator, PgSyntheticFullOperator

    if cl.full_mode == "server":
        return [PgBaseBackupOperator(task_id="full_backup", compression_level=cl.compression_level,
                                     compression_threads=cl.compression_threads, compression=cl.compression,
                                     **_backup_routing(cl), **cl.backup_kwargs())]
    # the synthetic full (or the server full it falls back to) is the backup the run stands for
    return [_incremental_task(cl),
            PgSyntheticFullOperator(task_id="synthetic_full", incremental_task_id="incremental_backup",
                                    compression_level=cl.compression_level,
                                    compression_threads=cl.compression_threads, compression=cl.compression,
                                    scratch_dir=cl.scratch_dir, **_backup_routing(cl), **cl.backup_kwargs())]


def build_daily_incremental(cl: ClusterConfig):
    with _dag(
        cl, "daily_incremental", f"Daily {cl.incremental_kind} backup of {cl.name}", ["backup", "incremental"],
        f"""Block-level {cl.incremental_kind} backup of cluster **{cl.name}** (PostgreSQL 17+, summarize_wal = on).

The backup task decides first whether an {cl.incremental_kind} is possible (summarize_wal on and since
before the parent, WAL summaries covering the parent's start, same timeline and system, same
data-checksum setting, parent present and intact, chain shorter than {cl.max_chain_length}, parent younger
than wal_summary_keep_time); if not, a **full** backup is taken and the reason is logged and
returned in the XCom (`plan.reason`). **On PostgreSQL 16 and older no backup is taken: the WAL
archive is the incremental** (the task logs so and succeeds). The new backup counts only once its
WAL is archived and it is verified.""",
    ) as dag:
        pre, incr = _preflight(cl), _incremental_task(cl)
        # wait for the switch's segment: it lies after the backup's end (and exists on PG <= 16 too)
        wal = _wal_tasks(cl, segment_template="{{ ti.xcom_pull(task_ids='wal_switch')['segment'] }}",
                         upto_template="{{ ti.xcom_pull(task_ids='wal_switch')['lsn'] }}")
        # on PostgreSQL <= 16 there is no new backup: verify then checks nothing new (only unverified ones)
        ver = _verify_task(cl, "{{ (ti.xcom_pull(task_ids='incremental_backup') or {}).get('backup_id') or '' }}",
                           [backups_asset(cl.name)])
        pre >> incr >> wal[0]
        wal[-1] >> ver
    return dag


def build_hourly_wal(cl: ClusterConfig):
    from airflow_pg_incremental.operators.wal import PgWalContinuityOperator
    from airflow_pg_incremental.sensors.wal import WalFreshnessSensor

    mode = ("pull: WAL is captured through the replication slot up to the switch point"
            if cl.wal_mode == "pull" else
            "push: the server's archive_command (walcmd push) archives WAL; this DAG waits for it")
    with _dag(
        cl, "hourly_wal", f"WAL archive of {cl.name}: switch, capture, continuity, RPO", ["wal"],
        f"""WAL archive of cluster **{cl.name}** ({mode}). A failed `wal_fresh` is an RPO breach (alerted
as `rpo_breached`); it runs even when the capture failed.""",
    ) as dag:
        wal = _wal_tasks(cl, segment_template="{{ ti.xcom_pull(task_ids='wal_switch')['segment'] }}",
                         upto_template="{{ ti.xcom_pull(task_ids='wal_switch')['lsn'] }}")
        cont = PgWalContinuityOperator(task_id="wal_continuity", cluster=cl.name, **cl.repo_kwargs(),
                                       catalog_conn_id=cl.catalog_conn_id,
                                       catalog_schema=cl.catalog_schema)
        fresh = WalFreshnessSensor(task_id="wal_fresh", cluster=cl.name, **cl.repo_kwargs(),
                                   max_age_s=cl.rpo_minutes * 60,
                                   postgres_conn_id=cl.wal_kwargs()["postgres_conn_id"],
                                   deferrable=cl.deferrable, poke_interval=30, timeout=600)
        # the RPO check runs even when the capture failed: that is when it matters most
        fresh.trigger_rule = "all_done"
        from airflow_pg_incremental.operators.verify import PgBackupFreshnessOperator

        backup_age = PgBackupFreshnessOperator(task_id="backup_fresh", cluster=cl.name, **cl.repo_kwargs(),
                                               max_age_hours=cl.max_backup_age_hours,
                                               trigger_rule="all_done")
        wal[-1] >> cont >> fresh >> backup_age
    return dag


def build_restore_tests(cl: ClusterConfig):
    """Two DAGs: on a schedule with data intervals (a backfill proves PITR for every past
    interval end), and on every backup's Asset event (a fresh backup is proven at once)."""
    from airflow_pg_incremental.operators.restore import PgRestoreTestOperator

    doc = f"""Restore test of cluster **{cl.name}**: proves the backups by restoring them. Checks:
{cl.restore_test_checks}, plus amcheck; fails (and alerts) when anything does not hold. The scheduled
DAG restores to the end of each data interval: backfill it over past intervals to prove
point-in-time recovery for each of them; the `_on_backup` DAG runs on every verified backup."""
    out = []
    for kind, schedule, dag_id in (
            ("restore_test", _interval_timetable(cl.schedules.get("restore_test")), None),
            ("restore_test", [backups_asset(cl.name)], f"{cl.dag_prefix}_restore_test_on_backup")):
        with _dag(cl, kind, f"Restore test of {cl.name}", ["restore-test"], doc, schedule=schedule,
                  dag_id=dag_id) as dag:
            PgRestoreTestOperator(task_id="restore_test", cluster=cl.name, **cl.repo_kwargs(),
                                  catalog_conn_id=cl.catalog_conn_id,
                                  catalog_schema=cl.catalog_schema, checks=list(cl.restore_test_checks),
                                  databases=list(cl.restore_test_databases), scratch_dir=cl.scratch_dir,
                                  **_restore_routing(cl))
        out.append(dag)
    return out


COPY_SCHEDULE = "20 * * * *"  # hourly, after the hourly WAL capture (schedules.copy to change it)


def build_copy(cl: ClusterConfig):
    """Copies of the repository: one copy task per second repository (only what it lacks, every
    object checked, new backups verified there), then its WAL continuity there."""
    from airflow_pg_incremental.operators.copy import PgRepositoryCopyOperator
    from airflow_pg_incremental.operators.wal import PgWalContinuityOperator

    targets = ", ".join(f"`{c['repository']}`" for c in cl.copies)
    with _dag(cl, "copy", f"Copies of {cl.name}'s repository", ["copy"],
              f"""Copies of cluster **{cl.name}**'s repository `{cl.repository}` into {targets} (3-2-1): WAL, restore
points and complete backups the copy lacks, each object checked as it is read; every backup new in a
copy is verified there; then the copy's WAL continuity is checked. Restores (the `pgincr_restore`
DAG, `pgincr restore --fallback-repo`) fall back to the copies when the repository cannot serve.""",
              schedule=cl.schedules.get("copy", COPY_SCHEDULE)) as dag:
        for n, c in enumerate(cl.copies, start=1):
            copy = PgRepositoryCopyOperator(task_id=f"copy_{n}", copy_repository=c["repository"],
                                            copy_aws_conn_id=c["aws_conn_id"], cluster=cl.name,
                                            copy_options={k: c.get(k) for k in REPOSITORY_OPTION_KEYS},
                                            **cl.repo_kwargs(), **_backup_routing(cl))
            cont = PgWalContinuityOperator(task_id=f"wal_continuity_copy_{n}", cluster=cl.name, **c)
            copy >> cont
    return dag


def build_retention(cl: ClusterConfig):
    from airflow_pg_incremental.operators.retention import PgRetentionOperator

    r = cl.retention or {}
    policy = {"keep_full_chains": r.get("keep_full_chains"), "recovery_window_days": r.get("recovery_window_days"),
              "min_redundancy": r.get("min_redundancy", 1), "pinned": list(r.get("pinned", []))}
    with _dag(cl, "retention", f"Retention of {cl.name}", ["retention"],
              f"""Retention of cluster **{cl.name}**: policy {policy}. Read the plan in the `plan` task's log.
Never removes a backup a kept backup depends on, nor WAL needed to make a kept backup consistent or
to reach any point of the window; a policy that would delete everything or undercut min_redundancy
is refused.""") as dag:
        common = {"cluster": cl.name, **cl.repo_kwargs(),
                  "catalog_conn_id": cl.catalog_conn_id, "catalog_schema": cl.catalog_schema, **policy}
        plan = PgRetentionOperator(task_id="plan", dry_run=True, **common)
        apply = PgRetentionOperator(task_id="apply", dry_run=False, **common)
        plan >> apply
        # each copy on its own, by the same policy; without the catalog's verifications (they are the
        # first repository's), what a synthetic full absorbed stays in a copy
        for n, c in enumerate(cl.copies, start=1):
            other = {**common, **c, "catalog_conn_id": None}
            PgRetentionOperator(task_id=f"plan_copy_{n}", dry_run=True, **other) >> PgRetentionOperator(
                task_id=f"apply_copy_{n}", dry_run=False, **other)
    return dag


TARGET_TYPES = {"latest": "End of the archive (latest)", "time": "A point in time", "lsn": "A WAL location (LSN)",
                "xid": "A transaction id", "name": "A named restore point",
                "backup": "A backup's own end (its consistency point)"}


def restore_form(names: list[str]) -> dict:
    """The on-demand restore's params form: optional fields are nullable (a required-looking empty
    field would block Trigger), every value is validated again by the operator before anything is
    touched. No `section`s: Airflow 3.3 shows each section as a collapsed accordion, so the form
    would open with no field visible; in the default section every field shows at once."""
    from airflow.sdk import Param

    return {
        "cluster": Param(names[0], enum=names, title="Cluster",
                         description="The cluster whose backups and WAL archive are used"),
        "target_type": Param("latest", enum=list(TARGET_TYPES), values_display=TARGET_TYPES, title="Recover to"),
        "target_value": Param(
            None, type=["null", "string"], title="Target value",
            description_md=(
                "Empty for *latest*. A **time**: ISO 8601 with a time zone, e.g. `2026-11-21T10:15:00+01:00`; "
                "an **LSN**: `0/3000060`; a **transaction id**: `1234` (32-bit, or `EPOCH:XID`); a **restore "
                "point** name; a **backup** id such as `20261121T020000Z-F`. The target must lie inside the "
                "recoverable window: from the oldest backup's end to the last archived commit (see `pgincr info "
                "--cluster NAME` or the catalog view `recoverable_window`); a target outside it is refused "
                "before anything is touched, naming the window.")),
        "destination": Param(
            None, type=["null", "string"], title="Destination directory",
            description_md=("An absolute directory on the worker that runs the restore, new or empty, never "
                            "inside a data directory, e.g. `/srv/restore/main`. Not needed for a dry run.")),
        "action": Param("promote", enum=["promote", "pause", "shutdown"], title="At the target",
                        values_display={"promote": "Promote (open read-write)",
                                        "pause": "Pause (inspect, then promote or replay further)",
                                        "shutdown": "Shut down (left stopped at the target)"}),
        "dry_run": Param(True, type="boolean", title="Dry run",
                         description="Only show the backup chain, the WAL range and the window it would use"),
        "tablespaces": Param(
            None, type=["null", "string"], title="Tablespaces",
            description_md=("Only for a cluster with tablespaces: where each goes, `name=/dir` pairs separated by "
                            "commas (a tablespace's name or OID), e.g. `ts_data=/srv/restore/ts_data`; or `in place` "
                            "to restore them into their original directories (which must be empty). Left empty, a "
                            "backup with tablespaces is refused before anything is touched, listing them.")),
    }


def _restore_cfg(c: ClusterConfig) -> dict:
    return {**c.repo_kwargs(), "catalog_conn_id": c.catalog_conn_id,
            "catalog_schema": c.catalog_schema, "notifiers": c.notifiers, "copies": list(c.copies)}


def build_restore(clusters: list[ClusterConfig]):
    """The on-demand restore DAG: triggered from the UI with a params form."""
    from airflow.sdk import DAG

    from airflow_pg_incremental.callbacks import restore_failure
    from airflow_pg_incremental.operators.restore import PgRestoreOperator

    names = [c.name for c in clusters]
    with DAG(
        dag_id="pgincr_restore",
        description="On-demand restore of a cluster to a point in time (params form)",
        schedule=None,
        start_date=_start(clusters[0]),
        catchup=False,
        max_active_runs=1,
        tags=["pgincr", "restore"],
        default_args={"owner": clusters[0].owner, "retries": 0,
                      # a failed restore is alerted like any task: the chosen cluster's catalog and notifiers
                      "on_failure_callback": [restore_failure({c.name: _restore_cfg(c) for c in clusters})]},
        params=restore_form(names),
        doc_md="""Restore a cluster into a directory on the worker. Every value is validated, and the
backup, chain, WAL range and window are checked, before anything is touched. Start with a dry run:
it prints the chain and the WAL range. The restored copy is left stopped at the target with
archive_mode=off.""",
    ) as dag:
        from airflow.sdk import task

        @task.branch(task_id="route")
        def route(params=None) -> str:
            """The restore task of the chosen cluster: each runs on its cluster's restore queue and pool."""
            return f"restore_{params['cluster']}"

        chooser = route()
        for c in clusters:
            chooser >> PgRestoreOperator(
                task_id=f"restore_{c.name}", clusters={c.name: _restore_cfg(c)},
                cluster=c.name, target_type="{{ params.target_type }}",
                target_value="{{ params.target_value or '' }}", destination="{{ params.destination or '' }}",
                action="{{ params.action }}", dry_run="{{ params.dry_run }}",
                tablespaces="{{ params.tablespaces or '' }}", **_restore_routing(c))
    return dag


# What each task does, one line each: every DAG's doc lists its own tasks, in order, from this
# table and the task list that was built (so the doc cannot drift from what runs; a test checks)
TASK_DOCS = {
    "preflight": "server reachable with the connection's credentials, REPLICATION, wal_level, the binaries of its "
                 "major version, the repository writable (created first with `create_repository`), WAL archiving "
                 "in place (pull: the replication slot exists before the backup; push: archive_command pushes "
                 "here), leftovers of killed backups removed",
    "full_backup": "pg_basebackup streamed through zstd into the repository; backup.json written last",
    "synthetic_full": "full_mode synthetic: the incremental's chain combined on the worker (never on the database "
                      "server) into a synthetic full, checked by pg_verifybackup, stored, backup.json written last; "
                      "a server full instead when the chain cannot be combined (no full yet, PostgreSQL < 17, "
                      "summarize_wal off, a broken chain), the reason in the log and the XCom",
    "incremental_backup": "block-level incremental (PostgreSQL 17+) on the chain, or a full when an incremental is "
                          "not possible (the reason is in the log and the XCom); nothing on PostgreSQL 16 and older",
    "wal_switch": "pg_switch_wal(): closes the current WAL segment so it can be archived",
    "wal_capture": "pull mode: pg_receivewal stores every complete segment up to the switch, then the slot is "
                   "advanced; fails when the slot held more WAL than max_slot_retained_gb",
    "wal_archived": "waits (deferrable) until the segment is in the repository",
    "verify": "every object re-read against its checksums, pg_verifybackup on a staged copy, every WAL segment "
              "read; the result goes to the catalog; then the backups Asset event (which starts the restore test)",
    "wal_continuity": "no gap from the oldest backup on, every backup's WAL archived, history files present",
    "wal_fresh": "fails when the newest archived WAL is older than the RPO while the server wrote WAL past it",
    "backup_fresh": "fails when the newest backup is older than max_backup_age_hours (backups stopped or keep "
                    "failing); alerted as backup_stale",
    "restore_test": "restores to the end of the run's data interval on a scratch copy (own directory and port, "
                    "private socket, archive_mode=off, removed afterwards), runs the checks and amcheck, records "
                    "the RTO and the outcome in the catalog",
    "plan": "computes what the retention policy keeps and deletes and logs it; deletes nothing",
    "apply": "deletes what the plan says (backup.json first; safe to re-run after a crash)",
    "restore": "validates the form, plans the restore (backup, chain, WAL range, window), then restores unless it "
               "is a dry run",
    "route": "picks the restore task of the chosen cluster (each runs on its cluster's restore_queue / "
             "restore_pool: on the host meant for its restores)",
}


def _task_doc(task_id: str) -> str:
    if task_id in TASK_DOCS:
        return TASK_DOCS[task_id]
    if task_id.startswith("restore_"):
        return f"cluster `{task_id[len('restore_'):]}`: " + TASK_DOCS["restore"]
    return ""


def _ordered_task_ids(dag) -> list[str]:
    return [t.task_id for t in dag.topological_sort()]


def dag_doc(dag, intro: str, facts: list[str]) -> str:
    """The DAG's doc: its purpose, its tasks in the order they run (from the DAG itself), and the
    configuration it was built from."""
    tasks = "\n".join(f"{n}. `{tid}`: {_task_doc(tid)}" for n, tid in enumerate(_ordered_task_ids(dag), 1))
    return f"{intro.strip()}\n\n**Tasks**\n\n{tasks}\n\n**Configuration**\n\n" + "\n".join(f"- {f}" for f in facts
                                                                                  if f)


def cluster_facts(cl: ClusterConfig) -> list[str]:
    """What a DBA wants to know about a cluster's DAGs, from its configuration only (no I/O)."""
    r = cl.retention or {}
    kept = ", ".join(f"{k} {v}" for k, v in r.items() if v not in (None, [], "")) or "none configured (nothing is "        "ever deleted)"
    return [
        f"cluster `{cl.name}`, server connection `{cl.postgres_conn_id}`, repository `{cl.repository}`"
        + (f" (AWS connection `{cl.aws_conn_id}`)" if cl.aws_conn_id else ""),
        f"backups read from the standby `{cl.postgres_conn_id}`; its primary `{cl.primary_conn_id}` checkpoints "
        "first (the backup starts now) and switches and archives the WAL" if cl.primary_conn_id else None,
        f"WAL: {cl.wal_mode} mode" + (f" (replication slot `{cl.slot_name or 'pgincr_' + cl.name}`, at most "
                                      f"{cl.max_slot_retained_gb:g} GB held between captures)" if cl.wal_mode == "pull"
                                      else " (archive_command = walcmd push)") + f"; RPO {cl.rpo_minutes:g} min"
        + f"; newest backup at most {cl.max_backup_age_hours:g} h old",
        "schedules: " + ", ".join(f"{k} `{v}`" for k, v in sorted(cl.schedules.items())),
        f"incrementals: {cl.incremental_kind}, chains of at most {cl.max_chain_length}",
        "weekly full: full_mode `server` (pg_basebackup reads the whole cluster from the server)"
        if cl.full_mode == "server" else
        "weekly full: full_mode `synthetic` (incremental-forever: an incremental, combined on the worker into a "
        "synthetic full; a server full only when the chain cannot be combined, saying why)",
        f"retention: {kept}",
        f"catalog: connection `{cl.catalog_conn_id}`, schema `{cl.catalog_schema}`" if cl.catalog_conn_id else
        "catalog: none configured",
        f"restore: trigger `pgincr_restore` (a form: dry run first), or `pgincr restore --repo {cl.repository} "
        f"--cluster {cl.name} --target latest --target-dir DIR` on the host meant for it",
    ]


def build_dags(clusters: list[ClusterConfig]) -> dict[str, Any]:
    dags = {}
    for cl in clusters:
        built = [build_weekly_full(cl), build_daily_incremental(cl), build_hourly_wal(cl), *build_restore_tests(cl)]
        if cl.retention:
            built.append(build_retention(cl))
        if cl.copies:
            built.append(build_copy(cl))
        for dag in built:
            dag.doc_md = dag_doc(dag, dag.doc_md or "", cluster_facts(cl))
            dags[dag.dag_id] = dag
    if clusters:
        dag = build_restore(clusters)
        dag.doc_md = dag_doc(dag, dag.doc_md or "", [
            f"`{c.name}`: repository `{c.repository}`" + (f", queue `{c.restore_queue}`" if c.restore_queue else "")
            + (f", pool `{c.restore_pool}`" if c.restore_pool else "") for c in clusters])
        dags[dag.dag_id] = dag
    return dags


def dags_from_config_file(path: str | os.PathLike) -> dict[str, Any]:
    return build_dags(load_config(path))
