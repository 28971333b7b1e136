"""The WAL sensors in real Airflow runs (dag.test(), deferrable, triggers run inline), on a local
repository: the segment is there already / lands while the trigger polls; the archive is fresh /
becomes fresh / stays stale (the run fails with the RPO message).

dag.test() needs the DAG serialized in the metadata DB, so the DAGs live in a small DAG file written
into the DAGS folder (parameters in a JSON file beside it); the file defines nothing without it."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import created

pytestmark = pytest.mark.integration

SEG = 16 * 1024 * 1024
DAG_FILE = "pgincr_wal_sensors_it.py"
PARAMS_FILE = "pgincr_wal_sensors_it.json"

DAG_SOURCE = '''\
"""WAL sensor DAGs of tests/integration/test_wal_sensors_airflow.py; parameters in the JSON file beside
this file. Without that file this module defines no DAG."""

import json
from pathlib import Path

from airflow.sdk import DAG, task

from airflow_pg_incremental.sensors.wal import WalArchivedSensor, WalFreshnessSensor

_PARAMS = Path(__file__).with_name("pgincr_wal_sensors_it.json")


def _build(spec):
    common = dict(cluster=spec["cluster"], repository=spec["repository"], deferrable=True,
                  poke_interval=spec["poll"], timeout=spec["timeout"], retries=0)
    with DAG(dag_id=spec["dag_id"], schedule=None, catchup=False, tags=["pgincr-it"],
             params={"max_age_s": spec.get("max_age_s", 900)}) as dag:
        if spec["kind"] == "archived":
            @task(task_id="full_backup")
            def full_backup():
                return {"stop_lsn": spec["lsn"], "timeline": 1}

            full_backup() >> WalArchivedSensor(
                task_id="wal_archived", lsn="{{ ti.xcom_pull(task_ids='full_backup')['stop_lsn'] }}",
                timeline="{{ ti.xcom_pull(task_ids='full_backup')['timeline'] }}", **common)
        else:
            WalFreshnessSensor(task_id="wal_fresh", max_age_s="{{ params.max_age_s }}", **common)
    return dag


if _PARAMS.exists():
    for _spec in json.loads(_PARAMS.read_text()):
        globals()[_spec["dag_id"]] = _build(_spec)
'''

SPECS = [
    {"dag_id": "pgincr_it_wal_archived_now", "kind": "archived", "cluster": "it_wal_now", "lsn": "0/3000028",
     "poll": 0.5, "timeout": 20},
    {"dag_id": "pgincr_it_wal_archived_late", "kind": "archived", "cluster": "it_wal_late", "lsn": "0/5000060",
     "poll": 0.5, "timeout": 30},
    {"dag_id": "pgincr_it_wal_fresh_now", "kind": "fresh", "cluster": "it_fresh_now", "max_age_s": 900,
     "poll": 0.5, "timeout": 20},
    {"dag_id": "pgincr_it_wal_fresh_late", "kind": "fresh", "cluster": "it_fresh_late", "max_age_s": 900,
     "poll": 0.5, "timeout": 30},
    {"dag_id": "pgincr_it_wal_stale", "kind": "fresh", "cluster": "it_stale", "max_age_s": 900,
     "poll": 0.5, "timeout": 3},
]


@pytest.fixture(scope="module")
def wal_dags(airflow_db, tmp_path_factory):
    from airflow.dag_processing.dagbag import DagBag

    from airflow_pg_incremental.core.repository import LocalRepository

    root = tmp_path_factory.mktemp("wal-sensor-repo")
    dags_dir = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    specs = [{**s, "repository": str(root / s["cluster"])} for s in SPECS]
    (dags_dir / PARAMS_FILE).write_text(json.dumps(specs))
    (dags_dir / DAG_FILE).write_text(DAG_SOURCE)
    try:
        bag = DagBag(dag_folder=str(dags_dir / DAG_FILE))
        assert bag.import_errors == {}
        yield {s["dag_id"]: (bag.get_dag(s["dag_id"]), created(LocalRepository(s["repository"])), s)
               for s in specs}
    finally:
        (dags_dir / DAG_FILE).unlink(missing_ok=True)
        (dags_dir / PARAMS_FILE).unlink(missing_ok=True)


def _push(repo, cluster, name, age_s: float | None = None):
    from airflow_pg_incremental.core.wal import push_bytes, wal_key

    push_bytes(repo, cluster, name, bytes(SEG), segment_size=SEG)
    if age_s is not None:
        t = time.time() - age_s
        os.utime(repo.root / wal_key(cluster, name), (t, t))


def _xcoms(dag_id: str, run_id: str) -> dict:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as s:
        rows = s.scalars(XComModel.get_many(run_id=run_id, dag_ids=dag_id)).all()
        return {(r.task_id, r.key): XComModel.deserialize_value(r) for r in rows}


def _ti_states(dr) -> dict:
    from airflow.utils.session import create_session

    with create_session() as s:
        return {ti.task_id: ti.state for ti in dr.get_task_instances(session=s)}


@pytest.fixture
def polls(monkeypatch):
    """Counts the triggers' repository checks; `first` is set at a trigger's first check (after deferral)."""
    from airflow_pg_incremental.triggers.wal import WalArchivedTrigger, WalFreshnessTrigger

    rec = {"count": 0, "first": threading.Event()}
    for cls in (WalArchivedTrigger, WalFreshnessTrigger):
        orig = cls._check

        def wrapped(self, _orig=orig):
            rec["count"] += 1
            rec["first"].set()
            return _orig(self)

        monkeypatch.setattr(cls, "_check", wrapped)
    return rec


def _push_after_first_poll(polls, repo, cluster, name, delay=2.0):
    """Background pusher: waits until the trigger has polled once (the task is deferred), then `delay` s."""
    out = {}

    def run():
        if polls["first"].wait(60):
            time.sleep(delay)
            _push(repo, cluster, name)
            out["pushed_at"] = time.monotonic()

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, out


def test_archived_deferrable_segment_already_there(wal_dags, polls):
    dag, repo, spec = wal_dags["pgincr_it_wal_archived_now"]
    _push(repo, spec["cluster"], "000000010000000000000003")
    dr = dag.test()
    assert dr.state == "success", _ti_states(dr)
    x = _xcoms(dag.dag_id, dr.run_id)
    assert x[("wal_archived", "return_value")] == {
        "segment": "000000010000000000000003", "key": "it_wal_now/wal/00000001/000000010000000000000003.zst"}
    assert polls["count"] == 0  # found by the first check in execute(): no deferral


def test_archived_deferrable_segment_lands_while_trigger_polls(wal_dags, polls):
    dag, repo, spec = wal_dags["pgincr_it_wal_archived_late"]
    th, out = _push_after_first_poll(polls, repo, spec["cluster"], "000000010000000000000005")
    t0 = time.monotonic()
    dr = dag.test()
    took = time.monotonic() - t0
    th.join(5)
    assert dr.state == "success", _ti_states(dr)
    assert "pushed_at" in out and polls["count"] >= 3  # missed at least twice (0.5 s polls over 2 s), then found
    assert 2 <= took < spec["timeout"]
    x = _xcoms(dag.dag_id, dr.run_id)
    assert x[("wal_archived", "return_value")]["segment"] == "000000010000000000000005"
    assert x[("full_backup", "return_value")]["stop_lsn"] == "0/5000060"


def test_freshness_deferrable_fresh(wal_dags, polls):
    dag, repo, spec = wal_dags["pgincr_it_wal_fresh_now"]
    _push(repo, spec["cluster"], "000000010000000000000007")
    dr = dag.test()
    assert dr.state == "success", _ti_states(dr)
    out = _xcoms(dag.dag_id, dr.run_id)[("wal_fresh", "return_value")]
    assert out["segment"] == "000000010000000000000007" and out["max_age_s"] == 900 and out["age_s"] < 60
    assert polls["count"] == 0


def test_freshness_deferrable_becomes_fresh(wal_dags, polls):
    dag, repo, spec = wal_dags["pgincr_it_wal_fresh_late"]
    _push(repo, spec["cluster"], "000000010000000000000008", age_s=7200)
    th, out = _push_after_first_poll(polls, repo, spec["cluster"], "000000010000000000000009", delay=1.0)
    dr = dag.test()
    th.join(5)
    assert dr.state == "success", _ti_states(dr)
    assert "pushed_at" in out and polls["count"] >= 2
    res = _xcoms(dag.dag_id, dr.run_id)[("wal_fresh", "return_value")]
    assert res["segment"] == "000000010000000000000009" and res["age_s"] < 60


def test_freshness_deferrable_stale_fails_loudly(wal_dags, polls, capfd):
    dag, repo, spec = wal_dags["pgincr_it_wal_stale"]
    _push(repo, spec["cluster"], "00000001000000000000000A", age_s=2 * 3600 + 3 * 60 + 10)
    t0 = time.monotonic()
    dr = dag.test()
    took = time.monotonic() - t0
    assert dr.state == "failed"
    assert _ti_states(dr) == {"wal_fresh": "failed"}
    assert spec["timeout"] <= took < spec["timeout"] + 30  # polled until the trigger's own timeout, then stopped
    assert polls["count"] >= 4
    assert ("wal_fresh", "return_value") not in _xcoms(dag.dag_id, dr.run_id)
    logged = "".join(capfd.readouterr())
    assert "RPO breached: newest archived WAL 00000001000000000000000A of cluster 'it_stale' was written 2h 3m ago " \
           "(limit 15m" in logged
