"""Helpers shared by the benchmarks (run as `python bench/<name>.py`, so this imports as _common)."""

from __future__ import annotations

import os
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
