"""The Backups view's rendering: whatever the catalog holds is escaped, links to DAG runs are
encoded, failures look like failures, the README's raw HTML is not passed through."""

from __future__ import annotations

import datetime as dt

from airflow_pg_incremental.plugins.catalog_view import ClusterFacts, recoverable_ranges
from airflow_pg_incremental.plugins.docs_page import render_markdown
from airflow_pg_incremental.plugins.fmt import dag_run_href
from airflow_pg_incremental.plugins.page import ClusterEntry, Page, render_page

NOW = dt.datetime(2026, 11, 25, 12, tzinfo=dt.timezone.utc)
EVIL = '<script>alert(1)</script>"\'&'


def _t(minutes: float) -> dt.datetime:
    return NOW - dt.timedelta(minutes=minutes)


def _backup(bid, kind, parent, status, start, stop, started, **kw) -> dict:
    return {"cluster": "c", "backup_id": bid, "kind": kind, "parent_id": parent, "chain_root_id": "F1",
            "status": status, "start_lsn": start, "stop_lsn": stop, "timeline": 1, "started_at": _t(started),
            "finished_at": _t(started - 1) if status != "running" else None, "duration_s": 60, "raw_bytes": 10,
            "stored_bytes": 5, "error": None, "dag_id": None, "run_id": None, "task_id": None, **kw}


def _facts() -> ClusterFacts:
    f = ClusterFacts("c")
    f.backups = [_backup("F1", "full", None, "complete", "0/1000028", "0/1000100", 60,
                         dag_id="pgincr_c_weekly_full", run_id="manual__2026-11-25T11:00:00.123+00:00"),
                 _backup("I1", "incremental", "F1", "failed", "0/3000028", None, 40, error=EVIL),
                 _backup("I2", "incremental", "F1", "running", "0/4000028", None, 5, run_id=EVIL, dag_id=EVIL)]
    f.verifications = {"F1": {"ok": False, "started_at": _t(50)}}
    f.last_verification = {"backup_id": "F1", "ok": False, "started_at": _t(50)}
    f.restore_tests = [{"id": 1, "ok": False, "target_kind": "time", "target_value": EVIL, "backup_id": "F1",
                        "started_at": _t(30), "restore_seconds": 12.5, "reached_lsn": None, "stopped_at": None,
                        "error": EVIL, "dag_id": None, "run_id": None}]
    f.alerts = [{"kind": "backup_failed", "message": EVIL, "dag_id": EVIL, "task_id": None, "created_at": _t(39)}]
    f.wal = {"segments": 3, "newest_archived_at": _t(20), "oldest_archived_at": _t(61),
             "newest_end_lsn": "0/5000000", "stored_bytes": 100, "stored_bytes_in_range": 100}
    f.wal_hourly = [{"at": _t(20), "stored_bytes": 100}]
    f.window = {"window_start_time": _t(59), "window_end_lsn": "0/5000000", "newest_archived_at": _t(20), "gaps": 0}
    return f


def test_catalog_text_is_escaped_and_failures_show():
    html = render_page(Page(entries=[ClusterEntry("c", 10, 192, "cat / s", facts=_facts())], now=NOW,
                            since=NOW - dt.timedelta(days=14), days=14, airflow_root="/af", mount="/af/pgincr",
                            nonce="n0", detail=["c"]))
    assert "<script>alert" not in html and html.count("<script") == 1  # only the page's own, with its nonce
    assert '<script nonce="n0">' in html
    assert 'class="backup full complete verified-failed"' in html
    assert 'class="backup incr failed"' in html and 'class="backup incr running"' in html
    assert 'class="rt-mark failed"' in html and "RTO 12.5 s" in html
    assert "newest WAL older than the RPO of 10 min" in html and "last restore test failed" in html
    assert 'href="/af/dags/pgincr_c_weekly_full/runs/manual__2026-11-25T11%3A00%3A00.123%2B00%3A00"' in html


def test_recoverable_range_needs_the_backups_own_wal():
    f = _facts()
    assert recoverable_ranges(f, NOW) == [(_t(59), _t(20))]  # from the full's end to the newest WAL
    f.wal_gaps = [{"timeline": 1, "from_lsn": "0/1000000", "to_lsn": "0/2000000", "before_at": _t(58),
                   "after_at": _t(57)}]  # the full's own WAL is missing
    assert recoverable_ranges(f, NOW) == []


def test_dag_run_href_encodes():
    assert dag_run_href("", "d", "a/b c") == "/dags/d/runs/a%2Fb%20c"
    assert dag_run_href("", "d", None) is None


def test_readme_markdown_raw_html_is_escaped_and_images_served_by_the_plugin():
    html, toc = render_markdown("# T\n\n## A `code` title\n\n<img src=x onerror=alert(1)>\n\n"
                                "![view](docs/backups-view.png) [x](javascript:alert(1))\n", "/pgincr/docs")
    assert "<img src=x" not in html and "&lt;img src=x" in html
    assert '<img src="/pgincr/docs/backups-view.png" alt="view"' in html
    assert 'href="javascript' not in html
    assert toc == [(2, "a-code-title", "A code title")]


def test_a_cluster_is_shown_to_who_may_read_its_dag_runs():
    from airflow_pg_incremental.dag_factory import parse_config
    from airflow_pg_incremental.plugins.app import visible_clusters

    clusters = parse_config({"clusters": [{"name": n, "postgres_conn_id": "p", "repository": "/r"}
                                          for n in ("a", "a_b", "c")]})

    class OnlyRunsOf:
        def __init__(self, *dag_ids):
            self.dag_ids, self.asked = set(dag_ids), []

        def is_authorized_dag(self, *, method, access_entity, details, user):
            self.asked.append((method, access_entity.value, user))
            return details.id in self.dag_ids

    am = OnlyRunsOf("pgincr_a_b_restore_test", "pgincr_c_hourly_wal")
    assert [c.name for c in visible_clusters(am, "u", clusters)] == ["a_b", "c"]  # not "a": no prefix match
    assert set(am.asked) == {("GET", "RUN", "u")}
    assert visible_clusters(OnlyRunsOf(), "u", clusters) == []
