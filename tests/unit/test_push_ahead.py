"""The resident pusher (core/pushahead.Pusher) in one process, on a local repository: the order it
stores ready files in, the markers a call takes, giving a file up to its call, and why it stops."""

from __future__ import annotations

import fcntl
import os
import threading
import time

from airflow_pg_incremental import walcmd_rest
from airflow_pg_incremental.core import pushahead
from airflow_pg_incremental.core.wal import fetch_bytes

from .fakes import C, new_repo

MB = 1 << 20


def pg_wal(tmp_path, names):
    d = tmp_path / "data" / "pg_wal"
    (d / "archive_status").mkdir(parents=True)
    spool = d / "pgincr_spool"
    spool.mkdir()
    for i, n in enumerate(names):
        (d / n).write_bytes(bytes([i]) * MB)
        (d / "archive_status" / f"{n}.ready").touch()
    return d, spool


def start(repo, d, spool, **kw):
    fd = os.open(spool / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    log = []
    p = pushahead.Pusher(repo, C, str(d), str(spool), fd, str(d.parent), log=log.append, **kw)
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("why", p.run()))
    t.start()
    return p, t, out, log


def wait_for(what, timeout=10):
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_history_files_first_then_by_name(tmp_path):
    d, _ = pg_wal(tmp_path, ["000000010000000000000003", "00000002.history", "000000010000000000000002"])
    assert pushahead._ready_names(str(d)) == ["00000002.history", "000000010000000000000002",
                                              "000000010000000000000003"]


def test_it_stores_ready_files_and_leaves_markers_a_call_takes(tmp_path):
    repo = new_repo(tmp_path / "repo")
    names = [f"00000001000000000000000{i}" for i in range(1, 5)]
    d, spool = pg_wal(tmp_path, names)
    p, t, out, log = start(repo, d, spool, idle_exit=0.3)
    t.join(10)
    assert out["why"].startswith("nothing to push") and p.stats["pushed"] == 4
    for n in names:  # the markers stay while the files are ready (their calls have not come yet)
        assert walcmd_rest._take_marker(str(spool), str(d / n), n)
        assert fetch_bytes(repo, C, n) == (d / n).read_bytes()


def test_a_file_that_fails_twice_is_left_to_its_call(tmp_path, monkeypatch):
    repo = new_repo(tmp_path / "repo")
    names = ["000000010000000000000001", "000000010000000000000002"]
    d, spool = pg_wal(tmp_path, names)
    real = repo.put_bytes

    def put_bytes(key, data, **kw):
        if names[0] in key:
            raise OSError("disk on fire")
        return real(key, data, **kw)
    monkeypatch.setattr(repo, "put_bytes", put_bytes)
    p, t, out, log = start(repo, d, spool, idle_exit=0.3)
    wait_for(lambda: (spool / f"{names[0]}.failed").exists())
    assert "disk on fire" in (spool / f"{names[0]}.failed").read_text()
    t.join(10)
    assert p.stats["failed"] == 2 and p.stats["given_up"] == 1 and p.stats["pushed"] == 1
    assert any("gave up on" in ln for ln in log)


def test_it_stops_when_its_lock_file_is_replaced_or_the_server_stops(tmp_path):
    repo = new_repo(tmp_path / "repo")
    d, spool = pg_wal(tmp_path, [])
    p, t, out, _ = start(repo, d, spool, idle_exit=30)
    os.unlink(spool / "lock")
    (spool / "lock").touch()
    t.join(5)
    assert "lock" in out["why"]
    pid = os.fork()
    if not pid:
        os._exit(0)
    os.waitpid(pid, 0)  # a process id that is gone
    (d.parent / "postmaster.pid").write_text(f"{pid}\n")
    p, t, out, _ = start(repo, d, spool, idle_exit=30)
    t.join(5)
    assert "server stopped" in out["why"]
