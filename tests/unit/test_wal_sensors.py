"""WAL sensors and triggers against a local repository: poke mode, deferral, trigger events
(success / timeout / error, fresh / stale / empty), serialization, argument validation, messages."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import threading
import time

import pytest
from airflow.sdk import PokeReturnValue
from airflow.sdk.exceptions import (
    AirflowException,
    AirflowFailException,
    AirflowSensorTimeout,
    TaskDeferred,
)

from airflow_pg_incremental.core.errors import ConfigError
from airflow_pg_incremental.core.wal import push_bytes, wal_key
from airflow_pg_incremental.sensors.wal import (
    WalArchivedSensor,
    WalFreshnessSensor,
    resolve_segment,
)
from airflow_pg_incremental.triggers.wal import (
    WalArchivedTrigger,
    WalFreshnessTrigger,
    check_freshness,
    format_duration,
)
from tests.unit.fakes import new_repo

SEG = 16 * 1024 * 1024
ZEROS = bytes(SEG)
CLUSTER = "main"
SEG3 = "000000010000000000000003"


@pytest.fixture
def repo(tmp_path):
    return new_repo(tmp_path / "repo")


def push(repo, name, *, age_s: float | None = None):
    push_bytes(repo, CLUSTER, name, ZEROS, segment_size=SEG)
    if age_s is not None:
        t = time.time() - age_s
        os.utime(repo.root / wal_key(CLUSTER, name), (t, t))


def first_event(trigger):
    async def go():
        gen = trigger.run()
        try:
            return await anext(gen)
        finally:
            await gen.aclose()

    return asyncio.run(go()).payload


def archived(repo, **kw):
    kw.setdefault("lsn", "0/3000028")
    return WalArchivedSensor(task_id="wal_archived", cluster=CLUSTER, repository=str(repo.root), **kw)


def freshness(repo, **kw):
    return WalFreshnessSensor(task_id="wal_fresh", cluster=CLUSTER, repository=str(repo.root), **kw)


# ---------------------------------------------------------------------------------------------
# WalArchivedSensor: arguments
@pytest.mark.parametrize("kw, expected", [
    ({"lsn": "0/3000028"}, SEG3),
    ({"lsn": "0/3FFFFFF"}, SEG3),
    ({"lsn": " '0/3000028' \n"}, SEG3),           # a rendered template with quotes / whitespace
    ({"lsn": "1/A0000010", "timeline": 2}, "0000000200000001000000A0"),
    ({"lsn": "1/A0000010", "timeline": "2"}, "0000000200000001000000A0"),   # templated timeline
    ({"segment": SEG3.lower()}, SEG3),
    ({"segment": "0000000200000001000000A0", "timeline": 7}, "0000000200000001000000A0"),
])
def test_resolve_segment(kw, expected):
    assert resolve_segment(**kw) == expected


@pytest.mark.parametrize("kw, match", [
    ({"lsn": "garbage"}, "not an LSN"),
    ({"lsn": "0/3000028/1"}, "not an LSN"),
    ({"lsn": "0/3000028", "timeline": 0}, "timeline"),
    ({"lsn": "0/3000028", "timeline": "x"}, "timeline"),
    ({"segment": "00000001000000000000003"}, "not a WAL segment name"),
    ({"segment": "00000001.history"}, "not a WAL segment name"),
    ({"lsn": "0/1", "segment": SEG3}, "exactly one"),
    ({}, "exactly one"),
])
def test_bad_arguments_fail_at_construction(repo, kw, match):
    kw.setdefault("lsn", None)
    with pytest.raises(ConfigError, match=match):
        WalArchivedSensor(task_id="w", cluster=CLUSTER, repository=str(repo.root), **kw)


def test_bad_segment_size(repo):
    with pytest.raises(ConfigError, match="power of two"):
        archived(repo, segment_size=3 * 1024 * 1024)


def test_templated_lsn_is_rendered_then_validated(repo):
    push(repo, SEG3)
    s = archived(repo, lsn="{{ backup['stop_lsn'] }}", timeline="{{ backup['timeline'] }}")
    assert {"cluster", "repository", "aws_conn_id", "lsn", "segment", "timeline"} <= set(s.template_fields)
    s.render_template_fields({"backup": {"stop_lsn": "0/3000028", "timeline": 1}})
    assert s.lsn == "0/3000028"
    assert s.poke({}).xcom_value["segment"] == SEG3


@pytest.mark.parametrize("ctx, template, match", [
    ({"backup": {"stop_lsn": "0/3000028"}}, "{{ backup }}", "dict"),           # forgot ['stop_lsn']
    ({"backup": {}}, "{{ backup.get('stop_lsn') }}", "missing"),               # XCom without the field
    ({"backup": {"stop_lsn": "nonsense"}}, "{{ backup['stop_lsn'] }}", "not an LSN"),
])
def test_templated_garbage_fails_without_retry(repo, ctx, template, match):
    s = archived(repo, lsn=template)  # not validated before rendering
    s.render_template_fields(ctx)
    with pytest.raises(AirflowFailException, match=match):
        s.poke({})


def test_native_dict_value_is_a_clear_error(repo):
    s = archived(repo, lsn="{{ x }}")
    s.lsn = {"stop_lsn": "0/3000028", "backup_id": "b1"}  # render_template_as_native_obj=True
    with pytest.raises(AirflowFailException, match=r"dict \(keys: stop_lsn, backup_id\).*\['stop_lsn'\]"):
        s.poke({})


# WalArchivedSensor: poke mode
def test_poke_false_then_true(repo):
    s = archived(repo)
    assert s.soft_fail is False and s.deferrable is False and s.mode == "poke"
    assert s.poke({}) is False
    push(repo, "000000010000000000000002")  # another segment does not count
    assert s.poke({}) is False
    push(repo, SEG3)
    r = s.poke({})
    assert isinstance(r, PokeReturnValue) and r
    assert r.xcom_value == {"segment": SEG3, "key": f"{CLUSTER}/wal/00000001/{SEG3}.zst"}


def test_poke_mode_execute_returns_xcom_dict(repo):
    push(repo, SEG3)
    assert archived(repo, poke_interval=0.1, timeout=5).execute({}) == {
        "segment": SEG3, "key": f"{CLUSTER}/wal/00000001/{SEG3}.zst"}


def test_poke_mode_timeout_names_the_segment(repo):
    s = archived(repo, poke_interval=0.1, timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(AirflowSensorTimeout, match=f"WAL segment {SEG3} .*holding LSN 0/3000028.* not archived"):
        s.execute({})
    assert time.monotonic() - t0 < 3


def test_poke_mode_waits_for_a_late_segment(repo):
    timer = threading.Timer(0.5, push, args=(repo, SEG3))
    timer.start()
    try:
        assert archived(repo, poke_interval=0.1, timeout=10).execute({})["segment"] == SEG3
    finally:
        timer.join()


# WalArchivedSensor: deferrable
def test_deferrable_returns_at_once_when_archived(repo):
    push(repo, SEG3)
    assert archived(repo, deferrable=True).execute({}) == {"segment": SEG3, "key": wal_key(CLUSTER, SEG3)}


def test_deferrable_defers_to_the_trigger(repo):
    s = archived(repo, deferrable=True, poke_interval=2, timeout=60, aws_conn_id="aws_backups")
    t0 = time.time()
    with pytest.raises(TaskDeferred) as ei:
        s.execute({})
    d = ei.value
    assert d.method_name == "execute_complete" and d.kwargs is None
    assert isinstance(d.trigger, WalArchivedTrigger)
    assert d.timeout > dt.timedelta(seconds=60)  # the scheduler's backstop comes after the trigger's own deadline
    path, kwargs = d.trigger.serialize()
    assert path == "airflow_pg_incremental.triggers.wal.WalArchivedTrigger"
    assert kwargs["segment"] == SEG3 and kwargs["cluster"] == CLUSTER and kwargs["repository"] == str(repo.root)
    assert kwargs["aws_conn_id"] == "aws_backups" and kwargs["poll_interval"] == 2 and kwargs["timeout_s"] == 60
    assert t0 + 59 <= kwargs["deadline"] <= time.time() + 61


def test_execute_complete(repo):
    s = archived(repo)
    key = wal_key(CLUSTER, SEG3)
    assert s.execute_complete({}, {"status": "success", "segment": SEG3, "key": key, "polls": 3}) == {
        "segment": SEG3, "key": key}
    with pytest.raises(AirflowSensorTimeout, match="not archived in .* within 5s"):
        s.execute_complete({}, {"status": "timeout", "segment": SEG3, "key": key,
                                "message": f"WAL segment {SEG3} of cluster 'main' was not archived in x within 5s"})
    with pytest.raises(AirflowException, match="failed: RepositoryError: boom"):
        s.execute_complete({}, {"status": "error", "message": "RepositoryError: boom"})
    with pytest.raises(AirflowException, match="without a usable event"):
        s.execute_complete({}, None)


# ---------------------------------------------------------------------------------------------
# WalArchivedTrigger
def trig(repo, **kw):
    kw.setdefault("segment", SEG3)
    kw.setdefault("poll_interval", 0.05)
    kw.setdefault("timeout_s", 10)
    return WalArchivedTrigger(cluster=CLUSTER, repository=str(repo.root), **kw)


def test_trigger_fires_at_once(repo):
    push(repo, SEG3)
    ev = first_event(trig(repo))
    assert ev == {"status": "success", "segment": SEG3, "key": wal_key(CLUSTER, SEG3), "polls": 1}


def test_trigger_polls_until_the_segment_lands(repo):
    timer = threading.Timer(0.4, push, args=(repo, SEG3))
    timer.start()
    try:
        t0 = time.monotonic()
        ev = first_event(trig(repo))
    finally:
        timer.join()
    assert ev["status"] == "success" and ev["segment"] == SEG3
    assert ev["polls"] >= 3 and time.monotonic() - t0 >= 0.4


def test_trigger_times_out(repo):
    t0 = time.monotonic()
    ev = first_event(trig(repo, timeout_s=0.3))
    took = time.monotonic() - t0
    assert ev["status"] == "timeout" and ev["segment"] == SEG3 and ev["key"] == wal_key(CLUSTER, SEG3)
    assert "not archived" in ev["message"] and ev["polls"] >= 2
    assert 0.25 <= took < 3


def test_trigger_reports_errors(tmp_path):
    ev = first_event(WalArchivedTrigger(cluster=CLUSTER, repository="relative/dir", segment=SEG3,
                                        poll_interval=0.05, timeout_s=5))
    assert ev["status"] == "error" and "must be absolute" in ev["message"]


def test_trigger_serialize_round_trip(repo):
    t = trig(repo, aws_conn_id="aws_backups")
    path, kwargs = t.serialize()
    assert path == "airflow_pg_incremental.triggers.wal.WalArchivedTrigger"
    assert json.loads(json.dumps(kwargs)) == kwargs  # plain JSON, no credentials (only ids / the repository string)
    assert set(kwargs) == {"cluster", "repository", "aws_conn_id", "poll_interval", "timeout_s", "deadline", "segment"}
    time.sleep(0.01)
    again = WalArchivedTrigger(**kwargs)  # as the triggerer rebuilds it: same absolute deadline
    assert again.serialize() == (path, kwargs)


# ---------------------------------------------------------------------------------------------
# WalFreshnessSensor / WalFreshnessTrigger
def test_format_duration():
    assert [format_duration(s) for s in (0, 59.6, 90, 900, 3600, 7380, 7399, 93600, 86400)] == [
        "0s", "1m", "1m 30s", "15m", "1h", "2h 3m", "2h 3m", "1d 2h", "1d"]


def test_freshness_fresh(repo):
    push(repo, "000000010000000000000004", age_s=7200)
    push(repo, "000000010000000000000005")
    s = freshness(repo, max_age_s="900")  # templated values arrive as strings
    assert s.soft_fail is False and s.timeout == 600 and s.mode == "poke" and "max_age_s" in s.template_fields
    r = s.poke({})
    assert r and r.xcom_value["segment"] == "000000010000000000000005"
    assert r.xcom_value["max_age_s"] == 900 and 0 <= r.xcom_value["age_s"] < 60
    assert set(r.xcom_value) == {"segment", "key", "modified", "age_s", "max_age_s"}
    assert freshness(repo, deferrable=True).execute({})["segment"] == "000000010000000000000005"


def test_freshness_stale_poke_and_message(repo):
    push(repo, "000000010000000000000005", age_s=2 * 3600 + 3 * 60 + 10)
    s = freshness(repo, max_age_s=900, poke_interval=0.1, timeout=0.3)
    assert s.poke({}) is False
    with pytest.raises(AirflowSensorTimeout) as ei:
        s.execute({})
    msg = str(ei.value)
    assert msg.startswith("RPO breached: newest archived WAL 000000010000000000000005")
    assert "was written 2h 3m ago (limit 15m" in msg


def test_freshness_trigger_stale_after_timeout(repo):
    push(repo, "000000010000000000000005", age_s=7390)
    t0 = time.monotonic()
    ev = first_event(WalFreshnessTrigger(cluster=CLUSTER, repository=str(repo.root), max_age_s=900,
                                         poll_interval=0.05, timeout_s=0.3))
    assert time.monotonic() - t0 >= 0.25
    assert ev["status"] == "stale" and ev["segment"] == "000000010000000000000005"
    assert 7380 < ev["age_s"] < 7450 and ev["max_age_s"] == 900 and ev["polls"] >= 2
    assert "RPO breached: newest archived WAL 000000010000000000000005" in ev["message"]
    assert "2h 3m ago (limit 15m" in ev["message"]
    with pytest.raises(AirflowSensorTimeout, match="RPO breached.*2h 3m ago"):
        freshness(repo).execute_complete({}, ev)


def test_freshness_trigger_fires_when_a_new_segment_lands(repo):
    push(repo, "000000010000000000000005", age_s=7390)
    timer = threading.Timer(0.4, push, args=(repo, "000000010000000000000006"))
    timer.start()
    try:
        ev = first_event(WalFreshnessTrigger(cluster=CLUSTER, repository=str(repo.root), max_age_s=900,
                                             poll_interval=0.05, timeout_s=10))
    finally:
        timer.join()
    assert ev["status"] == "fresh" and ev["segment"] == "000000010000000000000006" and ev["polls"] >= 3
    assert freshness(repo).execute_complete({}, ev) == {k: ev[k] for k in ("segment", "key", "modified", "age_s",
                                                                            "max_age_s")}


def test_freshness_empty_archive(repo):
    assert check_freshness(repo, CLUSTER, 60)["fresh"] is False
    ev = first_event(WalFreshnessTrigger(cluster=CLUSTER, repository=str(repo.root), max_age_s=60,
                                         poll_interval=0.05, timeout_s=0.2))
    assert ev["status"] == "stale" and ev["segment"] is None and ev["age_s"] is None
    assert "is empty" in ev["message"]
    with pytest.raises(AirflowSensorTimeout, match="RPO breached: the WAL archive of cluster 'main' .* is empty"):
        freshness(repo).execute_complete({}, ev)
    s = freshness(repo, max_age_s=60, poke_interval=0.1, timeout=0.2)
    assert s.poke({}) is False
    with pytest.raises(AirflowSensorTimeout, match="is empty .*limit 1m"):
        s.execute({})


def test_freshness_deferrable_defers_when_stale(repo):
    push(repo, "000000010000000000000005", age_s=7390)
    with pytest.raises(TaskDeferred) as ei:
        freshness(repo, deferrable=True, max_age_s="900", poke_interval=1, timeout=30).execute({})
    path, kwargs = ei.value.trigger.serialize()
    assert path == "airflow_pg_incremental.triggers.wal.WalFreshnessTrigger"
    assert kwargs["max_age_s"] == 900.0 and kwargs["timeout_s"] == 30 and kwargs["poll_interval"] == 1
    assert json.loads(json.dumps(kwargs)) == kwargs
    assert WalFreshnessTrigger(**kwargs).serialize() == (path, kwargs)


def test_freshness_error_event_and_bad_max_age(repo):
    with pytest.raises(AirflowException, match="failed: boom"):
        freshness(repo).execute_complete({}, {"status": "error", "message": "boom"})
    for bad in ("abc", 0, -5, "nan", True):
        with pytest.raises(ConfigError, match="max_age_s"):
            freshness(repo, max_age_s=bad)
    s = freshness(repo, max_age_s="{{ params.rpo }}")
    s.render_template_fields({"params": {"rpo": "fifteen minutes"}})
    with pytest.raises(AirflowFailException, match="max_age_s must be a number"):
        s.poke({})
    s = freshness(repo, max_age_s=dt.timedelta(minutes=15))
    assert s.max_age_seconds() == 900


def test_freshness_trigger_error(tmp_path):
    ev = first_event(WalFreshnessTrigger(cluster="bad/cluster", repository=str(tmp_path), max_age_s=60,
                                         poll_interval=0.05, timeout_s=5))
    assert ev["status"] == "error" and "cluster name" in ev["message"]


@pytest.mark.parametrize("unarchived, fresh", [(0, True), (5000, False), (None, False)])
def test_freshness_asks_the_server_before_calling_a_stale_archive_a_breach(repo, monkeypatch, unarchived, fresh):
    import airflow_pg_incremental.core.capture as capture
    from airflow_pg_incremental.hooks.repository import PgClusterHook

    push(repo, SEG3, age_s=7200)
    asked = []
    monkeypatch.setattr(PgClusterHook, "get_conninfo", lambda self, dbname=None: "conninfo")
    monkeypatch.setattr(capture, "wal_beyond_archive", lambda conn, seg: asked.append((conn, seg)) or {
        "server_lsn": "0/4000028", "server_timeline": 1, "archive_end_lsn": "0/4000000",
        "unarchived_bytes": unarchived})
    s = freshness(repo, max_age_s=60, postgres_conn_id="pg_main", deferrable=True)
    event = {"status": "stale", "segment": SEG3, "age_s": 7200.0, "max_age_s": 60.0}
    if fresh:
        out = s.execute_complete({}, event)
        assert out["idle"] is True and out["segment"] == SEG3 and out["unarchived_bytes"] == 0
        assert s.poke({}).xcom_value["idle"] is True
    else:
        with pytest.raises(AirflowSensorTimeout, match="RPO breached"):
            s.execute_complete({}, event)
        assert s.poke({}) is False
    assert asked and asked[0] == ("conninfo", SEG3)
    # without the connection the server is never asked
    asked.clear()
    assert freshness(repo, max_age_s=60).poke({}) is False and asked == []
