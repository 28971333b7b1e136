"""Full backup -> restore round trips on real PostgreSQL 18, into a local directory and SeaweedFS."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from airflow_pg_incremental.core.repository import MARKER_KEY

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.errors import (
    BackupFailed,
    BackupNotFound,
    ChecksumMismatch,
    ConfigError,
    InvalidName,
    RepositoryError,
)
from airflow_pg_incremental.core.metadata import (
    INPROGRESS_NAME,
    backup_prefix,
    cleanup_abandoned_writes,
    cleanup_incomplete,
    find_incomplete,
    list_backups,
    load_backup,
)
from airflow_pg_incremental.core.restore import (
    restore_backup,
    run_checks,
    start_restored,
)
from airflow_pg_incremental.sandbox import data_fingerprint
from tests.conftest import created

pytestmark = pytest.mark.integration


def test_round_trip_restores_exactly_the_backup_point(pg, repo, catalog, scratch):
    before = data_fingerprint(pg.superuser())
    assert before["public.pgbench_accounts"]["rows"] == 100000 and before["public.random_bytes"]["rows"] == 1000

    meta = take_full_backup(pg.conninfo(), repo, "rt", catalog=catalog)
    # change the source afterwards: the restore must give the backup point, not "now"
    pg.psql("INSERT INTO random_bytes (payload, note) VALUES ('\\xdead', 'after'); "
            "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid <= 100;")
    try:
        assert meta["status"] == "complete" and meta["kind"] == "full" and meta["parent_id"] is None
        assert meta["timeline"] == 1 and meta["pg_major"] == 18
        assert meta["start_lsn"] and meta["stop_lsn"] and meta["system_identifier"]
        assert 0 < meta["stored_bytes"] < meta["raw_bytes"]
        assert [b["backup_id"] for b in list_backups(repo, "rt")] == [meta["backup_id"]]
        row = catalog.backups("rt")[0]
        assert row["status"] == "complete" and row["stop_lsn"] == meta["stop_lsn"]
        assert row["raw_bytes"] == meta["raw_bytes"] and row["parent_id"] is None

        res = restore_backup(repo, "rt", meta["backup_id"], scratch / "data", os_user=pg.os_user)
        assert res["verified"] is True
        srv = start_restored(scratch / "data", 18, os_user=pg.os_user)
        try:
            got = data_fingerprint(srv.local_conninfo())
            checks = run_checks(srv, ["SELECT count(*) FROM pgbench_accounts", "SHOW archive_mode"])
        finally:
            srv.stop()
        assert got == before
        assert got != data_fingerprint(pg.superuser())
        assert checks[0]["rows"] == [["100000"]] and checks[1]["rows"] == [["off"]]
    finally:
        pg.psql("DELETE FROM random_bytes WHERE note = 'after'; "
                "UPDATE pgbench_accounts SET abalance = abalance - 1 WHERE aid <= 100;")


def test_restore_latest_and_unknown_id(pg, repo, scratch):
    m1 = take_full_backup(pg.conninfo(), repo, "two")
    m2 = take_full_backup(pg.conninfo(), repo, "two")
    assert m1["backup_id"] < m2["backup_id"]
    res = restore_backup(repo, "two", "latest", scratch / "latest", verify=False)
    assert res["backup_id"] == m2["backup_id"]
    with pytest.raises(BackupNotFound) as e:
        restore_backup(repo, "two", "20990101T000000Z-F", scratch / "nope")
    assert m1["backup_id"] in str(e.value)  # names the known backups
    assert not (scratch / "nope").exists()


def test_restore_refuses_non_empty_target_and_touches_nothing(pg, repo, scratch):
    take_full_backup(pg.conninfo(), repo, "ne")
    target = scratch / "busy"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        restore_backup(repo, "ne", "latest", target)
    assert [p.name for p in target.iterdir()] == ["precious.txt"]
    assert (target / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("bad", ["../etc", "a/b", "..", "x\ny", "", "a" * 64])
def test_bad_names_rejected_before_any_io(pg, repo, scratch, bad):
    with pytest.raises(InvalidName):
        take_full_backup(pg.conninfo(), repo, bad)
    with pytest.raises(InvalidName):
        restore_backup(repo, "ok", bad, scratch / "x")
    assert repo.list("") == [MARKER_KEY]  # nothing but the repository's marker
    assert not (scratch / "x").exists()


def test_corrupt_object_is_refused_and_restore_cleans_up(pg, tmp_path, scratch):
    from airflow_pg_incremental.core.repository import LocalRepository

    repo = created(LocalRepository(tmp_path / "repo"))
    meta = take_full_backup(pg.conninfo(), repo, "bad")
    obj = Path(repo.root) / backup_prefix("bad", meta["backup_id"]) / "base.tar.zst"
    data = bytearray(obj.read_bytes())
    data[len(data) // 2] ^= 0xFF
    obj.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch) as e:
        restore_backup(repo, "bad", meta["backup_id"], scratch / "c")
    assert "base.tar.zst" in str(e.value)
    assert not (scratch / "c").exists()


class _FailingRepo:
    """Wraps a repository; the put of the base tar fails after `fail_after` bytes (a crash/outage)."""

    def __init__(self, inner, fail_after=3 * 1024 * 1024):
        self._inner = inner
        self.fail_after = fail_after

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def put(self, key, src, **kw):
        if not key.endswith("base.tar.zst"):
            return self._inner.put(key, src, **kw)
        outer = self

        class R(io.RawIOBase):
            n = 0

            def read(self, size=-1):
                d = src.read(size)
                R.n += len(d)
                if R.n > outer.fail_after:
                    raise OSError(5, "simulated I/O error")
                return d

        return self._inner.put(key, R(), **kw)


def test_interrupted_backup_is_never_listed_and_is_cleaned_up(pg, repo, catalog):
    failing = _FailingRepo(repo, fail_after=200_000)
    with pytest.raises(BackupFailed):
        take_full_backup(pg.conninfo(), failing, "intr", catalog=catalog)
    assert list_backups(repo, "intr") == []
    rows = catalog.backups("intr")
    assert len(rows) == 1 and rows[0]["status"] == "failed" and "simulated" in rows[0]["error"]
    # the failed backup's partial objects were discarded
    assert find_incomplete(repo, "intr") == []

    # a crash (process killed) leaves objects behind without backup.json: simulate that state
    good = take_full_backup(pg.conninfo(), repo, "intr")
    crashed = "20200101T000000Z-F"
    repo.put_bytes(f"intr/backups/{crashed}/{INPROGRESS_NAME}",
                   json.dumps({"started_at": "2020-01-01T00:00:00+00:00"}).encode())
    repo.put_bytes(f"intr/backups/{crashed}/base.tar.zst", b"partial")
    young = "20991231T000000Z-F"  # a backup still running right now must not be removed
    from airflow_pg_incremental.core.metadata import iso, utcnow

    repo.put_bytes(f"intr/backups/{young}/{INPROGRESS_NAME}", json.dumps({"started_at": iso(utcnow())}).encode())
    assert [b["backup_id"] for b in list_backups(repo, "intr")] == [good["backup_id"]]
    with pytest.raises(BackupNotFound):
        load_backup(repo, "intr", crashed)
    assert cleanup_incomplete(repo, "intr", older_than_s=3600, dry_run=True) == [crashed]
    assert repo.exists(f"intr/backups/{crashed}/base.tar.zst")
    assert cleanup_incomplete(repo, "intr", older_than_s=3600) == [crashed]
    assert repo.list(f"intr/backups/{crashed}") == []
    assert repo.exists(f"intr/backups/{young}/{INPROGRESS_NAME}")
    assert load_backup(repo, "intr", good["backup_id"])["status"] == "complete"


# a full backup of cluster 'killed' into the repository argv[3] (a path or s3:// URL), slowed down so
# that a test can kill it while it streams
SLOW_BACKUP = ("import sys, time; from airflow_pg_incremental.core import backup as b;"
               "from airflow_pg_incremental.core.repository import open_repository;"
               "from airflow_pg_incremental.core.pgconn import ConnInfo;"
               "import airflow_pg_incremental.core.codec as c; orig = c.HashingReader.read\n"
               "def slow(self, n=-1):\n d = orig(self, n); time.sleep(0.05); return d\n"
               "c.HashingReader.read = slow\n"
               "ci = ConnInfo(host='127.0.0.1', port=int(sys.argv[1]), user=sys.argv[2], dbname='postgres',"
               " password=__import__('os').environ['PGPASSWORD'])\n"
               "b.take_full_backup(ci, open_repository(sys.argv[3]), 'killed')\n")


def test_backup_killed_midway_leaves_no_restorable_backup(pg, tmp_path):
    """A real crash: SIGKILL the process running the backup while it streams."""
    import signal
    import sys
    import time

    from airflow_pg_incremental.core.repository import LocalRepository

    root = tmp_path / "repo"
    created(LocalRepository(root))
    code = SLOW_BACKUP
    ci = pg.conninfo()
    p = subprocess.Popen([sys.executable, "-c", code, str(ci.port), ci.user, str(root)],
                         env={**os.environ, "PGPASSWORD": ci.password})
    deadline = time.time() + 30
    while time.time() < deadline and not list(root.glob("killed/backups/*/.base.tar.zst.tmp-*")):
        time.sleep(0.05)
    time.sleep(0.3)
    p.send_signal(signal.SIGKILL)
    p.wait()
    repo = LocalRepository(root)
    assert list_backups(repo, "killed") == []
    inc = find_incomplete(repo, "killed")
    assert len(inc) == 1
    # the stream's temp file is invisible to listings, but cleanup finds it (after 6 h by default)
    tmp = list(root.glob("killed/backups/*/.base.tar.zst.tmp-*"))
    assert len(tmp) == 1
    assert cleanup_abandoned_writes(repo, "killed") == []  # too recent: maybe still being written
    assert [w["kind"] for w in cleanup_abandoned_writes(repo, "killed", older_than_s=0)] == ["temp file"]
    assert not tmp[0].exists()
    assert cleanup_incomplete(repo, "killed", older_than_s=0) == [inc[0]["backup_id"]]
    assert repo.list("killed") == []
    assert not any(root.rglob(".*.tmp-*"))


@pytest.mark.slow
def test_s3_backup_killed_midway_leaves_an_upload_that_cleanup_aborts(pg, s3):
    """A real crash into S3: SIGKILL while the base stream is a multipart upload (parts of 16 MiB:
    random data makes it that large). Nothing is listed as restorable; `info` shows the unfinished
    upload; `pgincr cleanup` aborts it, so its parts stop costing storage."""
    import signal
    import sys
    import time
    import uuid

    from airflow_pg_incremental.core.repository import S3Repository

    prefix = "killed-" + uuid.uuid4().hex[:6]
    repo = created(S3Repository(s3.client(), s3.bucket, prefix))
    pg.psql("CREATE TABLE kill_random AS SELECT g, decode(string_agg(md5(random()::text || g || b), ''), 'hex') AS p "
            "FROM generate_series(1, 2400) g, generate_series(1, 800) b GROUP BY g")  # ~30 MB, incompressible
    code = SLOW_BACKUP
    ci = pg.conninfo()
    client = s3.client()
    try:
        p = subprocess.Popen([sys.executable, "-c", code, str(ci.port), ci.user, repo.url],
                             env={**os.environ, **s3.env(), "PGPASSWORD": ci.password})
        deadline = time.time() + 60
        while time.time() < deadline and not client.list_multipart_uploads(
                Bucket=s3.bucket, Prefix=prefix + "/").get("Uploads"):
            time.sleep(0.1)
        time.sleep(0.5)
        p.send_signal(signal.SIGKILL)
        p.wait()
    finally:
        pg.psql("DROP TABLE kill_random")
    uploads = client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix + "/").get("Uploads")
    assert uploads and uploads[0]["Key"].endswith("/base.tar.zst"), "the kill came before the multipart upload"
    assert list_backups(repo, "killed") == []
    env = {**s3.env()}
    r = subprocess.run([sys.executable, "-m", "airflow_pg_incremental.cli", "info", "--repo", repo.url, "--cluster",
                        "killed"], capture_output=True, text=True, env={**os.environ, **env})
    assert r.returncode == 0 and "unfinished writes" in r.stdout and "incomplete" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "airflow_pg_incremental.cli", "cleanup", "--repo", repo.url, "--cluster",
                        "killed", "--older-than-hours", "0", "--json"], capture_output=True, text=True,
                       env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["removed"]) == 1 and [w["kind"] for w in out["unfinished_writes"]] == ["multipart upload"]
    assert not client.list_multipart_uploads(Bucket=s3.bucket, Prefix=prefix + "/").get("Uploads")
    assert repo.list("killed") == []


def test_full_disk_gives_clear_error_and_publishes_nothing(pg, tmp_path):
    from airflow_pg_incremental.core.repository import LocalRepository

    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.decode().strip()}")
    try:
        repo = created(LocalRepository(mnt))
        with pytest.raises(RepositoryError, match="disk full"):
            take_full_backup(pg.conninfo(), repo, "full")
        assert list_backups(repo, "full") == []
        assert not any(p.name.startswith(".") and ".tmp-" in p.name for p in mnt.rglob("*"))
    finally:
        subprocess.run(["umount", str(mnt)])
