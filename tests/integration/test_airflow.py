"""Real Airflow runs: provider registration, DAG parsing, dag.test() of the weekly DAG on both
repository kinds, XCom shape, catalog rows with Airflow ids, and no password anywhere."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import zstandard

from tests.restore_evidence import restored_fingerprint

pytestmark = pytest.mark.integration


def _xcoms(dag_id: str, run_id: str) -> dict:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as s:
        rows = s.scalars(XComModel.get_many(run_id=run_id, dag_ids=dag_id)).all()
        return {(r.task_id, r.key): XComModel.deserialize_value(r) for r in rows}


def _dags():
    from airflow_pg_incremental.dag_factory import dags_from_config_file

    return dags_from_config_file(os.environ["PGINCR_CONFIG"])


def test_provider_is_registered(airflow_db):
    r = subprocess.run([sys.executable, "-m", "airflow", "providers", "list", "-o", "json"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    providers = {p["package_name"]: p for p in json.loads(r.stdout[r.stdout.index("["):])}
    assert "airflow-pg-incremental" in providers
    assert providers["airflow-pg-incremental"]["version"] == "0.1.0"


def test_dag_file_parses_every_cluster(airflow_clusters):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
    assert bag.import_errors == {}
    assert {"pgincr_it_local_weekly_full", "pgincr_it_s3_weekly_full"} <= set(bag.dag_ids)
    dag = bag.get_dag("pgincr_it_local_weekly_full")
    assert [t.task_id for t in dag.topological_sort()] == ["preflight", "full_backup", "wal_switch", "wal_capture",
                                                           "wal_archived", "verify"]
    assert {"pgincr_it_local_daily_incremental", "pgincr_it_local_retention", "pgincr_it_local_restore_test",
            "pgincr_it_local_restore_test_on_backup", "pgincr_restore"} <= set(bag.dag_ids)
    hourly = bag.get_dag("pgincr_it_local_hourly_wal")
    assert [t.task_id for t in hourly.topological_sort()] == ["wal_switch", "wal_capture", "wal_archived",
                                                              "wal_continuity", "wal_fresh", "backup_fresh"]


@pytest.mark.parametrize("cluster", ["it_local", "it_s3"])
def test_weekly_dag_runs_and_records(airflow_clusters, pg, s3, cluster, scratch):
    from airflow_pg_incremental.core.catalog import Catalog
    from airflow_pg_incremental.core.metadata import list_backups
    from airflow_pg_incremental.core.repository import LocalRepository, S3Repository
    from airflow_pg_incremental.core.restore import restore_backup
    from airflow_pg_incremental.sandbox import data_fingerprint

    dag = _dags()[f"pgincr_{cluster}_weekly_full"]
    before = data_fingerprint(pg.superuser())
    dr = dag.test()
    assert dr.state == "success"
    x = _xcoms(dag.dag_id, dr.run_id)
    out = x[("full_backup", "return_value")]
    # the backup is reported complete only once its WAL is archived
    assert x[("wal_archived", "return_value")]["segment"] == out["stop_wal_file"]
    assert out["status"] == "complete" and out["kind"] == "full" and out["backup_id"]
    assert out["raw_bytes"] > out["stored_bytes"] > 0 and out["stop_lsn"]
    assert len(json.dumps(out)) < 2000  # a small dict
    assert pg.password not in json.dumps({str(k): v for k, v in x.items()}, default=str)

    repo = (LocalRepository(airflow_clusters["local_repo"]) if cluster == "it_local"
            else S3Repository(s3.client(), s3.bucket, "airflow"))
    assert out["backup_id"] in [b["backup_id"] for b in list_backups(repo, cluster)]
    rows = [r for r in Catalog(pg.conninfo("pgincr_catalog"), "af_catalog").backups(cluster)
            if r["backup_id"] == out["backup_id"]]
    assert rows and rows[0]["status"] == "complete"
    assert rows[0]["dag_id"] == dag.dag_id and rows[0]["run_id"] == dr.run_id and rows[0]["task_id"] == "full_backup"

    # what Airflow backed up restores to the same data
    restore_backup(repo, cluster, out["backup_id"], scratch / "d", os_user=pg.os_user)
    assert restored_fingerprint(scratch / "d", pg.os_user) == before


def test_failing_backup_fails_the_task(airflow_clusters, pg, monkeypatch):
    """A wrong password: the run fails (not silently green), the error names the fix."""
    conn = json.loads(os.environ["AIRFLOW_CONN_PGINCR_IT_PG"])
    conn["password"] = "definitely-wrong"
    monkeypatch.setenv("AIRFLOW_CONN_PGINCR_IT_PG", json.dumps(conn))
    dag = _dags()["pgincr_it_local_weekly_full"]
    dr = dag.test()
    assert dr.state == "failed"
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert states["preflight"] == "failed" and states["full_backup"] in ("upstream_failed", None)
    # alerting: the configured notifier was called, and the alert is in the catalog
    calls = [json.loads(line) for line in airflow_clusters["notified"].read_text().splitlines()]
    assert any(c["task_id"] == "preflight" and "authentication failed" in c["exception"] for c in calls)
    from airflow_pg_incremental.core.catalog import Catalog

    alerts = Catalog(pg.conninfo("pgincr_catalog"), "af_catalog").alerts("it_local")
    assert any(a["task_id"] == "preflight" and a["kind"] == "task_failed" for a in alerts)
    assert "definitely-wrong" not in airflow_clusters["notified"].read_text()


def test_password_appears_nowhere(airflow_clusters, pg, s3, workdir, capfd, caplog):
    """After the Airflow runs above: no task log, XCom, catalog row or repository object holds it."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    from airflow_pg_incremental.core.pgconn import query
    from airflow_pg_incremental.core.repository import LocalRepository, S3Repository

    import logging

    caplog.set_level(logging.DEBUG)
    for dag_id in ("pgincr_it_local_weekly_full", "pgincr_it_s3_weekly_full"):
        assert _dags()[dag_id].test().state == "success"
    secret = pg.password.encode()
    hits = []
    out, err = capfd.readouterr()
    task_log = out + err + caplog.text
    assert "full backup" in task_log and "pg_basebackup" in task_log  # we really see the task's log
    if pg.password in task_log:
        hits.append("task log output")
    # Airflow task logs and everything else the Airflow home holds except its metadata DB
    # (where the test's own connection env var is not stored either)
    for p in (workdir / "airflow").rglob("*"):
        if p.is_file() and p.suffix != ".db" and secret in p.read_bytes():
            hits.append(str(p))
    with create_session() as s:
        for r in s.query(XComModel).all():
            if secret in json.dumps(XComModel.deserialize_value(r), default=str).encode():
                hits.append(f"xcom {r.dag_id}.{r.task_id}")
    rows = query(pg.conninfo("pgincr_catalog"), "SELECT t::text FROM af_catalog.backups t")
    hits += [f"catalog row {r[0][:40]}" for r in rows if pg.password in r[0]]
    assert rows
    for repo in (LocalRepository(airflow_clusters["local_repo"]), S3Repository(s3.client(), s3.bucket, "airflow")):
        keys = repo.list("")
        assert keys
        for k in keys:
            data = repo.get_bytes(k)
            if k.endswith(".zst"):
                data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
            if secret in data:
                hits.append(f"{repo.url}/{k}")
    assert hits == []


@pytest.mark.parametrize("cluster", ["it_local", "it_s3"])
def test_hourly_wal_dag(airflow_clusters, pg, cluster):
    """switch -> pull capture -> archived -> continuity -> RPO freshness, on real servers."""
    dags = _dags()
    assert dags[f"pgincr_{cluster}_weekly_full"].test().state == "success"  # a backup for continuity to start at
    pg.pgbench_run(200)
    dag = dags[f"pgincr_{cluster}_hourly_wal"]
    dr = dag.test()
    assert dr.state == "success"
    x = _xcoms(dag.dag_id, dr.run_id)
    switch, cap = x[("wal_switch", "return_value")], x[("wal_capture", "return_value")]
    assert cap["segments"] >= 1 and cap["last_segment"] >= switch["segment"]
    assert x[("wal_archived", "return_value")]["segment"] == switch["segment"]
    cont = x[("wal_continuity", "return_value")]
    assert cont["ok"] is True and cont["problems"] == []
    assert x[("wal_fresh", "return_value")]["age_s"] < 600


def test_daily_incremental_dag(airflow_clusters, pg):
    """weekly full, then the daily DAG takes a block-level incremental on it and waits for its WAL."""
    dags = _dags()
    assert dags["pgincr_it_local_weekly_full"].test().state == "success"
    pg.pgbench_run(200)
    dag = dags["pgincr_it_local_daily_incremental"]
    dr = dag.test()
    assert dr.state == "success"
    x = _xcoms(dag.dag_id, dr.run_id)
    out = x[("incremental_backup", "return_value")]
    assert out["kind"] == "incremental" and out["parent_id"] and out["plan"]["reason"] is None
    assert x[("wal_archived", "return_value")]["segment"] == x[("wal_switch", "return_value")]["segment"]


def test_restore_test_dag_backfilled_over_past_intervals(airflow_clusters, pg):
    """Runs for three past intervals: each restores to its interval end and finds exactly the
    markers committed before it (recorded in the catalog with the measured restore time)."""
    import datetime as dt
    import time as _time

    from airflow_pg_incremental.core.catalog import Catalog

    dags = _dags()
    assert dags["pgincr_it_local_weekly_full"].test().state == "success"
    pg.psql("DELETE FROM it_markers")
    ends = []
    for i in range(1, 4):
        pg.psql(f"INSERT INTO it_markers VALUES ({i}, clock_timestamp())")
        _time.sleep(0.3)
        ends.append(dt.datetime.now(dt.timezone.utc))
        _time.sleep(0.3)
    pg.psql("INSERT INTO it_markers VALUES (4, clock_timestamp())")  # the last interval end lies before a commit
    assert dags["pgincr_it_local_hourly_wal"].test().state == "success"
    dag = dags["pgincr_it_local_restore_test"]
    cat = Catalog(pg.conninfo("pgincr_catalog"), "af_catalog")
    for i, end in enumerate(ends, start=1):
        dr = dag.test(logical_date=end)
        assert dr.state == "success"
        out = _xcoms(dag.dag_id, dr.run_id)[("restore_test", "return_value")]
        assert out["ok"] and out["target_kind"] == "time" and out["scratch_removed"]
        assert out["target_value"].startswith(end.isoformat()[:19])
        rec = [r for r in cat.restore_tests("it_local") if r["run_id"] == dr.run_id][0]
        assert rec["ok"] and rec["restore_seconds"] > 0
        count = [c for c in rec["checks"] if "it_markers" in c["sql"]][0]["rows"]
        assert count == [[str(i)]], (i, rec)
        assert any("amcheck" in c["sql"] and c["ok"] for c in rec["checks"])
    metrics = cat.metrics("it_local")
    assert metrics["last_restore_test_ok"] is True and metrics["last_rto_seconds"] > 0


def test_on_demand_restore_dag(airflow_clusters, pg, scratch, workdir):
    dags = _dags()
    assert dags["pgincr_it_local_weekly_full"].test().state == "success"
    assert dags["pgincr_it_local_hourly_wal"].test().state == "success"
    dag = dags["pgincr_restore"]
    base = {"cluster": "it_local", "target_type": "latest", "target_value": "", "action": "promote"}
    # dry run: plan only
    dr = dag.test(run_conf={**base, "destination": str(scratch / "dry"), "dry_run": True})
    assert dr.state == "success"
    plan = _xcoms(dag.dag_id, dr.run_id)[("restore_it_local", "return_value")]
    assert plan["dry_run"] and plan["chain"] and plan["wal_from"] and plan["wal_to"]
    assert not (scratch / "dry").exists()
    # the dry run names the WAL the target needs (an LSN: its own segment), and the whole window
    from airflow_pg_incremental.core.catalog import Catalog
    from airflow_pg_incremental.core.metadata import list_backups
    from airflow_pg_incremental.core.repository import LocalRepository

    backups = list_backups(LocalRepository(airflow_clusters["local_repo"]), "it_local")
    newest = backups[-1]
    dr = dag.test(run_conf={**base, "target_type": "lsn", "target_value": newest["stop_lsn"], "dry_run": True})
    plan = _xcoms(dag.dag_id, dr.run_id)[("restore_it_local", "return_value")]
    assert plan["wal_to"] == newest["stop_wal_file"] and plan["wal_to_is"] == "exact", plan
    assert f"the end of the oldest backup {backups[0]['backup_id']}" in plan["window"], plan["window"]
    # a time after the archive is refused quoting the whole window, not one backup's
    dr = dag.test(run_conf={**base, "target_type": "time", "target_value": "2999-01-01T00:00:00+00:00",
                            "destination": str(scratch / "late"), "dry_run": False})
    assert dr.state == "failed" and not (scratch / "late").exists()
    cat = Catalog(pg.conninfo("pgincr_catalog"), schema="af_catalog")
    refused = cat.restores("it_local", limit=1)[0]
    assert not refused["ok"] and "refused" in refused["error"] and backups[0]["backup_id"] in refused["error"]
    alert = cat.alerts("it_local", limit=1)[0]  # alerted like any failed task
    assert alert["dag_id"] == "pgincr_restore" and "2999-01-01" in alert["message"]
    # the form's default case: latest, dry run, nothing typed (nullable fields left empty)
    dr = dag.test(run_conf={"cluster": "it_local", "target_type": "latest", "target_value": None,
                            "destination": None, "dry_run": True})
    assert dr.state == "success"
    assert _xcoms(dag.dag_id, dr.run_id)[("restore_it_local", "return_value")]["destination"] is None
    # ... but a real restore needs its destination
    assert dag.test(run_conf={**base, "destination": None, "dry_run": False}).state == "failed"
    # bad input: each refused, nothing touched
    busy = scratch / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    for conf in ({**base, "destination": str(busy), "dry_run": False},
                 {**base, "target_type": "time", "target_value": "2001-01-01T00:00:00+00:00",
                  "destination": str(scratch / "t"), "dry_run": False},
                 {**base, "target_type": "time", "target_value": "yesterday", "destination": str(scratch / "t"),
                  "dry_run": False},
                 {**base, "target_type": "backup", "target_value": "20000101T000000Z-F",
                  "destination": str(scratch / "t"), "dry_run": False},
                 {**base, "destination": "relative/dir", "dry_run": False},
                 {**base, "destination": str(workdir / "pg18" / "data" / "inside"), "dry_run": False}):
        assert dag.test(run_conf=conf).state == "failed", conf
    assert [p.name for p in busy.iterdir()] == ["x"] and not (scratch / "t").exists()
    with pytest.raises(Exception):  # the params form refuses an unknown cluster before any task runs
        dag.test(run_conf={**base, "cluster": "nope", "destination": str(scratch / "u")})
    # the real thing
    dr = dag.test(run_conf={**base, "destination": str(scratch / "real"), "dry_run": False})
    assert dr.state == "success"
    out = _xcoms(dag.dag_id, dr.run_id)[("restore_it_local", "return_value")]
    assert out["state"] == "promoted" and (scratch / "real" / "PG_VERSION").exists()
    row = cat.restores("it_local", limit=1)[0]
    assert row["ok"] and row["destination"] == str(scratch / "real") and row["run_id"] == dr.run_id
    assert row["backup_id"] == out["backup_id"] and row["timings"]["replay"] >= 0


def test_retention_dag_plans_then_applies(airflow_clusters, pg):
    dags = _dags()
    assert dags["pgincr_it_local_weekly_full"].test().state == "success"
    dag = dags["pgincr_it_local_retention"]
    dr = dag.test()
    assert dr.state == "success"
    x = _xcoms(dag.dag_id, dr.run_id)
    assert ("plan", "return_value") in x and ("apply", "return_value") in x


def test_restore_test_on_backup_dag(airflow_clusters, pg):
    """The Asset-triggered restore test: a run without a data interval tests the end of the archive."""
    dags = _dags()
    dag = dags["pgincr_it_local_restore_test_on_backup"]
    assert "pgincr_it_local_backups" in repr(dag.timetable.asset_condition)
    weekly = dags["pgincr_it_local_weekly_full"].test()
    assert weekly.state == "success"  # emits the Asset event, with what was verified
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as s:
        ev = s.query(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id).filter(
            AssetModel.name == "pgincr_it_local_backups", AssetEvent.source_run_id == weekly.run_id).one()
        extra = dict(ev.extra)
    full = _xcoms(weekly.dag_id, weekly.run_id)[("full_backup", "return_value")]
    assert extra["backup_id"] == full["backup_id"] and extra["kind"] == "full" and extra["chain"] == [full["backup_id"]]
    assert extra["stop_lsn"] == full["stop_lsn"] and extra["verified"] == [full["backup_id"]]
    assert extra["stored_bytes"] == full["stored_bytes"] and extra["timeline"] == full["timeline"]
    dr = dag.test()
    assert dr.state == "success"
    out = _xcoms(dag.dag_id, dr.run_id)[("restore_test", "return_value")]
    assert out["ok"] and out["scratch_removed"]
    # the checks' results are in the XCom (and the log), not only 'ok'
    marks = [c for c in out["checks"] if "it_markers" in c["sql"]]
    assert marks and marks[0]["ok"] and marks[0]["result"].isdigit(), out["checks"]


def test_missing_repository_fails_the_preflight_until_created(airflow_clusters, pg, s3):
    """A repository is never created by accident: the weekly DAG's preflight fails on a location
    without one (the alert names the fix); with create_repository the preflight creates it."""
    import uuid
    from pathlib import Path

    from airflow_pg_incremental.core.catalog import Catalog
    from airflow_pg_incremental.core.repository import S3Repository

    prefix = "newrepo-" + uuid.uuid4().hex[:6]
    cfg_path = Path(os.environ["PGINCR_CONFIG"])
    cfg = json.loads(cfg_path.read_text())
    entry = {"name": "it_newrepo", "postgres_conn_id": "pgincr_it_pg", "repository": f"s3://{s3.bucket}/{prefix}",
             "aws_conn_id": "pgincr_it_s3", "slot_name": "pgincr_it_newrepo"}
    cfg["clusters"] = [c for c in cfg["clusters"] if c["name"] != "it_newrepo"] + [entry]
    cfg_path.write_text(json.dumps(cfg))
    try:
        dr = _dags()["pgincr_it_newrepo_weekly_full"].test()
        assert dr.state == "failed"
        states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
        assert states["preflight"] == "failed" and states["full_backup"] != "success"
        repo = S3Repository(s3.client(), s3.bucket, prefix)
        assert not repo.is_repository() and repo.list("") == []
        alerts = Catalog(pg.conninfo("pgincr_catalog"), schema="af_catalog").alerts("it_newrepo")
        assert alerts and "pgincr repo-create" in alerts[0]["message"] and "create_repository" in alerts[0]["message"]

        entry["create_repository"] = True
        cfg["clusters"][-1] = entry
        cfg_path.write_text(json.dumps(cfg))
        dr = _dags()["pgincr_it_newrepo_weekly_full"].test()
        assert dr.state == "success"
        assert repo.is_repository() and _xcoms(dr.dag_id, dr.run_id)[("preflight", "return_value")][
            "repository_created"] is True
    finally:
        cfg["clusters"] = [c for c in cfg["clusters"] if c["name"] != "it_newrepo"]
        cfg_path.write_text(json.dumps(cfg))
        pg.psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = 'pgincr_it_newrepo'")
