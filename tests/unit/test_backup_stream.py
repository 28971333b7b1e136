"""backup_stream: the compression plan, and StagedFile (reading a file pg_basebackup still writes)
against a real writer process: bytes arrive whole and in order, the disk behind the reader is
freed, a writer far ahead is paused until the reader catches up, a failing writer fails the read."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest

from airflow_pg_incremental.core import backup_stream
from airflow_pg_incremental.core.backup_stream import StagedFile, choose

WRITER = """
import os, sys, time
path, n, rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "wb") as f:
    for i in range(n):
        f.write(bytes([i % 251]) * (1 << 20))
        f.flush()
sys.exit(rc)
"""


def _writer(path, mib, rc=0):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(mib), str(rc)])


def _expected(mib):
    h = hashlib.sha256()
    for i in range(mib):
        h.update(bytes([i % 251]) * (1 << 20))
    return h.hexdigest()


def _state(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line.split()[1] for line in f if line.startswith("State:"))
    except (OSError, StopIteration):
        return None


def test_reads_everything_frees_disk_and_pauses_a_writer_far_ahead(tmp_path, monkeypatch):
    monkeypatch.setattr(backup_stream, "PUNCH_EVERY", 1 << 20)
    path = tmp_path / "base.tar.zst"
    proc = _writer(path, 48)
    r = StagedFile(str(path), proc, on_failure=lambda rc: RuntimeError(f"rc {rc}"), max_backlog=4 << 20)
    h, seen_stopped, max_behind = hashlib.sha256(), False, 0
    try:
        while True:
            time.sleep(0.002)  # a slow repository
            data = r.read(256 * 1024)
            if not data:
                break
            h.update(data)
            seen_stopped |= _state(proc.pid) == "T"
            if os.path.exists(path):  # disk in use that lies behind the reader (what it already read)
                st = os.stat(path)
                max_behind = max(max_behind, st.st_blocks * 512 - (st.st_size - r.size))
    finally:
        r.close()
    assert proc.wait(5) == 0
    assert h.hexdigest() == _expected(48) and r.size == 48 << 20
    assert seen_stopped, "the writer was never paused although it ran 4 MiB ahead"
    assert os.stat(path).st_size == 48 << 20
    # freed in steps of PUNCH_EVERY (1 MiB): never more than that, and a read's chunk, stays behind
    assert max_behind <= 2 << 20, f"{max_behind} bytes behind the reader were not freed"


def test_a_failing_writer_fails_the_read(tmp_path):
    path = tmp_path / "base.tar.zst"
    proc = _writer(path, 2, rc=3)
    r = StagedFile(str(path), proc, on_failure=lambda rc: RuntimeError(f"pg_basebackup exit {rc}"))
    with pytest.raises(RuntimeError, match="exit 3"):
        while r.read(1 << 20):
            pass
    r.close()


def test_plan_follows_what_server_and_client_can_do(monkeypatch):
    def plan(mode, server_zstd, client, major=15, threads=None):
        monkeypatch.setattr(backup_stream, "client_zstd_supported", lambda p: client)
        return choose(mode, 3, threads, server_zstd=server_zstd, server_major=major, pg_basebackup="/x/pg_basebackup")

    assert plan("auto", True, True).where == "server"
    assert plan("auto", False, True).where == "client"
    assert plan("auto", True, True, major=14).where == "client"
    assert plan("client", True, True).where == "client"
    assert plan("server", False, False).where == "python"
    p = plan("auto", True, True, threads=0)
    assert p.threads == 0 and p.compress_option() == "--compress=server-zstd:level=3"
    assert plan("auto", True, True, threads=2).compress_option() == "--compress=server-zstd:level=3,workers=2"
    assert 1 <= plan("auto", True, True).threads <= 8


class _Exited:
    returncode = 0

    def poll(self):
        return 0


def test_the_manifest_being_written_is_no_archive(tmp_path):
    """pg_basebackup writes backup_manifest.tmp, then renames it: seen between the two (CI caught
    it once), it was taken for an unexpected archive and failed a sound backup."""
    from airflow_pg_incremental.core.backup import _next_archive

    (tmp_path / "base.tar.zst").write_bytes(b"x")
    (tmp_path / "backup_manifest.tmp").write_bytes(b"{")
    stored: dict = {}
    assert _next_archive(str(tmp_path), stored, _Exited(), None) == "base.tar.zst"
    stored["base.tar.zst"] = object()
    assert _next_archive(str(tmp_path), stored, _Exited(), None) is None
    (tmp_path / "backup_manifest.tmp").rename(tmp_path / "backup_manifest")
    assert _next_archive(str(tmp_path), stored, _Exited(), None) is None
    (tmp_path / "pg_tblspc_16384.tar.zst").write_bytes(b"x")  # a real new archive still shows
    assert _next_archive(str(tmp_path), stored, _Exited(), None) == "pg_tblspc_16384.tar.zst"
