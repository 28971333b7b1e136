"""The edges of the command line, as a user (or a hostile tester) meets them: a missing or wrong
repository or cluster is an error, never an empty answer; the first backup of a new cluster is
usable for point-in-time recovery; credentials files must be private; what a killed process left
is found and removed; the replication slot can never silently fill the primary's disk."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest

from airflow_pg_incremental import walcmd
from airflow_pg_incremental.core.capture import capture_wal_pull
from airflow_pg_incremental.core.errors import SlotRetentionExceeded
from airflow_pg_incremental.core.metadata import claim_backup_id, list_backup_ids
from airflow_pg_incremental.core.preflight import preflight_full
from airflow_pg_incremental.core.repository import LocalRepository, S3Repository
from airflow_pg_incremental.sandbox import SandboxPostgres
from airflow_pg_incremental.core.wal import list_segments
from tests.conftest import created

pytestmark = pytest.mark.integration

WALCMD = [sys.executable, "-S", walcmd.__file__]
SEG_NAME = "000000010000000000000001"


def pgincr(*args, env=None, umask=None):
    return subprocess.run([sys.executable, "-m", "airflow_pg_incremental.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, preexec_fn=(lambda: os.umask(umask)) if umask else None)


def _conn_args(ci):
    return ["--host", ci.host, "--port", str(ci.port), "--user", ci.user]


def _drop_slot(pg, slot):
    pg.psql(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}'")


# -- a repository and a cluster must exist -----------------------------------------------------
def test_missing_or_wrong_repository_or_cluster_is_an_error(pg, workdir, tmp_path):
    missing = str(tmp_path / "nonexistent")
    for cmd in (["info"], ["info", "--cluster", "main"], ["check-wal", "--cluster", "main"],
                ["verify", "--cluster", "main", "--all"], ["cleanup", "--cluster", "main"]):
        r = pgincr(*cmd, "--repo", f"file://{missing}")
        assert r.returncode == 2, (cmd, r.stdout, r.stderr)
        assert "no pgincr repository" in r.stderr and "repo-create" in r.stderr, r.stderr
    assert not Path(missing).exists()

    repo = created(LocalRepository(workdir / f"edge-repo-{uuid.uuid4().hex[:6]}"))
    cluster = "edge" + uuid.uuid4().hex[:6]
    ci = pg.conninfo()
    r = pgincr("backup", "--repo", str(repo.root), "--cluster", cluster, *_conn_args(ci), "--wal-mode", "none",
               env={"PGPASSWORD": ci.password})
    assert r.returncode == 0, r.stderr
    # one level too deep: it names the repository and the cluster meant
    r = pgincr("info", "--repo", str(repo.root / cluster))
    assert r.returncode == 2 and f"did you mean --repo file://{repo.root} --cluster {cluster}" in r.stderr, r.stderr
    # a misspelled cluster lists the known ones
    for cmd in (["info"], ["check-wal"], ["verify"], ["restore", "--target-dir", str(tmp_path / "t")]):
        r = pgincr(*cmd, "--repo", str(repo.root), "--cluster", cluster + "x")
        assert r.returncode == 2 and f"cluster '{cluster}x' does not exist" in r.stderr, (cmd, r.stderr)
        assert f"its clusters: {cluster}" in r.stderr
    assert not (tmp_path / "t").exists()
    # a URL that is neither a path nor s3://
    r = pgincr("info", "--repo", "s3:/bucket/prefix")
    assert r.returncode == 2 and "malformed S3 repository URL" in r.stderr


def test_wal_fetch_says_not_archived_only_when_it_truly_is_not(pg, workdir, tmp_path, s3):
    """exit 1 ends recovery ('not archived'): only for an existing repository and cluster that
    lack the file; a missing repository, bucket prefix or misspelled cluster is 126 (recovery stops)."""
    repo = created(LocalRepository(workdir / f"fetch-repo-{uuid.uuid4().hex[:6]}"))
    repo.put_bytes("main/wal/00000001/000000010000000000000009.zst", b"x")  # the cluster exists

    def fetch(url, cluster, env=None):
        return subprocess.run([*WALCMD, "fetch", "--repo", url, "--cluster", cluster, SEG_NAME,
                               str(tmp_path / "RECOVERYXLOG")], capture_output=True, text=True,
                              env={**os.environ, **(env or {})})

    r = fetch(str(repo.root), "main")
    assert r.returncode == 1 and "is not in the archive" in r.stderr
    r = fetch(str(tmp_path / "no-such-repo"), "main")
    assert r.returncode == 126 and "no pgincr repository" in r.stderr, r.stderr
    r = fetch(str(repo.root), "mian")
    assert r.returncode == 126 and "cluster 'mian' does not exist" in r.stderr, r.stderr
    r = pgincr("wal-fetch", "--repo", str(repo.root), "--cluster", "mian", SEG_NAME, str(tmp_path / "RECOVERYXLOG"))
    assert r.returncode == 126
    s3_repo = created(S3Repository(s3.client(), s3.bucket, "fetch-" + uuid.uuid4().hex[:6]))
    s3_repo.put_bytes("main/wal/00000001/000000010000000000000009.zst", b"x")
    assert fetch(s3_repo.url, "main", s3.env()).returncode == 1
    r = fetch(f"s3://{s3.bucket}/no-such-prefix", "main", s3.env())
    assert r.returncode == 126 and "not a pgincr repository" in r.stderr, r.stderr
    assert not (tmp_path / "RECOVERYXLOG").exists()


def test_wal_push_never_creates_a_repository(tmp_path):
    d = tmp_path / "pgdata"
    (d / "pg_wal" / "archive_status").mkdir(parents=True)
    (d / "pg_wal" / SEG_NAME).write_bytes(os.urandom(16 * 1024 * 1024))
    mistyped = tmp_path / "backups-typo"
    r = subprocess.run([*WALCMD, "push", "--repo", str(mistyped), "--cluster", "main", "--ahead", "0",
                        f"pg_wal/{SEG_NAME}"], cwd=d, capture_output=True, text=True)
    assert r.returncode == 1 and "no pgincr repository" in r.stderr, r.stderr
    assert not mistyped.exists()


# -- the first backup of a new cluster is usable for PITR ------------------------------------
def test_cli_backup_makes_sure_its_wal_will_be_archived(pg, workdir, scratch):
    repo = str(workdir / f"cli-wal-{uuid.uuid4().hex[:6]}")
    assert pgincr("repo-create", "--repo", repo).returncode == 0
    cluster = "firstfull" + uuid.uuid4().hex[:6]
    ci = pg.conninfo()
    env = {"PGPASSWORD": ci.password}
    # nothing set up: refused, nothing written
    r = pgincr("backup", "--repo", repo, "--cluster", cluster, *_conn_args(ci), env=env)
    assert r.returncode == 2 and "no WAL archiving" in r.stderr and "--wal-mode pull" in r.stderr, r.stderr
    assert not (Path(repo) / cluster).exists()
    # push mode while archive_command archives nothing: refused
    r = pgincr("backup", "--repo", repo, "--cluster", cluster, *_conn_args(ci), "--wal-mode", "push", env=env)
    assert r.returncode == 2 and "archives nothing" in r.stderr, r.stderr
    slot = f"pgincr_{cluster}"
    try:
        # the README's order: backup, then capture; the slot is created before the backup
        r = pgincr("backup", "--repo", repo, "--cluster", cluster, *_conn_args(ci), "--wal-mode", "pull", env=env)
        assert r.returncode == 0, r.stderr
        assert f"replication slot {slot}" in r.stdout and "pgincr capture" in r.stdout
        pg.psql("CREATE TABLE IF NOT EXISTS cli_first (v int); INSERT INTO cli_first VALUES (42)")
        r = pgincr("switch", "--repo", repo, "--cluster", cluster, *_conn_args(ci), env=env)
        assert r.returncode == 0, r.stderr
        r = pgincr("capture", "--repo", repo, "--cluster", cluster, *_conn_args(ci), env=env)
        assert r.returncode == 0 and "captured" in r.stdout, r.stderr
        # info shows where the window ends, as a time and an LSN
        r = pgincr("info", "--repo", repo, "--cluster", cluster, "--json")
        w = json.loads(r.stdout)["clusters"][cluster]["wal"]["window"]
        assert w["end_time"] and w["end_lsn"], w
        r = pgincr("info", "--repo", repo, "--cluster", cluster)
        assert f".. {w['end_time']} (LSN {w['end_lsn']})" in r.stdout, r.stdout
        r = pgincr("verify", "--repo", repo, "--cluster", cluster, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        r = pgincr("restore", "--repo", repo, "--cluster", cluster, "--target", "latest", "--target-dir",
                   str(scratch / "first"), "--check", "SELECT count(*) FROM cli_first WHERE v = 42")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "check ok     SELECT count(*) FROM cli_first WHERE v = 42: 1" in r.stdout, r.stdout
    finally:
        _drop_slot(pg, slot)
        pg.psql("DROP TABLE IF EXISTS cli_first")


# -- least privilege ---------------------------------------------------------------------------
def test_local_repository_is_private_whatever_the_umask(pg, workdir):
    repo = str(workdir / f"umask-{uuid.uuid4().hex[:6]}")
    assert pgincr("repo-create", "--repo", repo, umask=0o022).returncode == 0
    ci = pg.conninfo()
    r = pgincr("backup", "--repo", repo, "--cluster", "priv", *_conn_args(ci), "--wal-mode", "none",
               env={"PGPASSWORD": ci.password}, umask=0o022)
    assert r.returncode == 0, r.stderr
    modes = {str(p.relative_to(repo)): stat.S_IMODE(p.stat().st_mode) for p in Path(repo).rglob("*")}
    assert stat.S_IMODE(Path(repo).stat().st_mode) == 0o700
    assert any(k.endswith("base.tar.zst") for k in modes)
    bad = {k: oct(m) for k, m in modes.items() if m != (0o700 if (Path(repo) / k).is_dir() else 0o600)}
    assert bad == {}


def test_env_file_with_credentials_must_be_private(workdir, tmp_path, s3):
    repo = created(S3Repository(s3.client(), s3.bucket, "envfile-" + uuid.uuid4().hex[:6]))
    envf = tmp_path / "main.env"
    envf.write_text("".join(f"{k}={v}\n" for k, v in s3.env().items()))
    os.chmod(envf, 0o644)
    d = tmp_path / "pgdata"
    (d / "pg_wal" / "archive_status").mkdir(parents=True)
    (d / "pg_wal" / SEG_NAME).write_bytes(os.urandom(16 * 1024 * 1024))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and not k.startswith("PGINCR_")}

    def push():
        return subprocess.run([*WALCMD, "push", "--repo", repo.url, "--cluster", "main", "--env-file", str(envf),
                               "--ahead", "0", f"pg_wal/{SEG_NAME}"], cwd=d, capture_output=True, text=True, env=clean)

    r = push()
    assert r.returncode == 1 and f"chmod 600 {envf}" in r.stderr, r.stderr
    assert s3.secret_key not in r.stderr
    r = subprocess.run([*WALCMD, "fetch", "--repo", repo.url, "--cluster", "main", "--env-file", str(envf), SEG_NAME,
                        str(tmp_path / "x")], capture_output=True, text=True, env=clean)
    assert r.returncode == 126 and "chmod 600" in r.stderr
    r = pgincr("wal-commands", "--repo", repo.url, "--cluster", "main", "--env-file", str(envf), env=s3.env())
    assert r.returncode == 2 and "chmod 600" in r.stderr
    os.chmod(envf, 0o600)
    r = push()
    assert r.returncode == 0, r.stderr
    assert list_segments(repo, "main") == {1: [SEG_NAME]}


# -- exclusive backup ids ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_simultaneous_backups_never_share_an_id(kind, workdir, s3):
    import datetime as dt

    repo = (created(LocalRepository(workdir / f"claim-{uuid.uuid4().hex[:6]}")) if kind == "local" else
            created(S3Repository(s3.client(), s3.bucket, "claim-" + uuid.uuid4().hex[:6])))
    now = dt.datetime(2026, 11, 25, 12, 0, 0, tzinfo=dt.timezone.utc)
    got, errors = [], []
    start = threading.Barrier(8)

    def claim():
        r = repo if kind == "local" else S3Repository(s3.client(), s3.bucket, repo.prefix)  # a client per worker
        start.wait()
        try:
            got.append(claim_backup_id(r, "c", "full", {"started_at": now.isoformat()}, now))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(got) == 8 and len(set(got)) == 8, got
    assert sorted(got) == list_backup_ids(repo, "c")


# -- what a killed process left ----------------------------------------------------------------
def test_cleanup_aborts_unfinished_multipart_uploads(s3, workdir):
    repo = created(S3Repository(s3.client(), s3.bucket, "mp-" + uuid.uuid4().hex[:6]))
    repo.put_bytes("main/backups/20261125T000000Z-F/in_progress.json", b"{}")
    c = s3.client()
    key = f"{repo.prefix}/main/backups/20261125T000000Z-F/base.tar.zst"
    up = c.create_multipart_upload(Bucket=s3.bucket, Key=key)  # what a killed backup leaves
    c.upload_part(Bucket=s3.bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=os.urandom(5 << 20))
    env = s3.env()
    r = pgincr("cleanup", "--repo", repo.url, "--cluster", "main", "--older-than-hours", "0", "--dry-run", env=env)
    assert r.returncode == 0 and "would remove 1 unfinished write(s)" in r.stdout, r.stdout + r.stderr
    assert c.list_multipart_uploads(Bucket=s3.bucket, Prefix=repo.prefix + "/").get("Uploads")
    r = pgincr("cleanup", "--repo", repo.url, "--cluster", "main", "--older-than-hours", "0", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["removed"] == ["20261125T000000Z-F"]
    assert [w["kind"] for w in out["unfinished_writes"]] == ["multipart upload"]
    assert out["unfinished_writes"][0]["bytes"] == 5 << 20
    assert not c.list_multipart_uploads(Bucket=s3.bucket, Prefix=repo.prefix + "/").get("Uploads")


# -- the replication slot must never be the reason a primary stops -----------------------------
@pytest.fixture(scope="module")
def slot_server(workdir):
    srv = SandboxPostgres(workdir / f"slot-{uuid.uuid4().hex[:6]}", settings={"max_slot_wal_keep_size": "-1"}).start()
    srv.pgbench_init(1)
    yield srv
    srv.stop()


def test_slot_retention_above_the_bound_fails_the_capture_after_storing(slot_server, workdir):
    repo = created(LocalRepository(workdir / f"slotrepo-{uuid.uuid4().hex[:6]}"))
    conn = slot_server.conninfo()
    pre = preflight_full(conn, repo, "slotc", slot="pgincr_slotc")
    assert pre["wal_archiving"]["mode"] == "pull" and pre["slot"]["created"]
    assert any("max_slot_wal_keep_size is unset" in w for w in pre["warnings"])
    capture_wal_pull(conn, repo, "slotc")
    slot_server.pgbench_run(3000)  # a few segments of WAL held by the slot
    slot_server.psql("SELECT pg_switch_wal()")
    with pytest.raises(SlotRetentionExceeded) as e:
        capture_wal_pull(conn, repo, "slotc", max_retained_bytes=1 << 20)
    msg = str(e.value)
    assert "held" in msg and "more than the bound of 1.0 MiB" in msg and "capture at least every" in msg or \
        "WAL rate is not known" in msg, msg
    assert "max_slot_wal_keep_size" in msg
    # the capture itself was done: the archive reaches the server's switch, the slot was advanced
    row = slot_server.psql("SELECT pg_wal_lsn_diff(pg_current_wal_flush_lsn(), restart_lsn) FROM "
                           "pg_replication_slots WHERE slot_name = 'pgincr_slotc'")
    assert int(float(row.strip())) < 16 << 20
    assert len(list_segments(repo, "slotc")[1]) >= 2
    # the CLI says it with exit 2; with max_slot_wal_keep_size set, preflight reports it and stops warning
    slot_server.restart({"max_slot_wal_keep_size": "2GB"})  # (the sandbox's default)
    pre = preflight_full(conn, repo, "slotc", slot="pgincr_slotc", max_slot_retained_bytes=8 << 30)
    assert not pre["warnings"]
    assert pre["wal_archiving"]["slot_health"]["max_slot_wal_keep_size_bytes"] == 2 << 30
    assert pre["wal_archiving"]["slot_advice"]["bound_bytes"] == 2 << 30
    slot_server.pgbench_run(2000)
    slot_server.psql("SELECT pg_switch_wal()")
    r = pgincr("capture", "--repo", str(repo.root), "--cluster", "slotc", *_conn_args(conn),
               "--max-slot-retained-gb", "0.0001", env={"PGPASSWORD": conn.password})
    assert r.returncode == 2 and "captures are too far apart" in r.stderr, r.stderr


def test_cli_errors_name_the_fix_in_the_clis_language(pg, workdir):
    repo = str(workdir / f"msg-{uuid.uuid4().hex[:6]}")
    assert pgincr("repo-create", "--repo", repo).returncode == 0
    ci = pg.conninfo()
    r = pgincr("backup", "--repo", repo, "--cluster", "m", *_conn_args(ci), "--wal-mode", "none",
               env={"PGPASSWORD": "wrong-" + uuid.uuid4().hex})
    assert r.returncode == 2 and "PGPASSWORD" in r.stderr and ".pgpass" in r.stderr, r.stderr
    assert "Airflow" not in r.stderr
