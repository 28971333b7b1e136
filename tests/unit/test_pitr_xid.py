"""Transaction id targets: PostgreSQL's recovery_target_xid is a 32-bit xid and silently truncates a
larger number, so a 64-bit id (pg_current_xact_id(): epoch * 2^32 + xid) must be refused, saying
how to get the 32-bit part; EPOCH:XID is accepted."""

from __future__ import annotations

import pytest

from airflow_pg_incremental.core.errors import ConfigError
from airflow_pg_incremental.core.pitr import configure_recovery, parse_target


@pytest.mark.parametrize("value,expect", [("3", "3"), (" 745 ", "745"), (4294967295, "4294967295"),
                                          ("0:745", "745"), ("2:4294967295", "4294967295"), ("007", "7")])
def test_valid_xids(value, expect):
    assert parse_target("xid", value).value == expect


def test_a_64_bit_id_is_refused_with_its_32_bit_part():
    big = (5 << 32) + 1234
    with pytest.raises(ConfigError, match=r"does not fit in 32 bits.*truncate it to 1234.*give the 32-bit part, "
                                          r"1234.*5:1234"):
        parse_target("xid", str(big))
    with pytest.raises(ConfigError, match="does not fit in 32 bits"):
        parse_target("xid", str(1 << 40))
    with pytest.raises(ConfigError, match="does not fit in 32 bits"):
        parse_target("xid", "4294967296")
    with pytest.raises(ConfigError, match="does not fit in 32 bits"):
        parse_target("xid", "1:4294967296")


@pytest.mark.parametrize("value", ["0", "1", "2", "0:2"])
def test_reserved_xids(value):
    with pytest.raises(ConfigError, match="reserved"):
        parse_target("xid", value)


@pytest.mark.parametrize("value", ["-4", "", "abc", "1:", ":5", "1:2:3", "0x10", "1e3", "5 6", "-1:5"])
def test_malformed_xids(value):
    with pytest.raises(ConfigError, match="not a valid xid"):
        parse_target("xid", value)


def test_the_epoch_form_writes_the_32_bit_xid(tmp_path):
    from tests.unit.fakes import new_repo

    repo = new_repo(tmp_path / "repo")
    (tmp_path / "d").mkdir()
    configure_recovery(tmp_path / "d", repo, "main", parse_target("xid", "3:1000"))
    assert "recovery_target_xid = '1000'" in (tmp_path / "d" / "postgresql.auto.conf").read_text()
