"""Every preflight case of the incremental decision, on the pure function."""

from __future__ import annotations

import datetime as dt

import pytest

from airflow_pg_incremental.core.errors import ConfigError
from airflow_pg_incremental.core.incremental import current_chain, decide

NOW = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.timezone.utc)
FACTS = {"major": 18, "summarize_wal": True, "system_identifier": "7710", "timeline": 1, "data_checksums": True}


def b(bid, kind="full", root=None, start="0/2000028", finished="2026-11-21T10:00:00+00:00", **kw):
    return {"backup_id": bid, "kind": kind, "chain_root_id": root or bid, "start_lsn": start,
            "finished_at": finished, "system_identifier": "7710", "timeline": 1, "data_checksums": True, **kw}


CHAIN = [b("F1"), b("I1", "incremental", "F1", "0/5000028"), b("I2", "incremental", "F1", "0/8000028")]
COVER = [(1, 0x1000000, 0x9000000)]


def d(kind="incremental", facts=None, chain=CHAIN, **kw):
    kw.setdefault("summaries", COVER)
    kw.setdefault("now", NOW)
    return decide(kind, {**FACTS, **(facts or {})}, chain, **kw)


def test_incremental_on_newest_and_differential_on_full():
    assert d()["kind"] == "incremental" and d()["parent_id"] == "I2" and d()["reason"] is None
    r = d("differential")
    assert r["kind"] == "differential" and r["parent_id"] == "F1"


@pytest.mark.parametrize("kw,needle", [
    ({"facts": {"summarize_wal": False}}, "summarize_wal is off"),
    ({"summaries": [(1, 0x8500000, 0x9000000)]}, "do not cover the parent"),
    ({"summaries": []}, "do not cover the parent"),
    ({"summaries": [(1, 0x1000000, 0x8100000), (1, 0x8200000, 0x9000000)]}, "hole"),
    ({"summaries": [(2, 0x1000000, 0x9000000)]}, "do not cover"),
    ({"facts": {"timeline": 2}}, "timeline changed"),
    ({"facts": {"system_identifier": "9999"}}, "another cluster"),
    ({"facts": {"data_checksums": False}}, "data checksums were switched off"),
    ({"parent_ok": False, "parent_problem": "objects missing from the repository: x"}, "objects missing"),
    ({"max_chain_length": 3}, "reached the limit of 3"),
    ({"keep_time_s": 3600}, "older than wal_summary_keep_time"),
    ({"chain": []}, "no full backup"),
])
def test_cases_that_take_a_full_instead(kw, needle):
    r = d(**kw)
    assert r["kind"] == "full" and r["parent_id"] is None and needle in r["reason"]


def test_old_servers_take_nothing_and_say_why():
    r = d(facts={"major": 15})
    assert r["kind"] == "none" and "WAL archive is the incremental" in r["reason"]


def test_chain_limit_does_not_apply_to_differentials():
    assert d("differential", max_chain_length=2)["kind"] == "differential"


def test_unknown_kind():
    with pytest.raises(ConfigError):
        d("weekly")


def test_current_chain_is_the_newest_full_and_its_descendants():
    older = [b("F0"), b("I0", "incremental", "F0")]
    assert [x["backup_id"] for x in current_chain(older + CHAIN)] == ["F1", "I1", "I2"]
    assert current_chain([]) == []
