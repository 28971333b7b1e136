"""A tampered archive (a link, a '..' or absolute name) is refused before tar extracts it."""

from __future__ import annotations

import io
import tarfile

import pytest

from airflow_pg_incremental.core.codec import CompressingReader
from airflow_pg_incremental.core.errors import RestoreError
from airflow_pg_incremental.core.restore import extract_object
from tests.unit.fakes import new_repo


def _store(repo, members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data) if data is not None else None)
    r = CompressingReader(io.BytesIO(buf.getvalue()))
    repo.put("c/backups/x/base.tar.zst", r)
    return r.info("c/backups/x/base.tar.zst")


def _file(name, data=b"data"):
    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    return ti, data


def _link(name, target, kind=tarfile.SYMTYPE):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = target
    return ti, None


def test_good_archive_extracts(tmp_path):
    repo = new_repo(tmp_path / "repo")
    info = _store(repo, [_file("PG_VERSION", b"18\n"), _file("base/1/123", b"x" * 10000)])
    dest = tmp_path / "d"
    dest.mkdir()
    extract_object(repo, info, dest, "x")
    assert (dest / "PG_VERSION").read_bytes() == b"18\n" and (dest / "base/1/123").stat().st_size == 10000


@pytest.mark.parametrize("members", [
    [_link("evil", "/etc"), _file("evil/passwd")],
    [_link("h", "/etc/passwd", tarfile.LNKTYPE)],
    [_file("../outside")],
    [_file("/abs/file")],
])
def test_tampered_archive_refused(tmp_path, members):
    repo = new_repo(tmp_path / "repo")
    info = _store(repo, [_file("PG_VERSION", b"18\n"), *members])
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(RestoreError, match="refusing"):
        extract_object(repo, info, dest, "x")
    assert not (tmp_path / "outside").exists() and not (dest / "evil").exists() and not (dest / "h").exists()


def _store_unchecked(repo, tar_bytes: bytes, recorded_from: bytes | None = None):
    """Store `tar_bytes` as PostgreSQL's server-side zstd does: a frame without a content checksum.
    The recorded size and SHA-256 are those of `recorded_from`'s frame (the bytes as backed up)."""
    import hashlib

    import zstandard

    from airflow_pg_incremental.core.codec import ObjectInfo

    key = "c/backups/x/base.tar.zst"
    frame = zstandard.ZstdCompressor(write_checksum=False).compress(tar_bytes)
    recorded = zstandard.ZstdCompressor(write_checksum=False).compress(recorded_from) if recorded_from else frame
    repo.put(key, io.BytesIO(frame))
    return ObjectInfo(key, None, None, len(recorded), hashlib.sha256(recorded).hexdigest())


def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for m, data in members:
            tf.addfile(m, io.BytesIO(data))
    return buf.getvalue()


def _damage_second_header(tar: bytes) -> bytes:
    # the first member's header (512 B) and its 4 KiB of content, then the second header: flip a
    # byte of its size field, as a flipped bit in a checksum-less zstd frame can
    b = bytearray(tar)
    b[512 + 4096 + 124 + 3] ^= 0x41
    return bytes(b)


def test_damaged_header_in_a_damaged_object_is_reported_as_the_damage(tmp_path):
    """The stored SHA-256 names the cause, not the garbled tar header it produced (CI once got
    'ValueError: invalid literal for int() with base 8' here)."""
    from airflow_pg_incremental.core.errors import ChecksumMismatch

    repo = new_repo(tmp_path / "repo")
    good = _tar([_file("PG_VERSION", b"x" * 4096), _file("base/1/1", b"y" * 9000), _file("base/1/2", b"z" * 700)])
    info = _store_unchecked(repo, _damage_second_header(good), recorded_from=good)
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(ChecksumMismatch, match="base.tar.zst: stored bytes"):
        extract_object(repo, info, dest, "x")


def test_damaged_header_in_an_intact_object_is_named(tmp_path):
    """Stored bytes as recorded, yet no tar: a clear RestoreError naming the object and the offset."""
    repo = new_repo(tmp_path / "repo")
    bad = _damage_second_header(_tar([_file("PG_VERSION", b"x" * 4096), _file("base/1/1", b"y" * 9000)]))
    info = _store_unchecked(repo, bad)
    dest = tmp_path / "d"
    dest.mkdir()
    with pytest.raises(RestoreError, match=r"base.tar.zst is not a readable tar archive: tar header at byte 4608 .* damaged"):
        extract_object(repo, info, dest, "x")
