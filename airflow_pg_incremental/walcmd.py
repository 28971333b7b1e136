"""archive_command / restore_command entry point. Starts fast: imports neither Airflow nor (for
local repositories) boto3, and runs under `python -S`: the common path (a file already pushed
ahead) uses the standard library only; site-packages are enabled only when work is needed. This
file holds what a restore_command call served from the fetch-ahead spool runs, and no more (a
script is compiled at every call); the rest (push, the direct fetch, --env-file, the argparse
command line) is in walcmd_rest.py, loaded when needed.
`pgincr wal-commands --repo R --cluster C` prints the exact lines:

    archive_command = 'exec /bin/sh <package>/walcmd.sh <venv>/bin/python -S <package>/walcmd.py push --repo R --cluster C %p'
    restore_command = 'exec /bin/sh <package>/walcmd.sh <venv>/bin/python -S <package>/walcmd.py fetch --repo R --cluster C %f %p'

walcmd.sh answers, without starting Python, the calls whose work a resident helper has done
already (a segment spooled by the prefetcher, a file stored by the pusher: one `stat` and one
`mv`, ~3 ms); every other call runs the rest of the line, this file, which works alone too.

S3 credentials and endpoint come from the environment (AWS_*, PGINCR_S3_ENDPOINT_URL), or from
`--env-file FILE` (KEY=VALUE lines, keep it mode 0600): never from the command line.

push: PostgreSQL calls it once per WAL file, in order, and waits. It exits 0 only once that file is
durably in the repository. The first call that finds no pusher running forks ONE resident pusher
(drivers loaded, holding the flock of pg_wal/pgincr_spool/) that stays while WAL keeps coming: it
watches archive_status every 10 ms, stores each .ready file with one repository client and a few
threads (--parallel, default 2) and leaves a marker for it; it leaves after --idle-exit seconds with
nothing to push (default 30), or when the server stops. A call finds its marker (checked against the
file's size, inode and mtime) with the standard library only and exits 0. A marker is written only
after the object is stored, so no file is acknowledged before it is stored. A call pushes its file
itself when the pusher gave up on it (a .failed note after two failed attempts: the call returns the
real result), when the pusher died (its lock is free), and for a file not marked ready. --ahead 0:
every call pushes its own file (see core/pushahead.py).

fetch: PostgreSQL calls it once per WAL file, serially. During a recovery (run by PostgreSQL: the
data directory is the working directory), the first call for a segment starts ONE prefetcher
(forked and detached, holding the flock of pg_wal/pgincr_fetch/) that fetches the next segments
along the recovery's timeline path with one repository client and a few threads, verifies them and
spools them; each later call takes its segment from the spool once it is provably the file the
prefetcher verified (its recorded stat key, else the CRC-32 in its name), with the standard
library only (see core/fetchahead.py). Anything the spool cannot give is
fetched directly. Options: --ahead N (segments fetched ahead, default 8; 0 turns fetch-ahead off),
--parallel N (downloads at once, default 3), --idle-exit S (the prefetcher leaves after S seconds
without a request, default 30; it also leaves when recovery ends or the server stops).
Timeline history files PostgreSQL looks for go through the prefetcher too, and so does a
segment past the archive's end: it answers "not archived" (<name>.missing) only after checking,
after the call's request, what the call's own direct fetch would check.
Exit codes: 0 restored; 1 not in the archive (recovery ends there cleanly), only when the
repository is reachable, is one, holds the cluster and lacks the file; 126 any other failure
(repository unreachable, damaged object, bad arguments): recovery stops loudly instead of ending
early. A prefetcher's error never becomes exit 1.
"""

import fcntl
import os
import sys
import time

NOT_FOUND = 1
HARD_FAIL = 126
_HEX = set("0123456789ABCDEF")
_HEXL = set("0123456789abcdef")


# --- fetch ------------------------------------------------------------------------------------
# The call's side of the fetch-ahead spool (core/fetchahead.py describes the protocol and runs the
# prefetcher). Standard library only: a call served from the spool imports nothing else.
FETCH_SPOOL = "pgincr_fetch"


def fetch(name: str, dest: str, repo_url: str, cluster: str, *, ahead: int = 8, parallel: int = 3,
          idle_exit: float = 30.0, env_file: str | None = None) -> int:
    """Restore WAL file `name` to `dest` (%f, %p). A segment comes from the fetch-ahead spool when
    PostgreSQL runs us during a recovery (a prefetcher is started on the first call); anything
    else, or a segment the spool cannot give, is fetched directly."""
    note = None
    if ahead > 0 and _spoolable(name):
        spool = _fetch_spool(dest)
        if spool:
            opts = {"window": ahead, "parallel": parallel, "idle_exit": idle_exit}
            try:
                taken, note = _from_spool(name, dest, spool, lambda fd: _start_prefetcher(
                    fd, spool, repo_url, cluster, opts, env_file))
            except Exception as e:  # the spool is a shortcut: its failure leaves the direct fetch
                taken, note = False, f"{type(e).__name__}: {e}"
            if taken is MISSING:
                _trace("missing", name)
                if len(name) == 24:
                    sys.stderr.write(f"pgincr wal-fetch: {name} is not in the archive\n")
                return NOT_FOUND
            if taken:
                _trace("hit", name)
                return 0
    _trace("direct", name)
    return _rest().fetch_direct(name, dest, repo_url, cluster, note, env_file)


MISSING = "missing"  # _from_spool: the prefetcher found it not archived, in a repository holding the cluster


def _spoolable(name: str) -> bool:
    """A segment, or a timeline history file: what the prefetcher fetches for the calls."""
    if len(name) == 24:
        return set(name) <= _HEX
    return len(name) == 16 and name.endswith(".history") and set(name[:8]) <= _HEX


def _fetch_spool(dest: str) -> str | None:
    """The spool beside %p, when PostgreSQL runs us during a recovery (its data directory is our
    working directory); None otherwise (e.g. `pgincr wal-fetch` typed by hand)."""
    if not os.path.exists("postmaster.pid") or not (os.path.exists("recovery.signal")
                                                    or os.path.exists("standby.signal")):
        return None
    d = os.path.dirname(os.path.abspath(dest))
    return os.path.join(d, FETCH_SPOOL) if os.path.isdir(d) else None


def _from_spool(name: str, dest: str, spool: str, start) -> tuple[bool | str, str | None]:
    """(True, None) once `name` was taken from the spool into `dest`; (MISSING, None) when the
    prefetcher, asked for it, found it not archived (<name>.missing); else (False, why: the
    prefetcher's error for it, if any). A spooled file is taken, and the prefetcher told (the
    window moves on; one is started when none runs). Otherwise the prefetcher is asked for it and
    the call waits while it fetches it."""
    _test_hold(spool)
    ready = _ready_file(spool, name)
    if ready:
        taken = _take(spool, ready, name, dest)
        _request(spool, f"{name} {_caller()} {'taken' if taken else 'direct'}", start)
        return taken, None if taken else "its spooled copy was damaged"
    token = f"{name} {_caller()} need"
    started = _request(spool, token, start)
    if started is None:
        return False, None
    restarts = 0 if started else 1  # a prefetcher that died is restarted once per call
    part = os.path.join(spool, name + ".part")
    t0 = time.monotonic()
    ack_by, delay = t0 + 15, 0.0005  # a new prefetcher imports its drivers first
    while True:
        ready = _ready_file(spool, name)
        if ready:
            _trace("waited", f"{name} {(time.monotonic() - t0) * 1000:.0f}ms")
            return _take(spool, ready, name, dest), None
        if _lock_free(spool, start if restarts > 0 else None):
            if restarts <= 0:
                return False, _read_small(os.path.join(spool, name + ".error"))
            restarts -= 1
            ack_by = time.monotonic() + 15
            continue
        acked = _read_small(os.path.join(spool, "ack")) == token
        if acked and not os.path.exists(part):
            ready = _ready_file(spool, name)  # finished between the two looks?
            if ready:
                return _take(spool, ready, name, dest), None
            if os.path.exists(os.path.join(spool, name + ".missing")):  # written after our request
                return MISSING, None
            return False, _read_small(os.path.join(spool, name + ".error"))
        if time.monotonic() > (t0 + 600 if acked else ack_by):
            return False, "the prefetcher did not deliver it in time"
        time.sleep(delay)
        delay = min(delay * 2, 0.004)


def _caller() -> str:
    """Who asks, unique per request: the prefetcher tells requests apart by their text (walcmd.sh
    rewrites the file in place), and the call waits for its own text in `ack`."""
    return f"{os.getpid()}.{time.monotonic_ns() % 10**9}"


def _request(spool: str, token: str, start) -> bool | None:
    """Tell the prefetcher what PostgreSQL asks for ("<segment> <pid> taken|direct|need"); start
    one when none runs. Whether one was started; None when the spool cannot be used."""
    try:
        if not os.path.isdir(spool):
            os.mkdir(spool, 0o700)  # only the spool: never a directory above it (a removed data directory)
        _write_small(os.path.join(spool, "request"), token)
    except OSError:
        return None
    return _lock_free(spool, start)


def _test_hold(spool: str) -> None:
    """Test hook: once a prefetcher runs and a segment was asked for, wait as long as the file
    PGINCR_TEST_FETCH_HOLD exists."""
    hold = os.environ.get("PGINCR_TEST_FETCH_HOLD")
    if not hold:
        return
    asked = (_read_small(os.path.join(spool, "request")) or "").split(" ")[0]
    if len(asked) == 24 and not _lock_free(spool, None):
        while os.path.exists(hold):
            time.sleep(0.01)


def _ready_file(spool: str, name: str) -> str | None:
    """`<name>.<crc32 hex>` in the spool (core/fetchahead.parse_ready_name), if there."""
    n = len(name)
    try:
        for e in os.listdir(spool):
            if len(e) == n + 9 and e[n] == "." and e.startswith(name) and set(e[n + 1:]) <= _HEXL:
                return e
    except OSError:
        pass
    return None


def _take(spool: str, ready: str, name: str, dest: str) -> bool:
    """Rename the spooled file to %p (same filesystem: atomic) once it is provably the one the
    prefetcher verified: its stat key is still the one the prefetcher recorded (<name>.ok, what
    walcmd.sh checks), or else its CRC-32 is the one in its name. A damaged file is removed and the
    segment fetched directly: handed to PostgreSQL it would read as the end of WAL and end recovery
    early, silently. Nothing to fsync: the prefetcher wrote the file back before spooling it, so
    PostgreSQL's own fsync of a restored segment finds it clean."""
    path = os.path.join(spool, ready)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # dropped meanwhile
    try:
        st = os.fstat(fd)
        size = st.st_size
        ok = len(name) != 24 or (1 << 20) <= size <= (1 << 30) and not size & (size - 1)
        if ok and _read_small(os.path.join(spool, name + ".ok")) == f"{ready} {_stat_key(st)}":
            pass  # unchanged since it was verified
        elif ok:
            import mmap
            import zlib

            with mmap.mmap(fd, 0, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)) as m:
                ok = zlib.crc32(m) == int(ready[-8:], 16)
    finally:
        os.close(fd)
    if not ok:
        sys.stderr.write(f"pgincr wal-fetch: WARNING: the fetched-ahead copy of {name} is damaged ({size} bytes, "
                         "checksum mismatch); fetching it again directly\n")
        _trace("corrupt", name)
        try:
            os.unlink(path)
        except OSError:
            pass
        return False
    try:
        os.rename(path, dest)
    except OSError:
        return False
    return True


def _stat_key(st: os.stat_result) -> str:
    """core/fetchahead.stat_key (walcmd.sh compares the same string with `stat`'s)."""
    return (f"{st.st_ino} {st.st_size} {st.st_mtime_ns // 10**9}.{st.st_mtime_ns % 10**9:09d} "
            f"{st.st_ctime_ns // 10**9}.{st.st_ctime_ns % 10**9:09d}")


def _lock_free(spool: str, start) -> bool:
    """Whether no prefetcher runs (its flock is free); with `start`, one is started then (it takes
    over the lock)."""
    try:
        fd = os.open(os.path.join(spool, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    if start is None:
        os.close(fd)
    else:
        start(fd)
    return True


def _write_small(path: str, text: str) -> None:
    tmp = path + ".new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read_small(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _trace(event: str, name: str) -> None:
    path = os.environ.get("PGINCR_TEST_FETCH_TRACE")  # test hook (see core/fetchahead.py)
    if path:
        with open(path, "a") as f:
            f.write(f"{event} {name}\n")


# options each command takes on the fast path, and how many positional arguments
_FAST_OPTS = {"push": (("--repo", "--cluster", "--spool", "--env-file", "--ahead", "--parallel", "--idle-exit",
                        "--level"), 1),
              "fetch": (("--repo", "--cluster", "--env-file", "--ahead", "--parallel", "--idle-exit"), 2)}


def _fast_args(argv: list[str]) -> dict | None:
    """Parse 'push [--repo R] [--cluster C] [--spool S] [--env-file F] [--ahead N] [--parallel N]
    [--idle-exit S] [--level N] PATH' or 'fetch [--repo R] [--cluster C] [--env-file F] [--ahead N] [--parallel N]
    [--idle-exit S] NAME DEST' without argparse (its import costs more than the whole fast path).
    None when anything is unusual: argparse then explains."""
    spec = _FAST_OPTS.get(argv[0]) if argv else None
    if spec is None:
        return None
    options, npos = spec
    out: dict = {"cmd": argv[0], "positional": []}
    it = iter(argv[1:])
    for a in it:
        if a in options:
            value = next(it, None)
            if value is None:
                return None
            out[a[2:].replace("-", "_")] = value
        elif a.startswith("--"):
            return None  # let argparse explain
        else:
            out["positional"].append(a)
    if len(out["positional"]) != npos:
        return None
    return out


def _fast_fetch(fa: dict) -> int | None:
    """The fetch fast path; None hands over to argparse (e.g. to explain a bad number). The
    --env-file is read when credentials are needed (a prefetcher to start, a direct fetch), not by
    a call served from the spool."""
    repo = fa.get("repo") or os.environ.get("PGINCR_REPO")
    cluster = fa.get("cluster") or os.environ.get("PGINCR_CLUSTER")
    try:
        opts = {"ahead": int(fa.get("ahead", 8)), "parallel": int(fa.get("parallel", 3)),
                "idle_exit": float(fa.get("idle_exit", 30))}
    except ValueError:
        return None
    if not repo or not cluster:
        return None
    return _guarded_fetch(*fa["positional"], repo, cluster, env_file=fa.get("env_file"), **opts)


def _guarded_fetch(name: str, dest: str, repo: str, cluster: str, **opts) -> int:
    """An unexpected error must stop recovery (126), never read as "not archived" (exit 1, which
    an uncaught exception would give)."""
    try:
        return fetch(name, dest, repo, cluster, **opts)
    except Exception as e:
        sys.stderr.write(f"pgincr wal-fetch: {name}: {type(e).__name__}: {e}\n")
        return HARD_FAIL


def _start_prefetcher(lock_fd: int, spool: str, repo_url: str, cluster: str, opts: dict, env_file) -> None:
    _trace("start", str(_rest().start_prefetcher(lock_fd, spool, repo_url, cluster, opts, env_file)))


def _rest():
    """walcmd_rest, loaded when needed: as part of the package, or beside this script when
    PostgreSQL runs it."""
    if __package__:
        from . import walcmd_rest
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        if here not in sys.path:
            sys.path.insert(0, here)
        import walcmd_rest
    return walcmd_rest


def __getattr__(name: str):
    """walcmd.push, walcmd.check_env_file ...: the rest of the command, loaded on first use."""
    if name.startswith("__"):
        raise AttributeError(name)
    return getattr(_rest(), name)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fa = _fast_args(argv)
    if fa is not None and fa["cmd"] == "fetch":
        rc = _fast_fetch(fa)
        if rc is not None:
            return rc
    return _rest().main(argv, fa, _guarded_fetch)


if __name__ == "__main__":
    sys.exit(main())
