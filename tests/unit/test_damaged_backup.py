"""A backup whose backup.json cannot be read is never silently replaced by an older one: 'latest'
(restore, verify) and point-in-time targets it may serve refuse, naming it and the --backup-id
that restores without it; an interrupted backup (no backup.json) is not damaged."""

from __future__ import annotations

import datetime as dt

import pytest

from airflow_pg_incremental.core import metadata as md
from airflow_pg_incremental.core.errors import BackupNotFound, ChecksumMismatch
from airflow_pg_incremental.core.pitr import choose_backup, parse_target

from .fakes import DAY, NOW, C, Fake, lsn, new_repo

F1, F2, D3 = "20261126T000000Z-F", "20261127T000000Z-F", "20261128T000000Z-I"


@pytest.fixture
def repo(tmp_path):
    return new_repo(tmp_path / "repo")


def _damage(repo, bid):
    key = f"{md.backup_prefix(C, bid)}/{md.META_NAME}"
    repo.put_bytes(key, repo.get_bytes(key).replace(b'"kind"', b'"kinD"'))
    return key


def three(repo) -> Fake:
    """F1 and F2 (fulls), D3 (an incremental whose backup.json is damaged), WAL for all."""
    f = Fake(repo)
    f.backup(F1, 2, NOW - 3 * DAY + dt.timedelta(minutes=5))
    f.backup(F2, 10, NOW - 2 * DAY + dt.timedelta(minutes=5))
    f.backup(D3, 20, NOW - 1 * DAY + dt.timedelta(minutes=5), kind="incremental", parent=F2)
    f.wal(1, range(2, 30))
    _damage(repo, D3)
    return f


def test_backup_id_time():
    assert md.backup_id_time("20261121T124048Z-F") == dt.datetime(2026, 11, 21, 12, 40, 48, tzinfo=dt.timezone.utc)
    assert md.backup_id_time("20261121T124048Z.002-I") == md.backup_id_time("20261121T124048Z-F")
    assert md.backup_id_time("B1") is None and md.backup_id_time("20261399T999999Z-F") is None


def test_latest_refuses_a_damaged_newest_backup(repo):
    three(repo)
    assert [b["backup_id"] for b in md.list_backups(repo, C)] == [F1, F2]  # listings skip it, as before
    assert md.damaged_backups(repo, C)[0][0] == D3
    for bid in ("latest", None):
        with pytest.raises(md.DamagedBackup) as e:
            md.resolve_backup(repo, C, bid)
        msg = str(e.value)
        assert f"backup {D3} of cluster 'main' cannot be read" in msg and "metadata checksum mismatch" in msg
        assert f"--backup-id {F2}" in msg and (e.value.backup_id, e.value.fallback_id) == (D3, F2)
        assert isinstance(e.value, ChecksumMismatch)
    assert md.resolve_backup(repo, C, F2)["backup_id"] == F2  # the way out
    # an interrupted backup (no backup.json, its in-progress marker) is not damaged
    repo.put_bytes(f"{md.backup_prefix(C, '20261129T000000Z-F')}/{md.INPROGRESS_NAME}", b"{}")
    with pytest.raises(md.DamagedBackup, match=D3):
        md.resolve_backup(repo, C, "latest")


def test_a_damaged_older_backup_or_an_interrupted_newer_one_do_not_matter(repo):
    f = Fake(repo)
    f.backup(F1, 2, NOW - 3 * DAY)
    f.backup(F2, 10, NOW - 2 * DAY)
    _damage(repo, F1)
    repo.put_bytes(f"{md.backup_prefix(C, D3)}/{md.INPROGRESS_NAME}", b"{}")
    assert md.resolve_backup(repo, C, "latest")["backup_id"] == F2
    assert choose_backup(repo, C, parse_target("latest"))["backup_id"] == F2


def test_only_damaged_backups(repo):
    f = Fake(repo)
    f.backup(F1, 2, NOW - 3 * DAY)
    _damage(repo, F1)
    with pytest.raises(md.DamagedBackup, match=f"backup {F1} of cluster 'main' cannot be read .* no other complete"):
        md.resolve_backup(repo, C, "latest")
    repo.delete_prefix(md.backup_prefix(C, F1))
    with pytest.raises(BackupNotFound, match="no complete backup"):
        md.resolve_backup(repo, C, "latest")


def test_point_in_time_targets_refuse_when_the_damaged_backup_may_serve_them(repo):
    three(repo)
    for kind in ("latest", "immediate"):
        with pytest.raises(md.DamagedBackup, match=f"backup {D3} .* --backup-id {F2}"):
            choose_backup(repo, C, parse_target(kind))
    # a time before the damaged backup started: it cannot serve it, F2 is right
    before = (NOW - 1 * DAY - dt.timedelta(hours=1)).isoformat()
    assert choose_backup(repo, C, parse_target("time", before))["backup_id"] == F2
    # at or after its start (its id's time): it might
    for t in (NOW - 1 * DAY, NOW - 1 * DAY + dt.timedelta(hours=3)):
        with pytest.raises(md.DamagedBackup, match=f"--backup-id {F2}") as e:
            choose_backup(repo, C, parse_target("time", t.isoformat()))
        assert "target time" in str(e.value)
    # a position that the damaged backup's unknown stop may lie before: refused
    with pytest.raises(md.DamagedBackup, match=f"--backup-id {F2}"):
        choose_backup(repo, C, parse_target("lsn", lsn(25)))
    # an older target: the damaged backup is newer than the chosen one, and its stop unknown: refused too
    with pytest.raises(md.DamagedBackup, match=f"--backup-id {F1}"):
        choose_backup(repo, C, parse_target("lsn", lsn(5)))
    # naming the backup is the way out
    assert choose_backup(repo, C, parse_target("latest"), F2)["backup_id"] == F2
    assert choose_backup(repo, C, parse_target("lsn", lsn(25)), F2)["backup_id"] == F2
