"""Fetch-ahead on real recoveries (PostgreSQL 18, local repository and SeaweedFS): restore_command
calls served from the spool, a prefetcher killed -9 mid-download, a spooled file damaged before
PostgreSQL asks for it, a timeline switch crossed, S3 going away mid-recovery, and nothing left
behind afterwards. Each restore is compared with its source.

The restored server's environment is clean (only what pitr.repo_env gives it): the test hooks of
walcmd/core.fetchahead (a trace of what each call did, a delay before each prefetch, a hold of the
calls) reach restore_command by patching pitr.repo_env."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import airflow_pg_incremental.walcmd as walcmd
from airflow_pg_incremental.core import pitr
from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.capture import capture_wal_pull, switch_wal
from airflow_pg_incremental.core.errors import RestoreError, ServerError
from airflow_pg_incremental.core.fetchahead import SPOOL_DIR, parse_ready_name
from airflow_pg_incremental.core.lsn import segno_of
from airflow_pg_incremental.core.repository import LocalRepository, S3Repository
from airflow_pg_incremental.core.wal import list_segments
from airflow_pg_incremental.sandbox import SandboxPostgres, data_fingerprint
from tests.conftest import created
from tests.integration.test_wal_archive import _start_promoted, _two_servers_workspace

pytestmark = pytest.mark.integration
SEGMENTS = 10  # WAL after the backup, in whole segments


def fill_wal(psql, segments: int) -> None:
    """Write about `segments` segments of WAL (rows of a table `filler`)."""
    psql("CREATE TABLE IF NOT EXISTS filler (id int, pad text)")
    start = psql("SELECT pg_current_wal_lsn()").strip()
    while int(psql(f"SELECT pg_current_wal_lsn() - '{start}'::pg_lsn").strip()) < segments * 16 * 1024 * 1024:
        psql("INSERT INTO filler SELECT g, repeat(md5(g::text), 6) FROM generate_series(1, 50000) g")


class Source:
    """A server with a full backup and SEGMENTS segments of WAL after it, captured into a local and
    an S3 repository (one cluster name, and so one slot, each)."""

    def __init__(self, workdir: Path, s3):
        self.pg = SandboxPostgres(workdir / f"fa-{uuid.uuid4().hex[:6]}").start()
        self.repos = {"local": (created(LocalRepository(workdir / f"fa-repo-{uuid.uuid4().hex[:6]}")), "fal"),
                      "s3": (created(S3Repository(s3.client(), s3.bucket, "fa-" + uuid.uuid4().hex[:6])), "fas")}
        for repo, c in self.repos.values():
            capture_wal_pull(self.pg.conninfo(), repo, c)  # creates the slot
        for repo, c in self.repos.values():
            take_full_backup(self.pg.conninfo(), repo, c)
        fill_wal(self.pg.psql, SEGMENTS)
        sw = switch_wal(self.pg.conninfo())
        for repo, c in self.repos.values():
            capture_wal_pull(self.pg.conninfo(), repo, c, upto_lsn=sw["lsn"])
        self.fingerprint = data_fingerprint(self.pg.superuser())


@pytest.fixture(scope="module")
def source(workdir, s3):
    src = Source(workdir, s3)
    try:
        yield src
    finally:
        src.pg.stop()


class Hooks:
    """The trace file (and any other test hook) handed to restore_command through repo_env."""

    def __init__(self, monkeypatch, scratch: Path):
        self.trace = scratch / f"trace-{uuid.uuid4().hex[:6]}"
        self.trace.touch()
        os.chmod(self.trace, 0o666)  # written by the server's OS user
        self.env = {"PGINCR_TEST_FETCH_TRACE": str(self.trace)}
        orig = pitr.repo_env
        monkeypatch.setattr(pitr, "repo_env", lambda repo: {**orig(repo), **self.env})

    def events(self, kind: str | None = None) -> list[tuple[str, str]]:
        ev = [tuple(ln.split(" ", 1)) for ln in self.trace.read_text().splitlines() if " " in ln]
        return [e for e in ev if kind is None or e[0] == kind]

    def names(self, kind: str) -> list[str]:
        return [n for _, n in self.events(kind)]

    def served(self) -> list[str]:
        """Segments taken from the spool: by walcmd.sh ("hit-sh") or by walcmd.py ("hit")."""
        return [n for k, n in self.events() if k in ("hit", "hit-sh")]

    def prefetchers(self) -> list[int]:
        return [int(n) for n in self.names("start")]


@pytest.fixture
def hooks(monkeypatch, scratch):
    return Hooks(monkeypatch, scratch)


def restore(repo, cluster: str, dest: Path, os_user: str, **kw) -> tuple[dict, dict]:
    rep = pitr.restore_pitr(repo, cluster, pitr.parse_target("latest"), dest, os_user=os_user, keep_running=True, **kw)
    srv = rep.pop("server")
    try:
        return rep, data_fingerprint(srv.local_conninfo())
    finally:
        srv.stop()


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except FileNotFoundError:
        return True


def assert_nothing_left(dest: Path, hooks: Hooks, timeout: float = 10) -> None:
    """The prefetchers have exited and removed their spool: pg_wal holds nothing of ours."""
    deadline = time.monotonic() + timeout
    while not (all(gone(p) for p in hooks.prefetchers()) and not (dest / "pg_wal" / SPOOL_DIR).exists()):
        assert time.monotonic() < deadline, (hooks.prefetchers(), os.listdir(dest / "pg_wal"))
        time.sleep(0.1)
    if dest.exists():
        assert not [e for e in os.listdir(dest / "pg_wal") if "pgincr" in e or e.endswith(".part")]


def wait_for(what, timeout: float = 60, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def in_background(fn, *args, **kw):
    pool = ThreadPoolExecutor(1)
    fut = pool.submit(fn, *args, **kw)
    pool.shutdown(wait=False)
    return fut


def spool_of(dest: Path) -> Path:
    return dest / "pg_wal" / SPOOL_DIR


# -- 1. served from the spool, exact; 6. nothing left -------------------------------------------------
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_pitr_to_latest_is_served_from_the_spool(source, kind, hooks, scratch):
    repo, cluster = source.repos[kind]
    rep, got = restore(repo, cluster, scratch / "d", source.pg.os_user)
    assert rep["state"] == "promoted" and got == source.fingerprint
    hits = hooks.served()
    assert len(hits) >= SEGMENTS - 1, hooks.events()
    assert len(hooks.names("hit-sh")) >= (SEGMENTS - 1) // 2, hooks.events()  # mostly without Python
    assert len(hooks.prefetchers()) == 1  # one prefetcher for the whole recovery
    assert_nothing_left(scratch / "d", hooks)
    assert "fetch-ahead stopped (recovery ended)" in Path(rep["server_log"]).read_text()


def test_an_idle_prefetcher_removes_itself_and_its_spool(source, tmp_path):
    """A data directory 'in recovery' (this test stands in for the postmaster) whose recovery asks
    for nothing more: the prefetcher leaves after --idle-exit seconds, with its spool."""
    repo, cluster = source.repos["local"]
    dd = tmp_path / "data"
    (dd / "pg_wal").mkdir(parents=True)
    (dd / "postmaster.pid").write_text(f"{os.getpid()}\n")
    (dd / "recovery.signal").touch()
    first = list_segments(repo, cluster)[1][0]
    r = subprocess.run([sys.executable, "-S", walcmd.__file__, "fetch", "--repo", str(repo.root), "--cluster", cluster,
                        "--idle-exit", "1", first, "pg_wal/RECOVERYXLOG"], cwd=dd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (dd / "pg_wal" / "RECOVERYXLOG").stat().st_size == 16 * 1024 * 1024
    pid = int(wait_for(lambda: walcmd._read_small(str(spool_of(dd) / "pid")), timeout=10))
    wait_for(lambda: not spool_of(dd).exists() and gone(pid), timeout=15)
    assert os.listdir(dd / "pg_wal") == ["RECOVERYXLOG"]


# -- 2. a prefetcher killed -9 mid-download ------------------------------------------------------------
def test_a_prefetcher_killed_mid_download_is_replaced(source, hooks, scratch):
    repo, cluster = source.repos["local"]
    hooks.env["PGINCR_TEST_FETCH_DELAY"] = "0.4"  # each GET waits first: downloads are caught in flight
    dest = scratch / "d"
    fut = in_background(restore, repo, cluster, dest, source.pg.os_user)
    wait_for(lambda: len(hooks.served()) >= 2)
    spool = spool_of(dest)
    victim = int(walcmd._read_small(str(spool / "pid")))
    wait_for(lambda: any(e.endswith(".part") for e in os.listdir(spool)))
    os.kill(victim, signal.SIGKILL)
    rep, got = fut.result(timeout=300)
    assert rep["state"] == "promoted" and got == source.fingerprint
    assert victim in hooks.prefetchers() and len(hooks.prefetchers()) >= 2, hooks.events()  # restarted
    assert_nothing_left(dest, hooks)


# -- 3. a spooled file damaged before PostgreSQL asks for it ----------------------------------------------
def test_a_damaged_spooled_segment_is_fetched_again_never_ends_recovery(source, hooks, scratch):
    repo, cluster = source.repos["local"]
    hold = scratch / "hold"
    hold.touch()
    os.chmod(scratch, 0o755)
    hooks.env["PGINCR_TEST_FETCH_HOLD"] = str(hold)  # the calls after the first wait while it exists
    dest = scratch / "d"
    fut = in_background(restore, repo, cluster, dest, source.pg.os_user)
    spool = spool_of(dest)

    def victim():  # a spooled segment PostgreSQL asks for later (not the next one)
        try:
            asked = walcmd._read_small(str(spool / "request")).split()[0]
            ready = sorted(e for e in os.listdir(spool) if parse_ready_name(e))
        except (OSError, AttributeError):
            return None
        later = [e for e in ready if segno_of(e[:24]) >= segno_of(asked) + 3]
        return later[0] if later else None

    name = wait_for(victim)
    with open(spool / name, "r+b") as f:
        f.seek(8 * 1024 * 1024)
        byte = f.read(1)
        f.seek(8 * 1024 * 1024)
        f.write(bytes([byte[0] ^ 0x40]))
    hold.unlink()
    rep, got = fut.result(timeout=300)
    assert rep["state"] == "promoted" and got == source.fingerprint  # all of it: recovery did not end there
    seg = name[:24]
    assert ("corrupt", seg) in hooks.events() and ("direct", seg) in hooks.events(), hooks.events()
    assert f"the fetched-ahead copy of {seg} is damaged" in Path(rep["server_log"]).read_text()
    assert_nothing_left(dest, hooks)


# -- 4. a timeline switch crossed -----------------------------------------------------------------------
@pytest.mark.slow
def test_recovery_across_a_timeline_switch_follows_the_history(workdir, scratch, hooks):
    """A backup on timeline 1; a PITR to the end of the archive promotes timeline 2, which goes on
    as the new primary; a restore to latest from the timeline-1 backup crosses the switch and is
    served from the spool on both sides of it."""
    base, repo, old = _two_servers_workspace(workdir, "fatl")
    new = None
    try:
        capture_wal_pull(old.conninfo(), repo, "tl")
        take_full_backup(old.conninfo(), repo, "tl")
        fill_wal(old.psql, 4)
        capture_wal_pull(old.conninfo(), repo, "tl", upto_lsn=switch_wal(old.conninfo())["lsn"])
        conn_old = old.conninfo()
        old.stop()
        rep = pitr.restore_pitr(repo, "tl", pitr.parse_target("latest"), base / "new" / "data", os_user=old.os_user)
        assert rep["state"] == "promoted"
        new, conn_new = _start_promoted(base / "new" / "data", old, conn_old)
        fill_wal(new.psql, 4)
        new.psql("CREATE TABLE on_tl2 AS SELECT 2 AS tl")
        capture_wal_pull(conn_new, repo, "tl", upto_lsn=switch_wal(conn_new)["lsn"])
        want = data_fingerprint(new.local_conninfo())
        hooks.trace.write_text("")

        rep2, got = restore(repo, "tl", scratch / "d", old.os_user)
        assert got == want and rep2["window"]["timelines"] == [1, 2]
        hits = hooks.served()
        assert len([n for n in hits if n.startswith("00000001")]) >= 3, hooks.events()
        assert len([n for n in hits if n.startswith("00000002")]) >= 3, hooks.events()
        assert_nothing_left(scratch / "d", hooks)
    finally:
        if new is not None:
            new.stop("immediate")
        old.stop()


def readable(repo, cluster: str) -> bool:
    from airflow_pg_incremental.core.wal import fetch_bytes

    try:
        fetch_bytes(repo, cluster, list_segments(repo, cluster)[1][-1])
        return True
    except Exception:
        return False


# -- 5. S3 goes away mid-recovery ------------------------------------------------------------------------
def test_s3_outage_mid_recovery_stops_it_loudly_and_a_retry_is_exact(source, s3, hooks, scratch):
    repo, cluster = source.repos["s3"]
    hooks.env["PGINCR_TEST_FETCH_DELAY"] = "0.3"
    dest = scratch / "d"
    fut = in_background(restore, repo, cluster, dest, source.pg.os_user)
    try:
        wait_for(lambda: len(hooks.served()) >= 2)
        s3.stop()
        with pytest.raises((RestoreError, ServerError)) as exc:
            fut.result(timeout=300)
    finally:
        s3.start()
    msg = str(exc.value)
    # exit 126: FATAL, recovery stopped (not ended, not promoted), with why
    assert "FATAL:  could not restore file" in msg and "command not executable" in msg, msg
    assert "S3 endpoint unreachable" in msg, msg
    assert not dest.exists() or not os.listdir(dest)
    wait_for(lambda: all(gone(p) for p in hooks.prefetchers()), timeout=15)

    del hooks.env["PGINCR_TEST_FETCH_DELAY"]
    wait_for(lambda: readable(repo, cluster), timeout=60, every=0.5)  # SeaweedFS answers HEAD before GET
    rep, got = restore(repo, cluster, dest, source.pg.os_user)
    assert rep["state"] == "promoted" and got == source.fingerprint
    assert_nothing_left(dest, hooks)
