"""S3Repository reads a large object as ranged GETs side by side (_RangedBody): the bytes come
back whole and in order, a part whose body breaks off is asked again, an object rewritten mid-read
or a part that never arrives fails loudly, and small objects stay one GET."""

import os
import threading

import pytest
from botocore.exceptions import ClientError

from airflow_pg_incremental.core.errors import ConfigError, ObjectNotFound, RepositoryError
from airflow_pg_incremental.core.repository.s3 import S3Repository, read_streams_setting

PART = 1000


class _Body:
    def __init__(self, data: bytes, fail: Exception | None = None):
        self._data, self._fail, self.closed = data, fail, False

    def read(self, n=None):
        if self._fail is not None:
            raise self._fail
        data, self._data = (self._data, b"") if n is None else (self._data[:n], self._data[n:])
        return data

    def close(self):
        self.closed = True


class FakeS3:
    """get_object over one in-memory object; `breaks[start]`: how many times the part starting
    there breaks off mid-body; `short`: parts that come back a byte short, always."""

    def __init__(self, data: bytes, *, honour_range: bool = True):
        self.data, self.etag, self.honour_range = data, '"v1"', honour_range
        self.calls: list[str | None] = []
        self.breaks: dict[int, int] = {}
        self.short: set[int] = set()
        self.on_get = None
        self.lock = threading.Lock()
        self.in_flight = self.max_in_flight = 0

    def get_object(self, Bucket, Key, Range=None):
        with self.lock:
            self.calls.append(Range)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.on_get:
                self.on_get(Range)
            if Key.endswith("missing"):
                raise ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject")
            if Range is None or not self.honour_range:
                return {"Body": _Body(self.data), "ETag": self.etag, "ContentLength": len(self.data)}
            start, end = (int(x) for x in Range[len("bytes="):].split("-"))
            if start >= len(self.data):
                raise ClientError({"Error": {"Code": "InvalidRange"}}, "GetObject")
            end = min(end, len(self.data) - 1)
            chunk = self.data[start:end + 1]
            fail = None
            with self.lock:
                if self.breaks.get(start):
                    self.breaks[start] -= 1
                    fail = ConnectionResetError("connection reset by peer")
            if start in self.short:
                chunk = chunk[:-1]
            return {"Body": _Body(chunk, fail), "ETag": self.etag,
                    "ContentRange": f"bytes {start}-{end}/{len(self.data)}"}
        finally:
            with self.lock:
                self.in_flight -= 1


def _repo(client, streams=3) -> S3Repository:
    r = S3Repository(client, "bkt", "p", read_streams=streams)
    r.READ_PART = PART
    r.READ_ATTEMPTS = 3
    return r


def _read_all(f, n=333) -> bytes:
    out = []
    while True:
        c = f.read(n)
        if not c:
            return b"".join(out)
        out.append(c)


DATA = os.urandom(10 * PART + 123)


def test_large_object_comes_back_whole_in_order_by_ranged_gets():
    s3 = FakeS3(DATA)
    with _repo(s3).open("c/base.tar.zst", size=len(DATA)) as f:
        assert _read_all(f) == DATA
    assert s3.calls[0] == f"bytes=0-{PART - 1}"
    assert sorted(s3.calls) == sorted(f"bytes={i * PART}-{min(len(DATA), (i + 1) * PART) - 1}" for i in range(11))


def test_read_everything_at_once_and_readinto():
    s3 = FakeS3(DATA)
    with _repo(s3).open("k", size=len(DATA)) as f:
        head = bytearray(10)
        assert f.readinto(head) == 10 and bytes(head) == DATA[:10]
        assert f.read() == DATA[10:]
        assert f.read(5) == b""


def test_parts_are_in_flight_side_by_side_but_bounded():
    s3 = FakeS3(DATA)
    gate = threading.Event()
    s3.on_get = lambda rng: rng == f"bytes=0-{PART - 1}" or gate.wait(0.2)
    with _repo(s3, streams=3).open("k", size=len(DATA)) as f:
        assert _read_all(f) == DATA
    assert 2 <= s3.max_in_flight <= 3


def test_a_part_that_breaks_off_is_asked_again():
    s3 = FakeS3(DATA)
    s3.breaks = {0: 1, 3 * PART: 2}
    with _repo(s3).open("k", size=len(DATA)) as f:
        assert _read_all(f) == DATA
    assert s3.calls.count(f"bytes={3 * PART}-{4 * PART - 1}") == 3


def test_a_part_that_keeps_failing_is_a_loud_error_naming_the_range():
    s3 = FakeS3(DATA)
    s3.short = {4 * PART}
    with _repo(s3).open("c/obj", size=len(DATA)) as f:
        with pytest.raises(RepositoryError, match=r"c/obj \(bytes 4000-4999\).*3 attempts"):
            _read_all(f)


def test_an_object_rewritten_mid_read_is_never_spliced():
    s3 = FakeS3(DATA)

    def rewrite(rng):
        if rng and rng.startswith(f"bytes={5 * PART}-"):
            s3.etag = '"v2"'

    s3.on_get = rewrite
    with _repo(s3).open("c/obj", size=len(DATA)) as f:
        with pytest.raises(RepositoryError, match="changed while it was read"):
            _read_all(f)


def test_an_object_deleted_mid_read_is_not_found():
    s3 = FakeS3(DATA)
    r = _repo(s3)
    with r.open("c/obj", size=len(DATA)) as f:
        f.read(10)
        s3.on_get = lambda rng: (_ for _ in ()).throw(ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject"))
        with pytest.raises(ObjectNotFound):
            _read_all(f)


def test_missing_object_fails_at_open():
    with pytest.raises(ObjectNotFound, match="c/missing"):
        _repo(FakeS3(DATA)).open("c/missing", size=len(DATA))


def test_shorter_than_expected_object_reads_what_is_there():
    s3 = FakeS3(DATA[:PART + 5])  # the caller expected more: its checksums will say so
    with _repo(s3).open("k", size=len(DATA)) as f:
        assert _read_all(f) == DATA[:PART + 5]


def test_empty_object_falls_back_to_one_get():
    s3 = FakeS3(b"")
    with _repo(s3).open("k", size=len(DATA)) as f:
        assert f.read() == b""
    assert s3.calls == [f"bytes=0-{PART - 1}", None]


def test_server_ignoring_range_is_read_as_one_stream():
    s3 = FakeS3(DATA, honour_range=False)
    with _repo(s3).open("k", size=len(DATA)) as f:
        assert _read_all(f) == DATA
    assert len(s3.calls) == 1


@pytest.mark.parametrize("size", [None, 2 * PART])
def test_small_or_unsized_objects_are_one_get(size):
    s3 = FakeS3(DATA)
    with _repo(s3).open("k", size=size) as f:
        assert _read_all(f) == DATA
    assert s3.calls == [None]


def test_one_stream_is_one_get():
    s3 = FakeS3(DATA)
    with _repo(s3, streams=1).open("k", size=len(DATA)) as f:
        assert _read_all(f) == DATA
    assert s3.calls == [None]


def test_closing_mid_read_stops_asking():
    s3 = FakeS3(DATA * 5)
    f = _repo(s3, streams=2).open("k", size=len(s3.data))
    f.read(10)
    f.close()
    asked = len(s3.calls)
    assert asked <= 4
    threading.Event().wait(0.1)
    assert len(s3.calls) == asked


@pytest.mark.parametrize("value", ["0", "33", "x", "-1"])
def test_bad_stream_count_is_refused(value, monkeypatch):
    monkeypatch.setenv("PGINCR_S3_READ_STREAMS", value)
    with pytest.raises(ConfigError, match="PGINCR_S3_READ_STREAMS"):
        read_streams_setting()
    with pytest.raises(ConfigError):
        S3Repository(FakeS3(b""), "bkt")


def test_stream_count_from_environment(monkeypatch):
    monkeypatch.setenv("PGINCR_S3_READ_STREAMS", "6")
    assert S3Repository(FakeS3(b""), "bkt").read_streams == 6
    monkeypatch.delenv("PGINCR_S3_READ_STREAMS")
    assert S3Repository(FakeS3(b""), "bkt").read_streams == 4
    assert S3Repository(FakeS3(b""), "bkt", read_streams=2).read_streams == 2


def test_decrypting_reader_sits_above_the_ranged_parts(monkeypatch):
    """An encrypted object read in ranged parts decrypts to what was put."""
    from airflow_pg_incremental.core.repository.crypt import Keyring, encrypt_bytes

    keyring = Keyring(os.urandom(32))
    stored = encrypt_bytes(DATA, keyring, "c/obj")
    s3 = FakeS3(stored)
    repo = _repo(s3).use_keyring(keyring)
    monkeypatch.setattr(repo, "identity", lambda: {})
    with repo.open("c/obj", size=len(stored)) as f:
        assert _read_all(f, 777) == DATA
    assert len(s3.calls) > 2 and all(c and c.startswith("bytes=") for c in s3.calls)
