"""A second repository (3-2-1) on the real parts: a cluster's backups and WAL in a local repository
are copied into SeaweedFS S3 (`pgincr copy`); with the first repository damaged, then gone, restores
and PITR come from the copy exactly and say so; a damaged source object is never copied."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.capture import capture_wal_pull, switch_wal
from airflow_pg_incremental.core.copies import copy_cluster, restore_with_fallback
from airflow_pg_incremental.core.errors import ChecksumMismatch, ConfigError
from airflow_pg_incremental.core.incremental import take_planned_backup
from airflow_pg_incremental.core.metadata import backup_prefix, list_backups
from airflow_pg_incremental.core.pitr import parse_target, restore_pitr
from airflow_pg_incremental.core.repository import LocalRepository, S3Repository
from airflow_pg_incremental.core.restore import restore_backup
from airflow_pg_incremental.sandbox import data_fingerprint
from tests.conftest import created
from tests.restore_evidence import restored_fingerprint

pytestmark = pytest.mark.integration

CL = "cp"


def pgincr(*args, env=None):
    return subprocess.run([sys.executable, "-m", "airflow_pg_incremental.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def pair(pg, s3, workdir):
    first = created(LocalRepository(workdir / f"cp-first-{uuid.uuid4().hex[:6]}"))
    prefix = "cp-" + uuid.uuid4().hex[:6]
    copy = created(S3Repository(s3.client(), s3.bucket, prefix))
    slot = f"pgincr_{CL}"
    try:
        capture_wal_pull(pg.conninfo(), first, CL)
        f = take_full_backup(pg.conninfo(), first, CL)
        pg.pgbench_run(200)
        i = take_planned_backup(pg.conninfo(), first, CL, kind="incremental")
        pg.pgbench_run(100)
        end = data_fingerprint(pg.superuser())
        capture_wal_pull(pg.conninfo(), first, CL, upto_lsn=switch_wal(pg.conninfo())["lsn"])
        yield {"first": first, "copy": copy, "copy_url": f"s3://{s3.bucket}/{prefix}", "s3": s3, "F": f, "I": i,
               "end": end, "fp_i": None}
    finally:
        pg.psql(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'")


def _fingerprint(target, pg) -> dict:
    return restored_fingerprint(target, pg.os_user)


def test_copy_brings_everything_then_nothing_more(pair):
    s3env = pair["s3"].env()
    r = pgincr("copy", "--repo", pair["first"].url, "--cluster", CL, "--to", pair["copy_url"], "--json", env=s3env)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["backups_copied"] == [pair["F"]["backup_id"], pair["I"]["backup_id"]] and rep["damaged"] == []
    assert [b["backup_id"] for b in list_backups(pair["copy"], CL)] == rep["backups_copied"]
    assert set(pair["copy"].list(f"{CL}/wal")) == set(pair["first"].list(f"{CL}/wal"))
    assert rep["wal_copied"] == len(pair["first"].list(f"{CL}/wal")) > 0
    again = pgincr("copy", "--repo", pair["first"].url, "--cluster", CL, "--to", pair["copy_url"], env=s3env)
    assert again.returncode == 0 and "0 WAL file(s), 0 backup(s)" in again.stdout
    # the copy verifies on its own
    v = pgincr("verify", "--repo", pair["copy_url"], "--cluster", CL, "--all", "--json", env=s3env)
    assert v.returncode == 0, v.stdout[-2000:] + v.stderr[-2000:]


def test_same_repository_and_missing_copy_are_refused(pair, workdir):
    with pytest.raises(ConfigError, match="same repository"):
        copy_cluster(pair["first"], LocalRepository(pair["first"].root), CL)
    r = pgincr("copy", "--repo", pair["first"].url, "--cluster", CL, "--to", str(workdir / "no-such-repo"))
    assert r.returncode == 2 and "repo-create" in r.stderr
    assert not (workdir / "no-such-repo").exists()


def test_damaged_first_repository_restores_from_the_copy(pair, pg, scratch, workdir):
    """A flipped byte in the first repository's full: its restore fails; with the copy as fallback
    the restore comes from the copy, exactly, and says so."""
    first = created(LocalRepository(workdir / f"cp-dmg-{uuid.uuid4().hex[:6]}"))
    shutil.rmtree(first.root)
    shutil.copytree(pair["first"].root, first.root)
    obj = first.root / backup_prefix(CL, pair["F"]["backup_id"]) / "base.tar.zst"
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x40
    obj.write_bytes(bytes(data))
    with pytest.raises(Exception, match="base.tar.zst"):
        restore_backup(first, CL, pair["I"]["backup_id"], scratch / "bad", os_user=pg.os_user)
    r = pgincr("restore", "--repo", first.url, "--fallback-repo", pair["copy_url"], "--cluster", CL,
               "--backup-id", pair["I"]["backup_id"], "--target-dir", str(scratch / "d"), env=pair["s3"].env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"restored from the copy {pair['copy_url']}: {first.url} failed")
    fp = _fingerprint(scratch / "d", pg)
    shutil.rmtree(scratch / "d")
    r = pgincr("restore", "--repo", pair["copy_url"], "--cluster", CL, "--backup-id", pair["I"]["backup_id"],
               "--target-dir", str(scratch / "d2"), env=pair["s3"].env())
    assert r.returncode == 0 and _fingerprint(scratch / "d2", pg) == fp
    # and copying from the damaged repository copies everything but the damaged backup, then says so
    third = created(LocalRepository(workdir / f"cp-third-{uuid.uuid4().hex[:6]}"))
    with pytest.raises(ChecksumMismatch, match="base.tar.zst.*not copied"):
        copy_cluster(first, third, CL)
    assert [b["backup_id"] for b in list_backups(third, CL)] == [pair["I"]["backup_id"]]  # its parent is missing
    assert not third.exists(f"{backup_prefix(CL, pair['F']['backup_id'])}/base.tar.zst")


def test_first_repository_gone_pitr_from_the_copy(pair, pg, scratch, workdir):
    """The first repository is gone (its directory renamed): PITR to the end of the archive comes
    from the copy, restore_command included, and matches the source."""
    gone = LocalRepository(workdir / f"cp-gone-{uuid.uuid4().hex[:6]}")  # never created
    rep = restore_with_fallback([gone, pair["copy"]], restore_pitr, CL, parse_target("latest"), scratch / "p",
                                os_user=pg.os_user, keep_running=True)
    srv = rep.pop("server")
    try:
        assert data_fingerprint(srv.local_conninfo()) == pair["end"]
    finally:
        srv.stop()
    assert rep["repository"] == pair["copy"].url and rep["fell_back"][0]["repository"] == gone.url
    assert "RepositoryNotFound" in rep["fell_back"][0]["error"]


def test_a_refusal_of_the_request_is_not_retried_on_the_copy(pair, scratch):
    """A bad target is the user's error, not the repository's: no fallback, the refusal stands."""
    with pytest.raises(ConfigError):
        restore_with_fallback([pair["first"], pair["copy"]], restore_backup, CL, pair["F"]["backup_id"],
                              "relative/dir")


@pytest.fixture
def copy_cluster_cfg(airflow_clusters, pg, s3, workdir):
    """A cluster it_cp in the DAG configuration: a local repository and a SeaweedFS copy."""
    from pathlib import Path

    root = workdir / f"af-cp-{uuid.uuid4().hex[:6]}"
    first = created(LocalRepository(root))
    prefix = "af-cp-" + uuid.uuid4().hex[:6]
    copy = created(S3Repository(s3.client(), s3.bucket, prefix))
    cfg_path = Path(os.environ["PGINCR_CONFIG"])
    cfg = json.loads(cfg_path.read_text())
    entry = {"name": "it_cp", "postgres_conn_id": "pgincr_it_pg", "repository": str(root),
             "slot_name": "pgincr_it_cp", "copies": [{"repository": f"s3://{s3.bucket}/{prefix}",
                                                       "aws_conn_id": "pgincr_it_s3"}],
             "retention": {"keep_full_chains": 5, "min_redundancy": 1}}
    cfg["clusters"] = [c for c in cfg["clusters"] if c["name"] != "it_cp"] + [entry]
    cfg_path.write_text(json.dumps(cfg))
    try:
        yield {"first": first, "copy": copy}
    finally:
        cfg["clusters"] = [c for c in cfg["clusters"] if c["name"] != "it_cp"]
        cfg_path.write_text(json.dumps(cfg))
        pg.psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'pgincr_it_cp'")


@pytest.mark.slow
def test_copy_dag_then_on_demand_restore_falls_back_to_the_copy(copy_cluster_cfg, pg, scratch):
    """Airflow: the weekly DAG backs up into the first repository, the copy DAG brings it into the
    copy and verifies it there; with the first repository's full damaged, the on-demand restore DAG
    restores from the copy, exactly, and its XCom says so. Retention runs on each repository."""
    from tests.integration.test_airflow import _dags, _xcoms

    dags = _dags()
    copy_dag = dags["pgincr_it_cp_copy"]
    assert [t.task_id for t in copy_dag.topological_sort()] == ["copy_1", "wal_continuity_copy_1"]
    assert {"plan_copy_1", "apply_copy_1"} <= {t.task_id for t in dags["pgincr_it_cp_retention"].tasks}
    assert dags["pgincr_it_cp_weekly_full"].test().state == "success"
    source = data_fingerprint(pg.superuser())
    dr = copy_dag.test()
    assert dr.state == "success"
    x = _xcoms(copy_dag.dag_id, dr.run_id)
    full = list_backups(copy_cluster_cfg["first"], "it_cp")[0]
    assert x[("copy_1", "return_value")]["backups_copied"] == [full["backup_id"]]
    assert x[("copy_1", "return_value")]["verified"] == [full["backup_id"]]
    assert x[("wal_continuity_copy_1", "return_value")]["ok"]
    assert dags["pgincr_it_cp_retention"].test().state == "success"
    # damage the first repository's full
    obj = copy_cluster_cfg["first"].root / backup_prefix("it_cp", full["backup_id"]) / "base.tar.zst"
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0x40
    obj.write_bytes(bytes(data))
    dag = dags["pgincr_restore"]
    dr = dag.test(run_conf={"cluster": "it_cp", "target_type": "backup", "target_value": full["backup_id"],
                            "action": "promote", "destination": str(scratch / "d"), "dry_run": False})
    assert dr.state == "success"
    out = _xcoms(dag.dag_id, dr.run_id)[("restore_it_cp", "return_value")]
    assert out["repository"] == copy_cluster_cfg["copy"].url and out["fell_back"], out
    assert "base.tar.zst" in out["fell_back"][0]["error"]
    assert _fingerprint(scratch / "d", pg) == source
