"""walcmd.sh, the archive_command / restore_command front that answers without Python: run with the
real /bin/sh, stat and mv. It may only ever say "done" for a file the resident helper verified
(fetch) or stored (push) and that is still exactly that file; anything else goes to the Python
command it was given, with the arguments unchanged."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from airflow_pg_incremental.core import fetchahead as fa
from airflow_pg_incremental.core.wal import WALCMD_SH, wal_command

SEG = "0000000A000000000000003C"
MB = 1024 * 1024


def run(cwd: Path, *args: str, env: dict | None = None) -> tuple[int, str]:
    """walcmd.sh with a stand-in for the Python command that prints its arguments and exits 7."""
    fallback = ["/bin/sh", "-c", 'echo "FALLBACK $*"; exit 7', "walcmd.py"]
    r = subprocess.run(["/bin/sh", WALCMD_SH, *fallback, *args], cwd=cwd, capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"], **(env or {})}, timeout=30)
    return r.returncode, r.stdout + r.stderr


@pytest.fixture
def recovery(tmp_path):
    """A data directory in recovery with one segment spooled and recorded as the prefetcher does."""
    d = tmp_path / "data"
    spool = d / "pg_wal" / fa.SPOOL_DIR
    spool.mkdir(parents=True)
    (d / "postmaster.pid").write_text(f"{os.getpid()}\n")
    (d / "recovery.signal").touch()
    data = os.urandom(MB)
    ready = fa.ready_name(SEG, zlib.crc32(data))
    (spool / ready).write_bytes(data)
    (spool / f"{SEG}.ok").write_text(f"{ready} {fa.stat_key(os.stat(spool / ready))}\n")
    return d, spool, ready, data


def test_a_recorded_unchanged_segment_is_renamed_into_place_and_the_prefetcher_told(recovery):
    d, spool, ready, data = recovery
    trace = d.parent / "trace"
    rc, out = run(d, "fetch", "--repo", "R", SEG, "pg_wal/RECOVERYXLOG", env={"PGINCR_TEST_FETCH_TRACE": str(trace)})
    assert (rc, out) == (0, "")
    assert (d / "pg_wal" / "RECOVERYXLOG").read_bytes() == data and not (spool / ready).exists()
    token = (spool / "request").read_text().split()
    assert token[0] == SEG and token[2] == "taken"
    assert trace.read_text() == f"hit-sh {SEG}\n"


@pytest.mark.parametrize("change", ["byte flipped in place", "mtime set back", "replaced by a copy", "no record",
                                    "record of another file", "not in recovery", "server gone", "hold hook"])
def test_anything_but_the_recorded_file_goes_to_python_untouched(recovery, change):
    d, spool, ready, data = recovery
    env = {}
    p = spool / ready
    if change == "byte flipped in place":
        st = os.stat(p)
        with open(p, "r+b") as f:
            f.seek(MB // 2)
            f.write(bytes([data[MB // 2] ^ 1]))
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with its mtime put back: the ctime moved
    elif change == "mtime set back":
        os.utime(p, ns=(os.stat(p).st_atime_ns, os.stat(p).st_mtime_ns))
    elif change == "replaced by a copy":
        (spool / "x").write_bytes(data)
        os.replace(spool / "x", p)
    elif change == "no record":
        (spool / f"{SEG}.ok").unlink()
    elif change == "record of another file":
        other = fa.ready_name("000000010000000000000004", 0)
        (spool / other).write_bytes(data)
        (spool / f"{SEG}.ok").write_text(f"{other} {fa.stat_key(os.stat(spool / other))}\n")
    elif change == "not in recovery":
        (d / "recovery.signal").unlink()
    elif change == "server gone":
        (d / "postmaster.pid").unlink()
    elif change == "hold hook":
        env["PGINCR_TEST_FETCH_HOLD"] = str(d / "hold")
    rc, out = run(d, "fetch", "--repo", "R", "--cluster", "C", SEG, "pg_wal/RECOVERYXLOG", env=env)
    assert (rc, out.strip()) == (7, f"FALLBACK fetch --repo R --cluster C {SEG} pg_wal/RECOVERYXLOG")
    assert not (d / "pg_wal" / "RECOVERYXLOG").exists() and p.exists()


def test_names_that_are_not_segments_go_to_python(recovery):
    d, spool, ready, data = recovery
    for name in ("00000002.history", SEG.lower(), SEG[:-1], "../" + SEG[3:]):
        rc, out = run(d, "fetch", name, "pg_wal/RECOVERYXLOG")
        assert rc == 7 and out.strip() == f"FALLBACK fetch {name} pg_wal/RECOVERYXLOG"


@pytest.fixture
def pushed(tmp_path):
    """pg_wal with one file and the pusher's marker for it."""
    pg_wal = tmp_path / "pg_wal"
    (pg_wal / "pgincr_spool").mkdir(parents=True)
    (pg_wal / SEG).write_bytes(os.urandom(MB))
    (pg_wal / "pgincr_spool" / f"{SEG}.stored").write_text(f"{fa.stat_key(os.stat(pg_wal / SEG))} - stored\n")
    return tmp_path, pg_wal


def test_a_file_the_pusher_stored_is_acknowledged_and_anything_else_goes_to_python(pushed):
    d, pg_wal = pushed
    assert run(d, "push", "--repo", "R", f"pg_wal/{SEG}") == (0, "")
    assert (pg_wal / "pgincr_spool" / f"{SEG}.stored").exists()  # the pusher removes it once archived
    # --spool elsewhere: the marker is not this one
    rc, out = run(d, "push", "--spool", "/elsewhere", f"pg_wal/{SEG}")
    assert rc == 7 and out.strip() == f"FALLBACK push --spool /elsewhere pg_wal/{SEG}"
    # the file rewritten since it was stored (same size)
    (pg_wal / SEG).write_bytes(os.urandom(MB))
    rc, out = run(d, "push", f"pg_wal/{SEG}")
    assert rc == 7 and out.strip() == f"FALLBACK push pg_wal/{SEG}"
    # a history file: never from a marker
    (pg_wal / "00000002.history").write_text("1\t0/3000000\tno recovery target specified\n")
    rc, out = run(d, "push", "pg_wal/00000002.history")
    assert rc == 7


def test_the_lines_users_get_run_it_and_python_with_its_arguments():
    line = wal_command("fetch", "/r", "c", " --env-file /e")
    assert line == (f"exec /bin/sh {WALCMD_SH} {sys.executable} -S {Path(WALCMD_SH).with_suffix('.py')} fetch --repo /r "
                    "--cluster c --env-file /e %f %p")
    assert wal_command("push", "/r", "c").endswith(" push --repo /r --cluster c %p")
    assert Path(WALCMD_SH).is_file()


def test_a_call_for_a_file_being_stored_waits_on_its_lock_then_reads_the_marker(pushed):
    """The pusher holds <name>.busy while it stores the file: the call waits on it (flock), and
    answers from the marker written meanwhile; a lock released without a marker (a failure, the
    pusher killed) sends the call to Python."""
    import fcntl
    import threading
    import time

    d, pg_wal = pushed
    spool = pg_wal / "pgincr_spool"
    marker = (spool / f"{SEG}.stored").read_text()
    for outcome in ("stored", "failed"):
        (spool / f"{SEG}.stored").unlink()
        busy = os.open(spool / f"{SEG}.busy", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(busy, fcntl.LOCK_EX)
        got = {}
        t = threading.Thread(target=lambda: got.update(r=run(d, "push", f"pg_wal/{SEG}"), at=time.monotonic()))
        t.start()
        time.sleep(0.5)
        assert t.is_alive()  # waiting on the lock, not answering
        if outcome == "stored":
            (spool / f"{SEG}.stored").write_text(marker)
        released = time.monotonic()
        os.close(busy)
        t.join(10)
        assert got["at"] - released < 1.0
        assert got["r"] == ((0, "") if outcome == "stored" else (7, f"FALLBACK push pg_wal/{SEG}\n"))
