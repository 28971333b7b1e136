#!/usr/bin/env python
"""Benchmark: our full backup vs pgBackRest and raw `pg_basebackup | zstd`, on one throw-away
PostgreSQL (15 from Debian by default: it has zstd, so our default compresses on the server).

    .venv/bin/python bench/bench_full.py --scale 50 [--data pgbench|mixed] [--mixed-mb 1000]
                                         [--major 15] [--level 3] [--threads N] [--repeat 3]
                                         [--workdir DIR] [--s3] [--json FILE] [--keep]

Measured for each side, in the same run and against the same server, interleaved:
  * ours-local  take_full_backup(conninfo, LocalRepository(dir), 'bench') in a child Python process,
                with the defaults a user gets (compression auto, threads = cores)
  * ours-client the same with compression client (pg_basebackup compresses; --client-side)
  * pgbackrest  pgbackrest --type=full backup (zst level, process-max = cores, local repository,
                run as the database's OS user; the repository is emptied between runs, unmeasured)
  * reference   pg_basebackup -D - -Ft -X fetch -w -c fast | zstd -<level> -T<cores> -o FILE
  * ours-s3     (with --s3) take_full_backup into S3Repository on a local SeaweedFS
--data mixed adds a less compressible table (md5 text, jsonb; about 2.5x at zstd-3) of --mixed-mb
MB to the pgbench data. Both repositories fsync what they store; the reference's fsync is timed
apart.

wall time, raw throughput, peak RSS of the whole process tree (sampled every 20 ms, summed over the
process and all its descendants), stored bytes and compression ratio. Order alternates across
repeats (ours, ref, ref, ours, ...); with --repeat > 1 the medians are reported. Exit code is 0
whatever the numbers are; non-zero only when something crashed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import zstandard

from airflow_pg_incremental.core.backup_stream import default_threads
from airflow_pg_incremental.core.binaries import find_program
from airflow_pg_incremental.core.server import as_user, chown_tree
from airflow_pg_incremental.core.repository import S3Repository
from airflow_pg_incremental.sandbox import SandboxPostgres, SeaweedS3
from _common import run_bench, tail  # noqa: E402
from bench_incr import clean_env  # noqa: E402

HERE = Path(__file__).resolve().parent
CHILD = HERE / "ours_backup_child.py"
MB = 1_000_000  # sizes, throughput and memory are in MB = 10^6 bytes
TARGET_WALL_RATIO = 1.10   # ours / pg_basebackup | zstd
TARGET_PGBR_RATIO = 0.85   # ours / pgBackRest (0.6 with server-side compression)
TARGET_PGBR_RATIO_SERVER = 0.6
TARGET_PEAK_MB = 300.0
SAMPLE_INTERVAL = 0.020


# ---------------------------------------------------------------------------------------------
class TreeSampler(threading.Thread):
    """Samples the summed RSS of some root processes and all their descendants (psutil), and keeps
    each process's own RSS high-water mark (VmHWM) as a cross-check for spikes between samples.

    A child that has the same name as its parent in the tree and appears for the first time is
    most likely between fork and exec (e.g. Python spawning pg_basebackup): it still shows its
    parent's address space, so counting it would double the parent's RSS for that one sample. Such
    a process is counted from its second sample on (a real long-lived worker process is then
    counted normally)."""

    def __init__(self, interval: float = SAMPLE_INTERVAL):
        super().__init__(daemon=True)
        self.interval = interval
        self.roots: list[int] = []
        self.peak = 0
        self.peak_breakdown: dict[str, int] = {}
        self.samples = 0
        self.max_procs = 0
        self._stop_ev = threading.Event()
        self._lock = threading.Lock()
        self._cache: dict[int, psutil.Process] = {}
        self._times_seen: dict[int, int] = {}
        self.hwm: dict[int, tuple[str, int]] = {}  # pid -> (name, VmHWM bytes) of the latest snapshot

    def add_root(self, pid: int) -> None:
        with self._lock:
            self.roots.append(pid)
        self.sample()

    def _proc(self, pid: int) -> psutil.Process:
        p = self._cache.get(pid)
        if p is None:
            p = self._cache[pid] = psutil.Process(pid)
        return p

    def sample(self) -> None:
        with self._lock:
            total, breakdown, seen, names = 0, {}, set(), {}
            for r in list(self.roots):
                try:
                    rp = self._proc(r)
                    tree = [rp] + rp.children(recursive=True)  # parents come before their children
                except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                    continue
                for p in tree:
                    if p.pid in seen:
                        continue
                    seen.add(p.pid)
                    st = _proc_status(p.pid)
                    try:
                        rss = p.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                        continue
                    if not st:
                        continue
                    name, ppid, hwm = st
                    if hwm == 0 and rss == 0:
                        continue  # zombie
                    names[p.pid] = name
                    n = self._times_seen[p.pid] = self._times_seen.get(p.pid, 0) + 1
                    if n == 1 and ppid in names and names[ppid] == name and p.pid not in self.roots:
                        continue  # not exec'd yet: shares/copies its parent's pages
                    self.hwm[p.pid] = (name, hwm)
                    total += rss
                    breakdown[name] = breakdown.get(name, 0) + rss
            self.samples += 1
            self.max_procs = max(self.max_procs, len(seen))
            if total > self.peak:
                self.peak = total
                self.peak_breakdown = breakdown

    def hwm_by_name(self) -> dict[str, int]:
        """Largest own high-water mark per program name (max over its processes)."""
        out: dict[str, int] = {}
        for name, v in self.hwm.values():
            out[name] = max(out.get(name, 0), v)
        return out

    def run(self) -> None:
        while not self._stop_ev.wait(self.interval):
            self.sample()

    def stop(self) -> None:
        self._stop_ev.set()
        self.join()


def _proc_status(pid: int) -> tuple[str, int, int] | None:
    """(Name, PPid, VmHWM bytes) from one read of /proc/<pid>/status. VmHWM is the high-water mark
    of the current address space; getrusage's ru_maxrss is not usable here because Linux carries
    the RSS of the (Python) parent at fork time over the exec."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    fields = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        fields[k] = v.strip()
    name = fields.get("Name", "?")
    try:
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        exe = name
    if exe and not exe.startswith(name) and not name.startswith(exe):
        name = f"{name} ({exe})"  # e.g. Debian's pg_wrapper: 'pg_basebackup (perl)'
    try:
        hwm = int(fields.get("VmHWM", "0 kB").split()[0]) * 1024
        return name, int(fields.get("PPid", "0")), hwm
    except (ValueError, IndexError):
        return None


def _kill_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.returncode is None and p.poll() is None:
            try:
                p.kill()
                p.wait(10)
            except Exception:
                pass




# ---------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, workdir: Path):
        self.a = args
        self.w = workdir
        self.pg: SandboxPostgres | None = None
        self.s3: SeaweedS3 | None = None
        self.pg_basebackup = ""
        self.zstd_cli = None
        self.runs: list[dict] = []
        self.run_no = 0
        self.threads = args.threads if args.threads is not None else default_threads()
        self.pgbr_exe = None if args.no_pgbackrest else shutil.which("pgbackrest")

    # -- environment -------------------------------------------------------------------------
    def libpq_env(self) -> dict:
        """PG* variables (host, port, user, password) for the children: never on a command line."""
        env = {k: v for k, v in os.environ.items()
               if not (k.startswith("AWS_") or (k.startswith("PG") and not k.startswith("PGINCR_")))}
        env.pop("PGINCR_S3_ENDPOINT_URL", None)
        env.update(self.pg.conninfo().env())
        return env

    def ref_compressor_cmd(self, out: Path) -> tuple[list[str], str]:
        lvl, thr = self.a.level, self.threads
        if self.zstd_cli:
            cmd = [self.zstd_cli, f"-{lvl}", "-q", f"-T{thr or 1}", "-o", str(out)]
            if lvl > 19:
                cmd.insert(1, "--ultra")
            return cmd, f"zstd CLI -{lvl} -T{thr or 1}"
        code = ("import sys, zstandard; out = open(sys.argv[1], 'wb'); "
                "zstandard.ZstdCompressor(level=int(sys.argv[2]), threads=int(sys.argv[3]), write_checksum=True)"
                ".copy_stream(sys.stdin.buffer, out, read_size=1 << 20, write_size=1 << 20); out.close()")
        return [sys.executable, "-c", code, str(out), str(lvl), str(thr)], f"python-zstandard level {lvl} threads {thr}"

    def pg_basebackup_cmd(self) -> list[str]:
        return [self.pg_basebackup, "-D", "-", "-Ft", "-X", "fetch", "-w", "-c", "fast"]

    # -- one measurement -------------------------------------------------------------------
    def _measure(self, start) -> tuple[list[subprocess.Popen], float, TreeSampler]:
        """start(sampler) -> list of Popen roots (each added to the sampler as soon as it exists)."""
        sampler = TreeSampler()
        procs: list[subprocess.Popen] = []
        t0 = time.monotonic()
        try:
            sampler.start()
            procs = start(sampler)
            for p in procs:
                p.wait()
            wall = time.monotonic() - t0
        except BaseException:
            _kill_all(procs)
            raise
        finally:
            sampler.stop()
        return procs, wall, sampler

    def run_ours(self, kind: str) -> dict:
        self.run_no += 1
        tag = f"{self.run_no:02d}-{kind}"
        out_file, err_file = self.w / f"{tag}.out", self.w / f"{tag}.err"
        env = self.libpq_env()
        cmd = [sys.executable, str(CHILD), "--level", str(self.a.level)]
        if self.a.threads is not None:
            cmd += ["--threads", str(self.a.threads)]
        if kind == "ours-client":
            cmd += ["--compression", "client"]
        if kind in ("ours-local", "ours-client"):
            repo_dir = self.w / f"repo-{tag}"
            cmd += ["--repo", "local", "--dir", str(repo_dir)]
        else:
            env.update(self.s3.env())
            cmd += ["--repo", "s3", "--bucket", self.s3.bucket, "--prefix", "bench"]

        def start(sampler):
            with open(out_file, "wb") as so, open(err_file, "wb") as se:
                p = subprocess.Popen(cmd, stdout=so, stderr=se, env=env, cwd=str(self.w))
            sampler.add_root(p.pid)
            return [p]

        procs, wall, sampler = self._measure(start)
        if procs[0].returncode != 0:
            raise RuntimeError(f"{kind}: our backup failed (exit {procs[0].returncode}):\n{tail(err_file)}")
        res = json.loads(out_file.read_text())
        meta = res["meta"]
        raw, stored = meta["raw_bytes"], meta["stored_bytes"]
        r = {
            "side": kind, "run": self.run_no, "wall_s": res["call_s"], "process_wall_s": wall,
            "startup_s": res["import_s"], "raw_bytes": raw, "stored_bytes": stored,
            "ratio": raw / max(stored, 1), "throughput_mb_s": raw / MB / res["call_s"],
            "peak_rss_mb": sampler.peak / MB, "peak_breakdown_mb": {k: round(v / MB, 1) for k, v in
                                                                  sampler.peak_breakdown.items()},
            "hwm_mb": {k: v / MB for k, v in sampler.hwm_by_name().items()} | (
                {"python": res["vm_hwm_bytes"] / MB} if res.get("vm_hwm_bytes") else {}),
            "samples": sampler.samples, "max_procs": sampler.max_procs, "backup_id": meta["backup_id"],
            "file_count": meta.get("file_count"), "compression": meta.get("compression"),
        }
        # clean up outside the measurement
        if kind in ("ours-local", "ours-client"):
            shutil.rmtree(repo_dir, ignore_errors=True)
        else:
            S3Repository(self.s3.client(), self.s3.bucket, "bench").delete_prefix("")
        for f in (out_file, err_file):
            f.unlink(missing_ok=True)
        return r

    def run_ref(self) -> dict:
        self.run_no += 1
        tag = f"{self.run_no:02d}-ref"
        out, err_pb, err_z = self.w / f"{tag}.tar.zst", self.w / f"{tag}.pb.err", self.w / f"{tag}.z.err"
        env = self.libpq_env()
        zcmd, _ = self.ref_compressor_cmd(out)

        def start(sampler):
            procs = []
            with open(err_pb, "wb") as e1, open(err_z, "wb") as e2:
                pb = subprocess.Popen(self.pg_basebackup_cmd(), stdout=subprocess.PIPE, stderr=e1, env=env, cwd="/")
                procs.append(pb)
                sampler.add_root(pb.pid)
                try:
                    z = subprocess.Popen(zcmd, stdin=pb.stdout, stderr=e2, cwd="/")
                finally:
                    pb.stdout.close()  # only the compressor holds the read end now
                procs.append(z)
                sampler.add_root(z.pid)
            return procs

        procs, wall, sampler = self._measure(start)
        if any(p.returncode != 0 for p in procs):
            raise RuntimeError(f"reference failed: pg_basebackup exit {procs[0].returncode} ({tail(err_pb)}), "
                               f"compressor exit {procs[1].returncode} ({tail(err_z)})")
        stored = out.stat().st_size
        t = time.monotonic()
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)  # ours fsyncs its objects; reported separately, not part of wall_s
        finally:
            os.close(fd)
        fsync_s = time.monotonic() - t
        raw = 0
        with open(out, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True) as zr:
            while chunk := zr.read(1 << 20):
                raw += len(chunk)
        r = {
            "side": "reference", "run": self.run_no, "wall_s": wall, "process_wall_s": wall, "startup_s": 0.0,
            "raw_bytes": raw, "stored_bytes": stored, "ratio": raw / max(stored, 1),
            "throughput_mb_s": raw / MB / wall, "peak_rss_mb": sampler.peak / MB,
            "peak_breakdown_mb": {k: round(v / MB, 1) for k, v in sampler.peak_breakdown.items()},
            "hwm_mb": {k: v / MB for k, v in sampler.hwm_by_name().items()},
            "samples": sampler.samples, "max_procs": sampler.max_procs, "fsync_after_s": fsync_s,
        }
        for f in (out, err_pb, err_z):
            f.unlink(missing_ok=True)
        return r

    # -- pgBackRest --------------------------------------------------------------------------
    def setup_pgbr(self) -> None:
        """A stanza on the same server: zst at our level, process-max = the threads we use, a local
        repository owned by the database's OS user (pgBackRest reads the data directory itself)."""
        b = self.w / "pgbr"
        for sub in ("", "repo", "log", "lock", "spool"):
            (b / sub).mkdir(mode=0o750, exist_ok=True)
        srv = self.pg.server
        self.pgbr_cfg = b / "pgbackrest.conf"
        self.pgbr_cfg.write_text(
            f"[global]\nrepo1-path={b / 'repo'}\nrepo1-retention-full=9\ncompress-type=zst\n"
            f"compress-level={self.a.level}\nprocess-max={self.threads}\nstart-fast=y\narchive-check=n\n"
            f"log-level-console=warn\nlog-level-stderr=warn\nlog-level-file=off\nlog-path={b / 'log'}\n"
            f"lock-path={b / 'lock'}\nspool-path={b / 'spool'}\n"
            f"\n[bench]\npg1-path={srv.data_dir}\npg1-port={srv.port}\npg1-socket-path={srv.socket_dir}\n"
            "pg1-user=postgres\n")
        chown_tree(b, self.pg.os_user)
        self.pgbr_version = self._pgbr("version").stdout.strip()

    def _pgbr(self, *args: str) -> subprocess.CompletedProcess:
        cmd = as_user([self.pgbr_exe, f"--config={self.pgbr_cfg}", "--stanza=bench", *args], self.pg.os_user)
        r = subprocess.run(cmd, capture_output=True, text=True, cwd="/", env=clean_env())
        if r.returncode != 0:
            raise RuntimeError(f"pgbackrest {args[-1]} failed (exit {r.returncode}): {r.stderr or r.stdout}")
        return r

    def run_pgbr(self) -> dict:
        self.run_no += 1
        repo = self.w / "pgbr" / "repo"
        for p in repo.iterdir():  # a fresh stanza each run, unmeasured
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        self._pgbr("stanza-create")
        cmd = as_user([self.pgbr_exe, f"--config={self.pgbr_cfg}", "--stanza=bench", "--type=full", "backup"],
                      self.pg.os_user)
        err = self.w / f"{self.run_no:02d}-pgbr.err"

        def start(sampler):
            with open(err, "wb") as e:
                p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=e, cwd="/", env=clean_env())
            sampler.add_root(p.pid)
            return [p]

        procs, wall, sampler = self._measure(start)
        if procs[0].returncode != 0:
            raise RuntimeError(f"pgbackrest backup failed (exit {procs[0].returncode}): {tail(err)}")
        info = json.loads(self._pgbr("--output=json", "info").stdout)[0]["backup"][-1]["info"]
        raw, stored = info["size"], info["repository"]["delta"]
        err.unlink(missing_ok=True)
        return {
            "side": "pgbackrest", "run": self.run_no, "wall_s": wall, "process_wall_s": wall, "startup_s": 0.0,
            "raw_bytes": raw, "stored_bytes": stored, "ratio": raw / max(stored, 1),
            "throughput_mb_s": raw / MB / wall, "peak_rss_mb": sampler.peak / MB,
            "peak_breakdown_mb": {k: round(v / MB, 1) for k, v in sampler.peak_breakdown.items()},
            "hwm_mb": {k: v / MB for k, v in sampler.hwm_by_name().items()},
            "samples": sampler.samples, "max_procs": sampler.max_procs,
        }

    def load_mixed(self, mb: int) -> None:
        """A less compressible table: md5 hex text, a random-ish text and a jsonb per row (~2.5x
        at zstd-3), about `mb` MB on disk."""
        rows = max(1, mb * MB // 260)
        self.pg.psql("CREATE TABLE bench_mixed (id bigint, h text, t text, j jsonb)")
        step = 200_000
        for lo in range(1, rows + 1, step):
            hi = min(rows, lo + step - 1)
            self.pg.psql(f"INSERT INTO bench_mixed SELECT g, md5(g::text), md5(random()::text) || ' ' || "
                         f"md5((g % 9973)::text) || ' order ' || (g % 1000), jsonb_build_object('id', g, 'v', "
                         f"round((random() * 1000)::numeric, 2), 'tag', 'tag-' || (g % 50), 'k', "
                         f"substr(md5(random()::text), 1, 12)) FROM generate_series({lo}, {hi}) g")

    def warm_up(self) -> float:
        t = time.monotonic()
        r = subprocess.run(self.pg_basebackup_cmd(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           env=self.libpq_env(), cwd="/")
        if r.returncode != 0:
            raise RuntimeError(f"warm-up pg_basebackup failed: {r.stderr.decode(errors='replace')}")
        return time.monotonic() - t

    # -- driver ----------------------------------------------------------------------------
    def run(self) -> dict:
        a = self.a
        self.zstd_cli = None if a.ref_compressor == "python" else shutil.which("zstd")
        if a.ref_compressor == "cli" and not self.zstd_cli:
            raise SystemExit("--ref-compressor cli: no zstd program on PATH")
        _, ref_desc = self.ref_compressor_cmd(Path("/dev/null"))

        print(f"workdir {self.w}", flush=True)
        t = time.monotonic()
        self.pg = SandboxPostgres(self.w / "pg", major=a.major)  # assigned before start(): cleanup must see it
        self.pg.start()
        print(f"PostgreSQL {a.major} started on 127.0.0.1:{self.pg.port} ({time.monotonic() - t:.1f} s); "
              f"pgbench -i -s {a.scale} ...", flush=True)
        t = time.monotonic()
        self.pg.pgbench_init(a.scale)
        if a.data == "mixed":
            self.load_mixed(a.mixed_mb)
        # settle the data first: an autovacuum of the fresh tables during the rounds would add WAL
        # (and so bytes) to the later rounds' backups only
        self.pg.psql("VACUUM (FREEZE, ANALYZE)")
        self.pg.psql("CHECKPOINT")
        db_bytes = int(self.pg.psql("SELECT sum(pg_database_size(oid)) FROM pg_database").strip())
        server_version = self.pg.psql("SHOW server_version").strip()
        print(f"pgbench data loaded in {time.monotonic() - t:.1f} s; cluster size {db_bytes / MB:.1f} MB",
              flush=True)
        self.pg_basebackup = find_program("pg_basebackup", a.major)
        if self.pgbr_exe:
            self.setup_pgbr()
        if a.s3:
            t = time.monotonic()
            self.s3 = SeaweedS3(self.w / "s3")
            self.s3.start()
            print(f"SeaweedFS S3 started at {self.s3.endpoint_url} ({time.monotonic() - t:.1f} s)", flush=True)

        warm = self.warm_up()
        print(f"warm-up: one unmeasured pg_basebackup to /dev/null ({warm:.1f} s) so every measured run reads "
              "from a warm page cache (dropping the cache is not done)", flush=True)

        sides = (["ours-local"] + (["ours-client"] if a.client_side else []) + (["pgbackrest"] if self.pgbr_exe else [])
                 + ["reference"] + (["ours-s3"] if a.s3 else []))
        for i in range(a.repeat):
            order = sides if i % 2 == 0 else list(reversed(sides))
            for side in order:
                r = (self.run_ref() if side == "reference" else self.run_pgbr() if side == "pgbackrest"
                     else self.run_ours(side))
                r["repeat"] = i + 1
                self.runs.append(r)
                print(f"  [{i + 1}/{a.repeat}] {side:<11} wall {r['wall_s']:6.2f} s  peak {r['peak_rss_mb']:6.1f} MB"
                      f"  load {os.getloadavg()[0]:.2f}"
                      f"  raw {r['raw_bytes'] / MB:8.1f} MB  stored {r['stored_bytes'] / MB:7.1f} MB"
                      f"  ({r['samples']} RSS samples)", flush=True)

        med = {s: _medians([r for r in self.runs if r["side"] == s]) for s in sides}
        ours_where = next((r["compression"]["where"] for r in self.runs if r["side"] == "ours-local"), None)
        checks = _checks(med, _round_ratios(self.runs, sides), ours_where)
        report = {
            "benchmark": "full backup: ours vs pg_basebackup | zstd",
            "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": {"scale": a.scale, "level": a.level, "threads": self.threads, "repeat": a.repeat, "s3": a.s3,
                       "data": a.data, "mixed_mb": a.mixed_mb if a.data == "mixed" else None, "major": a.major,
                       "ours_compression": ours_where, "pgbackrest": getattr(self, "pgbr_version", None),
                       "sample_interval_s": SAMPLE_INTERVAL, "reference_compressor": ref_desc},
            "environment": {"postgresql": server_version, "cluster_bytes": db_bytes, "cpus": os.cpu_count(),
                            "python": platform.python_version(), "zstandard": zstandard.__version__,
                            "zstd_cli": _zstd_version(self.zstd_cli), "pg_basebackup": self.pg_basebackup,
                            "platform": platform.platform(), "warm_up_s": warm, "page_cache": "warm"},
            "medians": med, "checks": checks, "runs": self.runs,
        }
        _print_report(report, sides)
        return report


def _medians(runs: list[dict]) -> dict:
    keys = ("wall_s", "process_wall_s", "startup_s", "throughput_mb_s", "peak_rss_mb", "raw_bytes", "stored_bytes",
            "ratio")
    return {k: statistics.median(r[k] for r in runs) for k in keys} | {"n": len(runs)}


def _round_ratios(runs: list[dict], sides: list[str]) -> dict:
    """Per round (repeat), ours-local's wall time over each other side's: their spread."""
    out: dict = {}
    for other in sides:
        if other == "ours-local":
            continue
        rs = []
        for rep in sorted({r["repeat"] for r in runs}):
            o = [r["wall_s"] for r in runs if r["repeat"] == rep and r["side"] == "ours-local"]
            x = [r["wall_s"] for r in runs if r["repeat"] == rep and r["side"] == other]
            if o and x:
                rs.append(o[0] / x[0])
        if rs:
            out[other] = {"median": statistics.median(rs), "min": min(rs), "max": max(rs), "n": len(rs)}
    return out


def _checks(med: dict, ratios: dict | None = None, ours_where: str | None = None) -> list[dict]:
    ref = med["reference"]
    out = []
    if ratios and "pgbackrest" in ratios:
        target = TARGET_PGBR_RATIO_SERVER if ours_where == "server" else TARGET_PGBR_RATIO
        r = ratios["pgbackrest"]
        out.append({"check": f"wall time ours-local ({ours_where}-side zstd) / pgBackRest, per-round median "
                             f"(spread {r['min']:.2f}-{r['max']:.2f})", "value": r["median"],
                    "target": f"<= {target}", "pass": r["median"] <= target})
    for side in ("ours-local", "ours-s3"):
        if side not in med:
            continue
        o = med[side]
        if side == "ours-local":
            ratio = o["wall_s"] / ref["wall_s"]
            out.append({"check": "wall time ours-local / reference", "value": ratio, "target": f"<= {TARGET_WALL_RATIO}",
                        "pass": ratio <= TARGET_WALL_RATIO})
        out.append({"check": f"peak memory {side} (MB)", "value": o["peak_rss_mb"], "target": f"<= {TARGET_PEAK_MB:g}",
                    "pass": o["peak_rss_mb"] <= TARGET_PEAK_MB})
    return out


def _zstd_version(cli: str | None) -> str | None:
    if not cli:
        return None
    try:
        return subprocess.run([cli, "-V"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return None


def _print_report(rep: dict, sides: list[str]) -> None:
    med, cfg, env = rep["medians"], rep["config"], rep["environment"]
    n = cfg["repeat"]
    print()
    print(f"Full backup benchmark - pgbench scale {cfg['scale']} ({env['cluster_bytes'] / MB:.0f} MB cluster), "
          f"PostgreSQL {env['postgresql']}, zstd level {cfg['level']}, threads {cfg['threads']}, "
          f"{env['cpus']} CPUs")
    print(f"reference = pg_basebackup -D - -Ft -X fetch -w -c fast | {cfg['reference_compressor']} -> file")
    print("page cache: warm (one unmeasured pg_basebackup to /dev/null first; cache not dropped)")
    print(f"{'median of ' + str(n) + ' runs' if n > 1 else 'single run'}; order alternates "
          f"(ours, ref, ref, ours ...); MB = 10^6 bytes; RSS = sum over process tree, sampled every "
          f"{cfg['sample_interval_s'] * 1000:.0f} ms")
    print()
    rows = [
        ("wall time (s)", "wall_s", "{:.2f}"),
        ("  process wall incl. startup (s)", "process_wall_s", "{:.2f}"),
        ("throughput (raw MB/s)", "throughput_mb_s", "{:.1f}"),
        ("peak RSS, process tree (MB)", "peak_rss_mb", "{:.1f}"),
        ("raw bytes (MB)", "raw_bytes", None),
        ("stored bytes (MB)", "stored_bytes", None),
        ("compression ratio", "ratio", "{:.2f}"),
    ]
    w0 = max(len(r[0]) for r in rows) + 2
    head = f"{'':<{w0}}" + "".join(f"{s:>14}" for s in sides) + f"{'ours/ref':>11}" + (
        f"{'ours/pgbr':>12}" if "pgbackrest" in med else "")
    print(head)
    print("-" * len(head))
    for label, key, fmt in rows:
        cells = []
        for s in sides:
            v = med[s][key]
            cells.append(f"{v / MB:>14.1f}" if fmt is None else f"{fmt.format(v):>14}")
        ref = med["reference"][key]
        ratio = med["ours-local"][key] / ref if ref else float("nan")
        line = f"{label:<{w0}}" + "".join(cells) + f"{ratio:>11.2f}"
        if "pgbackrest" in med:
            pb = med["pgbackrest"][key]
            line += f"{med['ours-local'][key] / pb if pb else float('nan'):>12.2f}"
        print(line)
    print()
    print("wall time of ours = the take_full_backup() call in the child (an Airflow worker has the interpreter "
          "loaded);\nprocess wall adds Python start-up and imports. The reference writes without fsync (ours fsyncs).")
    for s in sides:
        last = [r for r in rep["runs"] if r["side"] == s][-1]
        print(f"  {s}: at peak {', '.join(f'{k} {v:.1f}' for k, v in last['peak_breakdown_mb'].items())} MB; "
              f"own high-water (VmHWM) {', '.join(f'{k} {v:.1f}' for k, v in last['hwm_mb'].items())} MB"
              + (f"; fsync after: {last['fsync_after_s']:.2f} s" if "fsync_after_s" in last else ""))
    print()
    for c in rep["checks"]:
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['check']}: {c['value']:.2f} (target {c['target']})")
    if "ours-s3" in med:
        print(f"info  wall time ours-s3 / reference: {med['ours-s3']['wall_s'] / med['reference']['wall_s']:.2f} "
              "(SeaweedFS on the same machine; no target)")


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=50, help="pgbench scale (default 50, ~750 MB)")
    ap.add_argument("--level", type=int, default=3, help="zstd level for both sides (default 3)")
    ap.add_argument("--threads", type=int, default=None,
                    help="zstd worker threads: ours gets it as is (default: ours picks, the cores), the zstd CLI "
                         "-T<N> and pgBackRest process-max=<N> (default: the cores)")
    ap.add_argument("--major", type=int, default=15 if Path("/usr/lib/postgresql/15/bin/postgres").exists() else 18,
                    help="PostgreSQL major: 15 (Debian's, with zstd, default when installed) or 18 (embedded)")
    ap.add_argument("--data", choices=("pgbench", "mixed"), default="pgbench",
                    help="mixed: add a less compressible table of --mixed-mb MB")
    ap.add_argument("--mixed-mb", type=int, default=1000)
    ap.add_argument("--client-side", action="store_true", help="also measure ours with compression client")
    ap.add_argument("--repeat", type=int, default=1, help="measurements per side; medians reported (default 1)")
    ap.add_argument("--workdir", help="where to put the run (default: a fresh directory under /var/tmp); an "
                                      "existing directory gets a fresh sub-directory")
    ap.add_argument("--s3", action="store_true", help="also measure our backup into SeaweedFS S3")
    ap.add_argument("--json", help="write all results to this JSON file")
    ap.add_argument("--ref-compressor", choices=("auto", "cli", "python"), default="auto",
                    help="reference compressor: zstd CLI if present (auto), or a python-zstandard pipe")
    ap.add_argument("--keep", action="store_true", help="do not remove the work directory at the end")
    ap.add_argument("--no-pgbackrest", action="store_true", help="leave pgBackRest out (when not installed: left out)")
    a = ap.parse_args(argv)
    if not 1 <= a.level <= 22:
        ap.error("--level must be 1..22")
    if a.repeat < 1 or a.scale < 1 or (a.threads is not None and a.threads < 0):
        ap.error("--repeat and --scale must be >= 1, --threads >= 0")

    def stoppers(b):
        return ([("stop SeaweedFS", b.s3.stop)] if b.s3 is not None else []) + \
            ([("stop PostgreSQL", b.pg.stop)] if b.pg is not None else [])

    return run_bench(a, "pgincr-bench-", Bench, stoppers)


if __name__ == "__main__":
    sys.exit(main())
