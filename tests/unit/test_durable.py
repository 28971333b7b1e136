"""core.durable: one flush per filesystem, the background write-behind, and the restore's time split."""

from __future__ import annotations

import os
import sys
import time

import pytest

from airflow_pg_incremental.core import durable
from airflow_pg_incremental.core.restore import Timings


@pytest.fixture
def flushed(monkeypatch):
    calls = []
    monkeypatch.setattr(durable, "syncfs", lambda p: calls.append(str(p)) or "syncfs")
    return calls


def test_make_durable_flushes_each_filesystem_once(tmp_path, flushed):
    (tmp_path / "a" / "b").mkdir(parents=True)
    done = durable.make_durable(tmp_path / "a" / "b", tmp_path, tmp_path / "missing")
    assert flushed == done == [str(tmp_path / "a" / "b")]  # one filesystem, flushed once
    if os.path.isdir("/dev/shm") and os.stat("/dev/shm").st_dev != os.stat(tmp_path).st_dev:
        flushed.clear()
        assert durable.make_durable(tmp_path, "/dev/shm") == [str(tmp_path), "/dev/shm"]


def test_nearest_existing_is_where_the_new_entry_goes(tmp_path):
    assert durable.nearest_existing(tmp_path / "x" / "y" / "z") == tmp_path
    assert durable.nearest_existing(tmp_path) == tmp_path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="syncfs(2) is Linux's")
def test_syncfs_is_the_real_system_call_on_linux(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 8192)
    assert durable.syncfs(tmp_path) == "syncfs"
    assert durable.syncfs(tmp_path / "f") == "syncfs"


def test_write_behind_flushes_while_work_goes_on_and_stops(tmp_path, flushed):
    with durable.WriteBehind(tmp_path, interval=0.05) as wb:
        time.sleep(0.4)
    n = len(flushed)
    assert n >= 3 and wb.flushes == n
    time.sleep(0.15)
    assert len(flushed) == n  # stopped
    with durable.WriteBehind(tmp_path, interval=60, immediate=True):
        time.sleep(0.2)
    assert len(flushed) == n + 1  # at once, not after the interval


def test_a_failed_background_flush_is_left_to_the_final_one(tmp_path, monkeypatch):
    def fail(p):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(durable, "syncfs", fail)
    with durable.WriteBehind(tmp_path, interval=0.01) as wb:
        time.sleep(0.1)
    assert wb.flushes == 0  # no exception escaped the thread; make_durable raises it


def test_timings_split_adds_up():
    t = Timings()
    with t.step("extract"):
        time.sleep(0.01)
    with t.step("sync"):
        pass
    t.add({"extract": 1.0, "replay": 2.0})
    d = t.as_dict()
    assert set(d) == {"extract", "sync", "replay"} and d["extract"] >= 1.01 and d["replay"] == 2.0


def test_a_write_error_reported_by_syncfs_fails_the_restore(tmp_path, monkeypatch):
    import ctypes

    from airflow_pg_incremental.core.errors import RestoreError

    def eio(fd):
        ctypes.set_errno(5)
        return -1

    monkeypatch.setattr(durable, "_syncfs_fn", lambda: eio)
    with pytest.raises(RestoreError, match="could not be written to disk .*Input/output error.*not durable"):
        durable.make_durable(tmp_path)
