"""Push-ahead for archive_command: the resident pusher (walcmd push starts it; the mirror of
core/fetchahead.py).

PostgreSQL's archiver calls archive_command once per WAL file, in order, and waits for each. A call
that imports zstandard and the repository layer (and boto3) and opens a client costs far more CPU
than storing the segment. So the first call that finds no pusher forks ONE (holding the flock of
the spool, so exactly one runs) with the drivers loaded; it stays while PostgreSQL produces WAL:
it watches pg_wal/archive_status (every POLL seconds: one listdir), stores every .ready file with
one repository client and a few threads, and leaves a marker for each in the spool. The call for a
file finds its marker (checked against the file's inode, size, mtime and ctime) and exits 0:
walcmd.sh with `stat` alone, walcmd.py with the standard library only. A marker is written only after the object is durably stored (local: fsync and
rename; S3: PUT acknowledged), so no file is acknowledged before it is stored.

The spool (pg_wal/pgincr_spool/):

    lock            flock held by the pusher while it runs
    pid             its process id
    <name>.stored   "<inode> <size> <mtime> <ctime> <sha256|-> <stored|exists>" (fetchahead.stat_key
                    of the file, then the result): stored. The call leaves it (walcmd.sh cannot
                    remove it without one more process); the pusher removes the markers of files
                    PostgreSQL no longer marks ready, every CHECK seconds and when it leaves
    <name>.busy     locked (flock) while the pusher stores the file: a call waits on it
    <name>.failed   the pusher gave up on it (GIVE_UP failed attempts): the error. The call for it
                    pushes it itself at once and returns the real result; it removes the note once
                    the file is stored
    walpush.log     the pusher's start, give-ups and exit

It leaves after `idle_exit` seconds with nothing to push, when the server stops (postmaster.pid
gone or its process dead, when there was one at the start), when its lock is lost (the spool or the
lock file removed or replaced) and when the spool is removed. Killed (even with kill -9), it leaves
no marker for a file it had not stored: the call for that file finds the lock free and pushes it
itself; the next call starts a new pusher.
"""

from __future__ import annotations

import os
import time

from .fetchahead import stat_key

POLL = 0.01  # seconds between two looks at archive_status
CHECK = 0.2  # seconds between two checks of the server and the lock
GIVE_UP = 2  # failed attempts after which a file is left to the call (its .failed note)
REPUSH_AFTER = 5.0  # a file pushed but still ready, without its marker, this long after: push it again
STALE_MARKER_S = 86400.0  # markers of files no longer ready go at exit; any marker older than this too


def _ready_names(pg_wal: str) -> list[str]:
    """The ready files, history files first (PostgreSQL archives them first), then by name."""
    try:
        names = os.listdir(os.path.join(pg_wal, "archive_status"))
    except OSError:
        return []
    return sorted((n[:-6] for n in names if n.endswith(".ready")), key=lambda n: (not n.endswith(".history"), n))


def _write_note(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class Pusher:
    def __init__(self, repo, cluster: str, pg_wal: str, spool: str, lock_fd: int, data_dir: str, *,
                 ahead: int = 64, parallel: int = 2, idle_exit: float = 30.0, level: int = 3, log=None):
        self.repo, self.cluster, self.pg_wal, self.spool = repo, cluster, pg_wal, spool
        self.lock_fd, self.data_dir = lock_fd, data_dir
        self.ahead, self.parallel, self.idle_exit, self.level = max(1, ahead), max(1, parallel), idle_exit, level
        self.log = log or (lambda msg: None)
        self.inflight: dict = {}  # name -> future
        self.pushed_at: dict[str, float] = {}  # name -> when its marker was written
        self.failures: dict[str, int] = {}
        self.given_up: set[str] = set()
        self.stats = {"pushed": 0, "exists": 0, "failed": 0, "given_up": 0, "polls": 0}
        self.server_pid = self._server_pid()

    # the world outside ---------------------------------------------------------------------------
    def _server_pid(self) -> int | None:
        try:
            with open(os.path.join(self.data_dir, "postmaster.pid")) as f:
                return int(f.readline())
        except (OSError, ValueError):
            return None  # not run by a server (e.g. by hand): only the idle time ends it

    def why_stop(self) -> str | None:
        if self.server_pid is not None:
            if self._server_pid() != self.server_pid:
                return "the server stopped (postmaster.pid gone or replaced)"
            try:
                os.kill(self.server_pid, 0)
            except ProcessLookupError:
                return "the server stopped (its process is gone)"
            except PermissionError:
                pass
        try:
            if os.stat(os.path.join(self.spool, "lock")).st_ino != os.fstat(self.lock_fd).st_ino:
                return "its lock file was replaced"
        except OSError:
            return "its lock file or the spool was removed"
        return None

    # one file ----------------------------------------------------------------------------------
    def _marker(self, name: str) -> str:
        return os.path.join(self.spool, name + ".stored")

    def _push_one(self, name: str):
        """Store one file and leave its marker, holding <name>.busy locked meanwhile: a call that
        comes for it waits on that lock (walcmd.sh: `flock`, no process polling), then finds the
        marker, or finds none (a failure, the pusher killed) and carries on in walcmd.py."""
        import fcntl

        from .wal import push_file

        path = os.path.join(self.pg_wal, name)
        busy = os.open(os.path.join(self.spool, name + ".busy"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(busy, fcntl.LOCK_EX)
            try:
                r = push_file(self.repo, self.cluster, path, name=name, level=self.level, checksum=False)
            except FileNotFoundError:
                return None  # archived and recycled meanwhile
            # plain text, not JSON: the call reads it with the shell's `read` or the standard library
            _write_note(self._marker(name), f"{stat_key(os.stat(path))} {r.raw_sha256 or '-'} {r.status}\n")
            return r
        finally:
            os.close(busy)  # the lock goes with it

    def _collect(self) -> None:
        for name, fut in list(self.inflight.items()):
            if not fut.done():
                continue
            del self.inflight[name]
            try:
                r = fut.result()
            except Exception as e:
                self._failed(name, e)
                continue
            self.pushed_at[name] = time.monotonic()
            self.failures.pop(name, None)
            if r is not None:
                self.stats["pushed" if r.status == "stored" else "exists"] += 1

    def _failed(self, name: str, e: Exception) -> None:
        n = self.failures[name] = self.failures.get(name, 0) + 1
        self.stats["failed"] += 1
        self.log(f"push ahead of {name} failed ({n}x): {type(e).__name__}: {e}")
        if n >= GIVE_UP:
            self.given_up.add(name)
            self.stats["given_up"] += 1
            _write_note(os.path.join(self.spool, name + ".failed"), f"{type(e).__name__}: {e}\n")
            self.log(f"gave up on {name}: the archive_command call for it pushes it itself")

    def _todo(self, ready: list[str], now: float) -> list[str]:
        out = []
        room = self.ahead - len(self.inflight)
        for name in ready:
            if len(out) >= room:
                break
            if name in self.inflight or name in self.given_up:
                continue
            at = self.pushed_at.get(name)
            if at is not None and now - at < REPUSH_AFTER:
                continue  # its call took the marker; the archiver is about to mark it done
            if os.path.exists(self._marker(name)):
                self.pushed_at.setdefault(name, now)
                continue
            out.append(name)
        return out

    def _forget(self, ready: list[str]) -> None:
        """Files no longer ready (PostgreSQL archived them) leave the bookkeeping."""
        keep = set(ready)
        for d in (self.pushed_at, self.failures):
            for n in [n for n in d if n not in keep]:
                del d[n]
        self.given_up &= keep

    # the loop ----------------------------------------------------------------------------------
    def run(self) -> str:
        from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

        pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="pgincr-push")
        busy_at, next_check, why = time.monotonic(), 0.0, None
        try:
            while why is None:
                ready = _ready_names(self.pg_wal)
                self.stats["polls"] += 1
                now = time.monotonic()
                self._forget(ready)
                for name in self._todo(ready, now):
                    self.inflight[name] = pool.submit(self._push_one, name)
                if self.inflight:
                    busy_at = now
                    wait(list(self.inflight.values()), timeout=POLL, return_when=FIRST_COMPLETED)
                    self._collect()
                else:
                    if now - busy_at > self.idle_exit:
                        why = f"nothing to push for {self.idle_exit:g}s"
                        break
                    time.sleep(POLL)
                if now >= next_check:
                    why, next_check = self.why_stop(), now + CHECK
                    self.clean_markers()
        finally:
            if self.inflight:  # finish what was started (bounded: a hung store is abandoned)
                wait(list(self.inflight.values()), timeout=30)
            pool.shutdown(wait=False, cancel_futures=True)
            self._collect()
            self.clean_markers()
        return why or "stopped"

    def clean_markers(self) -> None:
        """Markers of files that are not ready any more (no call will come for them), and any
        older than a day. The spool is listed before archive_status: a marker is written while its
        file is ready, so a file found not ready afterwards was archived (its call returned 0)."""
        now = time.time()
        try:
            entries = os.listdir(self.spool)
        except OSError:
            return
        ready = set(_ready_names(self.pg_wal))
        for e in entries:
            name, dot, kind = e.rpartition(".")
            if kind not in ("stored", "failed", "busy") or not name:
                continue
            p = os.path.join(self.spool, e)
            try:
                if name not in ready or now - os.path.getmtime(p) > STALE_MARKER_S:
                    os.unlink(p)
            except OSError:
                pass


def run_detached(lock_fd: int, repo, cluster: str, pg_wal: str, spool: str, data_dir: str, *, first: str,
                 log, **kwargs) -> None:
    """The body of the process walcmd forks (holding the spool's lock on `lock_fd`, `repo` opened
    but not used yet): detach from the call, check the repository, push until idle or the server
    stops. If the repository cannot be used, the call that started it (waiting for `first`) is
    told through `first`'s .failed note, and pushes it itself."""
    from .fetchahead import _detach_fds

    os.setsid()
    _detach_fds(lock_fd)
    t0 = os.times()
    try:
        _write_note(os.path.join(spool, "pid"), f"{os.getpid()}\n")
        try:
            repo.identity()
        except Exception as e:
            _write_note(os.path.join(spool, first + ".failed"), f"{type(e).__name__}: {e}\n")
            log(f"ahead pusher cannot start: {type(e).__name__}: {e}")
            return
        p = Pusher(repo, cluster, pg_wal, spool, lock_fd, data_dir, log=log, **kwargs)
        log(f"ahead pusher started (parallel {p.parallel}, idle exit {p.idle_exit:g}s"
            + (f", server pid {p.server_pid})" if p.server_pid else ", no server to watch)"))
        why = p.run()
        t1 = os.times()
        s = p.stats
        log(f"pushed {s['pushed']} file(s) ahead ({s['exists']} archived already, {s['failed']} failed attempt(s), "
            f"{s['given_up']} left to the calls; CPU {t1.user + t1.system - t0.user - t0.system:.2f}s, "
            f"{s['polls']} looks): exiting, {why}")
    except BaseException as e:
        log(f"ahead pusher failed: {type(e).__name__}: {e}")
