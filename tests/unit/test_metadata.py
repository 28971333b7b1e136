import datetime as dt
import json
import logging
import re

import pytest

from airflow_pg_incremental.core import metadata as md
from airflow_pg_incremental.core.errors import (
    BackupNotFound,
    ChecksumMismatch,
    InvalidName,
)
from tests.unit.fakes import new_repo

UTC = dt.timezone.utc
T0 = dt.datetime(2026, 11, 21, 12, 40, 48, 123456, tzinfo=UTC)


@pytest.fixture
def repo(tmp_path):
    return new_repo(tmp_path / "repo")


def _meta(cluster="main", backup_id="20261121T124048Z-F", started=T0, **extra):
    m = {"format": 1, "cluster": cluster, "backup_id": backup_id, "kind": "full", "parent_id": None,
         "status": "complete", "started_at": md.iso(started), "start_lsn": "0/3000028", "stop_lsn": "0/3000100",
         "timeline": 1, "pg_major": 18, "raw_bytes": 123, "stored_bytes": 45,
         "objects": [{"key": f"{cluster}/backups/{backup_id}/base.tar.zst", "raw_size": 123}],
         "source": {"host": "h", "port": 5432, "user": "u", "dbname": "postgres"}}
    m.update(extra)
    return m


def _complete(repo, cluster, bid, started):
    m = _meta(cluster, bid, started)
    repo.put_bytes(f"{md.backup_prefix(cluster, bid)}/base.tar.zst", b"data")
    md.write_meta(repo, m)
    return m


def _incomplete(repo, cluster, bid, started=None, objects=("base.tar.zst",)):
    prefix = md.backup_prefix(cluster, bid)
    if started is not None:
        repo.put_bytes(f"{prefix}/{md.INPROGRESS_NAME}",
                       json.dumps({"backup_id": bid, "kind": "full", "started_at": md.iso(started)}).encode())
    for o in objects:
        repo.put_bytes(f"{prefix}/{o}", b"partial")


# -- seal / unseal ---------------------------------------------------------------------------------------------
def test_seal_unseal_round_trip():
    m = _meta()
    raw = md.seal(m)
    assert "meta_sha256" not in m  # input not mutated
    out = md.unseal(raw, "k")
    assert re.fullmatch(r"[0-9a-f]{64}", out.pop("meta_sha256"))
    assert out == m
    # re-sealing an unsealed document is stable
    assert md.seal(md.unseal(raw, "k")) == raw
    # key order of the input does not matter
    assert md.seal(dict(reversed(list(m.items())))) == raw


@pytest.mark.parametrize("change", [
    lambda d: d.update(stop_lsn="0/3000101"),
    lambda d: d.update(raw_bytes=124),
    lambda d: d.update(extra="added"),
    lambda d: d.pop("kind"),
    lambda d: d["objects"][0].update(raw_size=1),
    lambda d: d.update(meta_sha256="0" * 64),
    lambda d: d.pop("meta_sha256"),
])
def test_tampered_metadata_rejected(change):
    d = json.loads(md.seal(_meta()))
    change(d)
    with pytest.raises(ChecksumMismatch, match="main/x/backup.json"):
        md.unseal(json.dumps(d).encode(), "main/x/backup.json")


@pytest.mark.parametrize("raw", [b"", b"{", b"not json", b"\xff\xfe", b'{"a": 1'])
def test_unseal_invalid_json(raw):
    with pytest.raises(ChecksumMismatch, match="not valid JSON"):
        md.unseal(raw, "k")


@pytest.mark.parametrize("raw", [b"null", b"[]", b'"text"', b"42"])
def test_unseal_non_object_json(raw):
    with pytest.raises(ChecksumMismatch):
        md.unseal(raw, "k")


def test_list_backups_skips_non_object_metadata(repo):
    _complete(repo, "main", "20261121T124048Z-F", T0)
    repo.put_bytes("main/backups/20261122T000000Z-F/backup.json", b"null")
    assert [b["backup_id"] for b in md.list_backups(repo, "main")] == ["20261121T124048Z-F"]


# -- ids ---------------------------------------------------------------------------------------------------------
def test_new_backup_id_format(repo):
    assert md.new_backup_id(repo, "main", "full", T0) == "20261121T124048Z-F"
    assert md.new_backup_id(repo, "main", "incremental", T0) == "20261121T124048Z-I"
    assert md.new_backup_id(repo, "main", "differential", T0) == "20261121T124048Z-D"
    bid = md.new_backup_id(repo, "main", "full")
    assert re.fullmatch(r"\d{8}T\d{6}Z-F", bid)
    now = dt.datetime.now(UTC)
    parsed = dt.datetime.strptime(bid[:16], "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    assert abs((now - parsed).total_seconds()) < 60


def test_new_backup_id_unique_when_taken(repo):
    repo.put_bytes("main/backups/20261121T124048Z-F/in_progress.json", b"{}")
    second = md.new_backup_id(repo, "main", "full", T0)
    assert second == "20261121T124048Z.002-F"
    repo.put_bytes(f"main/backups/{second}/in_progress.json", b"{}")
    third = md.new_backup_id(repo, "main", "full", T0)
    assert third == "20261121T124048Z.003-F"
    assert len({"20261121T124048Z-F", second, third}) == 3
    # other kinds and other clusters are not affected
    assert md.new_backup_id(repo, "main", "incremental", T0) == "20261121T124048Z-I"
    assert md.new_backup_id(repo, "other", "full", T0) == "20261121T124048Z-F"
    # still valid ids, and they sort after the first one
    for b in (second, third):
        assert md.validate_backup_id(b) == b
        assert b > "20261121T124048Z-F"


def test_new_backup_id_sorts_by_time(repo):
    a = md.new_backup_id(repo, "main", "full", T0)
    b = md.new_backup_id(repo, "main", "full", T0 + dt.timedelta(seconds=1))
    c = md.new_backup_id(repo, "main", "full", T0 + dt.timedelta(days=40))
    assert a < b < c


def test_prefixes_validate_names():
    assert md.backups_prefix("main") == "main/backups"
    assert md.backup_prefix("main", "b1") == "main/backups/b1"
    for bad in ("../x", "a/b", "", ".x"):
        with pytest.raises(InvalidName):
            md.backups_prefix(bad)
        with pytest.raises(InvalidName):
            md.backup_prefix("main", bad)


def test_iso_is_utc_with_millis():
    t = dt.datetime(2026, 1, 2, 5, 4, 5, 678901, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert md.iso(t) == "2026-01-02T03:04:05.678+00:00"
    assert dt.datetime.fromisoformat(md.iso(t)) == t.replace(microsecond=678000)


# -- listing / loading -----------------------------------------------------------------------------------------
def test_write_and_load_backup(repo):
    m = _complete(repo, "main", "20261121T124048Z-F", T0)
    assert repo.exists("main/backups/20261121T124048Z-F/backup.json")
    loaded = md.load_backup(repo, "main", "20261121T124048Z-F")
    loaded.pop("meta_sha256")
    assert loaded == m


def test_list_backups_ignores_incomplete_and_sorts(repo):
    _complete(repo, "main", "B2", T0 + dt.timedelta(hours=2))
    _complete(repo, "main", "B1", T0)
    _incomplete(repo, "main", "B3", started=T0 + dt.timedelta(hours=3))
    _incomplete(repo, "main", "B4", started=None)
    _complete(repo, "other", "X1", T0)
    assert [b["backup_id"] for b in md.list_backups(repo, "main")] == ["B1", "B2"]
    assert md.list_backup_ids(repo, "main") == ["B1", "B2", "B3", "B4"]
    assert md.list_clusters(repo) == ["main", "other"]
    assert md.list_backups(repo, "nobody") == []


def test_list_backups_skips_tampered(repo, caplog):
    _complete(repo, "main", "B1", T0)
    _complete(repo, "main", "B2", T0 + dt.timedelta(hours=1))
    key = "main/backups/B2/backup.json"
    d = json.loads(repo.get_bytes(key))
    d["stop_lsn"] = "FF/0"
    repo.put_bytes(key, json.dumps(d).encode())
    with caplog.at_level(logging.ERROR):
        assert [b["backup_id"] for b in md.list_backups(repo, "main")] == ["B1"]
    assert "B2" in caplog.text
    with pytest.raises(ChecksumMismatch):
        md.load_backup(repo, "main", "B2")


def test_load_backup_unknown_lists_known(repo):
    _complete(repo, "main", "20261121T124048Z-F", T0)
    _complete(repo, "main", "20261122T124048Z-F", T0 + dt.timedelta(days=1))
    with pytest.raises(BackupNotFound) as ei:
        md.load_backup(repo, "main", "20991231T000000Z-F")
    msg = str(ei.value)
    assert "20991231T000000Z-F" in msg and "known backups" in msg
    assert "20261121T124048Z-F" in msg and "20261122T124048Z-F" in msg
    assert isinstance(ei.value, LookupError)


def test_load_backup_unknown_without_backups(repo):
    _incomplete(repo, "main", "B9", started=T0)
    with pytest.raises(BackupNotFound, match="no complete backup"):
        md.load_backup(repo, "main", "B9")  # incomplete: not loadable


def test_load_backup_rejects_bad_id(repo):
    with pytest.raises(InvalidName):
        md.load_backup(repo, "main", "../../etc")


def test_resolve_backup(repo):
    with pytest.raises(BackupNotFound, match="no complete backup"):
        md.resolve_backup(repo, "main", "latest")
    _complete(repo, "main", "B-old", T0)
    _complete(repo, "main", "A-new", T0 + dt.timedelta(days=1))  # id sorts first, started later
    _incomplete(repo, "main", "Z-incomplete", started=T0 + dt.timedelta(days=2))
    assert md.resolve_backup(repo, "main", "latest")["backup_id"] == "A-new"
    assert md.resolve_backup(repo, "main", None)["backup_id"] == "A-new"
    assert md.resolve_backup(repo, "main", "B-old")["backup_id"] == "B-old"
    with pytest.raises(BackupNotFound):
        md.resolve_backup(repo, "main", "Z-incomplete")


# -- incomplete backups ------------------------------------------------------------------------------------------
def test_find_incomplete(repo):
    _complete(repo, "main", "B1", T0)
    _incomplete(repo, "main", "B2", started=T0)
    _incomplete(repo, "main", "B3", started=None, objects=("base.tar.zst", "backup_manifest.zst"))
    inc = {i["backup_id"]: i for i in md.find_incomplete(repo, "main")}
    assert set(inc) == {"B2", "B3"}
    assert inc["B2"]["started_at"] == md.iso(T0)
    assert inc["B2"]["objects"] == ["main/backups/B2/base.tar.zst", "main/backups/B2/in_progress.json"]
    assert inc["B3"]["started_at"] is None
    assert inc["B3"]["objects"] == ["main/backups/B3/backup_manifest.zst", "main/backups/B3/base.tar.zst"]


def test_cleanup_incomplete_respects_age_and_dry_run(repo):
    now = dt.datetime.now(UTC)
    _complete(repo, "main", "DONE", now - dt.timedelta(days=3))
    _incomplete(repo, "main", "YOUNG", started=now - dt.timedelta(minutes=5))
    _incomplete(repo, "main", "OLD", started=now - dt.timedelta(hours=7))
    _incomplete(repo, "main", "NOMARKER", started=None)
    before = repo.list("")

    assert sorted(md.cleanup_incomplete(repo, "main", dry_run=True)) == ["NOMARKER", "OLD"]
    assert repo.list("") == before

    assert sorted(md.cleanup_incomplete(repo, "main")) == ["NOMARKER", "OLD"]
    assert md.list_backup_ids(repo, "main") == ["DONE", "YOUNG"]
    assert repo.list("main/backups/OLD") == [] and repo.list("main/backups/NOMARKER") == []
    assert repo.list("main/backups/YOUNG") == ["main/backups/YOUNG/base.tar.zst",
                                               "main/backups/YOUNG/in_progress.json"]
    assert md.load_backup(repo, "main", "DONE")["backup_id"] == "DONE"

    # with a short threshold the young one goes as well; complete backups never do
    assert md.cleanup_incomplete(repo, "main", older_than_s=60) == ["YOUNG"]
    assert md.list_backup_ids(repo, "main") == ["DONE"]
    assert md.cleanup_incomplete(repo, "main", older_than_s=0) == []
    assert [b["backup_id"] for b in md.list_backups(repo, "main")] == ["DONE"]


def test_cleanup_incomplete_other_cluster_untouched(repo):
    old = dt.datetime.now(UTC) - dt.timedelta(days=1)
    _incomplete(repo, "a", "X", started=old)
    _incomplete(repo, "b", "X", started=old)
    assert md.cleanup_incomplete(repo, "a") == ["X"]
    assert md.list_backup_ids(repo, "b") == ["X"]
    assert repo.list("b") == ["b/backups/X/base.tar.zst", "b/backups/X/in_progress.json"]
