"""Encryption at rest on the real parts (PostgreSQL 18; a local directory and SeaweedFS).

A full backup under key K1, a key rotation to K2, an incremental under K2, WAL captured by pull
throughout: restores (the chain mixes both keys) and a PITR, whose restore_command (walcmd) gets
the keys through its environment, give the source's data; no stored object holds the cluster's
bytes in clear; a flipped byte or a cut object is refused by verify and restore; a wrong or
missing key is refused before anything is written; walcmd with an env file reads the key there."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import uuid

import pytest
import zstandard

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.capture import capture_wal_pull, switch_wal
from airflow_pg_incremental.core.errors import ChecksumMismatch, RepositoryError
from airflow_pg_incremental.core.incremental import take_planned_backup
from airflow_pg_incremental.core.metadata import backup_prefix
from airflow_pg_incremental.core.pitr import parse_target, restore_pitr
from airflow_pg_incremental.core.repository import LocalRepository, S3Repository, open_repository
from airflow_pg_incremental.core.repository.base import MARKER_KEY
from airflow_pg_incremental.core.repository.crypt import Keyring
from airflow_pg_incremental.core.restore import restore_backup, start_restored
from airflow_pg_incremental.core.verify import verify_backup
from airflow_pg_incremental.sandbox import SandboxPostgres, data_fingerprint
from airflow_pg_incremental.walcmd import __file__ as WALCMD
from tests.conftest import created

pytestmark = pytest.mark.integration

K1, K2 = os.urandom(32), os.urandom(32)
CANARY = "CANARY-" + uuid.uuid4().hex
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _same_place(repo, keyring):
    """The same repository opened again with `keyring`."""
    if isinstance(repo, LocalRepository):
        return LocalRepository(repo.root).use_keyring(keyring)
    return S3Repository(repo.client, repo.bucket, repo.prefix).use_keyring(keyring)


@pytest.fixture(scope="module", params=["local", "s3"])
def enc(request, workdir):
    pg = SandboxPostgres(workdir / f"enc-{request.param}").start()
    if request.param == "local":
        repo = LocalRepository(workdir / f"enc-repo-{uuid.uuid4().hex[:6]}")
    else:
        s3 = request.getfixturevalue("s3")
        repo = S3Repository(s3.client(), s3.bucket, "enc-" + uuid.uuid4().hex[:6])
    created(repo.use_keyring(Keyring(K1)))
    e = {"pg": pg, "repo": repo, "kind": request.param}
    try:
        pg.psql("CREATE TABLE secrets (id int PRIMARY KEY, s text)")
        pg.psql(f"INSERT INTO secrets SELECT g, '{CANARY}-' || g FROM generate_series(1, 2000) g")
        capture_wal_pull(pg.conninfo(), repo, "enc")
        e["full"] = take_full_backup(pg.conninfo(), repo, "enc")
        e["fp_full"] = data_fingerprint(pg.superuser())
        # rotation: K2 becomes the current key, K1 stays readable
        _same_place(repo, Keyring(K2, [K1])).add_key()
        repo.use_keyring(Keyring(K2, [K1]))
        pg.psql(f"INSERT INTO secrets SELECT g, '{CANARY}-' || g FROM generate_series(2001, 3000) g")
        e["incr"] = take_planned_backup(pg.conninfo(), repo, "enc", kind="incremental")
        e["fp_incr"] = data_fingerprint(pg.superuser())
        pg.psql("UPDATE secrets SET s = s || '-later' WHERE id <= 100")
        capture_wal_pull(pg.conninfo(), repo, "enc", upto_lsn=switch_wal(pg.conninfo())["lsn"])
        e["fp_end"] = data_fingerprint(pg.superuser())
        yield e
    finally:
        pg.stop()


def test_nothing_is_stored_in_clear(enc):
    repo = enc["repo"]
    keys = [k for k in repo.list("") if k != MARKER_KEY]
    assert any("/wal/" in k for k in keys) and any(k.endswith("base.tar.zst") for k in keys)
    key_ids = set()
    for k in keys:
        raw = repo._open(k).read()  # the stored bytes
        assert CANARY.encode() not in raw and not raw.startswith(ZSTD_MAGIC), k
        assert b'"backup_id"' not in raw and b"PGDATA" not in raw, k
        key_ids.add(raw[9:17].hex())
    assert key_ids == {Keyring(K1).current_id, Keyring(K2).current_id}  # both keys in use after the rotation
    # ... while what the objects hold does contain the cluster's rows (the check above means something)
    full_tar = repo.get_bytes(f"{backup_prefix('enc', enc['full']['backup_id'])}/base.tar.zst")
    assert CANARY.encode() in zstandard.ZstdDecompressor().stream_reader(full_tar).read()
    marker = repo._open(MARKER_KEY).read().decode()
    for k in (K1, K2):
        assert base64.b64encode(k).decode() not in marker and k.hex() not in marker


def test_chain_over_both_keys_and_pitr_restore_exactly(enc, scratch):
    repo, pg = enc["repo"], enc["pg"]
    res = restore_backup(repo, "enc", enc["incr"]["backup_id"], scratch / "d", os_user=pg.os_user)
    assert res["chain"] == [enc["full"]["backup_id"], enc["incr"]["backup_id"]]
    srv = start_restored(scratch / "d", 18, os_user=pg.os_user)
    try:
        assert data_fingerprint(srv.local_conninfo()) == enc["fp_incr"]
    finally:
        srv.stop()
    rep = restore_pitr(repo, "enc", parse_target("latest", None), scratch / "p", os_user=pg.os_user,
                       keep_running=True)
    srv = rep.pop("server")
    try:
        assert data_fingerprint(srv.local_conninfo()) == enc["fp_end"]
    finally:
        srv.stop()
    assert verify_backup(repo, "enc")["failed"] == []


def _listing(repo) -> list:
    return sorted(repo.list(""))


def test_wrong_or_missing_key_is_refused_before_anything_is_written(enc):
    repo, pg = enc["repo"], enc["pg"]
    before = _listing(repo)
    for ring, msg in ((Keyring(os.urandom(32)), "wrong repository key"), (None, "no key was given")):
        with pytest.raises(RepositoryError, match=msg):
            take_full_backup(pg.conninfo(), _same_place(repo, ring), "enc")
        with pytest.raises(RepositoryError, match=msg):
            capture_wal_pull(pg.conninfo(), _same_place(repo, ring), "enc")
    assert _listing(repo) == before
    # the old key alone cannot read what the new one wrote
    with pytest.raises(RepositoryError, match="not given"):
        _same_place(repo, Keyring(K1)).get_bytes(f"{backup_prefix('enc', enc['incr']['backup_id'])}/base.tar.zst")


def _damaged_copy(enc, workdir, how) -> LocalRepository:
    copy = LocalRepository(workdir / f"enc-copy-{uuid.uuid4().hex[:6]}")
    shutil.copytree(enc["repo"].root, copy.root)
    shutil.chown(copy.root, *(lambda s: (s.st_uid, s.st_gid))(os.stat(enc["repo"].root)))
    p = copy.root / backup_prefix("enc", enc["full"]["backup_id"]) / "base.tar.zst"
    data = bytearray(p.read_bytes())
    if how == "flip":
        data[len(data) // 2] ^= 0x40
    else:
        del data[-1000:]
    p.write_bytes(bytes(data))
    return copy.use_keyring(Keyring(K2, [K1]))


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_damaged_ciphertext_is_refused_by_verify_and_restore(enc, workdir, scratch, how):
    if enc["kind"] != "local":
        pytest.skip("damages a copy of the local repository")
    copy = _damaged_copy(enc, workdir, how)
    out = verify_backup(copy, "enc", enc["full"]["backup_id"], check_wal=False)
    assert out["failed"] and "damaged or tampered" in out["failed"][0]["message"] + str(out), out
    with pytest.raises(ChecksumMismatch, match="base.tar.zst.*damaged or tampered"):
        restore_backup(copy, "enc", enc["full"]["backup_id"], scratch / "d", os_user=enc["pg"].os_user)
    assert not (scratch / "d").exists() or not any((scratch / "d").iterdir())


def test_walcmd_reads_the_key_from_its_env_file(enc, tmp_path, request):
    repo = enc["repo"]
    names = [k.rsplit("/", 1)[1].split(".")[0] for k in repo.list("enc/wal")]
    name = next(n for n in names if len(n) == 24)
    url = str(repo.root) if enc["kind"] == "local" else repo.url
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PGINCR_REPO")}
    if enc["kind"] == "s3":
        base_env.update(request.getfixturevalue("s3").env())
    env_file = tmp_path / "walcmd.env"

    def fetch(lines: list[str]) -> subprocess.CompletedProcess:
        env_file.write_text("\n".join(lines) + "\n")
        env_file.chmod(0o600)
        dest = tmp_path / "seg"
        dest.unlink(missing_ok=True)
        return subprocess.run([sys.executable, "-S", WALCMD, "fetch", "--repo", url, "--cluster", "enc",
                               "--env-file", str(env_file), name, str(dest)], env=base_env, capture_output=True,
                              text=True, timeout=60)

    ok = fetch([f"PGINCR_REPO_KEY={base64.b64encode(K2).decode()}", f"PGINCR_REPO_OLD_KEYS={K1.hex()}"])
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "seg").stat().st_size == 16 * 1024 * 1024
    missing = fetch([])
    assert missing.returncode == 126 and "encrypted repository" in missing.stderr and "no key" in missing.stderr
    wrong = fetch([f"PGINCR_REPO_KEY={base64.b64encode(os.urandom(32)).decode()}"])
    assert wrong.returncode == 126 and "wrong repository key" in wrong.stderr
    for p in (ok, missing, wrong):
        assert base64.b64encode(K2).decode() not in p.stderr + p.stdout


def test_an_unencrypted_repository_refuses_a_key(workdir):
    plain = created(LocalRepository(workdir / f"plain-{uuid.uuid4().hex[:6]}"))
    with pytest.raises(RepositoryError, match="not an encrypted repository, but a repository key was given"):
        open_repository(str(plain.root), keyring=Keyring(K1)).identity()


@pytest.mark.parametrize("ahead", ["0", None])
def test_archive_command_push_with_the_key_in_its_env_file(tmp_path, workdir, ahead):
    """walcmd push (archive_command), direct and through the push-ahead pusher: with the key in the
    env file the segment is stored encrypted; without it nothing is stored and the call fails."""
    from airflow_pg_incremental.core.wal import fetch_bytes, wal_key

    repo = created(LocalRepository(workdir / f"enc-push-{uuid.uuid4().hex[:6]}").use_keyring(Keyring(K2)))
    names = {f"0000000100000000000000{i:02X}": os.urandom(64) * (256 * 1024) for i in (0x30, 0x31)}
    d = tmp_path / "data"
    (d / "pg_wal" / "archive_status").mkdir(parents=True)
    for n, data in names.items():
        (d / "pg_wal" / n).write_bytes(data)
        (d / "pg_wal" / "archive_status" / f"{n}.ready").touch()
    env_file = tmp_path / "walcmd.env"
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("PGINCR_REPO")}

    def push(name: str, lines: list[str]) -> subprocess.CompletedProcess:
        env_file.write_text("\n".join(lines) + "\n")
        env_file.chmod(0o600)
        return subprocess.run([sys.executable, "-S", WALCMD, "push", "--repo", str(repo.root), "--cluster", "wp",
                               "--env-file", str(env_file), *(["--ahead", ahead] if ahead else []),
                               f"pg_wal/{name}"], cwd=d, env=base_env, capture_output=True, text=True, timeout=120)

    first, second = sorted(names)
    r = push(first, [])  # no key: refused, nothing stored
    assert r.returncode != 0 and "no key was given" in r.stderr, r.stderr
    assert not repo.exists(wal_key("wp", first))
    r = push(first, [f"PGINCR_REPO_KEY={K2.hex()}"])
    assert r.returncode == 0, r.stderr
    r = push(second, [f"PGINCR_REPO_KEY={K2.hex()}"])
    assert r.returncode == 0, r.stderr
    for n, data in names.items():
        raw = repo._open(wal_key("wp", n)).read()
        assert raw.startswith(b"PGINCENC") and data[:64] not in raw
        assert fetch_bytes(repo, "wp", n) == data


def test_copy_into_a_repository_under_another_key(enc, workdir):
    """A second repository (3-2-1) encrypted under its own key: the copy decrypts and re-encrypts,
    every object checked; the copy verifies."""
    from airflow_pg_incremental.core.copies import copy_cluster

    k3 = os.urandom(32)
    dst = created(LocalRepository(workdir / f"enc-copy-{uuid.uuid4().hex[:6]}").use_keyring(Keyring(k3)))
    rep = copy_cluster(enc["repo"], dst, "enc")
    assert len(rep["backups_copied"]) == 2 and rep["wal_copied"] > 0
    assert {dst._open(k).read(17)[9:17].hex() for k in dst.list("enc")} == {Keyring(k3).current_id}
    assert verify_backup(dst, "enc")["failed"] == []
