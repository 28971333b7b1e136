"""Helpers shared by the benchmarks (run as `python bench/<name>.py`, so this imports as _common)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def make_workdir(base: str | None, prefix: str = "pgincr-bench-") -> Path:
    """A new run directory (mode 0755): --workdir itself if it does not exist yet, else a fresh
    sub-directory of it (default base /var/tmp). Only what is created here is removed at the end."""
    if base and not os.path.exists(base):
        p = Path(base).absolute()
        p.mkdir(parents=True, mode=0o755)
    else:
        p = Path(tempfile.mkdtemp(prefix=prefix, dir=base or "/var/tmp")).absolute()
    os.chmod(p, 0o755)
    return p


def run_bench(args, prefix: str, make_bench, stoppers) -> int:
    """The frame every benchmark's main() shares: a fresh work directory, SIGTERM turned into
    KeyboardInterrupt, `make_bench(args, workdir).run()` -> report, the report written to
    --json, then (on every exit, with SIGTERM/SIGINT ignored so the clean-up finishes) each
    `(what, stop)` of `stoppers(bench)` called, a failure printed as a warning, and the work
    directory removed unless --keep."""

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    workdir = make_workdir(args.workdir, prefix)
    bench = make_bench(args, workdir)
    try:
        report = bench.run()
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
            print(f"results written to {args.json}")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the clean-up finish
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for what, stop in stoppers(bench):
            try:
                stop()
            except Exception as e:
                print(f"warning: could not {what}: {e}", file=sys.stderr)
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0



# -- durability and page cache (bench_restore.py) ------------------------------------------------
def syncfs(path: str | os.PathLike) -> float:
    """syncfs(2) of the filesystem holding `path` (only that filesystem, unlike sync(2), so other
    users' dirty data elsewhere is not flushed on our clock). Returns the seconds it took. Falls back
    to os.sync() where syncfs is not available."""
    import ctypes
    import time

    t = time.monotonic()
    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if not hasattr(libc, "syncfs") or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)
    return time.monotonic() - t


def _files_under(paths) -> list[str]:
    out = []
    for root in paths:
        root = str(root)
        if os.path.isfile(root):
            out.append(root)
            continue
        for dirpath, _dirs, names in os.walk(root):
            out.extend(os.path.join(dirpath, n) for n in names)
    return out


def page_cache(paths, state: str) -> dict:
    """Put every file under `paths` into the page cache ('warm': read once) or out of it ('cold':
    posix_fadvise DONTNEED, which drops this file's clean pages without root or /proc access; dirty
    pages stay, so sync first). Returns the files and bytes touched."""
    files = n_bytes = 0
    for f in _files_under(paths):
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue  # vanished (e.g. a SeaweedFS temp file) or not readable
        try:
            if state == "cold":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while True:
                    b = os.read(fd, 1 << 20)
                    if not b:
                        break
                    n_bytes += len(b)
            files += 1
        finally:
            os.close(fd)
    return {"state": state, "files": files, "bytes_read": n_bytes}


def ratio_summary(ratios: list[float]) -> dict:
    """Per-round ratios (ours / reference, measured side by side in the same round), their median
    and spread: a ratio from two medians could pair runs of different rounds on a noisy machine."""
    import statistics

    r = [x for x in ratios if x is not None]
    if not r:
        return {"per_round": [], "median": None, "min": None, "max": None}
    return {"per_round": r, "median": statistics.median(r), "min": min(r), "max": max(r)}
