"""The backup-age check of the hourly DAG: stale or missing backups fail the task (an alert)."""

from __future__ import annotations

import datetime as dt

import pytest
from airflow.sdk.exceptions import AirflowFailException

from airflow_pg_incremental.callbacks import record_failure
from airflow_pg_incremental.operators.verify import PgBackupFreshnessOperator

from .fakes import Fake, new_repo


def _op(repo, hours=24):
    return PgBackupFreshnessOperator(task_id="backup_fresh", cluster="main", repository=str(repo.root),
                                     max_age_hours=hours)


def test_fresh_stale_and_missing(tmp_path):
    repo = new_repo(tmp_path / "repo")
    now = dt.datetime.now(dt.timezone.utc)
    f = Fake(repo)
    f.wal(1, [1])
    with pytest.raises(AirflowFailException, match="no complete backup"):
        _op(repo).execute({})
    f.backup("20261101T000000Z-F", 10, now - dt.timedelta(days=10))
    with pytest.raises(AirflowFailException, match=r"finished 240\.\d h ago, more than 24 h \(max_backup_age_hours\)"):
        _op(repo).execute({})
    f.backup("20261120T000000Z-I", 20, now - dt.timedelta(hours=2), kind="incremental", parent="20261101T000000Z-F")
    out = _op(repo).execute({})
    assert out["backup_id"] == "20261120T000000Z-I" and not out["stale"] and 7000 < out["age_s"] < 7400


def test_a_stale_backup_is_alerted_as_such(monkeypatch):
    seen = []
    monkeypatch.setattr("airflow_pg_incremental.callbacks.log.error", lambda *a: seen.append(a))

    class TI:
        task_id, dag_id, run_id = "backup_fresh", "pgincr_main_hourly_wal", "r1"

    record_failure("main", None)({"ti": TI(), "exception": "too old"})
    assert seen and seen[0][1] == "backup_stale"
