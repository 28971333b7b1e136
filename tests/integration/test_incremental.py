"""Incremental chains on real PostgreSQL 18: full -> incremental -> incremental -> differential with
a workload between each; every backup and points between them restore to exactly the source."""

from __future__ import annotations

import shutil
import time
import uuid

import pytest

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.capture import capture_wal_pull, switch_wal
from airflow_pg_incremental.core.errors import RestoreError
from airflow_pg_incremental.core.incremental import plan_backup, take_planned_backup
from airflow_pg_incremental.core.metadata import backup_prefix, list_backups
from airflow_pg_incremental.core.pitr import parse_target, restore_pitr
from airflow_pg_incremental.core.repository import LocalRepository
from airflow_pg_incremental.core.restore import restore_backup, start_restored
from airflow_pg_incremental.sandbox import SandboxPostgres, data_fingerprint
from tests.conftest import created, fresh_repo
from tests.restore_evidence import RESTORE_STEPS, assert_split, cachestat_supported, not_on_disk

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["local", "s3"])
def chain(request, workdir):
    pg = SandboxPostgres(workdir / f"chain-{request.param}").start()
    repo = fresh_repo(request, "chain")
    c = {"pg": pg, "repo": repo, "backups": [], "fp": {}, "between": []}
    try:
        pg.pgbench_init(2)
        pg.psql("CREATE TABLE markers (id int PRIMARY KEY, at timestamptz)")
        capture_wal_pull(pg.conninfo(), repo, "ch")
        m = take_full_backup(pg.conninfo(), repo, "ch")
        c["backups"].append(m)
        c["fp"][m["backup_id"]] = data_fingerprint(pg.superuser())
        for i, kind in enumerate(("incremental", "incremental", "differential"), start=1):
            pg.pgbench_run(600)
            pg.psql(f"INSERT INTO markers VALUES ({i}, clock_timestamp())")
            # a point between backups: after marker i, before the next changes
            t = pg.psql("SELECT clock_timestamp()").strip()
            c["between"].append((t, data_fingerprint(pg.superuser()), c["backups"][-1]["backup_id"]))
            time.sleep(0.2)
            pg.pgbench_run(300)
            m = take_planned_backup(pg.conninfo(), repo, "ch", kind=kind)
            c["backups"].append(m)
            c["fp"][m["backup_id"]] = data_fingerprint(pg.superuser())
        pg.pgbench_run(200)
        capture_wal_pull(pg.conninfo(), repo, "ch", upto_lsn=switch_wal(pg.conninfo())["lsn"])
        yield c
    finally:
        pg.stop()


def test_chain_structure(chain):
    f, i1, i2, d = chain["backups"]
    assert [b["kind"] for b in chain["backups"]] == ["full", "incremental", "incremental", "differential"]
    assert i1["parent_id"] == f["backup_id"] and i2["parent_id"] == i1["backup_id"]
    assert d["parent_id"] == f["backup_id"]  # differential: parent is the chain's full
    assert {b["chain_root_id"] for b in chain["backups"]} == {f["backup_id"]}
    assert [b["chain_length"] for b in chain["backups"]] == [1, 2, 3, 2]
    for b in (i1, i2, d):
        assert b["plan"]["reason"] is None
        assert b["stored_bytes"] < f["stored_bytes"]  # only changed blocks


@pytest.mark.parametrize("idx", [0, 1, 2, 3])
def test_every_backup_restores_exactly(chain, scratch, idx):
    b = chain["backups"][idx]
    pg = chain["pg"]
    res = restore_backup(chain["repo"], "ch", b["backup_id"], scratch / "d", os_user=pg.os_user)
    assert res["chain"] == [chain["backups"][j]["backup_id"] for j in {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 3]}[idx]]
    if cachestat_supported():  # durable when it returns: pg_combinebackup's output (--no-sync) included
        assert not_on_disk(scratch / "d") == {}
    steps = {"extract", "verify", "sync"} | ({"combine"} if idx else set())
    assert_split(res["timings"], res["restore_seconds"], steps, RESTORE_STEPS)
    srv = start_restored(scratch / "d", 18, os_user=pg.os_user)
    try:
        assert data_fingerprint(srv.local_conninfo()) == chain["fp"][b["backup_id"]]
    finally:
        srv.stop()


@pytest.mark.parametrize("idx", [0, 1, 2])
def test_points_between_backups(chain, scratch, idx):
    """PITR picks the newest backup ending before the target (full+incrementals combined) and replays."""
    t, fp, expected_backup = chain["between"][idx]
    rep = restore_pitr(chain["repo"], "ch", parse_target("time", t), scratch / "d", os_user=chain["pg"].os_user,
                       keep_running=True)
    srv = rep.pop("server")
    try:
        assert data_fingerprint(srv.local_conninfo()) == fp
    finally:
        srv.stop()
    assert rep["backup_id"] == expected_backup
    combined = {"combine"} if len(rep["chain"]) > 1 else set()
    assert_split(rep["timings"], rep["restore_seconds"], {"plan", "extract", "verify", "sync", "replay"} | combined)


def test_broken_or_corrupt_middle_backup_is_refused_by_name(chain, workdir, scratch):
    if not isinstance(chain["repo"], LocalRepository):
        pytest.skip("mutates a copy of the local repository")
    copy = LocalRepository(workdir / f"chain-copy-{uuid.uuid4().hex[:6]}")
    shutil.copytree(chain["repo"].root, copy.root)
    f, i1, i2, d = chain["backups"]
    # corrupt: one flipped byte in the middle backup's data
    obj = copy.root / backup_prefix("ch", i1["backup_id"]) / "base.tar.zst"
    data = bytearray(obj.read_bytes())
    data[len(data) // 3] ^= 0x55
    obj.write_bytes(bytes(data))
    with pytest.raises(RestoreError, match=i1["backup_id"]):
        restore_backup(copy, "ch", i2["backup_id"], scratch / "c")
    assert not (scratch / "c").exists() and not list(scratch.glob(".c.pgincr-stage*"))
    # the differential does not depend on it
    restore_backup(copy, "ch", d["backup_id"], scratch / "ok", verify=False)
    # missing: the middle backup's metadata is gone
    (copy.root / backup_prefix("ch", i1["backup_id"]) / "backup.json").unlink()
    with pytest.raises(RestoreError, match=f"broken at {i1['backup_id']}"):
        restore_backup(copy, "ch", i2["backup_id"], scratch / "m")
    assert not (scratch / "m").exists()


def test_preflight_cases_on_a_real_server(chain, workdir):
    pg, repo = chain["pg"], chain["repo"]
    # chain limit: the chain F-I1-I2(-D) has 4 members
    p = plan_backup(pg.conninfo(), repo, "ch", kind="incremental", max_chain_length=3)
    assert p["kind"] == "full" and "reached the limit of 3" in p["reason"]
    assert plan_backup(pg.conninfo(), repo, "ch", kind="incremental")["kind"] == "incremental"
    # summarize_wal switched off (the sandbox sets it on the command line: restart with it off)
    pg.restart({"summarize_wal": "off"})
    try:
        m = take_planned_backup(pg.conninfo(), repo, "ch-off", kind="incremental")
        assert m["kind"] == "full" and "no full backup" in m["plan"]["reason"]
        p = plan_backup(pg.conninfo(), repo, "ch", kind="incremental")
        assert p["kind"] == "full" and "summarize_wal is off" in p["reason"]
    finally:
        pg.restart({"summarize_wal": "on"})
    # another cluster (different system identifier) pointed at this chain
    other = SandboxPostgres(workdir / f"other-{uuid.uuid4().hex[:6]}").start()
    try:
        p = plan_backup(other.conninfo(), repo, "ch", kind="differential")
        assert p["kind"] == "full" and "another cluster" in p["reason"]
    finally:
        other.stop()


def test_summaries_not_covering_the_parent(workdir):
    """A full taken while summarize_wal was off, and its WAL recycled before summarization began:
    the summaries start after the parent's start, so no incremental (PostgreSQL would summarize
    WAL still present in pg_wal, so the WAL has to be gone for this case)."""
    pg = SandboxPostgres(workdir / f"nosum-{uuid.uuid4().hex[:6]}", settings={"summarize_wal": "off"}).start()
    try:
        repo = created(LocalRepository(workdir / f"nosum-repo-{uuid.uuid4().hex[:6]}"))
        take_full_backup(pg.conninfo(), repo, "ns")
        pg.restart({"wal_keep_size": "0", "max_wal_size": "32MB", "min_wal_size": "32MB", "archive_mode": "off"})
        for _ in range(3):
            pg.pgbench_init(1)
            pg.psql("CHECKPOINT")
            pg.psql("SELECT pg_switch_wal()")
        pg.psql("CHECKPOINT")
        # summaries from now on; normal WAL retention again (the next backup uses -X fetch)
        pg.restart({"summarize_wal": "on", "wal_keep_size": "256MB", "max_wal_size": "1GB", "min_wal_size": "80MB"})
        pg.pgbench_init(1)
        time.sleep(1)
        m = take_planned_backup(pg.conninfo(), repo, "ns", kind="incremental")
        assert m["kind"] == "full" and "do not cover the parent" in m["plan"]["reason"]
        assert [b["kind"] for b in list_backups(repo, "ns")] == ["full", "full"]
    finally:
        pg.stop()
