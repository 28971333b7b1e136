"""The rest of walcmd (see walcmd.py): everything but a restore_command call served from the
fetch-ahead spool. walcmd.py imports it only when it is needed, so that such a call compiles as
little as possible (an entry script has no cached bytecode: every line costs at each call).

push (archive_command) and its push-ahead, the direct fetch (a file the spool cannot give),
starting the prefetcher, --env-file, and the argparse command line."""

import fcntl
import os
import sys
import time

NOT_FOUND = 1  # the same exit codes as walcmd's
HARD_FAIL = 126

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
    from airflow_pg_incremental.core.repository import env_options, open_repository

    repo = open_repository(url, origin="cli", **env_options())  # key, S3 SSE: the env file's
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


# --- push: the call's side of the spool -------------------------------------------------------
# The spool (pg_wal/pgincr_spool/, or --spool) is shared by the calls and ONE resident pusher
# (core/pushahead.py describes it): `lock` (its flock), `pid`, `<name>.stored` (stored, checked
# against the file's inode, size, mtime and ctime), `<name>.failed` (the pusher gave up on it: the error),
# `walpush.log`. Standard library only: a call whose file was pushed ahead imports nothing else.
STALL = 30.0  # a call pushes its file itself when the pusher shows no progress for this long


def _marker_path(spool: str, name: str) -> str:
    return os.path.join(spool, name + ".stored")


def _failed_path(spool: str, name: str) -> str:
    return os.path.join(spool, name + ".failed")


def _take_marker(spool: str, path: str, name: str) -> bool:
    """Whether the pusher stored `path` as it is now (its marker starts with the file's stat key);
    a marker found is removed (a stale one too: the file is pushed again)."""
    mp = _marker_path(spool, name)
    try:
        with open(mp) as f:
            key = " ".join(f.read().split()[:4])
    except OSError:
        return False
    st = os.stat(path)
    os.unlink(mp)
    return key == _walcmd()._stat_key(st)


def _walcmd():
    """walcmd (its fast path's helpers): the package's module, or the script that loaded us."""
    if __package__:
        from . import walcmd
        return walcmd
    return sys.modules.get("walcmd") or sys.modules["__main__"]


def _read_small(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _trace(event: str, name: str) -> None:
    path = os.environ.get("PGINCR_TEST_PUSH_TRACE")  # test hook: "<event> <name>" per call
    if path:
        with open(path, "a") as f:
            f.write(f"{event} {name}\n")


def push(path: str, repo_url: str, cluster: str, *, spool: str | None = None, ahead: int = 64,
         parallel: int = 2, idle_exit: float = 30.0, wait: float = 300.0, level: int = 3) -> int:
    """archive_command: 0 only once `path` is durably in the repository. A file PostgreSQL marked
    ready (archive_status/<name>.ready) goes through the resident pusher (started by the first
    call that finds none: it keeps pushing the ready files ahead); anything else, and a file the
    pusher cannot deliver, is pushed by the call itself."""
    name = os.path.basename(path)
    if not _plausible_wal_name(name) or not _plausible_name(cluster):
        _enable_site()
        from airflow_pg_incremental.core.lsn import wal_name_kind
        from airflow_pg_incremental.core.names import validate_cluster

        wal_name_kind(name)  # raises with the precise reason
        validate_cluster(cluster)
    pg_wal = os.path.dirname(os.path.abspath(path))
    spool = spool or os.path.join(pg_wal, "pgincr_spool")
    if _take_marker(spool, path, name):
        _trace("hit", name)
        return 0
    if ahead <= 0 or not os.path.exists(os.path.join(pg_wal, "archive_status", name + ".ready")):
        _trace("direct", name)
        return _push_direct(path, name, repo_url, cluster, level, spool)
    os.makedirs(spool, mode=0o700, exist_ok=True)
    opts = {"ahead": ahead, "parallel": parallel, "idle_exit": idle_exit, "level": level}
    return _through_pusher(path, name, pg_wal, spool, repo_url, cluster, opts, wait)


def _through_pusher(path, name, pg_wal, spool, repo_url, cluster, opts, wait) -> int:
    """Wait for the pusher to store `name` (its marker), starting one when none runs. The call
    pushes the file itself at once when the pusher gave up on it (.failed), when the pusher it
    started is gone (killed: its flock is free), when no marker moved in the spool for STALL
    seconds, or after `wait` seconds in all."""
    t0 = now = time.monotonic()
    started, repo = False, None
    progress_at, spool_mtime, next_look, delay = t0, None, t0, 0.001
    while True:
        if _take_marker(spool, path, name):
            _trace("waited", name)
            return 0
        failed = _read_small(_failed_path(spool, name))
        if failed is not None:
            _trace("failed", name)
            return _push_direct(path, name, repo_url, cluster, opts["level"], spool, repo=repo,
                                note=f"the ahead pusher gave up on it: {failed}")
        now = time.monotonic()
        if now >= next_look:  # the pusher's lock and progress, every 20 ms
            next_look = now + 0.02
            lock_fd = _try_lock(spool)
            if lock_fd is not None:
                if _take_marker(spool, path, name):  # stored just before its pusher left
                    os.close(lock_fd)
                    return 0
                if started:
                    os.close(lock_fd)
                    _trace("direct", name)
                    return _push_direct(path, name, repo_url, cluster, opts["level"], spool, repo=repo,
                                        note="the ahead pusher stopped before storing it")
                _trace("start", name)
                repo = _start_pusher(lock_fd, name, pg_wal, spool, repo_url, cluster, opts)
                started = True
                continue
            mtime = _mtime_ns(spool)
            if mtime != spool_mtime:
                spool_mtime, progress_at = mtime, now
            if now - progress_at > STALL or now - t0 > wait:
                _trace("direct", name)
                return _push_direct(path, name, repo_url, cluster, opts["level"], spool, repo=repo,
                                    note=f"the ahead pusher did not store it within {now - t0:.0f}s")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.005)


def _try_lock(spool: str) -> int | None:
    """The spool's lock, taken (its fd), or None while a pusher holds it."""
    fd = os.open(os.path.join(spool, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _mtime_ns(path: str) -> int | None:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _start_pusher(lock_fd: int, name: str, pg_wal: str, spool: str, repo_url: str, cluster: str, opts: dict):
    """Fork the resident pusher (core/pushahead.py), which keeps the lock (the same open file).
    The drivers are imported and the repository opened (no request made: a connection must not
    be shared across the fork) before, so the child starts warm. Returns that repository, for a
    push by the call itself."""
    _enable_site()
    import airflow_pg_incremental.core.pushahead  # noqa: F401  (imported before the fork)
    from airflow_pg_incremental.core.wal import push_file  # noqa: F401

    try:
        repo = _repo(repo_url, check=False)
    except BaseException:
        os.close(lock_fd)
        raise

    def child() -> None:
        from airflow_pg_incremental.core.pushahead import run_detached

        run_detached(lock_fd, repo, cluster, pg_wal, spool, os.getcwd(), first=name, log=lambda m: _log(spool, m),
                     **opts)

    _fork_detached(lock_fd, child)
    return repo


def _fork_detached(lock_fd: int, child) -> int:
    """Fork; the child runs `child()` holding `lock_fd` (the same open file as ours) and exits
    without ever returning into PostgreSQL's caller; the parent closes its copy. The child's pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(lock_fd)
        return pid
    try:
        child()
    finally:
        os._exit(0)


def _push_direct(path, name, repo_url, cluster, level, spool, *, repo=None, note=None) -> int:
    """The call stores the file itself: 0 once stored, else 1 with the error (and the pusher's)."""
    _enable_site()
    from airflow_pg_incremental.core.wal import push_file

    try:
        if repo is None:
            repo = _repo(repo_url)
        else:
            repo.identity()
        push_file(repo, cluster, path, name=name, level=level, checksum=False)
    except Exception as e:
        _log(None, f"{name} NOT archived: {e}" + (f" ({note})" if note else ""))
        return 1
    if note:
        _log(spool, f"{name} stored by the call itself ({note})")
    try:
        os.unlink(_failed_path(spool, name))
    except OSError:
        pass
    return 0


# --- fetch: what a call served from the spool does not need --------------------------------------
def start_prefetcher(lock_fd: int, spool: str, repo_url: str, cluster: str, opts: dict, env_file: str | None) -> int:
    """Fork the prefetcher (core/fetchahead.run_detached) with the credentials of `env_file`: it
    keeps the lock (the same open file) and runs until recovery ends. Its pid."""
    try:
        _load_env_file(env_file)
    except BaseException:
        os.close(lock_fd)
        raise

    def child() -> None:
        _enable_site()
        from airflow_pg_incremental.core.fetchahead import run_detached

        run_detached(lock_fd, repo_url, cluster, spool, os.getcwd(), **opts)

    return _fork_detached(lock_fd, child)


def fetch_direct(name: str, dest: str, repo_url: str, cluster: str, note: str | None = None,
                 env_file: str | None = None) -> int:
    """Exit 1 ("not archived": recovery ends there) only when the repository is reachable, is one,
    holds the cluster and lacks the file; 126 for every other failure, with the prefetcher's error
    for the file (`note`) when there was one."""
    try:
        _load_env_file(env_file)
    except EnvFileError as e:
        sys.stderr.write(f"pgincr wal-fetch: {e}\n")
        return HARD_FAIL
    _enable_site()
    from airflow_pg_incremental.core.fetchahead import fetch_direct as fetch_file

    try:
        if fetch_file(_repo(repo_url, check=False), cluster, name, dest):  # a found object proves the location
            return 0
    except Exception as e:
        also = f" (fetching it ahead failed too: {note})" if note else ""
        sys.stderr.write(f"pgincr wal-fetch: {name}: {e}{also}\n")
        return HARD_FAIL
    if len(name) == 24:
        sys.stderr.write(f"pgincr wal-fetch: {name} is not in the archive\n")
    return NOT_FOUND


_HEX = set("0123456789ABCDEF")


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


def main(argv: list[str], fa: dict | None, fetch) -> int:
    """push's fast path (`fa`: walcmd's parse of argv), else the argparse command line; `fetch`
    is walcmd's guarded fetch."""
    if fa is not None and fa["cmd"] == "push":
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
                            idle_exit=float(fa.get("idle_exit") or 30), level=int(fa.get("level") or 3))
            except Exception as e:
                sys.stderr.write(f"pgincr wal-push: {e}\n")
                return 1
    import argparse

    ap = argparse.ArgumentParser(prog="pgincr-wal", description="archive_command / restore_command of pgincr")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("push", "fetch"):
        sp = sub.add_parser(name)
        sp.add_argument("--repo", default=os.environ.get("PGINCR_REPO"))
        sp.add_argument("--cluster", default=os.environ.get("PGINCR_CLUSTER"))
        sp.add_argument("--env-file")
        if name == "push":
            sp.add_argument("path", help="%%p: path of the WAL file, relative to the data directory")
            sp.add_argument("--spool", help="marker directory (default: pg_wal/pgincr_spool)")
            sp.add_argument("--ahead", type=int, default=64,
                            help="files the resident pusher stores ahead at once (0: every call pushes its own file)")
            sp.add_argument("--parallel", type=int, default=2, help="parallel stores of the resident pusher")
            sp.add_argument("--idle-exit", type=float, default=30.0,
                            help="seconds with nothing to push after which the resident pusher stops")
            sp.add_argument("--level", type=int, default=3)
        else:
            sp.add_argument("name", help="%%f")
            sp.add_argument("dest", help="%%p")
            sp.add_argument("--ahead", type=int, default=8, help="segments to fetch ahead (0: no fetch-ahead)")
            sp.add_argument("--parallel", type=int, default=3, help="parallel downloads of the prefetcher")
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
            return push(a.path, a.repo, a.cluster, spool=a.spool, ahead=a.ahead, parallel=a.parallel,
                        idle_exit=a.idle_exit, level=a.level)
        except Exception as e:
            sys.stderr.write(f"pgincr wal-push: {e}\n")
            return 1
    return fetch(a.name, a.dest, a.repo, a.cluster, ahead=a.ahead, parallel=a.parallel, idle_exit=a.idle_exit)
