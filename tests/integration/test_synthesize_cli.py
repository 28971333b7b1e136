"""`pgincr synthesize` on a real PostgreSQL 18 chain in a fresh repository: --dry-run writes
nothing, the synthetic full restores to the data at the backup it stands for, --json has the
fields the docs name, a second run has nothing to do, and every refusal (bad names, unknown id,
unknown cluster, missing repository, a broken chain, PostgreSQL < 17) exits 2 with the fix and
changes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.incremental import take_planned_backup
from airflow_pg_incremental.core.metadata import list_backups, write_meta
from airflow_pg_incremental.core.repository import LocalRepository
from airflow_pg_incremental.core.restore import restore_backup, start_restored
from airflow_pg_incremental.sandbox import data_fingerprint
from tests.conftest import created

pytestmark = pytest.mark.integration

CL = "syn"


def pgincr(*args):
    return subprocess.run([sys.executable, "-m", "airflow_pg_incremental.cli", *args], capture_output=True, text=True,
                          env=dict(os.environ))


def _snapshot(root) -> dict:
    """Every file under the repository with its size and mtime: 'nothing changed' is checkable."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def chain(pg, workdir):
    """full -> incremental -> incremental of the session's server, in a fresh local repository."""
    root = workdir / f"syn-repo-{uuid.uuid4().hex[:6]}"
    repo = created(LocalRepository(root))
    full = take_full_backup(pg.conninfo(), repo, CL)
    pg.pgbench_run(200)
    i1 = take_planned_backup(pg.conninfo(), repo, CL)
    pg.pgbench_run(200)
    i2 = take_planned_backup(pg.conninfo(), repo, CL)
    assert [full["kind"], i1["kind"], i2["kind"]] == ["full", "incremental", "incremental"]
    return {"repo": repo, "root": root, "ids": [full["backup_id"], i1["backup_id"], i2["backup_id"]],
            "at_i2": data_fingerprint(pg.superuser())}


def test_dry_run_then_synthesize_then_nothing_to_do(chain, pg, scratch):
    root, ids = chain["root"], chain["ids"]
    before = _snapshot(root)
    r = pgincr("synthesize", "--repo", str(root), "--cluster", CL, "--dry-run", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads(r.stdout)
    assert plan["dry_run"] is True and plan["chain"] == ids and plan["stands_for"] == ids[-1] and plan["skip"] is None
    r = pgincr("synthesize", "--repo", str(root), "--cluster", CL, "--dry-run")
    assert r.returncode == 0 and " -> ".join(ids) in r.stdout and "nothing written" in r.stdout
    assert _snapshot(root) == before  # a dry run writes nothing

    r = pgincr("synthesize", "--repo", str(root), "--cluster", CL, "--json", "--compression-level", "5")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["kind"] == "synthetic" and out["status"] == "complete" and out["backup_id"].endswith("-S")
    assert out["stands_for"] == ids[-1] and out["built_from"] == ids
    i2 = [b for b in list_backups(chain["repo"], CL) if b["backup_id"] == ids[-1]][0]
    assert (out["start_lsn"], out["stop_lsn"], out["finished_at"]) == (i2["start_lsn"], i2["stop_lsn"],
                                                                       i2["finished_at"])
    assert out["raw_bytes"] > out["stored_bytes"] > 0 and out["duration_s"] > 0 and out["timings"]
    assert len(r.stdout) < 3000  # the small summary, not the whole metadata

    # it restores alone to the data at the backup it stands for
    rep = restore_backup(chain["repo"], CL, out["backup_id"], scratch / "s", os_user=pg.os_user)
    assert rep["chain"] == [out["backup_id"]]
    srv = start_restored(scratch / "s", 18, os_user=pg.os_user)
    try:
        assert data_fingerprint(srv.local_conninfo()) == chain["at_i2"]
    finally:
        srv.stop()

    # nothing more to combine: said, exit 0, nothing written
    before = _snapshot(root)
    r = pgincr("synthesize", "--repo", str(root), "--cluster", CL)
    assert r.returncode == 0 and "nothing to synthesize" in r.stdout and out["backup_id"] in r.stdout, r.stdout
    r = pgincr("synthesize", "--repo", str(root), "--cluster", CL, "--upto", ids[0], "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["kind"] == "none", r.stdout
    assert _snapshot(root) == before


def test_human_summary(chain, pg):
    """The default output: what it combined, what it stands for, sizes and time (on a new incremental)."""
    pg.pgbench_run(100)
    i3 = take_planned_backup(pg.conninfo(), chain["repo"], CL)
    r = pgincr("synthesize", "--repo", str(chain["root"]), "--cluster", CL, "--upto", i3["backup_id"])
    assert r.returncode == 0, r.stderr[-3000:]
    first = r.stdout.splitlines()[0]
    assert first.startswith("synthetic full ") and "complete: combined " in first, r.stdout
    # the previous synthetic full stands in for the prefix: only it and the new incremental are combined
    assert first.split("combined ")[1].split(" on this")[0].split(" -> ")[-1] == i3["backup_id"]
    assert first.split("combined ")[1].split(" -> ")[0].endswith("-S")
    assert f"stands for {i3['backup_id']}" in r.stdout and "stored" in r.stdout and " s" in r.stdout


def _fake(repo, cluster, bid, kind, parent=None, major=18):
    write_meta(repo, {"format": 1, "cluster": cluster, "backup_id": bid, "kind": kind, "parent_id": parent,
                      "chain_root_id": bid if parent is None else "20260101T000000Z-F", "status": "complete",
                      "pg_major": major, "started_at": bid, "finished_at": "2026-01-01T00:00:00+00:00",
                      "start_lsn": "0/2000028", "stop_lsn": "0/2000100", "timeline": 1, "objects": []})


def test_refusals_exit_2_with_the_fix_and_change_nothing(chain, tmp_path):
    root = chain["root"]
    repo = chain["repo"]
    # a broken chain (its middle backup gone) and a PostgreSQL 16 chain, beside the real one
    _fake(repo, "broken", "20260101T000000Z-F", "full")
    _fake(repo, "broken", "20260103T000000Z-I", "incremental", parent="20260102T000000Z-I")
    _fake(repo, "old", "20260101T000000Z-F", "full", major=16)
    _fake(repo, "old", "20260102T000000Z-I", "incremental", parent="20260101T000000Z-F", major=16)
    before = _snapshot(root)
    missing = tmp_path / "no-repo-here"
    cases = [
        (["--cluster", "../etc"], "path separator"),
        (["--cluster", "a..b"], "'..'"),
        (["--cluster", CL, "--upto", "x/../../y"], "path separator"),
        (["--cluster", CL, "--upto", "20990101T000000Z-I"], "unknown backup id"),
        (["--cluster", "nosuch"], "nosuch"),
        (["--cluster", "broken"], "chain is broken at 20260102T000000Z-I"),
        (["--cluster", "old"], "PostgreSQL 16"),
        (["--cluster", CL, "--compression-level", "40"], "1..22"),
        (["--cluster", CL, "--scratch-dir", str(tmp_path / "nope")], "scratch directory"),
    ]
    for args, says in cases:
        for dry in ([], ["--dry-run"]):
            if "--compression-level" in args or "--scratch-dir" in args:
                if dry:
                    continue
            r = pgincr("synthesize", "--repo", str(root), *args, *dry)
            assert r.returncode == 2, (args, dry, r.stdout, r.stderr[-2000:])
            assert says in r.stderr and r.stdout == "", (args, r.stderr)
    # the fix is named, not only the problem
    r = pgincr("synthesize", "--repo", str(root), "--cluster", "old")
    assert "17+" in r.stderr
    r = pgincr("synthesize", "--repo", str(root), "--cluster", CL, "--upto", "20990101T000000Z-I")
    assert "known backups:" in r.stderr
    assert _snapshot(root) == before
    # a repository is needed, and a missing one is not created
    r = pgincr("synthesize", "--repo", str(missing), "--cluster", CL)
    assert r.returncode == 2 and not missing.exists(), r.stderr
    env_less = subprocess.run([sys.executable, "-m", "airflow_pg_incremental.cli", "synthesize", "--cluster", CL],
                              capture_output=True, text=True,
                              env={k: v for k, v in os.environ.items() if k != "PGINCR_REPO"})
    assert env_less.returncode == 2 and "--repo" in env_less.stderr
