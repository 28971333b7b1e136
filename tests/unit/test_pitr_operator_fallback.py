"""The restore-test operator tests 'latest' when the run's interval end lies beyond the archive:
decided by the dedicated exception the window check raises, not by the wording of its message."""

from __future__ import annotations

import pytest

from airflow_pg_incremental.core.errors import RestoreError, TargetBeyondArchive
from airflow_pg_incremental.operators.restore import PgRestoreTestOperator


def _run(monkeypatch, error):
    import airflow_pg_incremental.core.pitr as pitr
    import airflow_pg_incremental.core.restoretest as rt

    seen = {}

    def plan(repo, cluster, target, backup_id=None):
        if error is not None:
            raise error
        return {}

    def restore_test(repo, cluster, target, **kw):
        seen["target"] = target
        return {"ok": True, "cluster": cluster, "target_kind": target.kind}

    monkeypatch.setattr(pitr, "plan_restore", plan)
    monkeypatch.setattr(rt, "run_restore_test", restore_test)
    op = PgRestoreTestOperator(task_id="rt", cluster="main", repository="/nowhere",
                               target_time="2026-11-25T13:00:00+00:00")
    monkeypatch.setattr(op, "_repo", lambda: None)
    monkeypatch.setattr(op, "_catalog", lambda: None)
    monkeypatch.setattr(op, "_airflow_ids", lambda context: {})
    out = op.execute({})
    return seen["target"], out


def test_beyond_the_archive_tests_latest_whatever_the_wording(monkeypatch):
    target, out = _run(monkeypatch, TargetBeyondArchive("the interval end is past the last archived commit"))
    assert target.kind == "latest" and "is not archived yet" in out["note"]


def test_other_window_errors_fail_the_task(monkeypatch):
    with pytest.raises(RestoreError, match="before the oldest"):
        _run(monkeypatch, RestoreError("target lies before the oldest backup's end; outside the recoverable window"))


def test_inside_the_window_tests_the_interval_end(monkeypatch):
    target, out = _run(monkeypatch, None)
    assert target.kind == "time" and out["note"] is None
