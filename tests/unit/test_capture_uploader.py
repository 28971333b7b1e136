"""The capture's stores run several at a time (core.capture._Uploader): every complete file is
stored once, the result counts them in name order, a failure is raised (so the slot does not
move), and pg_receivewal's unfinished files are left alone."""

from __future__ import annotations

import threading
import time

import pytest

from airflow_pg_incremental.core import capture
from airflow_pg_incremental.core.lsn import segment_name
from airflow_pg_incremental.core.wal import PushResult

SEG = 1024 * 1024


class Recorder:
    """Stands in for wal.push_file: records what is stored and how many stores overlap."""

    def __init__(self, fail: str | None = None):
        self.stored, self.fail, self.now, self.most = [], fail, 0, 0
        self.lock = threading.Lock()

    def __call__(self, repo, cluster, path, *, name, level):
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(0.05)
        with self.lock:
            self.now -= 1
            self.stored.append(name)
        if name == self.fail:
            raise OSError(28, "No space left on device")
        return PushResult(name, "stored", SEG, SEG // 4, None)


def staged(tmp_path, count: int):
    names = [segment_name(1, 10 + i, SEG) for i in range(count)]
    for n in names:
        (tmp_path / n).write_bytes(b"\0" * SEG)
    (tmp_path / (segment_name(1, 10 + count, SEG) + ".partial")).write_bytes(b"\0" * SEG)
    (tmp_path / segment_name(1, 11 + count, SEG)).write_bytes(b"\0" * 100)  # being written: not whole
    (tmp_path / "00000002.history").write_text("1\t0/A000000\tno recovery target specified\n")
    return names


def test_complete_files_are_stored_several_at_a_time_and_counted_in_order(tmp_path, monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(capture, "push_file", rec)
    names = staged(tmp_path, 6)
    result = {"segments": 0, "history_files": 0, "raw_bytes": 0, "stored_bytes": 0, "first_segment": None,
              "last_segment": None}
    up = capture._Uploader(None, "c", str(tmp_path), result, 3, SEG, threads=3)
    try:
        up.submit_complete()
        assert up.newest_complete == 10 + 5
        up.finish()
    finally:
        up.close()
    assert sorted(rec.stored) == sorted(names + ["00000002.history"]) and rec.most >= 2
    assert result["segments"] == 6 and result["history_files"] == 1 and result["raw_bytes"] == 6 * SEG
    assert (result["first_segment"], result["last_segment"]) == (names[0], names[-1])
    assert [d["name"] for d in result["_stored"]] == names
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["00000002.history", segment_name(1, 16, SEG) + ".partial", segment_name(1, 17, SEG)])


def test_a_failed_store_is_raised(tmp_path, monkeypatch):
    names = staged(tmp_path, 4)
    monkeypatch.setattr(capture, "push_file", Recorder(fail=names[1]))
    result = {"segments": 0, "history_files": 0, "raw_bytes": 0, "stored_bytes": 0, "first_segment": None,
              "last_segment": None}
    up = capture._Uploader(None, "c", str(tmp_path), result, 3, SEG, threads=2)
    with pytest.raises(OSError, match="No space left"):
        try:
            up.finish()
        finally:
            up.close()
    assert (tmp_path / names[1]).exists()  # not stored: kept (the slot does not move past it)


def test_threads_default_to_the_cores_at_most_four():
    assert 1 <= capture.capture_threads() <= 4
