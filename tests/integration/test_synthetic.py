"""Synthetic fulls on real PostgreSQL 18: F -> I1 -> I2, synthesized into S (standing for I2), then
I3 on top of I2. S restores to exactly I2's data, I3 restores over S, PITR starts from S, the chain
survives losing everything S absorbed, and a synthesis that dies leaves nothing visible."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.capture import capture_wal_pull, switch_wal
from airflow_pg_incremental.core.errors import BackupNotFound, ConfigError, InvalidName, RestoreError
from airflow_pg_incremental.core.incremental import plan_backup, take_planned_backup
from airflow_pg_incremental.core.metadata import backup_prefix, find_incomplete, list_backups
from airflow_pg_incremental.core.pitr import parse_target, plan_restore, restore_pitr
from airflow_pg_incremental.core.repository import LocalRepository
from airflow_pg_incremental.core.restore import restore_backup
from airflow_pg_incremental.core.synthetic import plan_synthesis, synthesize
from airflow_pg_incremental.core.verify import verify_backup
from airflow_pg_incremental.sandbox import SandboxPostgres, data_fingerprint
from tests.conftest import created, fresh_repo
from tests.restore_evidence import restored_fingerprint

pytestmark = pytest.mark.integration

CL = "sy"


@pytest.fixture(scope="module", params=["local", "s3"])
def syn(request, workdir):
    pg = SandboxPostgres(workdir / f"syn-{request.param}-{uuid.uuid4().hex[:4]}").start()
    repo = fresh_repo(request, "syn")
    c = {"pg": pg, "repo": repo, "fp": {}}
    try:
        pg.pgbench_init(1)
        capture_wal_pull(pg.conninfo(), repo, CL)
        c["F"] = take_full_backup(pg.conninfo(), repo, CL)
        for name in ("I1", "I2"):
            pg.pgbench_run(400)
            c[name] = take_planned_backup(pg.conninfo(), repo, CL, kind="incremental")
            c["fp"][name] = data_fingerprint(pg.superuser())
        c["S"] = synthesize(repo, CL, "latest", progress_interval=0.5)
        pg.pgbench_run(300)
        c["between_t"] = pg.psql("SELECT clock_timestamp()").strip()
        c["between_fp"] = data_fingerprint(pg.superuser())
        time.sleep(0.2)
        pg.pgbench_run(300)
        c["I3"] = take_planned_backup(pg.conninfo(), repo, CL, kind="incremental")
        c["fp"]["I3"] = data_fingerprint(pg.superuser())
        pg.pgbench_run(100)
        capture_wal_pull(pg.conninfo(), repo, CL, upto_lsn=switch_wal(pg.conninfo())["lsn"])
        yield c
    finally:
        pg.stop()


def _restored_fingerprint(target, pg) -> dict:
    return restored_fingerprint(target, pg.os_user)


def test_synthetic_metadata(syn):
    s, i2 = syn["S"], syn["I2"]
    assert s["kind"] == "synthetic" and s["backup_id"].endswith("-S") and s["parent_id"] is None
    assert s["stands_for"] == i2["backup_id"]
    assert s["built_from"] == [syn["F"]["backup_id"], syn["I1"]["backup_id"], i2["backup_id"]]
    for k in ("start_lsn", "stop_lsn", "timeline", "system_identifier", "finished_at", "pg_major"):
        assert s[k] == i2[k], k
    assert {"extract", "combine", "verify", "store"} <= set(s["timings"])
    # the server full's raw size, not the incrementals': it is a whole cluster
    assert s["raw_bytes"] > syn["I2"]["raw_bytes"] and s["stored_bytes"] > 0
    # the next incremental took the newest real backup as its parent, and records both chains
    i3 = syn["I3"]
    assert i3["parent_id"] == i2["backup_id"] and i3["kind"] == "incremental"
    assert i3["plan"]["chain"] == [syn["F"]["backup_id"], syn["I1"]["backup_id"], i2["backup_id"]]
    assert i3["restore_chain"] == i3["plan"]["restore_chain"] == [s["backup_id"], i3["backup_id"]]
    assert syn["I1"]["restore_chain"] == [syn["F"]["backup_id"], syn["I1"]["backup_id"]]
    # synthesizing again is a no-op that says why
    again = synthesize(syn["repo"], CL, i2["backup_id"])
    assert again["kind"] == "none" and s["backup_id"] in again["reason"]


def test_synthetic_full_restores_to_its_point(syn, scratch):
    res = restore_backup(syn["repo"], CL, syn["S"]["backup_id"], scratch / "s", os_user=syn["pg"].os_user)
    assert res["chain"] == [syn["S"]["backup_id"]]
    assert _restored_fingerprint(scratch / "s", syn["pg"]) == syn["fp"]["I2"]


def test_restoring_the_absorbed_backup_uses_the_synthetic_full(syn, scratch):
    res = restore_backup(syn["repo"], CL, syn["I2"]["backup_id"], scratch / "i2", os_user=syn["pg"].os_user)
    assert res["chain"] == [syn["S"]["backup_id"]] and res["backup_id"] == syn["I2"]["backup_id"]
    assert _restored_fingerprint(scratch / "i2", syn["pg"]) == syn["fp"]["I2"]


def test_later_incremental_restores_over_the_synthetic_full(syn, scratch):
    res = restore_backup(syn["repo"], CL, syn["I3"]["backup_id"], scratch / "i3", os_user=syn["pg"].os_user)
    assert res["chain"] == [syn["S"]["backup_id"], syn["I3"]["backup_id"]]
    assert _restored_fingerprint(scratch / "i3", syn["pg"]) == syn["fp"]["I3"]


def test_pitr_across_the_synthetic_full(syn, scratch):
    target = parse_target("time", syn["between_t"])
    plan = plan_restore(syn["repo"], CL, target)
    assert [b["backup_id"] for b in plan["chain"]] == [syn["S"]["backup_id"]]
    rep = restore_pitr(syn["repo"], CL, target, scratch / "p", os_user=syn["pg"].os_user, keep_running=True)
    srv = rep.pop("server")
    try:
        assert data_fingerprint(srv.local_conninfo()) == syn["between_fp"]
    finally:
        srv.stop()


def test_verify_passes_on_the_synthetic_full(syn, scratch):
    rep = verify_backup(syn["repo"], CL, syn["S"]["backup_id"], staging_parent=scratch)
    assert rep["failed"] == [], rep
    checks = {c["name"]: c["ok"] for c in rep["results"][0]["checks"]}
    assert rep["verified"] == [syn["S"]["backup_id"]]
    assert checks.get("pg_verifybackup") is True and checks.get("objects") is not False


def test_the_chain_survives_losing_what_the_synthetic_full_absorbed(syn, workdir, scratch):
    """F, I1 and I2 deleted (as retention may once S is verified): I3 still restores, over S."""
    if not isinstance(syn["repo"], LocalRepository):
        pytest.skip("mutates a copy of the local repository")
    copy = created(LocalRepository(workdir / f"syn-copy-{uuid.uuid4().hex[:6]}"))
    shutil.rmtree(copy.root)
    shutil.copytree(syn["repo"].root, copy.root)
    for name in ("F", "I1", "I2"):
        shutil.rmtree(copy.root / backup_prefix(CL, syn[name]["backup_id"]))
    res = restore_backup(copy, CL, syn["I3"]["backup_id"], scratch / "i3", os_user=syn["pg"].os_user)
    assert res["chain"] == [syn["S"]["backup_id"], syn["I3"]["backup_id"]]
    assert _restored_fingerprint(scratch / "i3", syn["pg"]) == syn["fp"]["I3"]
    # and without S the break is named
    shutil.rmtree(copy.root / backup_prefix(CL, syn["S"]["backup_id"]))
    with pytest.raises(RestoreError, match=f"broken at {syn['I2']['backup_id']}"):
        restore_backup(copy, CL, syn["I3"]["backup_id"], scratch / "gone")
    assert not (scratch / "gone").exists()


def test_chain_limit_counts_the_restore_chain(syn):
    """F-I1-I2-I3 is 4 parents long, but restores combine S+I3: a limit of 3 still allows one more."""
    p = plan_backup(syn["pg"].conninfo(), syn["repo"], CL, kind="incremental", max_chain_length=3)
    assert p["kind"] == "incremental" and p["parent_id"] == syn["I3"]["backup_id"]
    p = plan_backup(syn["pg"].conninfo(), syn["repo"], CL, kind="incremental", max_chain_length=2)
    assert p["kind"] == "full" and "restored together" in p["reason"]


def test_refusals_touch_nothing(syn):
    repo = syn["repo"]
    before = [b["backup_id"] for b in list_backups(repo, CL)]
    with pytest.raises(InvalidName):
        synthesize(repo, CL, "../etc")
    with pytest.raises(BackupNotFound, match="unknown backup id"):
        synthesize(repo, CL, "20200101T000000Z-I")
    full = synthesize(repo, CL, syn["F"]["backup_id"])
    assert full["kind"] == "none" and "full backup" in full["reason"]
    assert plan_synthesis(repo, CL, syn["I3"]["backup_id"])["chain"] == [syn["S"]["backup_id"], syn["I3"]["backup_id"]]
    assert [b["backup_id"] for b in list_backups(repo, CL)] == before


def test_scratch_too_small_is_refused_up_front(syn, tmp_path, monkeypatch):
    real = os.statvfs

    class Tiny:
        def __init__(self, st):
            self.f_bavail, self.f_frsize = 10, st.f_frsize

    monkeypatch.setattr(os, "statvfs", lambda p: Tiny(real(p)))
    with pytest.raises(ConfigError, match="scratch-dir"):
        synthesize(syn["repo"], CL, syn["I3"]["backup_id"], scratch_dir=tmp_path)
    monkeypatch.undo()
    assert not find_incomplete(syn["repo"], CL)


def test_a_failed_synthesis_leaves_nothing(syn, monkeypatch, tmp_path):
    import airflow_pg_incremental.core.synthetic as synmod

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    before = [b["backup_id"] for b in list_backups(syn["repo"], CL)]
    monkeypatch.setattr(synmod, "_store", broken)
    with pytest.raises(Exception, match="disk on fire"):
        synthesize(syn["repo"], CL, syn["I3"]["backup_id"], scratch_dir=tmp_path)
    assert [b["backup_id"] for b in list_backups(syn["repo"], CL)] == before
    assert not find_incomplete(syn["repo"], CL) and os.listdir(tmp_path) == []


_KILLED_CHILD = """
import sys, time
import airflow_pg_incremental.core.codec as codec
from airflow_pg_incremental.core.repository import open_repository
from airflow_pg_incremental.core.synthetic import synthesize
real = codec.CompressingReader.read
def slow(self, n=-1):
    data = real(self, n)
    if self.raw.size > (1 << 20):
        print("STORING", flush=True)
        time.sleep(60)
    return data
codec.CompressingReader.read = slow
synthesize(open_repository(sys.argv[1]), sys.argv[2], sys.argv[3], scratch_dir=sys.argv[4])
"""


def test_kill_9_mid_synthesis_leaves_nothing_visible(syn, tmp_path):
    """SIGKILL while the synthetic full's tar is being stored: no backup is listed, restores still
    use the real chain, and the debris is what cleanup finds."""
    if not isinstance(syn["repo"], LocalRepository):
        pytest.skip("the kill is the same on S3; the local repository is opened from a URL by the child")
    repo = syn["repo"]
    before = [b["backup_id"] for b in list_backups(repo, CL)]
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, repo.url, CL, syn["I3"]["backup_id"],
                              str(tmp_path)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert child.stdout.readline().strip() == "STORING"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert [b["backup_id"] for b in list_backups(repo, CL)] == before
    left = find_incomplete(repo, CL)
    assert len(left) == 1 and left[0]["backup_id"].endswith("-S")
    plan = plan_synthesis(repo, CL, syn["I3"]["backup_id"])
    assert plan["chain"] == [syn["S"]["backup_id"], syn["I3"]["backup_id"]]
    # its debris goes with the next cleanup; here, by hand, so the module's other tests see a clean repository
    shutil.rmtree(repo.root / backup_prefix(CL, left[0]["backup_id"]))
    for d in tmp_path.iterdir():
        shutil.rmtree(d, ignore_errors=True)


def test_catalog_records_the_synthetic_full(pg, catalog, tmp_path, workdir):
    """A fresh small chain on the session server, recorded in a catalog."""
    repo = created(LocalRepository(workdir / f"syn-cat-{uuid.uuid4().hex[:6]}"))
    take_full_backup(pg.conninfo(), repo, "cat", catalog=catalog)
    pg.psql("CREATE TABLE IF NOT EXISTS syn_cat (i int); INSERT INTO syn_cat VALUES (1)")
    i1 = take_planned_backup(pg.conninfo(), repo, "cat", kind="incremental", catalog=catalog)
    s = synthesize(repo, "cat", "latest", catalog=catalog, scratch_dir=tmp_path)
    rows = {r["backup_id"]: r for r in catalog.backups("cat")}
    assert rows[s["backup_id"]]["kind"] == "synthetic" and rows[s["backup_id"]]["status"] == "complete"
    assert rows[s["backup_id"]]["parent_id"] is None and rows[i1["backup_id"]]["kind"] == "incremental"


def test_verify_of_a_chain_checks_what_its_restore_combines(syn, scratch):
    rep = verify_backup(syn["repo"], CL, syn["I3"]["backup_id"], chain=True, check_wal=False, staging_parent=scratch)
    assert rep["failed"] == [] and rep["verified"] == [syn["S"]["backup_id"], syn["I3"]["backup_id"]]
    chain_check = [c for c in rep["results"][-1]["checks"] if c["name"] == "chain"][0]
    assert chain_check["ok"] and chain_check["detail"].startswith(syn["S"]["backup_id"])
