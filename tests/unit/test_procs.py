"""core.procs: the registry of what the engine started, terminate_all() and the SIGTERM handler,
with real child processes and directories."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from airflow_pg_incremental.core import procs


def _living(match) -> list[int]:
    """Processes (not zombies) whose [pid, state, ppid, pgrp, ...] (from /proc/<pid>/stat) match."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            stat = [d, *fields]  # [pid, state, ppid, pgrp, ...]
            if fields[0] != "Z" and match(stat):
                out.append(int(d))
    return out


@pytest.fixture(autouse=True)
def registry():
    saved = [dict(r) for r in (procs._servers, procs._children, procs._dirs)]
    for r in (procs._servers, procs._children, procs._dirs):
        r.clear()
    yield
    procs.reset()
    for r, before in zip((procs._servers, procs._children, procs._dirs), saved):
        r.clear()
        r.update(before)


def test_terminate_all_kills_children_removes_directories_and_is_idempotent(tmp_path):
    child = subprocess.Popen(["sleep", "60"])
    group = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], start_new_session=True)
    procs.register_child(child)
    procs.register_child(group, group=True)
    scratch = tmp_path / "scratch"
    (scratch / "sub").mkdir(parents=True)
    (scratch / "sub" / "f").write_text("x")
    mine = tmp_path / "given"
    mine.mkdir()
    (mine / "made-here").write_text("x")
    procs.register_dir(scratch)
    procs.register_dir(mine, keep_root=True)

    done = procs.terminate_all("test")
    assert (done["children"], done["dirs"], done["errors"]) == (2, 2, [])
    assert child.wait(5) == -signal.SIGKILL and group.wait(5) == -signal.SIGKILL
    assert _living(lambda stat: int(stat[3]) == group.pid) == []  # the whole group is gone
    assert not scratch.exists() and mine.is_dir() and list(mine.iterdir()) == []
    assert procs.terminate_all("again") == {"children": 0, "servers": 0, "dirs": 0, "errors": []}
    assert procs.registered() == {"servers": [], "children": [], "dirs": []}


def test_nothing_new_starts_after_terminate_all(tmp_path):
    procs.terminate_all("test")
    with pytest.raises(procs.Terminated, match="stopping"):
        procs.check_running()
    late = subprocess.Popen(["sleep", "60"])
    with pytest.raises(procs.Terminated):
        procs.register_child(late)  # killed, not left running
    assert late.wait(5) == -signal.SIGKILL
    d = tmp_path / "late"
    d.mkdir()
    with pytest.raises(procs.Terminated):
        procs.register_dir(d)
    assert not d.exists()
    procs.reset()
    procs.check_running()


def test_forgotten_things_are_left_alone(tmp_path):
    child = subprocess.Popen(["sleep", "60"])
    try:
        procs.register_child(child)
        procs.forget_child(child)
        d = procs.register_dir(tmp_path / "kept")
        d.mkdir()
        procs.forget_dir(d)
        procs.terminate_all("test")
        assert child.poll() is None and d.is_dir()
    finally:
        child.kill()
        child.wait()


_PROGRAM = textwrap.dedent("""
    import subprocess, sys, time
    from airflow_pg_incremental.core import procs

    procs.install_sigterm_handler()
    child = subprocess.Popen(["sleep", "60"])
    procs.register_child(child)
    scratch = procs.register_dir(sys.argv[1])
    scratch.mkdir()
    try:
        print(child.pid, flush=True)
        child.wait()
        print("child ended on its own", flush=True)
    finally:
        print("finally ran", flush=True)
""")


def test_sigterm_handler_stops_everything_then_unwinds(tmp_path):
    """The handler a program installs: terminate_all(), then SystemExit(143) so `finally` runs."""
    scratch = tmp_path / "scratch"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(__file__)))}
    p = subprocess.Popen([sys.executable, "-c", _PROGRAM, str(scratch)], stdout=subprocess.PIPE, text=True, env=env)
    child_pid = int(p.stdout.readline())
    assert scratch.is_dir()
    p.send_signal(signal.SIGTERM)
    out = p.stdout.read()
    assert p.wait(10) == 128 + signal.SIGTERM
    assert "finally ran" in out and "child ended on its own" not in out
    assert not scratch.exists()
    assert _living(lambda stat: int(stat[0]) == child_pid) == []
