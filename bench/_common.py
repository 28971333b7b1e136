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

