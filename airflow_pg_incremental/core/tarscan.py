"""Watches a tar stream as it passes and captures chosen members (e.g. backup_manifest).

Only headers are parsed; member contents are skipped by arithmetic, so the cost is independent of
the data size. Captured members are spooled to a temporary file beyond 8 MiB (bounded memory).
"""

from __future__ import annotations

import tempfile

BLOCK = 512


class TarFormatError(ValueError):
    """A header that is not a tar header: the stream is damaged (or is not a tar archive)."""


def _parse_size(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    s = field.split(b"\0", 1)[0].strip()
    try:
        return int(s, 8) if s else 0
    except ValueError:
        raise TarFormatError(f"tar header has a malformed size field {bytes(field)!r}") from None


def _check_header(hdr: bytes, offset: int) -> None:
    """The header's own checksum (the sum of its bytes with the checksum field read as spaces), as
    tar itself checks it: damage in a header is named here, before any field of it is trusted."""
    field = hdr[148:156].split(b"\0", 1)[0].strip()
    try:
        recorded = int(field, 8)
    except ValueError:
        raise TarFormatError(f"no tar header at byte {offset} of the archive (checksum field {bytes(hdr[148:156])!r})") from None
    actual = sum(hdr[:148]) + 8 * 32 + sum(hdr[156:])
    if recorded != actual and recorded != _signed_sum(hdr):  # some old tars summed signed chars
        raise TarFormatError(f"tar header at byte {offset} of the archive is damaged "
                             f"(header checksum {recorded:o}, computed {actual:o})")


def _signed_sum(hdr: bytes) -> int:
    return sum(b - 256 if b > 127 else b for b in hdr[:148] + b" " * 8 + hdr[156:])


class TarScanner:
    def __init__(self, capture: tuple[str, ...] = ("backup_manifest", "backup_label"), on_member=None):
        self.capture = set(capture)
        self.on_member = on_member  # called with (name, typeflag) for every member, may raise
        self.captured: dict[str, tempfile.SpooledTemporaryFile] = {}
        self.members = 0
        self.content_bytes = 0
        self._hdr = bytearray()
        self._remaining = 0      # content bytes left in current member
        self._padding = 0        # padding bytes after content
        self._sink = None        # file to copy content into, or None
        self._special = None     # 'L' or 'x' header content collector
        self._next_name: str | None = None
        self._offset = 0         # bytes of the archive fed so far

    def feed(self, data: bytes) -> None:
        mv = memoryview(data)
        i, n = 0, len(mv)
        while i < n:
            if self._remaining:
                take = min(self._remaining, n - i)
                if self._sink is not None:
                    self._sink.write(mv[i:i + take])
                elif self._special is not None:
                    self._special += mv[i:i + take]
                self._remaining -= take
                i += take
                if not self._remaining:
                    self._end_member()
                continue
            if self._padding:
                take = min(self._padding, n - i)
                self._padding -= take
                i += take
                continue
            take = min(BLOCK - len(self._hdr), n - i)
            self._hdr += mv[i:i + take]
            i += take
            if len(self._hdr) == BLOCK:
                hdr = bytes(self._hdr)
                self._hdr.clear()
                self._header(hdr, self._offset + i - BLOCK)
        self._offset += n

    def _header(self, hdr: bytes, offset: int = 0) -> None:
        if hdr == b"\0" * BLOCK:
            return
        _check_header(hdr, offset)
        name = hdr[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        prefix = hdr[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") if hdr[257:262] == b"ustar" else ""
        if prefix:
            name = prefix + "/" + name
        size = _parse_size(hdr[124:136])
        typeflag = hdr[156:157]
        if typeflag in (b"L", b"x"):
            self._special = bytearray()
            self._special_type = typeflag
        elif typeflag in (b"g", b"K"):  # pax global header, GNU long link name: not members
            pass
        else:
            if self._next_name:
                name, self._next_name = self._next_name, None
            self.members += 1
            self.content_bytes += size
            if self.on_member is not None:
                self.on_member(name, typeflag)
            if name in self.capture and typeflag in (b"0", b"\0"):
                f = tempfile.SpooledTemporaryFile(max_size=8 * 1024 * 1024)
                self.captured[name] = f
                self._sink = f
        self._remaining = size
        self._padding = (-size) % BLOCK
        if size == 0:
            self._end_member()

    def _end_member(self) -> None:
        if self._special is not None:
            raw = bytes(self._special)
            self._special = None
            if self._special_type == b"L":
                self._next_name = raw.rstrip(b"\0").decode("utf-8", "replace")
            else:  # pax: "len key=value\n" records
                for rec in raw.decode("utf-8", "replace").split("\n"):
                    if " path=" in rec:
                        self._next_name = rec.split(" path=", 1)[1]
        self._sink = None

    def read_captured(self, name: str) -> bytes | None:
        f = self.captured.get(name)
        if f is None:
            return None
        f.seek(0)
        return f.read()

    def open_captured(self, name: str):
        f = self.captured.get(name)
        if f is not None:
            f.seek(0)
        return f
