"""The WAL archive on real servers: pull capture continuity, wal-push semantics, outages, gaps,
push mode end to end."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import airflow_pg_incremental.walcmd as walcmd
from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.capture import (
    capture_wal_pull,
    check_continuity,
    ensure_slot,
    switch_wal,
)
from airflow_pg_incremental.core.errors import ConfigError, ObjectExists, RestoreError
from airflow_pg_incremental.core.lsn import segno_of
from airflow_pg_incremental.core.pgconn import query
from airflow_pg_incremental.core.pitr import parse_target, restore_pitr
from airflow_pg_incremental.core.repository import LocalRepository, S3Repository
from airflow_pg_incremental.sandbox import (
    SandboxPostgres,
    SeaweedS3,
    data_fingerprint,
)
from airflow_pg_incremental.core.wal import WalGap, list_segments, push_bytes, wal_command, wal_key
from tests.conftest import created

pytestmark = pytest.mark.integration
WALCMD = [sys.executable, "-S", walcmd.__file__]


def test_pull_capture_across_runs_no_gap_no_duplicate(pg, repo, catalog):
    cluster = "cap" + uuid.uuid4().hex[:6]
    slot = f"pgincr_{cluster}"
    try:
        r1 = capture_wal_pull(pg.conninfo(), repo, cluster, catalog=catalog)
        assert r1["slot_created"]
        names = []
        for _ in range(3):
            pg.pgbench_run(300)
            sw = switch_wal(pg.conninfo())
            r = capture_wal_pull(pg.conninfo(), repo, cluster, upto_lsn=sw["lsn"], catalog=catalog)
            assert r["segments"] >= 1 and r["lag_bytes"] == 0
            assert sw["segment"] <= r["last_segment"]
            names.append((r["first_segment"], r["last_segment"]))
        # each run starts right after the previous one's last segment
        for (_, last), (first, _) in zip(names, names[1:]):
            assert segno_of(first) == segno_of(last) + 1
        segs = list_segments(repo, cluster)[1]
        nums = [segno_of(n) for n in segs]
        assert nums == list(range(nums[0], nums[-1] + 1))  # no gap, no duplicate
        rows = catalog.wal_segments(cluster)
        assert [r["segment"] for r in rows] == segs
        # nothing new: nothing captured, nothing duplicated
        again = capture_wal_pull(pg.conninfo(), repo, cluster, catalog=catalog)
        assert again["segments"] == 0 and list_segments(repo, cluster)[1] == segs
        # the slot was advanced to the end of what is stored
        restart = query(pg.superuser(), "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
                        (slot,))[0][0]
        assert restart == r["end_lsn"]
    finally:
        pg.psql(f"SELECT pg_drop_replication_slot('{slot}')")


def test_slot_of_another_type_is_refused(workdir):
    pg = SandboxPostgres(workdir / f"logical-{uuid.uuid4().hex[:6]}", settings={"wal_level": "logical"}).start()
    try:
        pg.psql("SELECT pg_create_logical_replication_slot('pgincr_lg', 'pgoutput')")
        with pytest.raises(ConfigError, match="logical slot"):
            ensure_slot(pg.conninfo(), "pgincr_lg")
    finally:
        pg.stop()


def _fake_pg_wal(tmp: Path, names_data: dict[str, bytes]) -> Path:
    d = tmp / "data"
    (d / "pg_wal" / "archive_status").mkdir(parents=True)
    for n, data in names_data.items():
        (d / "pg_wal" / n).write_bytes(data)
        (d / "pg_wal" / "archive_status" / f"{n}.ready").touch()
    return d


def _push(d: Path, repo_url: str, name: str, env=None, extra=()):
    return subprocess.run([*WALCMD, "push", "--repo", repo_url, "--cluster", "wp", *extra, f"pg_wal/{name}"], cwd=d,
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=120)


def _repo_url(repo) -> str:
    return str(repo.root) if isinstance(repo, LocalRepository) else repo.url


def _s3_env(request, repo):
    if isinstance(repo, S3Repository):
        return request.getfixturevalue("s3").env()
    return {}


SEG = 16 * 1024 * 1024


def test_wal_push_twice_and_conflicting_content(request, repo, tmp_path):
    env = _s3_env(request, repo)
    name = "000000010000000000000007"
    data = os.urandom(1024) * (SEG // 1024)
    d = _fake_pg_wal(tmp_path, {name: data})
    r1 = _push(d, _repo_url(repo), name, env, extra=("--ahead", "0"))
    assert r1.returncode == 0, r1.stderr
    stored = repo.get_bytes(wal_key("wp", name))
    r2 = _push(d, _repo_url(repo), name, env, extra=("--ahead", "0"))
    assert r2.returncode == 0, r2.stderr  # same content again: fine
    assert repo.get_bytes(wal_key("wp", name)) == stored
    (d / "pg_wal" / name).write_bytes(os.urandom(SEG))  # different content under the same name
    r3 = _push(d, _repo_url(repo), name, env, extra=("--ahead", "0"))
    assert r3.returncode != 0 and "DIFFERENT content" in r3.stderr
    assert repo.get_bytes(wal_key("wp", name)) == stored  # never overwritten
    with pytest.raises(ObjectExists):
        push_bytes(repo, "wp", name, os.urandom(SEG))


def test_wal_push_rejects_non_wal_names(tmp_path, repo):
    d = tmp_path / "data"
    (d / "pg_wal").mkdir(parents=True)
    (d / "pg_wal" / "not-a-wal-file").write_bytes(b"x")
    r = _push(d, "/nonexistent-repo-root", "not-a-wal-file")
    assert r.returncode != 0 and "not a WAL file name" in r.stderr


def test_push_ahead_acknowledges_only_stored_segments(repo, request, tmp_path):
    env = _s3_env(request, repo)
    names = {f"0000000100000000000000{i:02X}": os.urandom(64) * (SEG // 64) for i in range(0x10, 0x16)}
    d = _fake_pg_wal(tmp_path, names)
    order = sorted(names)
    t0 = time.monotonic()
    for n in order:  # the way PostgreSQL's archiver calls it: in order, one at a time
        r = _push(d, _repo_url(repo), n, env)
        assert r.returncode == 0, r.stderr
        # exit 0 means stored: it must be readable right now
        assert repo.exists(wal_key("wp", n))
        (d / "pg_wal" / "archive_status" / f"{n}.ready").rename(d / "pg_wal" / "archive_status" / f"{n}.done")
    assert time.monotonic() - t0 < 60
    assert list_segments(repo, "wp")[1] == order


def test_s3_down_during_push_then_pushed_later(workdir, tmp_path):
    s3 = SeaweedS3(workdir / f"s3-outage-{uuid.uuid4().hex[:6]}").start()
    try:
        url = f"s3://{s3.bucket}/outage"
        created(S3Repository(s3.client(), s3.bucket, "outage"))
        name = "000000010000000000000021"
        d = _fake_pg_wal(tmp_path, {name: os.urandom(SEG)})
        s3.stop()
        t0 = time.monotonic()
        r = _push(d, url, name, s3.env(), extra=("--ahead", "0"))
        assert r.returncode != 0, "a push into a stopped S3 must fail"
        assert "NOT archived" in r.stderr or "unreachable" in r.stderr
        assert time.monotonic() - t0 < 90
        s3.start()  # same ports
        r = _push(d, url, name, s3.env(), extra=("--ahead", "0"))
        assert r.returncode == 0, r.stderr
        repo = S3Repository(s3.client(), s3.bucket, "outage")
        assert repo.exists(wal_key("wp", name))
    finally:
        s3.stop()


def test_missing_segment_reported_and_restore_past_it_refused(pg, workdir, scratch):
    repo = created(LocalRepository(workdir / f"gap-{uuid.uuid4().hex[:6]}"))
    cluster = "gap" + uuid.uuid4().hex[:6]
    try:
        capture_wal_pull(pg.conninfo(), repo, cluster)
        b = take_full_backup(pg.conninfo(), repo, cluster)
        for _ in range(3):
            pg.pgbench_run(200)
            sw = switch_wal(pg.conninfo())
            capture_wal_pull(pg.conninfo(), repo, cluster, upto_lsn=sw["lsn"])
        assert check_continuity(repo, cluster)["ok"]
        segs = list_segments(repo, cluster)[1]
        assert len(segs) >= 4
        victim = segs[-2]
        repo.delete(wal_key(cluster, victim))
        rep = check_continuity(repo, cluster, fail_on_gap=False)
        assert not rep["ok"] and rep["gaps"] == [victim]
        with pytest.raises(WalGap, match=victim):
            check_continuity(repo, cluster)
        with pytest.raises(WalGap, match=f"{victim} is missing"):
            restore_pitr(repo, cluster, parse_target("latest"), scratch / "d", os_user=pg.os_user)
        assert not (scratch / "d").exists()
        # a target before the gap still restores
        rep = restore_pitr(repo, cluster, parse_target("immediate"), scratch / "ok", os_user=pg.os_user)
        assert rep["state"] == "promoted" and rep["backup_id"] == b["backup_id"]
        # the advice followed: a new full after the gap. Recovery to now is whole again, so the
        # check passes; the old gap is still reported (it cuts the older part of the window)
        b2 = take_full_backup(pg.conninfo(), repo, cluster)
        capture_wal_pull(pg.conninfo(), repo, cluster, upto_lsn=switch_wal(pg.conninfo())["lsn"])
        rep = check_continuity(repo, cluster)
        assert rep["ok"] and rep["problems"] == [] and rep["gaps_before_newest_backup"] == [victim]
        assert rep["gaps"] == [victim]
        rep = restore_pitr(repo, cluster, parse_target("latest"), scratch / "after", os_user=pg.os_user)
        assert rep["backup_id"] == b2["backup_id"]
    finally:
        pg.psql(f"SELECT pg_drop_replication_slot('pgincr_{cluster}')")


def test_push_mode_end_to_end(workdir, scratch):
    """archive_command = walcmd push under a pgbench load; every segment archived; PITR to latest
    gives the source's data."""
    from airflow_pg_incremental.core.server import make_user_dir, python_usable_by

    base = workdir / f"push-{uuid.uuid4().hex[:6]}"
    base.mkdir()
    os.chmod(base, 0o755)
    probe = SandboxPostgres(base / "pg")  # to learn the OS user
    repo_dir = make_user_dir(base / "repo", probe.os_user, mode=0o755)
    python_usable_by(probe.os_user)
    repo = created(LocalRepository(repo_dir))
    cmd = wal_command("push", str(repo_dir), "push")  # the line `pgincr wal-commands` prints
    pg = SandboxPostgres(base / "pg", settings={"archive_command": cmd}).start()
    try:
        pg.pgbench_init(1)
        b = take_full_backup(pg.conninfo(), repo, "push")
        pg.pgbench_run(2000)
        sw = switch_wal(pg.conninfo())
        deadline = time.time() + 60
        while time.time() < deadline:
            last, failed = query(pg.superuser(), "SELECT last_archived_wal, failed_count FROM pg_stat_archiver")[0]
            if last and last >= sw["segment"]:
                break
            time.sleep(0.2)
        assert last and last >= sw["segment"] and failed == 0
        assert check_continuity(repo, "push")["ok"]
        source = data_fingerprint(pg.superuser())
        rep = restore_pitr(repo, "push", parse_target("latest"), scratch / "d", os_user=pg.os_user, keep_running=True)
        srv = rep.pop("server")
        try:
            assert data_fingerprint(srv.local_conninfo()) == source
        finally:
            srv.stop()
        assert rep["backup_id"] == b["backup_id"]
    finally:
        pg.stop()


def _two_servers_workspace(workdir, prefix):
    """A 0755 directory with a local repository and an 'old' primary (PostgreSQL 18, started)."""
    base = workdir / f"{prefix}-{uuid.uuid4().hex[:6]}"
    base.mkdir()
    os.chmod(base, 0o755)
    return base, created(LocalRepository(base / "repo")), SandboxPostgres(base / "old").start()


def _start_promoted(data_dir, old, conn_old):
    """Start the restored-and-promoted copy in `data_dir` as the new primary, with TCP and its own
    pg_hba (password logins, like the old one); returns (server, its ConnInfo)."""
    from airflow_pg_incremental.core.server import PgServer

    new = PgServer(data_dir, major=18, os_user=old.os_user)
    new.start({"archive_mode": "off", "listen_addresses": "127.0.0.1"})
    return new, conn_old.__class__(host="127.0.0.1", port=new.port, user=conn_old.user, password=conn_old.password,
                                   dbname="postgres")


def test_timeline_switch_is_captured_with_its_history(workdir, scratch):
    """Failover: the archive is restored and promoted (timeline 2) as the new primary; capture from
    it continues the same archive, stores 00000002.history, and a PITR to 'latest' from the old
    backup follows the history onto timeline 2."""
    from airflow_pg_incremental.core.wal import list_history

    base, repo, old = _two_servers_workspace(workdir, "tl")
    new = None
    try:
        capture_wal_pull(old.conninfo(), repo, "tl")
        old.psql("CREATE TABLE t (id int, tl text)")
        b = take_full_backup(old.conninfo(), repo, "tl")
        old.psql("INSERT INTO t VALUES (1, 'old primary')")
        capture_wal_pull(old.conninfo(), repo, "tl", upto_lsn=switch_wal(old.conninfo())["lsn"])
        conn_old = old.conninfo()
        old.stop()  # the old primary is gone

        # the new primary: the archive restored to its end and promoted onto timeline 2
        rep = restore_pitr(repo, "tl", parse_target("latest"), base / "new" / "data", os_user=old.os_user)
        assert rep["state"] == "promoted"
        new, conn_new = _start_promoted(base / "new" / "data", old, conn_old)
        new.psql("INSERT INTO t VALUES (2, 'new primary')")
        on_tl2 = new.psql("SELECT clock_timestamp()").strip()
        time.sleep(0.2)
        new.psql("INSERT INTO t VALUES (3, 'later')")
        assert query(conn_new, "SELECT timeline_id FROM pg_control_checkpoint()")[0][0] >= 1
        cap = capture_wal_pull(conn_new, repo, "tl", upto_lsn=switch_wal(conn_new)["lsn"])
        assert cap["history_files"] >= 1 and cap["segments"] >= 1
        assert 2 in list_history(repo, "tl")
        segs = list_segments(repo, "tl")
        assert 1 in segs and 2 in segs
        cont = check_continuity(repo, "tl", fail_on_gap=False)
        assert cont["missing_history"] == []

        # recovery from the old backup follows timeline 2 to the end
        rep2 = restore_pitr(repo, "tl", parse_target("latest"), scratch / "d", os_user=old.os_user,
                            keep_running=True)
        srv = rep2.pop("server")
        try:
            rows = query(srv.local_conninfo(), "SELECT array_agg(tl ORDER BY id) FROM t")[0][0]
            assert rows == ["old primary", "new primary", "later"]
        finally:
            srv.stop()
        assert rep2["backup_id"] == b["backup_id"]
        # a point in time on timeline 2, from the backup taken on timeline 1
        rep3 = restore_pitr(repo, "tl", parse_target("time", on_tl2), scratch / "t2", os_user=old.os_user,
                            keep_running=True)
        srv = rep3.pop("server")
        try:
            rows = query(srv.local_conninfo(), "SELECT array_agg(tl ORDER BY id) FROM t")[0][0]
            assert rows == ["old primary", "new primary"]
        finally:
            srv.stop()
        assert rep3["window"]["timelines"] == [1, 2]
    finally:
        if new is not None:
            new.stop("immediate")
        old.stop()


def test_restore_after_a_pitr_branch_never_uses_the_abandoned_backup(workdir, scratch):
    """A PITR rewinds the cluster to before a mistake and promotes it (timeline 2 branches off
    timeline 1). A backup taken on timeline 1 after that point (the abandoned future) is the newest
    backup of timeline 1's past, but recovery along timeline 2 cannot start from it: PostgreSQL
    would stop with 'requested timeline 2 is not a child of this server's history'. The restore
    chooses the older backup on the path instead, and refuses the abandoned one by name."""
    from airflow_pg_incremental.core.pitr import plan_restore

    base, repo, old = _two_servers_workspace(workdir, "br")
    new = None
    try:
        capture_wal_pull(old.conninfo(), repo, "br")
        old.psql("CREATE TABLE t (id int, what text)")
        good = take_full_backup(old.conninfo(), repo, "br")
        old.psql("INSERT INTO t VALUES (1, 'before the mistake')")
        split = old.psql("SELECT pg_current_wal_insert_lsn()").strip()
        old.psql("INSERT INTO t VALUES (2, 'the mistake')")
        capture_wal_pull(old.conninfo(), repo, "br", upto_lsn=switch_wal(old.conninfo())["lsn"])
        abandoned = take_full_backup(old.conninfo(), repo, "br")  # timeline 1, after the split point
        capture_wal_pull(old.conninfo(), repo, "br", upto_lsn=switch_wal(old.conninfo())["lsn"])
        conn_old = old.conninfo()
        old.stop()

        # rewind to the split point and promote: timeline 2
        rep = restore_pitr(repo, "br", parse_target("lsn", split), base / "new" / "data", os_user=old.os_user)
        assert rep["state"] == "promoted" and rep["backup_id"] == good["backup_id"]
        new, conn_new = _start_promoted(base / "new" / "data", old, conn_old)
        new.psql("INSERT INTO t VALUES (3, 'on timeline 2')")
        # capture resumes at the switch point on timeline 2, not after timeline 1's (abandoned) end
        cap = capture_wal_pull(conn_new, repo, "br", upto_lsn=switch_wal(conn_new)["lsn"])
        assert cap["segments"] >= 1 and cap["history_files"] >= 1, cap
        assert 2 in list_segments(repo, "br")
        new.stop()
        new = None

        # 'latest' follows timeline 2: the abandoned backup (the newest one) is skipped
        plan = plan_restore(repo, "br", parse_target("latest"))
        assert plan["backup_id"] == good["backup_id"], plan
        rep2 = restore_pitr(repo, "br", parse_target("latest"), scratch / "d", os_user=old.os_user,
                            keep_running=True)
        srv = rep2.pop("server")
        try:
            rows = query(srv.local_conninfo(), "SELECT array_agg(what ORDER BY id) FROM t")[0][0]
            assert rows == ["before the mistake", "on timeline 2"]
        finally:
            srv.stop()
        # asked for by id, the abandoned backup is refused before anything is touched
        with pytest.raises(RestoreError, match=f"backup {abandoned['backup_id']} .*abandoned branch"):
            restore_pitr(repo, "br", parse_target("latest"), scratch / "e", backup_id=abandoned["backup_id"],
                         os_user=old.os_user)
        assert not (scratch / "e").exists()
        # on timeline 1, asked for explicitly, it is the right backup: the mistake is there
        rep3 = restore_pitr(repo, "br", parse_target("latest", timeline="1"), scratch / "f", os_user=old.os_user,
                            keep_running=True)
        srv = rep3.pop("server")
        try:
            rows = query(srv.local_conninfo(), "SELECT array_agg(what ORDER BY id) FROM t")[0][0]
            assert rows == ["before the mistake", "the mistake"]
        finally:
            srv.stop()
        assert rep3["backup_id"] == abandoned["backup_id"]
    finally:
        if new is not None:
            new.stop("immediate")
        old.stop()


def test_freshness_on_an_idle_server_is_not_a_breach(workdir, monkeypatch):
    """An idle server writes no WAL, so its newest archived segment grows old without anything being
    at risk. With the cluster's connection, the RPO sensor asks the server: nothing past the
    archive's end is fresh (idle); WAL written since, and still not archived, is the breach.
    A server of its own (autovacuum off): the session's shared server is never idle."""
    from airflow.sdk.exceptions import AirflowSensorTimeout

    from airflow_pg_incremental.core.capture import wal_beyond_archive
    from airflow_pg_incremental.core.wal import newest_archived
    from airflow_pg_incremental.hooks.repository import PgClusterHook
    from airflow_pg_incremental.sensors.wal import WalFreshnessSensor

    base = workdir / f"idle-{uuid.uuid4().hex[:6]}"
    base.mkdir()
    os.chmod(base, 0o755)
    repo = created(LocalRepository(base / "repo"))
    cluster = "idle"
    srv = SandboxPostgres(base / "pg", settings={"autovacuum": "off"}).start()
    monkeypatch.setattr(PgClusterHook, "get_conninfo", lambda self, dbname=None: srv.conninfo())

    def sensor(**kw):
        return WalFreshnessSensor(task_id="wal_fresh", cluster=cluster, repository=str(repo.root),
                                  max_age_s=900, poke_interval=0.1, timeout=0.3, **kw)

    try:
        capture_wal_pull(srv.conninfo(), repo, cluster)
        srv.psql("CREATE TABLE idle_t (x int)")
        srv.psql("INSERT INTO idle_t VALUES (1)")
        # the checkpointer or bgwriter may log a record of their own (a standby snapshot after the
        # switch) at any moment: switch and capture until nothing lies past the archive's end
        for _ in range(5):
            capture_wal_pull(srv.conninfo(), repo, cluster, upto_lsn=switch_wal(srv.conninfo())["lsn"])
            newest = newest_archived(repo, cluster)
            old = time.time() - 7200  # the newest segment was archived two hours ago
            os.utime(repo.root / wal_key(cluster, newest), (old, old))
            if wal_beyond_archive(srv.conninfo(), newest)["unarchived_bytes"] == 0:
                try:
                    out = sensor(postgres_conn_id="pg_main").execute({})
                    break
                except AirflowSensorTimeout:  # a background record landed in between: once more
                    continue
        else:
            pytest.fail("the server never stood idle at the archive's end")
        assert out["idle"] is True and out["unarchived_bytes"] == 0 and out["segment"] == newest
        # without the server's connection: stale, as before
        with pytest.raises(AirflowSensorTimeout, match="RPO breached"):
            sensor().execute({})
        # WAL written and not archived: that is a breach
        srv.psql("INSERT INTO idle_t SELECT generate_series(1, 1000)")
        assert wal_beyond_archive(srv.conninfo(), newest)["unarchived_bytes"] > 8000
        with pytest.raises(AirflowSensorTimeout, match="RPO breached"):
            sensor(postgres_conn_id="pg_main").execute({})
    finally:
        srv.stop()
