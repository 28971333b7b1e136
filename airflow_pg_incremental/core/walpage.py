"""WAL segment page headers: what the first 40 bytes of a segment say about it (its cluster, its
position, its timeline, its format), to tell a stored segment is the one its name promises.
Light on purpose (struct only): the restore_command's direct path imports it."""

from __future__ import annotations

import struct

from .lsn import format_lsn, segment_name, segno_of, timeline_of

# XLogLongPageHeaderData, the first 40 bytes of every WAL segment (little-endian): xlp_magic,
# xlp_info, xlp_tli, xlp_pageaddr, xlp_rem_len (then padding), xlp_sysid, xlp_seg_size,
# xlp_xlog_blcksz
_LONG_PAGE_HEADER = struct.Struct("<HHIQI4xQII")
XLP_LONG_HEADER = 0x0002
XLP_ALL_FLAGS = 0x000F
XLOG_PAGE_MAGIC = {15: 0xD110, 16: 0xD113, 17: 0xD116, 18: 0xD118}


def parse_long_page_header(data: bytes) -> dict | None:
    if len(data) < _LONG_PAGE_HEADER.size:
        return None
    magic, info, tli, pageaddr, rem_len, sysid, seg_size, blcksz = _LONG_PAGE_HEADER.unpack_from(data)
    return {"magic": magic, "info": info, "tli": tli, "pageaddr": pageaddr, "rem_len": rem_len, "sysid": sysid,
            "seg_size": seg_size, "blcksz": blcksz}


def segment_header_problem(header: dict | None, name: str, seg: int, *, system_identifier=None,
                           pg_major=None) -> str | None:
    """Why the segment stored as `name` is not that segment of this cluster (its long page header
    names another database system, position, timeline or format), or None."""
    if header is None:
        return "shorter than a WAL page header"
    want_magic = XLOG_PAGE_MAGIC.get(int(pg_major)) if pg_major else None
    if want_magic is not None and header["magic"] != want_magic:
        return (f"not a PostgreSQL {pg_major} WAL segment (page magic 0x{header['magic']:04X}, expected "
                f"0x{want_magic:04X})")
    if want_magic is None and header["magic"] >> 8 not in (0xD0, 0xD1):
        return f"not a WAL segment (page magic 0x{header['magic']:04X})"
    problems = []
    if not header["info"] & XLP_LONG_HEADER or header["info"] & ~XLP_ALL_FLAGS:
        problems.append(f"its first page has no long page header (xlp_info 0x{header['info']:04X})")
    if system_identifier and str(header["sysid"]) != str(system_identifier):
        problems.append(f"it belongs to another database system (system identifier {header['sysid']}, the "
                        f"backup's is {system_identifier})")
    own = segno_of(name, seg) * seg
    if header["pageaddr"] != own:
        problems.append(f"it holds the WAL of LSN {format_lsn(header['pageaddr'])} (segment "
                        f"{segment_name(timeline_of(name), header['pageaddr'] // seg, seg)}), not of its own position "
                        f"LSN {format_lsn(own)}")
    if not 1 <= header["tli"] <= timeline_of(name):
        problems.append(f"its page header names timeline {header['tli']}, impossible in a segment of timeline "
                        f"{timeline_of(name)}")
    if header["seg_size"] != seg:
        problems.append(f"its header gives a segment size of {header['seg_size']} bytes, not {seg}")
    if header["blcksz"] not in (1024, 2048, 4096, 8192, 16384, 32768, 65536):
        problems.append(f"its header gives an impossible WAL block size {header['blcksz']}")
    return "; ".join(problems) or None
