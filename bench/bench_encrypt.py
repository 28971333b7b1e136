#!/usr/bin/env python
"""Benchmark: the cost of encryption at rest. A full backup into an encrypted local repository vs
into an unencrypted one, same server, same run, interleaved (plain, enc, enc, plain, ...); then the
restore of each (decryption on the read path).

    .venv/bin/python bench/bench_encrypt.py --scale 20 [--major 15|18] [--data pgbench|mixed]
                                            [--mixed-mb 300] [--repeat 3] [--workdir DIR] [--json FILE] [--keep]

Write-back is flushed (syncfs, unmeasured) before each measured step. Each backup runs in a child
Python process (bench/ours_backup_child.py, the engine's defaults), the
key only in that child's environment. Reported per side: the backup's wall time (the engine call,
without interpreter start-up), the restore's wall time (restore_backup, verify on), stored bytes;
the ratio encrypted / plain per round and its median (target <= 1.15 on the full backup). Exit code
0 whatever the numbers; non-zero only when something crashed.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from airflow_pg_incremental.core.repository import LocalRepository
from airflow_pg_incremental.core.repository.crypt import Keyring
from airflow_pg_incremental.core.restore import restore_backup
from airflow_pg_incremental.sandbox import BACKUP_USER, SandboxPostgres
from _common import run_bench, syncfs, tail  # noqa: E402
from bench_incr import clean_env  # noqa: E402

HERE = Path(__file__).resolve().parent
CHILD = HERE / "ours_backup_child.py"
MB = 1_000_000
TARGET_RATIO = 1.15


class EncryptBench:
    def __init__(self, a, workdir: Path):
        self.a, self.w = a, workdir
        self.pg: SandboxPostgres | None = None
        self.key = base64.b64encode(os.urandom(32)).decode()

    def run(self) -> dict:
        a = self.a
        self.pg = SandboxPostgres(self.w / "pg", major=a.major)
        self.pg.start()
        t = time.monotonic()
        self.pg.pgbench_init(a.scale)
        if a.data == "mixed":
            self.pg.psql(f"CREATE TABLE mixed AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS t, "
                         f"jsonb_build_object('a', g, 'b', md5(g::text)) AS j "
                         f"FROM generate_series(1, {a.mixed_mb * 4000}) g")
        self.pg.psql("CHECKPOINT")
        print(f"PostgreSQL {a.major} on port {self.pg.port}, data ready in {time.monotonic() - t:.1f} s "
              f"(pgbench scale {a.scale}{', mixed ' + str(a.mixed_mb) + ' MB' if a.data == 'mixed' else ''})")
        rounds = []
        for r in range(a.repeat):
            order = ("plain", "enc") if r % 2 == 0 else ("enc", "plain")
            res = {side: self._round(side, r) for side in order}
            res["ratio_backup"] = res["enc"]["backup_s"] / res["plain"]["backup_s"]
            res["ratio_restore"] = res["enc"]["restore_s"] / res["plain"]["restore_s"]
            rounds.append(res)
            print(f"round {r + 1}: backup plain {res['plain']['backup_s']:.2f} s, encrypted {res['enc']['backup_s']:.2f}"
                  f" s (x{res['ratio_backup']:.3f}); restore plain {res['plain']['restore_s']:.2f} s, encrypted "
                  f"{res['enc']['restore_s']:.2f} s (x{res['ratio_restore']:.3f})")
        return self._report(rounds)

    def _round(self, side: str, r: int) -> dict:
        repo_dir = self.w / f"repo-{side}-{r}"
        env = {**clean_env(), "PGHOST": "127.0.0.1", "PGPORT": str(self.pg.port), "PGUSER": BACKUP_USER,
               "PGPASSWORD": self.pg.password, "PGDATABASE": "postgres"}
        if side == "enc":
            env["PGINCR_REPO_KEY"] = self.key
        cmd = [sys.executable, str(CHILD), "--repo", "local", "--dir", str(repo_dir), "--cluster", "bench",
               *(["--encrypt"] if side == "enc" else [])]
        errlog = self.w / f"child-{side}-{r}.log"
        syncfs(self.w)  # the previous run's write-back is not charged to this one (unmeasured)
        with open(errlog, "w") as err:
            p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{side} backup failed:\n{tail(errlog)}")
        out = json.loads(p.stdout.strip().splitlines()[-1])
        repo = LocalRepository(repo_dir)
        if side == "enc":
            repo.use_keyring(Keyring.from_texts(self.key))
        dest = self.w / f"restore-{side}-{r}"
        syncfs(self.w)
        t = time.monotonic()
        restore_backup(repo, "bench", out["meta"]["backup_id"], dest, os_user=self.pg.os_user)
        restore_s = time.monotonic() - t
        shutil.rmtree(dest, ignore_errors=True)
        shutil.rmtree(repo_dir, ignore_errors=True)
        return {"backup_s": out["call_s"], "restore_s": restore_s, "raw_bytes": out["meta"].get("raw_bytes"),
                "stored_bytes": out["meta"].get("stored_bytes")}

    def _report(self, rounds: list[dict]) -> dict:
        med = lambda side, k: statistics.median(r[side][k] for r in rounds)  # noqa: E731
        rb = statistics.median(r["ratio_backup"] for r in rounds)
        rr = statistics.median(r["ratio_restore"] for r in rounds)
        raw = rounds[0]["plain"]["raw_bytes"] or 0
        print()
        print(f"{'':12} {'backup s':>10} {'restore s':>10} {'stored MB':>10}")
        for side in ("plain", "enc"):
            print(f"{side:12} {med(side, 'backup_s'):>10.2f} {med(side, 'restore_s'):>10.2f} "
                  f"{med(side, 'stored_bytes') / MB:>10.1f}")
        per_round = ", ".join(f"{r['ratio_backup']:.3f}" for r in rounds)
        best = {k: min(r["enc"][k] for r in rounds) / min(r["plain"][k] for r in rounds)
                for k in ("backup_s", "restore_s")}
        print(f"raw {raw / MB:.0f} MB; encrypted / plain, median of the per-round ratios: backup x{rb:.3f} "
              f"(target <= {TARGET_RATIO}: {'PASS' if rb <= TARGET_RATIO else 'FAIL'}), restore x{rr:.3f} (info); "
              f"per round: {per_round}; ratio of the best times: backup x{best['backup_s']:.3f}, restore "
              f"x{best['restore_s']:.3f}")
        return {"rounds": rounds, "ratio_backup_median": rb, "ratio_restore_median": rr, "target": TARGET_RATIO,
                "ratio_best": best,
                "scale": self.a.scale, "major": self.a.major, "data": self.a.data}

    def stop(self) -> None:
        if self.pg is not None:
            self.pg.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=20)
    ap.add_argument("--data", choices=("pgbench", "mixed"), default="pgbench")
    ap.add_argument("--mixed-mb", type=int, default=300)
    ap.add_argument("--major", type=int, default=15 if Path("/usr/lib/postgresql/15/bin/postgres").exists() else 18)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--workdir")
    ap.add_argument("--json")
    ap.add_argument("--keep", action="store_true")
    a = ap.parse_args()
    return run_bench(a, "pgincr-encbench-", EncryptBench, lambda b: [("stop PostgreSQL", b.stop)])


if __name__ == "__main__":
    sys.exit(main())
