import hashlib
import io
import os
import random

import pytest
import zstandard

from airflow_pg_incremental.core.codec import (CHUNK, CompressingReader, HashingReader, NonClosing, ObjectInfo,
                                               VerifyingReader, compress_bytes, decompress_bytes)
from airflow_pg_incremental.core.errors import ChecksumMismatch, RepositoryError


def _payload(size: int, seed: int = 1) -> bytes:
    """Half random (incompressible), half repetitive text (compressible)."""
    rnd = random.Random(seed)
    half = size // 2
    compressible = (b"INSERT INTO t VALUES (%d, 'hello world');\n" * (size // 30 + 1))[: size - half]
    return rnd.randbytes(half) + compressible


def _read_all(reader, chunk: int) -> bytes:
    out = bytearray()
    while True:
        data = reader.read(chunk)
        if not data:
            return bytes(out)
        if chunk > 0:
            assert len(data) <= chunk
        out += data


def _compress(data: bytes, chunk: int = 65536, key: str = "c/b/base.tar.zst", **kw):
    cr = CompressingReader(io.BytesIO(data), **kw)
    stored = _read_all(cr, chunk)
    return stored, cr.info(key)


@pytest.fixture(scope="module")
def big():
    data = _payload(5 * 1024 * 1024 + 12345)
    stored, info = _compress(data, chunk=1_000_003)
    return data, stored, info


@pytest.mark.parametrize("write_chunk,read_chunk", [(65536, 4097), (1_000_003, 12345), (CHUNK, -1), (777, CHUNK + 1),
                                                    (3 * CHUNK, 999_983)])
def test_round_trip_big(big, write_chunk, read_chunk):
    data, _, _ = big
    stored, info = _compress(data, chunk=write_chunk)
    out = _read_all(VerifyingReader(io.BytesIO(stored), info), read_chunk)
    assert out == data


def test_round_trip_tiny_reads():
    data = _payload(20_000, seed=7)
    stored, info = _compress(data, chunk=7)
    vr = VerifyingReader(io.BytesIO(stored), info)
    assert _read_all(vr, 1) + b"" == data


def test_object_info_matches_hashlib(big):
    data, stored, info = big
    assert info.key == "c/b/base.tar.zst"
    assert info.raw_size == len(data)
    assert info.raw_sha256 == hashlib.sha256(data).hexdigest()
    assert info.stored_size == len(stored)
    assert info.stored_sha256 == hashlib.sha256(stored).hexdigest()
    assert info.compression == "zstd"
    # it really is compressed (half of the payload is repetitive) and is a valid zstd frame
    assert len(stored) < 0.75 * len(data)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(stored) == data


def test_compressing_reader_same_output_regardless_of_read_size():
    data = _payload(300_000, seed=3)
    a, ia = _compress(data, chunk=13)
    b, ib = _compress(data, chunk=-1)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(a) == data
    assert ia.raw_sha256 == ib.raw_sha256 and ia.raw_size == ib.raw_size == len(data)
    assert ia.stored_sha256 == hashlib.sha256(a).hexdigest()
    assert ib.stored_sha256 == hashlib.sha256(b).hexdigest()


def test_on_raw_sees_every_raw_byte():
    data = _payload(2_500_000, seed=4)
    seen = []
    cr = CompressingReader(io.BytesIO(data), on_raw=seen.append)
    _read_all(cr, 50_000)
    assert b"".join(seen) == data


def test_compression_level_and_threads():
    data = _payload(1_000_000, seed=5)
    stored, info = _compress(data, level=19, threads=2)
    assert _read_all(VerifyingReader(io.BytesIO(stored), info), 65536) == data


def test_buffered_wrappers_use_readinto(big):
    data, stored, info = big
    # io.BufferedReader drives readinto() of both raw readers
    comp = io.BufferedReader(CompressingReader(io.BytesIO(data)), buffer_size=10_007).read()
    assert comp == stored or zstandard.ZstdDecompressor().decompressobj().decompress(comp) == data
    out = io.BufferedReader(VerifyingReader(io.BytesIO(stored), info), buffer_size=8191).read()
    assert out == data


def test_empty_input():
    stored, info = _compress(b"")
    assert info.raw_size == 0 and info.raw_sha256 == hashlib.sha256(b"").hexdigest()
    assert info.stored_size == len(stored) > 0
    assert _read_all(VerifyingReader(io.BytesIO(stored), info), 100) == b""


def test_object_info_dict_round_trip():
    info = ObjectInfo("a/b", 1, "x" * 64, 2, "y" * 64)
    d = info.to_dict()
    assert d == {"key": "a/b", "raw_size": 1, "raw_sha256": "x" * 64, "stored_size": 2, "stored_sha256": "y" * 64,
                 "compression": "zstd"}
    assert ObjectInfo.from_dict({**d, "unrelated": 1}) == info


def _verify(stored: bytes, info: ObjectInfo | None, chunk: int = 65536) -> bytes:
    return _read_all(VerifyingReader(io.BytesIO(stored), info), chunk)


@pytest.mark.parametrize("pos", [0.5, 0.1, 0.9, -1, -3])
def test_tampered_stored_byte_detected(big, pos):
    data, stored, info = big
    i = int(len(stored) * pos) if isinstance(pos, float) else len(stored) + pos
    bad = bytearray(stored)
    bad[i] ^= 0x01
    with pytest.raises(ChecksumMismatch) as ei:
        _verify(bytes(bad), info)
    assert info.key in str(ei.value)


def test_tampered_byte_detected_even_by_zstd_alone(big):
    data, stored, info = big
    bad = bytearray(stored)
    bad[len(bad) // 2] ^= 0xFF
    with pytest.raises(ChecksumMismatch):
        decompress_bytes(bytes(bad))


@pytest.mark.parametrize("cut", [1, 4, 100, 100_000])
def test_truncated_detected(big, cut):
    data, stored, info = big
    with pytest.raises(ChecksumMismatch):
        _verify(stored[:-cut], info)


def test_truncated_to_nothing_detected(big):
    _, _, info = big
    with pytest.raises(ChecksumMismatch):
        _verify(b"", info)


def test_trailing_garbage_detected(big):
    data, stored, info = big
    with pytest.raises(ChecksumMismatch, match=info.key):
        _verify(stored + b"\0" * 10, info)


def test_wrong_expected_raw_sha(big):
    data, stored, info = big
    wrong = ObjectInfo(info.key, info.raw_size, hashlib.sha256(b"other").hexdigest(), info.stored_size,
                       info.stored_sha256)
    with pytest.raises(ChecksumMismatch, match="content") as ei:
        _verify(stored, wrong)
    assert "stored bytes" not in str(ei.value)
    assert isinstance(ei.value, RepositoryError)


def test_wrong_expected_sizes(big):
    data, stored, info = big
    with pytest.raises(ChecksumMismatch, match="content"):
        _verify(stored, ObjectInfo(info.key, info.raw_size + 1, info.raw_sha256, info.stored_size,
                                   info.stored_sha256))
    with pytest.raises(ChecksumMismatch, match="stored bytes"):
        _verify(stored, ObjectInfo(info.key, info.raw_size, info.raw_sha256, info.stored_size - 1,
                                   info.stored_sha256))


def test_wrong_expected_stored_sha(big):
    data, stored, info = big
    wrong = ObjectInfo(info.key, info.raw_size, info.raw_sha256, info.stored_size, "0" * 64)
    with pytest.raises(ChecksumMismatch, match="stored bytes"):
        _verify(stored, wrong)


def test_drain_checks_after_partial_read(big):
    data, stored, info = big
    wrong = ObjectInfo(info.key, info.raw_size, "0" * 64, info.stored_size, info.stored_sha256)
    vr = VerifyingReader(io.BytesIO(stored), wrong)
    assert vr.read(1000) == data[:1000]
    with pytest.raises(ChecksumMismatch):
        vr.drain()
    # with correct expectations drain after a partial read passes
    vr = VerifyingReader(io.BytesIO(stored), info)
    vr.read(1000)
    vr.drain()
    assert vr.raw.size == len(data) and vr.stored.size == len(stored)


def test_verifying_reader_requires_recorded_checksums():
    """A streaming zstd reader cannot tell a truncated frame from a whole one: without the recorded
    sizes and checksums there is no honest verification, so it is refused."""
    data = _payload(400_000, seed=9)
    stored, _ = _compress(data)
    with pytest.raises(TypeError):
        VerifyingReader(io.BytesIO(stored), None)


def test_compress_decompress_bytes():
    for data in (b"", b"x", _payload(1_500_000, seed=11)):
        c = compress_bytes(data)
        assert decompress_bytes(c) == data
    comp = _payload(1_000_000, seed=12)[500_000:]  # the compressible half
    assert len(compress_bytes(comp, level=19)) < len(comp) // 10


def test_decompress_bytes_rejects_garbage():
    with pytest.raises(ChecksumMismatch):
        decompress_bytes(b"this is not zstd data")


def test_decompress_bytes_truncated_raises():
    c = compress_bytes(b"hello world " * 1000)
    with pytest.raises((zstandard.ZstdError, ChecksumMismatch, ValueError)):
        decompress_bytes(c[:-5])


def test_decompress_bytes_detects_truncation(big):
    data, stored, info = big
    with pytest.raises(ChecksumMismatch, match="truncated"):
        decompress_bytes(stored[:-100])


def test_verifying_reader_read_zero_is_harmless(big):
    data, stored, info = big
    vr = VerifyingReader(io.BytesIO(stored), info)
    assert vr.read(0) == b""
    assert _read_all(vr, 65536) == data


def test_hashing_reader_counts_and_hashes():
    data = os.urandom(3 * CHUNK + 17)
    chunks = []
    h = HashingReader(io.BytesIO(data), on_chunk=chunks.append)
    assert h.read(10) == data[:10]
    assert h.read() == data[10:]
    assert h.read(5) == b"" and h.eof
    assert h.size == len(data)
    assert h.hexdigest() == hashlib.sha256(data).hexdigest()
    assert b"".join(chunks) == data


def test_non_closing_ignores_close():
    src = io.BytesIO(b"abcdef")
    nc = NonClosing(src)
    assert nc.read(2) == b"ab"
    buf = bytearray(3)
    assert nc.readinto(buf) == 3 and bytes(buf) == b"cde"
    nc.close()
    assert not src.closed
    assert src.read() == b"f"
