"""Looking at processes from tests: what runs inside a directory, waiting for a condition."""

from __future__ import annotations

import os
import time
from pathlib import Path


def processes_under(path, name: str | None = None) -> list[int]:
    """Processes whose working directory lies under `path` (a PostgreSQL server and all its
    processes run in their data directory), optionally only those whose command is `name`."""
    path = str(path)
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cwd = os.readlink(f"/proc/{d}/cwd").removesuffix(" (deleted)")
            comm = Path(f"/proc/{d}/comm").read_text().strip()
            state = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state != "Z" and (cwd == path or cwd.startswith(path + "/")) and (name is None or comm == name):
            out.append(int(d))
    return out


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
