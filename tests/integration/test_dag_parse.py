"""DAG files parse fast and do no I/O at parse time (a fleet of 20 clusters in one config file)."""

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


def test_twenty_clusters_parse_fast_without_io(tmp_path):
    from tests.conftest import REPO_ROOT

    clusters = [{"name": f"db{i:02d}", "postgres_conn_id": f"pg_db{i:02d}",
                 "repository": f"s3://backups/fleet/db{i:02d}", "aws_conn_id": "aws_backups"} for i in range(20)]
    cfg = tmp_path / "fleet.json"
    cfg.write_text(json.dumps({"defaults": {"catalog_conn_id": "pgincr_catalog"}, "clusters": clusters}))
    r = subprocess.run([sys.executable, "-c", PARSE, str(REPO_ROOT / "dags" / "pgincr_dags.py")],
                       capture_output=True, text=True, env={**__import__("os").environ, "PGINCR_CONFIG": str(cfg)})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    per_cluster = {"weekly_full", "daily_incremental", "hourly_wal", "restore_test", "restore_test_on_backup"}
    assert len(out["dags"]) == 20 * len(per_cluster) + 1  # + the on-demand restore DAG (no retention configured)
    assert "pgincr_db07_daily_incremental" in out["dags"] and "pgincr_restore" in out["dags"]
    print(f"parsed {len(out['dags'])} DAGs of 20 clusters in {out['seconds']:.2f} s")
    assert out["seconds"] < 5.0
