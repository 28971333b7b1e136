#!/usr/bin/env python
"""Benchmark: recovery time. Point-in-time recovery to the end of the WAL archive, ours
(`pgincr restore --target latest --start`) vs pgBackRest 2.45 (`restore` + archive-get in async
mode), from a local repository and from S3 (SeaweedFS over HTTPS); a plain full restore with
fsync; and the cost of one restore_command call.

    .venv/bin/python bench/bench_restore.py [--scale 50] [--segments 64] [--repeat 3]
        [--calls 16] [--cache warm|cold] [--no-s3] [--ours-no-verify] [--workdir DIR] [--json FILE]
        [--keep] [--no-install]

One PostgreSQL 15 (Debian's) server feeds both tools: pgbench -i -s S, a full backup by each tool
(ours: take_full_backup into a local and an S3 repository; pgBackRest: backup --type=full into its
local repo1 and S3 repo2), then pgbench rounds until N (--segments) segments of WAL follow the
backups, archived by ONE archive_command that runs pgBackRest archive-push and our walcmd push
(local and S3) on every segment, so both archives hold the same WAL. Then, in interleaved rounds
(ours, pgBackRest, then pgBackRest, ours, ...), each into a fresh directory:
  * PITR      spawn of the restore -> server promoted at the end of the archive; then (untimed) the
              restored pgbench tables are checked against the source's fingerprint
  * plain     restore of the full backup without starting it, then syncfs(2) of the target's
              filesystem (timed on both sides: pgBackRest fsyncs every file itself)
  * per call  one restore_command call as PostgreSQL makes it (sh -c, cwd = data dir, %p =
              pg_wal/RECOVERYXLOG, as the server's OS user): ours with its spool filled (if the
              code prefetches) and ours first call; pgBackRest async with its queue filled, and sync
Ratios are ours / pgBackRest per round, then their median and spread. Exit code 0 whatever the
numbers; non-zero only when something crashed or a data check failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil
from _common import page_cache, ratio_summary, run_bench, syncfs
from bench_full import Bench as FullBench
from bench_incr import Bench as IncrBench
from bench_incr import Meter, _git_state, clean_env, dir_size, run_cmd
from bench_wal import become_subreaper, percentile

import airflow_pg_incremental
from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.lsn import format_lsn, parse_lsn, segno_of
from airflow_pg_incremental.core.pgconn import query_one
from airflow_pg_incremental.core.repository import LocalRepository, S3Repository
from airflow_pg_incremental.core.restore import scratch_settings
from airflow_pg_incremental.core.server import PgServer, as_user, chown_tree, free_port, make_user_dir, \
    server_environment
from airflow_pg_incremental.core.wal import fetch_bytes, list_segments
from airflow_pg_incremental.sandbox import SandboxPostgres, SeaweedS3

PKG_PARENT = str(Path(airflow_pg_incremental.__file__).resolve().parent.parent)
MB = 1_000_000
CLUSTER = "bench"
STANZA = "bench"
PG15_POSTGRES = Path("/usr/lib/postgresql/15/bin/postgres")
LOCATIONS_LABEL = {"local": "local repository", "s3": "S3 (SeaweedFS, HTTPS)"}
TARGETS = {  # (kind, location) -> ours / pgBackRest must be <= this
    ("pitr", "local"): 0.7, ("pitr", "s3"): 1.0, ("plain", "local"): 1.0, ("plain", "s3"): 1.0}
TARGET_SPOOL_HIT_P50_MS = 20.0
POLL_S = 0.2  # how often promotion is polled: the engine's own interval, used for pgBackRest too
LOG_TS_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) UTC")


# =============================================================================================
class TlsSeaweedS3(SeaweedS3):
    """SeaweedS3 that also serves S3 over HTTPS with a self-signed certificate (pgBackRest's S3
    driver speaks HTTPS only). SeaweedS3.start() passes every entry of self._ports to `weed mini`
    as -key=value and keeps them for a restart: the first start picks the free ports, a restart adds
    -s3.port.https, -s3.cert.file and -s3.key.file. Plain HTTP stays on s3.port (health check)."""

    def start(self, timeout: float = 60) -> "TlsSeaweedS3":
        tls = self.workdir / "tls"
        tls.mkdir(parents=True, exist_ok=True)
        os.chmod(tls, 0o755)
        self.cert, key = tls / "cert.pem", tls / "key.pem"
        run_cmd(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", str(key),
                 "-out", str(self.cert), "-subj", "/CN=127.0.0.1",
                 "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"], what="openssl req -x509")
        os.chmod(self.cert, 0o644)  # the CA bundle of the restore_command (runs as the server's user)
        super().start(timeout)
        self.stop()
        self.https_port = free_port()
        self._ports.update({"s3.port.https": self.https_port, "s3.cert.file": str(self.cert),
                            "s3.key.file": str(key)})
        super().start(timeout)
        return self

    front_port: int | None = None  # the throttling proxy's port (--s3-conn-mbps), else None

    @property
    def serve_port(self) -> int:
        """Where both tools connect: the proxy when there is one, else SeaweedFS's HTTPS port."""
        return self.front_port or self.https_port

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.serve_port}"

    def https_env(self) -> dict:
        """What our CLI and walcmd need: the HTTPS endpoint and the self-signed certificate as the
        CA bundle (the engine's client has no 'verify off'; boto3 honours AWS_CA_BUNDLE)."""
        return {**self.env(), "PGINCR_S3_ENDPOINT_URL": self.https_url, "AWS_CA_BUNDLE": str(self.cert)}

    def https_client(self):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=self.https_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1", verify=str(self.cert),
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, s3={"addressing_style": "path"}))


def log_ts(line: str) -> float | None:
    m = LOG_TS_RE.match(line)
    if not m:
        return None
    fmt = "%Y-%m-%d %H:%M:%S.%f" if "." in m.group(1) else "%Y-%m-%d %H:%M:%S"
    return dt.datetime.strptime(m.group(1), fmt).replace(tzinfo=dt.timezone.utc).timestamp()


def recovery_log_facts(log_file: Path, t0_epoch: float, wait: float = 5.0) -> dict:
    """From a restored server's log (log_timezone UTC): when it was promoted (its last 'ready to
    accept connections', in seconds after the restore began: the postmaster logs it a moment after
    pg_is_in_recovery() turns false, so it is waited for), how long redo ran, how many files the
    restore_command delivered."""
    deadline = time.monotonic() + wait
    while True:
        text = log_file.read_text(errors="replace") if log_file.exists() else ""
        ready = [log_ts(ln) for ln in text.splitlines() if "database system is ready to accept connections" in ln]
        if ready or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    redo = re.findall(r"redo done at \S+ system usage: .*elapsed: ([0-9.]+) s", text)
    return {"promoted_at_s": (ready[-1] - t0_epoch) if ready and ready[-1] else None,
            "redo_elapsed_s": float(redo[-1]) if redo else None,
            "files_restored": len(re.findall(r'restored log file "[^"]+" from archive', text))}


def dirty_bytes() -> int | None:
    """Dirty page-cache bytes machine-wide (/proc/meminfo): after a restore command, what it left
    for write-back (other processes' dirty pages are in it too: a rough figure)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("Dirty:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def restore_command_of(data_dir: Path) -> str | None:
    """The restore_command a restore wrote into postgresql.auto.conf (the last one)."""
    try:
        text = (data_dir / "postgresql.auto.conf").read_text()
    except OSError:
        return None
    found = re.findall(r"^restore_command\s*=\s*'((?:[^']|'')*)'", text, re.M)
    return found[-1].replace("''", "'") if found else None


TABLES = ("pgbench_accounts", "pgbench_branches", "pgbench_tellers", "pgbench_history")


def fingerprint(srv, tables=TABLES) -> list[str]:
    """Row count and an order-independent hash sum of every pgbench table (and bench_mixed)."""
    sql = " UNION ALL ".join(f"SELECT '{t}', count(*), coalesce(sum(hashtext(x::text)::bigint), 0) FROM {t} x"
                             for t in tables)
    return sorted(srv.psql(sql).strip().splitlines())


# =============================================================================================
class Bench:
    tables = TABLES

    def __init__(self, args, workdir: Path):
        self.a = args
        self.w = workdir
        self.t_start = time.monotonic()
        self.src: SandboxPostgres | None = None
        self.s3: TlsSeaweedS3 | None = None
        self.servers: list[PgServer] = []  # restored servers still running (stopped on any exit)
        self.user: str | None = None
        self.locations = ["local"] + ([] if args.no_s3 else ["s3"])
        self.runs: list[dict] = []
        self.rounds: list[dict] = []
        self.info: dict = {}
        self.install_note = ""
        self.restore_commands: dict[str, str] = {}
        self.pgbr_exe = shutil.which("pgbackrest") or "pgbackrest"

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t_start:7.1f} s] {msg}", flush=True)

    # -- tools -------------------------------------------------------------------------------
    def check_tools(self) -> None:
        self.a.no_pgbackrest = False
        IncrBench.maybe_install(self)  # the same apt-get step as bench_incr.py (uses a, log, install_note)
        missing = [p for p, ok in (("postgresql-15", PG15_POSTGRES.exists()),
                                   ("pgbackrest", shutil.which("pgbackrest")), ("openssl", shutil.which("openssl")))
                   if not ok and (p != "openssl" or not self.a.no_s3)]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} missing ({self.install_note}): this benchmark compares with "
                               "pgBackRest 2.45 on Debian's PostgreSQL 15; apt-get install -y postgresql-15 pgbackrest")
        self.pgbr_exe = shutil.which("pgbackrest")
        self.info["pgbackrest"] = run_cmd([self.pgbr_exe, "version"]).stdout.strip()

    # -- repositories and configuration ---------------------------------------------------------
    def ours_url(self, loc: str) -> str:
        return str(self.w / "ours-repo") if loc == "local" else f"s3://{self.s3.bucket}/ours"

    def ours_repo(self, loc: str):
        if loc == "local":
            return LocalRepository(self.ours_url("local"))
        return S3Repository(self.s3.https_client(), self.s3.bucket, "ours")

    def s3_env(self, loc: str) -> dict:
        if loc != "s3":
            return {}
        return {**self.s3.https_env(), "PGINCR_S3_READ_STREAMS": str(self.a.ours_s3_read_streams)}

    def pgbr_repo_lines(self, loc: str, n: int) -> str:
        if loc == "local":
            return f"repo{n}-path={self.w / 'pgbr' / 'repo'}\n"
        s3 = self.s3
        return (f"repo{n}-type=s3\nrepo{n}-path=/pgbr\nrepo{n}-s3-bucket={s3.bucket}\n"
                f"repo{n}-s3-endpoint=127.0.0.1\nrepo{n}-storage-port={s3.serve_port}\nrepo{n}-s3-uri-style=path\n"
                f"repo{n}-s3-region=us-east-1\nrepo{n}-s3-key={s3.access_key}\nrepo{n}-s3-key-secret={s3.secret_key}\n"
                f"repo{n}-storage-verify-tls=n\n")

    def pgbr_common(self, sub: str) -> str:
        b = self.w / "pgbr"
        return ("log-level-console=warn\nlog-level-stderr=warn\nlog-level-file=off\n"
                f"log-path={b / 'log'}\nlock-path={b / f'lock-{sub}'}\nspool-path={b / f'spool-{sub}'}\n")

    def write_pgbr_configs(self) -> None:
        """push.conf: every repository (archive-push writes to all, backups pick one with --repo);
        restore-<loc>.conf: that repository alone, pgBackRest's fastest restore settings."""
        b = self.w / "pgbr"
        for sub in ("", "repo", "log", "lock-push", "spool-push"):
            (b / sub).mkdir(mode=0o750, exist_ok=True)
        srv = self.src.server
        stanza = (f"\n[{STANZA}]\npg1-path={srv.data_dir}\npg1-port={srv.port}\npg1-socket-path={srv.socket_dir}\n"
                  "pg1-user=postgres\n")
        self.pgbr_cfg = {"push": b / "push.conf"}
        self.pgbr_cfg["push"].write_text(
            "[global]\n" + "".join(self.pgbr_repo_lines(loc, i + 1) for i, loc in enumerate(self.locations))
            + "".join(f"repo{i + 1}-retention-full=9\n" for i in range(len(self.locations)))
            + f"compress-type=zst\ncompress-level={self.a.level}\nprocess-max=2\nstart-fast=y\n"
              "archive-async=y\n" + self.pgbr_common("push") + stanza)
        for loc in self.locations:
            for sub in (f"lock-{loc}", f"spool-{loc}"):
                (b / sub).mkdir(mode=0o750, exist_ok=True)
            self.pgbr_cfg[loc] = b / f"restore-{loc}.conf"
            self.pgbr_cfg[loc].write_text(
                "[global]\n" + self.pgbr_repo_lines(loc, 1)
                + f"process-max={self.a.pgbr_process_max}\narchive-async=y\n"
                + f"archive-get-queue-max={self.a.pgbr_queue_max}\n"
                + self.pgbr_common(loc) + stanza)
        for f in self.pgbr_cfg.values():
            os.chmod(f, 0o640)
        chown_tree(b, self.user)

    def pgbr(self, cfg: str, *args: str, timeout: float = 7200) -> subprocess.CompletedProcess:
        """pgbackrest as the database's OS user, as in a normal deployment."""
        cmd = as_user([self.pgbr_exe, f"--config={self.pgbr_cfg[cfg]}", f"--stanza={STANZA}", *args], self.user)
        return run_cmd(cmd, env=clean_env(), timeout=timeout, what=f"pgbackrest {args[-1]}")

    def archive_command(self) -> str:
        walcmd = Path(airflow_pg_incremental.__file__).resolve().parent / "walcmd.py"
        parts = [f"{self.pgbr_exe} --config={self.pgbr_cfg['push']} --stanza={STANZA} archive-push %p"]
        for loc in self.locations:  # each repository its own marker spool: markers are per repository
            spool = make_user_dir(self.w / "pg15" / f"walpush-spool-{loc}", self.user, 0o700)
            parts.append(f"{sys.executable} -S {walcmd} push --repo {self.ours_url(loc)} --cluster {CLUSTER} "
                         f"--level {self.a.level} --spool {spool} %p")
        return " && ".join(parts)

    # -- the source ------------------------------------------------------------------------------
    def setup(self) -> None:
        a = self.a
        if "s3" in self.locations:
            t = time.monotonic()
            self.s3 = TlsSeaweedS3(self.w / "seaweed")
            self.s3.start()
            if a.s3_conn_mbps:
                self.start_proxy(a.s3_conn_mbps)
            self.log(f"SeaweedFS started: HTTP {self.s3.endpoint_url}, HTTPS {self.s3.https_url} (self-signed "
                     f"certificate) ({time.monotonic() - t:.1f} s)")
        self.src = SandboxPostgres(self.w / "pg15", major=15, env=self.s3.https_env() if self.s3 else {})
        self.user = self.src.os_user
        for loc in self.locations:
            repo = self.ours_repo(loc)
            repo.create(owner=self.user) if loc == "local" else repo.create()
        self.write_pgbr_configs()
        self.src.extra_settings["archive_command"] = self.archive_command()
        t = time.monotonic()
        self.src.start()
        self.pgbr("push", "stanza-create")
        # the restored copies log in UTC: promotion times are read from their logs
        self.src.psql("ALTER SYSTEM SET log_timezone = 'UTC'")
        version = self.src.psql("SHOW server_version").strip()
        self.seg = int(self.src.psql("SELECT setting FROM pg_settings WHERE name = 'wal_segment_size'").strip())
        self.log(f"PostgreSQL {version} started as OS user {self.user or 'self'} ({time.monotonic() - t:.1f} s); "
                 f"stanza created; pgbench -i -s {a.scale} ...")
        t = time.monotonic()
        self.src.pgbench_init(a.scale)
        if a.mixed_mb:
            self.pg = self.src  # FullBench.load_mixed's server
            FullBench.load_mixed(self, a.mixed_mb)
            self.tables = TABLES + ("bench_mixed",)
        self.src.psql("CHECKPOINT")
        IncrBench.wait_archived(self, self.src)
        db = int(self.src.psql("SELECT pg_database_size('postgres')").strip())
        self.info["source"] = {"postgresql": version, "os_user": self.user, "scale": a.scale, "database_bytes": db,
                               "init_s": time.monotonic() - t, "segment_size": self.seg,
                               "archive_command": self.src.extra_settings["archive_command"].replace(str(self.w),
                                                                                                     "<W>")}
        self.log(f"pgbench data loaded and archived ({time.monotonic() - t:.1f} s); database {db / MB:.0f} MB")

    def backups(self) -> None:
        """Per location, ours then pgBackRest right after it: every backup ends with a checkpoint and
        a segment switch, so a backup taken earlier replays the later ones' WAL too. pgBackRest's comes
        last, so its recovery replays at most as much WAL as ours (shown in the report)."""
        self.info["backups"] = {}
        for i, loc in enumerate(self.locations):
            t = time.monotonic()
            meta = take_full_backup(self.src.conninfo(), self.ours_repo(loc), CLUSTER,
                                    compression_level=self.a.level, progress_interval=3600)
            self.info["backups"][f"ours-{loc}"] = {"id": meta["backup_id"], "start_lsn": meta["start_lsn"],
                                                   "stop_lsn": meta["stop_lsn"],
                                                   "stored_bytes": meta.get("stored_bytes"),
                                                   "seconds": time.monotonic() - t}
            self.log(f"ours full backup {meta['backup_id']} into {loc}: {time.monotonic() - t:.1f} s, "
                     f"{(meta.get('stored_bytes') or 0) / MB:.1f} MB stored")
            t = time.monotonic()
            self.pgbr("push", f"--repo={i + 1}", "--type=full", "backup")
            b = json.loads(self.pgbr("push", f"--repo={i + 1}", "--output=json", "info").stdout)[0]["backup"][-1]
            self.info["backups"][f"pgbr-{loc}"] = {"id": b["label"], "start_lsn": b.get("lsn", {}).get("start"),
                                                   "stop_lsn": b.get("lsn", {}).get("stop"),
                                                   "stored_bytes": b["info"]["repository"]["delta"],
                                                   "seconds": time.monotonic() - t}
            self.log(f"pgBackRest full backup {b['label']} into repo{i + 1} ({loc}): {time.monotonic() - t:.1f} s, "
                     f"{b['info']['repository']['delta'] / MB:.1f} MB stored")

    def lsn(self) -> int:
        return parse_lsn(self.src.psql("SELECT pg_current_wal_lsn()").strip())

    def workload(self) -> None:
        """Rounds of CHECKPOINT + pgbench (-c 2, 2500 transactions each) until --segments segments of
        WAL follow the backups: the CHECKPOINT makes the updates write full-page images, as on a server
        whose checkpoints come every few minutes. Then the source's fingerprint, pg_switch_wal() and
        the archive drained: the end of the archive is the state fingerprinted."""
        a = self.a
        t = time.monotonic()
        start = self.lsn()
        until = start + a.segments * self.seg
        rounds = 0
        while self.lsn() < until:
            self.src.psql("CHECKPOINT")
            self.src.pgbench_run(2500, clients=2)
            rounds += 1
        end = self.lsn()
        self.source_fp = fingerprint(self.src.server, self.tables)
        self.src.psql("SELECT pg_switch_wal()")
        IncrBench.wait_archived(self, self.src)
        tl = 1
        ours = {loc: list_segments(self.ours_repo(loc), CLUSTER).get(tl, []) for loc in self.locations}
        first_after = start // self.seg
        counts = {loc: sum(1 for s in names if segno_of(s, self.seg) >= first_after) for loc, names in ours.items()}
        pgbr_arch = self.w / "pgbr" / "repo" / "archive" / STANZA
        pgbr_segs = {p.name[:24] for p in pgbr_arch.rglob("*.zst") if re.match(r"^[0-9A-F]{24}-", p.name)}
        missing = [s for s in ours["local"] if s not in pgbr_segs]
        if missing:
            raise RuntimeError(f"pgBackRest's archive lacks {len(missing)} segment(s) ours holds, e.g. {missing[0]}")
        self.info["workload"] = {"rounds": rounds, "transactions": rounds * 5000, "seconds": time.monotonic() - t,
                                 "wal_bytes": end - start, "start_lsn": format_lsn(start), "end_lsn": format_lsn(end),
                                 "segments_after_backups": counts, "last_segment": ours["local"][-1],
                                 "fingerprint": self.source_fp}
        archive_end = (segno_of(ours["local"][-1], self.seg) + 1) * self.seg
        for b in self.info["backups"].values():
            b["wal_to_replay_bytes"] = archive_end - parse_lsn(b["start_lsn"]) if b.get("start_lsn") else None
        self.segments_after = sorted(s for s in ours["local"] if segno_of(s, self.seg) >= first_after)
        self.log(f"workload: {rounds} x (CHECKPOINT; pgbench -c 2 -t 2500), {(end - start) / MB:.0f} MB of WAL in "
                 f"{time.monotonic() - t:.1f} s; archived segments after the backups: "
                 + ", ".join(f"ours {loc} {n}" for loc, n in counts.items()) + "; pgBackRest holds every one")
        self.src_control = self.w / "pg_control"
        self.src.stop()
        shutil.copyfile(self.src.server.data_dir / "global" / "pg_control", self.src_control)
        self.src = None
        self.log("source server stopped (no CPU during the measurements)")

    # -- measurement frame ---------------------------------------------------------------------------
    def cache_paths(self, loc: str) -> list[Path]:
        return [self.w / "seaweed" / "data"] if loc == "s3" else [self.w / "ours-repo", self.w / "pgbr" / "repo"]

    def leftovers(self) -> list[psutil.Process]:
        """Processes still working for a previous step (a prefetcher, pgBackRest's async archive-get):
        every process whose command line names this run's work directory or whose working directory
        lies in it (a restore_command runs in the data directory), except SeaweedFS."""
        skip = {os.getpid(), self.s3.proc.pid if self.s3 and self.s3.proc else None}
        out = []
        for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
            try:
                if p.pid in skip:
                    continue
                if any(str(self.w) in a for a in (p.info["cmdline"] or [])) or \
                        (p.info["cwd"] or "").startswith(str(self.w) + "/"):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def quiesce(self, timeout: float = 15) -> int:
        """Wait for the previous step's background processes to finish (then end them, by pid), so
        that neither side's leftovers run during the other side's measurement."""
        procs = self.leftovers()
        if procs:
            _gone, alive = psutil.wait_procs(procs, timeout=timeout)
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
        return len(procs)

    def prepare(self, loc: str) -> dict:
        """Unmeasured, before every measured step: the previous step's background processes gone,
        its write-back flushed (syncfs), then both tools' repositories at `loc` put into the same
        page-cache state (--cache)."""
        left = self.quiesce()
        s = syncfs(self.w)
        pc = page_cache(self.cache_paths(loc), self.a.cache)
        return {"leftover_processes": left, "syncfs_before_s": s, "cache": pc}

    def measure(self, kind: str, loc: str, side: str, rnd: int, fn) -> dict:
        rd = self.w / "runs" / f"{rnd}-{kind}-{loc}-{side}"
        rd.mkdir(parents=True, mode=0o755)
        prep = self.prepare(loc)
        load0 = os.getloadavg()
        meter = Meter()
        t0_epoch = time.time()
        try:
            res = fn(rd / "data", meter, t0_epoch)
        finally:
            for srv in list(self.servers):
                srv.stop("fast")
                self.servers.remove(srv)
        m = res.pop("_meter")
        load1 = os.getloadavg()
        ncpu = os.cpu_count() or 1
        r = {"kind": kind, "loc": loc, "side": side, "round": rnd, **res, "loadavg_before": load0,
             "loadavg_after": load1, "machine_busy_pct": 100 * m["system_busy_s"] / (m["wall_s"] * ncpu),
             "prepare": prep}
        self.runs.append(r)
        extra = "".join(f"  {k[:-2]} {v:.2f}" for k, v in res.items()
                        if k.endswith("_s") and k != "wall_s" and isinstance(v, float))
        self.log(f"  [{rnd}/{self.a.repeat}] {kind:<5} {loc:<5} {side:<4} {r['wall_s']:7.2f} s{extra}  "
                 f"load {load0[0]:.2f}->{load1[0]:.2f}  busy {r['machine_busy_pct']:3.0f}%"
                 + ("" if r.get("data_ok", True) else "  DATA CHECK FAILED"))
        if not self.a.keep:
            shutil.rmtree(rd, ignore_errors=True)
        return r

    def env_ours(self, loc: str) -> dict:
        env = clean_env()
        env.update(self.s3_env(loc))
        env["PYTHONPATH"] = PKG_PARENT  # the CLI runs the code this benchmark imported
        return env

    def ours_cli(self, *args: str, loc: str) -> dict:
        cmd = [sys.executable, "-m", "airflow_pg_incremental.cli", "restore", "--repo", self.ours_url(loc),
               "--cluster", CLUSTER, *args, "--json"] + (["--no-verify"] if self.a.ours_no_verify else [])
        r = run_cmd(cmd, env=self.env_ours(loc), what="pgincr restore")
        return json.loads(r.stdout)

    def data_check(self, srv: PgServer) -> dict:
        t = time.monotonic()
        fp = fingerprint(srv, self.tables)
        return {"data_ok": fp == self.source_fp, "data_check_s": time.monotonic() - t,
                **({} if fp == self.source_fp else {"fingerprint": fp})}

    # -- PITR ----------------------------------------------------------------------------------------
    def pitr_ours(self, d: Path, meter, t0_epoch: float, loc: str) -> dict:
        rep = self.ours_cli("--target", "latest", "--target-dir", str(d), "--start", loc=loc)
        m = meter.stop()
        srv = PgServer(d, major=15, port=rep["port"], os_user=self.user, socket_dir=rep["socket_dir"])
        self.servers.append(srv)
        if rep.get("state") != "promoted":
            raise RuntimeError(f"ours' restore ended in state {rep.get('state')!r}: {rep}")
        self.restore_commands.setdefault(f"ours-{loc}", restore_command_of(d))
        out = {"wall_s": m["wall_s"], "_meter": m, "restore_files_s": rep.get("base_restore_seconds"),
               "recovery_s": m["wall_s"] - (rep.get("base_restore_seconds") or 0), "reached_lsn": rep.get("reached_lsn"),
               **recovery_log_facts(d.parent / f"{d.name}.log", t0_epoch), **self.data_check(srv)}
        if srv.socket_dir.name.startswith("pgincr-sock-"):  # a private /tmp socket directory (long paths)
            self._private_sockets.append(srv.socket_dir)
        return out

    def pitr_pgbr(self, d: Path, meter, t0_epoch: float, loc: str) -> dict:
        make_user_dir(d, self.user, 0o700)
        spool = self.w / "pgbr" / f"spool-{loc}"
        shutil.rmtree(spool, ignore_errors=True)  # a fresh async queue for every recovery
        make_user_dir(spool, self.user, 0o750)
        t = time.monotonic()
        self.pgbr(loc, f"--pg1-path={d}", "--type=default", "restore")
        restore_s = time.monotonic() - t
        srv = PgServer(d, major=15, os_user=self.user, listen="")
        self.servers.append(srv)
        srv.start(scratch_settings(d, 15, self.user))  # what ours' restored server gets (archive_mode off ...)
        self.wait_promoted(srv)
        m = meter.stop()
        self.restore_commands.setdefault(f"pgbr-{loc}", restore_command_of(d))
        return {"wall_s": m["wall_s"], "_meter": m, "restore_files_s": restore_s, "recovery_s": m["wall_s"] - restore_s,
                **recovery_log_facts(d.parent / f"{d.name}.log", t0_epoch), **self.data_check(srv)}

    def wait_promoted(self, srv: PgServer, timeout: float = 7200) -> None:
        """The engine's wait, for pgBackRest's server: pg_is_in_recovery() every POLL_S seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not query_one(srv.local_conninfo(), "SELECT pg_is_in_recovery()")[0]:
                    return
            except Exception:
                if not (srv.data_dir / "postmaster.pid").exists():
                    raise RuntimeError(f"pgBackRest's restored server stopped during recovery:\n{srv.log_tail()}")
            time.sleep(POLL_S)
        raise RuntimeError(f"pgBackRest's restored server not promoted after {timeout:.0f} s:\n{srv.log_tail()}")

    # -- plain full restore ----------------------------------------------------------------------------
    def plain_ours(self, d: Path, meter, t0_epoch: float, loc: str) -> dict:
        t = time.monotonic()
        rep = self.ours_cli("--target-dir", str(d), loc=loc)
        cmd_s = time.monotonic() - t
        dirty = dirty_bytes()
        sync_s = syncfs(d)
        m = meter.stop()
        return {"wall_s": m["wall_s"], "_meter": m, "command_s": cmd_s, "sync_after_s": sync_s, "dirty_after_bytes": dirty,
                "verified": rep.get("verified"), "restored_bytes": dir_size(d)["apparent_bytes"]}

    def plain_pgbr(self, d: Path, meter, t0_epoch: float, loc: str) -> dict:
        make_user_dir(d, self.user, 0o700)
        t = time.monotonic()
        self.pgbr(loc, f"--pg1-path={d}", "--type=immediate", "restore")
        cmd_s = time.monotonic() - t
        dirty = dirty_bytes()
        sync_s = syncfs(d)
        m = meter.stop()
        return {"wall_s": m["wall_s"], "_meter": m, "command_s": cmd_s, "sync_after_s": sync_s, "dirty_after_bytes": dirty,
                "restored_bytes": dir_size(d)["apparent_bytes"]}

    def rounds_loop(self) -> None:
        self._private_sockets: list[Path] = []
        for rnd in range(1, self.a.repeat + 1):
            order = ["ours", "pgbr"] if rnd % 2 else ["pgbr", "ours"]
            load0 = os.getloadavg()
            t = time.monotonic()
            for kind, fns in (("pitr", {"ours": self.pitr_ours, "pgbr": self.pitr_pgbr}),
                              ("plain", {"ours": self.plain_ours, "pgbr": self.plain_pgbr})):
                for loc in self.locations:
                    for side in order:
                        self.measure(kind, loc, side, rnd,
                                     lambda d, m, t0, f=fns[side], loc=loc: f(d, m, t0, loc))
            self.rounds.append({"round": rnd, "order": order, "loadavg_before": load0, "loadavg_after": os.getloadavg(),
                                "seconds": time.monotonic() - t})
            for p in self._private_sockets:
                shutil.rmtree(p, ignore_errors=True)

    # -- per-call restore_command ---------------------------------------------------------------------
    def fake_datadir(self, d: Path) -> Path:
        """What a restore_command sees during a recovery: the data directory (cwd) with pg_wal/,
        global/pg_control (pgBackRest checks the archive against it), recovery.signal and a
        postmaster.pid naming a live process (this benchmark: ours' prefetcher leaves when it is
        gone, as when a server stops; end_adopted stops it before)."""
        (d / "pg_wal").mkdir(parents=True)
        (d / "global").mkdir()
        shutil.copyfile(self.src_control, d / "global" / "pg_control")
        (d / "recovery.signal").write_text("")
        (d / "postmaster.pid").write_text(f"{os.getpid()}\n{d}\n")
        chown_tree(d, self.user)
        return d

    def call(self, cmd_t: str, d: Path, name: str, env: dict) -> tuple[float, int]:
        """One call as PostgreSQL makes it: /bin/sh -c, cwd = the data directory, as its OS user,
        after removing the previous call's RECOVERYXLOG (untimed: the server does that itself before
        each call, RestoreArchivedFile; left in place, the tool would pay for freeing it)."""
        cmd = cmd_t.replace("%f", name).replace("%p", "pg_wal/RECOVERYXLOG").replace("<D>", str(d))
        kw = {"user": self.user, "group": self.user, "extra_groups": []} if self.user and os.geteuid() == 0 else {}
        (d / "pg_wal" / "RECOVERYXLOG").unlink(missing_ok=True)
        t = time.monotonic()
        r = subprocess.run(cmd, shell=True, cwd=d, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
        took = time.monotonic() - t
        if r.returncode != 0:
            raise RuntimeError(f"restore_command for {name} exited {r.returncode}: {r.stderr.decode()[-500:]}")
        got = hashlib.sha256((d / "pg_wal" / "RECOVERYXLOG").read_bytes()).hexdigest()
        if got != self.expected[name]:
            raise RuntimeError(f"restore_command delivered a wrong {name}")
        return took, r.returncode

    def adopted(self) -> list[psutil.Process]:
        """Processes re-parented to us (we are a subreaper): prefetchers and pgBackRest's async process."""
        out = []
        for c in psutil.Process().children():
            if c.pid in self.own_children:
                continue
            try:
                if c.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(c.pid, 0)
                else:
                    out.append(c)
            except (psutil.Error, ChildProcessError):
                pass
        return out

    def end_adopted(self) -> int:
        """Stop the background processes a call left (by pid: they are our descendants)."""
        procs = self.adopted()
        for p in procs:
            try:
                p.terminate()
            except psutil.Error:
                pass
        gone, alive = psutil.wait_procs(procs, timeout=3)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=3)
        self.adopted()  # reap
        return len(procs)

    def snapshot(self, roots: list[Path]) -> frozenset:
        out = set()
        for root in roots:
            for dirpath, _dirs, names in os.walk(root):
                for n in names:
                    if n == "RECOVERYXLOG":
                        continue
                    try:
                        out.add((os.path.join(dirpath, n), os.path.getsize(os.path.join(dirpath, n))))
                    except OSError:
                        pass
        return frozenset(out)

    def settle(self, roots: list[Path], quiet: float, timeout: float) -> float:
        """Until nothing under `roots` changed for `quiet` seconds (a prefetcher or async queue done
        with its batch): stands in for the replay of the previous file."""
        t0 = time.monotonic()
        last, since = self.snapshot(roots), time.monotonic()
        while time.monotonic() - t0 < timeout:
            time.sleep(0.05)
            now = self.snapshot(roots)
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return time.monotonic() - t0

    def per_call(self) -> None:
        self.own_children = {c.pid for c in psutil.Process().children()}
        self.info["subreaper"] = become_subreaper()
        names = self.segments_after[1:-1]  # full segments (not the switched last one)
        k = min(self.a.calls, len(names) - 1)
        names = names[:k + 1]
        local = self.ours_repo("local")
        self.expected = {n: hashlib.sha256(fetch_bytes(local, CLUSTER, n)).hexdigest() for n in names}
        self.percall: dict = {}
        for loc in self.locations:
            ours_t = self.restore_commands.get(f"ours-{loc}")
            pgbr_t = self.restore_commands.get(f"pgbr-{loc}")
            if not ours_t or not pgbr_t:
                raise RuntimeError(f"no restore_command recorded for {loc}: {self.restore_commands}")
            pgbr_t = re.sub(r"--pg1-path=\S+", "--pg1-path=<D>", pgbr_t)
            if "--pg1-path=<D>" not in pgbr_t:
                pgbr_t = pgbr_t.replace(" archive-get", " --pg1-path=<D> archive-get")
            variants = {
                "ours-hit": (ours_t, "spool"), "pgbr-async-hit": (pgbr_t, "spool"),
                "ours-direct": (ours_t, "fresh"), "pgbr-sync": (pgbr_t.replace(" archive-get", " --no-archive-async"
                                                                                       " archive-get"), "fresh")}
            env = {"ours": server_environment(self.s3_env(loc)), "pgbr": server_environment()}
            spool_pgbr = self.w / "pgbr" / f"spool-{loc}"
            res = {v: [] for v in variants}
            notes: dict = {}
            for v in ("ours-hit", "pgbr-async-hit"):
                cmd_t, _ = variants[v]
                shutil.rmtree(spool_pgbr, ignore_errors=True)
                make_user_dir(spool_pgbr, self.user, 0o750)
                self.prepare(loc)
                d = self.fake_datadir(self.w / "percall" / f"{loc}-{v}")
                roots = [d, spool_pgbr]
                self.call(cmd_t, d, names[0], env[v.split("-")[0]])  # the miss that starts the prefetch
                first_settle = self.settle(roots, 1.0, 120)
                spooled = sorted(os.path.relpath(p, self.w) for p, _ in self.snapshot(roots)
                                 if Path(p) != d / "global" / "pg_control")
                notes[v] = {"settle_after_first_s": first_settle, "spool_detected": bool(spooled),
                            "files_beside_after_first": len(spooled), "examples": spooled[:8]}
                for n in names[1:]:
                    res[v].append(self.call(cmd_t, d, n, env[v.split("-")[0]])[0])
                    self.settle(roots, 0.3, 10)
                notes[v]["background_processes_ended"] = self.end_adopted()
                shutil.rmtree(d, ignore_errors=True)
            # first call of a recovery (ours: empty spool) and pgBackRest without async, alternating
            self.prepare(loc)
            left = 0
            for n in names[1:]:
                for v in ("ours-direct", "pgbr-sync"):
                    d = self.fake_datadir(self.w / "percall" / f"{loc}-{v}-{n}")
                    res[v].append(self.call(variants[v][0], d, n, env[v.split("-")[0]])[0])
                    left += self.end_adopted()
                    shutil.rmtree(d, ignore_errors=True)
            notes["direct_background_processes_ended"] = left
            self.percall[loc] = {
                "calls": len(names) - 1,
                "commands": {v: c.replace(str(self.w), "<W>") for v, (c, _) in variants.items()},
                "stats_ms": {v: {"p50": 1000 * percentile(x, .5), "p90": 1000 * percentile(x, .9),
                                 "min": 1000 * min(x), "max": 1000 * max(x)} for v, x in res.items()},
                "samples_ms": {v: [round(1000 * y, 2) for y in x] for v, x in res.items()}, "notes": notes}
            st = self.percall[loc]["stats_ms"]
            self.log(f"per call ({loc}, {len(names) - 1} calls each): " + "; ".join(
                f"{v} p50 {s['p50']:.1f} ms p90 {s['p90']:.1f} ms" for v, s in st.items()))
        shutil.rmtree(self.w / "percall", ignore_errors=True)

    # =========================================================================================
    def run(self) -> dict:
        a = self.a
        self.log(f"workdir {self.w}; load average {os.getloadavg()}")
        self.check_tools()
        self.setup()
        self.backups()
        self.workload()
        # warm-up, unmeasured: interpreter and modules, pgbackrest's binary
        run_cmd([sys.executable, "-m", "airflow_pg_incremental.cli", "--help"], env=self.env_ours("local"))
        run_cmd([self.pgbr_exe, "version"])
        self.rounds_loop()
        self.per_call()
        report = {
            "benchmark": "recovery time: PITR to the end of the archive, plain full restore with fsync, per-call "
                         "restore_command; ours vs pgBackRest 2.45 (PostgreSQL 15)",
            "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": {"scale": a.scale, "segments": a.segments, "repeat": a.repeat, "calls": a.calls,
                       "cache": a.cache, "level": a.level, "locations": self.locations,
                       "ours_verify": not a.ours_no_verify, "pgbr_queue_max": a.pgbr_queue_max,
                       "pgbackrest_restore": "process-max=%d archive-async=y archive-get-queue-max=%s spool-path "
                                             "(restore --type=default; plain: --type=immediate)"
                                             % (a.pgbr_process_max, a.pgbr_queue_max),
                       "pgbackrest_s3": "repo1-type=s3 repo1-s3-uri-style=path repo1-storage-verify-tls=n (HTTPS)",
                       "ours_s3": "PGINCR_S3_ENDPOINT_URL=https://... AWS_CA_BUNDLE=<self-signed certificate>",
                       "s3_conn_mbps": a.s3_conn_mbps, "mixed_mb": a.mixed_mb,
                       "ours_s3_read_streams": a.ours_s3_read_streams},
            "environment": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform(), "pgbackrest": self.info.get("pgbackrest"),
                            "install": self.install_note, "code": _git_state(), "filesystem": run_cmd(
                                ["stat", "-f", "-c", "%T", str(self.w)]).stdout.strip()},
            "source": self.info, "runs": self.runs, "rounds": self.rounds, "per_call": self.percall,
            "restore_commands": {k: (v or "").replace(str(self.w), "<W>") for k, v in self.restore_commands.items()},
            "total_run_s": time.monotonic() - self.t_start,
        }
        report["results"] = summarize(report)
        report["checks"] = checks(report)
        print_report(report)
        if not all(r.get("data_ok", True) for r in self.runs):
            raise RuntimeError("a restored server's data differs from the source's (see DATA CHECK FAILED above)")
        return report

    def start_proxy(self, mbps: float) -> None:
        """bench/throttle_proxy.py in front of SeaweedFS's HTTPS port: every connection of either
        tool downloads at most `mbps` MB/s, as from AWS S3 (see that file)."""
        port = free_port()
        self.proxy = subprocess.Popen([sys.executable, str(Path(__file__).with_name("throttle_proxy.py")),
                                       "--listen", str(port), "--to", f"127.0.0.1:{self.s3.https_port}",
                                       "--mbps", str(mbps)], stdout=subprocess.PIPE, text=True)
        line = self.proxy.stdout.readline().strip()
        if line != f"ready {port}":
            raise RuntimeError(f"the throttling proxy did not start: {line!r}")
        self.s3.front_port = port
        self.log(f"S3 connections capped at {mbps:g} MB/s each (bench/throttle_proxy.py on port {port})")

    def stop_proxy(self) -> None:
        if getattr(self, "proxy", None) is not None and self.proxy.poll() is None:
            self.proxy.terminate()
            self.proxy.wait(10)

    def stoppers(self):
        out = [("stop a restored server", s.stop) for s in self.servers]
        out.append(("stop the throttling proxy", self.stop_proxy))
        if self.src is not None:
            out.append(("stop the source PostgreSQL", self.src.stop))
        if self.s3 is not None:
            out.append(("stop SeaweedFS", self.s3.stop))
        if hasattr(self, "own_children"):
            out.append(("end background fetchers", self.end_adopted))
        return out


# =============================================================================================
def summarize(rep: dict) -> dict:
    """Per (kind, location): each side's median wall and spread, the ratio ours/pgBackRest of each
    round (the two ran next to each other), their median and spread."""
    out = {}
    for kind in ("pitr", "plain"):
        for loc in rep["config"]["locations"]:
            rs = [r for r in rep["runs"] if r["kind"] == kind and r["loc"] == loc]
            by = {s: {r["round"]: r for r in rs if r["side"] == s} for s in ("ours", "pgbr")}
            pairs = [(by["ours"][i], by["pgbr"][i]) for i in sorted(by["ours"]) if i in by["pgbr"]]
            ratios = [o["wall_s"] / p["wall_s"] for o, p in pairs]
            log_ratios = [o["promoted_at_s"] / p["promoted_at_s"] for o, p in pairs
                          if o.get("promoted_at_s") and p.get("promoted_at_s")]
            side = {}
            for s, runs in by.items():
                walls = [r["wall_s"] for r in runs.values()]
                side[s] = {"median_s": statistics.median(walls), "min_s": min(walls), "max_s": max(walls)}
                for k in ("restore_files_s", "recovery_s", "promoted_at_s", "redo_elapsed_s", "files_restored",
                          "command_s", "sync_after_s", "dirty_after_bytes", "restored_bytes"):
                    vals = [r.get(k) for r in runs.values() if r.get(k) is not None]
                    if vals:
                        side[s][k] = statistics.median(vals)
                if kind == "pitr":
                    side[s]["wal_to_replay_bytes"] = rep["source"]["backups"][f"{s}-{loc}"]["wal_to_replay_bytes"]
            out[f"{kind}-{loc}"] = {"kind": kind, "loc": loc, **side, "ratio": ratio_summary(ratios),
                                    "data_ok": all(r.get("data_ok", True) for r in rs)}
            if kind == "pitr":
                out[f"{kind}-{loc}"]["ratio_from_logs"] = ratio_summary(log_ratios)
            else:
                out[f"{kind}-{loc}"]["ours_durable_only_by_the_benchmarks_syncfs"] = ours_left_dirty(out[f"{kind}-{loc}"])
    return out


def checks(rep: dict) -> list[dict]:
    out = []
    for (kind, loc), target in TARGETS.items():
        res = rep["results"].get(f"{kind}-{loc}")
        if not res:
            continue
        v = res["ratio"]["median"]
        out.append({"check": f"{'PITR to the end of the archive' if kind == 'pitr' else 'plain full restore + fsync'}"
                             f", {LOCATIONS_LABEL[loc]}: ours / pgBackRest", "value": v, "target": f"<= {target}",
                    "pass": v is not None and v <= target, "per_round": res["ratio"]["per_round"]})
    for loc, pc in rep["per_call"].items():
        v = pc["stats_ms"]["ours-hit"]["p50"]
        out.append({"check": f"restore_command, spool hit, {LOCATIONS_LABEL[loc]}: p50 (ms)", "value": v,
                    "target": f"<= {TARGET_SPOOL_HIT_P50_MS:.0f}", "pass": v <= TARGET_SPOOL_HIT_P50_MS})
    out.append({"check": "data: every restored server's pgbench tables equal the source's at the end of the archive",
                "value": None, "target": "equal", "pass": all(r["data_ok"] for r in rep["results"].values())})
    return out


def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def ours_left_dirty(r: dict) -> bool:
    """A plain restore of ours that left most of what it wrote dirty: the engine did not fsync it
    itself, the benchmark's syncfs made it durable."""
    o = r["ours"]
    return bool(o.get("dirty_after_bytes") and o.get("restored_bytes")
                and o["dirty_after_bytes"] > 0.25 * o["restored_bytes"])


def _durability_mark(r: dict) -> str:
    return "  (*)" if r["kind"] == "plain" and ours_left_dirty(r) else ""


def print_report(rep: dict) -> None:
    cfg, src, res = rep["config"], rep["source"], rep["results"]
    s, wl = src["source"], src["workload"]
    print()
    print(f"Restore benchmark - PostgreSQL {s['postgresql']}, pgbench scale {cfg['scale']} "
          f"(database {s['database_bytes'] / MB:.0f} MB), {rep['environment']['pgbackrest']}, "
          f"{rep['environment']['cpus']} CPUs, {cfg['repeat']} round(s), page cache {cfg['cache']}")
    print(f"WAL after the backups: {wl['wal_bytes'] / MB:.0f} MB of pgbench ({wl['transactions']} transactions); "
          "archived segments after the backups: "
          + ", ".join(f"{loc} {n}" for loc, n in wl["segments_after_backups"].items())
          + "; the same archive_command fed both tools")
    print(f"ours: pgincr restore{'' if cfg['ours_verify'] else ' --no-verify'} (verify "
          f"{'on: pg_verifybackup of the restored copy' if cfg['ours_verify'] else 'off'}); "
          f"pgBackRest: {cfg['pgbackrest_restore']}")
    if cfg.get("s3_conn_mbps"):
        print(f"S3: every connection of either tool capped at {cfg['s3_conn_mbps']:g} MB/s (bench/throttle_proxy.py); "
              f"ours reads a backup by {cfg['ours_s3_read_streams']} ranged GETs side by side")
    print()
    head = (f"{'wall seconds (median of rounds)':<44}{'ours':>9}{'pgBR':>9}   {'ours/pgBR per round':<26}"
            f"{'median':>7}{'min-max':>12}{'target':>8}")
    print(head)
    print("-" * len(head))
    for key, r in res.items():
        label = ("PITR to end of archive, " if r["kind"] == "pitr" else "plain full restore + fsync, ") + r["loc"]
        ra = r["ratio"]
        target = TARGETS.get((r["kind"], r["loc"]))
        print(f"{label:<44}{_f(r['ours']['median_s']):>9}{_f(r['pgbr']['median_s']):>9}   "
              f"{', '.join(f'{x:.2f}' for x in ra['per_round']):<26}{_f(ra['median']):>7}"
              f"{_f(ra['min']) + '-' + _f(ra['max']):>12}{'<= ' + str(target):>8}"
              + ("" if r["data_ok"] else "  DATA CHECK FAILED") + _durability_mark(r))
        detail = (("restore_files_s", "files restored (s)"), ("recovery_s", "then until promoted (s)"),
                  ("promoted_at_s", "promoted, from the server log (s)"), ("redo_elapsed_s", "redo, server log (s)"),
                  ("files_restored", "files via restore_command"),
                  ("wal_to_replay_bytes", "WAL from backup start to archive end (MB)")) if r["kind"] == "pitr" else \
            (("command_s", "restore command (s)"), ("dirty_after_bytes", "dirty page cache after it (MB)"),
             ("sync_after_s", "syncfs after it (s)"), ("restored_bytes", "restored data directory (MB)"))
        for k, lab in detail:
            o, p = r["ours"].get(k), r["pgbr"].get(k)
            if o is None and p is None:
                continue
            fmt = "{:.0f}" if k == "files_restored" else "{:.2f}"
            if k.endswith("_bytes"):
                o, p, fmt = (None if o is None else o / MB), (None if p is None else p / MB), "{:.1f}"
            line = f"{'  ' + lab:<44}{_f(o, fmt):>9}{_f(p, fmt):>9}"
            if k == "promoted_at_s" and r.get("ratio_from_logs", {}).get("per_round"):
                rl = r["ratio_from_logs"]
                line += (f"   {', '.join(f'{x:.2f}' for x in rl['per_round']):<26}{_f(rl['median']):>7}"
                         f"{_f(rl['min']) + '-' + _f(rl['max']):>12}")
            print(line)
    print()
    for loc, pc in rep["per_call"].items():
        st = pc["stats_ms"]
        print(f"restore_command, one call, {LOCATIONS_LABEL[loc]} ({pc['calls']} calls each), ms:")
        for a, b in (("ours-hit", "pgbr-async-hit"), ("ours-direct", "pgbr-sync")):
            print(f"  {a:<12} p50 {st[a]['p50']:7.1f}  p90 {st[a]['p90']:7.1f}   vs {b:<15} p50 {st[b]['p50']:7.1f}  "
                  f"p90 {st[b]['p90']:7.1f}   ratio p50 {st[a]['p50'] / st[b]['p50']:.2f}")
        if not pc["notes"]["ours-hit"]["spool_detected"]:
            print("  note: ours left no file beside pg_wal after its first call: no fetch-ahead spool in this code, "
                  "so 'ours-hit' is a direct fetch too")
    print()
    print("ours = spawn of `pgincr restore --target latest --start` until it exits with the server promoted; "
          "pgBackRest = spawn of\n`pgbackrest restore` + pg_ctl start (the settings ours' restored server gets) until "
          f"pg_is_in_recovery() is false (polled\nevery {POLL_S} s, as the engine does). Durability: PostgreSQL fsyncs "
          "the whole data directory when it starts recovery from\na backup (SyncDataDirectory), so both PITR rows "
          "end durable; the plain rows add syncfs(2) of the target's filesystem\non both sides, timed. Data check "
          "(untimed): count and hash sum of every pgbench table equal the source's.")
    if any(_durability_mark(r) for r in res.values()):
        print("(*) ours left most of the restored bytes dirty in the page cache: this code does not fsync its "
              "restore itself;\n    the row is ours + the benchmark's syncfs(2) (timed), pgBackRest fsyncs every file.")
    loads = [x for r in rep["rounds"] for x in (r["loadavg_before"][0], r["loadavg_after"][0])]
    busy = [r["machine_busy_pct"] for r in rep["runs"]]
    print(f"machine: load average (1 min) {min(loads):.2f}-{max(loads):.2f} over the rounds; all CPUs busy "
          f"{min(busy):.0f}-{max(busy):.0f}% during the measured steps (ours/pgBackRest's own work included)")
    print()
    for c in rep["checks"]:
        extra = f" per round {', '.join(f'{x:.2f}' for x in c['per_round'])}" if c.get("per_round") else ""
        val = "" if c["value"] is None else f": {c['value']:.2f}"
        print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['check']}{val} (target {c['target']}){extra}")
    print(f"total run time {rep['total_run_s']:.0f} s")


# =============================================================================================
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=50, help="pgbench scale (default 50, ~750 MB; smaller for a quick run)")
    ap.add_argument("--segments", type=int, default=64,
                    help="WAL segments (16 MiB) the workload writes after the backups (default 64)")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (default 3); medians and per-round ratios")
    ap.add_argument("--calls", type=int, default=16, help="restore_command calls per per-call variant (default 16)")
    ap.add_argument("--cache", choices=("warm", "cold"), default="warm",
                    help="page-cache state of both tools' repositories before each measured step: warm = read once, "
                         "cold = posix_fadvise(DONTNEED) on every file (default warm)")
    ap.add_argument("--mixed-mb", type=int, default=0,
                    help="also load a less compressible table (bench_full's mixed: md5 text, jsonb; ~3x at zstd-3) "
                         "of this many MB before the backups, so that reading the backup weighs (default 0)")
    ap.add_argument("--level", type=int, default=3, help="zstd level of both tools' backups and WAL (default 3)")
    ap.add_argument("--pgbr-queue-max", default="1GiB",
                    help="pgBackRest archive-get-queue-max (default 1GiB = 64 segments ahead)")
    ap.add_argument("--ours-s3-read-streams", type=int, default=4,
                    help="ours' ranged GETs side by side per backup object read from S3 (PGINCR_S3_READ_STREAMS; "
                         "default 4, the engine's default; 1 = one stream)")
    ap.add_argument("--pgbr-process-max", type=int, default=2,
                    help="pgBackRest process-max of its restore and archive-get (default 2, the cores; give it "
                         "ours' S3 read streams, 4, when S3 connections are capped)")
    ap.add_argument("--no-s3", action="store_true", help="local repositories only (no SeaweedFS)")
    ap.add_argument("--s3-conn-mbps", type=float, default=0,
                    help="cap every S3 connection of both tools at this many MB/s (bench/throttle_proxy.py), as "
                         "a model of AWS S3, where one connection is the limit (default: no cap; loopback)")
    ap.add_argument("--ours-no-verify", action="store_true",
                    help="pass --no-verify to pgincr restore (skip pg_verifybackup of the restored copy; the stored "
                         "checksums are checked either way, as pgBackRest checks its own)")
    ap.add_argument("--workdir", help="where to put the run (default: a fresh directory under /var/tmp)")
    ap.add_argument("--json", help="write every run, the ratios and the environment to this JSON file")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (and each run's restored copy)")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install postgresql-15 / pgbackrest")
    a = ap.parse_args(argv)
    if a.scale < 1 or a.segments < 4 or a.repeat < 1 or a.calls < 2:
        ap.error("--scale >= 1, --segments >= 4, --repeat >= 1, --calls >= 2")
    return run_bench(a, "pgincr-rbench-", Bench, lambda b: b.stoppers())


if __name__ == "__main__":
    sys.exit(main())
