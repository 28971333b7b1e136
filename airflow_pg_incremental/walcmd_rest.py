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


# --- fetch: what a call served from the spool does not need --------------------------------------
def start_prefetcher(lock_fd: int, spool: str, repo_url: str, cluster: str, opts: dict, env_file: str | None) -> int:
    """Fork the prefetcher (core/fetchahead.run_detached) with the credentials of `env_file`: it
    keeps the lock (the same open file) and runs until recovery ends. Its pid."""
    try:
        _load_env_file(env_file)
    except BaseException:
        os.close(lock_fd)
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(lock_fd)
        return pid
    try:  # never let the child return into PostgreSQL's caller
        _enable_site()
        from airflow_pg_incremental.core.fetchahead import run_detached

        run_detached(lock_fd, repo_url, cluster, spool, os.getcwd(), **opts)
    finally:
        os._exit(0)


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
                            level=int(fa.get("level") or 3))
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
    return fetch(a.name, a.dest, a.repo, a.cluster, ahead=a.ahead, parallel=a.parallel, idle_exit=a.idle_exit)
