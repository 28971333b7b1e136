import datetime as dt
import json

import pytest

from airflow_pg_incremental import cli
from airflow_pg_incremental.core import metadata as md
from tests.unit.fakes import new_repo


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    for v in ("PGINCR_REPO", "PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD"):
        monkeypatch.delenv(v, raising=False)


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_restore_args():
    a = parse("restore", "--cluster", "c", "--target-dir", "/x")
    assert a.command == "restore" and a.cluster == "c" and a.target_dir == "/x"
    assert a.backup_id == "latest" and a.repo is None
    assert a.no_verify is False and a.start is False and a.check is None and a.port is None and a.os_user is None
    assert a.func is cli.cmd_restore


def test_restore_all_args():
    a = parse("-v", "restore", "--repo", "s3://b/p", "--cluster", "c", "--target-dir", "/x", "--backup-id", "B1",
              "--no-verify", "--check", "SELECT 1", "--check", "SELECT 2", "--port", "5999", "--os-user", "pg")
    assert a.verbose and a.repo == "s3://b/p" and a.backup_id == "B1" and a.no_verify
    assert a.check == ["SELECT 1", "SELECT 2"] and a.port == 5999 and a.os_user == "pg"


def test_backup_args():
    a = parse("backup", "--cluster", "main", "--repo", "/r", "--host", "h", "--port", "5433", "--user", "u",
              "--dbname", "d", "--level", "19", "--threads", "2", "--catalog-db", "cat")
    assert (a.cluster, a.repo, a.host, a.port, a.user, a.dbname) == ("main", "/r", "h", 5433, "u", "d")
    assert a.level == 19 and a.threads == 2 and a.catalog_db == "cat" and a.catalog_schema == "pgincr"
    assert a.func is cli.cmd_backup
    d = parse("backup", "--cluster", "main")
    assert d.level == 3 and d.threads is None and d.compression == "auto" and d.port is None  # threads: the cores


def test_info_cleanup_demo_args():
    a = parse("info")
    assert a.cluster is None and a.json is False and a.func is cli.cmd_info
    a = parse("cleanup", "--cluster", "c", "--older-than-hours", "1.5", "--dry-run")
    assert a.older_than_hours == 1.5 and a.dry_run and a.func is cli.cmd_cleanup
    assert parse("cleanup", "--cluster", "c").older_than_hours == 6.0
    a = parse("demo", "--s3", "--scale", "3", "--no-airflow")
    assert a.s3 and a.scale == 3 and a.no_airflow and not a.keep
    assert parse("catalog-rebuild", "--catalog-db", "x").func is cli.cmd_catalog_rebuild


@pytest.mark.parametrize("argv", [
    [], ["restore", "--cluster", "c"], ["restore", "--target-dir", "/x"], ["backup"], ["cleanup"],
    ["backup", "--cluster", "c", "--password", "secret"], ["nope"], ["backup", "--cluster", "c", "--port", "x"],
])
def test_bad_args_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        parse(*argv)
    assert ei.value.code == 2


def test_main_info_without_repo(capsys):
    assert cli.main(["info"]) == 2
    err = capsys.readouterr().err
    assert "pgincr: error:" in err and "PGINCR_REPO" in err


def test_main_relative_repo(capsys):
    assert cli.main(["info", "--repo", "relative/dir"]) == 2
    assert "must be absolute" in capsys.readouterr().err


def _backup(repo, bid, started):
    meta = {"format": 1, "cluster": "main", "backup_id": bid, "kind": "full", "parent_id": None,
            "status": "complete", "started_at": md.iso(started), "finished_at": md.iso(started),
            "duration_s": 1.5, "start_lsn": "0/3000028", "stop_lsn": "0/3000100", "timeline": 1, "pg_major": 18,
            "raw_bytes": 2 * 1024 * 1024, "stored_bytes": 1024, "system_identifier": "7000"}
    md.write_meta(repo, meta)


def test_main_info_json(tmp_path, capsys):
    repo = new_repo(tmp_path)
    t = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.timezone.utc)
    _backup(repo, "20261121T120000Z-F", t)
    repo.put_bytes("main/backups/20261122T120000Z-F/in_progress.json",
                   json.dumps({"started_at": md.iso(t)}).encode())
    assert cli.main(["info", "--repo", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["repository"] == f"file://{tmp_path}"
    c = out["clusters"]["main"]
    assert [b["backup_id"] for b in c["backups"]] == ["20261121T120000Z-F"]
    assert c["backups"][0]["stop_lsn"] == "0/3000100"
    assert c["incomplete"] == ["20261122T120000Z-F"]


def test_main_info_text(tmp_path, monkeypatch, capsys):
    repo = new_repo(tmp_path)
    _backup(repo, "20261121T120000Z-F", dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.timezone.utc))
    monkeypatch.setenv("PGINCR_REPO", str(tmp_path))
    assert cli.main(["info", "--cluster", "main"]) == 0
    out = capsys.readouterr().out
    assert "cluster main: 1 backup(s)" in out and "20261121T120000Z-F" in out and "2.0 MiB" in out


def test_main_cleanup_dry_run(tmp_path, capsys):
    repo = new_repo(tmp_path)
    repo.put_bytes("main/backups/OLD/base.tar.zst", b"x")
    assert cli.main(["cleanup", "--repo", str(tmp_path), "--cluster", "main", "--dry-run", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {"cluster": "main", "dry_run": True, "removed": ["OLD"], "unfinished_writes": []}
    assert cli.main(["cleanup", "--repo", str(tmp_path), "--cluster", "main", "--dry-run"]) == 0
    assert "would remove the leftovers of 1 interrupted backup(s): OLD" in capsys.readouterr().out
    assert repo.exists("main/backups/OLD/base.tar.zst")
    assert cli.main(["cleanup", "--repo", str(tmp_path), "--cluster", "main"]) == 0
    assert not repo.exists("main/backups/OLD/base.tar.zst")


def test_main_restore_unknown_backup(tmp_path, capsys):
    target = tmp_path / "target"
    rc = cli.main(["restore", "--repo", str(tmp_path / "repo"), "--cluster", "main", "--target-dir", str(target),
                   "--os-user", "nobody"])
    assert rc == 2
    assert "no pgincr repository" in capsys.readouterr().err
    repo = new_repo(tmp_path / "repo")
    rc = cli.main(["restore", "--repo", str(tmp_path / "repo"), "--cluster", "main", "--target-dir", str(target),
                   "--os-user", "nobody"])
    assert rc == 2
    assert "cluster 'main' does not exist" in capsys.readouterr().err
    repo.put_bytes("main/wal/00000001/000000010000000000000001.zst", b"x")
    rc = cli.main(["restore", "--repo", str(tmp_path / "repo"), "--cluster", "main", "--target-dir", str(target),
                   "--os-user", "nobody"])
    assert rc == 2
    assert "no complete backup" in capsys.readouterr().err
    assert not target.exists()


def test_main_bad_cluster_name(tmp_path, capsys):
    assert cli.main(["cleanup", "--repo", str(tmp_path), "--cluster", "../etc"]) == 2
    assert "cluster name" in capsys.readouterr().err
