"""The weekly DAG in incremental-forever mode (full_mode: synthetic), run by Airflow on the real
PostgreSQL 18: the first run has no full to build on and falls back to a server full, saying why
in the XCom; the next one takes an incremental and combines it on the worker into a synthetic full
that is verified, announced, and restored by the restore-test DAG; the synthetic full restores to
exactly the source."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest

from tests.conftest import created
from tests.restore_evidence import restored_fingerprint
from tests.integration.test_airflow import _dags, _xcoms

pytestmark = pytest.mark.integration

CL = "it_syn"


@pytest.fixture
def syn_cluster(airflow_clusters, pg, workdir):
    """A cluster it_syn with full_mode synthetic and a fresh local repository, in the DAG config."""
    from airflow_pg_incremental.core.repository import LocalRepository

    root = workdir / f"af-syn-{uuid.uuid4().hex[:6]}"
    repo = created(LocalRepository(root))
    cfg_path = Path(os.environ["PGINCR_CONFIG"])
    cfg = json.loads(cfg_path.read_text())
    entry = {"name": CL, "postgres_conn_id": "pgincr_it_pg", "repository": str(root), "full_mode": "synthetic",
             "slot_name": "pgincr_it_syn", "restore_test_checks": ["SELECT count(*) FROM it_markers"]}
    cfg["clusters"] = [c for c in cfg["clusters"] if c["name"] != CL] + [entry]
    cfg_path.write_text(json.dumps(cfg))
    try:
        yield repo
    finally:
        cfg["clusters"] = [c for c in cfg["clusters"] if c["name"] != CL]
        cfg_path.write_text(json.dumps(cfg))
        pg.psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = 'pgincr_it_syn'")


@pytest.mark.slow
def test_weekly_synthetic_full_falls_back_then_synthesizes_and_restores(syn_cluster, pg, scratch):
    from airflow_pg_incremental.core.metadata import list_backups
    from airflow_pg_incremental.core.restore import restore_backup
    from airflow_pg_incremental.sandbox import data_fingerprint

    repo = syn_cluster
    dags = _dags()
    weekly = dags[f"pgincr_{CL}_weekly_full"]
    assert [t.task_id for t in weekly.topological_sort()] == [
        "preflight", "incremental_backup", "synthetic_full", "wal_switch", "wal_capture", "wal_archived", "verify"]
    assert "full_mode `synthetic`" in weekly.doc_md and "fallback_reason" in weekly.doc_md

    # 1. no full yet: the incremental planner takes a server full; the synthetic step says why
    dr = weekly.test()
    assert dr.state == "success"
    x = _xcoms(weekly.dag_id, dr.run_id)
    first = x[("synthetic_full", "return_value")]
    assert first["full_mode"] == "server" and first["kind"] == "full"
    assert "no full backup to build on yet" in first["fallback_reason"], first
    assert first["backup_id"] == x[("incremental_backup", "return_value")]["backup_id"]
    assert first["restore_chain"] == first["parent_chain"] == [first["backup_id"]]
    assert x[("verify", "return_value")]["verified"] == [first["backup_id"]]
    assert [b["kind"] for b in list_backups(repo, CL)] == ["full"]  # one full, not two

    # 2. the next weekly run: an incremental, combined on the worker into a synthetic full
    pg.pgbench_run(200)
    pg.psql("DELETE FROM it_markers; INSERT INTO it_markers VALUES (1, clock_timestamp()), (2, clock_timestamp())")
    source = data_fingerprint(pg.superuser())
    dr = weekly.test()
    assert dr.state == "success"
    x = _xcoms(weekly.dag_id, dr.run_id)
    inc, syn = x[("incremental_backup", "return_value")], x[("synthetic_full", "return_value")]
    assert inc["kind"] == "incremental" and inc["parent_id"] == first["backup_id"]
    assert syn["full_mode"] == "synthetic" and syn["fallback_reason"] is None and syn["kind"] == "synthetic"
    assert syn["stands_for"] == inc["backup_id"] and syn["built_from"] == [first["backup_id"], inc["backup_id"]]
    assert syn["restore_chain"] == [syn["backup_id"]]
    assert syn["parent_chain"] == [first["backup_id"], inc["backup_id"]]
    assert syn["stop_wal_file"] == inc["stop_wal_file"]
    assert x[("wal_archived", "return_value")]["segment"] == inc["stop_wal_file"]
    assert syn["backup_id"] in x[("verify", "return_value")]["verified"]
    assert len(json.dumps(syn)) < 3000
    assert [b["kind"] for b in list_backups(repo, CL)] == ["full", "incremental", "synthetic"]

    # 3. the restore test (started by the verified backup's Asset event) restores the synthetic full
    rt = dags[f"pgincr_{CL}_restore_test_on_backup"]
    dr = rt.test()
    assert dr.state == "success"
    out = _xcoms(rt.dag_id, dr.run_id)[("restore_test", "return_value")]
    assert out["ok"] and out["scratch_removed"] and out["chain"] == [syn["backup_id"]], out
    marks = [c for c in out["checks"] if "it_markers" in c["sql"]][0]
    assert marks["ok"] and marks["result"] == "2", out["checks"]

    # and alone it is the source as it was at the incremental it stands for
    restore_backup(repo, CL, syn["backup_id"], scratch / "d", os_user=pg.os_user)
    assert restored_fingerprint(scratch / "d", pg.os_user) == source


class _TI:
    dag_id, run_id, task_id, try_number = "d", "r", "synthetic_full", 1

    def __init__(self, xcom):
        self.xcom = xcom

    def xcom_pull(self, task_ids=None):
        return self.xcom


def test_operator_falls_back_to_a_server_full_saying_why(pg, workdir, monkeypatch):
    """A chain that cannot be combined (a broken link; no incremental taken, as on PostgreSQL < 17):
    the operator takes a server full and returns why; without incremental_task_id (the CLI's and a
    standalone task's way) the broken chain is an error instead."""
    from airflow_pg_incremental.core.backup import take_full_backup
    from airflow_pg_incremental.core.errors import RestoreError
    from airflow_pg_incremental.core.incremental import take_planned_backup
    from airflow_pg_incremental.core.metadata import backup_prefix, list_backups
    from airflow_pg_incremental.core.repository import LocalRepository
    from airflow_pg_incremental.operators.backup import PgSyntheticFullOperator
    from tests.conftest import conn_json

    monkeypatch.setenv("AIRFLOW_CONN_PGINCR_SYN_PG", conn_json(pg.conninfo()))
    root = workdir / f"op-syn-{uuid.uuid4().hex[:6]}"
    repo = created(LocalRepository(root))
    full = take_full_backup(pg.conninfo(), repo, "opsyn")
    pg.pgbench_run(50)
    i1 = take_planned_backup(pg.conninfo(), repo, "opsyn")
    pg.pgbench_run(50)
    i2 = take_planned_backup(pg.conninfo(), repo, "opsyn")
    repo.delete(f"{backup_prefix('opsyn', i1['backup_id'])}/backup.json")  # the chain is broken at i1

    def op(**kw):
        return PgSyntheticFullOperator(task_id="synthetic_full", cluster="opsyn", postgres_conn_id="pgincr_syn_pg",
                                       repository=str(root), **kw)

    with pytest.raises(RestoreError, match="broken"):
        op(upto=i2["backup_id"]).execute({"ti": _TI(None)})
    assert [b["backup_id"] for b in list_backups(repo, "opsyn")] == [full["backup_id"], i2["backup_id"]]

    out = op(incremental_task_id="incremental_backup").execute({"ti": _TI({"kind": "incremental",
                                                                           "backup_id": i2["backup_id"]})})
    assert out["full_mode"] == "server" and out["kind"] == "full" and out["status"] == "complete"
    assert f"chain of {i2['backup_id']} cannot be combined" in out["fallback_reason"]
    assert f"broken at {i1['backup_id']}" in out["fallback_reason"]
    assert out["restore_chain"] == out["parent_chain"] == [out["backup_id"]] and out["stop_wal_file"]

    why = "PostgreSQL 16 has no block-level incremental backup (17+)"
    out2 = op(incremental_task_id="incremental_backup").execute({"ti": _TI({"kind": "none", "backup_id": None,
                                                                            "reason": why})})
    assert out2["full_mode"] == "server" and out2["kind"] == "full" and why in out2["fallback_reason"]
    assert out2["backup_id"] not in (out["backup_id"], full["backup_id"])
    assert [b["kind"] for b in list_backups(repo, "opsyn")] == ["full", "incremental", "full", "full"]
