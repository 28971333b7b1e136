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
