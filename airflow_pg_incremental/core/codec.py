"""Streaming zstd compression with checksums taken while writing and checked while reading.

Every stored object records four facts (in the backup's metadata): raw size, raw SHA-256, stored
size, stored SHA-256. Writing computes them on the fly; reading recomputes them and raises
ChecksumMismatch at end of stream if any differs. zstd frames also carry their own content
checksum. Memory stays bounded: data moves in chunks of CHUNK bytes.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import asdict, dataclass
from typing import BinaryIO, Callable

import zstandard

from .errors import ChecksumMismatch

CHUNK = 1024 * 1024


@dataclass
class ObjectInfo:
    key: str
    raw_size: int
    raw_sha256: str
    stored_size: int
    stored_sha256: str
    compression: str = "zstd"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ObjectInfo":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class HashingReader(io.RawIOBase):
    """Wraps a readable; hashes and counts what passes through. Optional per-chunk callback."""

    def __init__(self, src: BinaryIO, on_chunk: Callable[[bytes], None] | None = None):
        self._src = src
        self._hash = hashlib.sha256()
        self.size = 0
        self.eof = False
        self._on_chunk = on_chunk

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            chunks = []
            while True:
                c = self.read(CHUNK)
                if not c:
                    return b"".join(chunks)
                chunks.append(c)
        data = self._src.read(n)
        if data:
            self._hash.update(data)
            self.size += len(data)
            if self._on_chunk:
                self._on_chunk(data)
        else:
            self.eof = True
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class NonClosing(io.RawIOBase):
    """Proxy that ignores close(): boto3's upload_fileobj closes what it is given."""

    def __init__(self, src):
        self._src = src

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self._src.read(n)

    def readinto(self, b) -> int:
        data = self._src.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:  # noqa: D401 - deliberately does nothing
        pass


class CompressingReader(io.RawIOBase):
    """read() returns zstd-compressed bytes of `src`, hashing raw and stored bytes as they pass."""

    def __init__(self, src: BinaryIO, level: int = 3, threads: int = 0,
                 on_raw: Callable[[bytes], None] | None = None):
        self.raw = HashingReader(src, on_raw)
        cctx = zstandard.ZstdCompressor(level=level, threads=threads, write_checksum=True)
        self.stored = HashingReader(cctx.stream_reader(self.raw, read_size=CHUNK, closefd=False))

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        return self.stored.read(CHUNK if n is None or n < 0 else n)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def info(self, key: str) -> ObjectInfo:
        return ObjectInfo(key, self.raw.size, self.raw.hexdigest(), self.stored.size, self.stored.hexdigest())


class VerifyingReader(io.RawIOBase):
    """Decompresses a stored object and checks size and SHA-256 of stored and raw bytes at EOF."""

    def __init__(self, stored_src: BinaryIO, expected: ObjectInfo | None):
        self.expected = expected
        self.stored = HashingReader(stored_src)
        self.raw = HashingReader(zstandard.ZstdDecompressor().stream_reader(self.stored, read_size=CHUNK,
                                                                            closefd=False))
        self._checked = False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        try:
            data = self.raw.read(CHUNK if n is None or n < 0 else n)
        except zstandard.ZstdError as e:
            name = self.expected.key if self.expected else "object"
            raise ChecksumMismatch(f"{name}: stored data is corrupt (zstd: {e}); the object cannot be used") from e
        if not data:
            self._check()
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read to the end (tar readers stop at the end-of-archive marker) so checksums get checked."""
        while self.read(CHUNK):
            pass

    def _check(self) -> None:
        if self._checked:
            return
        self._checked = True
        # make sure the stored stream is fully consumed (trailing bytes after the zstd frame)
        while self.stored.read(CHUNK):
            pass
        e = self.expected
        if e is None:
            return
        problems = []
        if self.stored.size != e.stored_size or self.stored.hexdigest() != e.stored_sha256:
            problems.append(f"stored bytes: expected {e.stored_size} B sha256 {e.stored_sha256[:16]}..., "
                            f"read {self.stored.size} B sha256 {self.stored.hexdigest()[:16]}...")
        if self.raw.size != e.raw_size or self.raw.hexdigest() != e.raw_sha256:
            problems.append(f"content: expected {e.raw_size} B sha256 {e.raw_sha256[:16]}..., "
                            f"read {self.raw.size} B sha256 {self.raw.hexdigest()[:16]}...")
        if problems:
            raise ChecksumMismatch(f"checksum mismatch for {e.key}: " + "; ".join(problems))


def compress_bytes(data: bytes, level: int = 3) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(data)


def decompress_bytes(data: bytes) -> bytes:
    return zstandard.ZstdDecompressor().decompressobj().decompress(data)
