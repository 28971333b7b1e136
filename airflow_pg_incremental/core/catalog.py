"""The catalog: an index of the repository in PostgreSQL tables (schema `pgincr` by default).

It is only an index: `rebuild_from_repository` recreates every row from the repository alone.
Migrations are versioned and applied on first use under an advisory lock, so concurrent tasks
can open the catalog safely. No credential is ever stored.
"""

from __future__ import annotations

import json
import logging
import re

from .errors import BackupNotFound, ConfigError
from .metadata import (
    INPROGRESS_NAME,
    backup_prefix,
    list_backups,
    list_clusters,
    load_backup,
)
from .pgconn import ConnInfo, connect
from .repository import Repository

log = logging.getLogger(__name__)

MIGRATIONS: list[str] = [
    # 1: backups
    """
    CREATE TABLE {s}.backups (
        cluster            text NOT NULL,
        backup_id          text NOT NULL,
        kind               text NOT NULL CHECK (kind IN ('full', 'incremental', 'differential')),
        parent_id          text,
        chain_root_id      text,
        status             text NOT NULL CHECK (status IN ('running', 'complete', 'failed')),
        repository         text,
        start_lsn          pg_lsn,
        stop_lsn           pg_lsn,
        timeline           integer,
        system_identifier  numeric(20,0),
        pg_version_num     integer,
        started_at         timestamptz,
        finished_at        timestamptz,
        duration_s         double precision,
        raw_bytes          bigint,
        stored_bytes       bigint,
        error              text,
        dag_id             text,
        run_id             text,
        task_id            text,
        meta               jsonb NOT NULL DEFAULT '{{}}',
        recorded_at        timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (cluster, backup_id),
        CHECK ((kind = 'full') = (parent_id IS NULL))
    );
    CREATE INDEX ON {s}.backups (cluster, status, stop_lsn);
    """,
    # 2: archived WAL (an index of the repository's wal/ prefix)
    """
    CREATE TABLE {s}.wal_segments (
        cluster       text NOT NULL,
        timeline      integer NOT NULL,
        segment       text NOT NULL,
        start_lsn     pg_lsn NOT NULL,
        end_lsn       pg_lsn NOT NULL,
        raw_bytes     bigint,
        stored_bytes  bigint,
        raw_sha256    text,
        method        text,
        archived_at   timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (cluster, segment)
    );
    CREATE INDEX ON {s}.wal_segments (cluster, timeline, start_lsn);
    """,
    # 3: the recoverable window as a query
    """
    CREATE VIEW {s}.recoverable_window AS
    WITH seg AS (
        SELECT cluster, timeline, segment, start_lsn, end_lsn, archived_at,
               lead(start_lsn) OVER (PARTITION BY cluster, timeline ORDER BY start_lsn) AS next_start
        FROM {s}.wal_segments),
    oldest AS (
        SELECT DISTINCT ON (cluster) cluster, backup_id, start_lsn, stop_lsn, finished_at, timeline
        FROM {s}.backups WHERE status = 'complete' ORDER BY cluster, finished_at),
    newest AS (
        SELECT DISTINCT ON (cluster) cluster, timeline, segment, end_lsn, archived_at
        FROM seg ORDER BY cluster, timeline DESC, start_lsn DESC),
    gaps AS (
        SELECT s.cluster, count(*) AS gaps, min(s.end_lsn) AS first_gap_at
        FROM seg s JOIN oldest o USING (cluster)
        WHERE s.next_start IS NOT NULL AND s.next_start <> s.end_lsn AND s.end_lsn > o.start_lsn
        GROUP BY s.cluster)
    SELECT o.cluster, o.backup_id AS oldest_backup, o.stop_lsn AS window_start_lsn,
           o.finished_at AS window_start_time, n.timeline AS newest_timeline, n.segment AS newest_segment,
           CASE WHEN g.gaps IS NULL THEN n.end_lsn ELSE g.first_gap_at END AS window_end_lsn,
           n.archived_at AS newest_archived_at, coalesce(g.gaps, 0) AS gaps,
           now() - n.archived_at AS wal_age
    FROM oldest o LEFT JOIN newest n USING (cluster) LEFT JOIN gaps g USING (cluster);
    """,
    # 4: evidence: verifications, restore tests, alerts; metrics view
    """
    CREATE TABLE {s}.verifications (
        id           bigserial PRIMARY KEY,
        cluster      text NOT NULL,
        backup_id    text NOT NULL,
        ok           boolean NOT NULL,
        started_at   timestamptz NOT NULL DEFAULT now(),
        duration_s   double precision,
        checks       jsonb NOT NULL DEFAULT '[]',
        error        text,
        dag_id       text,
        run_id       text
    );
    CREATE INDEX ON {s}.verifications (cluster, backup_id, started_at DESC);
    CREATE TABLE {s}.restore_tests (
        id               bigserial PRIMARY KEY,
        cluster          text NOT NULL,
        ok               boolean NOT NULL,
        target_kind      text,
        target_value     text,
        backup_id        text,
        chain            jsonb,
        started_at       timestamptz NOT NULL DEFAULT now(),
        restore_seconds  double precision,
        reached_lsn      text,
        stopped_at       text,
        checks           jsonb NOT NULL DEFAULT '[]',
        error            text,
        dag_id           text,
        run_id           text
    );
    CREATE INDEX ON {s}.restore_tests (cluster, started_at DESC);
    CREATE TABLE {s}.alerts (
        id          bigserial PRIMARY KEY,
        cluster     text,
        dag_id      text,
        task_id     text,
        run_id      text,
        kind        text NOT NULL,
        message     text,
        created_at  timestamptz NOT NULL DEFAULT now()
    );
    CREATE VIEW {s}.cluster_metrics AS
    SELECT c.cluster,
           (SELECT max(finished_at) FROM {s}.backups b WHERE b.cluster = c.cluster AND status = 'complete'
                                                      AND kind = 'full') AS last_full_at,
           (SELECT max(finished_at) FROM {s}.backups b WHERE b.cluster = c.cluster AND status = 'complete')
               AS last_backup_at,
           now() - (SELECT max(finished_at) FROM {s}.backups b WHERE b.cluster = c.cluster AND status = 'complete')
               AS backup_age,
           (SELECT sum(stored_bytes) FROM {s}.backups b WHERE b.cluster = c.cluster AND status = 'complete')
               AS stored_bytes,
           (SELECT max(archived_at) FROM {s}.wal_segments w WHERE w.cluster = c.cluster) AS last_wal_at,
           now() - (SELECT max(archived_at) FROM {s}.wal_segments w WHERE w.cluster = c.cluster) AS wal_age,
           (SELECT max(started_at) FROM {s}.verifications v WHERE v.cluster = c.cluster AND ok) AS last_verified_at,
           (SELECT count(*) FROM {s}.verifications v WHERE v.cluster = c.cluster AND NOT ok) AS failed_verifications,
           (SELECT started_at FROM {s}.restore_tests r WHERE r.cluster = c.cluster ORDER BY started_at DESC LIMIT 1)
               AS last_restore_test_at,
           (SELECT ok FROM {s}.restore_tests r WHERE r.cluster = c.cluster ORDER BY started_at DESC LIMIT 1)
               AS last_restore_test_ok,
           (SELECT restore_seconds FROM {s}.restore_tests r WHERE r.cluster = c.cluster AND ok
             ORDER BY started_at DESC LIMIT 1) AS last_rto_seconds
    FROM (SELECT DISTINCT cluster FROM {s}.backups) c;
    """,
    # 5: the restore tests' RTO split: seconds per step (plan, extract, combine, verify, sync, replay)
    """
    ALTER TABLE {s}.restore_tests ADD COLUMN timings jsonb;
    COMMENT ON COLUMN {s}.restore_tests.timings IS
        'seconds per step of the restore (plan, extract, combine, verify, sync, replay); sum <= restore_seconds';
    """,
    # 6: on-demand restores (the pgincr_restore DAG): who restored what, where, and how it went
    """
    CREATE TABLE {s}.restores (
        id               bigserial PRIMARY KEY,
        cluster          text NOT NULL,
        ok               boolean NOT NULL,
        dry_run          boolean NOT NULL DEFAULT false,
        target_kind      text,
        target_value     text,
        backup_id        text,
        chain            jsonb,
        destination      text,
        started_at       timestamptz NOT NULL DEFAULT now(),
        restore_seconds  double precision,
        timings          jsonb,
        reached_lsn      text,
        stopped_at       text,
        error            text,
        dag_id           text,
        run_id           text
    );
    CREATE INDEX ON {s}.restores (cluster, started_at DESC);
    """,
    # 7: synthetic fulls (core.synthetic): a fourth kind, without a parent, standing for a backup
    """
    DO $$
    DECLARE c record;
    BEGIN
        FOR c IN SELECT conname FROM pg_constraint
                 WHERE conrelid = '{s}.backups'::regclass AND contype = 'c'
                   AND pg_get_constraintdef(oid) LIKE '%kind%'
        LOOP
            EXECUTE format('ALTER TABLE {s}.backups DROP CONSTRAINT %I', c.conname);
        END LOOP;
    END $$;
    ALTER TABLE {s}.backups
        ADD CONSTRAINT backups_kind_check CHECK (kind IN ('full', 'incremental', 'differential', 'synthetic')),
        ADD CONSTRAINT backups_parent_check CHECK ((kind IN ('full', 'synthetic')) = (parent_id IS NULL)),
        ADD COLUMN stands_for text;
    COMMENT ON COLUMN {s}.backups.stands_for IS
        'a synthetic full: the backup whose point it holds (built from its chain on a worker)';
    """,
]

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class Catalog:
    def __init__(self, conn: ConnInfo, schema: str = "pgincr"):
        if not _SCHEMA_RE.match(schema):
            raise ConfigError(f"invalid catalog schema name {schema!r}")
        self.conn = conn
        self.schema = schema
        self._migrated = False

    def _connect(self):
        c = connect(self.conn, autocommit=False)
        if not self._migrated:
            self._migrate(c)
            self._migrated = True
        return c

    def _migrate(self, c) -> None:
        s = self.schema
        with c.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"pgincr-migrate-{s}",))
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {s}")
            cur.execute(f"CREATE TABLE IF NOT EXISTS {s}.schema_migrations (version integer PRIMARY KEY, "
                        "applied_at timestamptz NOT NULL DEFAULT now())")
            cur.execute(f"SELECT coalesce(max(version), 0) FROM {s}.schema_migrations")
            current = cur.fetchone()[0]
            for version, sql in enumerate(MIGRATIONS, start=1):
                if version <= current:
                    continue
                log.info("catalog: applying migration %d in schema %s", version, s)
                cur.execute(sql.format(s=s))
                cur.execute(f"INSERT INTO {s}.schema_migrations (version) VALUES (%s)", (version,))
        c.commit()

    def schema_version(self) -> int:
        with self._connect() as c, c.cursor() as cur:
            cur.execute(f"SELECT max(version) FROM {self.schema}.schema_migrations")
            return cur.fetchone()[0]

    def record_backup(self, meta: dict) -> None:
        """Insert or update the row of one backup from its metadata."""
        af = meta.get("airflow") or {}
        row = {
            "cluster": meta["cluster"], "backup_id": meta["backup_id"], "kind": meta["kind"],
            "parent_id": meta.get("parent_id"), "chain_root_id": meta.get("chain_root_id"),
            "status": meta["status"], "repository": meta.get("repository"), "start_lsn": meta.get("start_lsn"),
            "stop_lsn": meta.get("stop_lsn"), "timeline": meta.get("timeline"),
            "system_identifier": meta.get("system_identifier"), "pg_version_num": meta.get("pg_version_num"),
            "started_at": meta.get("started_at"), "finished_at": meta.get("finished_at"),
            "duration_s": meta.get("duration_s"), "raw_bytes": meta.get("raw_bytes"),
            "stored_bytes": meta.get("stored_bytes"), "error": meta.get("error"), "dag_id": af.get("dag_id"),
            "run_id": af.get("run_id"), "task_id": af.get("task_id"),
            "meta": json.dumps({k: v for k, v in meta.items() if k not in ("objects",)}),
            "stands_for": meta.get("stands_for"),
        }
        cols = list(row)
        updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols if c not in ("cluster", "backup_id"))
        sql = (f"INSERT INTO {self.schema}.backups ({', '.join(cols)}) VALUES ({', '.join('%(' + c + ')s' for c in cols)}) "
               f"ON CONFLICT (cluster, backup_id) DO UPDATE SET {updates}, recorded_at = now()")
        with self._connect() as c, c.cursor() as cur:
            cur.execute(sql, row)
            c.commit()

    def record_wal(self, cluster: str, segments: list[dict], method: str = "pull",
                   segment_size: int = 16 * 1024 * 1024) -> int:
        """Upsert archived segments ({name, raw_size, stored_size, raw_sha256})."""
        from .lsn import format_lsn, segno_of, timeline_of

        rows = []
        for s in segments:
            n = s["name"]
            if len(n) != 24:
                continue
            start = segno_of(n, segment_size) * segment_size
            rows.append((cluster, timeline_of(n), n, format_lsn(start), format_lsn(start + segment_size),
                         s.get("raw_size"), s.get("stored_size"), s.get("raw_sha256"), method))
        if not rows:
            return 0
        with self._connect() as c, c.cursor() as cur:
            cur.executemany(f"INSERT INTO {self.schema}.wal_segments (cluster, timeline, segment, start_lsn, end_lsn, "
                            "raw_bytes, stored_bytes, raw_sha256, method) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                            "ON CONFLICT (cluster, segment) DO NOTHING", rows)
            c.commit()
        return len(rows)

    def wal_checksums(self, cluster: str) -> dict[str, str]:
        """{segment: raw SHA-256} of the segments whose content checksum was recorded (pull capture)."""
        rows = self._select(f"SELECT segment, raw_sha256 FROM {self.schema}.wal_segments WHERE cluster = %s AND "
                            "raw_sha256 IS NOT NULL", (cluster,))
        return {r["segment"]: r["raw_sha256"] for r in rows}

    def wal_segments(self, cluster: str) -> list[dict]:
        with self._connect() as c, c.cursor() as cur:
            cur.execute(f"SELECT timeline, segment, start_lsn::text, end_lsn::text, raw_bytes, stored_bytes, method, "
                        f"archived_at FROM {self.schema}.wal_segments WHERE cluster = %s ORDER BY timeline, segment",
                        (cluster,))
            names = [d.name for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def recoverable_window(self, cluster: str) -> dict | None:
        """Oldest backup's end .. end of continuous archived WAL (first gap), per the catalog."""
        with self._connect() as c, c.cursor() as cur:
            cur.execute(f"SELECT cluster, oldest_backup, window_start_lsn::text, window_start_time, newest_timeline, "
                        f"newest_segment, window_end_lsn::text, newest_archived_at, gaps, wal_age "
                        f"FROM {self.schema}.recoverable_window WHERE cluster = %s", (cluster,))
            row = cur.fetchone()
            return dict(zip([d.name for d in cur.description], row)) if row else None

    def _insert(self, table: str, row: dict) -> int:
        row = {k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in row.items()}
        cols = list(row)
        with self._connect() as c, c.cursor() as cur:
            cur.execute(f"INSERT INTO {self.schema}.{table} ({', '.join(cols)}) VALUES "
                        f"({', '.join('%(' + k + ')s' for k in cols)}) RETURNING id", row)
            rid = cur.fetchone()[0]
            c.commit()
            return rid

    def _select(self, sql: str, params=()) -> list[dict]:
        with self._connect() as c, c.cursor() as cur:
            cur.execute(sql.format(s=self.schema), params)
            names = [d.name for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def record_verification(self, *, cluster: str, backup_id: str, ok: bool, duration_s: float | None = None,
                            checks: list | None = None, error: str | None = None, dag_id: str | None = None,
                            run_id: str | None = None) -> int:
        return self._insert("verifications", {"cluster": cluster, "backup_id": backup_id, "ok": ok,
                                              "duration_s": duration_s, "checks": checks or [], "error": error,
                                              "dag_id": dag_id, "run_id": run_id})

    def last_verification(self, cluster: str, backup_id: str) -> dict | None:
        rows = self._select("SELECT * FROM {s}.verifications WHERE cluster = %s AND backup_id = %s "
                            "ORDER BY started_at DESC, id DESC LIMIT 1", (cluster, backup_id))
        return rows[0] if rows else None

    def record_restore_test(self, **row) -> int:
        allowed = {"cluster", "ok", "target_kind", "target_value", "backup_id", "chain", "restore_seconds",
                   "timings", "reached_lsn", "stopped_at", "checks", "error", "dag_id", "run_id"}
        return self._insert("restore_tests", {k: v for k, v in row.items() if k in allowed})

    def record_restore(self, **row) -> int:
        """An on-demand restore (or its refusal or dry run)."""
        allowed = {"cluster", "ok", "dry_run", "target_kind", "target_value", "backup_id", "chain", "destination",
                   "restore_seconds", "timings", "reached_lsn", "stopped_at", "error", "dag_id", "run_id"}
        return self._insert("restores", {k: v for k, v in row.items() if k in allowed})

    def restores(self, cluster: str, limit: int = 20) -> list[dict]:
        return self._select("SELECT * FROM {s}.restores WHERE cluster = %s ORDER BY started_at DESC, id DESC LIMIT %s",
                            (cluster, limit))

    def restore_tests(self, cluster: str, limit: int = 20) -> list[dict]:
        return self._select("SELECT * FROM {s}.restore_tests WHERE cluster = %s ORDER BY started_at DESC, id DESC "
                            "LIMIT %s", (cluster, limit))

    def record_alert(self, *, kind: str, message: str, cluster: str | None = None, dag_id: str | None = None,
                     task_id: str | None = None, run_id: str | None = None) -> int:
        return self._insert("alerts", {"cluster": cluster, "dag_id": dag_id, "task_id": task_id, "run_id": run_id,
                                       "kind": kind, "message": message[:4000]})

    def alerts(self, cluster: str | None = None, limit: int = 50) -> list[dict]:
        if cluster:
            return self._select("SELECT * FROM {s}.alerts WHERE cluster = %s ORDER BY id DESC LIMIT %s",
                                (cluster, limit))
        return self._select("SELECT * FROM {s}.alerts ORDER BY id DESC LIMIT %s", (limit,))

    def metrics(self, cluster: str) -> dict | None:
        rows = self._select("SELECT * FROM {s}.cluster_metrics WHERE cluster = %s", (cluster,))
        return rows[0] if rows else None

    def delete_backup_row(self, cluster: str, backup_id: str) -> None:
        with self._connect() as c, c.cursor() as cur:
            cur.execute(f"DELETE FROM {self.schema}.backups WHERE cluster = %s AND backup_id = %s", (cluster, backup_id))
            c.commit()

    def delete_wal_rows(self, cluster: str, segments: list[str]) -> None:
        with self._connect() as c, c.cursor() as cur:
            cur.execute(f"DELETE FROM {self.schema}.wal_segments WHERE cluster = %s AND segment = ANY(%s)",
                        (cluster, segments))
            c.commit()

    def settle_running(self, repo: Repository, cluster: str, *, older_than_s: float = 6 * 3600) -> list[dict]:
        """Rows left 'running' by a backup that was killed (worker lost, OOM, SIGKILL: no code ran to
        record the failure), started more than `older_than_s` ago: 'complete' when the repository
        holds its sealed backup.json, 'failed' when neither backup.json nor its in-progress marker
        is left (cleanup removed the leftovers). A row whose marker is still there is left alone:
        the backup may still be running. Returns what changed."""
        rows = self._select("SELECT backup_id, started_at FROM {s}.backups WHERE cluster = %s AND status = 'running' "
                            "AND started_at < now() - make_interval(secs => %s) ORDER BY backup_id",
                            (cluster, float(older_than_s)))
        changed = []
        for r in rows:
            bid = r["backup_id"]
            try:
                meta = load_backup(repo, cluster, bid)
            except BackupNotFound:
                meta = None
            if meta is not None and meta.get("status") == "complete":
                self.record_backup(meta)
                changed.append({"backup_id": bid, "status": "complete"})
                continue
            if repo.exists(f"{backup_prefix(cluster, bid)}/{INPROGRESS_NAME}"):
                continue
            error = (f"interrupted: started {r['started_at']:%Y-%m-%d %H:%M:%S%z} and never finished (the task was "
                     "killed, no failure could be recorded); no trace is left in the repository")
            with self._connect() as c, c.cursor() as cur:
                cur.execute(f"UPDATE {self.schema}.backups SET status = 'failed', error = %s, recorded_at = now() "
                            "WHERE cluster = %s AND backup_id = %s AND status = 'running'", (error, cluster, bid))
                c.commit()
            changed.append({"backup_id": bid, "status": "failed"})
        if changed:
            log.warning("catalog: settled backup rows left 'running' by killed backups: %s",
                        ", ".join(f"{c['backup_id']} -> {c['status']}" for c in changed))
        return changed

    def backups(self, cluster: str | None = None, status: str | None = None) -> list[dict]:
        where, params = [], []
        if cluster:
            where.append("cluster = %s")
            params.append(cluster)
        if status:
            where.append("status = %s")
            params.append(status)
        sql = (f"SELECT cluster, backup_id, kind, parent_id, chain_root_id, status, start_lsn::text, stop_lsn::text, "
               f"timeline, system_identifier::text, pg_version_num, started_at, finished_at, duration_s, raw_bytes, "
               f"stored_bytes, error, dag_id, run_id, task_id FROM {self.schema}.backups "
               f"{'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY cluster, started_at, backup_id")
        with self._connect() as c, c.cursor() as cur:
            cur.execute(sql, params)
            names = [d.name for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def rebuild_from_repository(self, repo: Repository, clusters: list[str] | None = None) -> dict:
        """Recreate the rows of every complete backup found in the repository. Rows of backups that
        are no longer in the repository (for the clusters scanned) are removed."""
        from .metadata import require_cluster

        repo.identity()  # a missing repository must not read as one without backups (rows would go)
        for cl in clusters or []:
            require_cluster(repo, cl)
        clusters = clusters or list_clusters(repo)
        counts = {}
        with self._connect() as c, c.cursor() as cur:
            for cl in clusters:
                metas = list_backups(repo, cl)
                cur.execute(f"DELETE FROM {self.schema}.backups WHERE cluster = %s", (cl,))
                c.commit()
                for m in metas:
                    self.record_backup(m)
                counts[cl] = len(metas)
        log.info("catalog rebuilt from %s: %s", repo.url, counts)
        return counts
