"""Point-in-time recovery at the edges of the archive, on real servers (PostgreSQL 18; 15 from Debian
where the WAL format matters): the window's end read with pg_waldump whatever the last transaction
was (released savepoint, DDL, two-phase commit/abort), targets at or past the last point recovery can
reach refused before anything is touched (and the last reachable point restoring exactly), named
restore points reported, a failed recovery leaving nothing behind, and a restored server started
with none of our secrets in its environment."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from pathlib import Path

import pytest

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.capture import capture_wal_pull, switch_wal
from airflow_pg_incremental.core.errors import RestoreError, ServerError, TargetBeyondArchive
from airflow_pg_incremental.core.lsn import format_lsn, parse_lsn
from airflow_pg_incremental.core.pitr import archive_window, choose_backup, parse_target, restore_pitr
from airflow_pg_incremental.core.repository import LocalRepository
from airflow_pg_incremental.core.restore import restore_backup, start_restored
from airflow_pg_incremental.sandbox import SandboxPostgres, data_fingerprint
from tests.conftest import created

pytestmark = pytest.mark.integration

C = "edges"
PG15 = os.path.exists("/usr/lib/postgresql/15/bin/postgres")
SIBLINGS = (".log", ".pg_hba.conf", ".sock")


class Edges:
    """A server of the test's own (no autovacuum: the last transaction end in the archive is always
    the test's; 2PC allowed if asked), a local repository with a full backup and the WAL after it."""

    def __init__(self, workdir: Path, major: int, two_phase: bool = False):
        self.major = major
        settings = {"autovacuum": "off", **({"max_prepared_transactions": 5} if two_phase else {})}
        self.pg = SandboxPostgres(workdir / f"edges{major}-{uuid.uuid4().hex[:6]}", major=major,
                                  settings=settings).start()
        self.repo = created(LocalRepository(workdir / f"edges-repo-{uuid.uuid4().hex[:6]}"))
        capture_wal_pull(self.pg.conninfo(), self.repo, C)  # creates the slot
        self.pg.psql("CREATE TABLE m (id int PRIMARY KEY, at timestamptz)")
        self.backup = take_full_backup(self.pg.conninfo(), self.repo, C)
        self.n = 0

    def marker(self) -> str:
        """One committed row; returns its commit time (ISO 8601)."""
        self.n += 1
        self.pg.psql(f"INSERT INTO m VALUES ({self.n}, clock_timestamp())")
        return self.last_commit_time()

    def last_commit_time(self) -> str:
        ts = self.pg.psql("SELECT timestamp FROM pg_last_committed_xact()").strip()
        return dt.datetime.fromisoformat(ts).astimezone(dt.timezone.utc).isoformat()

    def archive(self, restore_point: str | None = None) -> dict:
        sw = switch_wal(self.pg.conninfo(), restore_point=restore_point, repo=self.repo, cluster=C)
        capture_wal_pull(self.pg.conninfo(), self.repo, C, upto_lsn=sw["lsn"])
        return sw

    def window(self) -> dict:
        return archive_window(self.repo, C, choose_backup(self.repo, C, parse_target("latest")))

    def restore(self, target, dest: Path, **kw) -> tuple[dict, dict]:
        rep = restore_pitr(self.repo, C, target, dest, os_user=self.pg.os_user, keep_running=True, **kw)
        srv = rep.pop("server")
        try:
            return rep, data_fingerprint(srv.local_conninfo())
        finally:
            srv.stop()


@pytest.fixture(scope="module")
def edges18(workdir):
    e = Edges(workdir, 18)
    try:
        yield e
    finally:
        e.pg.stop()


@pytest.fixture(scope="module", params=[18, 15])
def edges(request, workdir):
    """A server allowing two-phase commit (set on its command line, not in postgresql.conf),
    PostgreSQL 18 and 15."""
    if request.param == 15 and not PG15:
        pytest.skip("PostgreSQL 15 is not installed (apt-get install postgresql-15)")
    e = Edges(workdir, request.param, two_phase=True)
    try:
        yield e
    finally:
        e.pg.stop()


def test_a_primary_run_with_command_line_settings_restores(edges, scratch):
    """max_prepared_transactions=5 was given on the primary's command line: the copied
    postgresql.conf does not have it, and hot standby needs it at least as large ("recovery aborted
    because of insufficient parameter settings"). The restored server takes it from the control file."""
    e = edges
    e.marker()
    e.archive()
    if e.major == 15:
        pytest.skip("PostgreSQL 15 copies are not restored here (the 18 run covers the control-file read)")
    rep, got = e.restore(parse_target("latest"), scratch / f"cmdline{e.major}")
    assert rep["state"] == "promoted"
    assert got["public.m"]["rows"] == e.n


def _siblings(d: Path) -> list[Path]:
    return [p for p in (d.parent / f"{d.name}{s}" for s in SIBLINGS) if os.path.lexists(p)]


def _refused_untouched(e: Edges, target, dest: Path) -> str:
    with pytest.raises(TargetBeyondArchive) as exc:
        restore_pitr(e.repo, C, target, dest, os_user=e.pg.os_user)
    assert not dest.exists() and not _siblings(dest)
    return str(exc.value)


# ---- 3: the window's end, whatever the last transaction end looks like ------------------------
VARIANTS = {  # psql calls (one session each)
    # a released savepoint: "COMMIT <time> UTC; subxacts: N"
    "savepoint": ["BEGIN; INSERT INTO m VALUES ({n}, now()); SAVEPOINT a; INSERT INTO m VALUES ({n2}, now()); "
                  "RELEASE a; COMMIT;"],
    # DDL: "COMMIT <time> UTC; inval msgs: ..."
    "ddl": ["CREATE TABLE ddl_{n} (id int)"],
    # a dropped table: "COMMIT <time> UTC; rels: ...; dropped stats: ...; inval msgs: ..."
    "drop": ["CREATE TABLE drop_{n} (id int)", "DROP TABLE drop_{n}"],
    # two-phase commit: "COMMIT_PREPARED <xid>: <time> UTC"
    "2pc-commit": ["BEGIN; INSERT INTO m VALUES ({n}, now()); PREPARE TRANSACTION 'g{n}';", "COMMIT PREPARED 'g{n}'"],
    # two-phase abort: "ABORT_PREPARED <xid>: <time> UTC"
    "2pc-abort": ["BEGIN; INSERT INTO m VALUES ({n}, now()); PREPARE TRANSACTION 'g{n}';",
                  "ROLLBACK PREPARED 'g{n}'"],
    # a rolled-back transaction that had an xid: "ABORT <time> UTC"
    "abort": ["BEGIN; INSERT INTO m VALUES ({n}, now()); ROLLBACK;"],
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_window_end_is_known_after_every_kind_of_transaction_end(edges, scratch, variant):
    before = edges.pg.psql("SELECT clock_timestamp()").strip()
    edges.n += 2
    for sql in VARIANTS[variant]:
        edges.pg.psql(sql.format(n=edges.n, n2=edges.n - 1))
    after = edges.pg.psql("SELECT clock_timestamp()").strip()
    edges.archive()
    win = edges.window()
    assert win["end_time"] is not None, win
    end = dt.datetime.fromisoformat(win["end_time"])
    assert dt.datetime.fromisoformat(before) <= end <= dt.datetime.fromisoformat(after), (before, win, after)
    if variant in ("savepoint", "ddl", "drop", "2pc-commit"):
        assert win["end_time"] == edges.last_commit_time()
    # a time after the archive's end is refused before anything is touched
    msg = _refused_untouched(edges, parse_target("time", (end + dt.timedelta(seconds=1)).isoformat()),
                             scratch / "d")
    assert win["end_time"] in msg and "--target latest" in msg


# ---- 4: the last reachable point ------------------------------------------------------------
def test_targets_at_the_end_of_the_archive_are_refused(edges, scratch):
    edges.marker()
    last = edges.marker()
    edges.archive()
    win = edges.window()
    assert win["end_time"] == last and win["last_record_lsn"]
    end_lsn, last_lsn = parse_lsn(win["end_lsn"]), parse_lsn(win["last_record_lsn"])
    assert last_lsn < end_lsn
    cases = [parse_target("time", last), parse_target("time", last, inclusive=True),
             parse_target("lsn", win["end_lsn"]), parse_target("lsn", format_lsn(last_lsn + 8)),
             parse_target("lsn", format_lsn((last_lsn + end_lsn) // 2)),
             parse_target("lsn", format_lsn(end_lsn - 1), inclusive=False)]
    for target in cases:
        msg = _refused_untouched(edges, target, scratch / "d")
        assert win["last_record_lsn"] in msg and last in msg and "--target latest" in msg, msg


def test_the_last_reachable_point_restores_exactly(edges18, scratch):
    e = edges18
    e.marker()
    before_last = data_fingerprint(e.pg.superuser())
    last = e.marker()
    everything = data_fingerprint(e.pg.superuser())
    e.archive()
    win = e.window()
    just_before = (dt.datetime.fromisoformat(last) - dt.timedelta(microseconds=1)).isoformat()
    rep, got = e.restore(parse_target("time", just_before), scratch / "t")
    assert got == before_last and rep["state"] == "promoted"
    rep, got = e.restore(parse_target("time", last, inclusive=False), scratch / "x")
    assert got == before_last
    rep, got = e.restore(parse_target("lsn", win["last_record_lsn"]), scratch / "l")
    assert got == everything and "after WAL location" in rep["stopped_at"]


# ---- 9: named restore points ----------------------------------------------------------------
def test_restore_point_is_reported_where_recovery_stopped(edges18, scratch):
    e = edges18
    name = f"rp_{uuid.uuid4().hex[:6]}"
    e.marker()
    at_point = data_fingerprint(e.pg.superuser())
    e.archive(restore_point=name)
    e.marker()
    e.archive()
    rep, got = e.restore(parse_target("name", name), scratch / "n")
    assert got == at_point
    assert rep["stopped_at"] and rep["stopped_at"].startswith(f'at restore point "{name}"'), rep


# ---- 10: a failed restore leaves nothing behind -------------------------------------------------
def _late_failure(e: Edges):
    """An xid nobody has used yet: accepted (it lies after the backup), but recovery reads the whole
    archive without meeting it and PostgreSQL stops with FATAL."""
    e.marker()
    e.archive()
    return parse_target("xid", str(int(e.backup["next_xid"]) + 1_000_000))


def test_failed_recovery_removes_what_it_wrote_and_a_retry_works(edges18, scratch):
    e = edges18
    target = _late_failure(e)
    dest = scratch / "new"
    with pytest.raises(RestoreError) as exc:
        restore_pitr(e.repo, C, target, dest, os_user=e.pg.os_user)
    lines = str(exc.value).splitlines()
    assert "FATAL:  recovery ended before configured recovery target was reached" in lines[0], lines
    assert any("redo done at" in ln for ln in lines) and "removed everything it wrote" in str(exc.value)
    assert not dest.exists() and not _siblings(dest)
    # an existing (empty) directory: emptied, kept
    (scratch / "empty").mkdir()
    with pytest.raises(RestoreError):
        restore_pitr(e.repo, C, target, scratch / "empty", os_user=e.pg.os_user)
    assert (scratch / "empty").is_dir() and not list((scratch / "empty").iterdir())
    assert not _siblings(scratch / "empty")
    # the retry into the same directory works
    rep, got = e.restore(parse_target("latest"), dest)
    assert got == data_fingerprint(e.pg.superuser())


def test_keep_failed_keeps_everything_and_says_where(edges18, scratch):
    e = edges18
    dest = scratch / "kept"
    with pytest.raises(RestoreError) as exc:
        restore_pitr(e.repo, C, _late_failure(e), dest, os_user=e.pg.os_user, keep_failed=True)
    assert (dest / "PG_VERSION").exists() and len(_siblings(dest)) == 3
    assert f"kept for debugging (remove before retrying): data directory {dest}" in str(exc.value)
    assert str(dest) + ".log" in str(exc.value)


def test_a_restored_copy_that_does_not_start_leaves_nothing_beside_it(edges18, scratch):
    e = edges18
    dest = scratch / "plain"
    res = restore_backup(e.repo, C, e.backup["backup_id"], dest, os_user=e.pg.os_user)
    with pytest.raises(ServerError):
        start_restored(dest, res["pg_major"], os_user=e.pg.os_user, settings={"shared_buffers": "bogus"})
    assert not _siblings(dest) and (dest / "PG_VERSION").exists()


# ---- 17: no secret reaches a restored server ---------------------------------------------------
def test_restored_server_gets_none_of_our_secrets(edges18, scratch, monkeypatch):
    e = edges18
    monkeypatch.setenv("PGPASSWORD", "pw-must-not-leak")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-must-not-leak")
    monkeypatch.setenv("PGINCR_SOMETHING", "x")
    e.marker()
    e.archive()
    rep = restore_pitr(e.repo, C, parse_target("latest"), scratch / "env", os_user=e.pg.os_user, keep_running=True)
    srv = rep.pop("server")
    try:
        pid = int((srv.data_dir / "postmaster.pid").read_text().split()[0])
        env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in v)
        assert "PGPASSWORD" not in env and "AWS_SECRET_ACCESS_KEY" not in env and "PGINCR_SOMETHING" not in env
        assert "pw-must-not-leak" not in str(env) and "aws-must-not-leak" not in str(env)
        assert "PATH" in env
        assert data_fingerprint(srv.local_conninfo()) == data_fingerprint(e.pg.superuser())
    finally:
        srv.stop()


def test_a_long_target_path_still_starts(edges18, scratch):
    """The server's socket goes beside the data directory; a path too long for a unix socket
    (107 bytes) moves it to a private directory under /tmp instead of failing to start."""
    e = edges18
    e.marker()
    e.archive()
    deep = scratch / ("a-rather-long-directory-name-" * 3) / "restored"
    deep.parent.mkdir()
    os.chmod(deep.parent, 0o755)
    assert len(str(deep.parent / f"{deep.name}.sock" / ".s.PGSQL.65535")) > 107
    rep, got = e.restore(parse_target("latest"), deep)
    assert rep["state"] == "promoted" and got["public.m"]["rows"] == e.n
    assert not rep["socket_dir"].startswith(str(scratch)) and not os.path.exists(rep["socket_dir"])
