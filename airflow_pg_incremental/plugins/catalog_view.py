"""What the Backups view shows, read from a catalog: one query per kind of fact for all the clusters
that share the catalog (never one per cluster or per backup), in one read-only transaction.

No Airflow import here: the caller resolves the catalog connection and the clusters to show.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from airflow_pg_incremental.core.catalog import Catalog
from airflow_pg_incremental.core.lsn import parse_lsn
from airflow_pg_incremental.core.pgconn import ConnInfo, connect

#: the schema version that created every table and view read here (core/catalog.py MIGRATIONS)
NEEDED_VERSION = 4
STATEMENT_TIMEOUT_MS = 15000
MAX_RESTORE_TESTS = 200   # per cluster, inside the time range (the newest one is always read)
MAX_ALERTS = 5            # per cluster, inside the time range

QUERIES = {
    "backups": """
        SELECT cluster, backup_id, kind, parent_id, chain_root_id, status, start_lsn::text AS start_lsn,
               stop_lsn::text AS stop_lsn, timeline, started_at, finished_at, duration_s, raw_bytes, stored_bytes,
               error, dag_id, run_id, task_id
        FROM {s}.backups
        WHERE cluster = ANY(%(clusters)s) AND (status = 'complete' OR started_at >= %(since)s)
        ORDER BY cluster, started_at, backup_id""",
    # the newest verification of each backup still in the catalog
    "verifications": """
        SELECT DISTINCT ON (v.cluster, v.backup_id) v.cluster, v.backup_id, v.ok, v.started_at, v.duration_s,
               v.error, v.dag_id, v.run_id
        FROM {s}.verifications v JOIN {s}.backups b USING (cluster, backup_id)
        WHERE v.cluster = ANY(%(clusters)s)
        ORDER BY v.cluster, v.backup_id, v.started_at DESC, v.id DESC""",
    # the newest verification of each cluster (its backup may be gone since)
    "last_verification": """
        SELECT DISTINCT ON (cluster) cluster, backup_id, ok, started_at, duration_s, error, dag_id, run_id
        FROM {s}.verifications WHERE cluster = ANY(%(clusters)s)
        ORDER BY cluster, started_at DESC, id DESC""",
    "restore_tests": f"""
        SELECT cluster, id, ok, target_kind, target_value, backup_id, started_at, restore_seconds, reached_lsn,
               stopped_at, error, dag_id, run_id
        FROM (SELECT *, row_number() OVER (PARTITION BY cluster ORDER BY started_at DESC, id DESC) AS n
              FROM {{s}}.restore_tests WHERE cluster = ANY(%(clusters)s)) r
        WHERE n = 1 OR (started_at >= %(since)s AND n <= {MAX_RESTORE_TESTS})
        ORDER BY cluster, started_at""",
    "alerts": f"""
        SELECT cluster, kind, message, dag_id, task_id, run_id, created_at
        FROM (SELECT *, row_number() OVER (PARTITION BY cluster ORDER BY created_at DESC, id DESC) AS n
              FROM {{s}}.alerts WHERE cluster = ANY(%(clusters)s) AND created_at >= %(since)s) a
        WHERE n <= {MAX_ALERTS}
        ORDER BY cluster, created_at DESC""",
    "wal": """
        SELECT cluster, count(*) AS segments, max(archived_at) AS newest_archived_at,
               min(archived_at) AS oldest_archived_at, max(end_lsn)::text AS newest_end_lsn,
               coalesce(sum(stored_bytes), 0) AS stored_bytes,
               coalesce(sum(stored_bytes) FILTER (WHERE archived_at >= %(since)s), 0) AS stored_bytes_in_range
        FROM {s}.wal_segments WHERE cluster = ANY(%(clusters)s)
        GROUP BY cluster""",
    # missing WAL between two archived segments of a timeline, inside the time range
    "wal_gaps": """
        SELECT cluster, timeline, end_lsn::text AS from_lsn, next_start::text AS to_lsn, archived_at AS before_at,
               next_at AS after_at
        FROM (SELECT cluster, timeline, end_lsn, archived_at,
                     lead(start_lsn) OVER w AS next_start, lead(archived_at) OVER w AS next_at
              FROM {s}.wal_segments WHERE cluster = ANY(%(clusters)s) AND archived_at >= %(since)s
              WINDOW w AS (PARTITION BY cluster, timeline ORDER BY start_lsn)) s
        WHERE next_start IS NOT NULL AND next_start <> end_lsn
        ORDER BY cluster, timeline, end_lsn""",
    # WAL bytes stored per hour (at the hour's last archive), for the stored-bytes curve
    "wal_hourly": """
        SELECT cluster, max(archived_at) AS at, coalesce(sum(stored_bytes), 0) AS stored_bytes
        FROM {s}.wal_segments WHERE cluster = ANY(%(clusters)s) AND archived_at >= %(since)s
        GROUP BY cluster, date_trunc('hour', archived_at) ORDER BY cluster, at""",
    "window": """
        SELECT cluster, oldest_backup, window_start_lsn::text AS window_start_lsn, window_start_time,
               newest_timeline, newest_segment, window_end_lsn::text AS window_end_lsn, newest_archived_at, gaps,
               wal_age
        FROM {s}.recoverable_window WHERE cluster = ANY(%(clusters)s)""",
    "metrics": """
        SELECT * FROM {s}.cluster_metrics WHERE cluster = ANY(%(clusters)s)""",
}


@dataclass
class ClusterFacts:
    """Everything the view shows of one cluster."""

    name: str
    backups: list[dict] = field(default_factory=list)
    verifications: dict[str, dict] = field(default_factory=dict)  # backup_id -> newest verification
    last_verification: dict | None = None
    restore_tests: list[dict] = field(default_factory=list)
    alerts: list[dict] = field(default_factory=list)
    wal: dict | None = None
    wal_gaps: list[dict] = field(default_factory=list)
    wal_hourly: list[dict] = field(default_factory=list)
    window: dict | None = None
    metrics: dict | None = None
    restore_points: list[dict] = field(default_factory=list)
    restore_points_error: str | None = None

    @property
    def last_restore_test(self) -> dict | None:
        return max(self.restore_tests, key=lambda r: (r["started_at"], r["id"]), default=None)


@dataclass
class CatalogRead:
    """The result of reading one catalog: facts per cluster, or why there are none."""

    clusters: dict[str, ClusterFacts]
    error: str | None = None
    queries: int = 0
    now: dt.datetime | None = None


def read_catalog(conn: ConnInfo, schema: str, clusters: list[str], *, since: dt.datetime) -> CatalogRead:
    """The facts of `clusters` from the catalog at `conn`/`schema`, backups still listed whatever
    their age, the rest from `since` on. Never writes (no migration either: a catalog that no
    backup task has created yet is reported as such)."""
    Catalog(conn, schema)  # validates the schema name before it is put into SQL
    out = CatalogRead({name: ClusterFacts(name) for name in clusters})
    try:
        with connect(conn, autocommit=False) as c:
            c.execute("SET TRANSACTION READ ONLY")
            c.execute(f"SET LOCAL statement_timeout = {STATEMENT_TIMEOUT_MS}")
            out.now = c.execute("SELECT now()").fetchone()[0]
            out.error = _schema_problem(c, schema)
            if out.error is None and clusters:
                for kind, sql in QUERIES.items():
                    rows = _rows(c, sql.format(s=schema), {"clusters": clusters, "since": since})
                    out.queries += 1
                    _distribute(out.clusters, kind, rows)
            c.rollback()
    except Exception as e:  # shown in the view: the message of a connection error names the fix
        out.error = conn.redact(f"{type(e).__name__}: {e}")
    return out


def _schema_problem(c, schema: str) -> str | None:
    if c.execute("SELECT to_regclass(%s)", (f"{schema}.schema_migrations",)).fetchone()[0] is None:
        return (f"the catalog schema {schema!r} does not exist yet: no backup task has recorded anything in it "
                "(it is created by the first backup, verification or WAL capture that uses this catalog)")
    version = c.execute(f"SELECT max(version) FROM {schema}.schema_migrations").fetchone()[0] or 0
    if version < NEEDED_VERSION:
        return (f"the catalog schema {schema!r} is at version {version}, this view needs {NEEDED_VERSION}: "
                "run any backup task of this version once (it migrates the catalog)")
    return None


def _rows(c, sql: str, params: dict) -> list[dict]:
    from psycopg.rows import dict_row

    with c.cursor(row_factory=dict_row) as cur:
        cur.execute(sql, params)
        return cur.fetchall()


def _distribute(facts: dict[str, ClusterFacts], kind: str, rows: list[dict]) -> None:
    for r in rows:
        f = facts.get(r["cluster"])
        if f is None:
            continue
        if kind == "verifications":
            f.verifications[r["backup_id"]] = r
        elif kind in ("last_verification", "wal", "window", "metrics"):
            setattr(f, kind, r)
        else:
            getattr(f, kind).append(r)


# ------------------------------------------------------------------------------------------
# derived facts


def lsn(text: str | None) -> int | None:
    try:
        return parse_lsn(text) if text else None
    except ValueError:
        return None


def recoverable_ranges(f: ClusterFacts, now: dt.datetime) -> list[tuple[dt.datetime, dt.datetime]]:
    """The times a point-in-time restore can reach, as merged (start, end) ranges: from the end of
    each complete backup whose own WAL is archived, up to the first WAL gap after its start or the
    newest archived WAL. (The catalog's recoverable_window view gives the range from the oldest
    backup; a gap splits it, and a later backup starts a new range.)"""
    newest = f.wal or {}
    newest_end = lsn(newest.get("newest_end_lsn"))
    newest_at = newest.get("newest_archived_at")
    if newest_end is None or newest_at is None:
        return []
    ranges = []
    for b in f.backups:
        start, stop = lsn(b["start_lsn"]), lsn(b["stop_lsn"])
        if b["status"] != "complete" or start is None or stop is None or b["finished_at"] is None:
            continue
        gap = next((g for g in f.wal_gaps if g["timeline"] == b["timeline"] and lsn(g["to_lsn"]) > start), None)
        if gap is not None:
            if lsn(gap["from_lsn"]) < stop:
                continue  # the backup's own WAL is incomplete: not restorable
            end = gap["before_at"]
        elif newest_end >= stop:
            end = newest_at
        else:
            continue  # its WAL is not archived (yet)
        if end >= b["finished_at"]:
            ranges.append((b["finished_at"], min(end, now)))
    return _merge(ranges)


def _merge(ranges: list[tuple]) -> list[tuple]:
    out: list[list] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def stored_bytes_series(f: ClusterFacts, start: dt.datetime) -> list[tuple[dt.datetime, int]]:
    """Bytes the repository holds for the cluster (complete backups + archived WAL still in the
    catalog), cumulated by the time they were written: (time, bytes) steps from `start` on (what
    was written before is the first step's level)."""
    wal = f.wal or {}
    # WAL archived before the catalog read's time range is known as a sum only
    before = int(wal.get("stored_bytes") or 0) - int(wal.get("stored_bytes_in_range") or 0)
    events = [(b["finished_at"], int(b["stored_bytes"] or 0)) for b in f.backups
              if b["status"] == "complete" and b["finished_at"] is not None]
    events += [(h["at"], int(h["stored_bytes"])) for h in f.wal_hourly]
    before += sum(n for t, n in events if t < start)
    total, out = before, []
    for t, n in sorted((e for e in events if e[0] >= start), key=lambda e: e[0]):
        total += n
        out.append((t, total))
    return [(start, before), *out] if before or out else []
