#!/usr/bin/env python
"""Benchmark: WAL archiving, our archive_command (`walcmd.py push`) vs pgBackRest archive-push ASYNC
(the reference; sync as a secondary line), and our pull capture (capture_wal_pull / pg_receivewal),
on real pgbench WAL.

    /work/venv/bin/python bench/bench_wal.py [--segments 64] [--level 3] [--repeat 1] [--rate R]
                                             [--s3] [--no-sync] [--workdir DIR] [--json FILE] [--keep]
                                             [--no-install] [--no-capture]

Source WAL: a throw-away PostgreSQL 15 (Debian's, run through SandboxPostgres) archives N segments of
pgbench WAL to a directory with `cp`. Each side then drains the same N segments through a simulated
archiver that calls the archive command the way PostgreSQL does: once per file, in order, with
cwd = a data directory and %p = pg_wal/<name>, renaming archive_status/<name>.ready to .done after
exit 0; the data directory has a postmaster.pid naming the benchmark (the "server"), removed after
the last call (our resident pusher leaves then; its CPU is counted, see below). Sides:
  * ours              /bin/sh walcmd.sh <python> -S walcmd.py push --repo DIR --cluster bench --level L %p
                      (what `pgincr wal-commands` prints; the resident pusher: --parallel 2, --idle-exit 30)
  * pgBackRest async  pgbackrest --stanza=bench --archive-async --process-max=2 --spool-path=S
                      archive-push %p   (zst level L; the reference)
  * pgBackRest sync   the same with archive-async=n (secondary line; --no-sync drops it)
  * ours-sync         ours with --ahead 0 (secondary line; --no-sync drops it)
  * ours-s3           (--s3) ours into SeaweedFS
Modes: burst (all N segments .ready when the loop starts: a backlog being drained; throughput) and,
with --rate R, steady (segment i becomes .ready at t0 + i/R and is archived at once: what a server
producing WAL at R segments/s costs; CPU per segment and per-call latency). Rounds are interleaved
(every side once per round, order alternating); medians, min-max and per-round ratios are reported,
with the load of the machine. CPU = user+sys of every process of the side, children included
(getrusage(RUSAGE_CHILDREN): the benchmark is a subreaper, so detached helpers - our pusher,
pgBackRest's async worker - are re-parented to it and waited for).
Then, on a PostgreSQL 18 sandbox, one capture_wal_pull() over N fresh segments is timed.
Exit code is 0 whatever the numbers are; non-zero only when something crashed.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as dt
import fcntl
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
import zstandard
from _common import ratio_summary, run_bench, tail  # noqa: E402

import airflow_pg_incremental
from airflow_pg_incremental.core.lsn import format_lsn, parse_lsn, segno_of
from airflow_pg_incremental.core.repository import LocalRepository, S3Repository
from airflow_pg_incremental.sandbox import SandboxPostgres, SeaweedS3
from airflow_pg_incremental.core.server import as_user, chown_tree, make_user_dir
from airflow_pg_incremental.core.wal import fetch_bytes, list_segments, wal_command

PKG = Path(airflow_pg_incremental.__file__).resolve().parent
WALCMD = PKG / "walcmd.py"
MB = 1_000_000  # sizes and throughput in MB = 10^6 bytes
TARGET_RATIO = 1.5  # ours (default mode) segments/s >= 1.5 x pgBackRest async archive-push (burst)
CLUSTER = "bench"
PG15_POSTGRES = Path("/usr/lib/postgresql/15/bin/postgres")
SEG_RE = re.compile(r"^[0-9A-F]{24}$")
SIDE_LABEL = {"ours": "ours", "pgbackrest-async": "pgBackRest async", "pgbackrest": "pgBackRest sync",
              "ours-sync": "ours --ahead 0", "ours-s3": "ours S3"}
REF = "pgbackrest-async"


# ---------------------------------------------------------------------------------------------
def percentile(vals: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not vals:
        return float("nan")
    s = sorted(vals)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def become_subreaper() -> bool:
    """Orphans of our descendants (our ahead-pusher child, after its parent exits) are re-parented
    to us, so we can wait for them and count their CPU time in RUSAGE_CHILDREN."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except Exception:
        return False


class Meter:
    """Wall time, CPU of this process and of its waited-for descendants, and the system-wide busy
    and steal time over an interval: what other processes used is the noise of the measurement."""

    def __init__(self):
        self.t0 = time.monotonic()
        self.c0 = self._cpu()
        self.s0 = psutil.cpu_times()
        self.load0 = os.getloadavg()[0]

    @staticmethod
    def _cpu() -> tuple[float, float]:
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        c1 = self._cpu()
        s1 = psutil.cpu_times()
        busy = sum(getattr(s1, f) - getattr(self.s0, f) for f in ("user", "nice", "system", "irq", "softirq"))
        steal = getattr(s1, "steal", 0.0) - getattr(self.s0, "steal", 0.0)
        own = (c1[0] - self.c0[0]) + (c1[1] - self.c0[1])
        ncpu = os.cpu_count() or 1
        return {"interval_s": wall, "cpu_self_s": c1[0] - self.c0[0], "cpu_children_s": c1[1] - self.c0[1],
                "cpu_s": own, "system_busy_s": busy, "other_cpu_s": max(0.0, busy - own),
                "other_cpu_pct": 100 * max(0.0, busy - own) / (wall * ncpu) if wall else 0.0,
                "steal_pct": 100 * steal / (wall * ncpu) if wall else 0.0,
                "loadavg_1m_start": self.load0, "loadavg_1m_end": os.getloadavg()[0]}


def wait_lock_free(lock: Path, timeout: float = 600) -> None:
    """Until nobody holds the flock on `lock` (our ahead-pusher child holds it while it works and
    during its idle_exit wait). A missing lock file means no pusher ever ran."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(lock, os.O_RDWR)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return
        except BlockingIOError:
            pass
        finally:
            os.close(fd)
        if time.monotonic() > deadline:
            raise RuntimeError(f"the ahead pusher still holds {lock} after {timeout:.0f}s")
        time.sleep(0.02)


def child_pids() -> set[int]:
    return {c.pid for c in psutil.Process().children()}


def _adopted(exclude: set[int]) -> tuple[list[int], list[int]]:
    """(zombies, live processes) among our direct children whose pid is not in `exclude`. Children
    that subprocess.run started are reaped already, so what is left is an orphan re-parented to us:
    our ahead pusher, or, when `exclude` holds only SeaweedFS, e.g. a stopped postmaster that
    pg_ctl had left behind. (psutil's create_time() is not used to tell them apart: it is derived
    from /proc/stat's btime, whole seconds.)"""
    zombies, live = [], []
    for c in psutil.Process().children():
        if c.pid in exclude:
            continue
        try:
            (zombies if c.status() == psutil.STATUS_ZOMBIE else live).append(c.pid)
        except psutil.ZombieProcess:
            zombies.append(c.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return zombies, live


def reap_zombies(exclude: set[int]) -> None:
    for pid in _adopted(exclude)[0]:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def reap_adopted(before: set[int], timeout: float = 30) -> list[int]:
    """Wait for the orphans re-parented to us (we are a subreaper) that were not our children
    `before` the measurement (our ahead pusher: its lock is released a moment before it becomes a
    zombie), so their CPU time lands in RUSAGE_CHILDREN. Returns the pids still alive after
    `timeout`. Older zombies (e.g. a stopped postmaster, whose rusage carries all its backends'
    CPU) are reaped before a measurement begins, never inside one."""
    deadline = time.monotonic() + timeout
    while True:
        reap_zombies(before)
        live = _adopted(before)[1]
        if not live or time.monotonic() > deadline:
            return live
        time.sleep(0.01)




def _lsn(pg: SandboxPostgres) -> int:
    return parse_lsn(pg.psql("SELECT pg_current_wal_lsn()").strip())


def generate_wal(pg: SandboxPostgres, until_lsn: int, scale: int, tx_per_round: int = 2500,
                 timeout: float = 1800) -> dict:
    """pgbench -i -s <scale>, then rounds of (CHECKPOINT; pgbench -c 2 -t <tx>) until the server's
    WAL insert position passes `until_lsn`. The CHECKPOINT before each round makes the TPC-B
    updates write full-page images, as on a server whose checkpoints come every few minutes
    (without it, WAL per transaction drops ~20x and generating a segment takes ~20 s here)."""
    t0 = time.monotonic()
    l0 = _lsn(pg)
    pg.pgbench_init(scale)
    l1 = _lsn(pg)
    rounds = 0
    while _lsn(pg) < until_lsn:
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"generating WAL up to {format_lsn(until_lsn)} took over {timeout:.0f}s")
        pg.psql("CHECKPOINT")
        pg.pgbench_run(tx_per_round, clients=2)
        rounds += 1
    l2 = _lsn(pg)
    return {"scale": scale, "init_wal_bytes": l1 - l0, "tpcb_wal_bytes": l2 - l1, "tpcb_rounds": rounds,
            "tpcb_transactions": rounds * tx_per_round * 2, "seconds": time.monotonic() - t0}


# ---------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, workdir: Path):
        self.a = args
        self.w = workdir
        self.src_pg: SandboxPostgres | None = None
        self.cap_pg: SandboxPostgres | None = None
        self.s3: SeaweedS3 | None = None
        self.src_dir = workdir / "wal-src"
        self.segs: list[str] = []
        self.seg_size = 0
        self.pgbr: str | None = None
        self.pgbr_version: str | None = None
        self.pgbr_note = ""
        self.pgbr_cfg: Path | None = None
        self.pgbr_template: Path | None = None
        self.pgbr_user: str | None = None  # OS user pgBackRest runs as (None: us)
        self.install_note = ""
        self.runs: list[dict] = []
        self.run_no = 0
        self.source: dict = {}
        self.subreaper = False

    # -- environment -------------------------------------------------------------------------
    @staticmethod
    def clean_env() -> dict:
        """No connection, S3 or pgBackRest settings leak from our environment into the commands."""
        return {k: v for k, v in os.environ.items()
                if not (k.startswith(("AWS_", "PGINCR_", "PGBACKREST_")) or k.startswith("PG"))}

    def maybe_install(self) -> None:
        missing = []
        if not PG15_POSTGRES.exists():
            missing.append("postgresql-15")
        if not shutil.which("pgbackrest"):
            missing.append("pgbackrest")
        if not missing:
            self.install_note = "postgresql-15 and pgbackrest already installed"
            return
        if self.a.no_install or os.geteuid() != 0:
            self.install_note = (f"missing {', '.join(missing)}; not installing "
                                 f"({'--no-install' if self.a.no_install else 'not root'})")
            print(self.install_note, flush=True)
            return
        cmd = "apt-get update && apt-get install -y " + " ".join(missing)
        print(f"installing the missing {', '.join(missing)}: {cmd}", flush=True)
        t = time.monotonic()
        try:
            r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=900,
                               env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            ok = r.returncode == 0
            detail = (r.stderr or r.stdout).strip().splitlines()[-3:] if not ok else []
        except subprocess.TimeoutExpired:
            ok, detail = False, ["timed out after 900 s"]
        self.install_note = f"ran `{cmd}`: {'ok' if ok else 'FAILED'} ({time.monotonic() - t:.0f} s)"
        print(self.install_note + ("" if ok else ": " + " | ".join(detail)), flush=True)

    # -- step 1: the source WAL ----------------------------------------------------------------
    def make_source(self) -> None:
        n = self.a.segments
        major = 15 if PG15_POSTGRES.exists() else 18
        t = time.monotonic()
        self.src_pg = SandboxPostgres(self.w / f"pg{major}", major=major)  # assigned first: cleanup must see it
        make_user_dir(self.src_dir, self.src_pg.os_user, 0o755)
        d = self.src_dir
        # copy under a temporary name, then rename: a file with its final name is always complete
        self.src_pg.extra_settings["archive_command"] = f"test ! -f {d}/%f && cp %p {d}/%f.tmp && mv {d}/%f.tmp {d}/%f"
        self.src_pg.start()
        version = self.src_pg.psql("SHOW server_version").strip()
        seg = int(self.src_pg.psql("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'").strip())
        print(f"PostgreSQL {version} (source of the WAL) started as OS user {self.src_pg.os_user or 'self'} "
              f"({time.monotonic() - t:.1f} s); generating {n} segments of pgbench WAL ...", flush=True)
        first = _lsn(self.src_pg) // seg
        gen = generate_wal(self.src_pg, (first + n) * seg + 1, scale=max(1, n // 4))
        # the segments are archived once full: wait for the first n
        deadline = time.monotonic() + 300
        while True:
            segs = sorted(f for f in os.listdir(d) if SEG_RE.match(f) and os.path.getsize(d / f) == seg)
            if len(segs) >= n:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(segs)} of {n} segments archived after 300 s:\n"
                                   f"{self.src_pg.server.log_tail()}")
            time.sleep(0.2)
        self.segs, self.seg_size = segs[:n], seg
        self.source = {"postgresql": version, "major": major, "segment_size": seg, "first": self.segs[0],
                       "last": self.segs[-1], "generation": gen}
        print(f"{n} segments archived ({self.segs[0]} .. {self.segs[-1]}) in {gen['seconds']:.1f} s: "
              f"pgbench -i -s {gen['scale']} wrote {gen['init_wal_bytes'] / MB:.0f} MB of WAL, then "
              f"{gen['tpcb_rounds']} x (CHECKPOINT; TPC-B 2 x 2500 tx) wrote {gen['tpcb_wal_bytes'] / MB:.0f} MB",
              flush=True)

    # -- pgBackRest ------------------------------------------------------------------------------
    def setup_pgbackrest(self) -> None:
        exe = shutil.which("pgbackrest")
        if not exe:
            self.pgbr_note = "pgbackrest not installed" + (f" ({self.install_note})" if self.install_note else "")
            return
        self.pgbr_version = subprocess.run([exe, "version"], capture_output=True, text=True).stdout.strip()
        if self.source["major"] != 15:
            self.pgbr_note = f"{self.pgbr_version} does not support PostgreSQL {self.source['major']}"
            return
        base = self.w / "pgbackrest"
        for sub in ("", "log", "lock", "spool"):
            (base / sub).mkdir(mode=0o755, exist_ok=True)
        self.pgbr_template = base / "repo-template"
        self.pgbr_cfg = base / "pgbackrest.conf"
        srv = self.src_pg.server
        self.pgbr_cfg.write_text(
            "[global]\n"
            f"repo1-path={self.pgbr_template}\n"
            "compress-type=zst\n"
            f"compress-level={self.a.level}\n"
            "archive-async=n\n"
            "log-level-console=warn\n"
            "log-level-stderr=warn\n"
            "log-level-file=off\n"
            f"log-path={base / 'log'}\n"
            f"lock-path={base / 'lock'}\n"
            f"spool-path={base / 'spool'}\n"
            "\n[bench]\n"
            f"pg1-path={srv.data_dir}\n"
            f"pg1-port={srv.port}\n"
            f"pg1-socket-path={srv.socket_dir}\n"
            "pg1-user=postgres\n")
        os.chmod(self.pgbr_cfg, 0o644)
        cmd = [exe, f"--config={self.pgbr_cfg}", "--stanza=bench", "stanza-create"]
        r = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
        if r.returncode != 0 and self.src_pg.os_user and os.geteuid() == 0:
            # retry as the server's OS user, which owns the data directory
            print(f"pgbackrest stanza-create as root failed ({(r.stderr or r.stdout).strip()[:200]}); "
                  f"retrying as {self.src_pg.os_user}", flush=True)
            shutil.rmtree(self.pgbr_template, ignore_errors=True)
            chown_tree(base, self.src_pg.os_user)
            r = subprocess.run(as_user(cmd, self.src_pg.os_user), capture_output=True, text=True, cwd="/")
            self.pgbr_user = self.src_pg.os_user
        if r.returncode != 0:
            raise RuntimeError(f"pgbackrest stanza-create failed (exit {r.returncode}): {r.stderr or r.stdout}")
        self.pgbr = exe
        self.pgbr_note = (f"{self.pgbr_version}; stanza-create (against the running PostgreSQL 15) ran as "
                          f"{self.pgbr_user or _whoami()}; each run gets a copy of that fresh repository")
        print(f"{self.pgbr_version}: stanza 'bench' created", flush=True)

    # -- step 2..4: the simulated archiver -----------------------------------------------------
    def make_fake_datadir(self, d: Path, ready: bool) -> None:
        """D/pg_wal/<segments> (hard links to the source copies), D/pg_wal/archive_status/*.ready
        (when `ready`: a burst), D/global/pg_control copied from the source cluster (pgBackRest
        reads it from pg1-path), and D/postmaster.pid naming this process (the server)."""
        (d / "pg_wal" / "archive_status").mkdir(parents=True)
        (d / "global").mkdir()
        shutil.copyfile(self.src_pg.server.data_dir / "global" / "pg_control", d / "global" / "pg_control")
        for name in self.segs:
            os.link(self.src_dir / name, d / "pg_wal" / name)
            if ready:
                (d / "pg_wal" / "archive_status" / f"{name}.ready").touch()
        (d / "postmaster.pid").write_text(f"{os.getpid()}\n{d}\n")
        if self.pgbr_user:
            chown_tree(d, self.pgbr_user)

    def command(self, side: str, d: Path, repo: str) -> str:
        if side.startswith("pgbackrest"):
            asyn = (f"--archive-async --process-max=2 --spool-path={d.parent / 'spool'} "
                    if side == "pgbackrest-async" else "")
            cmd = (f"{self.pgbr} --config={self.pgbr_cfg} --stanza=bench --pg1-path={d} --repo1-path={repo} "
                   f"{asyn}archive-push %p")
            return " ".join(as_user([cmd], self.pgbr_user)) if self.pgbr_user else cmd
        extra = f" --level {self.a.level}" + (" --ahead 0" if side == "ours-sync" else "")
        return wal_command("push", repo, CLUSTER, extra)  # the line `pgincr wal-commands` prints

    def run_side(self, side: str, mode: str = "burst") -> dict:
        self.run_no += 1
        tag = f"{self.run_no:02d}-{mode}-{side}"
        rd = self.w / "runs" / tag
        d = rd / "data"
        self.make_fake_datadir(d, ready=mode == "burst")
        env = self.clean_env()
        if side == "ours-s3":
            env.update(self.s3.env())
            repo_url = f"s3://{self.s3.bucket}/bench"
            S3Repository(self.s3.client(), self.s3.bucket, "bench").create()
        elif side.startswith("pgbackrest"):
            shutil.copytree(self.pgbr_template, rd / "repo", symlinks=True)
            (rd / "spool").mkdir()
            if self.pgbr_user:
                chown_tree(rd, self.pgbr_user)
            repo_url = str(rd / "repo")
        else:
            repo_url = str(rd / "repo")
            LocalRepository(repo_url).create()  # a repository is created explicitly, before pushing
        cmd_t = self.command(side, d, repo_url)
        log_path = rd / "archive_command.log"
        exclude = {self.s3.proc.pid} if self.s3 and self.s3.proc else set()
        reap_zombies(exclude)  # e.g. the stopped source postmaster: its CPU must not land in this run
        before = child_pids()
        meter = Meter()
        lat, codes, failed = self.archive(d, cmd_t, env, log_path, self.a.rate if mode == "steady" else 0.0)
        wall = time.monotonic() - meter.t0
        (d / "postmaster.pid").unlink()  # the server stops: our resident pusher leaves
        drain = None
        if side.startswith("ours"):
            wait_lock_free(d / "pg_wal" / "pgincr_spool" / "lock")
            if side != "ours-sync":
                drain = time.monotonic() - meter.t0 - wall
        still = reap_adopted(before)  # our pusher, pgBackRest's async worker
        m = meter.stop()
        n_done = len(self.segs) if failed is None else self.segs.index(failed)
        raw = n_done * self.seg_size
        r = {"side": side, "mode": mode, "run": self.run_no, "command": cmd_t.replace(str(rd), "<RUN>"),
             "segments": n_done, "wall_s": wall, "segments_per_s": n_done / wall, "mb_per_s": raw / MB / wall,
             "raw_bytes": raw, "lat_p50_ms": 1000 * percentile(lat, .5), "lat_p95_ms": 1000 * percentile(lat, .95),
             "lat_max_ms": 1000 * max(lat), "lat_first_ms": 1000 * lat[0], "calls": len(lat),
             "nonzero_exits": sum(1 for c in codes if c != 0), "failed_at": failed, "drain_s": drain,
             "cpu_s": m["cpu_s"], "cpu_ms_per_segment": 1000 * m["cpu_s"] / max(n_done, 1), "meter": m,
             "unreaped": still}
        r.update(self.verify(side, d, rd, repo_url))
        r["compression_ratio"] = raw / r["stored_bytes"] if r.get("stored_bytes") else float("nan")
        r["ok"] = failed is None and r["nonzero_exits"] == 0 and r["verified"] and not still
        if not r["ok"]:
            r["log_tail"] = tail(log_path)
        # clean up outside the measurement
        if side == "ours-s3":
            S3Repository(self.s3.client(), self.s3.bucket, "bench").delete_prefix("")
        if not self.a.keep:
            shutil.rmtree(rd, ignore_errors=True)
        return r

    def archive(self, d: Path, cmd_t: str, env: dict, log_path: Path, rate: float):
        """PostgreSQL's archiver: one call per segment, in order; .ready -> .done after exit 0, a
        failed call retried after 1 s (3 tries). With `rate`, segment i becomes ready at t0 + i/rate
        (its call starts then, or when the previous one returned). (latencies, exit codes, the
        segment given up on or None)"""
        st = d / "pg_wal" / "archive_status"
        lat, codes, failed = [], [], None
        t0 = time.monotonic()
        with open(log_path, "ab") as log:
            for i, name in enumerate(self.segs):
                if rate:
                    pause = t0 + i / rate - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                    (st / f"{name}.ready").touch()
                    if self.pgbr_user:
                        chown_tree(st / f"{name}.ready", self.pgbr_user)
                cmd = cmd_t.replace("%p", f"pg_wal/{name}").replace("%f", name)
                for attempt in range(3):  # PostgreSQL retries a failed file (then waits a minute)
                    t = time.monotonic()
                    r = subprocess.run(cmd, shell=True, cwd=d, env=env, stdout=log, stderr=log)
                    lat.append(time.monotonic() - t)
                    codes.append(r.returncode)
                    if r.returncode == 0:
                        break
                    time.sleep(1.0)
                if r.returncode != 0:
                    failed = name
                    break
                os.rename(st / f"{name}.ready", st / f"{name}.done")
        return lat, codes, failed

    def verify(self, side: str, d: Path, rd: Path, repo_url: str) -> dict:
        """Every segment is in the repository; a sample of 4 decompresses byte-identical."""
        rng = random.Random(self.run_no)
        sample = sorted({self.segs[0], self.segs[len(self.segs) // 2], self.segs[-1], rng.choice(self.segs)})
        problems = []
        if side.startswith("pgbackrest"):
            arch = rd / "repo" / "archive" / "bench"
            files = {}
            for p in arch.rglob("*.zst"):
                files.setdefault(p.name[:24], []).append(p)
            missing = [s for s in self.segs if s not in files]
            stored = sum(files[s][0].stat().st_size for s in self.segs if s in files)
            for s in sample:
                if s in files:
                    with open(files[s][0], "rb") as f:
                        got = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
                    if got != (self.src_dir / s).read_bytes():
                        problems.append(f"{s} differs")
            extra = {}
        else:
            repo = (S3Repository(self.s3.client(), self.s3.bucket, "bench") if side == "ours-s3"
                    else LocalRepository(repo_url))
            have = set(list_segments(repo, CLUSTER).get(int(self.segs[0][:8], 16), []))
            missing = [s for s in self.segs if s not in have]
            stored = self._stored_bytes_ours(side, repo_url)
            for s in sample:
                if s in have and fetch_bytes(repo, CLUSTER, s) != (self.src_dir / s).read_bytes():
                    problems.append(f"{s} differs")
            spool = d / "pg_wal" / "pgincr_spool"
            markers = [f for f in os.listdir(spool) if f.endswith(".stored")] if spool.is_dir() else []
            logtxt = (spool / "walpush.log").read_text(errors="replace") if (spool / "walpush.log").exists() else ""
            m = re.search(r"pushed (\d+) file\(s\) ahead", logtxt)
            extra = {"pushed_ahead": int(m.group(1)) if m else 0, "leftover_markers": len(markers),
                     "pusher_log_errors": [ln for ln in logtxt.splitlines()
                                           if re.search(r"push ahead of .* failed|gave up|cannot start|pusher failed|"
                                                        r"NOT archived", ln)][:5]}
            if markers:
                problems.append(f"{len(markers)} marker(s) left")
            if extra["pusher_log_errors"]:
                problems.append("ahead pusher logged failures")
        if missing:
            problems.append(f"{len(missing)} segment(s) not in the repository, e.g. {missing[0]}")
        return {"stored_bytes": stored, "verified": not problems, "verify_problems": problems,
                "sample_checked": len(sample)} | extra

    def _stored_bytes_ours(self, side: str, repo_url: str) -> int:
        total = 0
        if side == "ours-s3":
            pages = self.s3.client().get_paginator("list_objects_v2").paginate(
                Bucket=self.s3.bucket, Prefix=f"bench/{CLUSTER}/wal/")
            for page in pages:
                total += sum(o["Size"] for o in page.get("Contents", []) if SEG_RE.match(o["Key"].rsplit("/", 1)[-1][:24]))
            return total
        for p in (Path(repo_url) / CLUSTER / "wal").rglob("*.zst"):
            if SEG_RE.match(p.name[:24]):
                total += p.stat().st_size
        return total

    def warm_up(self) -> None:
        """Source segments into the page cache; interpreter, modules and pgbackrest binary read once."""
        for name in self.segs:
            with open(self.src_dir / name, "rb") as f:
                while f.read(1 << 20):
                    pass
        subprocess.run([sys.executable, "-c", "import airflow_pg_incremental.core.wal, "
                        "airflow_pg_incremental.core.repository, zstandard" + (", boto3" if self.a.s3 else "")],
                       check=True, env=self.clean_env(), cwd="/")
        subprocess.run([sys.executable, "-S", str(WALCMD), "--help"], check=True, capture_output=True, cwd="/")
        if self.pgbr:
            subprocess.run([self.pgbr, "version"], check=True, capture_output=True)

    # -- step 5: pull capture ----------------------------------------------------------------
    def run_capture(self) -> dict:
        from airflow_pg_incremental.core.capture import capture_wal_pull

        n = self.a.segments
        t = time.monotonic()
        self.cap_pg = SandboxPostgres(self.w / "pg18-capture", major=18)
        self.cap_pg.start()
        version = self.cap_pg.psql("SHOW server_version").strip()
        seg = int(self.cap_pg.psql("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'").strip())
        repo_dir = self.w / "capture-repo"
        repo = LocalRepository(repo_dir)
        repo.create()
        conn = self.cap_pg.conninfo()
        r0 = capture_wal_pull(conn, repo, CLUSTER, level=self.a.level)  # creates the slot, stores what is there
        start = parse_lsn(r0["end_lsn"])
        print(f"PostgreSQL {version} (pull capture) started ({time.monotonic() - t:.1f} s); slot {r0['slot']} "
              f"created, first capture stored {r0['segments']} segment(s); generating {n} segments ...", flush=True)
        gen = generate_wal(self.cap_pg, start + n * seg, scale=max(1, n // 4))
        self.cap_pg.psql("SELECT pg_switch_wal()")  # not needed for completeness (upto is below); harmless
        upto = start + n * seg
        reap_zombies({self.s3.proc.pid} if self.s3 and self.s3.proc else set())
        meter = Meter()
        res = capture_wal_pull(conn, repo, CLUSTER, upto_lsn=format_lsn(upto), level=self.a.level)
        m = meter.stop()
        wall = m["interval_s"]
        names = list_segments(repo, CLUSTER).get(res["timeline"], [])
        new = [s for s in names if start // seg <= segno_of(s, seg) < upto // seg]
        problems = []
        if res["segments"] != n or len(new) != n:
            problems.append(f"captured {res['segments']} segment(s), {len(new)} in the repository, expected {n}")
        rng = random.Random(7)
        sample = sorted({new[0], new[-1], rng.choice(new)}) if new else []
        for s in sample:
            p = self.cap_pg.server.data_dir / "pg_wal" / s  # the slot keeps it on the server
            if p.exists() and fetch_bytes(repo, CLUSTER, s) != p.read_bytes():
                problems.append(f"{s} differs from the server's pg_wal copy")
        raw = res["raw_bytes"]
        out = {"side": "capture", "postgresql": version, "segments": res["segments"], "wall_s": wall,
               "call_duration_s": res.get("duration_s"), "segments_per_s": res["segments"] / wall,
               "mb_per_s": raw / MB / wall, "raw_bytes": raw, "stored_bytes": res["stored_bytes"],
               "compression_ratio": raw / res["stored_bytes"] if res["stored_bytes"] else float("nan"),
               "cpu_s": m["cpu_s"], "cpu_ms_per_segment": 1000 * m["cpu_s"] / max(res["segments"], 1),
               "meter": m, "generation": gen, "verified": not problems, "verify_problems": problems,
               "first_segment": res["first_segment"], "last_segment": res["last_segment"], "upto_lsn": format_lsn(upto)}
        out["ok"] = out["verified"]
        self.cap_pg.stop()
        self.cap_pg = None
        if not self.a.keep:
            shutil.rmtree(repo_dir, ignore_errors=True)
        print(f"  capture: {res['segments']} segments in {wall:.2f} s ({out['segments_per_s']:.1f} seg/s, "
              f"{out['mb_per_s']:.0f} MB/s)", flush=True)
        return out

    # -- driver ------------------------------------------------------------------------------
    def run(self) -> dict:
        a = self.a
        self.subreaper = become_subreaper()
        print(f"workdir {self.w}", flush=True)
        self.maybe_install()
        self.make_source()
        self.setup_pgbackrest()
        if not self.pgbr:
            print(f"pgBackRest rows skipped: {self.pgbr_note}", flush=True)
        # the source server is not needed any more (pgBackRest reads only pg_control): stop it, so
        # that it takes no CPU during the measurements
        self.src_pg.stop()
        if a.s3:
            t = time.monotonic()
            self.s3 = SeaweedS3(self.w / "s3")
            self.s3.start()
            print(f"SeaweedFS S3 started at {self.s3.endpoint_url} ({time.monotonic() - t:.1f} s)", flush=True)
        self.warm_up()

        pgbr = ([REF] + ([] if a.no_sync else ["pgbackrest"])) if self.pgbr else []
        sides = {"burst": ["ours"] + pgbr + ([] if a.no_sync else ["ours-sync"]) + (["ours-s3"] if a.s3 else [])}
        if a.rate:
            sides["steady"] = ["ours"] + pgbr[:1] + (["ours-s3"] if a.s3 else [])
        for mode, mode_sides in sides.items():
            what = ("burst: all segments .ready at the start" if mode == "burst"
                    else f"steady: {a.rate:g} segment(s)/s, each archived as it becomes ready")
            print(f"-- {what}", flush=True)
            for i in range(a.repeat):
                order = mode_sides if i % 2 == 0 else list(reversed(mode_sides))
                for side in order:
                    r = self.run_side(side, mode)
                    r["repeat"] = i + 1
                    self.runs.append(r)
                    print(f"  [{i + 1}/{a.repeat}] {SIDE_LABEL[side]:<17} {r['wall_s']:6.2f} s  "
                          f"{r['segments_per_s']:6.1f} seg/s  p50 {r['lat_p50_ms']:6.1f} ms  "
                          f"CPU {r['cpu_ms_per_segment']:6.1f} ms/seg  load {r['meter']['loadavg_1m_end']:4.2f}  "
                          f"other procs {r['meter']['other_cpu_pct']:4.0f}% "
                          f"{'ok' if r['ok'] else 'PROBLEM: ' + _problem(r)}", flush=True)
        capture = self.run_capture() if not a.no_capture else None

        med = {mode: {s: _medians([r for r in self.runs if r["side"] == s and r["mode"] == mode]) for s in ss}
               for mode, ss in sides.items()}
        report = {
            "benchmark": "WAL archiving: ours (walcmd.py push) vs pgBackRest archive-push async (and sync); pull capture",
            "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": {"segments": a.segments, "level": a.level, "repeat": a.repeat, "rate": a.rate, "s3": a.s3,
                       "sides": sides, "commands": {s: next(r["command"] for r in self.runs if r["side"] == s)
                                                    for ss in sides.values() for s in ss}},
            "environment": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "zstandard": zstandard.__version__, "platform": platform.platform(),
                            "pgbackrest": self.pgbr_version, "pgbackrest_note": self.pgbr_note,
                            "install": self.install_note, "subreaper": self.subreaper, "code": _git_state(),
                            "page_cache": "warm (segments read once before the runs)",
                            "loadavg_end": os.getloadavg()},
            "source": self.source, "medians": med, "ratios": _round_ratios(self.runs, sides),
            "capture": capture, "runs": self.runs,
        }
        report["checks"] = _checks(report)
        _print_report(report)
        return report


def _problem(r: dict) -> str:
    p = list(r["verify_problems"])
    if r["nonzero_exits"]:
        p.insert(0, f"{r['nonzero_exits']} non-zero exit(s)" + (f", gave up at {r['failed_at']}" if r["failed_at"] else ""))
    if r.get("unreaped"):
        p.append(f"helper process(es) {r['unreaped']} still running 30 s after the last call")
    return "; ".join(p)


def _whoami() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def _git_state() -> dict:
    root = PKG.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "airflow_pg_incremental"],
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
        return {"head": head, "package_changes_not_committed": [ln.strip() for ln in dirty]}
    except Exception:
        return {}


def _medians(runs: list[dict]) -> dict:
    keys = ("wall_s", "segments_per_s", "mb_per_s", "lat_p50_ms", "lat_p95_ms", "lat_max_ms", "lat_first_ms",
            "cpu_s", "cpu_ms_per_segment", "stored_bytes", "compression_ratio", "raw_bytes")
    out = {k: statistics.median(r[k] for r in runs) for k in keys}
    drains = [r["drain_s"] for r in runs if r.get("drain_s") is not None]
    out["drain_s"] = statistics.median(drains) if drains else None
    out["other_cpu_pct"] = statistics.median(r["meter"]["other_cpu_pct"] for r in runs)
    out["other_cpu_pct_max"] = max(r["meter"]["other_cpu_pct"] for r in runs)
    out["steal_pct"] = statistics.median(r["meter"]["steal_pct"] for r in runs)
    out["load_max"] = max(max(r["meter"]["loadavg_1m_start"], r["meter"]["loadavg_1m_end"]) for r in runs)
    out["ok"] = all(r["ok"] for r in runs)
    out["nonzero_exits"] = sum(r["nonzero_exits"] for r in runs)
    out["pushed_ahead"] = statistics.median(r.get("pushed_ahead", 0) for r in runs)
    for k in ("segments_per_s", "cpu_ms_per_segment", "lat_p50_ms"):
        out[f"{k}_min"] = min(r[k] for r in runs)
        out[f"{k}_max"] = max(r[k] for r in runs)
    out["n"] = len(runs)
    return out


def _round_ratios(runs: list[dict], sides: dict) -> dict:
    """ours / reference per round (both measured in the same round), for throughput and CPU."""
    out = {}
    for mode, ss in sides.items():
        for ref in (s for s in (REF, "pgbackrest") if s in ss):
            for key in ("segments_per_s", "cpu_ms_per_segment"):
                per = []
                for i in sorted({r["repeat"] for r in runs if r["mode"] == mode}):
                    o = [r[key] for r in runs if r["mode"] == mode and r["repeat"] == i and r["side"] == "ours"]
                    b = [r[key] for r in runs if r["mode"] == mode and r["repeat"] == i and r["side"] == ref]
                    if o and b and b[0]:
                        per.append(o[0] / b[0])
                out[f"{mode}:{key}:ours/{ref}"] = ratio_summary(per)
    return out


def _checks(rep: dict) -> list[dict]:
    med, ratios = rep["medians"], rep["ratios"]
    out = []
    burst = med["burst"]
    if REF in burst:
        ratio = burst["ours"]["segments_per_s"] / burst[REF]["segments_per_s"]
        spread = ratios.get(f"burst:segments_per_s:ours/{REF}", {})
        out.append({"check": "burst throughput ours / pgBackRest async archive-push (medians)", "value": ratio,
                    "target": f">= {TARGET_RATIO}", "pass": ratio >= TARGET_RATIO,
                    "per_round": spread.get("per_round")})
    else:
        out.append({"check": "burst throughput ours / pgBackRest async archive-push", "value": None,
                    "target": f">= {TARGET_RATIO}", "pass": None, "why": rep["environment"]["pgbackrest_note"]})
    for mode, m in med.items():
        for s, v in m.items():
            out.append({"check": f"{mode} {SIDE_LABEL[s]}: every archive_command exited 0, all segments archived, "
                                 "sample byte-identical, no helper left running", "value": None, "target": "yes",
                        "pass": v["ok"]})
    if rep["capture"]:
        out.append({"check": "pull capture: all segments stored, sample byte-identical", "value": None,
                    "target": "yes", "pass": rep["capture"]["ok"]})
    return out


def _print_table(mode: str, med: dict, sides: list[str], n: int, repeat: int) -> None:
    cols = [SIDE_LABEL[s] for s in sides]
    ref = REF if REF in med else None
    rows = [
        (f"wall time for {n} segments (s)", "wall_s", "{:.2f}"),
        ("throughput (segments/s)", "segments_per_s", "{:.1f}"),
        ("throughput (WAL MB/s)", "mb_per_s", "{:.1f}"),
        ("per call p50 (ms)", "lat_p50_ms", "{:.1f}"),
        ("per call p95 (ms)", "lat_p95_ms", "{:.1f}"),
        ("per call max (ms)", "lat_max_ms", "{:.1f}"),
        ("first call (ms)", "lat_first_ms", "{:.1f}"),
        ("CPU, all processes (s)", "cpu_s", "{:.2f}"),
        ("CPU per segment (ms)", "cpu_ms_per_segment", "{:.1f}"),
        ("stored (MB)", "stored_bytes", "mb"),
        ("compression ratio", "compression_ratio", "{:.2f}"),
        ("pusher left after the last call (s)", "drain_s", "{:.2f}"),
        ("other processes' CPU (% of all CPUs)", "other_cpu_pct", "{:.0f}"),
        ("load average (1 min), max", "load_max", "{:.2f}"),
        ("archived + verified", "ok", "yesno"),
    ]
    spans = {"segments_per_s": "{:.1f}", "cpu_ms_per_segment": "{:.1f}", "lat_p50_ms": "{:.1f}"}
    w0 = max(len(r[0]) for r in rows) + 2
    wc = max(14, max(len(c) for c in cols) + 2)
    head = f"{'':<{w0}}" + "".join(f"{c:>{wc}}" for c in cols) + (f"{'ours/async':>12}" if ref else "")
    print(head)
    print("-" * len(head))
    for label, key, fmt in rows:
        cells = []
        for s in sides:
            v = med[s].get(key)
            if v is None:
                cells.append(f"{'-':>{wc}}")
            elif fmt == "mb":
                cells.append(f"{v / MB:>{wc}.1f}")
            elif fmt == "yesno":
                cells.append(f"{'yes' if v else 'NO':>{wc}}")
            else:
                cells.append(f"{fmt.format(v):>{wc}}")
        tail_ = ""
        if ref and fmt != "yesno" and key not in ("drain_s", "other_cpu_pct", "load_max"):
            rv, ov = med[ref].get(key), med["ours"].get(key)
            tail_ = f"{ov / rv:>12.2f}" if rv and ov is not None else f"{'-':>12}"
        print(f"{label:<{w0}}" + "".join(cells) + tail_)
        if key in spans and repeat > 1:
            f = spans[key]
            rng = [f"{f.format(med[s][key + '_min'])}-{f.format(med[s][key + '_max'])}" for s in sides]
            print(f"{'  min-max over the runs':<{w0}}" + "".join(f"{x:>{wc}}" for x in rng))


def _print_report(rep: dict) -> None:
    med, cfg, env, src = rep["medians"], rep["config"], rep["environment"], rep["source"]
    n, seg = cfg["segments"], src["segment_size"]
    print()
    print(f"WAL archiving benchmark - {n} segments x {seg // 1048576} MiB ({n * seg / MB:.1f} MB) of PostgreSQL "
          f"{src['postgresql']} pgbench WAL, zstd level {cfg['level']}, {env['cpus']} CPUs")
    g = src["generation"]
    print(f"WAL: pgbench -i -s {g['scale']} ({g['init_wal_bytes'] / MB:.0f} MB), then CHECKPOINT + TPC-B rounds "
          f"({g['tpcb_wal_bytes'] / MB:.0f} MB, full-page images); segments {src['first']} .. {src['last']}")
    print("simulated archiver: one archive_command per segment, in order, cwd = data dir, %p = pg_wal/<name>, "
          ".ready -> .done after exit 0;")
    print(f"{'median of ' + str(cfg['repeat']) + ' interleaved rounds (order alternating)' if cfg['repeat'] > 1 else 'single run'}"
          "; MB = 10^6 bytes")
    if env["pgbackrest"]:
        print(f"pgBackRest: {env['pgbackrest']}, compress-type=zst, compress-level={cfg['level']}; async: "
              "--archive-async --process-max=2 --spool-path (per run); sync: archive-async=n")
    for mode, m in med.items():
        print()
        print("BURST: all segments .ready when the loop starts (a backlog being drained)" if mode == "burst" else
              f"STEADY: one segment becomes .ready every {1 / cfg['rate']:.2f} s ({cfg['rate']:g}/s) and is archived "
              "at once")
        _print_table(mode, m, cfg["sides"][mode], n, cfg["repeat"])
    print()
    print("wall time = first call start to last call exit, as the archiver sees it. CPU = user+sys of every process "
          "of the side,\nincluding ours' resident pusher and pgBackRest's async worker (re-parented to the benchmark "
          "and waited for)" + ("" if env["subreaper"] else " [NOT counted: could not become a subreaper]")
          + ".\nThe \"server\" stops after the last call (postmaster.pid removed): ours' pusher leaves then, its idle "
          "wait (--idle-exit 30 s) is not part of the run.")
    if REF in med["burst"]:
        print("per-round ratios ours / pgBackRest async (same round):")
        for k, v in rep["ratios"].items():
            if v["median"] is not None:
                print(f"  {k:<48} median {v['median']:.2f}  min {v['min']:.2f}  max {v['max']:.2f}  "
                      f"[{', '.join(f'{x:.2f}' for x in v['per_round'])}]")
    allm = [v for m in med.values() for v in m.values()]
    print(f"noise: other processes used up to {max(v['other_cpu_pct_max'] for v in allm):.0f}% of the machine's CPU "
          f"during a run (median {statistics.median(v['other_cpu_pct'] for v in allm):.0f}%), steal "
          f"{max(v['steal_pct'] for v in allm):.0f}%; load average up to {max(v['load_max'] for v in allm):.2f}, "
          f"at the end {os.getloadavg()[0]:.2f}")
    cap = rep["capture"]
    if cap:
        print()
        print(f"Pull capture - capture_wal_pull() over {cap['segments']} segments of PostgreSQL {cap['postgresql']} "
              f"pgbench WAL (pg_receivewal + in-process zstd level {cfg['level']}), one call")
        print(f"  wall {cap['wall_s']:.2f} s   {cap['segments_per_s']:.1f} segments/s   {cap['mb_per_s']:.1f} MB/s   "
              f"CPU {cap['cpu_s']:.2f} s ({cap['cpu_ms_per_segment']:.1f} ms/segment)   stored "
              f"{cap['stored_bytes'] / MB:.1f} MB (ratio {cap['compression_ratio']:.2f})   other processes' CPU "
              f"{cap['meter']['other_cpu_pct']:.0f}%   verified: {'yes' if cap['ok'] else 'NO'}")
    print()
    for c in rep["checks"]:
        if c["pass"] is None:
            print(f"SKIP  {c['check']} (target {c['target']}): {c.get('why', '')}")
        elif c["value"] is None:
            print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['check']}")
        else:
            print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['check']}: {c['value']:.2f} (target {c['target']})")
    for mode, m in med.items():
        if REF in m:
            print(f"info  {mode}: CPU per segment ours {m['ours']['cpu_ms_per_segment']:.1f} ms, pgBackRest async "
                  f"{m[REF]['cpu_ms_per_segment']:.1f} ms (ratio {m['ours']['cpu_ms_per_segment'] / m[REF]['cpu_ms_per_segment']:.2f})")
    burst = med["burst"]
    if REF in burst:
        pb = burst[REF]["segments_per_s"]
        for s in burst:
            if s not in ("ours", REF):
                print(f"info  burst {SIDE_LABEL[s]} / pgBackRest async throughput: {burst[s]['segments_per_s'] / pb:.2f}")
        if "pgbackrest" in burst:
            print(f"info  burst ours / pgBackRest sync throughput: "
                  f"{burst['ours']['segments_per_s'] / burst['pgbackrest']['segments_per_s']:.2f} (secondary line)")
        if cap:
            print(f"info  pull capture / pgBackRest async throughput: {cap['segments_per_s'] / pb:.2f} (different WAL: "
                  "PostgreSQL 18; no target)")


# ---------------------------------------------------------------------------------------------


def kill_adopted(exclude: set[int]) -> None:
    """Ahead pushers (our descendants) still running at the end: end them, by pid."""
    for c in psutil.Process().children():
        try:
            if c.pid not in exclude and any("walcmd.py" in a for a in c.cmdline()):
                c.kill()
        except psutil.Error:
            pass
    reap_zombies(exclude)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--segments", type=int, default=64, help="WAL segments per run (default 64, 16 MiB each)")
    ap.add_argument("--level", type=int, default=3, help="zstd level for every side (default 3)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per side; medians reported (default 1)")
    ap.add_argument("--workdir", help="where to put the run (default: a fresh directory under /var/tmp); an "
                                      "existing directory gets a fresh sub-directory")
    ap.add_argument("--s3", action="store_true", help="also measure ours into SeaweedFS S3")
    ap.add_argument("--json", help="write all results to this JSON file")
    ap.add_argument("--keep", action="store_true", help="do not remove the work directory (and run dirs) at the end")
    ap.add_argument("--no-install", action="store_true",
                    help="do not apt-get install postgresql-15 / pgbackrest when missing")
    ap.add_argument("--no-capture", action="store_true", help="skip the pull-capture measurement (PostgreSQL 18)")
    ap.add_argument("--rate", type=float, default=0.0,
                    help="also measure a steady rate: one segment becomes ready every 1/RATE s (e.g. 2); 0: burst only")
    ap.add_argument("--no-sync", action="store_true",
                    help="skip the secondary sync lines (pgBackRest archive-async=n, ours --ahead 0)")
    a = ap.parse_args(argv)
    if not 1 <= a.level <= 19:
        ap.error("--level must be 1..19 (pgBackRest's zst range)")
    if a.segments < 2 or a.repeat < 1:
        ap.error("--segments must be >= 2 and --repeat >= 1")

    def stoppers(b):
        exclude = {b.s3.proc.pid} if b.s3 and b.s3.proc else set()
        return ([("end the ahead pushers", lambda: kill_adopted(exclude))]
                + ([("stop SeaweedFS", b.s3.stop)] if b.s3 is not None else [])
                + [("stop PostgreSQL", pg.stop) for pg in (b.src_pg, b.cap_pg) if pg is not None])

    return run_bench(a, "pgincr-walbench-", Bench, stoppers)


if __name__ == "__main__":
    sys.exit(main())
