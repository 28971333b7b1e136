"""Running PostgreSQL servers: initdb, start, stop, as an unprivileged OS user when we are root.

Used to start a server on a restored data directory (restore checks, restore tests) and by the
demo, tests and benchmarks to create an embedded PostgreSQL. The server never runs as root.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

from . import procs
from .binaries import find_program
from .errors import ConfigError, ServerError
from .pgconn import ConnInfo

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_os_user() -> str | None:
    """None when we are not root (the server runs as ourselves); else the configured account."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("PGINCR_OS_USER")
    if name:
        return name
    for cand in ("postgres", "pgincr"):
        try:
            pwd.getpwnam(cand)
            return cand
        except KeyError:
            continue
    return "pgincr"


def repository_owner_default() -> str | None:
    """Who owns a local repository that root creates: the OS user PostgreSQL runs as (see
    default_os_user), when it exists, so that archive_command and the restore_command of a
    restored server (both run as that user) can use the repository; None (the creator) otherwise."""
    if os.geteuid() != 0:
        return None
    name = default_os_user()
    try:
        pwd.getpwnam(name)
    except KeyError:
        return None
    return name


def ensure_os_user(name: str) -> str:
    """Create a system account for running PostgreSQL (root only; used by demo/tests)."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        if os.geteuid() != 0:
            raise ConfigError(f"OS user {name!r} does not exist and we are not root to create it")
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], check=True,
                       capture_output=True)
    return name


def chown_tree(path: str | os.PathLike, os_user: str | None) -> None:
    if not os_user or os.geteuid() != 0:
        return
    pw = pwd.getpwnam(os_user)
    if not os.path.isdir(path) or os.path.islink(path):
        os.lchown(path, pw.pw_uid, pw.pw_gid)
        return
    for dirpath, dirs, files in os.walk(path):
        os.lchown(dirpath, pw.pw_uid, pw.pw_gid)
        for n in dirs + files:
            os.lchown(os.path.join(dirpath, n), pw.pw_uid, pw.pw_gid)


def as_user(cmd: list[str], os_user: str | None) -> list[str]:
    if os_user and os.geteuid() == 0:
        return ["runuser", "-u", os_user, "--"] + cmd
    return cmd


def _user_can_exec(path: str, os_user: str | None) -> bool:
    if not os_user or os.geteuid() != 0:
        return True
    r = subprocess.run(as_user(["test", "-x", path], os_user), capture_output=True)
    return r.returncode == 0


def server_bindir(major: int, os_user: str | None) -> str:
    """bin directory of PostgreSQL `major` whose programs `os_user` may execute.

    When the installation sits below a directory the OS user cannot enter (e.g. a virtualenv
    under /root), the installation tree is copied once to /var/tmp with world-readable modes."""
    bindir = os.path.dirname(find_program("postgres", major))
    if _user_can_exec(os.path.join(bindir, "postgres"), os_user):
        return bindir
    root = os.path.dirname(bindir)
    tag = hashlib.sha256(root.encode()).hexdigest()[:10]
    dest = Path(f"/var/tmp/pgincr-pginstall-{major}-{tag}")
    if not (dest / "bin" / "postgres").exists():
        tmp = dest.with_name(dest.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(root, tmp, symlinks=True)
        for dirpath, dirs, files in os.walk(tmp):
            os.chmod(dirpath, 0o755)
        os.chmod(tmp.parent, os.stat(tmp.parent).st_mode)  # /var/tmp stays as it is
        try:
            os.rename(tmp, dest)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("PostgreSQL %s programs copied to %s so that OS user %s can run them", major, dest, os_user)
    return str(dest / "bin")


def make_user_dir(path: str | os.PathLike, os_user: str | None, mode: int = 0o700) -> Path:
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    os.chmod(p, mode)
    chown_tree(p, os_user)
    return p


def ensure_traversable(path: str | os.PathLike) -> None:
    """Give o+x to every parent of `path` that lacks it, so the server user can reach it."""
    if os.geteuid() != 0:
        return
    p = Path(path).absolute()
    for parent in [p] + list(p.parents):
        if not parent.exists():
            continue
        st = os.stat(parent)
        if not st.st_mode & 0o001:
            os.chmod(parent, st.st_mode | 0o001)


# what a server (and the restore_command / archive_command it runs) inherits from us: nothing that
# could be a secret (PGPASSWORD, AWS keys, Airflow's connections ...), only locale, time zone and
# where programs and temporary files are; the caller adds exactly what the server needs
SERVER_ENV_ALLOWED = ("PATH", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH", "PG_OOM_ADJUST_FILE",
                      "PG_OOM_ADJUST_VALUE")


def server_environment(extra: dict | None = None) -> dict:
    """The environment of a PostgreSQL program we start: the allow-list above (and LC_*) from ours,
    plus `extra` (e.g. the repository credentials the restore_command needs)."""
    env = {k: v for k, v in os.environ.items() if k in SERVER_ENV_ALLOWED or k.startswith("LC_")}
    env.setdefault("PATH", os.defpath)
    env.update(extra or {})
    return env


class PgServer:
    """A PostgreSQL server on `data_dir`, listening on a private unix socket (and TCP if asked)."""

    def __init__(self, data_dir: str | os.PathLike, *, major: int, port: int | None = None,
                 os_user: str | None = None, socket_dir: str | os.PathLike | None = None,
                 listen: str = "127.0.0.1", log_file: str | os.PathLike | None = None):
        self.data_dir = Path(data_dir).absolute()
        self.major = major
        self.port = port or free_port()
        self.os_user = os_user
        self.listen = listen
        base = self.data_dir.parent
        self.socket_dir = Path(socket_dir) if socket_dir else base / f"{self.data_dir.name}.sock"
        self._own_socket_dir = False  # a short one under /tmp, made by start() (see _short_socket_dir)
        self.log_file = Path(log_file) if log_file else base / f"{self.data_dir.name}.log"
        self.bindir = server_bindir(major, os_user)
        self.started = False
        self.starting = False

    def _run(self, prog: str, args: list[str], check: bool = True, timeout: float = 300,
             env: dict | None = None) -> subprocess.CompletedProcess:
        cmd = as_user([os.path.join(self.bindir, prog)] + args, self.os_user)
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env=server_environment(env), cwd="/")
        if check and r.returncode != 0:
            raise ServerError(f"{prog} failed (exit {r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
        return r

    def initdb(self, *, superuser: str = "postgres", data_checksums: bool = True, extra: list[str] = ()) -> None:
        ensure_traversable(self.data_dir.parent)
        make_user_dir(self.data_dir, self.os_user)
        args = ["-D", str(self.data_dir), "-U", superuser, "--auth-local=trust", "--auth-host=scram-sha-256",
                "-E", "UTF8", "--locale=C", "--no-instructions"]
        if data_checksums and self.major >= 12:
            args.append("--data-checksums")
        elif not data_checksums and self.major >= 18:
            args.append("--no-data-checksums")
        self._run("initdb", args + list(extra))

    def settings(self, extra: dict | None = None) -> dict:
        s = {"port": self.port, "listen_addresses": self.listen, "unix_socket_directories": str(self.socket_dir)}
        s.update(extra or {})
        return s

    def _start_args(self, settings: dict | None, timeout: int, wait: bool) -> list[str]:
        opts = " ".join(f"-c {k}={_quote_opt(v)}" for k, v in self.settings(settings).items())
        return ["-D", str(self.data_dir), "-l", str(self.log_file), "-o", opts, "-w" if wait else "-W", "-t",
                str(timeout), "start"]

    def start_command(self, settings: dict | None = None) -> list[str]:
        """The command line that starts this server as start() does (to tell a user how to start it)."""
        return as_user([os.path.join(self.bindir, "pg_ctl"), *self._start_args(settings, 120, True)], self.os_user)

    def start(self, settings: dict | None = None, timeout: int = 120, env: dict | None = None,
              wait: bool = True) -> None:
        self._short_socket_dir()
        make_user_dir(self.socket_dir, self.os_user)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        if not self.log_file.exists():
            self.log_file.touch()
        chown_tree(self.log_file, self.os_user)
        procs.register_server(self)  # before pg_ctl: a kill during the start finds it
        self.starting = True
        try:
            r = self._run("pg_ctl", self._start_args(settings, timeout, wait), check=False, timeout=timeout + 30,
                          env=env)
        finally:
            self.starting = False
        if r.returncode != 0:
            procs.forget_server(self)
            tail = self.log_tail()
            raise ServerError(f"PostgreSQL did not start on {self.data_dir} (port {self.port}): "
                              f"{r.stderr.strip() or r.stdout.strip()}\nserver log:\n{tail}")
        self.started = True
        if procs.terminated():  # killed while pg_ctl was starting it
            self.stop("immediate")
            procs.check_running()

    def stop(self, mode: str = "fast") -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._run("pg_ctl", ["-D", str(self.data_dir), "-m", mode, "-w", "-t", "120", "stop"], check=False)
        self.started = False
        procs.forget_server(self)
        if self._own_socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    # a unix socket path holds at most 107 bytes (sun_path): beside a data directory with a long
    # path, the socket goes into a private directory under /tmp instead
    _MAX_SOCKET_PATH = 100

    def _short_socket_dir(self) -> None:
        if len(f"{self.socket_dir}/.s.PGSQL.{self.port}.lock") <= self._MAX_SOCKET_PATH or self._own_socket_dir:
            return
        import tempfile

        self.socket_dir = Path(tempfile.mkdtemp(prefix="pgincr-sock-", dir="/tmp" if os.path.isdir("/tmp") else None))
        self._own_socket_dir = True

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no server log)"

    def local_conninfo(self, dbname: str = "postgres", user: str = "postgres") -> ConnInfo:
        """Connection through the private unix socket (trust auth for local connections)."""
        return ConnInfo(host=str(self.socket_dir), port=self.port, user=user, dbname=dbname)

    def tcp_conninfo(self, user: str, password: str | None, dbname: str = "postgres") -> ConnInfo:
        return ConnInfo(host="127.0.0.1", port=self.port, user=user, password=password, dbname=dbname)

    def psql(self, sql: str, dbname: str = "postgres", user: str = "postgres") -> str:
        r = subprocess.run([os.path.join(self.bindir, "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                            "-h", str(self.socket_dir), "-p", str(self.port), "-U", user, "-d", dbname,
                            "-c", sql], capture_output=True, text=True)
        if r.returncode != 0:
            raise ServerError(f"psql failed: {r.stderr.strip()}")
        return r.stdout

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = subprocess.run([os.path.join(self.bindir, "pg_isready"), "-h", str(self.socket_dir), "-p",
                                str(self.port)], capture_output=True)
            if r.returncode == 0:
                return
            time.sleep(0.2)
        raise ServerError(f"server on port {self.port} not ready after {timeout}s:\n{self.log_tail()}")


def _quote_opt(v) -> str:
    s = str(v)
    if s == "" or any(c in s for c in " '\"\\"):
        return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return s


def python_usable_by(os_user: str | None) -> None:
    """restore_command / archive_command run this package's Python as the server's OS user. Give
    that user passage (o+x, nothing more) to the interpreter, its standard library and
    site-packages when it lacks it (e.g. pyenv or a virtualenv under /root), then check by running
    the WAL command as that user."""
    if not os_user or os.geteuid() != 0:
        return
    import sys
    import sysconfig

    import airflow_pg_incremental

    exe = os.path.realpath(sys.executable)
    paths = [os.path.dirname(exe), os.path.realpath(sysconfig.get_paths()["stdlib"]),
             os.path.realpath(sysconfig.get_paths()["purelib"]),
             os.path.dirname(os.path.realpath(airflow_pg_incremental.__file__))]
    probe = as_user([sys.executable, "-S", os.path.join(paths[-1], "walcmd.py"), "--help"], os_user)
    if subprocess.run(probe, capture_output=True).returncode == 0:
        return
    for p in paths:
        ensure_traversable(p)
    r = subprocess.run(probe, capture_output=True, text=True)
    if r.returncode != 0:
        raise ConfigError(f"OS user {os_user} cannot run {sys.executable} (needed for restore_command/"
                          f"archive_command): {r.stderr.strip()[:300]}; install airflow-pg-incremental where that "
                          "user can read it (e.g. a virtualenv under /opt)")


def repository_readable_by(root: str | os.PathLike, os_user: str | None) -> None:
    """restore_command reads a local repository as the server's OS user: check it can."""
    if not os_user or os.geteuid() != 0:
        return
    r = subprocess.run(as_user(["test", "-r", str(root), "-a", "-x", str(root)], os_user), capture_output=True)
    if r.returncode != 0:
        raise ConfigError(f"OS user {os_user} cannot read the repository {root}, which restore_command needs during "
                          f"recovery: give it read access (e.g. chmod o+rx on the directories down to {root})")
