"""The catalog: versioned migrations applied once, and rebuildable from the repository alone."""

from __future__ import annotations

import pytest

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.catalog import MIGRATIONS, Catalog
from airflow_pg_incremental.core.pgconn import query

pytestmark = pytest.mark.integration

_COMPARE = ("cluster", "backup_id", "kind", "parent_id", "chain_root_id", "status", "start_lsn", "stop_lsn", "timeline",
            "system_identifier", "pg_version_num", "raw_bytes", "stored_bytes", "dag_id", "run_id")


def test_migrations_apply_once(pg, catalog):
    assert catalog.schema_version() == len(MIGRATIONS)
    again = Catalog(pg.conninfo("pgincr_catalog"), schema=catalog.schema)
    assert again.schema_version() == len(MIGRATIONS)
    rows = query(pg.conninfo("pgincr_catalog"), f"SELECT count(*) FROM {catalog.schema}.schema_migrations")
    assert rows[0][0] == len(MIGRATIONS)


def test_rebuild_from_repository_alone(pg, repo, catalog):
    b1 = take_full_backup(pg.conninfo(), repo, "cat", catalog=catalog,
                          airflow={"dag_id": "d", "run_id": "r1", "task_id": "t"})
    b2 = take_full_backup(pg.conninfo(), repo, "cat", catalog=catalog,
                          airflow={"dag_id": "d", "run_id": "r2", "task_id": "t"})
    original = [{k: r[k] for k in _COMPARE} for r in catalog.backups("cat")]
    assert [r["backup_id"] for r in original] == [b1["backup_id"], b2["backup_id"]]

    # lose the catalog entirely, then rebuild it from the repository
    query(pg.conninfo("pgincr_catalog"), f"DROP SCHEMA {catalog.schema} CASCADE")
    fresh = Catalog(pg.conninfo("pgincr_catalog"), schema=catalog.schema)
    assert fresh.backups("cat") == []
    assert fresh.rebuild_from_repository(repo) == {"cat": 2}
    rebuilt = [{k: r[k] for k in _COMPARE} for r in fresh.backups("cat")]
    assert rebuilt == original


def test_rebuild_drops_rows_of_backups_gone_from_repository(pg, repo, catalog):
    b = take_full_backup(pg.conninfo(), repo, "gone", catalog=catalog)
    catalog.record_backup({**b, "backup_id": "20000101T000000Z-F", "chain_root_id": "20000101T000000Z-F"})
    assert len(catalog.backups("gone")) == 2
    catalog.rebuild_from_repository(repo, ["gone"])
    assert [r["backup_id"] for r in catalog.backups("gone")] == [b["backup_id"]]


def test_recoverable_window_is_a_query(pg, repo, catalog):
    from airflow_pg_incremental.core.capture import capture_wal_pull, check_continuity, switch_wal
    from airflow_pg_incremental.core.wal import list_segments, wal_key
    import uuid

    cluster = "win" + uuid.uuid4().hex[:6]
    try:
        capture_wal_pull(pg.conninfo(), repo, cluster, catalog=catalog)
        b = take_full_backup(pg.conninfo(), repo, cluster, catalog=catalog)
        for _ in range(3):
            pg.pgbench_run(100)
            capture_wal_pull(pg.conninfo(), repo, cluster, upto_lsn=switch_wal(pg.conninfo())["lsn"], catalog=catalog)
        w = catalog.recoverable_window(cluster)
        segs = list_segments(repo, cluster)[1]
        assert w["oldest_backup"] == b["backup_id"] and w["window_start_lsn"] == b["stop_lsn"]
        assert w["newest_segment"] == segs[-1] and w["gaps"] == 0
        # a segment lost from the archive: the window ends at the gap once the catalog learns it
        repo.delete(wal_key(cluster, segs[-2]))
        query(pg.conninfo("pgincr_catalog"), f"DELETE FROM {catalog.schema}.wal_segments WHERE segment = %s",
              (segs[-2],))
        w2 = catalog.recoverable_window(cluster)
        assert w2["gaps"] == 1 and w2["window_end_lsn"] != w["window_end_lsn"]
        assert not check_continuity(repo, cluster, fail_on_gap=False)["ok"]
    finally:
        pg.psql(f"SELECT pg_drop_replication_slot('pgincr_{cluster}')")


def test_rows_of_killed_backups_are_settled_by_preflight(pg, repo, catalog):
    """A backup killed with SIGKILL leaves its catalog row 'running' (no code ran to record the
    failure). The next preflight settles rows older than the cleanup age: 'complete' if the
    repository holds the sealed backup, 'failed' once no trace is left; a row whose in-progress
    marker is still there, or a recent one, stays 'running'."""
    import datetime as dt
    import uuid

    from airflow_pg_incremental.core import metadata as md
    from airflow_pg_incremental.core.preflight import preflight_full

    cluster = "kill" + uuid.uuid4().hex[:6]
    done = take_full_backup(pg.conninfo(), repo, cluster, catalog=catalog)
    old = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=7)).isoformat()
    recent = dt.datetime.now(dt.timezone.utc).isoformat()

    def running(bid, started):
        catalog.record_backup({"cluster": cluster, "backup_id": bid, "kind": "full", "status": "running",
                               "started_at": started, "chain_root_id": bid})

    running(done["backup_id"], old)  # finished, but its row was never updated (killed after sealing)
    running("20261101T000000Z-F", old)  # killed long ago; cleanup removed its leftovers
    running("20261101T010000Z-F", old)  # its in-progress marker is still there (cleanup age not reached)
    repo.put_bytes(f"{md.backup_prefix(cluster, '20261101T010000Z-F')}/{md.INPROGRESS_NAME}",
                   b'{"started_at": "%s"}' % recent.encode())
    running("20261121T000000Z-F", recent)  # maybe still running
    res = preflight_full(pg.conninfo(), repo, cluster, catalog=catalog)
    assert sorted((c["backup_id"], c["status"]) for c in res["settled_catalog_rows"]) == [
        ("20261101T000000Z-F", "failed"), (done["backup_id"], "complete")]
    status = {r["backup_id"]: (r["status"], r["error"]) for r in catalog.backups(cluster)}
    assert status[done["backup_id"]] == ("complete", None)
    assert status["20261101T000000Z-F"][0] == "failed" and "interrupted" in status["20261101T000000Z-F"][1]
    assert status["20261101T010000Z-F"] == ("running", None)
    assert status["20261121T000000Z-F"] == ("running", None)
    # idempotent
    assert preflight_full(pg.conninfo(), repo, cluster, catalog=catalog)["settled_catalog_rows"] == []
