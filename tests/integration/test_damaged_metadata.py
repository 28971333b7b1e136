"""A damaged newest backup.json on real backups (PostgreSQL 18, pgincr CLI): 'latest' is never an
older backup in its place. verify (default 'latest') fails naming it, restore refuses (plain and
point-in-time) naming the --backup-id that restores the previous backup, and that one restores."""

from __future__ import annotations

import json
import uuid

import pytest

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.metadata import META_NAME, DamagedBackup, backup_prefix, resolve_backup
from airflow_pg_incremental.core.repository import LocalRepository
from airflow_pg_incremental.core.verify import verify_backup
from tests.conftest import created
from tests.integration.test_cli import pgincr

pytestmark = pytest.mark.integration


def test_damaged_newest_backup_json_is_refused_not_skipped(pg, tmp_path, scratch):
    repo = created(LocalRepository(tmp_path / "repo"))
    cl = f"dmeta_{uuid.uuid4().hex[:8]}"
    older = take_full_backup(pg.conninfo(), repo, cl)["backup_id"]
    pg.pgbench_run(20)
    newer = take_full_backup(pg.conninfo(), repo, cl)["backup_id"]
    key = f"{backup_prefix(cl, newer)}/{META_NAME}"
    raw = bytearray(repo.get_bytes(key))
    raw[len(raw) // 2] ^= 0x01  # one flipped bit
    repo.put_bytes(key, bytes(raw))
    base = ("--repo", str(repo.root), "--cluster", cl)

    # verify, default 'latest': the damaged backup fails, the older one does not stand in for it
    res = verify_backup(repo, cl, "latest", check_wal=False, staging_parent=scratch)
    assert res["verified"] == [] and [(f["backup_id"], f["check"]) for f in res["failed"]] == [(newer, "metadata")]
    r = pgincr("verify", *base, "--no-wal")
    assert r.returncode == 5 and f"FAILED  {newer}: metadata" in r.stdout, r.stdout + r.stderr[-2000:]
    r = pgincr("verify", *base, "--no-wal", "--json")
    assert r.returncode == 5, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert out["verified"] == [] and out["failed"][0]["backup_id"] == newer and key in out["failed"][0]["message"]

    # restore latest (plain, and point-in-time): refused, naming it and the way out
    with pytest.raises(DamagedBackup):
        resolve_backup(repo, cl, "latest")
    for extra in ((), ("--target", "latest")):
        r = pgincr("restore", *base, "--target-dir", str(scratch / "latest"), *extra)
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
        assert f"backup {newer} of cluster '{cl}' cannot be read" in r.stderr
        assert f"--backup-id {older}" in r.stderr
        assert not (scratch / "latest").exists()

    # the way out works: the older backup restores and runs
    r = pgincr("restore", *base, "--backup-id", older, "--target-dir", str(scratch / "older"), "--check",
               "SELECT count(*) FROM pgbench_accounts", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["backup_id"] == older and res["checks"][0]["rows"] == [["100000"]]
