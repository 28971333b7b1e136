"""What the engine started that must not outlive it, and stopping all of it at once.

PostgreSQL servers started with pg_ctl run in a session of their own: they survive the process
that started them unless they are stopped explicitly. So every server the engine starts
(PgServer.start: restores, restore tests, PITR, the demo's source), every long-running child
program (pg_basebackup, pg_receivewal) and every scratch directory is registered here while it
exists, and forgotten when it is stopped or removed.

terminate_all() kills the children, stops the servers (pg_ctl stop -m immediate, SIGQUIT to the
postmaster if that fails), stops any server still running on a data directory inside a registered
directory, and removes the directories. It is what an operator's on_kill calls, and what the
SIGTERM handler of the CLI and the demo (install_sigterm_handler) calls. It takes no lock (the
registries change by single dict operations, atomic under the GIL), so it is safe in a signal
handler that interrupted the main thread anywhere, and from another thread; it is idempotent.
Afterwards nothing new may start in this process: registering (and so PgServer.start) raises
Terminated, so work that carries on after a kill fails promptly instead of starting over.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

from .errors import PgIncrError

log = logging.getLogger(__name__)

# id(object) -> (object, pid of the registering process); a forked child ignores its parent's entries
_servers: dict[int, tuple[object, int]] = {}
_children: dict[int, tuple[subprocess.Popen, bool, int]] = {}
_dirs: dict[str, tuple[bool, int]] = {}
_state: dict = {"terminated": None, "signalled": False}


class Terminated(PgIncrError):
    """This process was told to stop (SIGTERM, a killed Airflow task): nothing new is started."""


def terminated() -> str | None:
    """Why terminate_all() ran in this process, or None."""
    return _state["terminated"]


def check_running() -> None:
    """Raise Terminated once terminate_all() has run."""
    if _state["terminated"]:
        raise Terminated(f"pgincr is stopping ({_state['terminated']}): what it had started was stopped and "
                         "removed; nothing new is started. Run the operation again.")


def register_server(srv) -> None:
    """A PgServer about to start (registered before pg_ctl runs, so a kill during the start finds it)."""
    check_running()
    _servers[id(srv)] = (srv, os.getpid())


def forget_server(srv) -> None:
    _servers.pop(id(srv), None)


def register_child(proc: subprocess.Popen, *, group: bool = False) -> None:
    """A child program to kill on termination; `group`: it leads its own process group (killed whole)."""
    _children[id(proc)] = (proc, group, os.getpid())
    if _state["terminated"]:
        _children.pop(id(proc), None)
        _kill(proc, group)
        check_running()


def forget_child(proc: subprocess.Popen) -> None:
    _children.pop(id(proc), None)


def register_dir(path: str | os.PathLike, *, keep_root: bool = False) -> Path:
    """A scratch directory to remove on termination (`keep_root`: only its contents, e.g. a
    directory the user gave that existed before)."""
    p = Path(path).absolute()
    _dirs[str(p)] = (keep_root, os.getpid())
    if _state["terminated"]:
        _dirs.pop(str(p), None)
        remove_dir(p, keep_root=keep_root)
        check_running()
    return p


def forget_dir(path: str | os.PathLike) -> None:
    _dirs.pop(str(Path(path).absolute()), None)


def release(obj) -> None:
    """Hand a running server or child over to someone else: terminate_all() no longer stops it."""
    _servers.pop(id(obj), None)
    _children.pop(id(obj), None)


def registered() -> dict:
    """What is registered now (for logs and tests)."""
    me = os.getpid()
    return {"servers": [str(s.data_dir) for s, pid in list(_servers.values()) if pid == me],
            "children": [p.pid for p, _, pid in list(_children.values()) if pid == me],
            "dirs": [d for d, (_, pid) in list(_dirs.items()) if pid == me]}


def reset() -> None:
    """Forget a past terminate_all() (a process that goes on afterwards, e.g. a test session)."""
    _state["terminated"] = None
    _state["signalled"] = False


def terminate_all(reason: str = "terminated") -> dict:
    """Stop everything registered by this process; returns what was done (counts and errors)."""
    _state["terminated"] = _state["terminated"] or reason
    me = os.getpid()
    out: dict = {"children": 0, "servers": 0, "dirs": 0, "errors": []}
    for key, (proc, group, pid) in list(_children.items()):
        if pid == me and _children.pop(key, None) is not None:
            out["children"] += _kill(proc, group)
    for key, (srv, pid) in list(_servers.items()):
        if pid == me and _servers.pop(key, None) is not None:
            try:
                out["servers"] += _stop_server(srv)
            except Exception as e:  # go on with the rest
                out["errors"].append(f"server on {srv.data_dir}: {e}")
    for path, (keep_root, pid) in sorted(_dirs.items(), key=lambda kv: -len(kv[0])):
        if pid == me and _dirs.pop(path, None) is not None:
            try:
                remove_dir(path, keep_root=keep_root)
                out["dirs"] += 1
            except Exception as e:
                out["errors"].append(f"directory {path}: {e}")
    if out["children"] or out["servers"] or out["dirs"] or out["errors"]:
        log.warning("%s: killed %d child program(s), stopped %d server(s), removed %d scratch director%s%s", reason,
                    out["children"], out["servers"], out["dirs"], "y" if out["dirs"] == 1 else "ies",
                    f"; errors: {'; '.join(out['errors'])}" if out["errors"] else "")
    return out


def _kill(proc: subprocess.Popen, group: bool) -> int:
    """SIGKILL, without waiting: the thread that started the child reaps it (waiting here could
    deadlock with that thread's wait when we run in a signal handler on the same thread)."""
    if proc.poll() is not None:
        return 0
    try:
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        return 0
    return 1


def _stop_server(srv, start_grace: float = 3.0) -> int:
    pidfile = Path(srv.data_dir) / "postmaster.pid"
    if getattr(srv, "starting", False):
        # pg_ctl start is under way: the postmaster writes its pid file at once; wait for it
        deadline = time.monotonic() + start_grace
        while not pidfile.exists() and getattr(srv, "starting", False) and time.monotonic() < deadline:
            time.sleep(0.05)
    if not pidfile.exists():
        return 0
    try:
        srv.stop("immediate")
    except Exception as e:
        log.warning("pg_ctl stop of %s failed (%s); signalling the postmaster", srv.data_dir, e)
    stop_postmaster(srv.data_dir)  # when pg_ctl could not
    return 1


def postmaster_pid(data_dir: str | os.PathLike) -> int | None:
    """The pid of a postmaster running on `data_dir` (its pid file, checked against the process's
    working directory, so a recycled pid is never taken for it), or None."""
    d = Path(data_dir)
    try:
        pid = int((d / "postmaster.pid").read_text().split("\n", 1)[0])
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except (OSError, ValueError):
        return None
    cwd = cwd.removesuffix(" (deleted)")
    return pid if os.path.realpath(d) == cwd or str(d.absolute()) == cwd else None


def postmaster_running(data_dir: str | os.PathLike) -> bool:
    pid = postmaster_pid(data_dir)
    return pid is not None and _alive(pid)


def stop_postmaster(data_dir: str | os.PathLike, timeout: float = 10.0) -> bool | None:
    """Immediate shutdown (SIGQUIT) of the postmaster on `data_dir`, SIGKILL after `timeout`.
    None when none runs there, True once it is gone."""
    pid = postmaster_pid(data_dir)
    if pid is None:
        return None
    sig = signal.SIGQUIT
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            sig = signal.SIGKILL
        for _ in range(20):
            if not _alive(pid):
                return True
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def stop_servers_under(path: str | os.PathLike) -> list[str]:
    """Stop every postmaster whose data directory lies inside `path` (servers started by a process
    that died, e.g. an Airflow task killed with SIGKILL). Returns their data directories."""
    stopped = []
    for dirpath, dirs, files in os.walk(path):
        if "postmaster.pid" in files or "PG_VERSION" in files:
            dirs[:] = []  # a data directory: nothing below it is another one
            if stop_postmaster(dirpath):
                stopped.append(dirpath)
    return stopped


def remove_dir(path: str | os.PathLike, *, keep_root: bool = False) -> None:
    """Stop the servers inside `path`, then remove it (`keep_root`: only what it holds)."""
    p = Path(path)
    if not p.is_dir() or p.is_symlink():
        return
    stop_servers_under(p)
    if not keep_root:
        shutil.rmtree(p, ignore_errors=True)
        return
    for child in list(p.iterdir()):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def install_sigterm_handler() -> object:
    """For a program (the CLI, the demo): on SIGTERM, terminate_all(), then raise SystemExit(143)
    in the main thread so that `finally` blocks run and the program ends (a second SIGTERM during
    that cleanup only repeats terminate_all). Returns the previous handler; a no-op (None) outside
    the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def _on_sigterm(signum, frame):
        terminate_all(f"signal {signal.Signals(signum).name}")
        if not _state["signalled"]:
            _state["signalled"] = True
            raise SystemExit(128 + signum)

    return signal.signal(signal.SIGTERM, _on_sigterm)
