"""What a restore must show: that it is on disk when it returns (cachestat(2), Linux 6.5+, counts
the dirty and under-write-back pages of a file in the page cache: a durable restore leaves none in
any file it wrote), and a plausible split of its time."""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

_SYS_CACHESTAT = 451  # the same number on x86_64 and aarch64 (the unified syscall table)


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [("nr_cache", ctypes.c_uint64), ("nr_dirty", ctypes.c_uint64), ("nr_writeback", ctypes.c_uint64),
                ("nr_evicted", ctypes.c_uint64), ("nr_recently_evicted", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


def cachestat_supported() -> bool:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return False
    fd = os.open("/proc/self/exe", os.O_RDONLY)
    try:
        return _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(_Range(0, 0)), ctypes.byref(_Stat()), 0) == 0
    finally:
        os.close(fd)


def unwritten_pages(path: str | os.PathLike) -> int:
    """Dirty plus under-write-back pages of one file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        st = _Stat()
        if _libc.syscall(_SYS_CACHESTAT, fd, ctypes.byref(_Range(0, 0)), ctypes.byref(st), 0) != 0:
            raise OSError(ctypes.get_errno(), f"cachestat {path}")
        return st.nr_dirty + st.nr_writeback
    finally:
        os.close(fd)


def not_on_disk(root: str | os.PathLike) -> dict[str, int]:
    """{file: pages not yet on disk} for every regular file under `root` that has any."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for n in files:
            p = Path(dirpath, n)
            if p.is_file() and not p.is_symlink():
                pages = unwritten_pages(p)
                if pages:
                    out[str(p.relative_to(root))] = pages
    return out


RESTORE_STEPS = {"extract", "combine", "verify", "sync"}  # restore_backup
PITR_STEPS = RESTORE_STEPS | {"plan", "replay", "checks"}  # restore_pitr, restore tests


def assert_split(timings: dict, total: float, required: set, allowed: set = PITR_STEPS) -> None:
    """The RTO split is plausible: the expected steps, each >= 0, together no more than the whole."""
    assert required <= set(timings) <= allowed, timings
    assert all(v >= 0 for v in timings.values()), timings
    assert sum(timings.values()) <= total + 0.005, (timings, total)  # each rounded to the millisecond


def restored_fingerprint(target: str | os.PathLike, os_user: str | None, major: int = 18) -> dict:
    """Start a server on a restored copy, take its data fingerprint, stop it."""
    from airflow_pg_incremental.core.restore import start_restored
    from airflow_pg_incremental.sandbox import data_fingerprint

    srv = start_restored(target, major, os_user=os_user)
    try:
        return data_fingerprint(srv.local_conninfo())
    finally:
        srv.stop()
