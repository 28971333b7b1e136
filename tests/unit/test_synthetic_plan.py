"""Synthetic fulls: refusals on metadata alone, the restore-chain length, and resolve_chain's choice."""

from __future__ import annotations

import pytest

import airflow_pg_incremental.core.synthetic as synmod
from airflow_pg_incremental.core.errors import ConfigError
from airflow_pg_incremental.core.incremental import current_chain, decide, restore_length
from airflow_pg_incremental.core.synthetic import synthetic_for


def _b(bid, kind="incremental", parent=None, root="F", **kw):
    return {"backup_id": bid, "kind": kind, "parent_id": parent, "chain_root_id": root, "status": "complete", **kw}


BACKUPS = [_b("F", "full"), _b("I1", parent="F"), _b("I2", parent="I1"),
           _b("S", "synthetic", root="S", stands_for="I2"), _b("I3", parent="I2"), _b("I4", parent="I3")]


def test_postgresql_15_is_refused(monkeypatch):
    meta = {"backup_id": "20260101T000000Z-I", "kind": "incremental", "parent_id": "20260101T000000Z-F",
            "pg_major": 15}
    monkeypatch.setattr(synmod, "resolve_backup", lambda r, c, b: meta)
    monkeypatch.setattr(synmod, "require_cluster", lambda r, c: None)
    with pytest.raises(ConfigError, match="PostgreSQL 17"):
        synmod.plan_synthesis(object(), "c", "latest")


def test_synthetics_are_not_parents():
    assert [b["backup_id"] for b in current_chain(BACKUPS)] == ["F", "I1", "I2", "I3", "I4"]


def test_restore_length_counts_from_the_synthetic_full():
    chain = current_chain(BACKUPS)
    assert restore_length(chain, BACKUPS) == 3  # S, I3, I4
    assert restore_length(chain, [b for b in BACKUPS if b["kind"] != "synthetic"]) == 5


def test_newest_synthetic_wins_and_failed_ones_do_not_count():
    more = BACKUPS + [_b("S2", "synthetic", root="S2", stands_for="I2"),
                      _b("S3", "synthetic", root="S3", stands_for="I4", status="failed")]
    got = synthetic_for(more)
    assert got["I2"]["backup_id"] == "S2" and "I4" not in got


def test_decide_limits_the_restore_chain_not_the_parent_chain():
    facts = {"major": 18, "summarize_wal": True, "system_identifier": "1", "timeline": 1, "data_checksums": True}
    chain = [_b(f"I{i}", system_identifier="1", timeline=1, data_checksums=True, start_lsn="0/1000000")
             for i in range(20)]
    assert decide("incremental", facts, chain, max_chain_length=14, restore_len=3)["kind"] == "incremental"
    d = decide("incremental", facts, chain, max_chain_length=14)
    assert d["kind"] == "full" and "restored together" in d["reason"]


def test_resolve_chain_reads_only_the_synthetic_fulls_and_the_walk(tmp_path, monkeypatch):
    """A restore, PITR plan or verify resolves chains: through the synthetic fulls, without reading
    every backup.json of the cluster (ten older chains here are never read)."""
    import os

    from airflow_pg_incremental.core import metadata as md
    from airflow_pg_incremental.core.incremental import resolve_chain
    from tests.unit.fakes import DAY, NOW, C, Fake, new_repo

    monkeypatch.setattr(os, "fsync", lambda fd: None)
    repo = new_repo(tmp_path / "repo")
    f = Fake(repo)
    ids = [f"20261101T0{h:01d}0000Z-F" for h in range(10)]  # old fulls, nothing to do with the chain
    for n, bid in enumerate(ids):
        f.backup(bid, 5 + n, NOW - (30 - n) * DAY)
    f.backup("20261120T000000Z-F", 20, NOW - 5 * DAY)
    f.backup("20261121T000000Z-I", 22, NOW - 4 * DAY, kind="incremental", parent="20261120T000000Z-F")
    f.synthetic("20261121T000500Z-S", "20261121T000000Z-I")
    f.backup("20261122T000000Z-I", 24, NOW - 3 * DAY, kind="incremental", parent="20261121T000000Z-I")
    read = []
    real = repo.get_bytes
    monkeypatch.setattr(repo, "get_bytes", lambda key: read.append(key) or real(key))
    chain = resolve_chain(repo, C, md.load_backup(repo, C, "20261122T000000Z-I"))
    assert [b["backup_id"] for b in chain] == ["20261121T000500Z-S", "20261122T000000Z-I"]
    assert not [k for k in read if any(i in k for i in ids)], read
