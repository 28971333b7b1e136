"""The resident ahead pusher of `walcmd push` (core/pushahead.py) on the real parts: a PostgreSQL 18
server whose archive_command is walcmd push, and a simulated archiver (one call per file, in order,
.ready renamed to .done after exit 0, as PostgreSQL does) over local and SeaweedFS repositories."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

import airflow_pg_incremental.walcmd as walcmd
from airflow_pg_incremental.core.pgconn import query
from airflow_pg_incremental.core.repository import LocalRepository, S3Repository
from airflow_pg_incremental.core.wal import fetch_bytes, list_segments, push_bytes, wal_command
from airflow_pg_incremental.sandbox import SandboxPostgres
from tests.conftest import created

pytestmark = pytest.mark.integration
WALCMD = [sys.executable, "-S", walcmd.__file__]
SEG = 16 * 1024 * 1024
CL = "pa"


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie (our own child in a test) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def wait_for(what, timeout: float = 30, every: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        v = what()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s")
        time.sleep(every)


class Archiver:
    """A data directory with pg_wal/<segments> (all .ready), a postmaster.pid naming a live process
    (ours: the 'server'), and PostgreSQL's way of calling archive_command."""

    def __init__(self, tmp: Path, repo, env: dict, count: int, first: int = 0x10):
        self.d = tmp / "data"
        self.status = self.d / "pg_wal" / "archive_status"
        self.status.mkdir(parents=True)
        self.repo, self.env = repo, env
        self.url = str(repo.root) if isinstance(repo, LocalRepository) else repo.url
        self.names = [f"0000000100000000000000{i:02X}" for i in range(first, first + count)]
        self.data = {}
        for i, n in enumerate(self.names):
            self.data[n] = bytes([i]) * 8192 + os.urandom(8192) * (SEG // 8192 - 1)
            (self.d / "pg_wal" / n).write_bytes(self.data[n])
            (self.status / f"{n}.ready").touch()
        (self.d / "postmaster.pid").write_text(f"{os.getpid()}\n{self.d}\n")
        self.spool = self.d / "pg_wal" / "pgincr_spool"
        self.trace = tmp / "trace"

    def call(self, name: str, extra=()) -> subprocess.CompletedProcess:
        r = subprocess.run([*WALCMD, "push", "--repo", self.url, "--cluster", CL, *extra, f"pg_wal/{name}"],
                           cwd=self.d, capture_output=True, text=True, timeout=120,
                           env={**os.environ, **self.env, "PGINCR_TEST_PUSH_TRACE": str(self.trace)})
        if r.returncode == 0:
            (self.status / f"{name}.ready").rename(self.status / f"{name}.done")
        return r

    def pusher_pid(self) -> int:
        return int((self.spool / "pid").read_text())

    def log(self) -> str:
        p = self.spool / "walpush.log"
        return p.read_text() if p.exists() else ""

    def events(self) -> list[str]:
        return self.trace.read_text().split() if self.trace.exists() else []

    def stop_server(self) -> None:
        (self.d / "postmaster.pid").unlink()

    def assert_all_archived_exactly(self) -> None:
        assert list_segments(self.repo, CL)[1] == self.names
        for n in self.names:
            assert fetch_bytes(self.repo, CL, n, SEG) == self.data[n], n


def _env(request, repo) -> dict:
    return request.getfixturevalue("s3").env() if isinstance(repo, S3Repository) else {}


def test_kill_9_of_the_resident_pusher_mid_burst_loses_nothing(request, repo, tmp_path):
    """The pusher is killed while it stores the backlog: no call waits long, every call exits 0
    only for a stored file, a new pusher carries on, and every segment is archived byte-exact."""
    a = Archiver(tmp_path, repo, _env(request, repo), 16)
    r = a.call(a.names[0])
    assert r.returncode == 0, r.stderr
    first = a.pusher_pid()
    os.kill(first, signal.SIGKILL)  # mid-burst: 15 files are ready behind it
    wait_for(lambda: gone(first), 10)
    for n in a.names[1:]:
        t = time.monotonic()
        r = a.call(n)
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t < 10, f"{n} waited {time.monotonic() - t:.1f}s"
    second = a.pusher_pid()
    assert second != first and not gone(second)  # archiving went on through a new resident pusher
    assert a.log().count("ahead pusher started") == 2
    a.assert_all_archived_exactly()
    a.stop_server()
    wait_for(lambda: gone(second), 5)
    assert not [f for f in os.listdir(a.spool) if f.endswith((".stored", ".failed"))]


def test_a_file_the_pusher_gives_up_on_is_pushed_by_its_call_at_once(tmp_path, workdir):
    """Archived already with DIFFERENT content: the pusher fails twice and leaves it to the call,
    which pushes it itself at once and returns the real error (1); once the conflict is resolved,
    the next call stores it (0). The resident pusher is not waited for (it stays 30 s)."""
    repo = created(LocalRepository(workdir / "repos" / uuid.uuid4().hex[:10]))
    a = Archiver(tmp_path, repo, {}, 4)
    bad = a.names[1]
    push_bytes(repo, CL, bad, os.urandom(SEG))  # another server archived a different file under that name
    assert a.call(a.names[0]).returncode == 0
    wait_for(lambda: (a.spool / f"{bad}.failed").exists(), 30)
    t = time.monotonic()
    r = a.call(bad)
    assert r.returncode == 1 and "DIFFERENT content" in r.stderr and "ahead pusher gave up" in r.stderr
    assert time.monotonic() - t < 5
    repo.delete(f"{CL}/wal/00000001/{bad}.zst")  # the operator resolved it
    r = a.call(bad)
    assert r.returncode == 0, r.stderr
    assert fetch_bytes(repo, CL, bad, SEG) == a.data[bad]
    assert not (a.spool / f"{bad}.failed").exists()
    for n in a.names[2:]:
        assert a.call(n).returncode == 0
    assert a.events().count("start") == 1  # one pusher did all the rest
    a.assert_all_archived_exactly()
    a.stop_server()
    wait_for(lambda: gone(a.pusher_pid()), 5)


def test_a_marker_hit_imports_only_the_standard_library(request, s3, tmp_path):
    """S3: the call whose file was pushed ahead imports neither boto3 nor zstandard nor the package."""
    repo = created(S3Repository(s3.client(), s3.bucket, f"hit-{uuid.uuid4().hex[:8]}"))
    a = Archiver(tmp_path, repo, s3.env(), 3)
    assert a.call(a.names[0]).returncode == 0
    wait_for(lambda: (a.spool / f"{a.names[1]}.stored").exists(), 30)
    r = subprocess.run([sys.executable, "-S", "-X", "importtime", walcmd.__file__, "push", "--repo", a.url, "--cluster",
                        CL, f"pg_wal/{a.names[1]}"], cwd=a.d, capture_output=True, text=True, timeout=60,
                       env={**os.environ, **s3.env()})
    assert r.returncode == 0, r.stderr
    mods = {ln.split("|")[-1].strip().split(".")[0] for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    mods.discard("imported package")  # the header line
    assert mods - set(sys.stdlib_module_names) == {"walcmd_rest"}, sorted(mods)
    assert not (a.spool / f"{a.names[1]}.stored").exists()
    a.stop_server()
    wait_for(lambda: gone(a.pusher_pid()), 5)


@pytest.mark.slow
def test_a_server_at_a_steady_rate_keeps_one_resident_pusher_which_leaves_when_it_stops(workdir):
    """archive_command = walcmd push on PostgreSQL 18, one segment every 0.4 s: the first call
    starts the pusher, every later call is served by it (no call stores its own file), all is
    archived; the pusher leaves once the server stops."""
    from airflow_pg_incremental.core.server import make_user_dir, python_usable_by

    base = workdir / f"steady-{uuid.uuid4().hex[:6]}"
    base.mkdir()
    os.chmod(base, 0o755)
    probe = SandboxPostgres(base / "pg")
    repo_dir = make_user_dir(base / "repo", probe.os_user, mode=0o755)
    tdir = make_user_dir(base / "trace", probe.os_user, mode=0o755)
    python_usable_by(probe.os_user)
    repo = created(LocalRepository(repo_dir))
    cmd = f"PGINCR_TEST_PUSH_TRACE={tdir}/trace {wal_command('push', str(repo_dir), CL)}"  # the line users get
    pg = SandboxPostgres(base / "pg", settings={"archive_command": cmd}).start()
    spool = pg.server.data_dir / "pg_wal" / "pgincr_spool"
    try:
        pg.psql("CREATE TABLE t (x int)")
        for i in range(8):
            pg.psql(f"INSERT INTO t VALUES ({i}); SELECT pg_switch_wal()")
            time.sleep(0.4)
        last = pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())").strip()

        def archived():
            done, failed = query(pg.superuser(), "SELECT last_archived_wal, failed_count FROM pg_stat_archiver")[0]
            assert failed == 0
            return done and done >= f"{int(last[:8], 16):08X}{int(last[8:], 16) - 1:016X}"
        wait_for(archived, 60, 0.1)
        events = (tdir / "trace").read_text().split("\n")
        kinds = [e.split()[0] for e in events if e]
        assert kinds[0] == "start" and kinds.count("start") == 1, events
        assert "direct" not in kinds and "failed" not in kinds, events
        assert sum(k in ("hit", "hit-sh", "waited") for k in kinds) >= 8, events
        log = (spool / "walpush.log").read_text()
        assert log.count("ahead pusher started") == 1 and "server pid" in log, log
        pid = int((spool / "pid").read_text())
        assert not gone(pid)
        segs = list_segments(repo, CL)[1]
        assert segs == sorted(segs) and len(segs) >= 8
    finally:
        pg.server.stop()
    wait_for(lambda: gone(pid), 5)
    assert "the server stopped" in (spool / "walpush.log").read_text()
