#!/usr/bin/env python
"""Benchmark: a week of backups with synthetic fulls (incremental forever) vs a weekly server full,
and vs pgBackRest's weekly full + daily incr; synthesis speed; restore of a synthetic full.

    /work/main/.venv/bin/python bench/bench_synthetic.py [--scale 50] [--transactions 4000] [--clients 2]
                                    [--repeat 3] [--level 3] [--threads T] [--quick] [--workdir DIR]
                                    [--json FILE] [--keep] [--no-install] [--no-pgbackrest]

A day = one pgbench round (-c C -t N, the same on every server), a CHECKPOINT, then that day's backups.
PostgreSQL 18 carries two repositories side by side, fed by the same server state every day:
  A  incremental forever: day 0 server full; days 1-6 incremental; day 7 incremental + synthesize (week 1);
     days 8-13 incremental, day 14 incremental + synthesize (week 2, measured)
  B  server-full schedule: day 8 server full, days 9-14 incremental (week 2, measured)
  C  one server full right after A's day-14 incremental (the same cluster state: the restore reference)
PostgreSQL 15 (pgBackRest 2.45 does not support 18): the same 14 pgbench rounds; pgBackRest full on day 8,
`--type=incr` on days 9-14 (zst level L, process-max 2).
Then (servers stopped), interleaved rounds: synthesize() of A's day-14 chain vs the raw equivalent
(zstd -d | tar -x of each part, pg_verifybackup of each part, pg_combinebackup --link, pg_verifybackup with
checksums, tar -c | zstd -L -T<threads>, fsync), and restore_backup() of the synthetic full vs of C.
Targets: bytes read from the server per week, A / pgBackRest <= 0.2; synthesize / raw <= 1.3; restore of
the synthetic full / restore of C <= 1.0. Exit code 0 whatever the numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import shutil
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import bench_incr as bi
from bench_incr import MB, Meter, bash, dir_size, drop_dirty, postmaster_pid, q, run_cmd

CLUSTER = "bench"
TARGET_READ_RATIO = 0.2  # bytes read from the server per week: A (incremental forever) / pgBackRest
TARGET_SYN_RATIO = 1.3  # synthesize / raw combine + tar | zstd of the same chain
TARGET_RESTORE_RATIO = 1.0  # restore of the synthetic full / restore of a server full of the same state
DAYS = 14
IO_KEYS = ("rchar", "read_bytes")


# =============================================================================================
# bytes read, from /proc/<pid>/io: rchar = bytes through read(2)/pread(2) (page cache or disk),
# read_bytes = bytes the process made the block layer fetch. Linux adds a reaped child's counters to
# its parent's, so a parent's delta covers every descendant that ended meanwhile.
# =============================================================================================
def proc_io(pid: int | str) -> dict | None:
    try:
        with open(f"/proc/{pid}/io") as f:
            d = dict(line.split(":", 1) for line in f)
        return {k: int(d[k]) for k in IO_KEYS}
    except (OSError, KeyError, ValueError):
        return None


def _sub(a: dict, b: dict) -> dict:
    return {k: a[k] - b[k] for k in IO_KEYS}


def _sum(ds) -> dict:
    out = dict.fromkeys(IO_KEYS, 0)
    for d in ds:
        for k in IO_KEYS:
            out[k] += d[k]
    return out


class ServerIO:
    """What a PostgreSQL server's processes read over a window. `ended`: the processes that exited
    meanwhile (the walsender of a base backup, the client's SQL sessions, from the postmaster's
    accumulated counters minus what those processes had read before the window); `live`: the
    processes alive at the end (checkpointer, WAL summarizer, archiver and its archive_command ...)."""

    def __init__(self, pm_pid: int):
        import psutil

        self.pm = psutil.Process(pm_pid)
        self.names: dict[int, str] = {}
        self.c0 = self._children()
        self.pm0 = proc_io(pm_pid)
        self._ev = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()

    def _children(self) -> dict[int, dict]:
        out = {}
        for c in self.pm.children():
            io = proc_io(c.pid)
            if io is None:
                continue
            out[c.pid] = io
            if c.pid not in self.names:
                try:
                    title = " ".join(c.cmdline()).removeprefix("postgres: ").split()
                    self.names[c.pid] = " ".join(title[:2])
                except Exception:
                    self.names[c.pid] = "?"
        return out

    def _watch(self) -> None:  # names of processes that start and end inside the window
        while not self._ev.wait(0.05):
            try:
                self._children()
            except Exception:
                pass

    def stop(self) -> dict:
        self._ev.set()
        self._t.join()
        pm1 = proc_io(self.pm.pid)
        c1 = self._children()
        gone = [p for p in self.c0 if p not in c1]
        ended = _sub(_sub(pm1, self.pm0), _sum(self.c0[p] for p in gone))
        live = _sum([_sub(c1[p], self.c0[p]) for p in c1 if p in self.c0] + [c1[p] for p in c1 if p not in self.c0])
        ended_names = sorted({self.names.get(p, "?") for p in set(self.names) - set(c1)})
        live_by = {}
        for p in c1:
            n = self.names.get(p, "?")
            live_by[n] = live_by.get(n, 0) + c1[p]["rchar"] - self.c0.get(p, {"rchar": 0})["rchar"]
        return {"ended": ended, "live": live, "total": _sum([ended, live]), "ended_processes": ended_names,
                "live_rchar_by_process": {k: v for k, v in live_by.items() if v}}


def self_io() -> dict:
    return proc_io("self")


def ratio_stats(pairs: list[tuple[float, float]]) -> dict:
    from _common import ratio_summary

    return ratio_summary([a / b for a, b in pairs if b])


# =============================================================================================
class SynBench(bi.Bench):
    def __init__(self, args, workdir: Path):
        super().__init__(args, workdir)
        self.days: list[dict] = []  # per day, per side: what was read
        self.pgbr_days: list[dict] = []
        self.rounds: dict[str, list] = {"synthesize": [], "restore": []}

    # -- the server's autovacuum is paused during a day's backups: a vacuum ending inside the window
    # would add its reads to the backup's
    def quiesce(self, pg) -> float:
        t = time.monotonic()
        pg.psql("ALTER SYSTEM SET autovacuum = off")
        pg.psql("SELECT pg_reload_conf()")
        while int(pg.psql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'")):
            if time.monotonic() - t > 900:
                raise RuntimeError("an autovacuum worker still runs after 900 s")
            time.sleep(0.2)
        return time.monotonic() - t

    def unquiesce(self, pg) -> None:
        pg.psql("ALTER SYSTEM RESET autovacuum")
        pg.psql("SELECT pg_reload_conf()")

    def day_workload(self, pg, tag: str) -> dict:
        wl = self.pgbench_workload(pg, tag)
        wl["checkpoint_s"] = self.checkpoint(pg)
        wl["autovacuum_wait_s"] = self.quiesce(pg)
        return wl

    # -- PostgreSQL 18: repositories A, B, C ------------------------------------------------------
    def ours(self, repo_dir: Path, kind: str, day: int, side: str) -> dict:
        from airflow_pg_incremental.core.backup import take_full_backup
        from airflow_pg_incremental.core.incremental import take_planned_backup
        from airflow_pg_incremental.core.repository import LocalRepository

        a = self.a
        repo = LocalRepository(repo_dir)
        repo.create()
        drop_dirty()
        sio = ServerIO(postmaster_pid(self.pg18.server.data_dir))
        m = Meter(postmaster_pid(self.pg18.server.data_dir))
        kw = dict(compression_level=a.level, threads=a.threads, progress_interval=3600)
        if kind == "full":
            meta = take_full_backup(self.pg18.conninfo(), repo, CLUSTER, **kw)
        else:
            meta = take_planned_backup(self.pg18.conninfo(), repo, CLUSTER, kind="incremental", **kw)
            if meta["kind"] != "incremental":
                raise RuntimeError(f"{side}: the engine took a {meta['kind']} instead of an incremental: "
                                   f"{(meta.get('plan') or {}).get('reason')}")
        met = m.stop()
        io = sio.stop()
        r = {"day": day, "side": side, "kind": meta["kind"], "backup_id": meta["backup_id"],
             "parent_id": meta.get("parent_id"), "wall_s": met["wall_s"], "raw_bytes": meta["raw_bytes"],
             "stored_bytes": meta["stored_bytes"], "server_io": io, "loadavg_1m": met["loadavg_1m_start"]}
        self.log(f"  day {day:2d} {side} {meta['kind']:<11} {met['wall_s']:6.2f} s  streamed {meta['raw_bytes'] / MB:7.1f} MB"
                 f"  server read {io['ended']['rchar'] / MB:7.1f} MB (ended: {', '.join(io['ended_processes'])}),"
                 f" live {io['live']['rchar'] / MB:5.1f} MB  stored {meta['stored_bytes'] / MB:6.1f} MB")
        return r

    def synthesize_into(self, repo_dir: Path) -> dict:
        from airflow_pg_incremental.core.repository import LocalRepository
        from airflow_pg_incremental.core.synthetic import synthesize

        (self.w / "scratch").mkdir(mode=0o755, exist_ok=True)
        drop_dirty()
        m = Meter()
        meta = synthesize(LocalRepository(repo_dir), CLUSTER, "latest", compression_level=self.a.level,
                          threads=self.a.threads, scratch_dir=self.w / "scratch", progress_interval=3600)
        met = m.stop()
        if meta.get("kind") != "synthetic":
            raise RuntimeError(f"synthesize did not build a synthetic full: {meta.get('reason')}")
        return {"wall_s": met["wall_s"], "backup_id": meta["backup_id"], "built_from": meta["built_from"],
                "stands_for": meta["stands_for"], "timings": meta["timings"], "raw_bytes": meta["raw_bytes"],
                "stored_bytes": meta["stored_bytes"], "cpu_s": met["cpu_s"], "meter": met}

    def phase_pg18(self) -> None:
        from airflow_pg_incremental.sandbox import SandboxPostgres

        a = self.a
        t = time.monotonic()
        self.pg18 = SandboxPostgres(self.w / "pg18", major=18)
        self.pg18.start()
        pg = self.pg18
        version = pg.psql("SHOW server_version").strip()
        self.log(f"PostgreSQL {version} started; pgbench -i -s {a.scale} ...")
        pg.pgbench_init(a.scale)
        self.checkpoint(pg)
        db = int(pg.psql("SELECT sum(pg_database_size(oid)) FROM pg_database").strip())
        self.info["pg18"] = {"postgresql": version, "cluster_bytes_after_init": db, "init_s": time.monotonic() - t,
                             "io_method": pg.psql("SHOW io_method").strip(), "workload": []}
        self.log(f"cluster {db / MB:.0f} MB")
        self.repo_a, self.repo_b, self.repo_c = (self.w / "ours" / n for n in ("A", "B", "C"))
        (self.w / "ours").mkdir(mode=0o755)
        self.quiesce(pg)
        self.days.append(self.ours(self.repo_a, "full", 0, "A"))
        self.unquiesce(pg)
        for day in range(1, DAYS + 1):
            self.info["pg18"]["workload"].append(self.day_workload(pg, f"PG18 day {day}"))
            todo = [("A", "incremental")]
            if day >= 8:
                todo.append(("B", "full" if day == 8 else "incremental"))
            for side, kind in (todo if day % 2 else list(reversed(todo))):
                repo = self.repo_a if side == "A" else self.repo_b
                self.days.append(self.ours(repo, kind, day, side))
            if day == DAYS:
                self.days.append(self.ours(self.repo_c, "full", day, "C"))
            self.unquiesce(pg)
            if day == 7:  # week 1's weekly step: the chain is combined on the worker, the server reads nothing
                s = self.synthesize_into(self.repo_a)
                self.info["week1_synthetic"] = s
                self.log(f"  day  7 A synthesize  {s['wall_s']:6.2f} s  ({s['timings']}), built from "
                         f"{len(s['built_from'])} backups, stored {s['stored_bytes'] / MB:.1f} MB")
        self.info["pg18"]["cluster_bytes_end"] = int(
            pg.psql("SELECT sum(pg_database_size(oid)) FROM pg_database").strip())
        self.pg18_os_user = pg.os_user
        pg.stop()
        self.pg18 = None
        self.log("PostgreSQL 18 stopped")

    # -- synthesis: ours vs raw, interleaved ------------------------------------------------------
    def chain_files(self, repo_dir: Path) -> list[dict]:
        from airflow_pg_incremental.core.repository import LocalRepository
        from airflow_pg_incremental.core.synthetic import plan_synthesis

        plan = plan_synthesis(LocalRepository(repo_dir), CLUSTER, "latest")
        if plan["skip"]:
            raise RuntimeError(f"nothing to synthesize: {plan['skip']}")
        out = []
        for b in plan["chain_meta"]:
            objs = {o["key"].rsplit("/", 1)[-1]: repo_dir / o["key"] for o in b["objects"]}
            out.append({"backup_id": b["backup_id"], "kind": b["kind"], "base": objs["base.tar.zst"],
                        "manifest": objs.get("backup_manifest.zst")})
        return out

    def raw_synthesize(self, chain: list[dict], work: Path) -> dict:
        """What synthesize does, with the command-line tools: every part extracted (zstd -d | tar -x, two at
        a time), pg_verifybackup of each part (--no-parse-wal --skip-checksums, as the engine), pg_combinebackup
        --link --no-sync, the parts removed, pg_verifybackup with checksums of the result, then tar -c |
        zstd -L -T<threads> of it and zstd of its backup_manifest, both files and their directory fsynced
        (the local repository fsyncs each object and its directory), the work directory removed."""
        from airflow_pg_incremental.core.backup_stream import default_threads

        combine, verifyb = self.pg_bin("pg_combinebackup"), self.pg_bin("pg_verifybackup")
        threads = self.a.threads or default_threads()
        stage, out, store = work / "stage", work / "combined", work / "store"
        steps = {}
        drop_dirty()
        m = Meter()
        t = time.monotonic()
        stage.mkdir(parents=True)
        store.mkdir()

        def extract(part):
            d = stage / part["backup_id"]
            d.mkdir()
            bash(f"zstd -d -q -c {q(part['base'])} | tar -x -i -f - -C {q(d)}", what="zstd -d | tar -x")
            if not (d / "backup_manifest").exists():
                run_cmd(["zstd", "-d", "-q", str(part["manifest"]), "-o", str(d / "backup_manifest")], what="zstd -d")
            return d

        with ThreadPoolExecutor(max_workers=2) as pool:
            dirs = list(pool.map(extract, chain))
        steps["extract"] = time.monotonic() - t
        t = time.monotonic()
        for d in dirs:
            run_cmd([verifyb, "--quiet", "--no-parse-wal", "--skip-checksums", str(d)], what="pg_verifybackup")
        t_verify = time.monotonic() - t
        t = time.monotonic()
        run_cmd([combine, "--link", "--no-sync", "-o", str(out), *map(str, dirs)], what="pg_combinebackup")
        shutil.rmtree(stage)
        steps["combine"] = time.monotonic() - t
        t = time.monotonic()
        run_cmd([verifyb, "--quiet", str(out)], what="pg_verifybackup")
        steps["verify"] = t_verify + time.monotonic() - t
        t = time.monotonic()
        entries = sorted((e for e in os.listdir(out) if e != "backup_manifest"), key=lambda n: (n != "backup_label", n))
        base, man = store / "base.tar.zst", store / "backup_manifest.zst"
        bash(f"tar -c -f - -b 2048 --format=gnu --hard-dereference --owner=0 --group=0 --numeric-owner -C {q(out)} -- "
             + " ".join(q(e) for e in entries) + f" | zstd -{self.a.level} -q -T{threads} -o {q(base)}",
             what="tar -c | zstd")
        run_cmd(["zstd", f"-{self.a.level}", "-q", str(out / "backup_manifest"), "-o", str(man)], what="zstd")
        for f in (base, man, store):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        steps["store"] = time.monotonic() - t
        raw = dir_size(out)["apparent_bytes"]
        shutil.rmtree(out)
        met = m.stop()
        return {"wall_s": met["wall_s"], "timings": {k: round(v, 3) for k, v in steps.items()}, "raw_bytes": raw,
                "stored_bytes": base.stat().st_size + man.stat().st_size, "cpu_s": met["cpu_s"], "meter": met}

    def phase_synthesize(self) -> None:
        a = self.a
        pre = self.w / "ours" / "A-before-synthesis"
        shutil.copytree(self.repo_a, pre, symlinks=True)
        chain = self.chain_files(pre)
        self.info["synthesis_chain"] = [f"{c['backup_id']} ({c['kind']})" for c in chain]
        self.log(f"synthesis rounds on the chain {' -> '.join(self.info['synthesis_chain'])}")
        self.synthetic_repo = None
        for i in range(a.repeat):
            pair = {}
            for side in (["ours", "raw"] if i % 2 == 0 else ["raw", "ours"]):
                if side == "ours":
                    repo = self.w / "ours" / f"A-syn-{i + 1}"
                    shutil.copytree(pre, repo, symlinks=True)
                    r = self.synthesize_into(repo)
                    if self.synthetic_repo is None:
                        self.synthetic_repo, self.synthetic_id = repo, r["backup_id"]
                    else:
                        shutil.rmtree(repo)
                else:
                    work = self.w / f"raw-syn-{i + 1}"
                    r = self.raw_synthesize(chain, work)
                    shutil.rmtree(work)
                pair[side] = r
                self.log(f"  [{i + 1}/{a.repeat}] {side:<4} {r['wall_s']:6.2f} s  {r['timings']}  stored "
                         f"{r['stored_bytes'] / MB:.1f} MB  load {r['meter']['loadavg_1m_start']:.2f}  other procs "
                         f"{r['meter']['other_cpu_pct']:.0f}%")
            self.rounds["synthesize"].append(pair)
        shutil.rmtree(pre)

    def phase_restore(self) -> None:
        from airflow_pg_incremental.core.repository import LocalRepository
        from airflow_pg_incremental.core.restore import restore_backup

        a = self.a
        c_id = next(d["backup_id"] for d in self.days if d["side"] == "C")
        srcs = {"synthetic": (self.synthetic_repo, self.synthetic_id), "server-full": (self.repo_c, c_id)}
        rd = self.w / "restore"
        rd.mkdir(mode=0o755)
        for i in range(a.restore_repeat):
            pair = {}
            for side in (["synthetic", "server-full"] if i % 2 == 0 else ["server-full", "synthetic"]):
                repo, bid = srcs[side]
                target = rd / f"{side}-{i + 1}"
                drop_dirty()
                m = Meter()
                res = restore_backup(LocalRepository(repo), CLUSTER, bid, target, os_user=self.pg18_os_user,
                                     progress_interval=3600)
                met = m.stop()
                pair[side] = {"wall_s": met["wall_s"], "timings": res.get("timings"), "chain": res.get("chain"),
                              "output_bytes": dir_size(target)["apparent_bytes"], "cpu_s": met["cpu_s"],
                              "meter": met}
                shutil.rmtree(target)
                self.log(f"  [{i + 1}/{a.restore_repeat}] restore {side:<11} {met['wall_s']:6.2f} s  {res.get('timings')}  "
                         f"load {met['loadavg_1m_start']:.2f}  other procs {met['other_cpu_pct']:.0f}%")
            self.rounds["restore"].append(pair)

    # -- PostgreSQL 15: pgBackRest weekly full + daily incr ----------------------------------------
    def pgbr_backup(self, kind: str, day: int) -> dict:
        drop_dirty()
        sio = ServerIO(postmaster_pid(self.pg15.server.data_dir))
        io0 = self_io()
        m = Meter(postmaster_pid(self.pg15.server.data_dir))
        self.pgbr("--repo=1", f"--type={kind}", "backup")
        met = m.stop()
        tool = _sub(self_io(), io0)
        srv = sio.stop()
        b = self.pgbr_info()[-1]
        if b["type"] != kind:
            raise RuntimeError(f"pgBackRest took a {b['type']} backup instead of {kind}")
        manifest = self.pgbr_base / "repo" / "backup" / "bench" / b["label"] / "backup.manifest"
        copied = bi.pgbr_breakdown(manifest, {})
        copied = {k: sum(v[k] for v in copied.values()) for k in ("raw_bytes", "stored_bytes", "files")}
        r = {"day": day, "side": "pgBackRest", "kind": kind, "label": b["label"], "wall_s": met["wall_s"],
             "tool_io": tool, "server_io": srv, "manifest_copied": copied, "delta_bytes": b["info"]["delta"],
             "stored_bytes": b["info"]["repository"]["delta"], "loadavg_1m": met["loadavg_1m_start"]}
        self.log(f"  day {day:2d} pgBackRest {kind:<4} {met['wall_s']:6.2f} s  its processes read "
                 f"{tool['rchar'] / MB:7.1f} MB  files copied {copied['raw_bytes'] / MB:7.1f} MB ({copied['files']})  "
                 f"server read {srv['total']['rchar'] / MB:5.1f} MB  stored {r['stored_bytes'] / MB:6.1f} MB")
        return r

    def phase_pgbackrest(self) -> None:
        from airflow_pg_incremental.core.server import chown_tree
        from airflow_pg_incremental.sandbox import SandboxPostgres

        a = self.a
        exe = shutil.which("pgbackrest")
        if a.no_pgbackrest or not exe or not bi.PG15_POSTGRES.exists():
            self.pgbr_note = "--no-pgbackrest" if a.no_pgbackrest else f"not installed ({self.install_note})"
            self.log(f"pgBackRest skipped: {self.pgbr_note}")
            return
        self.pgbr_exe = exe
        self.pgbr_version = run_cmd([exe, "version"]).stdout.strip()
        base = self.pgbr_base = self.w / "pgbackrest"
        pg = SandboxPostgres(self.w / "pg15", major=15)
        self.pgbr_user = pg.os_user
        for sub in ("", "repo", "log", "lock", "spool"):
            (base / sub).mkdir(mode=0o750 if sub == "repo" else 0o755, exist_ok=True)
        self.pgbr_cfg = base / "pgbackrest.conf"
        srv = pg.server
        self.pgbr_cfg.write_text(
            f"[global]\nrepo1-path={base / 'repo'}\nrepo1-retention-full=9\ncompress-type=zst\n"
            f"compress-level={a.level}\nprocess-max=2\nstart-fast=y\narchive-async=n\nlog-level-console=warn\n"
            f"log-level-stderr=warn\nlog-level-file=off\nlog-path={base / 'log'}\nlock-path={base / 'lock'}\n"
            f"spool-path={base / 'spool'}\n\n[bench]\npg1-path={srv.data_dir}\npg1-port={srv.port}\n"
            f"pg1-socket-path={srv.socket_dir}\npg1-user=postgres\n")
        os.chmod(self.pgbr_cfg, 0o644)
        chown_tree(base, self.pgbr_user)
        pg.extra_settings["archive_command"] = f"{exe} --config={self.pgbr_cfg} --stanza=bench archive-push %p"
        self.pg15 = pg
        t = time.monotonic()
        pg.start()
        self.pgbr("stanza-create")
        version = pg.psql("SHOW server_version").strip()
        self.log(f"PostgreSQL {version} started, {self.pgbr_version} stanza created; pgbench -i -s {a.scale} ...")
        pg.pgbench_init(a.scale)
        self.checkpoint(pg)
        self.wait_archived(pg)
        db = int(pg.psql("SELECT sum(pg_database_size(oid)) FROM pg_database").strip())
        self.info["pg15"] = {"postgresql": version, "cluster_bytes_after_init": db, "init_s": time.monotonic() - t,
                             "workload": []}
        for day in range(1, DAYS + 1):
            self.info["pg15"]["workload"].append(self.day_workload(pg, f"PG15 day {day}"))
            if day >= 8:
                self.info["pg15"]["workload"][-1]["archive_drain_s"] = self.wait_archived(pg)
                self.pgbr_days.append(self.pgbr_backup("full" if day == 8 else "incr", day))
            self.unquiesce(pg)
        self.info["pg15"]["cluster_bytes_end"] = int(
            pg.psql("SELECT sum(pg_database_size(oid)) FROM pg_database").strip())
        pg.stop()
        self.pg15 = None
        self.log("PostgreSQL 15 stopped")

    # =========================================================================================
    def run(self) -> dict:
        import zstandard

        a = self.a
        self.log(f"workdir {self.w}; load average {os.getloadavg()}")
        self.maybe_install()
        self.phase_pg18()
        self.phase_synthesize()
        self.phase_restore()
        self.phase_pgbackrest()
        rep = {
            "benchmark": "a week of backups: incremental forever with synthetic fulls vs weekly server full (PG18) "
                         "vs pgBackRest weekly full + daily incr (PG15); synthesis and restore speed",
            "when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": {"scale": a.scale, "transactions_per_client": a.transactions, "clients": a.clients,
                       "jobs": a.jobs, "level": a.level, "threads": a.threads, "repeat": a.repeat,
                       "restore_repeat": a.restore_repeat,
                       "quick": a.quick,
                       "pgbackrest_options": f"compress-type=zst compress-level={a.level} process-max=2 start-fast=y "
                                             "archive-async=n, repo-bundle/repo-block off (defaults)"},
            "environment": {"cpus": os.cpu_count(), "python": platform.python_version(),
                            "zstandard": zstandard.__version__, "zstd_cli": bi._zstd_version(),
                            "platform": platform.platform(), "pgbackrest": self.pgbr_version,
                            "pgbackrest_note": self.pgbr_note, "install": self.install_note,
                            "code": bi._git_state(), "page_cache": "warm; sync(2) before each measured step"},
            "servers": self.info, "days": self.days, "pgbackrest_days": self.pgbr_days, "rounds": self.rounds,
            "total_run_s": time.monotonic() - self.t_start, "loadavg_end": os.getloadavg(),
        }
        rep["summary"] = summarize(rep)
        print_report(rep)
        return rep


# =============================================================================================
def _week(rows: list[dict], key) -> int:
    return sum(key(r) for r in rows)


def summarize(rep: dict) -> dict:
    days = rep["days"]
    wk2 = lambda side: [d for d in days if d["side"] == side and 8 <= d["day"] <= DAYS]  # noqa: E731
    a1 = [d for d in days if d["side"] == "A" and d["day"] <= 7]
    s: dict = {}
    for name, rows in (("A_week2", wk2("A")), ("B_week2", wk2("B")), ("A_week1", a1)):
        s[name] = {"backups": len(rows), "kinds": [r["kind"] for r in rows],
                   "server_read_ended": _week(rows, lambda r: r["server_io"]["ended"]["rchar"]),
                   "server_read_total": _week(rows, lambda r: r["server_io"]["total"]["rchar"]),
                   "server_read_bytes_block": _week(rows, lambda r: r["server_io"]["total"]["read_bytes"]),
                   "streamed": _week(rows, lambda r: r["raw_bytes"]),
                   "stored": _week(rows, lambda r: r["stored_bytes"]),
                   "wall_s": sum(r["wall_s"] for r in rows)}
    p = rep["pgbackrest_days"]
    if p:
        s["pgbr_week"] = {"backups": len(p), "kinds": [r["kind"] for r in p],
                          "tool_read": _week(p, lambda r: r["tool_io"]["rchar"]),
                          "tool_read_bytes_block": _week(p, lambda r: r["tool_io"]["read_bytes"]),
                          "server_read_ended": _week(p, lambda r: r["server_io"]["ended"]["rchar"]),
                          "server_read_live": _week(p, lambda r: r["server_io"]["live"]["rchar"]),
                          "files_copied": _week(p, lambda r: r["manifest_copied"]["raw_bytes"]),
                          "stored": _week(p, lambda r: r["stored_bytes"]),
                          "wall_s": sum(r["wall_s"] for r in p)}
    syn = rep["rounds"]["synthesize"]
    s["synthesize"] = ratio_stats([(r["ours"]["wall_s"], r["raw"]["wall_s"]) for r in syn])
    s["synthesize"]["ours_median_s"] = statistics.median(r["ours"]["wall_s"] for r in syn)
    s["synthesize"]["raw_median_s"] = statistics.median(r["raw"]["wall_s"] for r in syn)
    # CPU (this process and its waited-for children: tar, zstd, pg_combinebackup, pg_verifybackup) depends
    # much less on the other users of the machine than the wall time does
    s["synthesize"]["cpu"] = ratio_stats([(r["ours"]["cpu_s"], r["raw"]["cpu_s"]) for r in syn])
    rs = rep["rounds"]["restore"]
    s["restore"] = ratio_stats([(r["synthetic"]["wall_s"], r["server-full"]["wall_s"]) for r in rs])
    s["restore"]["synthetic_median_s"] = statistics.median(r["synthetic"]["wall_s"] for r in rs)
    s["restore"]["server_full_median_s"] = statistics.median(r["server-full"]["wall_s"] for r in rs)
    s["restore"]["cpu"] = ratio_stats([(r["synthetic"]["cpu_s"], r["server-full"]["cpu_s"]) for r in rs])
    loads = [d["loadavg_1m"] for d in days + p] + [
        x[k]["meter"]["loadavg_1m_start"] for x in syn + rs for k in x]
    s["loadavg_1m_range"] = [min(loads), max(loads)]
    checks = []
    if p:
        v = s["A_week2"]["server_read_ended"] / s["pgbr_week"]["tool_read"]
        checks.append({"check": "bytes read from the server per week, incremental forever (PG18) / pgBackRest "
                                "weekly full + 6 incr (PG15)", "value": v, "target": f"<= {TARGET_READ_RATIO}",
                       "pass": v <= TARGET_READ_RATIO})
    else:
        checks.append({"check": "bytes read per week vs pgBackRest", "value": None, "target": f"<= {TARGET_READ_RATIO}",
                       "pass": None, "why": rep["environment"]["pgbackrest_note"]})
    for key, label, target in (("synthesize", "synthesize / raw (extract, verify, combine --link, verify, "
                                "tar | zstd, fsync)", TARGET_SYN_RATIO),
                               ("restore", "restore of the synthetic full / restore of a server full of the same "
                                "state", TARGET_RESTORE_RATIO)):
        v = s[key]["median"]
        checks.append({"check": label, "value": v, "target": f"<= {target}", "pass": v <= target,
                       "per_round": s[key]["per_round"]})
    s["checks"] = checks
    return s


def print_report(rep: dict) -> None:
    s, cfg, srv = rep["summary"], rep["config"], rep["servers"]
    wl = srv["pg18"]["workload"]
    print()
    print(f"Synthetic fulls, a week of backups - pgbench scale {cfg['scale']} "
          f"({srv['pg18']['cluster_bytes_after_init'] / MB:.0f} MB cluster at the start, "
          f"{srv['pg18']['cluster_bytes_end'] / MB:.0f} MB after 14 days), a day = pgbench -n -c {cfg['clients']} "
          f"-j {cfg['jobs']} -t {cfg['transactions_per_client']} + CHECKPOINT; zstd level {cfg['level']}; "
          f"{rep['environment']['cpus']} CPUs; load average (1 min) {s['loadavg_1m_range'][0]:.2f}-"
          f"{s['loadavg_1m_range'][1]:.2f} over the measured steps")
    print(f"PG18 day: {statistics.median(w['seconds'] for w in wl):.1f} s, "
          f"{statistics.median(w['tps'] or 0 for w in wl):.0f} tps, "
          f"{statistics.median(w['wal_bytes'] for w in wl) / MB:.0f} MB of WAL (medians)"
          + (f"; PG15 day: {statistics.median(w['seconds'] for w in srv['pg15']['workload']):.1f} s, "
             f"{statistics.median(w['tps'] or 0 for w in srv['pg15']['workload']):.0f} tps, "
             f"{statistics.median(w['wal_bytes'] for w in srv['pg15']['workload']) / MB:.0f} MB of WAL"
             if "pg15" in srv else ""))
    print()
    a, b, p = s["A_week2"], s["B_week2"], s.get("pgbr_week")
    cols = ["incr forever (A)", "server full (B)"] + (["pgBackRest"] if p else [])
    g = lambda d, k: d.get(k) if d else None  # noqa: E731
    print("backups in the week: A = 7 incrementals + synthesize (the synthetic full reads nothing from the server); "
          "B = 1 server full + 6 incrementals" + ("; pgBackRest = 1 full + 6 incr" if p else ""))
    rows = [
        ("read from the server (MB): the backup's processes",
         [a["server_read_ended"], b["server_read_ended"]] + ([p["tool_read"]] if p else []), "mb", True),
        ("  + the other server processes (MB)",
         [a["server_read_total"], b["server_read_total"]] + ([p["tool_read"] + p["server_read_ended"]] if p else []),
         "mb", True),
        ("  of which from the disk, read_bytes (MB)",
         [a["server_read_bytes_block"], b["server_read_bytes_block"]] + ([p["tool_read_bytes_block"]] if p else []),
         "mb", False),
        ("streamed by pg_basebackup / files copied (MB)",
         [a["streamed"], b["streamed"]] + ([g(p, "files_copied")] if p else []), "mb", True),
        ("stored in the week (MB)", [a["stored"], b["stored"]] + ([g(p, "stored")] if p else []), "mb", True),
        ("backup wall time in the week (s)", [a["wall_s"], b["wall_s"]] + ([g(p, "wall_s")] if p else []), "{:.1f}",
         True),
    ]
    bi._table("Week 2 (days 8-14)", cols, rows, [("A/B", 0, 1)] + ([("A/pgBR", 0, 2)] if p else []))
    print()
    print("'the backup's processes': ours = /proc/<postmaster>/io rchar delta of the server processes that ended "
          "during the backup\n(the walsender and the engine's SQL sessions; Linux adds a reaped child's counters to "
          "its parent), autovacuum paused\nduring the backups; pgBackRest = rchar of its own process tree (it reads "
          "the data directory itself), from this process's\ncounters around the call. '+ the other server processes': "
          "ours adds the live server processes (checkpointer, WAL\nsummarizer, IO workers); pgBackRest adds the "
          "server's SQL sessions that ended. rchar counts every read(2)/pread(2) byte,\npage cache or disk; the "
          "page cache was warm.")
    if p:
        by: dict = {}
        for r in rep["pgbackrest_days"]:
            for k, v in r["server_io"]["live_rchar_by_process"].items():
                by[k] = by.get(k, 0) + v
        print(f"not counted: during pgBackRest's backups the live PG15 processes read {p['server_read_live'] / MB:.1f} "
              f"MB ({', '.join(f'{k} {v / MB:.1f}' for k, v in sorted(by.items(), key=lambda x: -x[1]))}):\nthe "
              "archiver's archive-push of the WAL the backups end with; WAL archiving is left out on both sides "
              "(PG18's archive_command is /bin/true here).")
    print(f"week 1 of A (server full + 7 incr): read {s['A_week1']['server_read_ended'] / MB:.1f} MB, stored "
          f"{s['A_week1']['stored'] / MB:.1f} MB; synthesize reads nothing from the server")
    print()
    sy, rs = s["synthesize"], s["restore"]
    syn_rounds, res_rounds = rep["rounds"]["synthesize"], rep["rounds"]["restore"]
    print(f"Synthesis of the chain {' -> '.join(srv['synthesis_chain'])} ({len(syn_rounds)} interleaved rounds)")
    steps = sorted({k for r in syn_rounds for side in r.values() for k in side["timings"]})
    for side in ("ours", "raw"):
        med = {k: statistics.median(r[side]["timings"].get(k, 0.0) for r in syn_rounds) for k in steps}
        print(f"  {side:<5} median {statistics.median(r[side]['wall_s'] for r in syn_rounds):6.2f} s  "
              + "  ".join(f"{k} {v:.2f}" for k, v in med.items())
              + f"  stored {syn_rounds[0][side]['stored_bytes'] / MB:.1f} MB of {syn_rounds[0][side]['raw_bytes'] / MB:.0f} MB")
    print(f"  ours / raw per round {', '.join(f'{x:.2f}' for x in sy['per_round'])}; median {sy['median']:.2f}")
    print(f"  CPU ours / raw per round {', '.join(f'{x:.2f}' for x in sy['cpu']['per_round'])}; median "
          f"{sy['cpu']['median']:.2f}; other processes' share of the CPU per round (ours, raw): "
          + ", ".join(f"{r['ours']['meter']['other_cpu_pct']:.0f}/{r['raw']['meter']['other_cpu_pct']:.0f}%"
                      for r in syn_rounds))
    print(f"Restore (restore_backup, verify on, durable), synthetic full vs server full of the same state "
          f"({len(res_rounds)} interleaved rounds)")
    for side in ("synthetic", "server-full"):
        print(f"  {side:<11} median {statistics.median(r[side]['wall_s'] for r in res_rounds):6.2f} s  "
              f"{res_rounds[0][side]['output_bytes'] / MB:.0f} MB restored")
    print(f"  synthetic / server full per round {', '.join(f'{x:.2f}' for x in rs['per_round'])}; "
          f"median {rs['median']:.2f}; CPU median {rs['cpu']['median']:.2f} ({rs['cpu']['min']:.2f}-"
          f"{rs['cpu']['max']:.2f})")
    print()
    for c in s["checks"]:
        if c["pass"] is None:
            print(f"SKIP  {c['check']} (target {c['target']}): {c.get('why', '')}")
        else:
            print(f"{'PASS' if c['pass'] else 'FAIL'}  {c['check']}: {c['value']:.3f} (target {c['target']})")
    print(f"total run time {rep['total_run_s']:.0f} s")


# =============================================================================================
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", type=int, default=None, help="pgbench scale (default 50; 5 with --quick)")
    ap.add_argument("--transactions", "-t", type=int, default=None,
                    help="pgbench -t per client per day (default 4000; 500 with --quick)")
    ap.add_argument("--clients", "-c", type=int, default=2, help="pgbench -c (default 2)")
    ap.add_argument("--jobs", "-j", type=int, default=2, help="pgbench -j (default 2)")
    ap.add_argument("--level", type=int, default=3, help="zstd level everywhere (default 3)")
    ap.add_argument("--threads", type=int, default=None,
                    help="compression threads: ours (backups, synthesize) and the raw zstd -T (default: the "
                         "engine's default, the cores)")
    ap.add_argument("--repeat", type=int, default=None, help="interleaved rounds of synthesis and of restore "
                                                             "(default 3; 2 with --quick)")
    ap.add_argument("--restore-repeat", type=int, default=None,
                    help="interleaved rounds of the restore comparison (default 9; 4 with --quick): each is ~1 s "
                         "at scale 50, so more rounds are cheap and the ratio's spread narrower")
    ap.add_argument("--quick", action="store_true", help="a quick try: scale 5, 500 transactions per client a day")
    ap.add_argument("--workdir", help="where to put the run (default: a fresh directory under /var/tmp)")
    ap.add_argument("--json", help="write all results to this JSON file")
    ap.add_argument("--keep", action="store_true", help="do not remove the work directory at the end")
    ap.add_argument("--no-install", action="store_true",
                    help="do not apt-get install postgresql-15 / pgbackrest when missing")
    ap.add_argument("--no-pgbackrest", action="store_true", help="skip the pgBackRest (PostgreSQL 15) column")
    a = ap.parse_args(argv)
    a.scale = a.scale or (5 if a.quick else 50)
    a.transactions = a.transactions or (500 if a.quick else 4000)
    a.repeat = a.repeat or (2 if a.quick else 3)
    a.restore_repeat = a.restore_repeat or (4 if a.quick else 9)
    a.fillfactor = None
    if min(a.scale, a.transactions, a.clients, a.jobs, a.repeat, a.restore_repeat) < 1 or not 1 <= a.level <= 19:
        ap.error("--scale, --transactions, --clients, --jobs, --repeat must be >= 1; --level 1..19")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    from _common import run_bench

    return run_bench(a, "pgincr-synbench-", SynBench,
                     lambda b: [("stop PostgreSQL", pg.stop) for pg in (b.pg18, b.pg15) if pg is not None])


if __name__ == "__main__":
    sys.exit(main())
