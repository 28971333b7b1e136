"""A killed task or program leaves nothing behind: no PostgreSQL server still running on a scratch
copy, no scratch directory, no half backup. Real servers, real restores, real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import types
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, conn_json, created
from tests.integration.proc_helpers import processes_under, wait_for

pytestmark = pytest.mark.integration


def leftovers(scratch: Path) -> dict:
    return {"postgres": processes_under(scratch, "postgres"), "entries": sorted(p.name for p in scratch.iterdir())}


@pytest.fixture(scope="module")
def backed_up(pg, workdir):
    """A local repository with a full backup and the WAL after it, and a time inside the window."""
    from airflow_pg_incremental.core.backup import take_full_backup
    from airflow_pg_incremental.core.capture import capture_wal_pull, default_slot_name, ensure_slot, switch_wal
    from airflow_pg_incremental.core.repository import LocalRepository

    cluster = "kill_" + uuid.uuid4().hex[:6]
    slot = default_slot_name(cluster)
    repo = created(LocalRepository(workdir / "repos" / cluster))
    ensure_slot(pg.conninfo(), slot)
    take_full_backup(pg.conninfo(), repo, cluster)
    pg.psql("CREATE TABLE IF NOT EXISTS kill_marks (id serial PRIMARY KEY, at timestamptz DEFAULT now())")
    pg.psql("INSERT INTO kill_marks DEFAULT VALUES")
    target = pg.psql("SELECT clock_timestamp()").strip()
    time.sleep(0.2)
    pg.psql("INSERT INTO kill_marks DEFAULT VALUES")
    capture_wal_pull(pg.conninfo(), repo, cluster, upto_lsn=switch_wal(pg.conninfo())["lsn"])
    yield {"repo": repo, "cluster": cluster, "target": target}
    pg.psql(f"SELECT pg_drop_replication_slot('{slot}')")


@pytest.fixture
def engine_registry():
    """What other fixtures started (the session's PostgreSQL ...) belongs to them, not to the code
    under test: a terminate_all() in this process must not stop it. Set aside for the test, given
    back afterwards, and the process may start servers again."""
    from airflow_pg_incremental.core import procs

    saved = [dict(r) for r in (procs._servers, procs._children, procs._dirs)]
    for r in (procs._servers, procs._children, procs._dirs):
        r.clear()
    yield procs
    procs.reset()
    for r, before in zip((procs._servers, procs._children, procs._dirs), saved):
        r.update(before)


@pytest.fixture
def scratch_parent():
    # short: a server's socket path (inside the scratch directory) is limited to 107 bytes
    d = Path(tempfile.mkdtemp(prefix="pk-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _restore_test_operator(backed_up, scratch_parent, checks):
    from airflow_pg_incremental.operators.restore import PgRestoreTestOperator

    return PgRestoreTestOperator(task_id="restore_test", cluster=backed_up["cluster"],
                                 repository=str(backed_up["repo"].root), target_time=backed_up["target"],
                                 checks=checks, amcheck=False, scratch_dir=str(scratch_parent))


_CONTEXT = {"ti": types.SimpleNamespace(dag_id="kill_test", run_id="manual", task_id="restore_test", try_number=1)}


def test_restore_test_on_kill_from_the_sigterm_handler(backed_up, engine_registry, scratch_parent):
    """What Airflow's task runner does: SIGTERM -> on_kill() in the main thread. The scratch server
    (busy with a 60 s check) is stopped, its directory removed, and execute() ends at once."""
    from airflow.sdk.exceptions import AirflowTaskTerminated

    op = _restore_test_operator(backed_up, scratch_parent, ["SELECT pg_sleep(60)"])
    killed = {}

    def killer():
        wait_for(lambda: processes_under(scratch_parent, "postgres"), 60, "the scratch server")
        time.sleep(0.5)  # in its check
        killed["at"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: op.on_kill())
    t = threading.Thread(target=killer, daemon=True)
    t.start()
    try:
        with pytest.raises(AirflowTaskTerminated):
            op.execute(_CONTEXT)
    finally:
        signal.signal(signal.SIGTERM, previous)
        t.join(5)
    assert time.monotonic() - killed["at"] < 10, "execute went on after on_kill"
    assert leftovers(scratch_parent) == {"postgres": [], "entries": []}


def test_restore_test_on_kill_from_another_thread(backed_up, engine_registry, scratch_parent):
    """on_kill() called by another thread while execute() runs: the server is stopped and the
    directory removed at once, and execute() fails instead of carrying on."""
    op = _restore_test_operator(backed_up, scratch_parent, ["SELECT pg_sleep(60)"])
    seen = {}

    def killer():
        wait_for(lambda: processes_under(scratch_parent, "postgres"), 60, "the scratch server")
        time.sleep(0.5)
        seen["at"] = time.monotonic()
        op.on_kill()
        seen["after_on_kill"] = leftovers(scratch_parent)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    with pytest.raises(Exception, match="FAILED|stopping|terminat"):
        op.execute(_CONTEXT)
    t.join(5)
    assert time.monotonic() - seen["at"] < 10, "execute went on after on_kill"
    assert seen["after_on_kill"] == {"postgres": [], "entries": []}
    assert leftovers(scratch_parent) == {"postgres": [], "entries": []}


def test_on_kill_after_an_execution_timeout_keeps_the_timeout(engine_registry, tmp_path):
    """The task runner calls on_kill() in `except AirflowTaskTimeout:` (execution_timeout): it
    cleans up, and the timeout (which may be retried) stays the task's error."""
    from airflow.sdk.exceptions import AirflowTaskTimeout

    from airflow_pg_incremental.operators.backup import PgBaseBackupOperator

    op = PgBaseBackupOperator(task_id="full_backup", cluster="c", postgres_conn_id="x", repository=str(tmp_path))
    leftover = engine_registry.register_dir(tmp_path / "scratch")
    leftover.mkdir()
    with pytest.raises(AirflowTaskTimeout):
        try:
            raise AirflowTaskTimeout()
        except AirflowTaskTimeout:
            op.on_kill()
            raise
    assert not leftover.exists() and engine_registry.terminated()


def test_killed_backup_is_not_published(pg, repo, engine_registry):
    """terminate_all() during a full backup kills pg_basebackup; the backup fails and leaves nothing."""
    from airflow_pg_incremental.core.backup import take_full_backup
    from airflow_pg_incremental.core.errors import PgIncrError
    from airflow_pg_incremental.core.metadata import find_incomplete, list_backups

    cluster = "killbk"
    seen = {}

    def killer():
        seen["child"] = wait_for(lambda: engine_registry.registered()["children"], 60, "pg_basebackup")
        seen["done"] = engine_registry.terminate_all("test kill")

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    with pytest.raises(PgIncrError):
        take_full_backup(pg.conninfo(), repo, cluster)
    t.join(5)
    assert seen["done"]["children"] == 1
    assert list_backups(repo, cluster) == [] and find_incomplete(repo, cluster) == []
    assert not any(k for k in repo.list(f"{cluster}/backups/"))


_CHILD = textwrap.dedent("""
    import sys
    from airflow_pg_incremental.core import procs
    from airflow_pg_incremental.core.pitr import parse_target
    from airflow_pg_incremental.core.repository import LocalRepository
    from airflow_pg_incremental.core.restoretest import run_restore_test

    procs.install_sigterm_handler()
    repo, cluster, target, scratch = sys.argv[1:]
    run_restore_test(LocalRepository(repo), cluster, parse_target("time", target), checks=["SELECT pg_sleep(60)"],
                     amcheck=False, scratch_parent=scratch)
    print("finished without being stopped")
""")


@pytest.mark.slow
def test_sigterm_to_a_program_running_a_restore_test(backed_up, scratch_parent):
    """A program (like the CLI) with the engine's SIGTERM handler, killed while its scratch server runs."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(backed_up["repo"].root), backed_up["cluster"],
                             backed_up["target"], str(scratch_parent)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: processes_under(scratch_parent, "postgres") or proc.poll() is not None, 60,
                 "the scratch server")
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "finished without being stopped" not in out
    assert leftovers(scratch_parent) == {"postgres": [], "entries": []}, out


@pytest.mark.slow
def test_sigterm_to_an_airflow_restore_test_run(pg, backed_up, scratch_parent, workdir):
    """`airflow dags test` of the restore-test DAG, SIGTERMed while its scratch server runs: the task
    runner's handler calls on_kill, which stops the server and removes the scratch directory."""
    base = Path(tempfile.mkdtemp(prefix="kill-af-", dir=workdir))
    home, dags = base / "airflow", base / "airflow" / "dags"
    dags.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "dags" / "pgincr_dags.py", dags / "pgincr_dags.py")
    cluster = backed_up["cluster"]
    cfg = {"clusters": [{"name": cluster, "postgres_conn_id": "kill_pg", "repository": str(backed_up["repo"].root),
                         "retries": 0, "schedules": {"restore_test": "PT1H"}, "scratch_dir": str(scratch_parent),
                         "restore_test_checks": ["SELECT pg_sleep(60)"]}]}
    (base / "clusters.json").write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
                "PGINCR_CONFIG": str(base / "clusters.json"), "AIRFLOW_CONN_KILL_PG": conn_json(pg.conninfo()),
                "PYTHONPATH": str(REPO_ROOT)})
    r = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    log = open(base / "dags-test.log", "w+")
    import datetime as dt

    when = dt.datetime.fromisoformat(backed_up["target"].replace(" ", "T")).isoformat()
    proc = subprocess.Popen([sys.executable, "-m", "airflow", "dags", "test", f"pgincr_{cluster}_restore_test", when],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=base)
    try:
        wait_for(lambda: processes_under(scratch_parent, "postgres") or proc.poll() is not None, 120,
                 "the scratch server")
        assert proc.poll() is None, (base / "dags-test.log").read_text()[-3000:]
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = (base / "dags-test.log").read_text()
    assert leftovers(scratch_parent) == {"postgres": [], "entries": []}, text[-3000:]
    assert "Task killed: stopped 1 server(s)" in text, text[-3000:]
