"""archive_command / restore_command entry point. Starts fast: imports neither Airflow nor (for
local repositories) boto3, and runs under `python -S`: the common path (a file already pushed
ahead) uses the standard library only; site-packages are enabled only when work is needed.
`pgincr wal-commands --repo R --cluster C` prints the exact lines:

    archive_command = '<venv>/bin/python -S <package>/walcmd.py push --repo R --cluster C %p'
    restore_command = '<venv>/bin/python -S <package>/walcmd.py fetch --repo R --cluster C %f %p'

S3 credentials and endpoint come from the environment (AWS_*, PGINCR_S3_ENDPOINT_URL), or from
`--env-file FILE` (KEY=VALUE lines, keep it mode 0600): never from the command line.

push: PostgreSQL calls it once per WAL file and waits. It exits 0 only once that file is durably
in the repository. To keep up under load it pushes ahead: the process holding the spool lock
stores its own file, then forks a child (drivers already loaded) that stores the other ready
files (archive_status/*.ready) in parallel and leaves a marker for each in the spool directory.
When PostgreSQL later asks for one of those, push finds its marker (checked against the file's
size, inode and mtime) and exits 0 at once. A marker is written only after the upload succeeded,
so no segment is ever acknowledged before it is stored.

fetch: PostgreSQL calls it once per WAL file, serially. During a recovery (run by PostgreSQL: the
data directory is the working directory), the first call for a segment starts ONE prefetcher
(forked and detached, holding the flock of pg_wal/pgincr_fetch/) that fetches the next segments
along the recovery's timeline path with one repository client and a few threads, verifies them and
spools them; each later call takes its segment from the spool after checking the CRC-32 in its
name, with the standard library only (see core/fetchahead.py). Anything the spool cannot give is
fetched directly. Options: --ahead N (segments fetched ahead, default 8; 0 turns fetch-ahead off),
--parallel N (downloads at once, default 2), --idle-exit S (the prefetcher leaves after S seconds
without a request, default 30; it also leaves when recovery ends or the server stops).
Exit codes: 0 restored; 1 not in the archive (recovery ends there cleanly), only when the
repository is reachable, is one, holds the cluster and lacks the file; 126 any other failure
(repository unreachable, damaged object, bad arguments): recovery stops loudly instead of ending
early. A prefetcher's error never becomes exit 1.
"""

import fcntl
import os
import sys
import time

_SITE_DONE = False


def _enable_site() -> None:
    """Under `python -S`, make site-packages (zstandard, boto3, this package) importable."""
    global _SITE_DONE
    if _SITE_DONE:
        return
    _SITE_DONE = True
    if not sys.flags.no_site:
        return
    import site

    site.main()
    pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if pkg_parent not in sys.path:
        sys.path.append(pkg_parent)

NOT_FOUND = 1
HARD_FAIL = 126


class EnvFileError(Exception):
    """The --env-file cannot be used (missing, or readable by others: it holds credentials)."""


def check_env_file(path: str) -> os.stat_result:
    """Like libpq with a .pgpass file: a file of credentials that group or others can read is
    refused, with the chmod that fixes it. Returns its stat."""
    import stat as _stat

    try:
        st = os.stat(path)
    except OSError as e:
        raise EnvFileError(f"env file {path}: {e.strerror}; create it (KEY=VALUE lines, mode 0600)") from None
    if not _stat.S_ISREG(st.st_mode):
        raise EnvFileError(f"env file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise EnvFileError(f"env file {path} holds credentials but group or others can access it (mode "
                           f"{_stat.S_IMODE(st.st_mode):04o}): run `chmod 600 {path}` (it must belong to the user "
                           "running this command)")
    if st.st_uid != os.geteuid() and os.geteuid() != 0:
        import pwd

        try:
            owner = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            owner = str(st.st_uid)
        raise EnvFileError(f"env file {path} belongs to {owner}, not to the user running this command: chown it")
    return st


def _load_env_file(path: str | None) -> None:
    if not path:
        return
    check_env_file(path)
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                k, v = line.split("=", 1)
                os.environ.setdefault(k.strip(), v.strip())


def _repo(url: str, *, check: bool = True):
    """The repository at `url`; with `check`, its identity marker is read first, so that a push to
    a mistyped location fails instead of creating a repository there."""
    _enable_site()
    from airflow_pg_incremental.core.repository import open_repository

    repo = open_repository(url, origin="cli")
    if check:
        repo.identity()
    return repo


def _log(spool: str | None, msg: str) -> None:
    line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} pgincr wal-push[{os.getpid()}]: {msg}\n"
    if spool:
        try:
            with open(os.path.join(spool, "walpush.log"), "a") as f:
                f.write(line)
            return
        except OSError:
            pass
    sys.stderr.write(line)


# --- markers --------------------------------------------------------------------------------
def _marker_path(spool: str, name: str) -> str:
    return os.path.join(spool, name + ".stored")


def _write_marker(spool: str, path: str, name: str, result) -> None:
    # plain text, not JSON: reading it must not cost the json/re imports (tens of ms per segment)
    st = os.stat(path)
    tmp = _marker_path(spool, name) + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{st.st_size} {st.st_ino} {st.st_mtime_ns} {result.raw_sha256} {result.status}\n")
    os.replace(tmp, _marker_path(spool, name))


def _take_marker(spool: str, path: str, name: str) -> bool:
    mp = _marker_path(spool, name)
    try:
        with open(mp) as f:
            size, ino, mtime_ns = (int(x) for x in f.read().split()[:3])
    except (OSError, ValueError):
        return False
    st = os.stat(path)
    os.unlink(mp)
    return size == st.st_size and ino == st.st_ino and mtime_ns == st.st_mtime_ns


def _ready_names(pg_wal: str) -> list[str]:
    try:
        names = os.listdir(os.path.join(pg_wal, "archive_status"))
    except OSError:
        return []
    return sorted(n[:-6] for n in names if n.endswith(".ready"))


# --- push -------------------------------------------------------------------------------------
def push(path: str, repo_url: str, cluster: str, *, spool: str | None = None, ahead: int = 64,
         parallel: int = 2, idle_exit: float = 3.0, wait: float = 120.0, level: int = 3) -> int:
    name = os.path.basename(path)
    if not _plausible_wal_name(name) or not _plausible_name(cluster):
        _enable_site()
        from airflow_pg_incremental.core.lsn import wal_name_kind
        from airflow_pg_incremental.core.names import validate_cluster

        wal_name_kind(name)  # raises with the precise reason
        validate_cluster(cluster)
    pg_wal = os.path.dirname(os.path.abspath(path))
    spool = spool or os.path.join(pg_wal, "pgincr_spool")
    os.makedirs(spool, exist_ok=True)

    deadline = time.monotonic() + wait
    delay = 0.002
    while True:
        if _take_marker(spool, path, name):
            return 0
        lock_fd = os.open(os.path.join(spool, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            # a pusher is working ahead: wait for our marker, or for the lock
            if time.monotonic() > deadline:
                break
            time.sleep(delay)
            delay = min(delay * 1.5, 0.01)
            continue
        # we hold the lock: a marker may have appeared just before we got it
        if _take_marker(spool, path, name):
            os.close(lock_fd)
            return 0
        return _push_and_go_ahead(path, name, pg_wal, spool, lock_fd, repo_url, cluster, ahead, parallel, idle_exit,
                                  level)
    # waited long enough for a pusher that does not deliver: do it ourselves
    _enable_site()
    from airflow_pg_incremental.core.wal import push_file

    try:
        push_file(_repo(repo_url), cluster, path, name=name, level=level, checksum=False)
        return 0
    except Exception as e:
        _log(None, f"{name}: {e}")
        return 1


def _push_and_go_ahead(path, name, pg_wal, spool, lock_fd, repo_url, cluster, ahead, parallel, idle_exit,
                       level) -> int:
    _enable_site()
    from airflow_pg_incremental.core.wal import push_file

    try:
        repo = _repo(repo_url)
        push_file(repo, cluster, path, name=name, level=level, checksum=False)
    except Exception as e:
        os.close(lock_fd)
        _log(None, f"{name} NOT archived: {e}")
        return 1
    others = [n for n in _ready_names(pg_wal) if n != name]
    if ahead <= 0 or not others:
        os.close(lock_fd)
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(lock_fd)  # the child keeps the lock (same open file description)
        return 0
    # child: detach and push ahead until nothing is ready for idle_exit seconds
    try:
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        _ahead_loop(repo, cluster, pg_wal, spool, ahead, parallel, idle_exit, level, skip={name})
    except BaseException as e:  # never let the child return into PostgreSQL's caller
        _log(spool, f"ahead pusher failed: {e!r}")
    finally:
        os._exit(0)


def _ahead_loop(repo, cluster, pg_wal, spool, ahead, parallel, idle_exit, level, skip) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from airflow_pg_incremental.core.wal import push_file

    done = set(skip)
    failures: dict[str, int] = {}
    idle_since = time.monotonic()
    pushed = 0

    def one(n):
        p = os.path.join(pg_wal, n)
        try:
            r = push_file(repo, cluster, p, name=n, level=level, checksum=False)
        except FileNotFoundError:
            return n, None  # acknowledged and recycled meanwhile
        _write_marker(spool, p, n, r)
        return n, r

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        while time.monotonic() - idle_since < idle_exit:
            todo = [n for n in _ready_names(pg_wal) if n not in done
                    and not os.path.exists(_marker_path(spool, n))][:ahead]
            if not todo:
                time.sleep(0.05)
                continue
            futures = {pool.submit(one, n): n for n in todo}
            for fut, n in futures.items():
                try:
                    _, r = fut.result()
                    done.add(n)
                    pushed += r is not None
                except Exception as e:
                    # leave it to the foreground push (which reports it to PostgreSQL); after a
                    # second failure stop trying it here, so one bad file cannot hold the lock
                    failures[n] = failures.get(n, 0) + 1
                    _log(spool, f"push ahead of {n} failed ({failures[n]}x): {e}")
                    if failures[n] >= 2:
                        done.add(n)
            if len(failures) >= 3:
                _log(spool, "several files fail to push ahead: leaving them to the foreground calls")
                break
            idle_since = time.monotonic()  # idle counts from the end of the batch
    # markers of files PostgreSQL never asked for (e.g. after a crash) expire after a day
    now = time.time()
    for f in os.listdir(spool):
        if f.endswith(".stored") and now - os.path.getmtime(os.path.join(spool, f)) > 86400:
            os.unlink(os.path.join(spool, f))
    _log(spool, f"pushed {pushed} file(s) ahead, idle for {idle_exit}s: exiting")


# --- fetch ------------------------------------------------------------------------------------
# The call's side of the fetch-ahead spool (core/fetchahead.py describes the protocol and runs the
# prefetcher). Standard library only: a call served from the spool imports nothing else.
FETCH_SPOOL = "pgincr_fetch"


def fetch(name: str, dest: str, repo_url: str, cluster: str, *, ahead: int = 8, parallel: int = 2,
          idle_exit: float = 30.0) -> int:
    """Restore WAL file `name` to `dest` (%f, %p). A segment comes from the fetch-ahead spool when
    PostgreSQL runs us during a recovery (a prefetcher is started on the first call); anything
    else, or a segment the spool cannot give, is fetched directly."""
    note = None
    if ahead > 0 and len(name) == 24 and set(name) <= _HEX and _plausible_name(cluster):
        spool = _fetch_spool(dest)
        if spool:
            opts = {"window": ahead, "parallel": parallel, "idle_exit": idle_exit}
            try:
                taken, note = _from_spool(name, dest, spool,
                                          lambda fd: _start_prefetcher(fd, spool, repo_url, cluster, opts))
            except Exception as e:  # the spool is a shortcut: its failure leaves the direct fetch
                taken, note = False, f"{type(e).__name__}: {e}"
            if taken:
                _trace("hit", name)
                return 0
    _trace("direct", name)
    return _fetch_direct(name, dest, repo_url, cluster, note)


def _fetch_spool(dest: str) -> str | None:
    """The spool beside %p, when PostgreSQL runs us during a recovery (its data directory is our
    working directory); None otherwise (e.g. `pgincr wal-fetch` typed by hand)."""
    if not os.path.exists("postmaster.pid") or not (os.path.exists("recovery.signal")
                                                    or os.path.exists("standby.signal")):
        return None
    d = os.path.dirname(os.path.abspath(dest))
    return os.path.join(d, FETCH_SPOOL) if os.path.isdir(d) else None


def _from_spool(name: str, dest: str, spool: str, start) -> tuple[bool, str | None]:
    """(True, None) once `name` was taken from the spool into `dest`; else (False, why: the
    prefetcher's error for it, if any). A spooled segment is taken, and the prefetcher told (the
    window moves on; one is started when none runs). Otherwise the prefetcher is asked for it and
    the call waits while it fetches it."""
    _test_hold(spool)
    ready = _ready_file(spool, name)
    if ready:
        taken = _take(spool, ready, name, dest)
        _request(spool, f"{name} {os.getpid()} {'taken' if taken else 'direct'}", start)
        return taken, None if taken else "its spooled copy was damaged"
    token = f"{name} {os.getpid()} need"
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
            return False, _read_small(os.path.join(spool, name + ".error"))
        if time.monotonic() > (t0 + 600 if acked else ack_by):
            return False, "the prefetcher did not deliver it in time"
        time.sleep(delay)
        delay = min(delay * 2, 0.004)


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
    """Test hook: while a prefetcher runs, wait as long as the file PGINCR_TEST_FETCH_HOLD exists."""
    hold = os.environ.get("PGINCR_TEST_FETCH_HOLD")
    if hold and not _lock_free(spool, None):
        while os.path.exists(hold):
            time.sleep(0.01)


def _ready_file(spool: str, name: str) -> str | None:
    try:
        for e in os.listdir(spool):
            if len(e) == 33 and e[24] == "." and e.startswith(name) and set(e[25:]) <= _HEXL:
                return e
    except OSError:
        pass
    return None


def _take(spool: str, ready: str, name: str, dest: str) -> bool:
    """Check the spooled file against the CRC-32 in its name, then rename it to %p (same
    filesystem: atomic). A damaged file is removed and the segment fetched directly: handed to
    PostgreSQL it would read as the end of WAL and end recovery early, silently. No fsync:
    PostgreSQL does not need one for a restored file; after a crash it fetches the segment again."""
    import mmap
    import zlib

    path = os.path.join(spool, ready)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # dropped meanwhile
    try:
        size = os.fstat(fd).st_size
        ok = (1 << 20) <= size <= (1 << 30) and not size & (size - 1)
        if ok:
            with mmap.mmap(fd, 0, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)) as m:
                ok = zlib.crc32(m) == int(ready[25:], 16)
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


def _start_prefetcher(lock_fd: int, spool: str, repo_url: str, cluster: str, opts: dict) -> None:
    """Fork the prefetcher (core/fetchahead.run_detached): it keeps the lock (the same open file)
    and runs until recovery ends."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(lock_fd)
        _trace("start", str(pid))
        return
    try:  # never let the child return into PostgreSQL's caller
        _enable_site()
        from airflow_pg_incremental.core.fetchahead import run_detached

        run_detached(lock_fd, repo_url, cluster, spool, os.getcwd(), **opts)
    finally:
        os._exit(0)


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


def _fetch_direct(name: str, dest: str, repo_url: str, cluster: str, note: str | None = None) -> int:
    """Exit 1 ("not archived": recovery ends there) only when the repository is reachable, is one,
    holds the cluster and lacks the file; 126 for every other failure, with the prefetcher's error
    for the file (`note`) when there was one."""
    _enable_site()
    from airflow_pg_incremental.core.fetchahead import fetch_direct

    try:
        if fetch_direct(_repo(repo_url, check=False), cluster, name, dest):  # a found object proves the location
            return 0
    except Exception as e:
        also = f" (fetching it ahead failed too: {note})" if note else ""
        sys.stderr.write(f"pgincr wal-fetch: {name}: {e}{also}\n")
        return HARD_FAIL
    if len(name) == 24:
        sys.stderr.write(f"pgincr wal-fetch: {name} is not in the archive\n")
    return NOT_FOUND


_HEX = set("0123456789ABCDEF")
_HEXL = set("0123456789abcdef")


def _plausible_wal_name(name: str) -> bool:
    """Cheap check of a segment / history / backup-history name (the engine re-validates)."""
    if len(name) == 24:
        return set(name) <= _HEX
    if name.endswith(".history") and len(name) == 16:
        return set(name[:8]) <= _HEX
    if name.endswith(".backup") and len(name) == 40:
        return set(name[:24]) <= _HEX and name[24] == "." and set(name[25:33]) <= _HEX
    return False


def _plausible_name(name: str) -> bool:
    return bool(name) and len(name) <= 63 and ".." not in name and \
        all(c.isascii() and (c.isalnum() or c in "._-") for c in name) and name[0].isalnum()


# options each command takes on the fast path, and how many positional arguments
_FAST_OPTS = {"push": (("--repo", "--cluster", "--spool", "--env-file", "--ahead", "--parallel", "--level"), 1),
              "fetch": (("--repo", "--cluster", "--env-file", "--ahead", "--parallel", "--idle-exit"), 2)}


def _fast_args(argv: list[str]) -> dict | None:
    """Parse 'push [--repo R] [--cluster C] [--spool S] [--env-file F] [--ahead N] [--parallel N]
    [--level N] PATH' or 'fetch [--repo R] [--cluster C] [--env-file F] [--ahead N] [--parallel N]
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
    """The fetch fast path; None hands over to argparse (e.g. to explain a bad number)."""
    try:
        _load_env_file(fa.get("env_file"))
    except EnvFileError as e:
        sys.stderr.write(f"pgincr wal-fetch: {e}\n")
        return HARD_FAIL
    repo = fa.get("repo") or os.environ.get("PGINCR_REPO")
    cluster = fa.get("cluster") or os.environ.get("PGINCR_CLUSTER")
    try:
        opts = {"ahead": int(fa.get("ahead", 8)), "parallel": int(fa.get("parallel", 2)),
                "idle_exit": float(fa.get("idle_exit", 30))}
    except ValueError:
        return None
    if not repo or not cluster:
        return None
    return _guarded_fetch(*fa["positional"], repo, cluster, **opts)


def _guarded_fetch(name: str, dest: str, repo: str, cluster: str, **opts) -> int:
    """An unexpected error must stop recovery (126), never read as "not archived" (exit 1, which
    an uncaught exception would give)."""
    try:
        return fetch(name, dest, repo, cluster, **opts)
    except Exception as e:
        sys.stderr.write(f"pgincr wal-fetch: {name}: {type(e).__name__}: {e}\n")
        return HARD_FAIL


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fa = _fast_args(argv)
    if fa is not None and fa["cmd"] == "fetch":
        rc = _fast_fetch(fa)
        if rc is not None:
            return rc
    elif fa is not None:
        try:
            _load_env_file(fa.get("env_file"))
        except EnvFileError as e:
            sys.stderr.write(f"pgincr wal-push: {e}\n")
            return 1
        repo = fa.get("repo") or os.environ.get("PGINCR_REPO")
        cluster = fa.get("cluster") or os.environ.get("PGINCR_CLUSTER")
        if repo and cluster:
            try:
                return push(fa["positional"][0], repo, cluster, spool=fa.get("spool"),
                            ahead=int(fa.get("ahead") or 64), parallel=int(fa.get("parallel") or 2),
                            level=int(fa.get("level") or 3))
            except Exception as e:
                sys.stderr.write(f"pgincr wal-push: {e}\n")
                return 1
    import argparse

    ap = argparse.ArgumentParser(prog="pgincr-wal", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("push", "fetch"):
        sp = sub.add_parser(name)
        sp.add_argument("--repo", default=os.environ.get("PGINCR_REPO"))
        sp.add_argument("--cluster", default=os.environ.get("PGINCR_CLUSTER"))
        sp.add_argument("--env-file")
        if name == "push":
            sp.add_argument("path", help="%%p: path of the WAL file, relative to the data directory")
            sp.add_argument("--spool", help="marker directory (default: pg_wal/pgincr_spool)")
            sp.add_argument("--ahead", type=int, default=64, help="files to push ahead per round (0: synchronous only)")
            sp.add_argument("--parallel", type=int, default=2)
            sp.add_argument("--level", type=int, default=3)
        else:
            sp.add_argument("name", help="%%f")
            sp.add_argument("dest", help="%%p")
            sp.add_argument("--ahead", type=int, default=8, help="segments to fetch ahead (0: no fetch-ahead)")
            sp.add_argument("--parallel", type=int, default=2, help="parallel downloads of the prefetcher")
            sp.add_argument("--idle-exit", type=float, default=30.0,
                            help="seconds without a request after which the prefetcher stops")
    try:
        a = ap.parse_args(argv)
    except SystemExit as e:  # a usage error must stop a recovery (126), not read as "not archived"
        if e.code and argv and argv[0] == "fetch":
            return HARD_FAIL
        raise
    try:
        _load_env_file(a.env_file)
    except EnvFileError as e:
        sys.stderr.write(f"pgincr wal-{a.cmd}: {e}\n")
        return HARD_FAIL if a.cmd == "fetch" else 1
    if not a.repo or not a.cluster:
        sys.stderr.write("pgincr wal: --repo and --cluster are required (or PGINCR_REPO / PGINCR_CLUSTER)\n")
        return HARD_FAIL if a.cmd == "fetch" else 1
    if a.cmd == "push":
        try:
            return push(a.path, a.repo, a.cluster, spool=a.spool, ahead=a.ahead, parallel=a.parallel, level=a.level)
        except Exception as e:
            sys.stderr.write(f"pgincr wal-push: {e}\n")
            return 1
    return _guarded_fetch(a.name, a.dest, a.repo, a.cluster, ahead=a.ahead, parallel=a.parallel,
                          idle_exit=a.idle_exit)


if __name__ == "__main__":
    sys.exit(main())
