"""Point-in-time recovery on real PostgreSQL 18, both repository kinds.

A workload writes marker rows, each in its own transaction, and records its commit time, xid and
the LSN just after its commit. Restores to targets of every kind must hold exactly the markers
committed before the target."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.capture import capture_wal_pull, switch_wal
from airflow_pg_incremental.core.errors import ConfigError, RestoreError
from airflow_pg_incremental.core.pgconn import query
from airflow_pg_incremental.core.pitr import parse_target, restore_pitr
from airflow_pg_incremental.sandbox import SandboxPostgres
from tests.conftest import fresh_repo

pytestmark = pytest.mark.integration

N = 8


class History:
    def __init__(self, pg, repo, cluster):
        self.pg, self.repo, self.cluster = pg, repo, cluster
        self.markers: list[dict] = []

    def marker(self, i: int) -> None:
        self.pg.psql(f"INSERT INTO markers VALUES ({i}, clock_timestamp())")
        xid, ts = self.pg.psql("SELECT xid, timestamp FROM pg_last_committed_xact()").strip().split("|")
        lsn = self.pg.psql("SELECT pg_current_wal_insert_lsn()").strip()
        self.markers.append({"id": i, "xid": xid, "time": dt.datetime.fromisoformat(ts), "lsn": lsn})
        time.sleep(0.02)


@pytest.fixture(scope="module", params=["local", "s3"])
def history(request, workdir, tmp_path_factory):
    pg = SandboxPostgres(workdir / f"pitr-{request.param}").start()
    repo = fresh_repo(request, "pitr")
    h = History(pg, repo, "pitr")
    try:
        capture_wal_pull(pg.conninfo(), repo, "pitr")  # creates the slot
        pg.psql("CREATE TABLE markers (id int PRIMARY KEY, at timestamptz)")
        h.backup = take_full_backup(pg.conninfo(), repo, "pitr")
        for i in range(1, N + 1):
            h.marker(i)
            if i == 5:
                h.rp = switch_wal(pg.conninfo(), restore_point="after_m5", repo=repo, cluster="pitr")
        sw = switch_wal(pg.conninfo())
        h.capture = capture_wal_pull(pg.conninfo(), repo, "pitr", upto_lsn=sw["lsn"])
        yield h
    finally:
        pg.stop()


def _restore(h, scratch, target, **kw):
    rep = restore_pitr(h.repo, h.cluster, target, scratch / "data", os_user=h.pg.os_user, keep_running=True, **kw)
    srv = rep.pop("server", None)
    try:
        ids = None
        if srv is not None:
            ids = query(srv.local_conninfo(), "SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM markers")[0][0]
            assert query(srv.local_conninfo(), "SHOW archive_mode")[0][0] == "off"
        return rep, ids
    finally:
        if srv is not None:
            srv.stop()


def _between(a: dt.datetime, b: dt.datetime) -> str:
    return (a + (b - a) / 2).isoformat()


def test_capture_has_every_marker_segment(history):
    assert history.capture["segments"] >= 1 and history.capture["lag_bytes"] == 0


@pytest.mark.parametrize("case", ["time-between", "time-inclusive", "time-exclusive", "lsn", "xid-inclusive",
                                  "xid-exclusive", "name", "latest"])
def test_restore_to_target(history, scratch, case):
    m = history.markers
    kind, value, inclusive, expect = {
        "time-between": ("time", _between(m[2]["time"], m[3]["time"]), True, 3),
        "time-inclusive": ("time", m[3]["time"].isoformat(), True, 4),
        "time-exclusive": ("time", m[3]["time"].isoformat(), False, 3),
        "lsn": ("lsn", m[1]["lsn"], True, 2),
        "xid-inclusive": ("xid", m[5]["xid"], True, 6),
        "xid-exclusive": ("xid", m[5]["xid"], False, 5),
        "name": ("name", "after_m5", True, 5),
        "latest": ("latest", None, True, N),
    }[case]
    rep, ids = _restore(history, scratch, parse_target(kind, value, inclusive=inclusive))
    assert ids == list(range(1, expect + 1)), rep
    assert rep["state"] == "promoted" and rep["backup_id"] == history.backup["backup_id"]
    assert rep["reached_lsn"]


def test_pause_and_shutdown_actions(history, scratch):
    m = history.markers
    rep, ids = _restore(history, scratch, parse_target("xid", m[2]["xid"], action="pause"))
    assert rep["state"] == "paused at target" and ids == [1, 2, 3]
    rep, ids = _restore(history, scratch / "s", parse_target("xid", m[2]["xid"], action="shutdown"))
    assert rep["state"] == "shut down at target" and ids is None and rep["reached_lsn"]
    assert not (scratch / "s" / "data" / "postmaster.pid").exists()


def test_targets_outside_the_window_are_refused_untouched(history, scratch):
    last = history.markers[-1]["time"]
    with pytest.raises(RestoreError, match="outside the recoverable window") as e:
        restore_pitr(history.repo, "pitr", parse_target("time", (last + dt.timedelta(hours=1)).isoformat()),
                     scratch / "d", os_user=history.pg.os_user)
    assert history.backup["backup_id"] in str(e.value)
    with pytest.raises(RestoreError, match="before the oldest backup"):
        restore_pitr(history.repo, "pitr", parse_target("time", "2001-01-01T00:00:00+00:00"), scratch / "d")
    with pytest.raises(RestoreError, match="outside"):
        restore_pitr(history.repo, "pitr", parse_target("lsn", "FF/0"), scratch / "d")
    with pytest.raises(ConfigError, match="unknown restore point"):
        restore_pitr(history.repo, "pitr", parse_target("name", "never_made"), scratch / "d")
    assert not (scratch / "d").exists()


@pytest.mark.parametrize("kind,value,msg", [
    ("time", "2026-11-21 12:00:00", "no time zone"),
    ("time", "yesterday at noon", "does not parse"),
    ("lsn", "12345", "not an LSN"),
    ("lsn", "0/XYZ", "not an LSN"),
    ("xid", "-4", "not a valid xid"),
    ("name", "../x", "not allowed|separator|'..'"),
    ("epoch", "1", "unknown target type"),
])
def test_bad_targets(kind, value, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_target(kind, value)
