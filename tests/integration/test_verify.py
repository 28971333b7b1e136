"""Backup verification on real PostgreSQL 18 backups, in a local repository and SeaweedFS: a good
chain verifies (every member) and is recorded, a second run skips it; a flipped byte fails naming
the object; missing WAL fails the 'wal' check; every archived WAL segment is read: a flipped byte
in a segment object, a valid segment of another position or of another cluster stored under its
name fail the 'wal_objects' check naming it (verify, the CLI's exit code, the operator in real
Airflow); PgBackupVerifyOperator in real Airflow runs."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.capture import (
    capture_wal_pull,
    default_slot_name,
    switch_wal,
)
from airflow_pg_incremental.core.incremental import take_planned_backup
from airflow_pg_incremental.core.lsn import format_lsn, segment_name, segno_of
from airflow_pg_incremental.core.metadata import backup_prefix
from airflow_pg_incremental.core.repository import LocalRepository
from airflow_pg_incremental.core.verify import verify_backup
from airflow_pg_incremental.core.wal import list_segments, wal_key
from tests.conftest import created

pytestmark = pytest.mark.integration


def _cluster(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@contextmanager
def _slot(pg, cluster):
    """WAL capture for `cluster`: the first capture creates its slot (before the first backup)."""
    try:
        yield
    finally:
        pg.psql(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                f"WHERE slot_name = '{default_slot_name(cluster)}'")


def _capture(pg, repo, cluster):
    return capture_wal_pull(pg.conninfo(), repo, cluster, upto_lsn=switch_wal(pg.conninfo())["lsn"])


def _flip(repo, key):
    data = bytearray(repo.get_bytes(key))
    data[len(data) // 2] ^= 0x55
    repo.put_bytes(key, bytes(data))


def _checks(res, bid):
    r = next(r for r in res["results"] if r["backup_id"] == bid)
    return {c["name"]: c for c in r["checks"]}


def test_good_chain_verifies_every_member_is_recorded_then_skipped(pg, repo, catalog, scratch):
    cl = _cluster("vgood")
    with _slot(pg, cl):
        capture_wal_pull(pg.conninfo(), repo, cl)
        f = take_full_backup(pg.conninfo(), repo, cl)
        pg.pgbench_run(50)
        i1 = take_planned_backup(pg.conninfo(), repo, cl, kind="incremental")
        pg.pgbench_run(50)
        i2 = take_planned_backup(pg.conninfo(), repo, cl, kind="incremental")
        _capture(pg, repo, cl)
    ids = [f["backup_id"], i1["backup_id"], i2["backup_id"]]
    assert [i1["kind"], i2["kind"]] == ["incremental", "incremental"]

    res = verify_backup(repo, cl, i2["backup_id"], catalog=catalog, staging_parent=scratch,
                        airflow={"dag_id": "it_dag", "run_id": "it_run"})
    assert res["failed"] == [] and res["skipped"] == []
    assert res["verified"] == ids  # the whole chain, oldest first
    for b in (f, i1, i2):
        checks = _checks(res, b["backup_id"])
        assert all(c["ok"] for c in checks.values()), checks
        assert set(checks) == {"objects", "pg_verifybackup", "wal", "wal_objects"} | ({"chain"} if b is not f else
                                                                                       set())
        assert checks["pg_verifybackup"]["detail"].startswith("passed (files and WAL)")
        assert len(checks["objects"]["objects"]) == 2
    assert _checks(res, ids[1])["chain"]["detail"] == f"{ids[0]} -> {ids[1]}"
    assert "continuous from its stop" in _checks(res, ids[2])["wal"]["detail"]  # the newest: up to the archive end
    assert "continuous" not in _checks(res, ids[0])["wal"]["detail"]
    assert list(scratch.iterdir()) == []  # staging removed
    for bid in ids:
        row = catalog.last_verification(cl, bid)
        assert row["ok"] is True and row["error"] is None
        assert (row["dag_id"], row["run_id"]) == ("it_dag", "it_run")
        assert {c["name"] for c in row["checks"]} >= {"objects", "pg_verifybackup", "wal"}

    again = verify_backup(repo, cl, i2["backup_id"], catalog=catalog, staging_parent=scratch)
    assert again["skipped"] == ids and again["verified"] == [] and again["failed"] == []
    every = verify_backup(repo, cl, None, catalog=catalog, staging_parent=scratch)
    assert every["skipped"] == ids and every["verified"] == []


def test_flipped_byte_fails_naming_the_object_and_is_recorded(pg, repo, catalog, scratch):
    cl = _cluster("vflip")
    f = take_full_backup(pg.conninfo(), repo, cl)
    pg.pgbench_run(30)
    i = take_planned_backup(pg.conninfo(), repo, cl, kind="incremental")
    key = f"{backup_prefix(cl, i['backup_id'])}/base.tar.zst"
    _flip(repo, key)

    res = verify_backup(repo, cl, i["backup_id"], catalog=catalog, check_wal=False, staging_parent=scratch)
    assert res["verified"] == [f["backup_id"]]  # the chain's full is fine
    assert [(x["backup_id"], x["check"]) for x in res["failed"]] == [(i["backup_id"], "objects")]
    msg = res["failed"][0]["message"]
    assert key in msg and i["backup_id"] in msg
    assert _checks(res, i["backup_id"])["pg_verifybackup"]["ok"] is None  # not run on damaged data
    assert list(scratch.iterdir()) == []
    row = catalog.last_verification(cl, i["backup_id"])
    assert row["ok"] is False and key in row["error"]
    assert catalog.last_verification(cl, f["backup_id"])["ok"] is True
    # not skipped next time: its last verification failed (the full is)
    again = verify_backup(repo, cl, None, catalog=catalog, check_wal=False, staging_parent=scratch)
    assert again["skipped"] == [f["backup_id"]] and again["failed"][0]["backup_id"] == i["backup_id"]


def test_missing_wal_fails_the_wal_check(pg, tmp_path, scratch):
    repo = created(LocalRepository(tmp_path / "repo"))
    cl = _cluster("vwal")
    with _slot(pg, cl):
        capture_wal_pull(pg.conninfo(), repo, cl)
        f = take_full_backup(pg.conninfo(), repo, cl)
        for _ in range(3):  # a few segments after the backup's stop
            pg.pgbench_run(10)
            switch_wal(pg.conninfo())
        _capture(pg, repo, cl)
    bid = f["backup_id"]
    segs = list_segments(repo, cl)[1]
    start, stop = segno_of(f["start_wal_file"]), segno_of(f["stop_wal_file"])
    assert f["start_wal_file"] in segs and segno_of(segs[-1]) >= stop + 2

    # a gap after the stop, newer WAL archived: PITR from the backup stops short
    after = segment_name(1, stop + 1)
    repo.delete(wal_key(cl, after))
    res = verify_backup(repo, cl, bid, staging_parent=scratch)
    assert [(x["backup_id"], x["check"]) for x in res["failed"]] == [(bid, "wal")]
    assert f"WAL segment {after} after its stop {f['stop_lsn']} is missing" in res["failed"][0]["message"]
    checks = _checks(res, bid)
    assert checks["objects"]["ok"] and checks["pg_verifybackup"]["ok"]  # the backup itself is fine

    # a segment of the backup's own range
    repo.delete(wal_key(cl, f["start_wal_file"]))
    res = verify_backup(repo, cl, bid, staging_parent=scratch)
    msg = res["failed"][0]["message"]
    assert res["failed"][0]["check"] == "wal" and f"WAL segment(s) {segment_name(1, start)}" in msg
    assert f"between its start {f['start_lsn']} and stop {f['stop_lsn']}" in msg
    assert "restores on its own" in msg and "point-in-time recovery from this backup is refused" in msg


def _segment_of_another_cluster(pg, where: Path) -> bytes:
    """The first WAL segment of a brand-new PostgreSQL 18 cluster: valid, of another system."""
    from airflow_pg_incremental.core.server import PgServer

    other = PgServer(where / "other", major=18, os_user=pg.os_user)
    other.initdb()
    return (other.data_dir / "pg_wal" / "000000010000000000000001").read_bytes()


def test_every_archived_wal_segment_is_read_and_damage_named(pg, repo, catalog, scratch):
    from airflow_pg_incremental.core.codec import compress_bytes

    cl = _cluster("vwobj")
    with _slot(pg, cl):
        capture_wal_pull(pg.conninfo(), repo, cl)
        f = take_full_backup(pg.conninfo(), repo, cl)
        for _ in range(3):  # a few segments after the backup's stop
            pg.pgbench_run(10)
            switch_wal(pg.conninfo())
        capture_wal_pull(pg.conninfo(), repo, cl, upto_lsn=switch_wal(pg.conninfo())["lsn"], catalog=catalog)
    bid = f["backup_id"]
    segs = list_segments(repo, cl)[1]
    start, stop = segno_of(f["start_wal_file"]), segno_of(f["stop_wal_file"])
    after = [n for n in segs if segno_of(n) > stop]
    assert len(after) >= 3
    res = verify_backup(repo, cl, bid, catalog=catalog, staging_parent=scratch)
    assert res["failed"] == [] and res["verified"] == [bid]
    objs = _checks(res, bid)["wal_objects"]
    assert objs["ok"] and objs["segments"] == len([n for n in segs if segno_of(n) >= start])

    def again():
        return verify_backup(repo, cl, bid, catalog=catalog, only_unverified=False, staging_parent=scratch)

    def failed_segments(res):
        assert [(x["backup_id"], x["check"]) for x in res["failed"]] == [(bid, "wal_objects")]
        checks = _checks(res, bid)
        assert checks["objects"]["ok"] and checks["pg_verifybackup"]["ok"] and checks["wal"]["ok"]
        return checks["wal_objects"]["damaged"], res["failed"][0]["message"]

    # a flipped byte inside the stored object of a segment (zstd's frame checksum)
    victim = after[0]
    key = wal_key(cl, victim)
    original = repo.get_bytes(key)
    _flip(repo, key)
    damaged, msg = failed_segments(again())
    assert damaged == [victim] and f"{key}: damaged zstd data" in msg
    assert f"point-in-time recovery past LSN {format_lsn(segno_of(victim) * 16 * 1024 * 1024)}" in msg
    assert f"(into segment {victim}) is impossible" in msg and "pgincr wal-push" in msg
    assert catalog.last_verification(cl, bid)["ok"] is False

    # a valid segment of another position stored under its name (zstd and size are fine)
    repo.put_bytes(key, repo.get_bytes(wal_key(cl, after[1])))
    damaged, msg = failed_segments(again())
    assert damaged == [victim] and "it holds the WAL of LSN" in msg and f"(segment {after[1]})" in msg
    # capture recorded its SHA-256 in the catalog: compared too
    assert f"{key}: content SHA-256" in msg and "recorded in the catalog when it was captured" in msg

    # a valid segment of another cluster, named as one of ours
    repo.put_bytes(key, compress_bytes(_segment_of_another_cluster(pg, scratch)))
    damaged, msg = failed_segments(again())
    assert damaged == [victim] and "it belongs to another database system" in msg
    assert f"the backup's is {f['system_identifier']}" in msg

    # back to the original: passes again
    repo.put_bytes(key, original)
    assert again()["verified"] == [bid]


def test_cli_verify_fails_on_a_damaged_wal_segment(pg, tmp_path, scratch):
    from tests.integration.test_cli import pgincr

    repo = created(LocalRepository(tmp_path / "repo"))
    cl = _cluster("vwcli")
    with _slot(pg, cl):
        capture_wal_pull(pg.conninfo(), repo, cl)
        f = take_full_backup(pg.conninfo(), repo, cl)
        _capture(pg, repo, cl)
    victim = f["stop_wal_file"]
    args = ("verify", "--repo", str(repo.root), "--cluster", cl)
    r = pgincr(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _flip(repo, wal_key(cl, victim))
    r = pgincr(*args)
    assert r.returncode == 5 and f"FAILED  {f['backup_id']}: wal_objects" in r.stdout and victim in r.stdout
    r = pgincr(*args, "--json")
    assert r.returncode == 5
    out = json.loads(r.stdout)
    assert [(x["backup_id"], x["check"]) for x in out["failed"]] == [(f["backup_id"], "wal_objects")]
    assert victim in out["failed"][0]["message"]


# ------------------------------------------------------------------------------------------
DAG_FILE = "pgincr_verify_it.py"
PARAMS_FILE = "pgincr_verify_it.json"
DAG_SOURCE = '''\
"""Verify DAGs of tests/integration/test_verify.py; parameters in the JSON file beside this file.
Without that file this module defines no DAG."""

import json
from pathlib import Path

from airflow.sdk import DAG, task

from airflow_pg_incremental.operators.verify import PgBackupVerifyOperator

_PARAMS = Path(__file__).with_name("pgincr_verify_it.json")


def _build(spec):
    with DAG(dag_id=spec["dag_id"], schedule=None, catchup=False, tags=["pgincr-it"]) as dag:
        @task(task_id="full_backup")
        def full_backup():
            return {"backup_id": spec["backup_id"]}

        full_backup() >> PgBackupVerifyOperator(
            task_id="verify", cluster=spec["cluster"], repository=spec["repository"],
            catalog_conn_id="pgincr_verify_catalog", catalog_schema=spec["schema"],
            check_wal=spec.get("check_wal", False), retries=0,
            backup_id="{{ ti.xcom_pull(task_ids='full_backup')['backup_id'] }}")
    return dag


if _PARAMS.exists():
    for _spec in json.loads(_PARAMS.read_text()):
        globals()[_spec["dag_id"]] = _build(_spec)
'''



def _run_dag(dags_dir: Path, specs: list[dict], dag_id: str):
    """dag.test() of one of the DAGs DAG_SOURCE builds from `specs`; (dag run, task states)."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.session import create_session

    (dags_dir / PARAMS_FILE).write_text(json.dumps(specs))
    (dags_dir / DAG_FILE).write_text(DAG_SOURCE)
    bag = DagBag(dag_folder=str(dags_dir / DAG_FILE))
    assert bag.import_errors == {}
    dr = bag.get_dag(dag_id).test()
    with create_session() as s:
        return dr, {ti.task_id: ti.state for ti in dr.get_task_instances(session=s)}

def test_operator_in_airflow_fails_on_a_corrupted_backup(airflow_db, pg, tmp_path, catalog, capfd):

    from tests.conftest import conn_json

    cl = _cluster("vaf")
    good = created(LocalRepository(tmp_path / "good"))
    meta = take_full_backup(pg.conninfo(), good, cl)
    bad = LocalRepository(tmp_path / "bad")
    shutil.copytree(good.root, bad.root)
    key = f"{backup_prefix(cl, meta['backup_id'])}/base.tar.zst"
    _flip(bad, key)

    os.environ["AIRFLOW_CONN_PGINCR_VERIFY_CATALOG"] = conn_json(pg.conninfo(), "pgincr_catalog")
    dags_dir = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    specs = [{"dag_id": f"pgincr_it_verify_{name}", "cluster": cl, "repository": str(r.root),
              "schema": catalog.schema, "backup_id": meta["backup_id"]} for name, r in (("good", good), ("bad", bad))]
    try:
        dr, states = _run_dag(dags_dir, specs, "pgincr_it_verify_bad")
        assert dr.state == "failed" and states == {"full_backup": "success", "verify": "failed"}
        row = catalog.last_verification(cl, meta["backup_id"])
        assert row["ok"] is False and key in row["error"]
        assert (row["dag_id"], row["run_id"]) == ("pgincr_it_verify_bad", dr.run_id)
        logged = "".join(capfd.readouterr())
        assert f"verification of cluster '{cl}' FAILED" in logged and key in logged

        dr, _ = _run_dag(dags_dir, specs, "pgincr_it_verify_good")
        assert dr.state == "success"
        row = catalog.last_verification(cl, meta["backup_id"])
        assert row["ok"] is True and (row["dag_id"], row["run_id"]) == ("pgincr_it_verify_good", dr.run_id)
    finally:
        (dags_dir / DAG_FILE).unlink(missing_ok=True)
        (dags_dir / PARAMS_FILE).unlink(missing_ok=True)
        os.environ.pop("AIRFLOW_CONN_PGINCR_VERIFY_CATALOG", None)


def test_operator_in_airflow_fails_on_a_damaged_wal_segment(airflow_db, pg, tmp_path, catalog, capfd):

    from tests.conftest import conn_json

    cl = _cluster("vafw")
    repo = created(LocalRepository(tmp_path / "repo"))
    with _slot(pg, cl):
        capture_wal_pull(pg.conninfo(), repo, cl)
        meta = take_full_backup(pg.conninfo(), repo, cl)
        _capture(pg, repo, cl)
    victim = meta["stop_wal_file"]
    _flip(repo, wal_key(cl, victim))

    os.environ["AIRFLOW_CONN_PGINCR_VERIFY_CATALOG"] = conn_json(pg.conninfo(), "pgincr_catalog")
    dags_dir = Path(os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    spec = {"dag_id": "pgincr_it_verify_wal", "cluster": cl, "repository": str(repo.root), "schema": catalog.schema,
            "backup_id": meta["backup_id"], "check_wal": True}
    try:
        dr, states = _run_dag(dags_dir, [spec], "pgincr_it_verify_wal")
        assert dr.state == "failed" and states == {"full_backup": "success", "verify": "failed"}
        row = catalog.last_verification(cl, meta["backup_id"])
        assert row["ok"] is False and "wal_objects" in row["error"] and victim in row["error"]
        logged = "".join(capfd.readouterr())
        assert f"verification of cluster '{cl}' FAILED" in logged and "wal_objects check: backup" in logged
    finally:
        (dags_dir / DAG_FILE).unlink(missing_ok=True)
        (dags_dir / PARAMS_FILE).unlink(missing_ok=True)
        os.environ.pop("AIRFLOW_CONN_PGINCR_VERIFY_CATALOG", None)
