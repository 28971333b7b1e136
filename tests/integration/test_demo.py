"""The README's main command: `pgincr demo` (through Airflow), on both repository kinds."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("flags", [[], ["--s3"]], ids=["local", "s3"])
def test_demo_passes(flags, tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith(("AIRFLOW", "PGINCR"))}
    r = subprocess.run([sys.executable, "-m", "airflow_pg_incremental.cli", "demo", *flags], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "restored == source at backup time: YES" in r.stdout
    assert "found in logs/repository/restored copies: nowhere" in r.stdout
    assert "PITR restored == source at the target time: YES" in r.stdout
    assert "continuous: yes" in r.stdout
    assert "restored == source at the incremental: YES" in r.stdout
    assert "data as at the target: YES" in r.stdout and "2 of 2 backups verified" in r.stdout
    assert "(dry run)" in r.stdout
    assert "RESULT: PASS" in r.stdout
    assert "pgincr_demo_weekly_full" in r.stdout  # it went through Airflow
