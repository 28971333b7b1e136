"""LSN and WAL segment arithmetic."""

from __future__ import annotations

import re

from .errors import ConfigError

DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024
_LSN_RE = re.compile(r"^([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})$")
_WAL_RE = re.compile(r"^[0-9A-F]{24}$")


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> integer."""
    m = _LSN_RE.match(str(text).strip())
    if not m:
        raise ConfigError(f"{text!r} is not an LSN; write it as PostgreSQL does, e.g. '0/3000060'")
    return (int(m.group(1), 16) << 32) | int(m.group(2), 16)


def format_lsn(value: int) -> str:
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def segment_of(lsn: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    return lsn // segment_size


def wal_file_name(timeline: int, lsn: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """Name of the WAL segment file that holds `lsn` on `timeline`."""
    segno = lsn // segment_size
    per_xlogid = 0x100000000 // segment_size
    return f"{timeline:08X}{segno // per_xlogid:08X}{segno % per_xlogid:08X}"


def is_wal_file_name(name: str) -> bool:
    return bool(_WAL_RE.match(name))
