"""The older-server path, for real on PostgreSQL 15 from Debian: no block-level incrementals, the
WAL archive is the incremental; pull capture with pg_receivewal 15; PITR with PostgreSQL 15
binaries; the daily DAG says so and succeeds."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.capture import capture_wal_pull, switch_wal
from airflow_pg_incremental.core.errors import ConfigError
from airflow_pg_incremental.core.incremental import take_planned_backup
from airflow_pg_incremental.core.pgconn import query
from airflow_pg_incremental.core.pitr import parse_target, restore_pitr
from airflow_pg_incremental.core.repository import LocalRepository
from airflow_pg_incremental.sandbox import SandboxPostgres, data_fingerprint
from tests.conftest import created

pytestmark = [pytest.mark.integration, pytest.mark.skipif(
    not os.path.exists("/usr/lib/postgresql/15/bin/postgres"),
    reason="PostgreSQL 15 is not installed (apt-get install postgresql-15; .ci/setup does it as root)")]


@pytest.fixture(scope="module")
def pg15(workdir):
    pg = SandboxPostgres(workdir / "pg15", major=15).start()
    try:
        pg.pgbench_init(1)
        yield pg
    finally:
        pg.stop()


def test_full_wal_and_pitr_with_postgresql_15(pg15, workdir, scratch):
    repo = created(LocalRepository(workdir / f"pg15-repo-{uuid.uuid4().hex[:6]}"))
    capture_wal_pull(pg15.conninfo(), repo, "old")
    full = take_full_backup(pg15.conninfo(), repo, "old")
    assert full["pg_major"] == 15
    plan = take_planned_backup(pg15.conninfo(), repo, "old", kind="incremental")
    assert plan["kind"] == "none" and "WAL archive is the incremental" in plan["reason"]
    pg15.pgbench_run(300)
    pg15.psql("CREATE TABLE t15 (id int)")
    pg15.psql("INSERT INTO t15 VALUES (1)")
    target = pg15.psql("SELECT clock_timestamp()").strip()
    at_target = data_fingerprint(pg15.superuser())
    time.sleep(0.2)
    pg15.psql("INSERT INTO t15 VALUES (2)")
    cap = capture_wal_pull(pg15.conninfo(), repo, "old", upto_lsn=switch_wal(pg15.conninfo())["lsn"])
    assert cap["segments"] >= 1
    rep = restore_pitr(repo, "old", parse_target("time", target), scratch / "d", os_user=pg15.os_user,
                       keep_running=True)
    srv = rep.pop("server")
    try:
        assert srv.major == 15
        assert query(srv.local_conninfo(), "SHOW server_version_num")[0][0].startswith("15")
        assert data_fingerprint(srv.local_conninfo()) == at_target
    finally:
        srv.stop()


def test_incremental_refused_on_15_with_a_clear_message(pg15, workdir):
    from airflow_pg_incremental.core.backup import take_backup

    repo = created(LocalRepository(workdir / f"pg15-r2-{uuid.uuid4().hex[:6]}"))
    full = take_full_backup(pg15.conninfo(), repo, "old2")
    with pytest.raises(ConfigError, match="need PostgreSQL 17"):
        take_backup(pg15.conninfo(), repo, "old2", kind="incremental", parent=full)


def test_daily_dag_on_15_succeeds_and_says_why(airflow_clusters, pg15, workdir):
    """The daily DAG on PostgreSQL 15: no backup, the log and XCom say the WAL archive is the
    incremental, the WAL part runs, the run succeeds."""
    from tests.conftest import conn_json
    from tests.integration.test_airflow import _dags, _xcoms

    cfg_path = Path(os.environ["PGINCR_CONFIG"])
    cfg = json.loads(cfg_path.read_text())
    if not any(c["name"] == "it_pg15" for c in cfg["clusters"]):
        cfg["clusters"].append({"name": "it_pg15", "postgres_conn_id": "pgincr_it_pg15",
                                "repository": str(workdir / "af-repo-15"), "create_repository": True})
        cfg_path.write_text(json.dumps(cfg))
    os.environ["AIRFLOW_CONN_PGINCR_IT_PG15"] = conn_json(pg15.conninfo())
    dags = _dags()
    assert dags["pgincr_it_pg15_weekly_full"].test().state == "success"
    dag = dags["pgincr_it_pg15_daily_incremental"]
    dr = dag.test()
    assert dr.state == "success"
    out = _xcoms(dag.dag_id, dr.run_id)[("incremental_backup", "return_value")]
    assert out["kind"] == "none" and "PostgreSQL 15" in out["reason"]


# --- where zstd runs: on the PostgreSQL 15 server, in pg_basebackup, or in pgincr ---------------
@pytest.mark.parametrize("compression,where", [("auto", "server"), ("client", "client")])
def test_compressed_by_postgresql_restores_exactly(pg15, workdir, scratch, compression, where, caplog, s3):
    """Debian's PostgreSQL 15 has zstd: by default the server compresses (server-zstd), with
    `client` pg_basebackup does; either way the stored object is exactly what arrived (its SHA-256
    checked on read), the manifest is kept beside it, and the backup restores byte-exact and
    passes verify, from a local and from an S3 repository. Nothing is left in the staging dir."""
    import logging

    from airflow_pg_incremental.core.repository import S3Repository
    from airflow_pg_incremental.core.restore import restore_backup
    from airflow_pg_incremental.core.restore import start_restored
    from airflow_pg_incremental.core.verify import verify_backup

    pg15.pgbench_run(100)
    expected = data_fingerprint(pg15.superuser())
    staging = workdir / f"stage-{uuid.uuid4().hex[:6]}"
    staging.mkdir()
    for kind, repo in (("local", created(LocalRepository(workdir / f"pg15-c-{uuid.uuid4().hex[:6]}"))),
                       ("s3", created(S3Repository(s3.client(), s3.bucket, "c15-" + uuid.uuid4().hex[:8])))):
        with caplog.at_level(logging.INFO, logger="airflow_pg_incremental"):
            meta = take_full_backup(pg15.conninfo(), repo, "z15", compression=compression, staging_dir=str(staging))
        assert meta["compression"]["where"] == where
        assert any(f"compressed {'on the database server' if where == 'server' else 'by pg_basebackup'}" in r.message
                   for r in caplog.records)
        assert list(staging.iterdir()) == []  # the staging file is gone
        base = next(o for o in meta["objects"] if o["key"].endswith("base.tar.zst"))
        assert base["raw_size"] is None and meta["raw_bytes"] > base["stored_size"]  # the manifest's total
        rep = verify_backup(repo, "z15", meta["backup_id"], check_wal=False, staging_parent=scratch)
        assert rep["verified"] == [meta["backup_id"]] and not rep["failed"], rep
        d = scratch / f"r-{kind}-{where}"
        restore_backup(repo, "z15", meta["backup_id"], d, os_user=pg15.os_user)
        srv = start_restored(d, 15, os_user=pg15.os_user)
        try:
            assert data_fingerprint(srv.local_conninfo()) == expected, kind
        finally:
            srv.stop()


def test_a_flipped_byte_in_a_server_compressed_backup_is_found(pg15, workdir, scratch):
    """The server's zstd frames carry no content checksum: the stored SHA-256 is what catches
    damage, in verify and in restore, which then leaves nothing behind."""
    from airflow_pg_incremental.core.errors import ChecksumMismatch
    from airflow_pg_incremental.core.restore import restore_backup
    from airflow_pg_incremental.core.verify import verify_backup

    repo = created(LocalRepository(workdir / f"pg15-f-{uuid.uuid4().hex[:6]}"))
    meta = take_full_backup(pg15.conninfo(), repo, "f15")
    assert meta["compression"]["where"] == "server"
    path = Path(repo.root) / "f15" / "backups" / meta["backup_id"] / "base.tar.zst"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    rep = verify_backup(repo, "f15", meta["backup_id"], check_wal=False, staging_parent=scratch)
    assert [(x["backup_id"], x["check"]) for x in rep["failed"]] == [(meta["backup_id"], "objects")]
    assert "base.tar.zst" in rep["failed"][0]["message"]
    with pytest.raises(ChecksumMismatch, match="base.tar.zst"):
        restore_backup(repo, "f15", meta["backup_id"], scratch / "bad", os_user=pg15.os_user)
    assert not (scratch / "bad").exists()


KILLED_CHILD = r"""
import json, os, sys, time
from airflow_pg_incremental.core import backup_stream
from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.pgconn import ConnInfo
from airflow_pg_incremental.core.repository import LocalRepository

backup_stream.MAX_BACKLOG = 1  # pg_basebackup is paused after its first bytes


class Slow(LocalRepository):  # a repository that takes its time
    def put(self, key, reader, **kw):
        class R:
            def read(self, n=-1):
                data = reader.read(64 * 1024)
                time.sleep(0.5)
                return data
        return super().put(key, R(), **kw)


a = json.loads(sys.argv[1])
take_full_backup(ConnInfo(**a["conn"]), Slow(a["repo"]), "k15", staging_dir=a["staging"])
"""


def test_a_killed_backup_leaves_no_pg_basebackup_and_its_staging_is_removed_next_time(pg15, workdir):
    """kill -9 of the process taking a server-compressed backup: its pg_basebackup (which writes
    into a file, so no broken pipe would stop it) dies with it, the walsender ends, and the next
    backup removes the staging directory left behind."""
    import signal
    import subprocess
    import sys

    import psutil

    # ~120 MB that compresses about 2x: the stream lasts long enough to be caught mid-way
    pg15.psql("CREATE DATABASE bulk")
    pg15.psql("CREATE TABLE b AS SELECT g, md5(g::text) || md5(random()::text) AS t "
              "FROM generate_series(1, 1200000) g", dbname="bulk")
    repo = created(LocalRepository(workdir / f"pg15-k-{uuid.uuid4().hex[:6]}"))
    staging = workdir / f"stage-k-{uuid.uuid4().hex[:6]}"
    staging.mkdir()
    ci = pg15.conninfo()
    arg = {"conn": {"host": ci.host, "port": ci.port, "user": ci.user, "password": ci.password,
                    "dbname": ci.dbname}, "repo": str(repo.root), "staging": str(staging)}
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, json.dumps(arg)])
    try:
        deadline = time.monotonic() + 60
        pbb = []
        while time.monotonic() < deadline and not pbb:
            time.sleep(0.05)
            pbb = [p for p in psutil.Process(child.pid).children()  # not the quick probe of its zstd support
                   if p.name() == "pg_basebackup" and any(str(staging) in x for x in p.cmdline())]
        assert pbb, "pg_basebackup never started"
        time.sleep(1.0)  # writing, then paused: the repository is slow
        assert pbb[0].is_running() and child.poll() is None, f"child exit {child.poll()}, pg_basebackup {pbb[0]}"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
        gone, alive = psutil.wait_procs(pbb, timeout=10)
        assert not alive, "pg_basebackup outlived the process that started it"
    finally:
        if child.poll() is None:
            child.kill()
    left = [p.name for p in staging.iterdir()]
    assert len(left) == 1 and left[0].startswith("pgincr-backup-")
    meta = take_full_backup(ci, repo, "k15", staging_dir=str(staging))  # a new backup cleans up
    assert meta["status"] == "complete" and list(staging.iterdir()) == []
    pg15.psql("DROP DATABASE bulk")
