"""The README's main command: `pgincr demo` (through Airflow, and engine-only with --no-airflow), on
both repository kinds; its work directory rules, its report, --keep, and SIGTERM."""

from __future__ import annotations

import os
import re
import shlex
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.integration.proc_helpers import processes_under, wait_for

pytestmark = pytest.mark.integration

CHECKS = 9  # lines "PASS  ..." in the report's checks list


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PGINCR"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def _demo(*flags: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "airflow_pg_incremental.cli", "demo", *flags], capture_output=True,
                          text=True, env=_env(), timeout=timeout)


def _new_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="dw-", dir="/var/tmp")) / "w"


def _assert_passed(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "restored == source at backup time: YES" in r.stdout
    assert "found in logs/repository/restored copies: nowhere" in r.stdout
    assert "PITR restored == source at the target time: YES" in r.stdout
    assert "continuous: yes" in r.stdout
    assert "restored == source at the incremental: YES" in r.stdout
    # incremental forever: the chain combined on the worker into a synthetic full that restores alone
    assert re.search(r"^synthetic full  \S+-S = \S+-F \+ \S+-I combined on this machine .*== source at the "
                     r"incremental: YES$", r.stdout, re.M), r.stdout[-3000:]
    assert "data as at the target: YES" in r.stdout and "3 of 3 backups verified" in r.stdout
    assert "(dry run)" in r.stdout
    assert len(re.findall(r"^  PASS  ", r.stdout, re.M)) == CHECKS and "  FAIL  " not in r.stdout, r.stdout[-3000:]
    # the window's end as a time as well as an LSN
    assert re.search(r"^window .* \.\. \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\S* \(LSN [0-9A-F]+/[0-9A-F]+\)", r.stdout, re.M), \
        r.stdout[-3000:]
    assert "RESULT: PASS" in r.stdout


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--s3"]], ids=["local", "s3"])
def test_demo_passes(flags):
    r = _demo(*flags)
    _assert_passed(r)
    assert "pgincr_demo_weekly_full" in r.stdout  # it went through Airflow


def test_demo_refuses_a_non_empty_workdir(tmp_path):
    w = tmp_path / "mine"
    w.mkdir()
    (w / "notes.txt").write_text("precious")
    os.chmod(w, 0o700)
    r = _demo("--no-airflow", "--workdir", str(w), timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    assert "is not empty" in r.stderr and "nothing was touched" in r.stderr
    assert sorted(p.name for p in w.iterdir()) == ["notes.txt"] and (w / "notes.txt").read_text() == "precious"
    assert stat.S_IMODE(w.stat().st_mode) == 0o700


@pytest.mark.slow
def test_demo_without_airflow_passes_in_an_empty_workdir():
    """--no-airflow does what the DAGs do (switch + capture after each backup) and passes; a directory
    that existed (empty) stays, empty, with its mode; nothing keeps running in it."""
    w = _new_dir()
    w.mkdir()
    os.chmod(w, 0o711)
    r = _demo("--no-airflow", "--workdir", str(w))
    _assert_passed(r)
    assert w.is_dir() and list(w.iterdir()) == []
    assert stat.S_IMODE(w.stat().st_mode) == 0o711
    assert processes_under(w) == []
    w.rmdir()
    w.parent.rmdir()


@pytest.mark.slow
def test_demo_keep_says_how_to_use_what_it_kept():
    """--keep: the printed pg_ctl command starts the source again, and the printed `info` command
    reads the repository."""
    w = _new_dir()
    r = _demo("--no-airflow", "--keep", "--workdir", str(w))
    try:
        _assert_passed(r)
        lines = r.stdout.splitlines()
        start = next(ln.strip() for ln in lines if "/pg_ctl " in ln and ln.strip().endswith(" start"))
        stop = next(ln.split("stop it: ", 1)[1] for ln in lines if "stop it: " in ln)
        info = next(ln.strip() for ln in lines if " info --repo " in ln)
        assert "--cluster demo" in info and f"--repo {w / 'repository'}" in info
        assert any(" restore --repo " in ln and "--target-time" in ln for ln in lines)
        assert str(w / "source" / "data") in start and processes_under(w) == []
        s = subprocess.run(shlex.split(start), capture_output=True, text=True)
        assert s.returncode == 0, s.stdout + s.stderr
        try:
            i = subprocess.run(shlex.split(info), capture_output=True, text=True, env=_env())
            assert i.returncode == 0 and "cluster demo: 3 backup(s)" in i.stdout and "synthetic" in i.stdout, i.stdout + i.stderr
        finally:
            subprocess.run(shlex.split(stop), capture_output=True)
        assert processes_under(w) == []
    finally:
        subprocess.run(["rm", "-rf", str(w.parent)])


def _sigterm_demo(w: Path, flags: list[str], when: str, timeout: float, delay: float = 0.0) -> tuple[int, str]:
    """Start the demo in `w`, SIGTERM it `delay` s after `when` appears in its output; (exit code, output)."""
    log = w.parent / "demo.out"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "airflow_pg_incremental.cli", "demo", "--workdir", str(w),
                                 *flags], stdout=out, stderr=subprocess.STDOUT, env=_env())
    try:
        wait_for(lambda: when in log.read_text() or proc.poll() is not None, timeout, when)
        time.sleep(delay)
        assert proc.poll() is None, log.read_text()[-3000:]
        running = processes_under(w)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        proc.wait(30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert running, "nothing was running in the work directory when the demo was told to stop"
    assert took < 20, text[-3000:]
    return proc.returncode, text


@pytest.mark.slow
def test_demo_sigterm_stops_everything_and_removes_its_workdir():
    w = _new_dir()
    rc, out = _sigterm_demo(w, ["--no-airflow"], "full backup", 120)
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    assert processes_under(w) == [], out[-3000:]
    assert not w.exists(), out[-3000:]
    w.parent.joinpath("demo.out").unlink()
    w.parent.rmdir()


@pytest.mark.slow
def test_demo_sigterm_during_an_airflow_run():
    """SIGTERM while `airflow dags test` runs: the Airflow process and the servers are gone, the
    user's (empty) directory is left empty with its mode."""
    w = _new_dir()
    w.mkdir()
    os.chmod(w, 0o750)
    rc, out = _sigterm_demo(w, [], "] airflow (", 180, delay=3)  # into `airflow dags test` of the weekly DAG
    assert rc == 128 + signal.SIGTERM, out[-3000:]
    assert processes_under(w) == [], out[-3000:]
    assert w.is_dir() and list(w.iterdir()) == [] and stat.S_IMODE(w.stat().st_mode) == 0o750
    w.rmdir()
    w.parent.joinpath("demo.out").unlink()
    w.parent.rmdir()
