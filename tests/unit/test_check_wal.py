"""check_continuity on fake archives: a backup whose WAL (start .. stop segment) is not archived
fails the check when it is the newest backup's (the archive ends before its stop: no gap, yet no
point-in-time recovery from it), and is only reported for an older backup."""

from __future__ import annotations

import pytest

from airflow_pg_incremental.core.capture import check_continuity
from airflow_pg_incremental.core.wal import WalGap

from .fakes import DAY, NOW, C, Fake, new_repo


@pytest.fixture
def repo(tmp_path):
    return new_repo(tmp_path / "repo")


def test_backup_wal_must_reach_the_newest_backups_stop(repo, caplog):
    f = Fake(repo)
    f.backup("20261120T000000Z-F", 2, NOW - 9 * DAY)  # its WAL (segment 2) was never archived
    f.backup("20261125T000000Z-F", 12, NOW - 4 * DAY)
    f.wal(1, range(10, 15))
    rep = check_continuity(repo, C)
    assert rep["ok"] and rep["problems"] == []
    [old] = rep["backups_without_wal"]
    assert old["backup_id"] == "20261120T000000Z-F" and old["missing"] == ["000000010000000000000002"]
    assert old["fails"] is False and "WAL of the older backup 20261120T000000Z-F is not all archived" in caplog.text

    f.backup("20261128T000000Z-I", 20, NOW - 1 * DAY, kind="incremental", parent="20261125T000000Z-F")
    rep = check_continuity(repo, C, fail_on_gap=False)
    assert not rep["ok"] and rep["gaps"] == rep["gaps_before_newest_backup"]  # no gap after the newest start
    [problem] = rep["problems"]
    assert problem.startswith("backup 20261128T000000Z-I's WAL (000000010000000000000014 .. "
                              "000000010000000000000014, timeline 1) is not all in the archive: its stop segment "
                              "000000010000000000000014 is not archived (1 missing)")
    assert f"pgincr capture --cluster {C}" in problem
    with pytest.raises(WalGap, match="20261128T000000Z-I"):
        check_continuity(repo, C)
    f.wal(1, range(15, 21))
    assert check_continuity(repo, C)["ok"]
