"""A DAG backfill the way an operator starts one: `airflow backfill create` against a running
Airflow (`airflow standalone`: API server, scheduler, DAG processor, triggerer), the scheduler
executing the runs. The restore-test DAG is backfilled over three past 5-second intervals; each
run must restore to its own interval end and find exactly the markers committed before it. Then
the weekly backup DAG runs under the scheduler and its verified backup's Asset event (with the
backup's details as its extra) queues the restore-test-on-backup DAG, which passes."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.capture import capture_wal_pull, switch_wal
from airflow_pg_incremental.core.catalog import Catalog
from airflow_pg_incremental.core.repository import LocalRepository
from airflow_pg_incremental.core.server import free_port
from tests.conftest import created

from ..conftest import REPO_ROOT, conn_json

pytestmark = pytest.mark.integration

DAG_ID = "pgincr_bf_restore_test"


def _sleep_until(t: dt.datetime) -> None:
    time.sleep(max(0.0, (t - dt.datetime.now(dt.timezone.utc)).total_seconds()))


@pytest.mark.slow
def test_scheduler_backfill_of_the_restore_test_dag(pg, workdir):
    base = workdir / f"bf-{uuid.uuid4().hex[:6]}"
    home, dags = base / "airflow", base / "airflow" / "dags"
    dags.mkdir(parents=True)
    os.chmod(base, 0o755)
    shutil.copy(REPO_ROOT / "dags" / "pgincr_dags.py", dags / "pgincr_dags.py")
    repo_dir = base / "repo"
    schema = "bf_" + uuid.uuid4().hex[:6]
    cluster = "bf"
    slot = f"pgincr_{cluster}"
    cfg = {"defaults": {"catalog_conn_id": "bf_catalog", "catalog_schema": schema, "retries": 0},
           "clusters": [{"name": cluster, "postgres_conn_id": "bf_pg", "repository": str(repo_dir),
                         "schedules": {"restore_test": "PT5S"},
                         "restore_test_checks": ["SELECT count(*) FROM bf_markers"]}]}
    (base / "clusters.json").write_text(json.dumps(cfg))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({
        "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # the CLI (backfill create) writes while the scheduler and API server do: wait for SQLite's
        # write lock instead of failing after its default 5 s ("database is locked") on a busy machine
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}?timeout=60",
        "AIRFLOW__CORE__PARALLELISM": "2",  # standalone's default starts 32 workers
        "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
        "PGINCR_CONFIG": str(base / "clusters.json"),
        "AIRFLOW_CONN_BF_PG": conn_json(pg.conninfo()),
        "AIRFLOW_CONN_BF_CATALOG": conn_json(pg.conninfo(), "pgincr_catalog"),
    })

    def airflow(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True,
                              timeout=120)

    repo = created(LocalRepository(repo_dir))
    pg.psql("CREATE TABLE IF NOT EXISTS bf_markers (id int PRIMARY KEY, at timestamptz)")
    pg.psql("TRUNCATE bf_markers")
    capture_wal_pull(pg.conninfo(), repo, cluster)
    take_full_backup(pg.conninfo(), repo, cluster)

    # one marker inside each of three 5-second intervals, and a last one after them (so the last
    # interval's end lies inside the archived WAL)
    t0 = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=1)).replace(microsecond=0)
    for i in range(1, 5):
        _sleep_until(t0 + dt.timedelta(seconds=5 * (i - 1) + 1))
        pg.psql(f"INSERT INTO bf_markers VALUES ({i}, clock_timestamp())")
    capture_wal_pull(pg.conninfo(), repo, cluster, upto_lsn=switch_wal(pg.conninfo())["lsn"])
    # the backfill is created with the metadata DB to itself: SQLite refuses a write that races the
    # scheduler's ("database is locked", even with a busy timeout, when a read lock must be upgraded)
    for args in (("db", "migrate"), ("dags", "reserialize")):
        r = airflow(*args)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = airflow("backfill", "create", "--dag-id", DAG_ID, "--from-date", t0.isoformat(),
                "--to-date", (t0 + dt.timedelta(seconds=10)).isoformat())
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    # the scheduler starts no run of a paused DAG, backfill runs included
    assert airflow("dags", "unpause", DAG_ID).returncode == 0

    log = open(base / "standalone.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "airflow", "standalone"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=2).read()
                break
            except OSError:
                pass
            assert proc.poll() is None, (base / "standalone.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "airflow standalone did not come up in 180 s"
            time.sleep(2)

        db = home / "airflow.db"
        deadline = time.monotonic() + 300
        while True:
            with sqlite3.connect(db) as c:
                runs = c.execute("SELECT run_id, state, data_interval_end FROM dag_run WHERE dag_id = ? AND "
                                 "run_type = 'backfill' ORDER BY logical_date", (DAG_ID,)).fetchall()
            if len(runs) == 3 and all(s in ("success", "failed") for _, s, _ in runs):
                break
            assert time.monotonic() < deadline, f"backfill runs not finished in 300 s: {runs}"
            time.sleep(3)
        airflow("dags", "pause", DAG_ID)
        assert [s for _, s, _ in runs] == ["success"] * 3, runs

        # the backup DAG's Asset event queues the restore test through the scheduler: unpause the
        # consumer first (events emitted while it is paused queue nothing), then the weekly DAG
        # (the scheduler starts its latest interval at once), and wait for the triggered restore test
        assert airflow("dags", "unpause", f"pgincr_{cluster}_restore_test_on_backup").returncode == 0
        assert airflow("dags", "unpause", f"pgincr_{cluster}_weekly_full").returncode == 0
        deadline = time.monotonic() + 300
        while True:
            with sqlite3.connect(db) as c:
                weekly = c.execute("SELECT state FROM dag_run WHERE dag_id = ?",
                                   (f"pgincr_{cluster}_weekly_full",)).fetchall()
                tested = c.execute("SELECT run_id, state, run_type FROM dag_run WHERE dag_id = ?",
                                   (f"pgincr_{cluster}_restore_test_on_backup",)).fetchall()
                extra = c.execute("SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
                                  "WHERE a.name = ?", (f"pgincr_{cluster}_backups",)).fetchall()
            assert not any(s == "failed" for (s,) in weekly), (base / "standalone.log").read_text()[-3000:]
            if tested and all(s in ("success", "failed") for _, s, _ in tested):
                break
            assert time.monotonic() < deadline, f"no restore test triggered by the backup in 300 s: {weekly}, {tested}"
            time.sleep(3)
        for d in ("weekly_full", "restore_test_on_backup"):
            airflow("dags", "pause", f"pgincr_{cluster}_{d}")
        assert [(s, t) for _, s, t in tested] == [("success", "asset_triggered")], tested
        assert extra and json.loads(extra[-1][0])["kind"] == "full" and json.loads(extra[-1][0])["verified"]
        asset_run = tested[0][0]
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # SIGTERM would orphan standalone's children
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        pg.psql(f"SELECT pg_drop_replication_slot('{slot}') FROM pg_replication_slots WHERE slot_name = '{slot}'")

    # each run restored to its own interval end and found the markers committed before it
    cat = Catalog(pg.conninfo("pgincr_catalog"), schema)
    recs = {r["run_id"]: r for r in cat.restore_tests(cluster, limit=50)}
    assert recs[asset_run]["ok"] and recs[asset_run]["target_kind"] == "latest", recs[asset_run]
    for n, (run_id, _, _) in enumerate(runs, start=1):
        rec = recs[run_id]
        assert rec["ok"] and rec["target_kind"] == "time", rec
        assert rec["target_value"].startswith((t0 + dt.timedelta(seconds=5 * n)).isoformat()[:19]), rec
        count = [c for c in rec["checks"] if "bf_markers" in c["sql"]][0]["rows"]
        assert count == [[str(n)]], (n, rec)
