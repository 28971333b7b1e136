import io
import json
import os
import tarfile

import pytest

from airflow_pg_incremental.core.tarscan import BLOCK, TarScanner, _parse_size

MANIFEST = json.dumps({"PostgreSQL-Backup-Manifest-Version": 2, "System-Identifier": 7000000000000000001,
                       "Files": [{"Path": f"base/1/{i}", "Size": i} for i in range(300)],
                       "WAL-Ranges": [{"Timeline": 1, "Start-LSN": "0/3000028", "End-LSN": "0/3000100"}]},
                      indent=2).encode()
LABEL = (b"START WAL LOCATION: 0/3000028 (file 000000010000000000000003)\nCHECKPOINT LOCATION: 0/3000080\n"
         b"BACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: 2026-11-21 12:40:48 UTC\n"
         b"LABEL: pgincr main x\nSTART TIMELINE: 1\n")
LONG_NAME = "base/16384/" + "/".join(["d" * 40] * 4) + "/file_with_a_long_name"  # > 100 chars, has '/'
BIG = os.urandom(2 * 1024 * 1024 + 1)


def _members():
    return [
        ("PG_VERSION", b"18\n"),
        ("backup_label", LABEL),
        ("global/pg_control", os.urandom(8192)),
        ("base/1/empty", b""),
        (LONG_NAME, b"long name content"),
        ("base/1/big", BIG),
        ("backup_manifest", MANIFEST),
        ("x" * 150, b"single component longer than 100"),
    ]


def _tar(fmt, members=None, *, dirs=True, **kw) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, **kw) as tf:
        if dirs:
            for d in ("base", "base/1", "global"):
                ti = tarfile.TarInfo(d)
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o700
                tf.addfile(ti)
        for name, data in members if members is not None else _members():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            ti.mtime = 1_700_000_000
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _feed(data: bytes, chunk: int, **kw) -> TarScanner:
    s = TarScanner(**kw)
    if chunk <= 0:
        s.feed(data)
    else:
        for i in range(0, len(data), chunk):
            s.feed(data[i:i + chunk])
    return s


@pytest.fixture(scope="module", params=["gnu", "pax"])
def archive(request):
    fmt = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}[request.param]
    return _tar(fmt)


@pytest.mark.parametrize("chunk", [7, 511, 512, 513, 65536, 0])
def test_capture_in_chunks(archive, chunk):
    s = _feed(archive, chunk)
    assert s.read_captured("backup_manifest") == MANIFEST
    assert s.read_captured("backup_label") == LABEL
    assert s.members == 3 + len(_members())
    assert s.content_bytes == sum(len(d) for _, d in _members())
    assert set(s.captured) == {"backup_manifest", "backup_label"}


def test_capture_one_byte_at_a_time():
    data = _tar(tarfile.PAX_FORMAT, [("backup_label", LABEL), (LONG_NAME, b"abc" * 200), ("z", b""),
                                     ("backup_manifest", MANIFEST)])
    s = _feed(data, 1)
    assert s.read_captured("backup_manifest") == MANIFEST
    assert s.read_captured("backup_label") == LABEL
    assert s.members == 3 + 4


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("chunk", [1, 7, 511, 512, 513, 65536, 0])
def test_long_names_resolved(fmt, chunk):
    # USTAR can only hold long names that split into prefix/name at a '/'
    members = [(LONG_NAME, b"long one"), ("short", b"s"), ("backup_manifest", b"{}")]
    if fmt != tarfile.USTAR_FORMAT:
        members.insert(1, ("y" * 130, b"one component"))
    data = _tar(fmt, members, dirs=False)
    capture = tuple(n for n, _ in members)
    s = _feed(data, chunk, capture=capture)
    for name, content in members:
        assert s.read_captured(name) == content, name
    assert s.members == len(members)


def test_captures_big_member_exactly():
    data = _tar(tarfile.GNU_FORMAT)
    s = _feed(data, 65536, capture=("base/1/big", "base/1/empty", LONG_NAME, "x" * 150))
    assert s.read_captured("base/1/big") == BIG
    assert s.read_captured("base/1/empty") == b""
    assert s.read_captured(LONG_NAME) == b"long name content"
    assert s.read_captured("x" * 150) == b"single component longer than 100"
    assert s.read_captured("backup_manifest") is None


def test_captured_member_bigger_than_spool_limit():
    big = os.urandom(9 * 1024 * 1024)  # above the 8 MiB in-memory limit: spooled to disk
    data = _tar(tarfile.PAX_FORMAT, [("backup_manifest", big), ("after", b"x")], dirs=False)
    s = _feed(data, 1_000_000)
    assert s.read_captured("backup_manifest") == big
    f = s.open_captured("backup_manifest")
    assert f.read(4) == big[:4]
    assert s.open_captured("nope") is None
    assert s.members == 2


def test_directories_and_symlinks_not_captured():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("backup_manifest")
        ti.type = tarfile.DIRTYPE
        tf.addfile(ti)
        ti = tarfile.TarInfo("backup_label")
        ti.type = tarfile.SYMTYPE
        ti.linkname = "elsewhere"
        tf.addfile(ti)
        ti = tarfile.TarInfo("data")
        ti.size = 5
        tf.addfile(ti, io.BytesIO(b"12345"))
    s = _feed(buf.getvalue(), 100)
    assert s.read_captured("backup_manifest") is None and s.read_captured("backup_label") is None
    assert s.members == 3 and s.content_bytes == 5


def test_same_as_tarfile_on_member_count(archive):
    with tarfile.open(fileobj=io.BytesIO(archive)) as tf:
        names = tf.getnames()
    s = _feed(archive, 4096)
    assert s.members == len(names)


def test_base256_size_field():
    # GNU tar writes sizes >= 8 GiB in base-256; check the parser on a hand-made field of a real archive
    data = bytearray(_tar(tarfile.GNU_FORMAT, [("backup_manifest", MANIFEST), ("after", b"tail")], dirs=False))
    assert data[0:15] == b"backup_manifest"
    field = bytes([0x80]) + len(MANIFEST).to_bytes(11, "big")
    data[124:136] = field
    data[148:156] = b"%06o\0 " % (sum(data[:148]) + 8 * 32 + sum(data[156:512]))  # the header's own checksum
    s = _feed(bytes(data), 333)
    assert s.read_captured("backup_manifest") == MANIFEST
    assert s.members == 2


@pytest.mark.parametrize("field,value", [
    (b"00000000012\0", 10), (b"00000001000 ", 512), (b"\0" * 12, 0), (b"           \0", 0),
    (bytes([0x80]) + (8 ** 12).to_bytes(11, "big"), 8 ** 12), (b"77777777777\0", 8 ** 11 - 1),
])
def test_parse_size(field, value):
    assert _parse_size(field) == value


def test_trailing_zero_blocks_and_stream_end():
    data = _tar(tarfile.PAX_FORMAT, [("backup_label", LABEL)], dirs=False)
    assert data.endswith(b"\0" * 2 * BLOCK)
    s = _feed(data + b"\0" * 10 * BLOCK, 512)
    assert s.members == 1 and s.read_captured("backup_label") == LABEL


def test_empty_stream():
    s = _feed(b"", 0)
    assert s.members == 0 and s.captured == {} and s.read_captured("backup_manifest") is None


def _gnu_long_link_archive() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        ti = tarfile.TarInfo("pg_tblspc/16385")
        ti.type = tarfile.SYMTYPE
        ti.linkname = "/srv/tablespaces/" + "t" * 120  # > 100 chars: GNU 'K' long-link header
        tf.addfile(ti)
        ti = tarfile.TarInfo("a")
        ti.size = 3
        tf.addfile(ti, io.BytesIO(b"abc"))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["pax-global", "gnu-longlink"])
def test_extension_headers_not_members(kind):
    if kind == "pax-global":
        data = _tar(tarfile.PAX_FORMAT, [("a", b"abc")], dirs=False, pax_headers={"comment": "made by test"})
    else:
        data = _gnu_long_link_archive()
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        expected = len(tf.getnames())
    s = _feed(data, 512, capture=("a",))
    assert s.read_captured("a") == b"abc"  # capture itself works
    assert s.members == expected


@pytest.mark.parametrize("where", [124 + 2, 0, 300, 151])
def test_damaged_header_is_named_with_its_offset(where):
    """A header whose own checksum does not match is refused before any field of it is used."""
    from airflow_pg_incremental.core.tarscan import TarFormatError

    data = bytearray(_tar(tarfile.GNU_FORMAT, [("a", b"x" * 1000), ("backup_manifest", MANIFEST)], dirs=False))
    second = 512 + 1024  # a's header and its content padded to 1024
    assert data[second:second + 15] == b"backup_manifest"
    data[second + where] ^= 0x10
    with pytest.raises(TarFormatError, match=f"at byte {second} "):
        _feed(bytes(data), 700)
