import pytest

from airflow_pg_incremental.core.errors import ConfigError
from airflow_pg_incremental.core.lsn import (DEFAULT_SEGMENT_SIZE, format_lsn, is_wal_file_name, parse_lsn,
                                             segment_of, wal_file_name)


@pytest.mark.parametrize("text,value", [
    ("0/3000028", 0x3000028),
    ("16/B374D848", (0x16 << 32) | 0xB374D848),
    ("0/0", 0),
    ("FFFFFFFF/FFFFFFFF", 2 ** 64 - 1),
    ("1/0", 1 << 32),
])
def test_parse_format_round_trip(text, value):
    assert parse_lsn(text) == value
    assert format_lsn(value) == text
    assert parse_lsn(format_lsn(value)) == value


def test_parse_accepts_lowercase_and_whitespace():
    assert parse_lsn("16/b374d848") == parse_lsn("16/B374D848")
    assert parse_lsn("  0/3000028\n") == 0x3000028
    assert parse_lsn("00000000/03000028") == 0x3000028


def test_format_has_no_leading_zeros():
    assert format_lsn(0x00000000_03000028) == "0/3000028"
    assert format_lsn(0x16_0000000A) == "16/A"


@pytest.mark.parametrize("bad", ["", "0", "0/", "/1", "0/3000028/1", "G/1", "0/XYZ", "123456789/0",
                                 "0/123456789", "-1/0", "0x1/0", "1 / 2", None, "0/3000028 junk"])
def test_bad_lsn_raises_config_error(bad):
    with pytest.raises(ConfigError, match="not an LSN"):
        parse_lsn(bad)


def test_wal_file_name_known_values():
    assert wal_file_name(1, parse_lsn("0/3000028")) == "000000010000000000000003"
    assert wal_file_name(1, parse_lsn("16/B374D848")) == "0000000100000016000000B3"
    assert wal_file_name(0x1A, 0) == "0000001A0000000000000000"


def test_wal_file_name_segment_boundaries():
    seg = DEFAULT_SEGMENT_SIZE
    assert wal_file_name(1, seg - 1) == "000000010000000000000000"
    assert wal_file_name(1, seg) == "000000010000000000000001"
    # last segment of xlogid 0 and first of xlogid 1
    assert wal_file_name(1, (1 << 32) - 1) == "0000000100000000000000FF"
    assert wal_file_name(1, 1 << 32) == "000000010000000100000000"
    assert segment_of(seg - 1) == 0 and segment_of(seg) == 1
    assert segment_of(1 << 32) == 256


def test_wal_file_name_other_segment_sizes():
    one_gb = 1024 ** 3
    # 4 segments per xlogid with 1 GB segments
    assert wal_file_name(2, (1 << 32) + 3 * one_gb, one_gb) == "000000020000000100000003"
    assert wal_file_name(1, 5 * 1024 * 1024, 1024 * 1024) == "000000010000000000000005"


@pytest.mark.parametrize("name,ok", [
    ("000000010000000000000003", True),
    ("0000000100000016000000B3", True),
    ("0000000100000016000000b3", False),
    ("00000001000000000000003", False),
    ("0000000100000000000000030", False),
    ("000000010000000000000003.partial", False),
    ("00000002.history", False),
    ("", False),
    ("00000001000000000000000G", False),
])
def test_is_wal_file_name(name, ok):
    assert is_wal_file_name(name) is ok


def test_wal_file_name_output_is_wal_file_name():
    for lsn in (0, 0x3000028, (0x16 << 32) | 0xB374D848, 2 ** 64 - 1):
        assert is_wal_file_name(wal_file_name(1, lsn))
