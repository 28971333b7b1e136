"""Backups taken from a streaming standby (PostgreSQL 18 primary + hot standby on 127.0.0.1): the
primary checkpoints first so the backup starts now, full and incremental restore exactly, PITR
replays the primary's archive, and a wrong primary is refused before anything is written."""

from __future__ import annotations

import logging
import uuid

import pytest

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.capture import capture_wal_pull, switch_wal
from airflow_pg_incremental.core.errors import ConfigError
from airflow_pg_incremental.core.incremental import take_planned_backup
from airflow_pg_incremental.core.lsn import parse_lsn
from airflow_pg_incremental.core.metadata import find_incomplete, list_backups
from airflow_pg_incremental.core.pitr import parse_target, restore_pitr
from airflow_pg_incremental.core.repository import LocalRepository
from airflow_pg_incremental.core.restore import restore_backup, start_restored
from airflow_pg_incremental.sandbox import SandboxPostgres, SandboxStandby, data_fingerprint
from tests.conftest import created

pytestmark = pytest.mark.integration

CL = "sb"


@pytest.fixture(scope="module")
def pair(workdir):
    primary = SandboxPostgres(workdir / f"sb-primary-{uuid.uuid4().hex[:4]}").start()
    standby = None
    try:
        primary.pgbench_init(1)
        standby = SandboxStandby(primary, workdir / f"sb-standby-{uuid.uuid4().hex[:4]}").start()
        standby.wait_replayed()
        repo = created(LocalRepository(workdir / f"sb-repo-{uuid.uuid4().hex[:6]}"))
        c = {"primary": primary, "standby": standby, "repo": repo, "fp": {}}
        capture_wal_pull(primary.conninfo(), repo, CL)  # the archive comes from the primary
        primary.pgbench_run(300)
        standby.wait_replayed()
        c["lsn_before_full"] = primary.psql("SELECT pg_current_wal_lsn()").strip()
        c["F"] = take_full_backup(standby.conninfo(), repo, CL, primary=primary.conninfo())
        c["fp"]["F"] = data_fingerprint(primary.superuser())
        primary.pgbench_run(300)
        standby.wait_replayed()
        c["I"] = take_planned_backup(standby.conninfo(), repo, CL, kind="incremental", primary=primary.conninfo())
        c["fp"]["I"] = data_fingerprint(primary.superuser())
        primary.pgbench_run(200)
        c["fp"]["end"] = data_fingerprint(primary.superuser())
        capture_wal_pull(primary.conninfo(), repo, CL, upto_lsn=switch_wal(primary.conninfo())["lsn"])
        yield c
    finally:
        if standby is not None:
            standby.stop()
        primary.stop()


def _fingerprint(target, pg) -> dict:
    assert not (target / "standby.signal").exists()  # copied from the standby: it would stream from the primary
    srv = start_restored(target, 18, os_user=pg.os_user)
    try:
        # a restored copy, not a standby of the live primary (it was, with the backup's standby.signal)
        assert srv.psql("SELECT pg_is_in_recovery()").strip() == "f"
        assert srv.psql("SELECT count(*) FROM pg_stat_wal_receiver").strip() == "0"
        return data_fingerprint(srv.local_conninfo())
    finally:
        srv.stop()


def test_standby_backups_start_now_and_record_their_source(pair):
    f, i = pair["F"], pair["I"]
    assert f["from_standby"] is True and i["from_standby"] is True and i["kind"] == "incremental"
    assert f["source"]["port"] == pair["standby"].port and f["primary"]["port"] == pair["primary"].port
    assert "password" not in f["primary"] and "password" not in f["source"]
    # the primary's checkpoint, replayed: not the standby's first restartpoint from its creation
    assert parse_lsn(f["start_lsn"]) >= parse_lsn(pair["lsn_before_full"])
    assert parse_lsn(f["standby_catch_up"]["checkpoint_lsn"]) >= parse_lsn(f["start_lsn"])


@pytest.mark.parametrize("name", ["F", "I"])
def test_standby_backups_restore_exactly(pair, scratch, name):
    b = pair[name]
    res = restore_backup(pair["repo"], CL, b["backup_id"], scratch / "d", os_user=pair["primary"].os_user)
    assert len(res["chain"]) == (1 if name == "F" else 2)
    assert _fingerprint(scratch / "d", pair["primary"]) == pair["fp"][name]


def test_pitr_from_a_standby_backup_replays_the_primarys_archive(pair, scratch):
    rep = restore_pitr(pair["repo"], CL, parse_target("latest"), scratch / "p", os_user=pair["primary"].os_user,
                       keep_running=True)
    srv = rep.pop("server")
    try:
        assert data_fingerprint(srv.local_conninfo()) == pair["fp"]["end"]
    finally:
        srv.stop()


def test_a_wrong_primary_is_refused_before_anything_is_written(pair, pg):
    """Another cluster, or the standby itself, given as the primary: refused, nothing claimed."""
    before = list_backups(pair["repo"], CL)
    with pytest.raises(ConfigError, match="is not the primary of the standby"):
        take_full_backup(pair["standby"].conninfo(), pair["repo"], CL, primary=pg.conninfo())
    with pytest.raises(ConfigError, match="in recovery too"):
        take_full_backup(pair["standby"].conninfo(), pair["repo"], CL, primary=pair["standby"].conninfo())
    assert list_backups(pair["repo"], CL) == before and not find_incomplete(pair["repo"], CL)


def test_without_the_primary_a_standby_backup_says_where_it_starts(pair, caplog, workdir):
    repo = created(LocalRepository(workdir / f"sb-noprim-{uuid.uuid4().hex[:6]}"))
    with caplog.at_level(logging.WARNING):
        m = take_full_backup(pair["standby"].conninfo(), repo, "np")
    assert m["from_standby"] is True and m["primary"] is None
    assert any("no primary connection was given" in r.getMessage() for r in caplog.records)


def test_cli_backs_up_the_standby_with_its_primary(pair):
    """`pgincr backup --host <standby> --primary-host <primary>`: WAL from the primary's slot (pull),
    the summary says where it was taken and that the primary checkpointed first."""
    import os
    import subprocess
    import sys

    sb, pr = pair["standby"].conninfo(), pair["primary"].conninfo()
    args = ["backup", "--repo", pair["repo"].url, "--cluster", CL, "--host", sb.host, "--port", str(sb.port),
            "--user", sb.user, "--primary-host", pr.host, "--primary-port", str(pr.port), "--wal-mode", "pull",
            "--kind", "incremental"]
    env = {**os.environ, "PGPASSWORD": sb.password}
    r = subprocess.run([sys.executable, "-m", "airflow_pg_incremental.cli", *args], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert "taken from the standby; the primary" in r.stdout and "checkpointed at" in r.stdout
    assert sb.password not in r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-m", "airflow_pg_incremental.cli", *args, "--json"], capture_output=True,
                       text=True, env=env)
    out = __import__("json").loads(r.stdout)
    assert out["from_standby"] is True and out["primary"]["port"] == pr.port and out["standby_catch_up"]
    without_primary = args[:args.index("--primary-host")]
    bad = subprocess.run([sys.executable, "-m", "airflow_pg_incremental.cli", *without_primary, "--primary-port", "5",
                          "--wal-mode", "none"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "--primary-port needs --primary-host" in bad.stderr


@pytest.fixture
def standby_cluster(airflow_clusters, pair, workdir, monkeypatch):
    """A cluster it_sb in the DAG configuration: postgres_conn_id the standby, primary_conn_id the
    primary, a fresh local repository."""
    import json
    import os
    from pathlib import Path

    from tests.conftest import conn_json

    monkeypatch.setenv("AIRFLOW_CONN_PGINCR_SB_STANDBY", conn_json(pair["standby"].conninfo()))
    monkeypatch.setenv("AIRFLOW_CONN_PGINCR_SB_PRIMARY", conn_json(pair["primary"].conninfo()))
    root = workdir / f"af-sb-{uuid.uuid4().hex[:6]}"
    repo = created(LocalRepository(root))
    cfg_path = Path(os.environ["PGINCR_CONFIG"])
    cfg = json.loads(cfg_path.read_text())
    entry = {"name": "it_sb", "postgres_conn_id": "pgincr_sb_standby", "primary_conn_id": "pgincr_sb_primary",
             "repository": str(root), "catalog_conn_id": None,
             "restore_test_checks": ["SELECT count(*) FROM pgbench_accounts"]}
    cfg["clusters"] = [c for c in cfg["clusters"] if c["name"] != "it_sb"] + [entry]
    cfg_path.write_text(json.dumps(cfg))
    try:
        yield repo
    finally:
        cfg["clusters"] = [c for c in cfg["clusters"] if c["name"] != "it_sb"]
        cfg_path.write_text(json.dumps(cfg))


@pytest.mark.slow
def test_weekly_dag_backs_up_the_standby_and_archives_from_the_primary(standby_cluster, pair, scratch):
    """The weekly DAG with postgres_conn_id a standby and primary_conn_id its primary: the preflight
    creates the slot on the primary, the full is read from the standby, the WAL is switched and
    captured on the primary, verify passes, and the backup restores to the primary's data."""
    from tests.integration.test_airflow import _dags, _xcoms

    repo, primary = standby_cluster, pair["primary"]
    weekly = _dags()["pgincr_it_sb_weekly_full"]
    assert "standby `pgincr_sb_standby`" in weekly.doc_md and "primary `pgincr_sb_primary`" in weekly.doc_md
    primary.pgbench_run(100)
    pair["standby"].wait_replayed()
    source = data_fingerprint(primary.superuser())
    dr = weekly.test()
    assert dr.state == "success"
    x = _xcoms(weekly.dag_id, dr.run_id)
    pre, full = x[("preflight", "return_value")], x[("full_backup", "return_value")]
    assert pre["from_standby"] is True and "pgincr_backup@127.0.0.1:%d" % primary.port in pre["primary"]
    assert full["from_standby"] is True and full["primary"]["port"] == primary.port and full["standby_catch_up"]
    assert x[("wal_switch", "return_value")]["segment"]  # pg_switch_wal() ran on the primary
    assert x[("verify", "return_value")]["verified"] == [full["backup_id"]]
    # the slot lives on the primary, not on the standby
    assert primary.psql("SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgincr_it_sb'").strip() == "1"
    assert pair["standby"].psql("SELECT count(*) FROM pg_replication_slots").strip() == "0"
    restore_backup(repo, "it_sb", full["backup_id"], scratch / "d", os_user=primary.os_user)
    assert _fingerprint(scratch / "d", primary) == source
    primary.psql("SELECT pg_drop_replication_slot('pgincr_it_sb')")


def test_preflight_refuses_a_standby_without_its_primary(pair, workdir):
    from airflow_pg_incremental.core.preflight import preflight_full

    repo = created(LocalRepository(workdir / f"sb-pre-{uuid.uuid4().hex[:6]}"))
    with pytest.raises(ConfigError, match="primary_conn_id"):
        preflight_full(pair["standby"].conninfo(), repo, "pre", slot="pgincr_pre")
    assert pair["standby"].psql("SELECT count(*) FROM pg_replication_slots").strip() == "0"
