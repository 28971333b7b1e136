#!/usr/bin/env python
"""Benchmark: incremental backup and chain restore. Ours vs raw `pg_basebackup --incremental` +
`pg_combinebackup` on PostgreSQL 18, and vs pgBackRest `backup --type=incr` on PostgreSQL 15.

    /work/venv/bin/python bench/bench_incr.py [--scale 50] [--transactions 20000] [--clients 4] [--jobs 2]
                                              [--level 3] [--threads 1] [--repeat 1] [--workdir DIR]
                                              [--json FILE] [--keep] [--no-install] [--no-pgbackrest]

One run, three sides, the same pgbench shape between each side's full and its incremental:
  * ours        PostgreSQL 18: take_full_backup, pgbench workload, take_planned_backup(kind='incremental')
                (in a child Python process); restore_backup of full + incremental, verify=False and True
  * raw         PostgreSQL 18, the same server state: pg_basebackup -Fp full (next to ours, before the
                workload), after it pg_basebackup -Fp --incremental=<full>/backup_manifest; restore =
                pg_combinebackup (--link, and plain copy) of the plain dirs, and tar.zst extraction + combine
  * pgBackRest  2.45 on PostgreSQL 15 (pgBackRest 2.45 does not support 18): stanza-create, backup
                --type=full, the same workload, backup --type=incr (zst level L, process-max 2)
Targets: ours chain restore <= 1.15 x (raw extraction + pg_combinebackup); ours incremental stored
bytes <= 0.75 x pgBackRest incr stored bytes. Exit code 0 whatever the numbers; non-zero only when
something crashed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MB = 1_000_000  # sizes in MB = 10^6 bytes
CLUSTER = "bench"
TARGET_RESTORE_RATIO = 1.15  # ours chain restore / (raw tar.zst extraction + pg_combinebackup --link)
TARGET_SIZE_RATIO = 0.75  # ours incremental stored bytes / pgBackRest incr stored bytes
PG15_POSTGRES = Path("/usr/lib/postgresql/15/bin/postgres")
SAMPLE_INTERVAL = 0.020
LIBPQ_ENV_PREFIXES = ("PG",)  # PG* (but not PGINCR_*) removed from the children's environment


# =============================================================================================
# child mode: `bench_incr.py _child --repo DIR --kind full|incremental ...` runs ONE backup of ours
# and prints a JSON line. Connection parameters come from PGHOST/PGPORT/PGUSER/PGPASSWORD only.
# =============================================================================================
def child_main(argv: list[str]) -> int:
    t_start = time.monotonic()
    ap = argparse.ArgumentParser(prog="bench_incr.py _child")
    ap.add_argument("--repo", required=True)
    ap.add_argument("--kind", choices=("full", "incremental"), required=True)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    from airflow_pg_incremental.core.backup import take_full_backup
    from airflow_pg_incremental.core.incremental import take_planned_backup
    from airflow_pg_incremental.core.pgconn import ConnInfo
    from airflow_pg_incremental.core.repository import LocalRepository

    env = os.environ
    conn = ConnInfo(host=env["PGHOST"], port=int(env["PGPORT"]), user=env["PGUSER"],
                    password=env.get("PGPASSWORD"), dbname=env.get("PGDATABASE", "postgres"))
    repo = LocalRepository(a.repo)
    repo.create()  # idempotent
    import psycopg  # noqa: F401  (an Airflow worker has these loaded already)
    import zstandard  # noqa: F401
    import_s = time.monotonic() - t_start
    t0 = time.monotonic()
    if a.kind == "full":
        meta = take_full_backup(conn, repo, CLUSTER, compression_level=a.level, threads=a.threads,
                                progress_interval=3600)
    else:
        meta = take_planned_backup(conn, repo, CLUSTER, kind="incremental", compression_level=a.level,
                                   threads=a.threads, progress_interval=3600)
    call_s = time.monotonic() - t0
    hwm = None
    try:
        for line in open("/proc/self/status", "rb"):
            if line.startswith(b"VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    json.dump({"meta": meta, "call_s": call_s, "import_s": import_s, "vm_hwm_bytes": hwm}, sys.stdout)
    sys.stdout.write("\n")
    return 0


# =============================================================================================
# measuring helpers
# =============================================================================================
def _server_cpu(pid: int | None) -> float:
    """CPU seconds used so far by a PostgreSQL server: the postmaster, its reaped children (walsenders
    and backends that exited: children_user/system) and its live children."""
    if not pid:
        return 0.0
    import psutil

    try:
        p = psutil.Process(pid)
        t = p.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for c in p.children(recursive=True):
            try:
                ct = c.cpu_times()
                total += ct.user + ct.system
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return 0.0


def postmaster_pid(data_dir: Path) -> int | None:
    try:
        return int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


class Meter:
    """Wall time; CPU of this process and of its waited-for descendants; CPU of the PostgreSQL
    server (if given); system-wide busy and steal time: busy minus both is the other processes'
    CPU, the noise of the measurement."""

    def __init__(self, server_pid: int | None = None):
        import psutil

        self._psutil = psutil
        self.server_pid = server_pid
        self.s0 = psutil.cpu_times()
        self.srv0 = _server_cpu(server_pid)
        self.c0 = self._cpu()
        self.load0 = os.getloadavg()[0]
        self.t0 = time.monotonic()

    @staticmethod
    def _cpu() -> tuple[float, float]:
        """(user, sys) of this process plus its waited-for descendants."""
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + c.ru_utime, s.ru_stime + c.ru_stime

    def stop(self) -> dict:
        wall = time.monotonic() - self.t0
        c1 = self._cpu()
        user, sys_ = c1[0] - self.c0[0], c1[1] - self.c0[1]
        own = user + sys_
        srv = _server_cpu(self.server_pid) - self.srv0 if self.server_pid else 0.0
        s1 = self._psutil.cpu_times()
        busy = sum(getattr(s1, f) - getattr(self.s0, f) for f in ("user", "nice", "system", "irq", "softirq"))
        steal = getattr(s1, "steal", 0.0) - getattr(self.s0, "steal", 0.0)
        ncpu = os.cpu_count() or 1
        other = max(0.0, busy - own - srv)
        return {"wall_s": wall, "cpu_s": own, "cpu_user_s": user, "cpu_sys_s": sys_, "server_cpu_s": srv,
                "system_busy_s": busy, "other_cpu_s": other,
                "other_cpu_pct": 100 * other / (wall * ncpu) if wall else 0.0,
                "steal_pct": 100 * steal / (wall * ncpu) if wall else 0.0,
                "loadavg_1m_start": self.load0, "loadavg_1m_end": os.getloadavg()[0]}


class TreeRss(threading.Thread):
    """Peak of the summed RSS of a process and its descendants, sampled every 20 ms. A process seen
    for the first time with its parent's name (between fork and exec) is not counted in that sample."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        import psutil

        self._psutil = psutil
        self.root = psutil.Process(pid)
        self.peak = 0
        self.peak_breakdown: dict[str, int] = {}
        self.samples = 0
        self._seen: set[int] = set()
        self._ev = threading.Event()

    def sample(self) -> None:
        ps = self._psutil
        try:
            tree = [self.root] + self.root.children(recursive=True)
        except ps.Error:
            return
        names, total, breakdown = {}, 0, {}
        for p in tree:
            try:
                name, ppid, rss = p.name(), p.ppid(), p.memory_info().rss
            except ps.Error:
                continue
            names[p.pid] = name
            first = p.pid not in self._seen
            self._seen.add(p.pid)
            if first and p.pid != self.root.pid and names.get(ppid) == name:
                continue
            total += rss
            breakdown[name] = breakdown.get(name, 0) + rss
        self.samples += 1
        if total > self.peak:
            self.peak, self.peak_breakdown = total, breakdown

    def run(self) -> None:
        while not self._ev.wait(SAMPLE_INTERVAL):
            self.sample()

    def stop(self) -> None:
        self._ev.set()
        self.join()


def run_cmd(cmd: list[str], *, env: dict | None = None, cwd: str | os.PathLike = "/", check: bool = True,
            timeout: float = 7200, what: str | None = None) -> subprocess.CompletedProcess:
    """subprocess.run in its own process group, killed (that group, by its id) on any exception,
    e.g. SIGTERM or Ctrl-C of the benchmark, so nothing it started outlives us."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(cwd),
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except BaseException:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()
        raise
    r = subprocess.CompletedProcess(cmd, p.returncode, out.decode("utf-8", "replace"),
                                    err.decode("utf-8", "replace"))
    if check and r.returncode != 0:
        raise RuntimeError(f"{what or cmd[0]} failed (exit {r.returncode}): {(r.stderr or r.stdout).strip()[-2000:]}")
    return r


def bash(script: str, **kw) -> subprocess.CompletedProcess:
    return run_cmd(["bash", "-c", "set -euo pipefail; " + script], **kw)


def q(s) -> str:
    import shlex

    return shlex.quote(str(s))


def dir_size(path: Path) -> dict:
    """Apparent bytes (du -sb), allocated bytes (du -sB1) and file count of a directory tree."""
    apparent = allocated = files = 0
    for dirpath, dirs, names in os.walk(path):
        for n in names:
            try:
                st = os.lstat(os.path.join(dirpath, n))
            except OSError:
                continue
            apparent += st.st_size
            allocated += st.st_blocks * 512
            files += 1
    return {"apparent_bytes": apparent, "allocated_bytes": allocated, "files": files}


def drop_dirty() -> float:
    """sync(2) before a measured step, so write-back of what the previous step wrote does not land
    in it. Returns the seconds it took (not part of any measurement)."""
    t = time.monotonic()
    os.sync()
    return time.monotonic() - t


def clean_env() -> dict:
    """No connection, S3 or pgBackRest settings leak from our environment into the commands."""
    return {k: v for k, v in os.environ.items()
            if not (k.startswith(("AWS_", "PGINCR_", "PGBACKREST_")) or k.startswith("PG"))}


def parse_tps(out: str) -> float | None:
    m = re.search(r"tps = ([0-9.]+) \((?:without|excluding)", out) or re.search(r"tps = ([0-9.]+)", out)
    return float(m.group(1)) if m else None


def _median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


class LogCapture(logging.Handler):
    """Keeps the engine's log records of one call (restore: the pg_combinebackup duration)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def combine_seconds(self) -> float | None:
        for r in self.records:
            if isinstance(r.msg, str) and r.msg.startswith("combined %d backups") and r.args:
                return float(r.args[-1])
        return None



# -- where the bytes are: per relation ------------------------------------------------------------
REL_SQL = ("SELECT c.relname, pg_relation_filepath(c.oid) FROM pg_class c "
           "WHERE c.relname LIKE 'pgbench%' AND c.relkind IN ('r', 'i') ORDER BY 1")
_FILE_RE = re.compile(r"^(?:pg_data/)?(base/\d+/)(?:INCREMENTAL\.)?(\d+)(?:_(?:fsm|vm|init))?(?:\.\d+)?$")


def relation_files(pg) -> dict[str, str]:
    """{'base/5/16403': 'pgbench_accounts', ...} for the pgbench tables and indexes."""
    out = {}
    for line in pg.psql(REL_SQL).strip().splitlines():
        name, path = line.split("|", 1)
        out[path] = name
    return out


def relation_of(path: str, rels: dict[str, str]) -> str:
    m = _FILE_RE.match(path)
    return rels.get(m.group(1) + m.group(2), "other") if m else "other"


def ours_breakdown(tar_zst: Path, rels: dict[str, str], level: int) -> dict[str, dict]:
    """Per relation: bytes in our incremental's tar, and each member compressed on its own at the
    same level (an estimate of its share of the one-stream object: the sum comes within ~1%)."""
    import tarfile

    import zstandard

    out: dict[str, dict] = {}
    comp = zstandard.ZstdCompressor(level=level)
    with open(tar_zst, "rb") as f, zstandard.ZstdDecompressor().stream_reader(f) as zr, \
            tarfile.open(fileobj=zr, mode="r|") as tf:
        for m in tf:
            if not m.isfile():
                continue
            data = tf.extractfile(m).read()
            d = out.setdefault(relation_of(m.name, rels), {"raw_bytes": 0, "stored_bytes": 0, "files": 0})
            d["raw_bytes"] += len(data)
            d["stored_bytes"] += len(comp.compress(data))
            d["files"] += 1
    return out


def pgbr_breakdown(manifest: Path, rels: dict[str, str]) -> dict[str, dict]:
    """Per relation: what this pgBackRest backup stored itself (files without a 'reference' to an
    earlier backup), from its backup.manifest ('size' = bytes of the file, 'repo-size' = stored)."""
    out: dict[str, dict] = {}
    section = None
    for line in manifest.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section != "target:file" or "=" not in line:
            continue
        key, val = line.split("=", 1)
        try:
            d = json.loads(val)
        except ValueError:
            continue
        if "reference" in d:
            continue
        r = out.setdefault(relation_of(key, rels), {"raw_bytes": 0, "stored_bytes": 0, "files": 0})
        r["raw_bytes"] += int(d.get("size", 0))
        r["stored_bytes"] += int(d.get("repo-size", d.get("size", 0)))
        r["files"] += 1
    return out


# =============================================================================================
class Bench:
    def __init__(self, args, workdir: Path):
        self.a = args
        self.w = workdir
        self.pg18 = None
        self.pg15 = None
        self.runs: list[dict] = []
        self.info: dict = {}
        self.install_note = ""
        self.pgbr_exe: str | None = None
        self.pgbr_version: str | None = None
        self.pgbr_note = ""
        self.pgbr_cfg: Path | None = None
        self.pgbr_base: Path | None = None
        self.pgbr_user: str | None = None
        self.t_start = time.monotonic()

    def log(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t_start:7.1f} s] {msg}", flush=True)

    # -- common ----------------------------------------------------------------------------------
    def pgbench_workload(self, pg, tag: str) -> dict:
        """pgbench -n -c C -j J -t N over the unix socket as the superuser, like pg.pgbench_run."""
        a = self.a
        pgbench = os.path.join(pg.server.bindir, "pgbench")
        lsn0 = pg.psql("SELECT pg_current_wal_lsn() - '0/0'").strip()
        cmd = [pgbench, "-n", "-c", str(a.clients), "-j", str(a.jobs), "-t", str(a.transactions),
               "-h", str(pg.server.socket_dir), "-p", str(pg.port), "-U", "postgres", "postgres"]
        m = Meter(postmaster_pid(pg.server.data_dir))
        r = run_cmd(cmd, env=clean_env(), what="pgbench")
        met = m.stop()
        lsn1 = pg.psql("SELECT pg_current_wal_lsn() - '0/0'").strip()
        out = {"command": f"pgbench -n -c {a.clients} -j {a.jobs} -t {a.transactions}", "seconds": met["wall_s"],
               "tps": parse_tps(r.stdout),
               "transactions": a.clients * a.transactions, "wal_bytes": int(float(lsn1)) - int(float(lsn0)),
               "meter": met}
        self.log(f"{tag}: pgbench -n -c {a.clients} -j {a.jobs} -t {a.transactions} ({out['transactions']} tx) "
                 f"in {out['seconds']:.1f} s, {out['tps'] or 0:.0f} tps, {out['wal_bytes'] / MB:.0f} MB of WAL")
        return out

    def checkpoint(self, pg) -> float:
        t = time.monotonic()
        pg.psql("CHECKPOINT")
        return time.monotonic() - t

    def record(self, side: str, r: dict, repeat: int | None = None) -> dict:
        r = {"side": side, **r}
        if repeat is not None:
            r["repeat"] = repeat
        self.runs.append(r)
        return r

    # -- installation -----------------------------------------------------------------------------
    def maybe_install(self) -> None:
        if self.a.no_pgbackrest:
            self.install_note = "--no-pgbackrest"
            return
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
            self.log(self.install_note)
            return
        cmd = "apt-get update && apt-get install -y " + " ".join(missing)
        self.log(f"installing the missing {', '.join(missing)}: {cmd}")
        t = time.monotonic()
        try:
            r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=900,
                               env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
            ok = r.returncode == 0
            detail = (r.stderr or r.stdout).strip().splitlines()[-3:] if not ok else []
        except subprocess.TimeoutExpired:
            ok, detail = False, ["timed out after 900 s"]
        self.install_note = f"ran `{cmd}`: {'ok' if ok else 'FAILED'} ({time.monotonic() - t:.0f} s)"
        self.log(self.install_note + ("" if ok else ": " + " | ".join(detail)))

    # =========================================================================================
    # PostgreSQL 18: ours and raw
    # =========================================================================================
    def libpq_env(self, pg) -> dict:
        env = clean_env()
        env.update(pg.conninfo().env())
        return env

    def ours_backup(self, repo: Path, kind: str, tag: str) -> dict:
        """One backup of ours in a child process (its own interpreter: clean memory figures)."""
        a = self.a
        out_f, err_f = self.w / f"{tag}.out", self.w / f"{tag}.err"
        cmd = [sys.executable, str(Path(__file__).resolve()), "_child", "--repo", str(repo), "--kind", kind,
               "--level", str(a.level), "--threads", str(a.threads)]
        drop_dirty()
        meter = Meter(postmaster_pid(self.pg18.server.data_dir))
        with open(out_f, "wb") as so, open(err_f, "wb") as se:
            p = subprocess.Popen(cmd, stdout=so, stderr=se, env=self.libpq_env(self.pg18), cwd=str(self.w),
                                 start_new_session=True)
        sampler = TreeRss(p.pid)
        try:
            sampler.start()
            p.wait()
        except BaseException:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            raise
        finally:
            sampler.stop()
        m = meter.stop()
        from _common import tail

        if p.returncode != 0:
            raise RuntimeError(f"ours {kind} backup failed (exit {p.returncode}):\n{tail(err_f)}")
        res = json.loads(out_f.read_text())
        meta = res["meta"]
        for f in (out_f, err_f):
            f.unlink(missing_ok=True)
        return {"wall_s": res["call_s"], "process_wall_s": m["wall_s"], "startup_s": res["import_s"],
                "raw_bytes": meta.get("raw_bytes"), "stored_bytes": meta.get("stored_bytes"),
                "engine_duration_s": meta.get("duration_s"), "kind": meta.get("kind"),
                "backup_id": meta.get("backup_id"), "parent_id": meta.get("parent_id"),
                "plan": meta.get("plan"), "file_count": meta.get("file_count"),
                "start_lsn": meta.get("start_lsn"), "stop_lsn": meta.get("stop_lsn"),
                "peak_rss_mb": sampler.peak / MB,
                "peak_breakdown_mb": {k: round(v / MB, 1) for k, v in sampler.peak_breakdown.items()},
                "python_vm_hwm_mb": (res.get("vm_hwm_bytes") or 0) / MB, "rss_samples": sampler.samples,
                "cpu_s": m["cpu_s"], "server_cpu_s": m["server_cpu_s"], "meter": m}

    def raw_backup(self, dest: Path, incremental_from: Path | None) -> dict:
        pgbb = self.pg_bin("pg_basebackup")
        cmd = [pgbb, "-D", str(dest), "-Fp", "-X", "fetch", "-w", "-c", "fast"]
        if incremental_from is not None:
            cmd.append(f"--incremental={incremental_from / 'backup_manifest'}")
        drop_dirty()
        meter = Meter(postmaster_pid(self.pg18.server.data_dir))
        run_cmd(cmd, env=self.libpq_env(self.pg18), what="pg_basebackup")
        m = meter.stop()
        size = dir_size(dest)
        wal = dir_size(dest / "pg_wal")
        return {"wall_s": m["wall_s"], "process_wall_s": m["wall_s"], "raw_bytes": size["apparent_bytes"],
                "on_disk_bytes": size["allocated_bytes"], "files": size["files"],
                "pg_wal_bytes": wal["apparent_bytes"], "cpu_s": m["cpu_s"], "server_cpu_s": m["server_cpu_s"],
                "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)).replace(
                    str(self.w), "<W>"), "meter": m}

    def tar_zst(self, src: Path, out: Path) -> dict:
        """tar -C src -cf - . | zstd -<L> -T1 -o out (not part of any backup measurement)."""
        drop_dirty()
        m = Meter()
        bash(f"tar -C {q(src)} -cf - . | zstd -{self.a.level} -q -T1 -o {q(out)}", what="tar | zstd")
        met = m.stop()
        return {"seconds": met["wall_s"], "stored_bytes": out.stat().st_size, "cpu_s": met["cpu_s"]}

    def pg_bin(self, prog: str, major: int = 18) -> str:
        from airflow_pg_incremental.core.binaries import find_program

        return find_program(prog, major)

    def phase_pg18(self) -> None:
        from airflow_pg_incremental.sandbox import SandboxPostgres

        a = self.a
        t = time.monotonic()
        self.pg18 = SandboxPostgres(self.w / "pg18", major=18)  # assigned before start(): cleanup sees it
        self.pg18.start()
        pg = self.pg18
        version = pg.psql("SHOW server_version").strip()
        self.log(f"PostgreSQL {version} started as OS user {pg.os_user or 'self'} on 127.0.0.1:{pg.port} "
                 f"({time.monotonic() - t:.1f} s); pgbench -i -s {a.scale} ...")
        t = time.monotonic()
        pg.pgbench_init(a.scale, fillfactor=a.fillfactor)
        ck = self.checkpoint(pg)
        db = int(pg.psql("SELECT sum(pg_database_size(oid)) FROM pg_database").strip())
        self.info["pg18"] = {"postgresql": version, "cluster_bytes_after_init": db, "init_s": time.monotonic() - t,
                             "os_user": pg.os_user, "summarize_wal": pg.psql("SHOW summarize_wal").strip(),
                             "data_checksums": pg.psql("SHOW data_checksums").strip()}
        self.log(f"pgbench data loaded, CHECKPOINT ({ck:.1f} s); cluster {db / MB:.0f} MB")

        # both fulls before the workload: both incrementals then cover the same changes
        ours_full_repo = self.w / "ours" / "repo-full"
        ours_full_repo.parent.mkdir(mode=0o755)
        r = self.record("ours-full", self.ours_backup(ours_full_repo, "full", "ours-full"))
        self.ours_full_id = r["backup_id"]
        self.log(f"ours full backup {r['backup_id']}: {r['wall_s']:.2f} s, stored {r['stored_bytes'] / MB:.1f} MB "
                 f"(raw {r['raw_bytes'] / MB:.1f} MB)")
        raw_dir = self.w / "raw"
        raw_dir.mkdir(mode=0o755)
        self.raw_full = raw_dir / "full"
        r = self.raw_backup(self.raw_full, None)
        self.log(f"raw full pg_basebackup -Fp: {r['wall_s']:.2f} s, {r['raw_bytes'] / MB:.1f} MB")
        z = self.tar_zst(self.raw_full, raw_dir / "full.tar.zst")
        r.update({"stored_bytes": z["stored_bytes"], "tar_zstd_s": z["seconds"]})
        self.record("raw-full", r)
        self.raw_full_tzst = raw_dir / "full.tar.zst"

        self.info["pg18"]["workload"] = self.pgbench_workload(pg, "PostgreSQL 18")
        ck = self.checkpoint(pg)
        self.info["pg18"]["checkpoint_after_workload_s"] = ck
        self.info["pg18"]["cluster_bytes_after_workload"] = int(
            pg.psql("SELECT sum(pg_database_size(oid)) FROM pg_database").strip())
        self.log(f"CHECKPOINT after the workload ({ck:.1f} s, unmeasured: no backup carries the workload's flush)")

        self.ours_incr: dict | None = None
        self.raw_incr: Path | None = None
        for i in range(a.repeat):
            order = ["ours", "raw"] if i % 2 == 0 else ["raw", "ours"]
            for side in order:
                if side == "ours":
                    repo = self.w / "ours" / f"repo-{i + 1}"
                    shutil.copytree(ours_full_repo, repo, symlinks=True)  # only the full: parent = that full
                    r = self.ours_backup(repo, "incremental", f"ours-incr-{i + 1}")
                    if r["kind"] != "incremental" or r["parent_id"] != self.ours_full_id:
                        raise RuntimeError(f"ours took a {r['kind']} backup (parent {r['parent_id']}) instead of an "
                                           f"incremental on {self.ours_full_id}: {(r.get('plan') or {}).get('reason')}")
                    r["repo"] = str(repo)
                    self.record("ours-incr", r, i + 1)
                    if self.ours_incr is None:
                        self.ours_incr = r
                    else:
                        shutil.rmtree(repo, ignore_errors=True)
                else:
                    d = raw_dir / f"incr-{i + 1}"
                    r = self.raw_backup(d, self.raw_full)
                    self.record("raw-incr", r, i + 1)
                    if self.raw_incr is None:
                        self.raw_incr = d
                    else:
                        shutil.rmtree(d, ignore_errors=True)
                self.log(f"  [{i + 1}/{a.repeat}] {side + ' incremental':<17} {r['wall_s']:6.2f} s  "
                         f"raw {r['raw_bytes'] / MB:7.1f} MB  "
                         + (f"stored {r['stored_bytes'] / MB:6.1f} MB  " if side == "ours" else "")
                         + f"CPU {r['cpu_s']:5.1f} s  server CPU {r['server_cpu_s']:5.1f} s  "
                           f"other procs {r['meter']['other_cpu_pct']:3.0f}%")
        # the raw incremental's compressed size (the same zstd level), and the tar.zst for extraction
        z = self.tar_zst(self.raw_incr, raw_dir / "incr.tar.zst")
        self.raw_incr_tzst = raw_dir / "incr.tar.zst"
        wal_z = int(bash(f"tar -C {q(self.raw_incr)} -cf - pg_wal | zstd -{a.level} -q -T1 -c | wc -c").stdout)
        for r in self.runs:
            if r["side"] == "raw-incr":
                r["stored_bytes"] = z["stored_bytes"]
                r["tar_zstd_s"] = z["seconds"]
                r["pg_wal_stored_bytes"] = wal_z
        self.log(f"raw incremental as tar | zstd -{a.level}: {z['stored_bytes'] / MB:.1f} MB ({z['seconds']:.1f} s)")
        rels = relation_files(pg)
        self.info["pg18"]["relation_files"] = rels
        self.info["pg18"]["fillfactor_accounts"] = pg.psql(
            "SELECT coalesce(array_to_string(reloptions, ','), 'fillfactor=100') FROM pg_class "
            "WHERE relname = 'pgbench_accounts'").strip()
        from airflow_pg_incremental.core.metadata import backup_prefix

        tz = Path(self.ours_incr["repo"]) / backup_prefix(CLUSTER, self.ours_incr["backup_id"]) / "base.tar.zst"
        self.info["breakdown_ours"] = ours_breakdown(tz, rels, a.level)
        self.pg18_os_user = pg.os_user
        pg.stop()  # not needed for the restores: takes no CPU during them
        self.pg18 = None
        self.log("PostgreSQL 18 stopped")

    # -- restores (server stopped) ------------------------------------------------------------
    def restore_ours(self, verify: bool, target: Path) -> dict:
        from airflow_pg_incremental.core.repository import LocalRepository
        from airflow_pg_incremental.core.restore import restore_backup

        cap = LogCapture()
        lg = logging.getLogger("airflow_pg_incremental")
        old_level = lg.level
        lg.setLevel(logging.INFO)
        lg.addHandler(cap)
        drop_dirty()
        meter = Meter()
        try:
            res = restore_backup(LocalRepository(self.ours_incr["repo"]), CLUSTER, self.ours_incr["backup_id"],
                                 target, verify=verify, os_user=self.pg18_os_user, progress_interval=3600)
        finally:
            lg.removeHandler(cap)
            lg.setLevel(old_level)
        m = meter.stop()
        comb = cap.combine_seconds()
        return {"wall_s": m["wall_s"], "restore_seconds": res["restore_seconds"], "combine_s": comb,
                "extract_and_rest_s": m["wall_s"] - comb if comb is not None else None,
                "chain": res.get("chain"), "verified": res.get("verified"), "cpu_s": m["cpu_s"],
                "cpu_sys_s": m["cpu_sys_s"], "meter": m,
                "output_bytes": dir_size(target)["apparent_bytes"]}

    def restore_raw(self, verify: bool, stage: Path, out: Path) -> dict:
        """The raw equivalent of ours: extract both tar.zst (tar -I 'zstd -d'), [pg_verifybackup each],
        pg_combinebackup --link, [pg_verifybackup the result], then remove the staging and chown the
        result to the server's user (ours does both; reported apart)."""
        combine, verifyb = self.pg_bin("pg_combinebackup"), self.pg_bin("pg_verifybackup")
        steps = {}
        drop_dirty()
        meter = Meter()
        t = time.monotonic()
        (stage / "full").mkdir(parents=True)
        (stage / "incr").mkdir()
        run_cmd(["tar", "-I", "zstd -d", "-xf", str(self.raw_full_tzst), "-C", str(stage / "full")], what="tar -x")
        run_cmd(["tar", "-I", "zstd -d", "-xf", str(self.raw_incr_tzst), "-C", str(stage / "incr")], what="tar -x")
        steps["extract_s"] = time.monotonic() - t
        if verify:
            t = time.monotonic()
            for d in ("full", "incr"):
                run_cmd([verifyb, "--quiet", "--no-parse-wal", str(stage / d)], what="pg_verifybackup")
            steps["verify_parts_s"] = time.monotonic() - t
        t = time.monotonic()
        run_cmd([combine, "--link", "-o", str(out), str(stage / "full"), str(stage / "incr")], what="pg_combinebackup")
        steps["combine_s"] = time.monotonic() - t
        if verify:
            t = time.monotonic()
            run_cmd([verifyb, "--quiet", str(out)], what="pg_verifybackup")
            steps["verify_result_s"] = time.monotonic() - t
        core = time.monotonic() - meter.t0
        t = time.monotonic()
        shutil.rmtree(stage)
        steps["staging_removal_s"] = time.monotonic() - t
        t = time.monotonic()
        if self.pg18_os_user and os.geteuid() == 0:
            run_cmd(["chown", "-R", f"{self.pg18_os_user}:", str(out)], what="chown")
        steps["chown_s"] = time.monotonic() - t
        m = meter.stop()
        return {"wall_s": core, "wall_same_end_state_s": m["wall_s"], **steps, "cpu_s": m["cpu_s"],
                "cpu_sys_s": m["cpu_sys_s"], "meter": m,
                "output_bytes": dir_size(out)["apparent_bytes"]}

    COMBINE_MODES = {"link": ["--link"], "copy": [], "cfr": ["--copy-file-range"], "clone": ["--clone"]}

    def combine_only(self, mode: str, out: Path) -> dict:
        combine = self.pg_bin("pg_combinebackup")
        drop_dirty()
        meter = Meter()
        run_cmd([combine, *self.COMBINE_MODES[mode], "-o", str(out), str(self.raw_full), str(self.raw_incr)],
                what="pg_combinebackup")
        m = meter.stop()
        return {"wall_s": m["wall_s"], "combine_s": m["wall_s"], "cpu_s": m["cpu_s"], "cpu_sys_s": m["cpu_sys_s"],
                "meter": m,
                "output_bytes": dir_size(out)["apparent_bytes"]}

    def phase_restore(self) -> None:
        a = self.a
        rd = self.w / "restore"
        rd.mkdir(mode=0o755)
        # an Airflow worker has the engine's modules loaded: import them (and let find_program probe the
        # binaries, which it caches) before the first measured restore
        import tarfile  # noqa: F401

        import airflow_pg_incremental.core.incremental  # noqa: F401
        import airflow_pg_incremental.core.repository  # noqa: F401
        import airflow_pg_incremental.core.restore  # noqa: F401

        for prog in ("pg_combinebackup", "pg_verifybackup"):
            self.pg_bin(prog)
        # --clone needs reflinks (XFS, Btrfs): tried once, reported as unsupported where the filesystem refuses
        try:
            r = self.combine_only("clone", rd / "clone-probe")
            self.info["combine_clone"] = {"supported": True, "wall_s": r["wall_s"]}
        except RuntimeError as e:
            self.info["combine_clone"] = {"supported": False, "error": str(e)[-1000:]}
        shutil.rmtree(rd / "clone-probe", ignore_errors=True)
        self.info["filesystem"] = bash(f"stat -f -c %T {q(rd)}").stdout.strip()
        sides = ["ours-restore", "raw-restore", "ours-restore-verify", "raw-restore-verify", "raw-combine-link",
                 "raw-combine-copy", "raw-combine-cfr"]
        for i in range(a.repeat):
            order = sides if i % 2 == 0 else list(reversed(sides))
            for side in order:
                out = rd / f"{side}-{i + 1}"
                if side.startswith("ours"):
                    r = self.restore_ours(side.endswith("verify"), out)
                elif side.startswith("raw-restore"):
                    r = self.restore_raw(side.endswith("verify"), rd / f".{side}-{i + 1}.stage", out)
                else:
                    r = self.combine_only(side.rsplit("-", 1)[1], out)
                self.record(side, r, i + 1)
                extra = "".join(f"  {k[:-2]} {v:.2f}" for k, v in r.items()
                                if k.endswith("_s") and k not in ("wall_s", "cpu_s") and isinstance(v, float))
                self.log(f"  [{i + 1}/{a.repeat}] {side:<20} {r['wall_s']:6.2f} s{extra}  CPU {r['cpu_s']:5.1f} s  "
                         f"other procs {r['meter']['other_cpu_pct']:3.0f}%")
                shutil.rmtree(out, ignore_errors=True)  # outside the measurement

    # =========================================================================================
    # PostgreSQL 15: pgBackRest
    # =========================================================================================
    def pgbr(self, *args: str, check: bool = True, timeout: float = 7200) -> subprocess.CompletedProcess:
        from airflow_pg_incremental.core.server import as_user

        cmd = as_user([self.pgbr_exe, f"--config={self.pgbr_cfg}", "--stanza=bench", *args], self.pgbr_user)
        return run_cmd(cmd, env=clean_env(), check=check, timeout=timeout, what=f"pgbackrest {args[-1]}")

    def pgbr_info(self, repo: int = 1) -> list[dict]:
        r = self.pgbr(f"--repo={repo}", "--output=json", "info")
        return json.loads(r.stdout)[0].get("backup", [])

    # the variants, each in its own repository of the same stanza (archive-push writes to all):
    # 2 = block incremental (repo-bundle + repo-block, pgBackRest's opt-in block-level incr),
    # 3 = pgBackRest's default compression (gz, its default level 6) instead of zst at our level
    VARIANTS = {2: ("block incremental (beta in 2.45: repo-bundle=y repo-block=y, zst level L)", []),
                3: ("default compression (gz level 6), file-level incr", ["--compress-type=gz", "--compress-level=6"])}

    def archive_files(self) -> dict[str, int]:
        root = self.pgbr_base / "repo" / "archive"
        return {str(p): p.stat().st_size for p in root.rglob("*") if p.is_file()} if root.exists() else {}

    def wait_archived(self, pg, timeout: float = 600) -> float:
        """Until the archiver has no .ready file left (pgBackRest's archive-check would otherwise wait
        for the backlog inside the measured backup)."""
        st = pg.server.data_dir / "pg_wal" / "archive_status"
        t0 = time.monotonic()
        while any(f.endswith(".ready") for f in os.listdir(st)):
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"archiver still has .ready files after {timeout:.0f} s: "
                                   f"{pg.psql('SELECT * FROM pg_stat_archiver').strip()}")
            time.sleep(0.2)
        return time.monotonic() - t0

    def phase_pgbackrest(self) -> None:
        from airflow_pg_incremental.sandbox import SandboxPostgres
        from airflow_pg_incremental.core.server import chown_tree

        a = self.a
        if a.no_pgbackrest:
            self.pgbr_note = "--no-pgbackrest"
            return
        exe = shutil.which("pgbackrest")
        if not exe or not PG15_POSTGRES.exists():
            self.pgbr_note = ("pgbackrest not installed" if not exe else "PostgreSQL 15 not installed") + (
                f" ({self.install_note})" if self.install_note else "")
            self.log(f"pgBackRest column skipped: {self.pgbr_note}")
            return
        self.pgbr_exe = exe
        self.pgbr_version = run_cmd([exe, "version"]).stdout.strip()
        t = time.monotonic()
        base = self.pgbr_base = self.w / "pgbackrest"
        pg = SandboxPostgres(self.w / "pg15", major=15)
        self.pgbr_user = pg.os_user  # pgBackRest runs as the database's OS user, as in a normal deployment
        for sub in ("", "repo", "repo2", "repo3", "log", "lock", "spool"):
            (base / sub).mkdir(mode=0o750 if sub.startswith("repo") else 0o755, exist_ok=True)
        self.pgbr_cfg = base / "pgbackrest.conf"
        srv = pg.server
        self.pgbr_cfg.write_text(
            "[global]\n"
            f"repo1-path={base / 'repo'}\n"
            "repo1-retention-full=9\n"
            "compress-type=zst\n"
            f"compress-level={a.level}\n"
            + ("" if a.no_variants else
               "beta=y\n"  # block incremental is a beta feature in 2.45
               f"repo2-path={base / 'repo2'}\nrepo2-retention-full=9\nrepo2-bundle=y\nrepo2-block=y\n"
               f"repo3-path={base / 'repo3'}\nrepo3-retention-full=9\n")
            + "process-max=2\n"
            "start-fast=y\n"
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
        chown_tree(base, self.pgbr_user)
        pg.extra_settings["archive_command"] = f"{exe} --config={self.pgbr_cfg} --stanza=bench archive-push %p"
        self.pg15 = pg  # before start(): cleanup must see it
        pg.start()
        self.pgbr("stanza-create")  # right away: archive-push fails until the stanza exists
        version = pg.psql("SHOW server_version").strip()
        self.log(f"PostgreSQL {version} started as OS user {pg.os_user or 'self'} ({time.monotonic() - t:.1f} s); "
                 f"{self.pgbr_version}: stanza 'bench' created (run as {self.pgbr_user or 'self'}); "
                 f"pgbench -i -s {a.scale} ...")
        t = time.monotonic()
        pg.pgbench_init(a.scale, fillfactor=a.fillfactor)
        ck = self.checkpoint(pg)
        wa = self.wait_archived(pg)
        db = int(pg.psql("SELECT sum(pg_database_size(oid)) FROM pg_database").strip())
        self.info["pg15"] = {"postgresql": version, "cluster_bytes_after_init": db, "init_s": time.monotonic() - t,
                             "os_user": pg.os_user, "data_checksums": pg.psql("SHOW data_checksums").strip(),
                             "archive_command": pg.extra_settings["archive_command"].replace(str(self.w), "<W>")}
        self.log(f"pgbench data loaded, CHECKPOINT ({ck:.1f} s), archive drained ({wa:.1f} s); "
                 f"cluster {db / MB:.0f} MB")

        server_pid = postmaster_pid(srv.data_dir)
        drop_dirty()
        m = Meter(server_pid)
        self.pgbr("--repo=1", "--type=full", "backup")
        met = m.stop()
        full = self.pgbr_info()[-1]
        self.record("pgbr-full", {"wall_s": met["wall_s"], "process_wall_s": met["wall_s"],
                                  "raw_bytes": full["info"]["delta"],
                                  "stored_bytes": full["info"]["repository"]["delta"],
                                  "label": full["label"], "cpu_s": met["cpu_s"], "server_cpu_s": met["server_cpu_s"],
                                  "meter": met})
        self.log(f"pgBackRest full {full['label']}: {met['wall_s']:.2f} s, stored "
                 f"{full['info']['repository']['delta'] / MB:.1f} MB")

        variant_fulls = {}
        for n, (label, extra) in ({} if a.no_variants else self.VARIANTS).items():
            t = time.monotonic()
            self.pgbr(f"--repo={n}", *extra, "--type=full", "backup")
            variant_fulls[n] = self.pgbr_info(n)[-1]
            self.log(f"pgBackRest full in repo{n} ({label}): {time.monotonic() - t:.1f} s, stored "
                     f"{variant_fulls[n]['info']['repository']['delta'] / MB:.1f} MB")
        self.info["pg15"]["relation_files"] = relation_files(pg)

        self.info["pg15"]["workload"] = self.pgbench_workload(pg, f"PostgreSQL {version}")
        ck = self.checkpoint(pg)
        wa = self.wait_archived(pg)
        self.info["pg15"]["checkpoint_after_workload_s"] = ck
        self.info["pg15"]["archive_drain_after_workload_s"] = wa
        self.log(f"CHECKPOINT after the workload ({ck:.1f} s) and archive drained ({wa:.1f} s), both unmeasured")
        for i in range(a.repeat):
            arch0 = self.archive_files()
            drop_dirty()
            m = Meter(server_pid)
            self.pgbr("--repo=1", "--type=incr", "backup")
            met = m.stop()
            b = self.pgbr_info()[-1]
            if b["type"] != "incr" or b.get("prior") != full["label"]:
                raise RuntimeError(f"pgBackRest took {b['type']} {b['label']} on {b.get('prior')}, not an incr on "
                                   f"{full['label']}")
            arch1 = self.archive_files()
            new_arch = {k: v for k, v in arch1.items() if k not in arch0}
            bdir = dir_size(base / "repo" / "backup" / "bench" / b["label"])
            r = self.record("pgbr-incr", {
                "wall_s": met["wall_s"], "process_wall_s": met["wall_s"], "raw_bytes": b["info"]["delta"],
                "stored_bytes": b["info"]["repository"]["delta"], "repo_dir_bytes": bdir["apparent_bytes"],
                "repo_dir_files": bdir["files"], "wal_archived_during_bytes": sum(new_arch.values()),
                "wal_archived_during_files": len(new_arch), "label": b["label"],
                "timestamps": b.get("timestamp"), "cpu_s": met["cpu_s"], "server_cpu_s": met["server_cpu_s"],
                "meter": met}, i + 1)
            self.log(f"  [{i + 1}/{a.repeat}] pgBackRest incr {b['label']}: {met['wall_s']:6.2f} s  changed "
                     f"{b['info']['delta'] / MB:.1f} MB  stored {r['stored_bytes'] / MB:.1f} MB  "
                     f"CPU {met['cpu_s']:5.1f} s  "
                     f"other procs {met['other_cpu_pct']:3.0f}%")
            if i == 0:
                self.info["breakdown_pgbr"] = pgbr_breakdown(
                    base / "repo" / "backup" / "bench" / b["label"] / "backup.manifest",
                    self.info["pg15"]["relation_files"])
            if i + 1 < a.repeat:  # the next incr builds on the full again
                self.pgbr("--repo=1", f"--set={b['label']}", "expire")
        self.info["pgbr_variants"] = {}
        for n, (label, extra) in ({} if a.no_variants else self.VARIANTS).items():
            t = time.monotonic()
            self.pgbr(f"--repo={n}", *extra, "--type=incr", "backup")
            wall = time.monotonic() - t
            b = self.pgbr_info(n)[-1]
            if b["type"] != "incr" or b.get("prior") != variant_fulls[n]["label"]:
                raise RuntimeError(f"pgBackRest repo{n} took {b['type']} {b['label']}, not an incr on its full")
            self.info["pgbr_variants"][str(n)] = {
                "label": label.replace("level L", f"level {a.level}"), "wall_s": wall,
                "full_stored_bytes": variant_fulls[n]["info"]["repository"]["delta"],
                "incr_stored_bytes": b["info"]["repository"]["delta"], "incr_changed_bytes": b["info"]["delta"]}
            self.log(f"pgBackRest incr in repo{n} ({label}): {wall:.2f} s, stored "
                     f"{b['info']['repository']['delta'] / MB:.1f} MB")
        self.info["pg15"]["archiver"] = pg.psql(
            "SELECT archived_count, failed_count FROM pg_stat_archiver").strip()
        pg.stop()
        self.pg15 = None
        self.log("PostgreSQL 15 stopped")

    # =========================================================================================
    def run(self) -> dict:
        import zstandard

        a = self.a
        self.log(f"workdir {self.w}")
        self.maybe_install()
        self.phase_pg18()
        self.phase_restore()
        self.phase_pgbackrest()

        sides = []
        for r in self.runs:
            if r["side"] not in sides:
                sides.append(r["side"])
        med = {s: _medians([r for r in self.runs if r["side"] == s]) for s in sides}
        total = time.monotonic() - self.t_start
        report = {
            "benchmark": "incremental backup + chain restore: ours vs raw pg_basebackup --incremental / "
                         "pg_combinebackup (PostgreSQL 18), and vs pgBackRest incr (PostgreSQL 15)",
            "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": {"scale": a.scale, "fillfactor": a.fillfactor or 100, "transactions": a.transactions,
                       "clients": a.clients, "jobs": a.jobs,
                       "level": a.level, "threads": a.threads, "repeat": a.repeat,
                       "pgbackrest_options": "compress-type=zst compress-level=%d process-max=2 start-fast=y "
                                             "archive-check=y (archive_command = pgbackrest archive-push), "
                                             "repo-bundle=n repo-block=n (defaults)" % a.level},
            "environment": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "zstandard": zstandard.__version__, "zstd_cli": _zstd_version(),
                            "platform": platform.platform(), "pgbackrest": self.pgbr_version,
                            "pgbackrest_note": self.pgbr_note, "pgbackrest_user": self.pgbr_user,
                            "install": self.install_note, "code": _git_state(),
                            "pg_combinebackup": self.pg_bin("pg_combinebackup"),
                            "page_cache": "warm (every input was written shortly before; sync(2) before each "
                                          "measured step)"},
            "servers": self.info, "medians": med, "runs": self.runs, "total_run_s": total,
            "loadavg_1m_end": os.getloadavg()[0],
        }
        report["checks"] = _checks(report)
        _print_report(report)
        return report


# =============================================================================================
def _medians(runs: list[dict]) -> dict:
    out: dict = {"n": len(runs)}
    keys = set()
    for r in runs:
        keys.update(k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    for k in keys - {"repeat"}:
        out[k] = _median([r.get(k) for r in runs])
    out["other_cpu_pct"] = _median([r["meter"]["other_cpu_pct"] for r in runs if "meter" in r])
    out["other_cpu_pct_max"] = max((r["meter"]["other_cpu_pct"] for r in runs if "meter" in r), default=None)
    out["steal_pct"] = _median([r["meter"]["steal_pct"] for r in runs if "meter" in r])
    out["walls"] = [round(r["wall_s"], 3) for r in runs]
    return out


def _checks(rep: dict) -> list[dict]:
    med = rep["medians"]
    out = []
    # paired per repeat (ours and raw ran next to each other), then the median: with a noisy machine the
    # ratio of two medians can come from different repeats; with --repeat 1 both are the same number
    ours = {r["repeat"]: r for r in rep["runs"] if r["side"] == "ours-restore"}
    raw = {r["repeat"]: r for r in rep["runs"] if r["side"] == "raw-restore"}
    paired = [ours[i]["wall_s"] / (raw[i]["extract_s"] + raw[i]["combine_s"]) for i in sorted(ours) if i in raw]
    ratio = statistics.median(paired)
    o, rr = med["ours-restore"], med["raw-restore"]
    out.append({"check": "restore time ours (full + incremental, verify=False) / (raw tar.zst extraction + "
                         "pg_combinebackup --link)", "value": ratio, "target": f"<= {TARGET_RESTORE_RATIO}",
                "pass": ratio <= TARGET_RESTORE_RATIO, "per_repeat": paired,
                "ratio_of_medians": o["wall_s"] / (rr["extract_s"] + rr["combine_s"])})
    pb = med.get("pgbr-incr")
    if pb:
        ratio = med["ours-incr"]["stored_bytes"] / pb["stored_bytes"]
        out.append({"check": "stored bytes ours incremental (PG18) / pgBackRest incr (PG15)", "value": ratio,
                    "target": f"<= {TARGET_SIZE_RATIO}", "pass": ratio <= TARGET_SIZE_RATIO})
    else:
        out.append({"check": "stored bytes ours incremental (PG18) / pgBackRest incr (PG15)", "value": None,
                    "target": f"<= {TARGET_SIZE_RATIO}", "pass": None, "why": rep["environment"]["pgbackrest_note"]})
    return out


def _info_ratios(rep: dict) -> list[tuple[str, float | None, str]]:
    med = rep["medians"]
    oi, of, ri, rf = med["ours-incr"], med["ours-full"], med["raw-incr"], med["raw-full"]
    out = [("ours incremental / ours full, stored bytes", oi["stored_bytes"] / of["stored_bytes"], ""),
           ("raw incremental / raw full, tar | zstd bytes", ri["stored_bytes"] / rf["stored_bytes"], ""),
           ("ours incremental / raw incremental, tar | zstd bytes", oi["stored_bytes"] / ri["stored_bytes"], ""),
           ("ours incremental wall / raw pg_basebackup --incremental -Fp wall", oi["wall_s"] / ri["wall_s"],
            "raw writes a plain dir, uncompressed"),
           ("ours incremental wall / (raw incremental + tar | zstd)", oi["wall_s"] / (ri["wall_s"] + ri["tar_zstd_s"]),
            "the raw side's compression done afterwards, as a separate pass")]
    if "pgbr-incr" in med:
        pi, pf = med["pgbr-incr"], med["pgbr-full"]
        out += [("pgBackRest incr / pgBackRest full, stored bytes", pi["stored_bytes"] / pf["stored_bytes"], ""),
                ("ours incremental wall / pgBackRest incr wall", oi["wall_s"] / pi["wall_s"], "PG18 vs PG15")]
        for v in rep["servers"].get("pgbr_variants", {}).values():
            out.append((f"ours incremental / pgBackRest incr with {v['label']}, stored bytes",
                        oi["stored_bytes"] / v["incr_stored_bytes"],
                        f"{v['incr_stored_bytes'] / MB:.1f} MB; its full {v['full_stored_bytes'] / MB:.1f} MB"))
    o, r = med["ours-restore-verify"], med["raw-restore-verify"]
    out.append(("restore ours verify=True / raw (extraction + pg_verifybackup of both + combine --link + "
                "pg_verifybackup)", o["wall_s"] / r["wall_s"], ""))
    o, r = med["ours-restore"], med["raw-restore"]
    out.append(("restore ours verify=False / raw same end state (extraction + combine + staging removal + chown)",
                o["wall_s"] / r["wall_same_end_state_s"], ""))
    out.append(("restore ours verify=False / raw pg_combinebackup --link of the plain dirs alone",
                o["wall_s"] / med["raw-combine-link"]["wall_s"], "no extraction on the raw side"))
    return out


def _fmt(v, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if fmt == "mb":
        return f"{v / MB:.1f}"
    if fmt == "mb3":
        return f"{v / MB:.3f}"
    return fmt.format(v)


def _span(m: dict) -> str:
    return f"{min(m['walls']):.2f}-{max(m['walls']):.2f}"


def _table(title: str, cols: list[str], rows: list[tuple], ratio_cols: list[tuple[str, int, int]]) -> None:
    """rows: (label, [value per column], fmt, show_ratio). ratio_cols: (header, numerator col, denominator col)."""
    w0 = max(len(title), max(len(r[0]) for r in rows)) + 2
    wc = [max(12, len(c) + 2) for c in cols]
    head = f"{title:<{w0}}" + "".join(f"{c:>{wc[i]}}" for i, c in enumerate(cols)) + "".join(
        f"{h:>11}" for h, _, _ in ratio_cols)
    print(head)
    print("-" * len(head))
    for label, vals, fmt, show_ratio in rows:
        cells = "".join(f"{_fmt(v, fmt):>{wc[i]}}" for i, v in enumerate(vals))
        rs = ""
        for _, n, d in ratio_cols:
            if show_ratio and vals[n] is not None and vals[d]:
                rs += f"{vals[n] / vals[d]:>11.2f}"
            else:
                rs += f"{'':>11}"
        print(f"{label:<{w0}}" + cells + rs)


def _print_report(rep: dict) -> None:
    med, cfg, env, srv = rep["medians"], rep["config"], rep["environment"], rep["servers"]
    of, oi, rf, ri = med["ours-full"], med["ours-incr"], med["raw-full"], med["raw-incr"]
    pf, pi = med.get("pgbr-full"), med.get("pgbr-incr")
    n = cfg["repeat"]
    w18 = srv["pg18"]["workload"]
    print()
    print(f"Incremental backup benchmark - pgbench scale {cfg['scale']} "
          f"({srv['pg18']['cluster_bytes_after_init'] / MB:.0f} MB cluster), workload between full and incremental: "
          f"pgbench -n -c {cfg['clients']} -j {cfg['jobs']} -t {cfg['transactions']} "
          f"({w18['transactions']} transactions), fillfactor {cfg.get('fillfactor', 100)}, zstd level {cfg['level']}, "
          f"{env['cpus']} CPUs")
    line = (f"ours and raw: PostgreSQL {srv['pg18']['postgresql']}, the same server state (both fulls before the "
            "workload)")
    if pi:
        line += (f"; pgBackRest: {env['pgbackrest']} on PostgreSQL {srv['pg15']['postgresql']} (2.45 does not "
                 "support 18), same pgbench shape: comparable only roughly")
    print(line)
    w15 = srv.get("pg15", {}).get("workload")
    print(f"workload: PG18 {w18['seconds']:.1f} s, {w18['tps'] or 0:.0f} tps, {w18['wal_bytes'] / MB:.0f} MB WAL"
          + (f"; PG15 {w15['seconds']:.1f} s, {w15['tps'] or 0:.0f} tps, {w15['wal_bytes'] / MB:.0f} MB WAL"
             if w15 else "")
          + "; a CHECKPOINT after it (unmeasured), so no backup carries the workload's flush")
    print(f"{'median of ' + str(n) + ' runs, order alternating' if n > 1 else 'single run'}; MB = 10^6 bytes; "
          "page cache warm; sync(2) before each measured step")
    print()
    cols = ["ours (PG18)", "raw (PG18)"] + (["pgBackRest (PG15)"] if pi else [])
    P = 2 if pi else None

    def v3(o, r, p):
        return [o, r] + ([p] if pi else [])

    g = lambda d, k: d.get(k) if d else None  # noqa: E731
    rows = [
        ("incremental backup wall time (s)", v3(oi["wall_s"], ri["wall_s"], g(pi, "wall_s")), "{:.2f}", True),
        *([("  min-max over the runs (s)", v3(_span(oi), _span(ri), _span(pi) if pi else None), "", False)]
          if n > 1 else []),
        ("  process wall incl. start-up (s)", v3(oi["process_wall_s"], ri["process_wall_s"], g(pi, "process_wall_s")),
         "{:.2f}", True),
        ("  raw: + tar | zstd afterwards (s)", v3(None, ri["wall_s"] + ri["tar_zstd_s"], None), "{:.2f}", False),
        ("changed data read (MB)", v3(oi["raw_bytes"], ri["raw_bytes"], g(pi, "raw_bytes")), "mb", True),
        ("incremental stored (MB)", v3(oi["stored_bytes"], ri["stored_bytes"], g(pi, "stored_bytes")), "mb", True),
        ("  raw: plain dir on disk, du (MB)", v3(None, ri["on_disk_bytes"], None), "mb", False),
        ("  raw: of which pg_wal (MB)", v3(None, ri["pg_wal_bytes"], None), "mb", False),
        ("  raw: of which pg_wal, tar | zstd (MB)", v3(None, ri["pg_wal_stored_bytes"], None), "mb3", False),
        ("  pgBackRest: WAL archived meanwhile (MB)", v3(None, None, g(pi, "wal_archived_during_bytes")), "mb", False),
        ("full backup wall time (s)", v3(of["wall_s"], rf["wall_s"], g(pf, "wall_s")), "{:.2f}", True),
        ("full stored (MB)", v3(of["stored_bytes"], rf["stored_bytes"], g(pf, "stored_bytes")), "mb", True),
        ("incremental / full, stored", v3(oi["stored_bytes"] / of["stored_bytes"],
                                          ri["stored_bytes"] / rf["stored_bytes"],
                                          pi["stored_bytes"] / pf["stored_bytes"] if pi else None), "{:.3f}", True),
        ("incr: CPU of the tool's processes (s)", v3(oi["cpu_s"], ri["cpu_s"], g(pi, "cpu_s")), "{:.2f}", True),
        ("incr: server CPU (s)", v3(oi["server_cpu_s"], ri["server_cpu_s"], g(pi, "server_cpu_s")), "{:.2f}", True),
        ("incr: peak RSS, process tree (MB)", v3(oi["peak_rss_mb"] * MB, None, None), "mb", False),
        ("incr: other processes' CPU (% of all)", v3(oi["other_cpu_pct"], ri["other_cpu_pct"], g(pi, "other_cpu_pct")),
         "{:.0f}", False),
    ]
    ratio_cols = [("ours/raw", 0, 1)] + ([("ours/pgBR", 0, P)] if pi else [])
    _table("Incremental backup", cols, rows, ratio_cols)
    print()
    print("ours = take_planned_backup(kind='incremental') wall time measured inside a child process (process wall adds "
          "interpreter\nstart-up and imports); raw = pg_basebackup -D DIR -Fp -X fetch -w -c fast "
          "--incremental=<raw full>/backup_manifest, spawn to exit;\npgBackRest = `backup --type=incr` spawn to exit "
          "(includes its archive-check wait and automatic expire). 'changed data read': ours = the\nuncompressed tar "
          "stream, raw = du -sb of the plain dir, pgBackRest = info 'delta'. 'stored': ours = stored_bytes "
          "(base.tar.zst +\nbackup_manifest.zst, WAL of the backup included via -X fetch), raw = tar | zstd -%d -T1 "
          "of the plain dir, "
          "pgBackRest = info\nrepository delta (WAL goes to its archive, shown apart). server CPU = the postmaster's "
          "process tree (walsender, checkpointer ...)." % cfg["level"])
    if oi.get("peak_rss_mb"):
        last = [r for r in rep["runs"] if r["side"] == "ours-incr"][-1]
        print(f"ours at peak RSS: {', '.join(f'{k} {v:.1f}' for k, v in last['peak_breakdown_mb'].items())} MB; "
              f"python VmHWM {last['python_vm_hwm_mb']:.1f} MB")
    print()

    bo, bp = srv.get("breakdown_ours"), srv.get("breakdown_pgbr")
    if bo and bp:
        names = sorted(set(bo) | set(bp), key=lambda k: (k == "other", -(bp.get(k, {}).get("stored_bytes", 0))))
        rows = []
        for k in names + ["total"]:
            if k == "total":
                o = {f: sum(d[f] for d in bo.values()) for f in ("raw_bytes", "stored_bytes")}
                pb = {f: sum(d[f] for d in bp.values()) for f in ("raw_bytes", "stored_bytes")}
            else:
                o, pb = bo.get(k, {}), bp.get(k, {})
            rows.append((k, [o.get("raw_bytes"), pb.get("raw_bytes"), o.get("stored_bytes"), pb.get("stored_bytes")],
                         "mb", True))
        _table("Where the incremental's bytes are (MB)", ["ours read", "pgBR read", "ours stored", "pgBR stored"],
               rows, [("stored o/p", 2, 3)])
        print()
        print("per relation (all forks and segments): 'read' = bytes of its files in the backup (ours: PostgreSQL's "
              "INCREMENTAL.* files hold\nonly the changed blocks; a file with more than 90% of its blocks changed is "
              "sent whole; pgBackRest: every file changed\nsince the full, whole), 'stored' = ours: each tar member "
              "compressed on its own at the same level (an estimate of its share\nof the one stream), pgBackRest: "
              "repo-size in its backup.manifest. The two servers ran the same pgbench shape, not the same\n"
              "transactions: per-relation figures compare roughly.")
        print()

    o, ov, rr, rv = med["ours-restore"], med["ours-restore-verify"], med["raw-restore"], med["raw-restore-verify"]
    cl, cc = med["raw-combine-link"], med["raw-combine-copy"]
    rows = [
        ("extraction + pg_combinebackup --link (s)", [o["wall_s"], rr["extract_s"] + rr["combine_s"]], "{:.2f}", True),
        *([("  min-max over the runs (s)", [_span(o), _span(rr)], "", False)] if n > 1 else []),
        ("  of which pg_combinebackup (s)", [o.get("combine_s"), rr["combine_s"]], "{:.2f}", True),
        ("  of which extraction (+ rest for ours) (s)", [o.get("extract_and_rest_s"), rr["extract_s"]], "{:.2f}", True),
        ("  raw: + staging removal (s)", [None, rr["staging_removal_s"]], "{:.2f}", False),
        ("  raw: + chown to the server's user (s)", [None, rr["chown_s"]], "{:.2f}", False),
        ("  raw: same end state as ours (s)", [o["wall_s"], rr["wall_same_end_state_s"]], "{:.2f}", True),
        ("with pg_verifybackup, verify=True (s)", [ov["wall_s"], rv["wall_s"]], "{:.2f}", True),
        ("  of which pg_combinebackup (s)", [ov.get("combine_s"), rv["combine_s"]], "{:.2f}", True),
        ("  raw: pg_verifybackup of full, incr, result (s)",
         [None, rv["verify_parts_s"] + rv["verify_result_s"]], "{:.2f}", False),
        ("pg_combinebackup --link, plain dirs only (s)", [None, cl["wall_s"]], "{:.2f}", False),
        ("pg_combinebackup copy, plain dirs only (s)", [None, cc["wall_s"]], "{:.2f}", False),
        *([("pg_combinebackup --copy-file-range, plain dirs (s)", [None, med["raw-combine-cfr"]["wall_s"]], "{:.2f}",
            False)] if "raw-combine-cfr" in med else []),
        ("pg_combinebackup --clone, plain dirs (s)",
         [None, (srv.get("combine_clone") or {}).get("wall_s")
          or "refused"], "{:.2f}", False),
        ("CPU, verify=False (s)", [o["cpu_s"], rr["cpu_s"]], "{:.2f}", True),
        ("  of which sys (s)", [o["cpu_sys_s"], rr["cpu_sys_s"]], "{:.2f}", True),
        ("other processes' CPU, verify=False (% of all)", [o["other_cpu_pct"], rr["other_cpu_pct"]], "{:.0f}", False),
        ("restored data directory (MB)", [o["output_bytes"], rr["output_bytes"]], "mb", False),
    ]
    _table("Restore of full + incremental (PG18)", ["ours", "raw"], rows, [("ours/raw", 0, 1)])
    print()
    cc_ = srv.get("combine_clone") or {}
    if cc_ and not cc_.get("supported"):
        print(f"pg_combinebackup --clone: refused on this filesystem ({srv.get('filesystem')}, no reflinks): "
              + next((ln.strip() for ln in (cc_.get("error") or "").splitlines() if "error" in ln), ""))
    print("ours = restore_backup(repo, cluster, <incremental>, target, os_user=...) in this process: stream each "
          "object (checksums\nchecked) into a staging dir beside the target, pg_combinebackup --link, remove the "
          "staging, chown; verify=True adds\npg_verifybackup --no-parse-wal of each part and pg_verifybackup of the "
          "result. Its pg_combinebackup share is from the\nengine's log. raw = tar -I 'zstd -d' -xf of full.tar.zst "
          "and incr.tar.zst into a staging dir, then pg_combinebackup --link;\nthe target ratio is against that "
          "(without staging removal and chown, shown apart). Same filesystem throughout.")
    other = [r["meter"]["other_cpu_pct"] for r in rep["runs"] if "meter" in r]
    steal = max((r["meter"]["steal_pct"] for r in rep["runs"] if "meter" in r), default=0.0)
    print(f"noise: other processes used {min(other):.0f}-{max(other):.0f}% of the machine's CPU during the measured "
          "steps "
          f"(steal up to {steal:.0f}%); load average at the end {rep['loadavg_1m_end']:.2f}")
    print()
    for label, v, note in _info_ratios(rep):
        print(f"info  {label}: {v:.2f}" + (f" ({note})" if note else ""))
    print()
    for c in rep["checks"]:
        if c["pass"] is None:
            print(f"SKIP  {c['check']} (target {c['target']}): {c.get('why', '')}")
        else:
            extra = ""
            if len(c.get("per_repeat") or []) > 1:
                extra = (f"; median of the per-repeat ratios {', '.join(f'{x:.2f}' for x in c['per_repeat'])}; "
                         f"ratio of the medians {c['ratio_of_medians']:.2f}")
            print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['check']}: {c['value']:.2f} (target {c['target']}){extra}")
    print(f"total run time {rep['total_run_s']:.0f} s")


def _zstd_version() -> str | None:
    try:
        return subprocess.run(["zstd", "-V"], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return None


def _git_state() -> dict:
    root = HERE.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "airflow_pg_incremental"],
                               capture_output=True, text=True, timeout=10).stdout.splitlines()
        return {"head": head, "package_changes_not_committed": [ln.strip() for ln in dirty]}
    except Exception:
        return {}


# =============================================================================================
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_child"]:
        return child_main(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=50, help="pgbench scale (default 50, ~750 MB)")
    ap.add_argument("--transactions", "-t", type=int, default=20000, help="pgbench -t per client (default 20000)")
    ap.add_argument("--clients", "-c", type=int, default=4, help="pgbench -c (default 4)")
    ap.add_argument("--jobs", "-j", type=int, default=2, help="pgbench -j (default 2)")
    ap.add_argument("--fillfactor", "-F", type=int, default=None,
                    help="pgbench -i -F (table fillfactor; default pgbench's 100: every update of pgbench_accounts "
                         "is then non-HOT and inserts into its primary key)")
    ap.add_argument("--level", type=int, default=3, help="zstd level for every side (default 3)")
    ap.add_argument("--no-variants", action="store_true",
                    help="skip the two extra pgBackRest incrs (block incremental; default gz compression)")
    ap.add_argument("--threads", type=int, default=1,
                    help="ours: zstd worker threads (default 1, the engine's default)")
    ap.add_argument("--repeat", type=int, default=1, help="measurements of each incremental and restore; medians "
                                                          "reported (default 1)")
    ap.add_argument("--workdir", help="where to put the run (default: a fresh directory under /var/tmp); an "
                                      "existing directory gets a fresh sub-directory")
    ap.add_argument("--json", help="write all results to this JSON file")
    ap.add_argument("--keep", action="store_true", help="do not remove the work directory at the end")
    ap.add_argument("--no-install", action="store_true",
                    help="do not apt-get install postgresql-15 / pgbackrest when missing")
    ap.add_argument("--no-pgbackrest", action="store_true", help="skip the pgBackRest (PostgreSQL 15) column")
    a = ap.parse_args(argv)
    if not 1 <= a.level <= 19:
        ap.error("--level must be 1..19 (pgBackRest's zst range)")
    if a.fillfactor is not None and not 10 <= a.fillfactor <= 100:
        ap.error("--fillfactor must be 10..100")
    if min(a.scale, a.transactions, a.clients, a.jobs, a.repeat) < 1 or a.threads < 0:
        ap.error("--scale, --transactions, --clients, --jobs, --repeat must be >= 1, --threads >= 0")

    from _common import run_bench

    return run_bench(a, "pgincr-incrbench-", Bench,
                     lambda b: [("stop PostgreSQL", pg.stop) for pg in (b.pg18, b.pg15) if pg is not None])


if __name__ == "__main__":
    sys.exit(main())
