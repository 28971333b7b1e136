"""Encryption at rest: the object format (round trips, tampering, truncation, reordering, wrong key,
swapped names) and an encrypted local repository (key checks before anything is written, rotation)."""

from __future__ import annotations

import base64
import io
import json
import os

import pytest

from airflow_pg_incremental.core.errors import ChecksumMismatch, ConfigError, RepositoryError
from airflow_pg_incremental.core.repository import LocalRepository, open_repository
from airflow_pg_incremental.core.repository import crypt
from airflow_pg_incremental.core.repository.base import MARKER_KEY
from airflow_pg_incremental.core.repository.crypt import (CHUNK, HEADER_LEN, TAG, Keyring, decrypt_bytes,
                                                          encrypt_bytes, keyring_from_env, plain_size)

K1, K2 = os.urandom(32), os.urandom(32)
RING = Keyring(K1)


@pytest.mark.parametrize("n", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 17])
def test_round_trip_over_chunk_boundaries(n):
    data = os.urandom(n)
    ct = encrypt_bytes(data, RING, "c/wal/x")
    assert len(ct) == HEADER_LEN + n + TAG * max(1, -(-n // CHUNK))
    assert plain_size(len(ct)) == n
    assert decrypt_bytes(ct, RING, "c/wal/x") == data


def test_streaming_reads_of_any_size_and_short_source_reads():
    data = os.urandom(3 * CHUNK + 5)

    class Trickle(io.RawIOBase):  # a source returning short reads (like a pipe)
        def __init__(self):
            self.b = io.BytesIO(data)

        def read(self, n=-1):
            return self.b.read(min(n, 7777) if n and n > 0 else 7777)

    enc = crypt.EncryptingReader(Trickle(), RING, "k")
    parts = []
    while True:
        p = enc.read(12345)
        if not p:
            break
        assert len(p) <= 12345
        parts.append(p)
    dec = crypt.DecryptingReader(io.BytesIO(b"".join(parts)), RING, "k")
    got = []
    while True:
        p = dec.read(100_000)
        if not p:
            break
        got.append(p)
    assert b"".join(got) == data and enc.plain_size == len(data)


def _mutated(ct: bytes, pos: int) -> bytes:
    b = bytearray(ct)
    b[pos] ^= 0x01
    return bytes(b)


@pytest.mark.parametrize("pos", [0, 9, 20, 30, 60, HEADER_LEN, HEADER_LEN + CHUNK + 3, -1])
def test_a_flipped_byte_anywhere_is_refused(pos):
    ct = encrypt_bytes(os.urandom(CHUNK + 100), RING, "k")
    with pytest.raises(ChecksumMismatch, match="k: damaged or tampered"):
        decrypt_bytes(_mutated(ct, pos), RING, "k", known_ids=RING.ids)


def test_truncation_reordering_and_appending_are_refused():
    data = os.urandom(3 * CHUNK)
    ct = encrypt_bytes(data, RING, "k")
    rec = CHUNK + TAG
    head, recs = ct[:HEADER_LEN], [ct[HEADER_LEN + i * rec:HEADER_LEN + (i + 1) * rec] for i in range(3)]
    for bad in (head + recs[0] + recs[1],                     # cut at a chunk boundary
                ct[:-5],                                      # cut inside the last chunk
                head + recs[1] + recs[0] + recs[2],           # reordered
                ct + recs[2],                                 # a chunk appended
                head,                                         # nothing but the header
                ct[:40]):                                     # not even a header
        with pytest.raises(ChecksumMismatch):
            decrypt_bytes(bad, RING, "k")


def test_an_object_under_another_name_or_key_does_not_open():
    ct = encrypt_bytes(b"segment", RING, "c/wal/00000001/A")
    with pytest.raises(ChecksumMismatch, match="moved here from another name"):
        decrypt_bytes(ct, RING, "c/wal/00000001/B")
    other = Keyring(K2, [os.urandom(32)])
    with pytest.raises(RepositoryError, match="not given"):
        decrypt_bytes(ct, other, "c/wal/00000001/A")
    # an old key still opens what it wrote
    assert decrypt_bytes(ct, Keyring(K2, [K1]), "c/wal/00000001/A") == b"segment"


def test_keys_parse_from_base64_or_hex_and_are_never_echoed():
    b64, hx = base64.b64encode(K1).decode(), K1.hex()
    assert crypt.parse_key(b64) == K1 == crypt.parse_key(hx)
    with pytest.raises(ConfigError) as e:
        crypt.parse_key("secret-but-too-short")
    assert "secret-but-too-short" not in str(e.value)
    assert keyring_from_env({}) is None
    ring = keyring_from_env({"PGINCR_REPO_KEY": b64, "PGINCR_REPO_OLD_KEYS": f"{K2.hex()}, "})
    assert ring.current == K1 and ring.get(crypt.key_id(K2)) == K2
    assert b64 not in repr(ring) and K1.hex() not in repr(ring)
    assert keyring_from_env(ring.env()).ids == ring.ids
    with pytest.raises(ConfigError, match="PGINCR_REPO_KEY is not"):
        keyring_from_env({"PGINCR_REPO_OLD_KEYS": b64})


# --- an encrypted local repository -------------------------------------------------------------
def _encrypted(tmp_path, ring=RING) -> LocalRepository:
    repo = LocalRepository(tmp_path / "r").use_keyring(ring)
    repo.create()
    return repo


def test_encrypted_repository_round_trip_and_nothing_in_clear(tmp_path):
    repo = _encrypted(tmp_path)
    data = b"VISIBLE-MARKER " * 100_000
    assert repo.put("c/backups/b1/base.tar.zst", io.BytesIO(data)) == len(data)
    assert repo.put_bytes("c/backups/b1/backup.json", b'{"x": "VISIBLE-MARKER"}') == 23
    for key in ("c/backups/b1/base.tar.zst", "c/backups/b1/backup.json"):
        raw = (tmp_path / "r" / key).read_bytes()
        assert b"VISIBLE-MARKER" not in raw and raw.startswith(crypt.MAGIC)
    assert repo.get_bytes("c/backups/b1/base.tar.zst") == data
    assert repo.size("c/backups/b1/base.tar.zst") == len(data) and repo.size("c/backups/b1/backup.json") == 23
    marker = json.loads((tmp_path / "r" / MARKER_KEY).read_bytes())
    assert marker["encryption"]["cipher"] == "aes-256-gcm-stream"
    assert list(marker["encryption"]["checks"]) == [RING.current_id]
    assert base64.b64encode(K1).decode() not in json.dumps(marker) and K1.hex() not in json.dumps(marker)


def test_missing_wrong_or_unwanted_key_is_refused_before_anything_is_written(tmp_path):
    _encrypted(tmp_path)
    url = str(tmp_path / "r")
    before = sorted(os.listdir(url))
    for ring, msg in ((None, "encrypted repository .* no key was given"),
                      (Keyring(K2), "wrong repository key")):
        repo = open_repository(url, keyring=ring)
        with pytest.raises(RepositoryError, match=msg):
            repo.identity()
        if ring is not None:
            with pytest.raises(RepositoryError, match=msg):
                repo.put_bytes("c/wal/x", b"data")
    assert sorted(os.listdir(url)) == before
    plain = LocalRepository(tmp_path / "p")
    plain.create()
    with pytest.raises(RepositoryError, match="not an encrypted repository, but a repository key was given"):
        open_repository(str(tmp_path / "p"), keyring=RING).identity()
    with pytest.raises(RepositoryError, match="not an encrypted repository"):
        LocalRepository(tmp_path / "p").use_keyring(RING).create()


def test_a_tampered_marker_check_is_refused(tmp_path):
    _encrypted(tmp_path)
    p = tmp_path / "r" / MARKER_KEY
    m = json.loads(p.read_bytes())
    m["repository_id"] = "0" * 32  # the check is bound to the repository id
    p.write_text(json.dumps(m))
    with pytest.raises(RepositoryError, match="key check"):
        open_repository(str(tmp_path / "r"), keyring=RING).identity()


def test_tampered_and_swapped_objects_are_refused_like_a_checksum_error(tmp_path):
    repo = _encrypted(tmp_path)
    repo.put_bytes("c/wal/a", b"A" * 1000)
    repo.put_bytes("c/wal/b", b"B" * 1000)
    root = tmp_path / "r"
    (root / "c/wal/b").write_bytes((root / "c/wal/a").read_bytes())  # swapped in under another name
    with pytest.raises(ChecksumMismatch, match="c/wal/b in file://.*damaged or tampered"):
        repo.get_bytes("c/wal/b")
    (root / "c/wal/a").write_bytes(_mutated((root / "c/wal/a").read_bytes(), -3))
    with pytest.raises(ChecksumMismatch):
        repo.get_bytes("c/wal/a")
    (root / "c/wal/plain").write_bytes(b"written without encryption")
    with pytest.raises(ChecksumMismatch, match="not an encrypted pgincr object"):
        repo.get_bytes("c/wal/plain")


def test_rotation_new_objects_under_the_new_key_old_ones_readable(tmp_path):
    repo = _encrypted(tmp_path)
    repo.put_bytes("c/wal/old", b"old")
    url = str(tmp_path / "r")
    with pytest.raises(RepositoryError, match="none of the keys"):
        open_repository(url, keyring=Keyring(K2, [os.urandom(32)])).add_key()
    marker, added = open_repository(url, keyring=Keyring(K2, [K1])).add_key()
    assert added and sorted(marker["encryption"]["checks"]) == sorted([crypt.key_id(K1), crypt.key_id(K2)])
    new = open_repository(url, keyring=Keyring(K2, [K1]))
    new.put_bytes("c/wal/new", b"new")
    assert (tmp_path / "r/c/wal/new").read_bytes()[9:17].hex() == crypt.key_id(K2)
    assert new.get_bytes("c/wal/old") == b"old" and new.get_bytes("c/wal/new") == b"new"
    with pytest.raises(RepositoryError, match="add that older key"):
        open_repository(url, keyring=Keyring(K2)).get_bytes("c/wal/old")
    # the old key alone still opens the repository (rotation is not revocation)
    assert open_repository(url, keyring=RING).get_bytes("c/wal/old") == b"old"


# --- the CLI ------------------------------------------------------------------------------------
def test_cli_repo_create_encrypt_and_key_rotation(tmp_path, monkeypatch, capsys):
    from airflow_pg_incremental.cli import main

    url = str(tmp_path / "r")
    k1, k2 = crypt.new_key_text(), crypt.new_key_text()
    monkeypatch.delenv("PGINCR_REPO_KEY", raising=False)
    monkeypatch.delenv("PGINCR_REPO_OLD_KEYS", raising=False)
    assert main(["repo-create", "--repo", url, "--encrypt"]) == 2
    assert "needs the repository key" in capsys.readouterr().err and not os.path.exists(url)
    monkeypatch.setenv("PGINCR_REPO_KEY", k1)
    assert main(["repo-create", "--repo", url]) == 2
    assert "pass --encrypt" in capsys.readouterr().err
    assert main(["repo-create", "--repo", url, "--encrypt", "--owner", "root", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["encrypted"] and out["key_ids"] == [crypt.key_id(crypt.parse_key(k1))]
    # rotation: the new key, authorized by the current one
    monkeypatch.setenv("PGINCR_REPO_KEY", k2)
    assert main(["repo-key-add", "--repo", url]) == 2
    assert "none of the keys" in capsys.readouterr().err
    monkeypatch.setenv("PGINCR_REPO_OLD_KEYS", k1)
    assert main(["repo-key-add", "--repo", url, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["added"] and len(out["key_ids"]) == 2
    # archive_command of an encrypted repository needs the key in its env file
    assert main(["wal-commands", "--repo", url, "--cluster", "c"]) == 2
    assert "pass --env-file" in capsys.readouterr().err
    envf = tmp_path / "env"
    envf.write_text("AWS_REGION=x\n")
    envf.chmod(0o600)
    assert main(["wal-commands", "--repo", url, "--cluster", "c", "--env-file", str(envf)]) == 2
    assert "no PGINCR_REPO_KEY= line" in capsys.readouterr().err
    envf.write_text(f"PGINCR_REPO_KEY={k2}\nPGINCR_REPO_OLD_KEYS={k1}\n")
    assert main(["wal-commands", "--repo", url, "--cluster", "c", "--env-file", str(envf)]) == 0
    printed = capsys.readouterr()
    assert k1 not in printed.out + printed.err and k2 not in printed.out + printed.err
    # info says the repository is encrypted, under which key ids (never the keys)
    assert main(["info", "--repo", url, "--json"]) == 0
    printed = capsys.readouterr()
    info = json.loads(printed.out)["encryption"]
    assert info["current_key_id"] == crypt.key_id(crypt.parse_key(k2)) and len(info["key_ids"]) == 2
    assert k1 not in printed.out and k2 not in printed.out
    # without the key, the CLI says what to do
    monkeypatch.delenv("PGINCR_REPO_KEY")
    monkeypatch.delenv("PGINCR_REPO_OLD_KEYS")
    assert main(["info", "--repo", url, "--cluster", "c"]) == 2
    assert "no key was given: set PGINCR_REPO_KEY" in capsys.readouterr().err


def test_cli_repo_key_new_prints_a_usable_key(capsys):
    from airflow_pg_incremental.cli import main

    assert main(["repo-key-new"]) == 0
    assert len(crypt.parse_key(capsys.readouterr().out.strip())) == 32


# --- S3 server-side encryption (SeaweedFS does not implement SSE-KMS: the parameters, on a stub) ---
class _RecordingClient:
    """Records what the S3 driver sends; stores objects in memory."""

    def __init__(self):
        self.calls, self.objects = [], {}

    def upload_fileobj(self, f, bucket, key, Config=None, ExtraArgs=None):
        self.calls.append(("upload_fileobj", key, ExtraArgs))
        self.objects[key] = f.read()

    def put_object(self, **kw):
        self.calls.append(("put_object", kw["Key"], {k: v for k, v in kw.items() if k.startswith("SSE")
                                                     or k == "ServerSideEncryption"}))
        self.objects[kw["Key"]] = kw["Body"]

    def head_object(self, Bucket, Key):
        from botocore.exceptions import ClientError

        if Key not in self.objects:
            raise ClientError({"Error": {"Code": "404"}}, "HeadObject")
        return {"ContentLength": len(self.objects[Key])}


@pytest.mark.parametrize("sse, kms, expected", [
    ("AES256", None, {"ServerSideEncryption": "AES256"}),
    ("aws:kms", "arn:aws:kms:eu-west-1:1:key/k", {"ServerSideEncryption": "aws:kms",
                                                  "SSEKMSKeyId": "arn:aws:kms:eu-west-1:1:key/k"}),
    ("aws:kms", None, {"ServerSideEncryption": "aws:kms"}),
    (None, None, None)])
def test_s3_server_side_encryption_parameters_on_every_write(sse, kms, expected):
    client = _RecordingClient()
    repo = open_repository("s3://b/p", s3_client=client, s3_sse=sse, s3_sse_kms_key_id=kms)
    repo.put("c/backups/x/base.tar.zst", io.BytesIO(b"data"))
    repo.put_bytes("c/backups/x/backup.json", b"{}", overwrite=False)
    assert client.calls == [("upload_fileobj", "p/c/backups/x/base.tar.zst", expected),
                            ("put_object", "p/c/backups/x/backup.json", expected or {})]


def test_s3_sse_settings_are_checked():
    client = _RecordingClient()
    for kw, msg in (({"s3_sse": "aes"}, "not one of AES256, aws:kms"),
                    ({"s3_sse_kms_key_id": "k"}, "without s3_sse"),
                    ({"s3_sse": "AES256", "s3_sse_kms_key_id": "k"}, "needs s3_sse: aws:kms")):
        with pytest.raises(ConfigError, match=msg):
            open_repository("s3://b/p", s3_client=client, **kw)
    with pytest.raises(ConfigError, match="s3:// repositories only"):
        open_repository("/tmp/x", s3_sse="AES256")
    from airflow_pg_incremental.core.repository import env_options

    opts = env_options({"PGINCR_S3_SSE": "aws:kms", "PGINCR_S3_SSE_KMS_KEY_ID": "alias/backups"})
    assert opts == {"keyring": None, "s3_sse": "aws:kms", "s3_sse_kms_key_id": "alias/backups"}


# --- Airflow: the key connection, the DAG configuration -------------------------------------------
def test_hook_keyring_from_a_connection(tmp_path, monkeypatch):
    from airflow_pg_incremental.hooks.repository import PgBackupRepositoryHook

    k1, k2 = crypt.new_key_text(), crypt.new_key_text()
    monkeypatch.setenv("AIRFLOW_CONN_PGINCR_UT_KEY", json.dumps({"conn_type": "generic", "password": k2,
                                                                 "extra": {"old_keys": [k1]}}))
    LocalRepository(tmp_path / "r").use_keyring(Keyring.from_texts(k1)).create()
    hook = PgBackupRepositoryHook(str(tmp_path / "r"), None, encryption_key_conn_id="pgincr_ut_key")
    ring = hook.get_keyring()
    assert ring.current_id == crypt.key_id(crypt.parse_key(k2)) and len(ring.ids) == 2
    with pytest.raises(RepositoryError, match="wrong repository key"):  # k2 was never added to the repository
        hook.get_repository()
    assert PgBackupRepositoryHook(str(tmp_path / "r"), None).get_keyring() is None
    monkeypatch.setenv("AIRFLOW_CONN_PGINCR_UT_KEY", json.dumps({"conn_type": "generic"}))
    with pytest.raises(ConfigError, match="holds no key"):
        hook.get_keyring()


def test_dag_config_encryption_and_sse_settings():
    from airflow_pg_incremental.dag_factory import parse_config

    base = {"name": "a", "postgres_conn_id": "pg", "repository": "s3://b/p"}
    (cl,) = parse_config({"clusters": [{**base, "encryption_key_conn_id": "k", "s3_sse": "aws:kms",
                                        "s3_sse_kms_key_id": "alias/x",
                                        "copies": [{"repository": "/srv/copy"},
                                                   {"repository": "s3://c/p", "encryption_key_conn_id": "k2",
                                                    "s3_sse": "AES256"}]}]})
    assert cl.engine_kwargs()["encryption_key_conn_id"] == "k" and cl.engine_kwargs()["s3_sse"] == "aws:kms"
    assert cl.copies[0]["encryption_key_conn_id"] == "k" and "s3_sse" not in cl.copies[0]
    assert cl.copies[1] == {"repository": "s3://c/p", "aws_conn_id": "aws_default", "encryption_key_conn_id": "k2",
                            "s3_sse": "AES256"}
    for bad, msg in (({"s3_sse": "aes"}, "AES256"), ({"s3_sse_kms_key_id": "x"}, "needs s3_sse: aws:kms"),
                     ({"repository": "/srv/r", "s3_sse": "AES256"}, "s3:// repositories only"),
                     ({"encryption_key_conn_id": 3}, "must be a string")):
        with pytest.raises(ConfigError, match=msg):
            parse_config({"clusters": [{**base, **bad}]})
    (plain,) = parse_config({"clusters": [base]})
    assert "encryption_key_conn_id" not in plain.engine_kwargs()


def test_wal_push_twice_and_different_content_in_an_encrypted_repository(tmp_path):
    from airflow_pg_incremental.core.errors import ObjectExists
    from airflow_pg_incremental.core.wal import fetch_bytes, push_bytes

    repo = _encrypted(tmp_path)
    seg = os.urandom(1000) * 16
    name = "000000010000000000000003"
    push_bytes(repo, "c", name, seg)
    push_bytes(repo, "c", name, seg)  # the same segment again: fine
    with pytest.raises(ObjectExists, match="DIFFERENT content"):
        push_bytes(repo, "c", name, seg[::-1])
    assert fetch_bytes(repo, "c", name) == seg
    assert seg[:1000] not in (tmp_path / "r/c/wal/00000001" / f"{name}.zst").read_bytes()
