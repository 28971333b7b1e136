"""DAG files parse fast and do no I/O at parse time (a fleet of 200 clusters in one config file)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration

PARSE = r"""
import json, runpy, socket, sys, time
import airflow.sdk  # what every DAG file pays anyway; measured separately below
def no_network(*a, **k):
    raise AssertionError("network I/O at DAG parse time")
socket.socket.connect = no_network
socket.create_connection = no_network
t0 = time.perf_counter()
ns = runpy.run_path(sys.argv[1])
t1 = time.perf_counter()
dags = {k: v for k, v in ns.items() if type(v).__name__ == "DAG"}
print(json.dumps({"seconds": t1 - t0, "dags": sorted(dags)}))
"""


def test_a_fleet_of_200_clusters_parses_fast_without_io(tmp_path):
    from tests.conftest import REPO_ROOT

    clusters = [{"name": f"db{i:03d}", "postgres_conn_id": f"pg_db{i:03d}",
                 "repository": f"s3://backups/fleet/db{i:03d}", "aws_conn_id": "aws_backups",
                 "backup_pool": f"repo_{i % 4}"} for i in range(200)]
    cfg = tmp_path / "fleet.json"
    cfg.write_text(json.dumps({"defaults": {"catalog_conn_id": "pgincr_catalog"}, "clusters": clusters}))
    r = subprocess.run([sys.executable, "-c", PARSE, str(REPO_ROOT / "dags" / "pgincr_dags.py")],
                       capture_output=True, text=True, env={**__import__("os").environ, "PGINCR_CONFIG": str(cfg)})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    per_cluster = {"weekly_full", "daily_incremental", "hourly_wal", "restore_test", "restore_test_on_backup"}
    assert len(out["dags"]) == 200 * len(per_cluster) + 1  # + the on-demand restore DAG (no retention configured)
    assert "pgincr_db007_daily_incremental" in out["dags"] and "pgincr_restore" in out["dags"]
    print(f"parsed {len(out['dags'])} DAGs of 200 clusters in {out['seconds']:.2f} s")
    assert out["seconds"] < 15.0  # measured about 1.2 s on 2 cores (Airflow's import timeout is 30 s)


def test_every_dag_doc_lists_its_own_tasks_in_order_and_the_configuration():
    """Each DAG's doc is generated from the task list that was built and the cluster's
    configuration, so it cannot drift from what runs."""
    from airflow_pg_incremental.dag_factory import _task_doc, build_dags, load_config
    from tests.conftest import REPO_ROOT

    clusters = load_config(REPO_ROOT / "dags" / "pgincr_clusters.yaml")
    dags = build_dags(clusters)
    assert len(dags) >= 7
    for dag_id, dag in dags.items():
        order = [t.task_id for t in dag.topological_sort()]
        listed = [line.split("`")[1] for line in dag.doc_md.splitlines() if line[:1].isdigit() and "`" in line]
        assert listed == order, (dag_id, listed, order)
        assert all(_task_doc(t) for t in order), (dag_id, order)  # every task has its sentence
        if dag_id != "pgincr_restore":
            cl = clusters[0]
            assert f"repository `{cl.repository}`" in dag.doc_md and f"RPO {cl.rpo_minutes:g} min" in dag.doc_md
            assert all(f"`{v}`" in dag.doc_md for v in cl.schedules.values())
            assert f"full_mode `{cl.full_mode}`" in dag.doc_md  # how the weekly full is made


def test_restore_tasks_run_where_their_cluster_says():
    """restore_queue / restore_pool route a cluster's restore-test and on-demand restore tasks to the
    workers meant for them; backup_pool bounds the heavy backup and capture tasks."""
    from airflow_pg_incremental.dag_factory import build_dags, parse_config

    dags = build_dags(parse_config({"clusters": [
        {"name": "a", "postgres_conn_id": "pg_a", "repository": "/srv/a", "restore_queue": "restore_hosts",
         "restore_pool": "restores", "backup_pool": "repo_a"},
        {"name": "b", "postgres_conn_id": "pg_b", "repository": "/srv/b"}]}))
    assert {(t.task_id, t.queue, t.pool) for t in dags["pgincr_a_restore_test"].tasks} == {
        ("restore_test", "restore_hosts", "restores")}
    tasks = {t.task_id: t for t in dags["pgincr_restore"].tasks}
    assert (tasks["restore_a"].queue, tasks["restore_a"].pool) == ("restore_hosts", "restores")
    assert tasks["restore_b"].pool == "default_pool" and tasks["restore_b"].queue != "restore_hosts"
    assert {t.task_id for t in dags["pgincr_a_weekly_full"].tasks if t.pool == "repo_a"} == {"full_backup",
                                                                                              "wal_capture"}
    assert "queue `restore_hosts`" in dags["pgincr_restore"].doc_md


def test_restore_form_defaults_are_valid_and_every_field_is_titled():
    """The default case (latest, dry run) can be triggered: optional fields are nullable, not
    empty required strings; every field has a title; enums have display names."""
    from airflow.sdk.definitions.param import ParamsDict

    from airflow_pg_incremental.dag_factory import TARGET_TYPES, restore_form

    form = restore_form(["main", "other"])
    resolved = ParamsDict(form).validate()  # what the trigger form submits when nothing is typed
    assert resolved["target_type"] == "latest" and resolved["target_value"] is None and resolved["dry_run"] is True
    assert resolved["destination"] is None
    for name, p in form.items():
        assert p.schema.get("title"), name
        assert not p.schema.get("section"), name  # 3.3 collapses sections: the fields would be hidden
    assert form["target_type"].schema["values_display"] == TARGET_TYPES
    assert "null" in form["target_value"].schema["type"] and "null" in form["destination"].schema["type"]
    assert "2026-11-21T10:15:00+01:00" in form["target_value"].schema["description_md"]
