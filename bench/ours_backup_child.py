"""Child process for bench_full.py: runs ONE full backup with our engine and prints a JSON result.

Run in its own process so that its peak memory (this interpreter + the pg_basebackup it starts)
can be measured alone. Connection parameters come from the environment only (PGHOST, PGPORT,
PGUSER, PGPASSWORD, PGDATABASE); S3 endpoint and credentials too (PGINCR_S3_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION). Nothing secret is on argv.

stdout: one JSON object {"meta": <backup metadata>, "call_s": ..., "import_s": ..., ...}
"""

from __future__ import annotations

import time

_T_START = time.monotonic()

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

from airflow_pg_incremental.core.backup import take_full_backup  # noqa: E402
from airflow_pg_incremental.core.pgconn import ConnInfo  # noqa: E402
from airflow_pg_incremental.core.repository import (  # noqa: E402
    LocalRepository,
    S3Repository,
    s3_client_from_env,
)


def _vm_hwm() -> int | None:
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", choices=("local", "s3"), required=True)
    ap.add_argument("--dir", help="local repository directory")
    ap.add_argument("--bucket", help="S3 bucket")
    ap.add_argument("--prefix", default="bench", help="S3 key prefix")
    ap.add_argument("--cluster", default="bench")
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="default: the cores (the engine's default)")
    ap.add_argument("--compression", default="auto", choices=("auto", "server", "client"))
    ap.add_argument("--encrypt", action="store_true", help="an encrypted repository (key: $PGINCR_REPO_KEY)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")

    env = os.environ
    conn = ConnInfo(host=env["PGHOST"], port=int(env["PGPORT"]), user=env["PGUSER"],
                    password=env.get("PGPASSWORD"), dbname=env.get("PGDATABASE", "postgres"))
    if a.repo == "local":
        repo = LocalRepository(a.dir)
    else:
        repo = S3Repository(s3_client_from_env(), a.bucket, a.prefix)
    if a.encrypt:
        from airflow_pg_incremental.core.repository.crypt import keyring_from_env

        repo.use_keyring(keyring_from_env())
    repo.create()  # idempotent: the repository exists after the first round
    # drivers a long-lived Airflow worker has loaded already; the "process wall" row of the
    # benchmark still includes them (and interpreter start-up)
    import psycopg  # noqa: F401
    import zstandard  # noqa: F401
    t_import = time.monotonic() - _T_START

    t0 = time.monotonic()
    meta = take_full_backup(conn, repo, a.cluster, compression_level=a.level, threads=a.threads,
                            compression=a.compression, progress_interval=3600)
    call_s = time.monotonic() - t0

    out = {
        "meta": meta,
        "call_s": call_s,
        "import_s": t_import,
        # this interpreter's own RSS high-water mark, exact (the sampler may miss a spike between samples)
        "vm_hwm_bytes": _vm_hwm(),
    }
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
