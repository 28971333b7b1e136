"""The pgincr command line against real servers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def pgincr(*args, env=None):
    return subprocess.run([sys.executable, "-m", "airflow_pg_incremental.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_backup_info_restore_with_check(pg, tmp_path, scratch):
    ci = pg.conninfo()
    repo = str(tmp_path / "repo")
    assert pgincr("repo-create", "--repo", repo).returncode == 0
    r = pgincr("backup", "--repo", repo, "--cluster", "cli", "--host", ci.host, "--port", str(ci.port), "--user",
               ci.user, "--wal-mode", "none", "--json", env={"PGPASSWORD": ci.password})
    assert r.returncode == 0, r.stderr
    assert "point-in-time recovery from it" in r.stderr  # said loudly
    out = json.loads(r.stdout)
    assert out["status"] == "complete"
    assert ci.password not in r.stdout + r.stderr

    r = pgincr("info", "--repo", repo, "--cluster", "cli", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert [b["backup_id"] for b in info["clusters"]["cli"]["backups"]] == [out["backup_id"]]
    r = pgincr("info", "--repo", repo)
    assert r.returncode == 0 and out["backup_id"] in r.stdout

    r = pgincr("restore", "--repo", repo, "--cluster", "cli", "--target-dir", str(scratch / "d"),
               "--check", "SELECT count(*) FROM pgbench_accounts", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["checks"][0]["ok"] and res["checks"][0]["rows"] == [["100000"]]
    # the default output is a short summary, and a failed check says so on stderr (exit 3)
    r = pgincr("restore", "--repo", repo, "--cluster", "cli", "--target-dir", str(scratch / "c"),
               "--check", "SELECT count(*) FROM pgbench_accounts", "--check", "SELECT * FROM no_such_table")
    assert r.returncode == 3
    assert f"restored {out['backup_id']} of cli into {scratch / 'c'}" in r.stdout and "check ok" in r.stdout
    assert "on disk (flushed)" in r.stdout and "time: extract " in r.stdout, r.stdout
    assert "1 check(s) failed on the restored copy (exit 3)" in r.stderr and "no_such_table" in r.stderr

    # restoring again into the same (now non-empty) directory: clear error, exit 2
    r = pgincr("restore", "--repo", repo, "--cluster", "cli", "--target-dir", str(scratch / "d"))
    assert r.returncode == 2 and "not empty" in r.stderr

    r = pgincr("restore", "--repo", repo, "--cluster", "cli", "--backup-id", "../../etc", "--target-dir",
               str(scratch / "e"))
    assert r.returncode == 2 and "backup id" in r.stderr
    assert not (scratch / "e").exists()


def test_wal_push_path_imports_no_airflow():
    """The CLI module must not pull in Airflow (wal-push runs once per WAL segment)."""
    code = "import sys, airflow_pg_incremental.cli; print('airflow' in sys.modules, 'boto3' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.split() == ["False", "False"]


def test_verify_retention_and_info_with_catalog(pg, workdir):
    import uuid

    ci = pg.conninfo()
    repo = str(workdir / f"cli-repo-{uuid.uuid4().hex[:6]}")
    assert pgincr("repo-create", "--repo", repo).returncode == 0
    env = {"PGPASSWORD": ci.password}
    conn = ["--host", ci.host, "--port", str(ci.port), "--user", ci.user, "--catalog-db", "pgincr_catalog",
            "--catalog-schema", "cli_" + uuid.uuid4().hex[:6]]
    for kind in ("full", "incremental"):
        r = pgincr("backup", "--repo", repo, "--cluster", "cv", "--kind", kind, "--wal-mode", "none", *conn, env=env)
        assert r.returncode == 0, r.stderr
        assert f"{kind} backup " in r.stdout and " of cv complete" in r.stdout
    r = pgincr("verify", "--repo", repo, "--cluster", "cv", "--all", "--no-wal", "--json", *conn, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(json.loads(r.stdout)["verified"]) == 2
    r = pgincr("verify", "--repo", repo, "--cluster", "cv", "--all", "--no-wal", "--again", *conn, env=env)
    assert r.returncode == 0 and "2 backup(s) OK, 0 FAILED" in r.stdout, r.stdout + r.stderr[-2000:]
    r = pgincr("retention", "--repo", repo, "--cluster", "cv", "--keep-full-chains", "1", "--json", *conn, env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["dry_run"] is True, r.stderr[-2000:]
    r = pgincr("retention", "--repo", repo, "--cluster", "cv", "--keep-full-chains", "0", *conn, env=env)
    assert r.returncode == 2 and "keep_full_chains" in r.stderr
    r = pgincr("info", "--repo", repo, "--cluster", "cv", "--json", *conn, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout)["clusters"]["cv"]
    assert all(v and v["ok"] for v in info["last_verification"].values())
    assert ci.password not in r.stdout + r.stderr
