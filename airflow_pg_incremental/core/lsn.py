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


def wal_file_name_ending(timeline: int, lsn: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """Like PostgreSQL's pg_walfile_name(): the segment holding WAL *up to* `lsn` (an LSN exactly on
    a segment boundary belongs to the segment before it)."""
    return wal_file_name(timeline, lsn - 1 if lsn and lsn % segment_size == 0 else lsn, segment_size)


def is_wal_file_name(name: str) -> bool:
    return bool(_WAL_RE.match(name))


_HISTORY_RE = re.compile(r"^[0-9A-F]{8}\.history$")
_BACKUP_RE = re.compile(r"^[0-9A-F]{24}\.[0-9A-F]{8}\.backup$")
_PARTIAL_RE = re.compile(r"^[0-9A-F]{24}\.partial$")


def wal_name_kind(name: str) -> str:
    """'segment', 'history', 'backup' (backup history file) or 'partial'; ConfigError otherwise."""
    if _WAL_RE.match(name):
        return "segment"
    if _HISTORY_RE.match(name):
        return "history"
    if _BACKUP_RE.match(name):
        return "backup"
    if _PARTIAL_RE.match(name):
        return "partial"
    raise ConfigError(f"{name!r} is not a WAL file name (expected e.g. 000000010000000000000003, 00000002.history)")


def timeline_of(name: str) -> int:
    return int(name[:8], 16)


def segno_of(name: str, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    """Segment number of a WAL segment file name."""
    per_xlogid = 0x100000000 // segment_size
    return int(name[8:16], 16) * per_xlogid + int(name[16:24], 16)


def segment_name(timeline: int, segno: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    per_xlogid = 0x100000000 // segment_size
    return f"{timeline:08X}{segno // per_xlogid:08X}{segno % per_xlogid:08X}"


def segment_start_lsn(segno: int, segment_size: int = DEFAULT_SEGMENT_SIZE) -> int:
    return segno * segment_size
