"""Clusters with tablespaces on a real PostgreSQL 18: two tablespaces holding tables; full backup,
workload, incremental; each restores (mapped directories) to exactly the source, PITR to the end
too; a restore without a mapping is refused with nothing touched; in place into emptied original
directories; verify passes and finds a flipped byte in a tablespace object, which restore refuses."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.capture import capture_wal_pull, switch_wal
from airflow_pg_incremental.core.errors import ChecksumMismatch, ConfigError
from airflow_pg_incremental.core.incremental import take_planned_backup
from airflow_pg_incremental.core.metadata import backup_prefix
from airflow_pg_incremental.core.pitr import parse_target, restore_pitr
from airflow_pg_incremental.core.repository import LocalRepository
from airflow_pg_incremental.core.restore import restore_backup, start_restored
from airflow_pg_incremental.core.server import make_user_dir
from airflow_pg_incremental.core.verify import verify_backup
from airflow_pg_incremental.sandbox import SandboxPostgres, data_fingerprint
from tests.conftest import created

pytestmark = pytest.mark.integration
CL = "ts"


@pytest.fixture(scope="module")
def ts(workdir):
    root = workdir / f"tblspc-{uuid.uuid4().hex[:6]}"
    pg = SandboxPostgres(root / "pg").start()
    repo = created(LocalRepository(root / "repo"))
    c = {"pg": pg, "repo": repo, "root": root, "locations": {}}
    try:
        for name in ("ts_one", "ts_two"):
            loc = make_user_dir(root / "spaces" / name, pg.os_user)
            c["locations"][name] = loc
            pg.psql(f"CREATE TABLESPACE {name} LOCATION '{loc}'")
        pg.pgbench_init(1)
        pg.psql("ALTER TABLE pgbench_accounts SET TABLESPACE ts_one; ALTER TABLE pgbench_history SET TABLESPACE ts_two;"
                "CREATE TABLE notes TABLESPACE ts_two AS SELECT g AS id, md5(g::text) AS t FROM generate_series(1, 5000) g")
        capture_wal_pull(pg.conninfo(), repo, CL)
        c["full"] = take_full_backup(pg.conninfo(), repo, CL)
        c["full_fp"] = data_fingerprint(pg.superuser())
        pg.pgbench_run(300)
        pg.psql("INSERT INTO notes SELECT g, 'after the full' FROM generate_series(5001, 6000) g")
        c["inc"] = take_planned_backup(pg.conninfo(), repo, CL, kind="incremental")
        c["inc_fp"] = data_fingerprint(pg.superuser())
        pg.psql("INSERT INTO notes VALUES (7000, 'after the incremental')")
        pg.pgbench_run(100)
        c["end_fp"] = data_fingerprint(pg.superuser())
        capture_wal_pull(pg.conninfo(), repo, CL, upto_lsn=switch_wal(pg.conninfo())["lsn"])
        yield c
    finally:
        pg.stop()


def _mapping(base: Path) -> dict:
    return {"ts_one": str(base / "one"), "ts_two": str(base / "two")}


def _fingerprint_of(target: Path, pg) -> dict:
    srv = start_restored(target, 18, os_user=pg.os_user)
    try:
        return data_fingerprint(srv.local_conninfo("postgres", "postgres"))
    finally:
        srv.stop()


def test_backup_records_tablespaces(ts):
    for m in (ts["full"], ts["inc"]):
        assert sorted(t["name"] for t in m["tablespaces"]) == ["ts_one", "ts_two"]
        names = {o["key"].rsplit("/", 1)[-1] for o in m["objects"]}
        assert {t["object"] for t in m["tablespaces"]} <= names and "base.tar.zst" in names
        assert {t["location"] for t in m["tablespaces"]} == {str(p) for p in ts["locations"].values()}


@pytest.mark.parametrize("which", ["full", "inc"])
def test_restore_with_mapping(ts, scratch, which):
    m = ts[which]
    res = restore_backup(ts["repo"], CL, m["backup_id"], scratch / "d", os_user=ts["pg"].os_user,
                         tablespace_map=_mapping(scratch))
    assert {t["name"]: t["directory"] for t in res["tablespaces"]} == _mapping(scratch)
    for name in ("ts_one", "ts_two"):
        oid = next(t["oid"] for t in m["tablespaces"] if t["name"] == name)
        assert os.readlink(scratch / "d" / "pg_tblspc" / str(oid)) == _mapping(scratch)[name]
        assert any((scratch / name.split("_")[1]).iterdir())
    assert str(scratch) in (scratch / "d" / "tablespace_map").read_text()
    assert _fingerprint_of(scratch / "d", ts["pg"]) == ts[f"{which}_fp"]
    # the source's tablespace directories were not touched by the restored server
    oids = {str(t["oid"]) for t in m["tablespaces"]}
    assert all(os.readlink(scratch / "d" / "pg_tblspc" / o).startswith(str(scratch)) for o in oids)


def test_pitr_to_the_end(ts, scratch):
    rep = restore_pitr(ts["repo"], CL, parse_target("latest", None), scratch / "p", os_user=ts["pg"].os_user,
                       keep_running=True, tablespace_map=_mapping(scratch))
    srv = rep.pop("server")
    try:
        assert data_fingerprint(srv.local_conninfo("postgres", "postgres")) == ts["end_fp"]
    finally:
        srv.stop()


def test_refused_without_mapping_touching_nothing(ts, scratch):
    with pytest.raises(ConfigError) as e:
        restore_backup(ts["repo"], CL, ts["inc"]["backup_id"], scratch / "d", os_user=ts["pg"].os_user)
    msg = str(e.value)
    for name, loc in ts["locations"].items():
        assert name in msg and str(loc) in msg
    assert "--tablespace-map" in msg and "--tablespaces-in-place" in msg
    assert not (scratch / "d").exists()
    with pytest.raises(ConfigError, match="not a tablespace"):
        restore_backup(ts["repo"], CL, ts["inc"]["backup_id"], scratch / "d", tablespace_map={"nope": "/x"})
    (scratch / "busy").mkdir()
    (scratch / "busy" / "f").write_text("x")
    with pytest.raises(ConfigError, match="ts_one"):
        restore_backup(ts["repo"], CL, ts["inc"]["backup_id"], scratch / "d",
                       tablespace_map={"ts_one": str(scratch / "busy"), "ts_two": str(scratch / "two")})
    assert not (scratch / "d").exists() and not (scratch / "two").exists()
    assert (scratch / "busy" / "f").read_text() == "x"


def test_in_place_into_emptied_original_directories(ts, scratch):
    pg = ts["pg"]
    pg.server.stop()
    saved = scratch / "saved"
    try:
        for name, loc in ts["locations"].items():
            shutil.move(str(loc), str(saved / name))
        res = restore_backup(ts["repo"], CL, ts["inc"]["backup_id"], scratch / "d", os_user=pg.os_user,
                             tablespaces_in_place=True)
        assert {t["directory"] for t in res["tablespaces"]} == {str(p) for p in ts["locations"].values()}
        assert _fingerprint_of(scratch / "d", pg) == ts["inc_fp"]
    finally:
        for name, loc in ts["locations"].items():
            shutil.rmtree(loc, ignore_errors=True)
            shutil.move(str(saved / name), str(loc))
        pg.start()


def test_verify_passes_then_finds_a_flipped_byte(ts, workdir, scratch):
    res = verify_backup(ts["repo"], CL, ts["inc"]["backup_id"], only_unverified=False, check_wal=False)
    assert res["failed"] == [] and ts["inc"]["backup_id"] in res["verified"], res
    # a copy of the repository, with one byte of a tablespace object of the full flipped
    bad = workdir / f"tblspc-bad-{uuid.uuid4().hex[:6]}"
    shutil.copytree(ts["repo"].root, bad)
    repo = LocalRepository(bad)
    tsobj = ts["full"]["tablespaces"][0]["object"]
    obj = bad / backup_prefix(CL, ts["full"]["backup_id"]) / tsobj
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.write_bytes(bytes(data))
    res = verify_backup(repo, CL, ts["full"]["backup_id"], only_unverified=False, check_wal=False)
    assert [f["backup_id"] for f in res["failed"]] == [ts["full"]["backup_id"]]
    assert tsobj in str(res["failed"])
    with pytest.raises(Exception) as e:
        restore_backup(repo, CL, ts["inc"]["backup_id"], scratch / "d", tablespace_map=_mapping(scratch))
    assert isinstance(e.value, ChecksumMismatch) or tsobj in str(e.value)
    assert not (scratch / "d").exists() and not (scratch / "one").exists() and not (scratch / "two").exists()


def test_restore_test_puts_tablespaces_in_its_scratch(ts, scratch):
    from airflow_pg_incremental.core.restoretest import run_restore_test

    before = {n: sorted(os.listdir(loc)) for n, loc in ts["locations"].items()}
    rec = run_restore_test(ts["repo"], CL, scratch_parent=str(scratch), os_user=ts["pg"].os_user, amcheck=False)
    assert rec["ok"], rec
    assert {n: sorted(os.listdir(loc)) for n, loc in ts["locations"].items()} == before
    assert os.listdir(scratch) == []  # scratch (tablespaces included) removed


def test_cli_restore_with_tablespace_map(ts, scratch):
    from airflow_pg_incremental.cli import main

    rc = main(["restore", "--repo", str(ts["repo"].root), "--cluster", CL, "--target-dir", str(scratch / "d"),
               "--tablespace-map", f"ts_one={scratch / 'one'}", "--tablespace-map", f"ts_two={scratch / 'two'}",
               "--os-user", ts["pg"].os_user])
    assert rc == 0
    assert _fingerprint_of(scratch / "d", ts["pg"]) == ts["inc_fp"]


def test_on_demand_restore_operator_takes_the_forms_tablespaces(ts, scratch):
    """The restore DAG's form field, as the operator gets it rendered: without it the backup is
    refused before anything is touched; `name=/dir` pairs restore to the end, matching the source."""
    from airflow_pg_incremental.operators.restore import PgRestoreOperator

    def op(text, dest):
        return PgRestoreOperator(task_id="restore_ts", clusters={CL: {"repository": str(ts["repo"].root)}},
                                 cluster=CL, target_type="latest", destination=str(dest), dry_run="False",
                                 tablespaces=text)

    with pytest.raises(Exception, match="ts_one"):
        op("", scratch / "refused").execute({})
    assert not (scratch / "refused").exists()
    text = ", ".join(f"{k}={v}" for k, v in _mapping(scratch).items())
    out = op(text, scratch / "d").execute({})
    assert out["state"] and out["repository"] == ts["repo"].url
    assert _fingerprint_of(scratch / "d", ts["pg"]) == ts["end_fp"]
