"""Retention on fake repositories: sealed backup.json files with chain fields, WAL objects pushed
with core.wal.push_bytes. Every keep rule, timelines, refusals, crash-safe apply."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil

import pytest

from airflow_pg_incremental.core import metadata as md
from airflow_pg_incremental.core.errors import ClusterNotFound, ConfigError, InvalidName
from airflow_pg_incremental.core.incremental import resolve_chain
from airflow_pg_incremental.core.lsn import segment_name
from airflow_pg_incremental.core.repository import LocalRepository
from airflow_pg_incremental.core.retention import (
    RetentionPolicy,
    RetentionRefused,
    apply_retention,
    format_plan,
    plan_retention,
    summary,
)
from airflow_pg_incremental.core.wal import list_history, list_segments, wal_key

from .fakes import DAY, NOW, C, Fake, branched, new_repo, only_abandoned


def weekly(repo) -> Fake:
    """4 weekly chains, each: full (day 0), incremental (day 2), incremental on it (day 4).
    Chain k (1..4) full starts at segment 10k; WAL 5 .. 50 on timeline 1."""
    f = Fake(repo)
    t0 = NOW - 28 * DAY
    for k in range(1, 5):
        base = t0 + (k - 1) * 7 * DAY
        f.backup(f"F{k}", 10 * k, base)
        f.backup(f"I{k}a", 10 * k + 3, base + 2 * DAY, kind="incremental", parent=f"F{k}")
        f.backup(f"I{k}b", 10 * k + 6, base + 4 * DAY, kind="incremental", parent=f"I{k}a")
    f.wal(1, range(5, 51))
    return f


@pytest.fixture(scope="module", autouse=True)
def _no_fsync():
    """Durability is not what these tests are about; fsync of hundreds of tiny objects is slow."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "fsync", lambda fd: None)
        yield


@pytest.fixture
def repo(tmp_path):
    return new_repo(tmp_path / "repo")


@pytest.fixture(scope="module")
def weekly_template(tmp_path_factory):
    root = tmp_path_factory.mktemp("weekly") / "repo"
    weekly(new_repo(root))
    return root


@pytest.fixture
def wrepo(weekly_template, tmp_path):
    dest = tmp_path / "wrepo"
    shutil.copytree(weekly_template, dest)
    return LocalRepository(dest)


def keep_ids(plan):
    return [k["backup_id"] for k in plan["keep"]]


def reasons(plan, bid):
    return next(k["reasons"] for k in plan["keep"] if k["backup_id"] == bid)


def listing(repo):
    return repo.list("")


# -- policy --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,needle", [
    ({}, "needs keep_full_chains"),
    ({"keep_full_chains": 0}, "at least 1"),
    ({"keep_full_chains": -2}, "at least 1"),
    ({"keep_full_chains": 1.5}, "whole number"),
    ({"keep_full_chains": True}, "whole number"),
    ({"keep_full_chains": "3"}, "whole number"),
    ({"recovery_window_days": 0}, "positive"),
    ({"recovery_window_days": -1}, "positive"),
    ({"recovery_window_days": float("nan")}, "positive"),
    ({"recovery_window_days": "7"}, "number of days"),
    ({"keep_full_chains": 2, "min_redundancy": 0}, "at least 1"),
    ({"keep_full_chains": 2, "pinned": 5}, "list of backup ids"),
])
def test_policy_validation(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        RetentionPolicy(**kw)


def test_policy_normalizes():
    p = RetentionPolicy(recovery_window_days=7, keep_full_chains=2.0, pinned="F1, I2a F1")
    assert p.keep_full_chains == 2 and p.recovery_window_days == 7.0 and p.pinned == ["F1", "I2a"]
    assert RetentionPolicy.from_dict(p.to_dict()) == p
    assert "keep_full_chains=2" in p.describe() and "pinned=F1,I2a" in p.describe()
    with pytest.raises(InvalidName):
        RetentionPolicy(keep_full_chains=1, pinned=["../x"])
    with pytest.raises(ConfigError, match="unknown retention policy setting"):
        RetentionPolicy.from_dict({"keep_full_chains": 1, "keep_last": 3})
    assert RetentionPolicy(keep_full_chains=1).pinned == [] and RetentionPolicy(keep_full_chains=1).pinned is not \
        RetentionPolicy(keep_full_chains=1).pinned


# -- keep_full_chains ----------------------------------------------------------------------------------------------
def test_keep_full_chains(wrepo):
    before = listing(wrepo)
    plan = plan_retention(wrepo, C, RetentionPolicy(keep_full_chains=2), now=NOW)
    assert listing(wrepo) == before  # a pure computation
    assert keep_ids(plan) == ["F3", "I3a", "I3b", "F4", "I4a", "I4b"]
    assert plan["delete_backups"] == ["I2b", "I2a", "F2", "I1b", "I1a", "F1"]  # newest first: children first
    assert reasons(plan, "F3") == ["keep_full_chains=2: chain of F3 (#2 newest)"]
    assert plan["wal_horizon"]["backup_id"] == "F3" and plan["wal_horizon"]["segno"] == 30
    assert plan["delete_wal"] == [segment_name(1, s) for s in range(5, 30)]
    assert plan["bytes_by_kind"]["backups"] == 6 * 1010
    assert plan["bytes_by_kind"]["wal"] == sum(wrepo.size(wal_key(C, n)) for n in plan["delete_wal"])
    assert plan["bytes_freed"] == sum(plan["bytes_by_kind"].values()) and plan["refused"] is None
    assert plan["window"] is None and plan["warnings"] == []
    json.dumps(plan)  # travels as XCom / is printable


def test_keep_more_chains_than_exist_keeps_everything(wrepo):
    plan = plan_retention(wrepo, C, RetentionPolicy(keep_full_chains=10), now=NOW)
    assert plan["delete_backups"] == [] and len(plan["keep"]) == 12
    assert plan["delete_wal"] == [segment_name(1, s) for s in range(5, 10)]  # older than the oldest backup


# -- recovery window -----------------------------------------------------------------------------------------------
def test_window_inside_an_incremental_chain(wrepo):
    # chain 3: F3 at NOW-14d, I3a at NOW-12d, I3b at NOW-10d; a window of 11 days starts between I3a and I3b
    plan = plan_retention(wrepo, C, RetentionPolicy(recovery_window_days=11), now=NOW)
    assert keep_ids(plan) == ["F3", "I3a", "I3b", "F4", "I4a", "I4b"]
    assert plan["window"]["anchor"] == "I3a" and plan["window"]["covered"]
    assert plan["window"]["start"] == (NOW - 11 * DAY).isoformat()
    assert "window: anchor" in reasons(plan, "I3a")[0]
    assert reasons(plan, "F3") == ["ancestor of I3a", "ancestor of I3b"]
    assert reasons(plan, "I3b") == ["window: ended inside the recovery window"]
    assert plan["wal_horizon"]["backup_id"] == "F3"  # the anchor's chain starts there


def test_window_start_exactly_at_a_backup_end_anchors_on_it(wrepo):
    plan = plan_retention(wrepo, C, RetentionPolicy(recovery_window_days=10), now=NOW)  # I3b ended at NOW-10d
    assert plan["window"]["anchor"] == "I3b"
    assert keep_ids(plan) == ["F3", "I3a", "I3b", "F4", "I4a", "I4b"]
    # a little later: the anchor is the previous backup's end... a little earlier: I3a
    plan = plan_retention(wrepo, C, RetentionPolicy(recovery_window_days=10), now=NOW - dt.timedelta(seconds=1))
    assert plan["window"]["anchor"] == "I3a"


def test_window_at_chain_start_drops_the_previous_chain(wrepo):
    # F4 ended NOW-7d: a 6-day window anchors on F4, chain 3 is no longer needed
    plan = plan_retention(wrepo, C, RetentionPolicy(recovery_window_days=6), now=NOW)
    assert plan["window"]["anchor"] == "F4" and keep_ids(plan) == ["F4", "I4a", "I4b"]
    assert plan["wal_horizon"]["segno"] == 40
    # 7.5 days: the anchor is I3b, which drags F3 and I3a along
    plan = plan_retention(wrepo, C, RetentionPolicy(recovery_window_days=7.5), now=NOW)
    assert plan["window"]["anchor"] == "I3b" and keep_ids(plan)[:3] == ["F3", "I3a", "I3b"]


def test_window_with_differential_chain(repo):
    f = Fake(repo)
    t = NOW - 10 * DAY
    f.backup("F0", 2, t - 7 * DAY)
    f.backup("F1", 10, t)
    f.backup("D1", 13, t + 1 * DAY, kind="differential", parent="F1")
    f.backup("D1-I", 15, t + 2 * DAY, kind="incremental", parent="D1")
    f.backup("D2", 17, t + 3 * DAY, kind="differential", parent="F1")
    f.backup("D3", 20, t + 5 * DAY, kind="differential", parent="F1")
    f.backup("F2", 23, t + 8 * DAY)  # the newest chain (always kept whole: min_redundancy=1)
    f.wal(1, range(2, 25))
    # window starts after D2 ended and before D3: anchor D2 (parent F1); D1 and D1-I are not needed
    plan = plan_retention(repo, C, RetentionPolicy(recovery_window_days=6), now=NOW)
    assert plan["window"]["anchor"] == "D2"
    assert keep_ids(plan) == ["F1", "D2", "D3", "F2"]
    assert plan["delete_backups"] == ["D1-I", "D1", "F0"]
    assert reasons(plan, "F1") == ["ancestor of D2", "ancestor of D3"]
    assert plan["wal_horizon"]["backup_id"] == "F1" and plan["delete_wal"][-1] == segment_name(1, 9)
    # anchored on the incremental built on D1: D1 and F1 come with it
    plan = plan_retention(repo, C, RetentionPolicy(recovery_window_days=7.5), now=NOW)
    assert plan["window"]["anchor"] == "D1-I"
    assert reasons(plan, "D1") == ["ancestor of D1-I"]
    assert keep_ids(plan) == ["F1", "D1", "D1-I", "D2", "D3", "F2"] and plan["delete_backups"] == ["F0"]
    # the newest chain is never split: with F1 newest, its differentials all stay
    repo.delete_prefix(md.backup_prefix(C, "F2"))
    plan = plan_retention(repo, C, RetentionPolicy(recovery_window_days=6), now=NOW)
    assert keep_ids(plan) == ["F1", "D1", "D1-I", "D2", "D3"]


def test_window_reaching_past_every_backup_keeps_all(wrepo):
    plan = plan_retention(wrepo, C, RetentionPolicy(recovery_window_days=60), now=NOW)
    assert plan["delete_backups"] == [] and not plan["window"]["covered"]
    assert plan["window"]["restorable_from"] == md.iso(NOW - 28 * DAY)
    assert any("before the oldest restorable backup" in w for w in plan["warnings"])
    assert plan["delete_wal"] == [segment_name(1, s) for s in range(5, 10)]


def test_window_and_chain_count_are_a_union(wrepo):
    plan = plan_retention(wrepo, C, RetentionPolicy(recovery_window_days=2, keep_full_chains=3), now=NOW)
    assert keep_ids(plan)[0] == "F2" and plan["delete_backups"] == ["I1b", "I1a", "F1"]
    assert plan["window"]["anchor"] == "I4b"


def test_backups_newer_than_now_are_kept(wrepo):
    # planning "as of" a past instant: later backups count as inside the window
    plan = plan_retention(wrepo, C, RetentionPolicy(recovery_window_days=1), now=NOW - 12 * DAY)
    assert plan["window"]["anchor"] == "F3"
    assert keep_ids(plan) == ["F3", "I3a", "I3b", "F4", "I4a", "I4b"]


# -- min_redundancy / pinned -----------------------------------------------------------------------------------------
def test_min_redundancy_overrides(wrepo):
    plan = plan_retention(wrepo, C, RetentionPolicy(recovery_window_days=1, min_redundancy=3), now=NOW)
    assert keep_ids(plan)[0] == "F2" and len(plan["keep"]) == 9
    assert reasons(plan, "I2b") == ["min_redundancy=3: chain of F2 (#3 newest)"]
    plan = plan_retention(wrepo, C, RetentionPolicy(keep_full_chains=1, min_redundancy=2), now=NOW)
    assert keep_ids(plan) == ["F3", "I3a", "I3b", "F4", "I4a", "I4b"]


def test_min_redundancy_above_what_exists_keeps_all_with_a_warning(wrepo):
    plan = plan_retention(wrepo, C, RetentionPolicy(keep_full_chains=1, min_redundancy=6), now=NOW)
    assert plan["delete_backups"] == [] and plan["refused"] is None
    assert any("fewer than min_redundancy=6" in w for w in plan["warnings"])


def test_pinned_keeps_ancestors_only(wrepo):
    plan = plan_retention(wrepo, C, RetentionPolicy(keep_full_chains=1, pinned=["I1a"]), now=NOW)
    assert keep_ids(plan) == ["F1", "I1a", "F4", "I4a", "I4b"]
    assert reasons(plan, "I1a") == ["pinned"] and reasons(plan, "F1") == ["ancestor of I1a"]
    assert "I1b" in plan["delete_backups"]  # built on the pinned one, not needed by it
    assert plan["wal_horizon"]["backup_id"] == "F1" and plan["delete_wal"] == [segment_name(1, s) for s in range(5, 10)]


def test_pinned_unknown_is_refused_by_name(wrepo):
    with pytest.raises(RetentionRefused, match=r"pinned backup\(s\) NOPE, F9 do not exist"):
        plan_retention(wrepo, C, RetentionPolicy(keep_full_chains=1, pinned=["NOPE", "F1", "F9"]), now=NOW)


# -- timelines -------------------------------------------------------------------------------------------------------
def timelines(repo) -> Fake:
    """TL1: segments 1..22 (20..22 archived by the old primary after the failover); TL2 branched
    in segment 20 and runs to 40. B1 (TL1, seg 2), B2 (TL1, seg 12), B3 (TL2, seg 25), B4 (TL2, seg 35)."""
    f = Fake(repo)
    f.backup("B1", 2, NOW - 20 * DAY)
    f.backup("B2", 12, NOW - 15 * DAY)
    f.backup("B3", 25, NOW - 8 * DAY, timeline=2)
    f.backup("B4", 35, NOW - 1 * DAY, timeline=2)
    f.wal(1, range(1, 23))
    f.wal(2, range(20, 41))
    f.small("00000002.history", b"1\t0/14000000\tno recovery target specified\n")
    f.small(segment_name(1, 12) + ".00000028.backup")
    f.small(segment_name(2, 25) + ".00000028.backup")
    f.small(segment_name(1, 20) + ".partial")
    return f


def test_timelines_keep_what_an_older_kept_backup_crosses(repo):
    timelines(repo)
    plan = plan_retention(repo, C, RetentionPolicy(keep_full_chains=3), now=NOW)
    assert keep_ids(plan) == ["B2", "B3", "B4"]
    h = plan["wal_horizon"]
    assert (h["backup_id"], h["segno"], h["timeline"]) == ("B2", 12, 1)
    deleted = set(plan["delete_wal"])
    assert deleted == {segment_name(1, s) for s in range(1, 12)}
    # B2 on timeline 1 replays onto timeline 2 from its switch point: all of timeline 2 stays
    # (a per-timeline horizon, B3's start on timeline 2, would have deleted 20..24 of timeline 2)
    assert not any(n.startswith("00000002") for n in deleted)
    # the old primary's segments past the switch, the partial and B2's backup file stay too
    assert segment_name(1, 12) + ".00000028.backup" not in deleted
    assert plan["wal_timelines"]["00000001"]["first_kept"] == segment_name(1, 12)
    assert plan["wal_timelines"]["00000002"] == {"objects": 22, "delete": 0, "first_kept": segment_name(2, 20),
                                                 "last": segment_name(2, 40)}


def test_timelines_older_timeline_goes_when_nothing_needs_it(repo):
    timelines(repo)
    plan = plan_retention(repo, C, RetentionPolicy(keep_full_chains=2), now=NOW)
    assert keep_ids(plan) == ["B3", "B4"] and plan["wal_horizon"]["segno"] == 25
    deleted = plan["delete_wal"]
    assert set(deleted) == ({segment_name(1, s) for s in range(1, 23)} | {segment_name(2, s) for s in range(20, 25)}
                            | {segment_name(1, 12) + ".00000028.backup", segment_name(1, 20) + ".partial"})
    # oldest first, across timelines
    assert deleted.index(segment_name(1, 20)) < deleted.index(segment_name(2, 21)) < deleted.index(segment_name(1, 22))
    apply_retention(repo, C, RetentionPolicy(keep_full_chains=2), now=NOW)
    assert list_history(repo, C) == [2]  # history files always stay
    segs = list_segments(repo, C)
    assert 1 not in segs and segs[2] == [segment_name(2, s) for s in range(25, 41)]
    assert repo.exists(wal_key(C, segment_name(2, 25) + ".00000028.backup"))


def test_abandoned_branch_backup_counts_toward_no_rule(repo):
    branched(repo)
    # 3 newest full chains on the newest timeline's history: B2, B3, B4 (not A1, which a restore
    # along timeline 2 cannot start from); A1 ended inside the kept period: kept, not counted
    plan = plan_retention(repo, C, RetentionPolicy(keep_full_chains=3), now=NOW)
    assert keep_ids(plan) == ["B2", "A1", "B3", "B4"]
    assert "abandoned timeline branch" in reasons(plan, "A1")[0]
    assert plan["abandoned_branch"] == ["A1"] and plan["delete_backups"] == ["B1"]
    assert any("abandoned timeline branch" in w for w in plan["warnings"])
    # with 2 chains, A1 is older than everything kept: it goes, with the reason
    plan = plan_retention(repo, C, RetentionPolicy(keep_full_chains=2), now=NOW)
    assert keep_ids(plan) == ["B3", "B4"]
    assert plan["delete_backups"] == ["A1", "B2", "B1"]
    why = {d["backup_id"]: d["why"] for d in plan["delete_backup_details"]}
    assert "abandoned timeline branch" in why["A1"]


def test_abandoned_branch_backup_never_anchors_the_window(repo):
    branched(repo)
    # window of 10 days: a restore to its first instant (along timeline 2) starts from B2, not from
    # A1 although A1 is the newest backup that ended before it
    plan = plan_retention(repo, C, RetentionPolicy(recovery_window_days=10), now=NOW)
    assert plan["window"]["anchor"] == "B2"
    assert keep_ids(plan) == ["B2", "A1", "B3", "B4"] and plan["delete_backups"] == ["B1"]
    apply_retention(repo, C, RetentionPolicy(recovery_window_days=10), now=NOW)
    from airflow_pg_incremental.core.pitr import choose_backup, parse_target

    # the window's first instant is still restorable along timeline 2
    target = parse_target("time", (NOW - 10 * DAY).isoformat())
    assert choose_backup(repo, C, target)["backup_id"] == "B2"


def test_only_abandoned_fulls_refuses(repo):
    f = only_abandoned(repo)
    with pytest.raises(RetentionRefused, match=r"no restorable full backup .* newest timeline's history.*A1"):
        plan_retention(repo, C, RetentionPolicy(keep_full_chains=1), now=NOW)
    assert f.repo.exists(md.backup_prefix(C, "A1") + "/backup.json")


def test_newest_archived_segment_always_stays(repo):
    f = Fake(repo)
    f.backup("F1", 3, NOW - 9 * DAY)
    f.backup("F2", 20, NOW - DAY)
    f.wal(1, range(3, 16))  # capture lags: nothing archived yet from F2's start on
    f.small(segment_name(1, 4) + ".partial")
    repo.put_bytes(f"{C}/wal/00000001/partial/{segment_name(1, 5)}.zst", b"not a partial name")  # unknown: stays
    plan = plan_retention(repo, C, RetentionPolicy(keep_full_chains=1), now=NOW)
    assert plan["delete_wal"] == [segment_name(1, 3), segment_name(1, 4), segment_name(1, 4) + ".partial"] + \
        [segment_name(1, s) for s in range(5, 15)]
    assert any("newest archived segment" in w and "capture lags" in w for w in plan["warnings"])
    apply_retention(repo, C, RetentionPolicy(keep_full_chains=1), now=NOW)
    assert list_segments(repo, C) == {1: [segment_name(1, 15)]}
    assert repo.exists(f"{C}/wal/00000001/partial/{segment_name(1, 5)}.zst")


# -- restore points, leftovers, broken chains ------------------------------------------------------------------------
def test_restore_points_below_the_horizon_go(wrepo):
    f = Fake(wrepo)
    f.restore_point("before_migration", 12)
    f.restore_point("after_release", 35)
    wrepo.put_bytes(f"{C}/restore_points/garbled.json", b"{not json")
    plan = plan_retention(wrepo, C, RetentionPolicy(keep_full_chains=2), now=NOW)
    assert [r["name"] for r in plan["restore_points"]] == ["before_migration"]
    assert f"{C}/restore_points/before_migration.json" in plan["delete_other"]
    assert any("garbled.json unreadable" in w for w in plan["warnings"])


def test_leftovers_of_interrupted_backups(wrepo):
    real = md.utcnow()
    for bid, started in (("OLD", real - 2 * DAY), ("RUNNING", real - dt.timedelta(hours=1)), ("NOMARKER", None)):
        prefix = md.backup_prefix(C, bid)
        if started:
            wrepo.put_bytes(f"{prefix}/{md.INPROGRESS_NAME}", json.dumps({"started_at": md.iso(started)}).encode())
        wrepo.put_bytes(f"{prefix}/base.tar.zst", b"partial")
    plan = plan_retention(wrepo, C, RetentionPolicy(keep_full_chains=4), now=NOW)
    assert [lo["backup_id"] for lo in plan["leftovers"]] == ["NOMARKER", "OLD"]
    old = next(lo for lo in plan["leftovers"] if lo["backup_id"] == "OLD")
    assert old["objects"][-1].endswith(md.INPROGRESS_NAME)  # the marker goes last
    apply_retention(wrepo, C, RetentionPolicy(keep_full_chains=4), now=NOW)
    assert md.list_backup_ids(wrepo, C)[-1] == "RUNNING" and not wrepo.list(md.backup_prefix(C, "OLD"))
    assert wrepo.exists(f"{md.backup_prefix(C, 'RUNNING')}/base.tar.zst")


def test_unfinished_writes_of_killed_processes_are_planned_and_removed(wrepo):
    """A killed backup's or push's temp file is invisible to listings; retention finds it once it is
    older than a day, lists it in the plan (dry run first) and removes it."""
    import time

    d = wrepo.root / md.backup_prefix(C, "KILLED")
    d.mkdir(parents=True)
    old, fresh = d / ".base.tar.zst.tmp-0123456789ab", d / ".backup_manifest.zst.tmp-0123456789ac"
    old.write_bytes(b"x" * 1000)
    fresh.write_bytes(b"y")
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    plan = plan_retention(wrepo, C, RetentionPolicy(keep_full_chains=4), now=NOW)
    assert [(a["key"], a["kind"], a["bytes"]) for a in plan["abandoned_writes"]] == [
        (f"{md.backup_prefix(C, 'KILLED')}/base.tar.zst", "temp file", 1000)]
    assert "unfinished temp file" in format_plan(plan) and plan["bytes_by_kind"]["unfinished_writes"] == 1000
    dry = apply_retention(wrepo, C, RetentionPolicy(keep_full_chains=4), now=NOW, dry_run=True)
    assert old.exists() and dry["abandoned_writes"]
    res = apply_retention(wrepo, C, plan)  # the approved plan
    assert res["applied"]["unfinished_writes"] == 1 and not old.exists() and fresh.exists()


def test_broken_chain_is_left_alone_and_keeps_its_wal(wrepo):
    # I1a's backup.json vanished (by hand): I1b cannot be restored; F1 no longer has dependents
    wrepo.delete(f"{md.backup_prefix(C, 'I1a')}/{md.META_NAME}")
    plan = plan_retention(wrepo, C, RetentionPolicy(keep_full_chains=1), now=NOW)
    assert "I1b" not in plan["delete_backups"] and "F1" in plan["delete_backups"]
    assert plan["untouched"][0]["backup_id"] == "I1b" and "I1a" in plan["untouched"][0]["reason"]
    assert plan["wal_horizon"]["backup_id"] == "I1b"  # check_continuity still counts it: no gap made
    assert "I1a" in [lo["backup_id"] for lo in plan["leftovers"]]


# -- refusals --------------------------------------------------------------------------------------------------------
def test_refuses_an_empty_cluster(repo):
    with pytest.raises(ClusterNotFound, match="does not exist"):
        plan_retention(repo, C, RetentionPolicy(keep_full_chains=1), now=NOW)
    Fake(repo).wal(1, [1])
    with pytest.raises(RetentionRefused, match="no complete backup"):
        plan_retention(repo, C, RetentionPolicy(keep_full_chains=1), now=NOW)
    repo.put_bytes(f"{md.backup_prefix(C, 'X')}/base.tar.zst", b"partial")  # only an interrupted backup
    with pytest.raises(RetentionRefused, match="no complete backup"):
        apply_retention(repo, C, RetentionPolicy(keep_full_chains=1), now=NOW)
    assert repo.exists(wal_key(C, segment_name(1, 1))) and repo.list(md.backup_prefix(C, "X"))
    plan = plan_retention(repo, C, RetentionPolicy(keep_full_chains=1), now=NOW, raise_on_refusal=False)
    assert "no complete backup" in plan["refused"] and plan["delete_wal"] == [] and plan["delete_other"] == []
    assert "REFUSED" in format_plan(plan)
    with pytest.raises(RetentionRefused, match="was refused"):
        apply_retention(repo, C, plan)


def test_refuses_when_nothing_is_restorable(repo):
    f = Fake(repo)
    f.backup("F1", 2, NOW - 3 * DAY)
    f.backup("I1", 4, NOW - 2 * DAY, kind="incremental", parent="F1")
    repo.delete(f"{md.backup_prefix(C, 'F1')}/{md.META_NAME}")  # the full is gone: I1 is an orphan
    before = listing(repo)
    with pytest.raises(RetentionRefused, match="no restorable full backup"):
        apply_retention(repo, C, RetentionPolicy(recovery_window_days=1), now=NOW)
    assert listing(repo) == before


def test_refuses_damaged_metadata_by_name(wrepo):
    key = f"{md.backup_prefix(C, 'I2a')}/{md.META_NAME}"
    wrepo.put_bytes(key, wrepo.get_bytes(key).replace(b'"incremental"', b'"full"'))
    before = listing(wrepo)
    with pytest.raises(RetentionRefused, match="metadata of I2a is damaged"):
        apply_retention(wrepo, C, RetentionPolicy(keep_full_chains=1), now=NOW)
    assert listing(wrepo) == before


def test_refuses_a_backup_json_under_the_wrong_directory(wrepo):
    src = f"{md.backup_prefix(C, 'F1')}/{md.META_NAME}"
    wrepo.put_bytes(f"{md.backup_prefix(C, 'COPY')}/{md.META_NAME}", wrepo.get_bytes(src))
    with pytest.raises(RetentionRefused, match="does not match its directory"):
        plan_retention(wrepo, C, RetentionPolicy(keep_full_chains=1), now=NOW)


def test_bad_now_and_cluster(wrepo):
    with pytest.raises(ConfigError, match="no time zone"):
        plan_retention(wrepo, C, RetentionPolicy(keep_full_chains=1), now=dt.datetime(2026, 1, 1))
    with pytest.raises(InvalidName):
        plan_retention(wrepo, "../x", RetentionPolicy(keep_full_chains=1))
    plan = plan_retention(wrepo, C, {"keep_full_chains": 1}, now="2026-11-29T00:00:00Z")
    assert plan["now"] == NOW.isoformat()


# -- apply -----------------------------------------------------------------------------------------------------------
class Recording(LocalRepository):
    """Records deletions; raises (a 'crash') at deletion number `crash_at`."""

    def __init__(self, root, crash_at=None):
        super().__init__(root)
        self.deleted: list[str] = []
        self.crash_at = crash_at

    def delete(self, key):
        if self.crash_at is not None and len(self.deleted) == self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        super().delete(key)
        self.deleted.append(key)


class FakeCatalog:
    def __init__(self, backups=(), wal=()):
        self.rows = {b: "complete" for b in backups}
        self.wal = set(wal)

    def backups(self, cluster, status=None):
        return [{"backup_id": b, "status": s} for b, s in sorted(self.rows.items()) if status in (None, s)]

    def wal_segments(self, cluster):
        return [{"segment": n} for n in sorted(self.wal)]

    def delete_backup_row(self, cluster, backup_id):
        self.rows.pop(backup_id, None)

    def delete_wal_rows(self, cluster, segments):
        self.wal -= set(segments)


def test_dry_run_deletes_nothing(wrepo, caplog):
    before = listing(wrepo)
    caplog.set_level("INFO", logger="airflow_pg_incremental.core.retention")
    res = apply_retention(wrepo, C, RetentionPolicy(keep_full_chains=2), now=NOW, dry_run=True)
    assert listing(wrepo) == before and res["dry_run"] and res["applied"] is None
    assert res["delete_backups"] == ["I2b", "I2a", "F2", "I1b", "I1a", "F1"]
    text = caplog.text
    assert "[dry run] retention plan for cluster main" in text and "DELETE  F1" in text
    assert "keep    F4" in text and "keep_full_chains=2: chain of F4 (#1 newest)" in text
    assert "WAL: DELETE 25 file(s) below segment number 30" in text and "frees about" in text


def test_apply_order_and_result(weekly_template, tmp_path):
    shutil.copytree(weekly_template, tmp_path / "r")
    repo = Recording(tmp_path / "r")
    f = Fake(repo)
    f.restore_point("old_rp", 12)
    cat = FakeCatalog(backups=[f"{x}{k}{y}" for k in range(1, 5) for x, y in (("F", ""), ("I", "a"), ("I", "b"))]
                      + ["GONE_BY_HAND"], wal=[segment_name(1, s) for s in range(1, 51)])
    res = apply_retention(repo, C, RetentionPolicy(keep_full_chains=2), now=NOW, catalog=cat)
    d = repo.deleted
    # per backup: backup.json first; children before parents
    for bid in res["delete_backups"]:
        keys = [n for n, k in enumerate(d) if f"/backups/{bid}/" in k]
        assert d[keys[0]].endswith(f"{bid}/backup.json") and keys == list(range(keys[0], keys[0] + 3))
    order = [k.split("/")[2] for k in d if k.endswith("backup.json")]
    assert order == ["I2b", "I2a", "F2", "I1b", "I1a", "F1"]
    # restore point before WAL, WAL oldest first, after the backups
    rp = d.index(f"{C}/restore_points/old_rp.json")
    wal = [n for n, k in enumerate(d) if "/wal/" in k]
    assert max(n for n, k in enumerate(d) if "/backups/" in k) < rp < wal[0]
    assert [d[n] for n in wal] == [wal_key(C, segment_name(1, s)) for s in range(5, 30)]
    assert res["applied"]["backups"] == res["delete_backups"] and res["applied"]["wal"] == 25
    assert [b["backup_id"] for b in md.list_backups(repo, C)] == keep_ids(res)
    for b in md.list_backups(repo, C):
        resolve_chain(repo, C, b)  # every kept backup still restores its chain
    assert list_segments(repo, C)[1] == [segment_name(1, s) for s in range(30, 51)]
    # catalog: rows of deleted backups, a stale row, WAL rows below the horizon (also ones never in the repo)
    assert sorted(cat.rows) == sorted(keep_ids(res))
    assert cat.wal == {segment_name(1, s) for s in range(30, 51)}
    assert res["applied"]["catalog_backup_rows"] == 7
    # applying again finds nothing
    again = plan_retention(repo, C, RetentionPolicy(keep_full_chains=2), now=NOW)
    assert again["delete_backups"] == [] and again["delete_wal"] == [] and again["delete_other"] == []
    s = summary(res)
    assert s["applied"] and s["wal_files"] == 25 and s["kept"] == keep_ids(res) and s["restore_points"] == ["old_rp"]
    json.dumps(s)


def _final_state(repo):
    return listing(repo)


def test_crash_at_every_step_then_rerun_completes(weekly_template, tmp_path):
    policy = RetentionPolicy(recovery_window_days=11)  # anchor I3a: keeps F3 I3a I3b + chain 4
    ref = tmp_path / "ref"
    shutil.copytree(weekly_template, ref)
    ref_repo = Recording(ref)
    Fake(ref_repo).restore_point("rp", 11)
    md_prefix = md.backup_prefix(C, "ZZ-interrupted")
    ref_repo.put_bytes(f"{md_prefix}/base.tar.zst", b"partial")  # a leftover with no marker
    res = apply_retention(ref_repo, C, policy, now=NOW)
    expected = _final_state(ref_repo)
    total = len(ref_repo.deleted)
    assert total == 6 * 3 + 1 + 1 + 25  # 6 backups of 3 objects, the leftover, the restore point, WAL
    kept = keep_ids(res)
    # every step of the backups, leftovers and restore points; the first, a middle and the last WAL deletion
    for crash_at in [*range(total - 25), total - 25, total - 12, total - 1]:
        root = tmp_path / f"c{crash_at}"
        shutil.copytree(weekly_template, root)
        crashing = Recording(root, crash_at=crash_at)
        Fake(crashing).restore_point("rp", 11)
        crashing.put_bytes(f"{md_prefix}/base.tar.zst", b"partial")
        with pytest.raises(KeyboardInterrupt):
            apply_retention(crashing, C, policy, now=NOW)
        plain = LocalRepository(root)
        # midway, every kept backup is intact and restorable, and the WAL they need is there
        assert [b["backup_id"] for b in md.list_backups(plain, C)][-len(kept):] == kept
        for bid in kept:
            resolve_chain(plain, C, md.load_backup(plain, C, bid))
        segs = list_segments(plain, C)[1]
        assert segs[-21:] == [segment_name(1, s) for s in range(30, 51)]
        assert segs == [segment_name(1, s) for s in range(int(segs[0][16:], 16), 51)]  # no hole
        apply_retention(plain, C, policy, now=NOW)
        assert _final_state(plain) == expected, crash_at


# -- approved plans --------------------------------------------------------------------------------------------------
def test_approved_plan_applies_only_what_it_lists(wrepo):
    plan = plan_retention(wrepo, C, RetentionPolicy(keep_full_chains=3), now=NOW)
    assert plan["delete_backups"] == ["I1b", "I1a", "F1"]
    f = Fake(wrepo)
    f.backup("F5", 52, NOW + DAY)  # a new full since: the fresh plan would delete chain 2 as well
    f.wal(1, range(51, 53))
    res = apply_retention(wrepo, C, plan)
    assert res["applied"]["backups"] == ["I1b", "I1a", "F1"]
    assert [b["backup_id"] for b in md.list_backups(wrepo, C)][0] == "F2"
    assert any("not in the approved plan" in w for w in res["warnings"])
    assert res["delete_wal"][-1] == segment_name(1, 19)


def test_approved_plan_refused_when_it_no_longer_holds(wrepo):
    plan = plan_retention(wrepo, C, RetentionPolicy(keep_full_chains=3), now=NOW)
    tampered = dict(plan, delete_backups=plan["delete_backups"] + ["F3"])
    before = listing(wrepo)
    with pytest.raises(RetentionRefused, match=r"backup\(s\) F3 must now stay"):
        apply_retention(wrepo, C, tampered)
    tampered = dict(plan, delete_wal=plan["delete_wal"] + [segment_name(1, 45)])
    with pytest.raises(RetentionRefused, match=f"WAL {segment_name(1, 45)} is now needed"):
        apply_retention(wrepo, C, tampered)
    with pytest.raises(ConfigError, match="is for cluster"):
        apply_retention(wrepo, "other", plan)
    assert listing(wrepo) == before
    # the approved plan itself, then again (nothing left to do: a re-run is harmless)
    apply_retention(wrepo, C, plan)
    res = apply_retention(wrepo, C, plan)
    assert res["applied"]["backups"] == [] and res["applied"]["wal"] == 0


# -- the operator (no Airflow connection needed for a local repository) ----------------------------------------------
def test_operator_plan_then_apply(wrepo):
    from airflow_pg_incremental.operators.retention import PgRetentionOperator

    kw = dict(cluster=C, repository=str(wrepo.root), keep_full_chains="2", recovery_window_days="None",
              min_redundancy="1", pinned="I1a")
    op = PgRetentionOperator(task_id="plan", dry_run="True", **kw)
    assert op.postgres_conn_id == "" and "dry_run" in op.template_fields and "pinned" in op.template_fields
    before = listing(wrepo)
    out = op.execute({})
    assert listing(wrepo) == before
    assert out["dry_run"] and not out["applied"] and out["delete_backups"] == ["I2b", "I2a", "F2", "I1b"]
    assert out["kept"] == ["F1", "I1a", "F3", "I3a", "I3b", "F4", "I4a", "I4b"]
    json.dumps(out)
    out = PgRetentionOperator(task_id="apply", dry_run=False, **kw).execute({})
    assert out["applied"] and [b["backup_id"] for b in md.list_backups(wrepo, C)] == out["kept"]
    with pytest.raises(ConfigError, match="dry_run must be true or false"):
        PgRetentionOperator(task_id="x", dry_run="maybe", **kw).execute({})
    with pytest.raises(ConfigError, match="whole number"):
        PgRetentionOperator(task_id="y", **dict(kw, keep_full_chains="2.5")).execute({})
