"""Retention with synthetic fulls (fake repositories): a verified synthetic full anchors a chain and
the backups it absorbed may go; without verification evidence they stay, and say why; a synthetic
full that a kept backup's restore chain goes through stays; the next incremental's parent stays."""

from __future__ import annotations

import os

import pytest

from airflow_pg_incremental.core import metadata as md
from airflow_pg_incremental.core.incremental import resolve_chain
from airflow_pg_incremental.core.retention import RetentionPolicy, apply_retention, format_plan, plan_retention

from .fakes import DAY, NOW, C, Fake, new_repo
from .test_retention import FakeCatalog


@pytest.fixture(autouse=True)
def _no_fsync(monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: None)


class Verifications(FakeCatalog):
    """A catalog with results in its verifications table."""

    def __init__(self, **ok):
        super().__init__()
        self.ok = ok

    def last_verification(self, cluster, backup_id):
        if backup_id not in self.ok:
            return None
        return {"ok": self.ok[backup_id], "started_at": "2026-11-28T00:00:00+00:00",
                "error": None if self.ok[backup_id] else "base.tar.zst: SHA-256 mismatch"}


def history(repo) -> Fake:
    """F (10 days ago), I1 (8), I2 (6), S standing for I2, I3 (4), I4 (2): one parent chain.
    WAL 5..30 on timeline 1."""
    f = Fake(repo)
    f.backup("F", 10, NOW - 10 * DAY)
    f.backup("I1", 13, NOW - 8 * DAY, kind="incremental", parent="F")
    f.backup("I2", 16, NOW - 6 * DAY, kind="incremental", parent="I1")
    f.synthetic("S", "I2")
    f.backup("I3", 19, NOW - 4 * DAY, kind="incremental", parent="I2")
    f.backup("I4", 22, NOW - 2 * DAY, kind="incremental", parent="I3")
    f.wal(1, range(5, 31))
    return f


@pytest.fixture
def repo(tmp_path):
    repo = new_repo(tmp_path / "repo")
    history(repo)
    return repo


def kept(plan) -> dict[str, list[str]]:
    return {k["backup_id"]: k["reasons"] for k in plan["keep"]}


WINDOW5 = RetentionPolicy(recovery_window_days=5)  # starts between I2/S (6 days ago) and I3 (4)


def test_verified_synthetic_anchors_the_window_and_absorbed_backups_go(repo):
    plan = plan_retention(repo, C, WINDOW5, now=NOW, catalog=Verifications(S=True))
    assert plan["window"]["anchor"] == "S"
    k = kept(plan)
    # incremental forever: the chain's full goes too once the verified S stands in for it, and with
    # it every WAL segment before S (else the first full and all WAL since would stay for ever)
    assert list(k) == ["S", "I3", "I4"]
    assert plan["delete_backups"] == ["I2", "I1", "F"] and plan["wal_horizon"]["backup_id"] == "S"
    assert any("window: anchor" in r for r in k["S"])
    assert any("parent of the next incremental" in r for r in k["I4"])
    assert any(r.startswith("restore chain of I4: the synthetic full") for r in k["S"])
    why = {d["backup_id"]: d["why"] for d in plan["delete_backup_details"]}
    assert why["I2"].startswith("absorbed by the verified synthetic full S")
    assert plan["synthetics"] == {"S": {"stands_for": "I2", "verified": True, "why_not": None}}
    text = format_plan(plan)
    assert "synthetic full S stands for I2: verified" in text and "DELETE  I2" in text
    # applied: every kept backup still resolves to a restore chain, through S
    apply_retention(repo, C, plan, catalog=Verifications(S=True))
    assert [b["backup_id"] for b in md.list_backups(repo, C)] == ["S", "I3", "I4"]
    assert [b["backup_id"] for b in resolve_chain(repo, C, md.load_backup(repo, C, "I4"))] == ["S", "I3", "I4"]
    assert plan_retention(repo, C, WINDOW5, now=NOW, catalog=Verifications(S=True))["delete_backups"] == []


@pytest.mark.parametrize("catalog,needle", [
    (None, "retention ran without the catalog"),
    (Verifications(), "not verified yet"),
    (Verifications(S=False), "failed: base.tar.zst: SHA-256 mismatch"),
])
def test_absorbed_backups_stay_until_the_synthetic_is_verified(repo, catalog, needle):
    plan = plan_retention(repo, C, WINDOW5, now=NOW, catalog=catalog)
    k = kept(plan)
    assert list(k) == ["F", "I1", "I2", "S", "I3", "I4"] and plan["delete_backups"] == []
    for bid in ("I1", "I2"):
        assert any(r.startswith("absorbed by the synthetic full S, which cannot replace it yet") and needle in r
                   for r in k[bid]), k[bid]
    assert any("its chain without the unverified synthetic full S" in r for r in k["I2"])
    assert plan["synthetics"]["S"]["verified"] is False
    assert "synthetic full S stands for I2: NOT trusted yet" in format_plan(plan)


def test_synthetic_counts_as_a_full_chain(repo):
    plan = plan_retention(repo, C, RetentionPolicy(keep_full_chains=1), now=NOW, catalog=Verifications(S=True))
    k = kept(plan)
    assert list(k) == ["S", "I3", "I4"] and plan["delete_backups"] == ["I2", "I1", "F"]
    assert any("keep_full_chains=1: chain of S (#1 newest)" in r for r in k["I3"])
    two = plan_retention(repo, C, RetentionPolicy(keep_full_chains=2), now=NOW, catalog=Verifications(S=True))
    assert two["delete_backups"] == ["I2"]  # the chain of F is F, I1: I2's point is S's


def test_synthetic_stays_while_a_kept_backup_restores_through_it(repo):
    """Once I1 and I2 are gone, I3 and I4 restore only through S: S stays, verified or not."""
    apply_retention(repo, C, WINDOW5, now=NOW, catalog=Verifications(S=True))
    for catalog in (None, Verifications(S=True), Verifications(S=False)):
        plan = plan_retention(repo, C, RetentionPolicy(recovery_window_days=1), now=NOW, catalog=catalog)
        k = kept(plan)
        assert "S" in k and "I3" in k and plan["delete_backups"] == [], (catalog, plan["delete_backups"])
        assert any(r.startswith("restore chain of I4") for r in k["S"])
        assert plan["untouched"] == []


def test_synthetic_and_its_dependents_expire_together(tmp_path):
    """A newer full chain: the old one, synthetic full included, goes as a whole."""
    repo = new_repo(tmp_path / "r")
    f = history(repo)
    f.backup("F2", 25, NOW - 1 * DAY)
    f.wal(1, range(31, 33))
    plan = plan_retention(repo, C, RetentionPolicy(keep_full_chains=1), now=NOW, catalog=Verifications(S=True))
    assert list(kept(plan)) == ["F2"]
    assert plan["delete_backups"] == ["I4", "I3", "S", "I2", "I1", "F"]  # children before what they restore from


def test_the_parent_of_the_next_incremental_stays_though_absorbed(tmp_path):
    """A verified synthetic full standing for the newest backup absorbs it; its manifest is still the
    next incremental's parent."""
    repo = new_repo(tmp_path / "r")
    history(repo).synthetic("S4", "I4")
    cat = Verifications(S=True, S4=True)
    plan = plan_retention(repo, C, RetentionPolicy(keep_full_chains=1), now=NOW, catalog=cat)
    k = kept(plan)
    assert list(k) == ["I4", "S4"]
    assert any("parent of the next incremental" in r for r in k["I4"])
    assert plan["delete_backups"] == ["I3", "S", "I2", "I1", "F"]


def test_a_synthetic_sorting_before_what_it_stands_for_still_anchors(tmp_path):
    """Ids taken in the same second: 20261125T211209Z-S sorts before 20261125T211209Z.002-I (same
    started_at). The window's anchor is still the synthetic full, not the backup it absorbed."""
    repo = new_repo(tmp_path / "r")
    f = Fake(repo)
    f.backup("F", 10, NOW - 10 * DAY)
    f.backup("I1", 13, NOW - 8 * DAY, kind="incremental", parent="F")
    f.backup("I2", 16, NOW - 6 * DAY, kind="incremental", parent="I1")
    f.synthetic("H", "I2")  # "H" < "I2"
    f.backup("I3", 19, NOW - 4 * DAY, kind="incremental", parent="I2")
    f.wal(1, range(5, 25))
    # listed right after the backup it stands for, whatever the ids (CI once saw I2 anchor the window)
    assert [b["backup_id"] for b in md.list_backups(repo, C)][:4] == ["F", "I1", "I2", "H"]
    for unverified in (None, Verifications(H=False)):
        assert plan_retention(repo, C, WINDOW5, now=NOW, catalog=unverified)["window"]["anchor"] == "H"
    plan = plan_retention(repo, C, WINDOW5, now=NOW, catalog=Verifications(H=True))
    assert plan["window"]["anchor"] == "H"
    assert list(kept(plan)) == ["H", "I3"] and plan["delete_backups"] == ["I2", "I1", "F"]


def test_the_chains_full_stays_until_a_verified_synthetic_stands_in_for_it(repo):
    """Unverified S: the root full F stays (the newest backup restores through it)."""
    plan = plan_retention(repo, C, WINDOW5, now=NOW, catalog=Verifications(S=False))
    assert "F" in kept(plan) and any("root of the current parent chain" in r for r in kept(plan)["F"])


def test_after_the_full_went_the_next_incremental_still_builds_on_the_chain(repo):
    """F, I1, I2 deleted: the parent chain is I3, I4 (no full at its head); an incremental is taken
    on I4 and restores through S; a differential, which needs the chain's full, is a full instead."""
    from airflow_pg_incremental.core.incremental import current_chain, decide, restore_chain_ids

    apply_retention(repo, C, WINDOW5, now=NOW, catalog=Verifications(S=True))
    backups = md.list_backups(repo, C)
    assert [b["backup_id"] for b in backups] == ["S", "I3", "I4"]
    chain = current_chain(backups)
    assert [b["backup_id"] for b in chain] == ["I3", "I4"] and restore_chain_ids(chain, backups) == ["S", "I3", "I4"]
    facts = {"major": 18, "summarize_wal": True, "system_identifier": chain[-1].get("system_identifier"),
             "timeline": chain[-1].get("timeline"), "data_checksums": chain[-1].get("data_checksums")}
    d = decide("incremental", facts, chain, restore_len=3)
    assert d["kind"] == "incremental" and d["parent_id"] == "I4"
    d = decide("differential", facts, chain)
    assert d["kind"] == "full" and "removed by retention" in d["reason"]
    assert [b["backup_id"] for b in resolve_chain(repo, C, md.load_backup(repo, C, "I4"))] == ["S", "I3", "I4"]
