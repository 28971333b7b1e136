"""Fetch-ahead without a server: the plan (which segment names recovery asks for next along a
timeline path), the spool's names and the CRC-32 check before a hand-out, the fast path's argv
parsing, and the prefetcher and the call's side of the spool protocol together, in one process, on
a local repository of small (1 MB) segments with real long page headers."""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib

import pytest

from airflow_pg_incremental import walcmd
from airflow_pg_incremental.core import fetchahead as fa
from airflow_pg_incremental.core.errors import ChecksumMismatch
from airflow_pg_incremental.core.lsn import segment_name
from airflow_pg_incremental.core.wal import push_bytes

from .fakes import C, new_repo

MB = 1 << 20


def segment(tli: int, segno: int, size: int = MB, header_tli: int | None = None) -> bytes:
    """A WAL segment of `size` bytes whose long page header is that of (tli, segno)."""
    head = struct.pack("<HHIQI4xQII", 0xD118, 0x0002, header_tli or tli, segno * size, 0, 7, size, 8192)
    body = bytes([segno % 251, tli]) * ((size - len(head)) // 2)
    return head + body


def archive(repo, tli: int, segnos, size: int = MB) -> None:
    for s in segnos:
        push_bytes(repo, C, segment_name(tli, s, size), segment(tli, s, size), segment_size=size, checksum=False)


# -- the plan ----------------------------------------------------------------------------------
def test_plan_follows_the_timeline_path_like_postgresql():
    # timeline 2 left timeline 1 in segment 6 (LSN 0/600010 with 1 MB segments), timeline 3 left 2 at 0/A00000
    begins = fa.timeline_begins({1: 0x600010, 2: 0xA00000, 3: None}, MB)
    assert begins == [(1, 0), (2, 6), (3, 10)]
    assert [fa.predicted_timeline(begins, s) for s in (0, 5, 6, 9, 10, 40)] == [1, 1, 2, 2, 3, 3]
    assert fa.plan_names(begins, 3, 4, MB) == [segment_name(1, 4, MB), segment_name(1, 5, MB),
                                               segment_name(2, 6, MB), segment_name(2, 7, MB)]
    # 16 MB segments: names cross a log file boundary (256 segments per 4 GB)
    assert fa.plan_names([(1, 0)], 0xFE, 2, 16 * MB) == ["0000000100000000000000FF", "000000010000000100000000"]


def test_plan_for_request_anchors_on_the_requested_timeline(tmp_path):
    repo = new_repo(tmp_path / "repo")
    archive(repo, 1, range(1, 3))
    push_bytes(repo, C, "00000002.history", b"1\t0/600000\tno recovery target specified\n")
    # recovery_target_timeline 'latest': timeline 1 before segment 6, then 2
    assert fa.plan_for_request(repo, C, segment_name(1, 2, MB), MB) == [(1, 0), (2, 6)]
    assert fa.plan_for_request(repo, C, segment_name(2, 7, MB), MB) == [(1, 0), (2, 6)]
    # timeline 1 asked for past the switch: recovery follows timeline 1 (target timeline 1 or 'current')
    assert fa.plan_for_request(repo, C, segment_name(1, 8, MB), MB) == [(1, 0)]
    # a timeline with no history file archived: that timeline alone
    assert fa.plan_for_request(repo, C, segment_name(5, 8, MB), MB) == [(5, 0)]


# -- the spool's names and the hand-out check ---------------------------------------------------------
def test_spool_name_carries_the_crc_and_only_ready_names_parse():
    data = segment(1, 3)
    name = fa.ready_name("000000010000000000000003", fa.content_checksum(data))
    assert name == f"000000010000000000000003.{zlib.crc32(data):08x}"
    assert fa.parse_ready_name(name) == ("000000010000000000000003", zlib.crc32(data))
    for other in ("000000010000000000000003.part", "000000010000000000000003.error", "lock", "request",
                  "000000010000000000000003.1234567", "00000002.history", "000000010000000000000003.ABCDEF12",
                  "0000_0001000000000000003.abcdef12"):
        assert fa.parse_ready_name(other) is None


def test_the_call_hands_out_only_a_file_matching_its_crc(tmp_path):
    spool, dest = tmp_path / "spool", tmp_path / "RECOVERYXLOG"
    spool.mkdir()
    seg = "000000010000000000000003"
    data = bytearray(segment(1, 3))
    ready = fa.ready_name(seg, fa.content_checksum(data))
    (spool / ready).write_bytes(data)
    assert walcmd._ready_file(str(spool), seg) == ready  # the call finds what the prefetcher writes
    assert walcmd._ready_file(str(spool), "000000010000000000000004") is None
    data[MB // 2] ^= 0x01  # one bit flipped after it was spooled
    (spool / ready).write_bytes(data)
    assert walcmd._take(str(spool), ready, seg, str(dest)) is False
    assert not dest.exists() and not (spool / ready).exists()  # removed, never handed out
    # an empty file under the name of an empty file's CRC is not a segment either
    (spool / f"{seg}.00000000").write_bytes(b"")
    assert walcmd._take(str(spool), f"{seg}.00000000", seg, str(dest)) is False and not dest.exists()
    data[MB // 2] ^= 0x01
    (spool / ready).write_bytes(data)
    assert walcmd._take(str(spool), ready, seg, str(dest)) is True
    assert dest.read_bytes() == data and not (spool / ready).exists()


def test_check_segment_refuses_a_wrong_or_partial_segment():
    name = segment_name(2, 6, MB)
    fa.check_segment(name, segment(2, 6, header_tli=1))  # the switch segment: written on timeline 1
    with pytest.raises(ChecksumMismatch, match="not that segment"):
        fa.check_segment(name, segment(2, 7))
    with pytest.raises(ChecksumMismatch, match="not a whole segment"):
        fa.check_segment(name, segment(2, 6)[: MB // 2])
    with pytest.raises(ChecksumMismatch, match="not a whole segment"):
        fa.check_segment(name, segment(2, 6), 16 * MB)


# -- the fast path's argv ------------------------------------------------------------------------------
def test_fast_args_parse_fetch_and_push_without_argparse():
    a = walcmd._fast_args(["fetch", "--repo", "s3://b/p", "--cluster", "main", "--ahead", "12", "--parallel", "3",
                           "--idle-exit", "5", "000000010000000000000003", "pg_wal/RECOVERYXLOG"])
    assert a == {"cmd": "fetch", "repo": "s3://b/p", "cluster": "main", "ahead": "12", "parallel": "3",
                 "idle_exit": "5", "positional": ["000000010000000000000003", "pg_wal/RECOVERYXLOG"]}
    assert walcmd._fast_args(["fetch", "--env-file", "/e", "F", "P"])["env_file"] == "/e"
    for unusual in (["fetch", "F"], ["fetch", "F", "P", "X"], ["fetch", "--bogus", "1", "F", "P"],
                    ["fetch", "F", "P", "--repo"], ["fetch", "--spool", "s", "F", "P"], [], ["other", "x"]):
        assert walcmd._fast_args(unusual) is None, unusual
    push = walcmd._fast_args(["push", "--repo", "/r", "--cluster", "c", "--spool", "s", "pg_wal/X"])
    assert push == {"cmd": "push", "repo": "/r", "cluster": "c", "spool": "s", "positional": ["pg_wal/X"]}
    assert walcmd._fast_args(["push", "--idle-exit", "3", "pg_wal/X"])["idle_exit"] == "3"
    assert walcmd._fast_args(["push", "--bogus", "3", "pg_wal/X"]) is None


def test_bad_fetch_arguments_stop_recovery_never_end_it(tmp_path):
    # exit 2 (argparse) or 1 would read as "not archived": recovery would end early
    assert walcmd.main(["fetch", "--repo", "/r", "--cluster", "c", "--ahead", "many", "F", str(tmp_path / "P")]) \
        == walcmd.HARD_FAIL
    assert walcmd.main(["fetch", "--repo", "/r", "--cluster", "c", "000000010000000000000003"]) == walcmd.HARD_FAIL


# -- the prefetcher and the calls, together ---------------------------------------------------------------
class Recovery:
    """A data directory 'in recovery' (this process stands in for the postmaster), its spool, and a
    prefetcher started in a thread by the call's own start hook (holding the call's lock fd)."""

    def __init__(self, tmp_path, repo, **opts):
        self.dd = tmp_path / "data"
        (self.dd / "pg_wal").mkdir(parents=True)
        (self.dd / "postmaster.pid").write_text(f"{os.getpid()}\n")
        (self.dd / "recovery.signal").touch()
        self.spool = str(self.dd / "pg_wal" / fa.SPOOL_DIR)
        self.repo, self.opts, self.threads, self.stopped = repo, opts, [], []
        self.cluster = C

    def start(self, lock_fd):
        def run():
            try:
                p = fa.Prefetcher(self.repo, self.cluster, self.spool, str(self.dd), **self.opts)
                self.stopped.append(p.run())
            finally:
                os.close(lock_fd)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)

    def ask(self, name: str) -> tuple[bool, str | None]:
        dest = self.dd / "pg_wal" / "RECOVERYXLOG"
        dest.unlink(missing_ok=True)
        got = walcmd._from_spool(name, str(dest), self.spool, self.start)
        if got[0] is True and len(name) == 24:
            assert dest.read_bytes() == segment(int(name[:8], 16), int(name[16:], 16))
        return got

    def settle(self, timeout: float = 5) -> None:
        """Wait until the prefetcher has acted on the newest request."""
        deadline = time.monotonic() + timeout
        while walcmd._read_small(os.path.join(self.spool, "ack")) != walcmd._read_small(
                os.path.join(self.spool, "request")):
            assert time.monotonic() < deadline
            time.sleep(0.005)

    def spooled(self) -> list[str]:
        return sorted(fa.parse_ready_name(e)[0] for e in os.listdir(self.spool) if fa.parse_ready_name(e))

    def wait_spooled(self, names: list[str], timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while set(names) - set(self.spooled()):
            assert time.monotonic() < deadline, (names, self.spooled())
            time.sleep(0.01)


def test_prefetcher_follows_the_timeline_switch_and_stops_at_the_end(tmp_path):
    repo = new_repo(tmp_path / "repo")
    archive(repo, 1, range(1, 12))  # timeline 1 went on after the switch (an abandoned future)
    archive(repo, 2, range(6, 10))
    push_bytes(repo, C, "00000002.history", b"1\t0/600000\tno recovery target specified\n")
    rec = Recovery(tmp_path, repo, window=3, parallel=2)
    names = [segment_name(1, s, MB) for s in range(2, 6)] + [segment_name(2, s, MB) for s in range(6, 10)]
    for n in names:
        if n != names[0]:
            rec.wait_spooled([n])  # fetched ahead, along the path recovery follows
        assert rec.ask(n) == (True, None), n
        rec.settle()
        assert all(s > n[8:] for s in (x[8:] for x in rec.spooled())), (n, rec.spooled())
        assert len(rec.spooled()) <= 3
    assert len(rec.threads) == 1  # one prefetcher for the whole recovery
    # the end of the archive: nothing past it is spooled; asked for it, the prefetcher says it is
    # not archived (the repository holds the cluster), and the call exits 1 on that
    assert rec.ask(segment_name(2, 10, MB)) == (walcmd.MISSING, None)
    assert rec.spooled() == []
    (rec.dd / "recovery.signal").unlink()  # recovery ended: the prefetcher removes itself and its spool
    rec.threads[0].join(5)
    assert rec.stopped == ["recovery ended"] and not os.path.exists(rec.spool)


def test_a_request_off_the_plan_is_fetched_and_replanned(tmp_path):
    repo = new_repo(tmp_path / "repo")
    archive(repo, 1, range(1, 12))
    archive(repo, 2, range(6, 10))
    push_bytes(repo, C, "00000002.history", b"1\t0/600000\tno recovery target specified\n")
    rec = Recovery(tmp_path, repo, window=2, parallel=1)
    for s in range(3, 10):  # recovery_target_timeline = 1: timeline 1 past the switch
        assert rec.ask(segment_name(1, s, MB)) == (True, None), s
    rec.wait_spooled([segment_name(1, 10, MB), segment_name(1, 11, MB)])


def test_history_files_and_not_archived_answers_come_from_the_prefetcher(tmp_path):
    """PostgreSQL asks for the next timeline's history file at the start and the end of a
    recovery, and for the segment past the archive's end: the prefetcher answers both (one GET
    with its open repository) instead of a direct fetch per call."""
    repo = new_repo(tmp_path / "repo")
    archive(repo, 1, range(1, 4))
    history = b"1\t0/600000\tno recovery target specified\n"
    push_bytes(repo, C, "00000002.history", history)
    rec = Recovery(tmp_path, repo, window=2)
    assert rec.ask("00000003.history") == (walcmd.MISSING, None)  # the first call: starts the prefetcher
    assert rec.ask("00000002.history") == (True, None)
    assert (rec.dd / "pg_wal" / "RECOVERYXLOG").read_bytes() == history
    for s in (1, 2, 3):
        assert rec.ask(segment_name(1, s, MB)) == (True, None)
    assert rec.ask(segment_name(1, 4, MB)) == (walcmd.MISSING, None)
    # archived since: a new request fetches again (a .missing note from before the request is gone)
    archive(repo, 1, [4])
    assert rec.ask(segment_name(1, 4, MB)) == (True, None)
    assert len(rec.threads) == 1


def test_not_archived_is_said_only_of_a_repository_holding_the_cluster(tmp_path):
    """The prefetcher of a misspelled cluster finds nothing: that is an error for the call (which
    then fetches directly and exits 126), never 'not archived'."""
    repo = new_repo(tmp_path / "repo")
    archive(repo, 1, range(1, 4))
    rec = Recovery(tmp_path, repo, window=2)
    rec.cluster = "nosuch"
    taken, note = rec.ask(segment_name(1, 1, MB))
    assert taken is False and "ClusterNotFound" in note and "nosuch" in note


def test_a_prefetch_error_is_reported_never_read_as_not_archived(tmp_path):
    repo = new_repo(tmp_path / "repo")
    archive(repo, 1, range(1, 4))
    key = f"{C}/wal/00000001/{segment_name(1, 3, MB)}.zst"
    repo.put_bytes(key, repo.get_bytes(key)[:-9])  # a truncated object
    rec = Recovery(tmp_path, repo, window=2)
    assert rec.ask(segment_name(1, 2, MB)) == (True, None)
    taken, note = rec.ask(segment_name(1, 3, MB))
    assert not taken and "ChecksumMismatch" in note and "truncated" in note


def test_idle_prefetcher_removes_itself_and_its_spool(tmp_path):
    repo = new_repo(tmp_path / "repo")
    archive(repo, 1, range(1, 6))
    rec = Recovery(tmp_path, repo, window=2, idle_exit=0.5)
    assert rec.ask(segment_name(1, 1, MB)) == (True, None)
    rec.threads[0].join(5)
    assert rec.stopped == ["no request for 0.5s"] and not os.path.exists(rec.spool)


def test_a_postmaster_of_another_user_counts_as_running(tmp_path, monkeypatch):
    """kill(pid, 0) on a live process of another user fails with EPERM: the server runs (before,
    the prefetcher took it for stopped and left at once, so every call was a direct fetch)."""
    dd = tmp_path / "data"
    (dd / "pg_wal").mkdir(parents=True)
    (dd / "postmaster.pid").write_text("1\n")  # pid 1: alive; EPERM as a normal user, simulated for root
    (dd / "recovery.signal").touch()
    p = fa.Prefetcher(new_repo(tmp_path / "r"), C, str(dd / "pg_wal" / fa.SPOOL_DIR), str(dd))
    os.mkdir(p.spool)

    def eperm(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(fa.os, "kill", eperm)
    assert p._why_stop() is None
    (dd / "postmaster.pid").write_text("999999999\n")
    monkeypatch.undo()
    assert p._why_stop() == "the server stopped"
