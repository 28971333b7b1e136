"""Choosing the backup for a point-in-time restore when the archive holds more than one timeline:
a backup on an abandoned branch (its timeline continued past the point where the timeline recovery
follows left it) must never be chosen, since PostgreSQL refuses it ('requested timeline is not a
child of this server's history')."""

from __future__ import annotations

import pytest

from airflow_pg_incremental.core.errors import RestoreError
from airflow_pg_incremental.core.pitr import choose_backup, parse_target, plan_restore
from airflow_pg_incremental.core.wal import on_timeline_path, timeline_path

from .fakes import DAY, NOW, C, Fake, lsn, new_repo, only_abandoned
from .fakes import branched as _branched


@pytest.fixture
def repo(tmp_path):
    return new_repo(tmp_path / "repo")


def branched(repo, abandoned_newest=False):
    """fakes.branched; with `abandoned_newest`, A1 (the abandoned branch) ended after every other
    backup (half a day ago)."""
    return _branched(repo, a1_days_ago=0.5 if abandoned_newest else 12)


def test_timeline_path_follows_the_newest_history(repo):
    branched(repo)
    assert timeline_path(repo, C) == {2: None, 1: 0x14000000}
    assert timeline_path(repo, C, "1") == {1: None}


def test_on_timeline_path_cases(repo):
    f = branched(repo)
    path = timeline_path(repo, C)
    assert [on_timeline_path(f.metas[b], path) for b in ("B1", "B2", "A1", "B3")] == [True, True, False, True]
    # a backup ending exactly at the switch point is still on the path
    assert on_timeline_path({"timeline": 1, "stop_lsn": "0/14000000"}, path)
    assert not on_timeline_path({"timeline": 1, "stop_lsn": "0/14000001"}, path)
    # newer than every archived history: its own, newest timeline
    assert on_timeline_path({"timeline": 3, "stop_lsn": lsn(45)}, path)
    # ... but not when a timeline was asked for by number
    assert not on_timeline_path({"timeline": 3, "stop_lsn": lsn(45)}, path, latest=False)
    assert not on_timeline_path(f.metas["B3"], timeline_path(repo, C, 1), latest=False)
    # 'current' (no path): everything
    assert on_timeline_path(f.metas["A1"], None)


@pytest.mark.parametrize("abandoned_newest", [False, True])
def test_latest_never_picks_a_backup_of_an_abandoned_branch(repo, abandoned_newest):
    branched(repo, abandoned_newest)
    assert choose_backup(repo, C, parse_target("latest"))["backup_id"] == "B4"
    assert choose_backup(repo, C, parse_target("immediate"))["backup_id"] == "B4"


def test_time_target_skips_the_abandoned_backup(repo):
    branched(repo)
    # A1 ended 12 days ago, on TL1 past the switch; the target lies after it, before B3
    target = parse_target("time", (NOW - 9 * DAY).isoformat())
    assert choose_backup(repo, C, target)["backup_id"] == "B2"
    # on timeline 1 (the abandoned branch, asked for explicitly) A1 is the right one
    t1 = parse_target("time", (NOW - 9 * DAY).isoformat(), timeline="1")
    assert choose_backup(repo, C, t1)["backup_id"] == "A1"
    assert choose_backup(repo, C, parse_target("latest", timeline="1"))["backup_id"] == "A1"
    # 'current': the backup's own timeline, every backup eligible (the old behaviour)
    assert choose_backup(repo, C, parse_target("time", (NOW - 9 * DAY).isoformat(),
                                               timeline="current"))["backup_id"] == "A1"


def test_explicit_abandoned_backup_is_refused_with_the_fix(repo):
    branched(repo)
    with pytest.raises(RestoreError, match=r"backup A1 \(timeline 1.*abandoned branch.*target timeline to 1"):
        choose_backup(repo, C, parse_target("latest"), "A1")
    # the same backup on its own timeline is fine
    assert choose_backup(repo, C, parse_target("latest", timeline="1"), "A1")["backup_id"] == "A1"


def test_plan_restore_names_the_backup_on_the_path(repo):
    branched(repo, abandoned_newest=True)
    plan = plan_restore(repo, C, parse_target("latest"))
    assert plan["backup_id"] == "B4"


def test_missing_history_of_an_asked_timeline_is_a_clear_error(repo):
    f = Fake(repo)
    f.backup("B1", 2, NOW - 2 * DAY)
    f.wal(1, range(1, 5))
    with pytest.raises(RestoreError, match=r"00000002\.history is not in the archive.*'current'"):
        choose_backup(repo, C, parse_target("latest", timeline="2"))
    # 'latest' with no history file at all: timeline 1, as PostgreSQL would do
    assert choose_backup(repo, C, parse_target("latest"))["backup_id"] == "B1"


def test_no_backup_on_the_path(repo):
    only_abandoned(repo)
    with pytest.raises(RestoreError, match=r"no backup of 'main' lies on the history.*timeline 1 up to 0/14000000"):
        choose_backup(repo, C, parse_target("latest"))
    # on its own timeline it is restorable
    assert choose_backup(repo, C, parse_target("latest", timeline="1"))["backup_id"] == "A1"
