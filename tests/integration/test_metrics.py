"""Metrics reach a real StatsD listener (UDP on 127.0.0.1) from real DAG runs (`airflow dags test`
with `[metrics] statsd_on`): backup sizes and duration, WAL capture, RPO and backup age, verify,
restore-test RTO and outcome."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _received(sock: socket.socket) -> dict[str, float]:
    sock.settimeout(1.0)
    out: dict[str, float] = {}
    try:
        while True:
            for line in sock.recv(65535).decode(errors="replace").splitlines():
                name, _, rest = line.partition(":")
                value, _, kind = rest.partition("|")
                if kind.startswith("g"):
                    out[name] = float(value)
    except socket.timeout:
        return out


def test_metrics_reach_a_real_statsd_listener(airflow_clusters, pg):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    env = {**os.environ, "AIRFLOW__METRICS__STATSD_ON": "True", "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
           "AIRFLOW__METRICS__STATSD_PORT": str(sock.getsockname()[1]), "AIRFLOW__METRICS__STATSD_PREFIX": "airflow"}
    got: dict[str, float] = {}
    try:
        for dag_id in ("pgincr_it_local_weekly_full", "pgincr_it_local_hourly_wal",
                       "pgincr_it_local_restore_test_on_backup"):
            r = subprocess.run([sys.executable, "-m", "airflow", "dags", "test", dag_id], env=env, capture_output=True,
                               text=True, timeout=600)
            assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
            got.update(_received(sock))
    finally:
        sock.close()
    ours = {k.removeprefix("airflow.pgincr.it_local."): v for k, v in got.items()
            if k.startswith("airflow.pgincr.it_local.")}
    for name in ("backup.raw_bytes", "backup.stored_bytes", "backup.duration_seconds", "wal.segments_captured",
                 "wal.lag_bytes", "wal.slot_retained_bytes", "wal.archive_age_seconds", "rpo.breached",
                 "backup.age_seconds", "backup.stale", "verify.ok", "restore_test.rto_seconds", "restore_test.ok"):
        assert name in ours, (name, sorted(ours))
    assert ours["backup.raw_bytes"] > ours["backup.stored_bytes"] > 0
    assert ours["verify.ok"] == 1 and ours["restore_test.ok"] == 1 and ours["rpo.breached"] == 0
    assert ours["backup.stale"] == 0 and 0 <= ours["backup.age_seconds"] < 3600
