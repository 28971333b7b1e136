"""Making a restored data directory durable: what a restore wrote is on disk before it reports success.

A restore writes hundreds of files (GNU tar, pg_combinebackup) through the page cache; a power cut
before the kernel writes them back would silently undo it. Instead of an fsync per file (pgBackRest,
pg_basebackup), the whole filesystem is flushed once with syncfs(2) (Linux; os.sync() elsewhere),
which also commits the directory entries. WriteBehind starts that write-back while the files are
still being extracted (a background syncfs every quarter second), so the final flush is short.
syncfs flushes every dirty file of the filesystem, other programs' too: on a filesystem busy with
other writes the final flush waits for those as well.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from pathlib import Path

from .errors import RestoreError

log = logging.getLogger(__name__)

_libc = None


def _syncfs_fn():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        except OSError:
            _libc = False
    return getattr(_libc, "syncfs", None) if _libc else None


def syncfs(path: str | os.PathLike) -> str:
    """Flush every dirty page and the metadata (directory entries, the journal) of the filesystem
    holding `path`; returns how ('syncfs' or 'sync'). Raises RestoreError when the kernel reports a
    write error (Linux 5.8+ reports them through syncfs)."""
    fn = _syncfs_fn()
    if fn is None:
        os.sync()
        return "sync"
    fd = os.open(path, os.O_RDONLY)  # a directory opens read-only too
    try:
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise RestoreError(f"the restored files under {path} could not be written to disk (syncfs: "
                               f"{os.strerror(err)}): the restore is not durable; check the disk and the kernel log "
                               "(dmesg), then restore again")
    finally:
        os.close(fd)
    return "syncfs"


def filesystems(*paths: str | os.PathLike) -> list[Path]:
    """One existing path per distinct filesystem among `paths` (in order)."""
    seen, out = set(), []
    for p in paths:
        p = Path(p)
        if not p.exists():
            continue
        dev = os.stat(p).st_dev
        if dev not in seen:
            seen.add(dev)
            out.append(p)
    return out


def nearest_existing(path: str | os.PathLike) -> Path:
    """`path` or its nearest existing ancestor: where the entry of what a restore creates is written."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def make_durable(*paths: str | os.PathLike) -> list[str]:
    """Flush the filesystems holding `paths` (a restore's target and the nearest ancestor that existed
    before it, whose directory entry names what the restore created). Returns the paths flushed."""
    done = []
    for p in filesystems(*paths):
        syncfs(p)
        done.append(str(p))
    return done


class WriteBehind:
    """While files are being written (or read back) under `path`, a background thread flushes its
    filesystem every `interval` seconds (the first time at once with `immediate`), so the kernel
    writes back alongside that work and the final flush (make_durable) finds little left to do. A
    failed background flush is left to the final one, which reports it. Use as a context manager,
    or start() / stop()."""

    def __init__(self, path: str | os.PathLike, interval: float = 0.25, *, immediate: bool = False):
        self.path = Path(path)
        self.interval = interval
        self.immediate = immediate
        self.flushes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "WriteBehind":
        self._thread = threading.Thread(target=self._run, name="pgincr-write-behind", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop flushing; waits for a flush under way."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> "WriteBehind":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        if not self.immediate and self._stop.wait(self.interval):
            return
        while True:
            t = time.monotonic()
            try:
                syncfs(self.path)
            except Exception as e:  # the final flush reports it
                log.debug("background flush of %s failed: %s", self.path, e)
                return
            self.flushes += 1
            log.debug("background flush of %s: %.2f s", self.path, time.monotonic() - t)
            if self._stop.wait(self.interval):
                return
