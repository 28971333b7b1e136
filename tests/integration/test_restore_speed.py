"""Restores on real PostgreSQL 18 are durable when they return (no page of a restored file left
unwritten: cachestat(2); the flush seen under strace, after the last writer exited), the verification
after extraction still refuses a backup whose manifest disagrees with its files, and every restore
reports its RTO split (plan, extract, combine, verify, sync, replay): in the report, in the XCom of
real restore-test and on-demand restore DAG runs, and in the catalog (migration 5)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path

import pytest
import zstandard

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.codec import CompressingReader
from airflow_pg_incremental.core.errors import RestoreError
from airflow_pg_incremental.core.metadata import backup_prefix, load_backup, write_meta
from airflow_pg_incremental.core.repository import LocalRepository
from airflow_pg_incremental.core.restore import restore_backup, start_restored
from airflow_pg_incremental.sandbox import data_fingerprint
from tests.conftest import created
from tests.restore_evidence import RESTORE_STEPS, assert_split, cachestat_supported, not_on_disk

pytestmark = pytest.mark.integration

needs_cachestat = pytest.mark.skipif(not cachestat_supported(), reason="cachestat(2) needs Linux 6.5+")


@needs_cachestat
def test_a_restored_full_is_on_disk_when_restore_returns(pg, repo, scratch):
    """Before: GNU tar's files sat in the page cache, dirty, when restore_backup returned (the
    kernel writes them back up to 30 s later): a power cut then undid a 'successful' restore."""
    meta = take_full_backup(pg.conninfo(), repo, "dur")
    fp = data_fingerprint(pg.superuser())
    res = restore_backup(repo, "dur", meta["backup_id"], scratch / "d", os_user=pg.os_user)
    assert not_on_disk(scratch / "d") == {}
    assert res["durable"] is True
    assert_split(res["timings"], res["restore_seconds"], {"extract", "verify", "sync"}, RESTORE_STEPS)
    srv = start_restored(scratch / "d", 18, os_user=pg.os_user)
    try:
        assert data_fingerprint(srv.local_conninfo()) == fp
        # flushed already: PostgreSQL's start-up pass over the copy is one syncfs, not an fsync per file
        assert srv.psql("SHOW recovery_init_sync_method").strip() == "syncfs"
    finally:
        srv.stop()


def _strace_restore(repo_root: Path, cluster: str, backup_id: str, target: Path, log: Path) -> None:
    r = subprocess.run(["strace", "-f", "-qq", "-o", str(log), "-e", "trace=syncfs,fsync,fdatasync,sync,exit_group",
                        sys.executable, "-m", "airflow_pg_incremental.cli", "restore", "--repo", str(repo_root),
                        "--cluster", cluster, "--backup-id", backup_id, "--target-dir", str(target)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_pgincr_restore_flushes_after_every_writer_exited(pg, tmp_path, scratch):
    """Under strace: `pgincr restore` (the command the issue measured with 0 fsync calls) flushes
    the target's filesystem with syncfs, successfully, after tar and pg_verifybackup exited."""
    repo = created(LocalRepository(tmp_path / "repo"))
    meta = take_full_backup(pg.conninfo(), repo, "st")
    log = tmp_path / "strace.log"
    _strace_restore(repo.root, "st", meta["backup_id"], scratch / "d", log)
    lines = log.read_text().splitlines()
    main = [ln for ln in lines if "exit_group(" in ln][-1].split()[0]  # the CLI's own process exits last
    children_exits = [i for i, ln in enumerate(lines) if "exit_group(" in ln and ln.split()[0] != main]
    flushes = [i for i, ln in enumerate(lines) if ln.split()[0] == main and "syncfs(" in ln and ln.endswith("= 0")]
    assert children_exits and flushes, "\n".join(lines[-30:])
    assert flushes[-1] > children_exits[-1], "\n".join(lines[-30:])


def _retar_without(repo: LocalRepository, cluster: str, backup_id: str, drop: str) -> None:
    """Rewrite a backup's base.tar.zst without member `drop`, with consistent stored checksums and
    metadata: only pg_verifybackup (the manifest still lists the file) can tell."""
    meta = load_backup(repo, cluster, backup_id)
    obj = Path(repo.root) / backup_prefix(cluster, backup_id) / "base.tar.zst"
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(obj.read_bytes())).read()
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as src, tarfile.open(fileobj=out, mode="w:",
                                                                                format=tarfile.GNU_FORMAT) as dst:
        for m in src:
            if m.name != drop:
                dst.addfile(m, src.extractfile(m) if m.isfile() else None)
    key = f"{backup_prefix(cluster, backup_id)}/base.tar.zst"
    reader = CompressingReader(io.BytesIO(out.getvalue()))
    repo.put(key, reader)
    info = reader.info(key).to_dict()
    meta["objects"] = [info if o["key"] == key else o for o in meta["objects"]]
    write_meta(repo, meta)


def test_verification_after_extraction_still_refuses_a_file_missing_from_the_manifest(pg, tmp_path, scratch):
    """The stream checksums prove the tar; pg_verifybackup (without re-reading checksums) still
    checks the tar against backup_manifest: a file it lists that the tar lacks is refused."""
    repo = created(LocalRepository(tmp_path / "repo"))
    meta = take_full_backup(pg.conninfo(), repo, "vb")
    _retar_without(repo, "vb", meta["backup_id"], "global/pg_control")
    with pytest.raises(RestoreError, match="pg_verifybackup.*pg_control"):
        restore_backup(repo, "vb", meta["backup_id"], scratch / "d")
    assert not (scratch / "d").exists()


def test_catalog_migration_5_keeps_rows_and_stores_the_split(catalog):
    """An existing catalog (schema version 4, with a restore test recorded) gains the timings
    column; the old row stays, a new one keeps its split."""
    from airflow_pg_incremental.core import catalog as cat_mod

    old = cat_mod.Catalog(catalog.conn, catalog.schema)
    real = cat_mod.MIGRATIONS
    try:
        cat_mod.MIGRATIONS = real[:4]
        old.record_restore_test(cluster="c", ok=True, target_kind="latest", restore_seconds=2.0)
        assert old.schema_version() == 4
    finally:
        cat_mod.MIGRATIONS = real
    new = cat_mod.Catalog(catalog.conn, catalog.schema)
    split = {"plan": 0.1, "extract": 0.5, "verify": 0.05, "sync": 0.02, "replay": 1.1}
    new.record_restore_test(cluster="c", ok=True, target_kind="latest", restore_seconds=1.9, timings=split)
    assert new.schema_version() == len(real) >= 5
    rows = new.restore_tests("c")
    assert [(r["restore_seconds"], r["timings"]) for r in rows] == [(1.9, split), (2.0, None)]


@pytest.mark.slow
def test_rto_split_in_the_restore_dags_xcom_and_catalog(airflow_clusters, pg, scratch):
    """A real restore-test DAG run and a real on-demand restore: both XComs carry the split of the
    restore time, and the catalog's row of the restore test holds it too."""
    from airflow_pg_incremental.core.catalog import Catalog
    from tests.integration.test_airflow import _dags, _xcoms

    dags = _dags()
    assert dags["pgincr_it_local_weekly_full"].test().state == "success"
    pg.psql(f"INSERT INTO it_markers VALUES ({uuid.uuid4().int % 1000000 + 100}, clock_timestamp())")
    assert dags["pgincr_it_local_hourly_wal"].test().state == "success"
    dag = dags["pgincr_it_local_restore_test_on_backup"]
    dr = dag.test()
    assert dr.state == "success"
    out = _xcoms(dag.dag_id, dr.run_id)[("restore_test", "return_value")]
    assert out["ok"]
    required = {"plan", "extract", "verify", "sync", "replay"}
    assert_split(out["timings"], out["restore_seconds"], required)
    assert out["timings"]["replay"] > 0 and out["timings"]["extract"] > 0
    row = [r for r in Catalog(pg.conninfo("pgincr_catalog"), "af_catalog").restore_tests("it_local")
           if r["run_id"] == dr.run_id][0]
    assert row["timings"] == out["timings"] and row["restore_seconds"] == out["restore_seconds"]

    dag = dags["pgincr_restore"]
    dr = dag.test(run_conf={"cluster": "it_local", "target_type": "latest", "target_value": "", "action": "promote",
                            "destination": str(scratch / "od"), "dry_run": False})
    assert dr.state == "success"
    out = _xcoms(dag.dag_id, dr.run_id)[("restore_it_local", "return_value")]
    assert_split(out["timings"], out["restore_seconds"], required)
    json.dumps(out)  # plain JSON
    if cachestat_supported():
        assert not_on_disk(scratch / "od") == {}
