"""How a base backup's bytes travel from pg_basebackup into the repository.

Where pg_basebackup can compress with zstd (PostgreSQL 15+ built with it, Debian's is), it does:
on the database server (``--compress=server-zstd``: the server sends compressed bytes, the network
and this machine carry a fifth of the data) or in its own process (``client-zstd``), with worker
threads either way. It then writes ``base.tar.zst`` and ``backup_manifest`` into a private staging
directory, and ``StagedFile`` hands base.tar.zst's bytes to the repository *while pg_basebackup is
still writing it*: nothing is decompressed and recompressed, the stored object is exactly the
stream that arrived, checksummed (stored SHA-256) as it passes. pg_basebackup refuses to send a
server-compressed tar to standard output (it cannot put the manifest in it), hence the file.

The staging file never holds more than a few MiB of disk: what has been read is freed (a hole is
punched behind the reader, Linux fallocate), and when the repository is slower than pg_basebackup
(a slow S3 link) pg_basebackup is paused (SIGSTOP/SIGCONT) while more than ``MAX_BACKLOG`` bytes
wait, as a full pipe would pause it.

Where pg_basebackup cannot compress (the embedded PostgreSQL 18 has no zstd), the tar comes
through a pipe and python-zstandard compresses it with worker threads (``PipeReader`` +
``CompressingReader`` in codec.py).

``choose`` picks the way from the per-cluster setting ``compression`` (auto, server, client) and
what the server and the pg_basebackup binary support, and says why when it falls back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

from .codec import _ReadInto

log = logging.getLogger(__name__)

MODES = ("auto", "server", "client")
MAX_BACKLOG = 128 * 1024 * 1024   # staged bytes not yet read before pg_basebackup is paused
PUNCH_EVERY = 8 * 1024 * 1024     # free the staging file's disk behind the reader in steps of this
POLL = 0.005                      # seconds between looks at a staging file that has no new bytes


def default_threads() -> int:
    """Compression threads when none are configured: the cores this process may use, 1..8."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


@dataclass
class Plan:
    """How this backup is compressed. where: server | client (pg_basebackup compresses, staged) |
    python (piped, python-zstandard compresses)."""
    where: str
    level: int
    threads: int
    why: str

    @property
    def staged(self) -> bool:
        return self.where in ("server", "client")

    def compress_option(self) -> str:
        workers = f",workers={self.threads}" if self.threads > 0 else ""
        return f"--compress={self.where}-zstd:level={self.level}{workers}"

    def describe(self) -> str:
        how = {"server": "on the database server (server-side zstd)",
               "client": "by pg_basebackup (client-side zstd)",
               "python": "by pgincr (python-zstandard)"}[self.where]
        threads = f"{self.threads} worker thread(s)" if self.threads > 0 else "no worker threads"
        return f"compressed {how}, level {self.level}, {threads}: {self.why}"

    def to_dict(self) -> dict:
        return {"where": self.where, "level": self.level, "threads": self.threads}


def check_mode(mode: str) -> None:
    if mode not in MODES:
        from .errors import ConfigError

        raise ConfigError(f"compression {mode!r} is not one of {', '.join(MODES)} (auto: on the database server "
                          "when it can, else on this machine)")


_client_zstd_cache: dict[str, bool] = {}


def client_zstd_supported(pg_basebackup: str) -> bool:
    """Whether this pg_basebackup binary can compress with zstd itself (15+, built with zstd).
    It validates --compress before anything else, so a run whose -D cannot be created answers
    without connecting anywhere."""
    if pg_basebackup not in _client_zstd_cache:
        try:
            r = subprocess.run([pg_basebackup, "--compress=client-zstd:level=1", "-Ft", "-D", "/dev/null/pgincr-probe",
                                "-d", "host=/nonexistent-pgincr-probe"], capture_output=True, text=True, timeout=20,
                               env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"})
            err = r.stderr.lower()
            _client_zstd_cache[pg_basebackup] = ("compress" not in err and "unrecognized option" not in err
                                                 and "invalid" not in err)
        except (OSError, subprocess.SubprocessError):
            _client_zstd_cache[pg_basebackup] = False
    return _client_zstd_cache[pg_basebackup]


def choose(mode: str, level: int, threads: int | None, *, server_zstd: bool, server_major: int,
           pg_basebackup: str) -> Plan:
    """The compression plan for one backup (see the module docstring). Falls back, saying why."""
    check_mode(mode)
    n = default_threads() if threads is None else max(0, int(threads))
    client = client_zstd_supported(pg_basebackup)
    if mode in ("auto", "server"):
        if server_zstd and server_major >= 15 and client:
            return Plan("server", level, n, "the server supports zstd" if mode == "auto" else "as configured")
        lacking = ("PostgreSQL older than 15" if server_major < 15 else
                   "the server was built without zstd" if not server_zstd else
                   "this pg_basebackup cannot ask for server-side zstd")
        if mode == "server":
            log.warning("compression: server asked for, but %s: compressing on this machine instead", lacking)
        why = f"{lacking}, so on this machine"
    else:
        why = "as configured"
    if client:
        return Plan("client", level, n, why)
    return Plan("python", level, n, f"{why}; {os.path.basename(pg_basebackup)} has no zstd, so pgincr compresses")


# --- the staging directory and file -------------------------------------------------------------
STAGE_PREFIX = "pgincr-backup-"


def make_stage(backup_id: str, parent: str | None) -> tuple[str, str, int]:
    """A private staging directory for one backup: (its path, the empty directory pg_basebackup
    writes into, a descriptor holding the flock that says it is in use). Staging directories left
    by a killed process (their flock is free) are removed first."""
    import fcntl
    import tempfile

    remove_stale_stages(parent)
    root = tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{backup_id}-", dir=parent)
    fd = os.open(os.path.join(root, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    out = os.path.join(root, "pg_basebackup")
    os.mkdir(out, 0o700)
    return root, out, fd


def remove_stale_stages(parent: str | None) -> list[str]:
    """Remove the staging directories in `parent` whose owner is gone (lock file not flocked)."""
    import fcntl
    import shutil
    import tempfile

    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        names = [n for n in os.listdir(parent) if n.startswith(STAGE_PREFIX)]
    except OSError:
        return removed
    for n in names:
        root = os.path.join(parent, n)
        try:
            fd = os.open(os.path.join(root, "lock"), os.O_RDWR)
        except OSError:
            continue  # not ours, or being created right now
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a running backup
        finally:
            os.close(fd)
        shutil.rmtree(root, ignore_errors=True)
        removed.append(root)
        log.info("removed the staging directory of a backup that was killed: %s", root)
    return removed


def _load_prctl():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()  # resolved here: the forked child must not load libraries


def die_with_parent() -> None:
    """preexec_fn for pg_basebackup: killed (SIGKILL) when the process that started it dies, even
    by kill -9. It writes into a file, not a pipe, so nothing else would stop it: it would fill the
    staging file system with a whole backup nobody reads (Linux prctl PR_SET_PDEATHSIG)."""
    if _prctl is not None:
        _prctl(1, 9, 0, 0, 0)  # PR_SET_PDEATHSIG, SIGKILL


# --- the staging file ---------------------------------------------------------------------------
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = None


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Free the disk blocks of [offset, offset+length) of a file (Linux); False where unsupported."""
    global _libc
    if length <= 0:
        return True
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
        return _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) == 0
    except (OSError, AttributeError):
        return False


class StagedFile(_ReadInto, io.RawIOBase):
    """read() returns the bytes of `path` as the process `proc` writes them, and end of file once
    `proc` has exited successfully and every byte was read. If `proc` fails, read() raises what
    `on_failure(returncode)` returns. Disk behind the reader is freed; `proc` is paused while more
    than `max_backlog` bytes wait (see the module docstring). `on_chunk` sees every chunk.
    `finished`, when given, says the file is complete although `proc` still runs (pg_basebackup
    began its next archive: it closes one before it opens the next)."""

    def __init__(self, path: str, proc: subprocess.Popen, *, on_failure: Callable[[int], BaseException],
                 on_chunk: Callable[[bytes], None] | None = None, max_backlog: int | None = None,
                 finished: Callable[[], bool] | None = None):
        self.path = path
        self.finished = finished
        self._complete = False
        self.proc = proc
        self.on_failure = on_failure
        self.on_chunk = on_chunk
        self.max_backlog = max_backlog or MAX_BACKLOG
        self.size = 0
        self._fd: int | None = None
        self._punched = 0
        self._can_punch = True
        self._paused = False

    def read(self, n: int = -1) -> bytes:
        n = 1 << 20 if n is None or n < 0 else n
        while True:
            exited = self.proc.poll() is not None
            if exited and self.proc.returncode != 0:
                self._resume()
                raise self.on_failure(self.proc.returncode)
            if self._fd is None and not self._open():
                if exited:  # pg_basebackup succeeded without writing the file: should not happen
                    raise self.on_failure(0)
                time.sleep(POLL)
                continue
            data = os.read(self._fd, n)
            if data:
                self.size += len(data)
                self._free_behind()
                if self.on_chunk:
                    self.on_chunk(data)
                return data
            if exited or self._complete:
                return b""
            if self.finished is not None and self.finished():
                self._complete = True  # read once more: what was written before the next file began
                continue
            self._resume()  # nothing left to read: let it write
            time.sleep(POLL)

    @property
    def descriptor(self) -> int | None:
        """Our descriptor of the staging file (None before it exists)."""
        return self._fd

    def _open(self) -> bool:
        try:  # read-write: punching a hole needs a descriptor open for writing
            self._fd = os.open(self.path, os.O_RDWR)
        except PermissionError:
            self._fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        return True

    def _free_behind(self) -> None:
        if self._can_punch and self.size - self._punched >= PUNCH_EVERY:
            if punch_hole(self._fd, self._punched, self.size - self._punched):
                self._punched = self.size
            else:
                self._can_punch = False
                log.info("the staging file system cannot free space behind the reader: the staging file grows to "
                         "the backup's compressed size (%s)", os.path.dirname(self.path))
        try:
            backlog = os.fstat(self._fd).st_size - self.size
        except OSError:
            return
        if not self._paused and backlog > self.max_backlog:
            self._signal(signal.SIGSTOP)
            self._paused = True
        elif self._paused and backlog < self.max_backlog // 2:
            self._resume()

    def _signal(self, sig: int) -> None:
        try:
            os.kill(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def _resume(self) -> None:
        if self._paused:
            self._signal(signal.SIGCONT)
            self._paused = False

    def close(self) -> None:
        self._resume()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        super().close()


def held_open(pid: int, fd: int | None) -> bool:
    """Whether process `pid` has the file behind our descriptor `fd` open (Linux /proc/PID/fd).
    True when that cannot be told: the caller then waits for the process to exit."""
    if fd is None:
        return True
    try:
        me = os.fstat(fd)
        links = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return True
    for n in links:
        try:
            st = os.stat(f"/proc/{pid}/fd/{n}")
        except OSError:
            continue  # closed meanwhile, or not a file
        if (st.st_dev, st.st_ino) == (me.st_dev, me.st_ino):
            return True
    return False


class LabelReader:
    """Decompresses only the start of a zstd-compressed base tar, until backup_label (the tar's first
    member, PostgreSQL sends it first) has been seen; what comes after is not decompressed."""

    def __init__(self, limit: int = 4 * 1024 * 1024):
        import zstandard

        from .tarscan import TarScanner

        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._scan = TarScanner(capture=("backup_label",))
        self._limit = limit
        self._seen = 0
        self.done = False

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self._seen += len(data)
        try:
            self._scan.feed(self._d.decompress(data))
        except Exception as e:  # the stored stream's own checks (SHA-256, restore) are the judges
            log.debug("could not read backup_label from the stream: %s", e)
            self.done = True
        if self._scan.members >= 2 or self._seen >= self._limit:  # the member after backup_label began
            self.done = True

    def label(self) -> bytes | None:
        return self._scan.read_captured("backup_label")


class ContentHasher:
    """SHA-256 and size of the decompressed content of a zstd stream fed in chunks (asked for with
    content_sha256: it costs a full decompression)."""

    def __init__(self):
        import hashlib

        import zstandard

        self._d = zstandard.ZstdDecompressor().decompressobj()
        self._h = hashlib.sha256()
        self.size = 0

    def feed(self, data: bytes) -> None:
        out = self._d.decompress(data)
        self._h.update(out)
        self.size += len(out)

    def hexdigest(self) -> str:
        return self._h.hexdigest()
