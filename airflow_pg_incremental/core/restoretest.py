"""Restore tests: prove a backup by restoring it to a point in time, on a scratch copy.

Never touches production: a scratch directory of its own, its own port and private socket, no TCP,
archive_mode=off; removed afterwards even on failure. The measured restore time (RTO) and its split
(plan, extract, combine, verify, sync, replay), the point reached, the checks and the outcome are
recorded in the catalog.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from . import procs
from .pitr import RecoveryTarget, parse_target, restore_pitr
from .repository import Repository

log = logging.getLogger(__name__)

AMCHECK_SQL = """
SELECT count(*) FROM (
  SELECT bt_index_check(c.oid)
  FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam
  JOIN pg_namespace n ON n.oid = c.relnamespace
  WHERE a.amname = 'btree' AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND c.relpersistence = 'p'
  ORDER BY c.relpages DESC LIMIT {limit}) s"""


def _scratch_tablespaces(repo: Repository, cluster: str, target: RecoveryTarget, scratch: Path) -> dict:
    """The restore test's tablespaces go into its scratch directory, never to their original places."""
    from .pitr import choose_backup

    meta = choose_backup(repo, cluster, target, None)
    spaces = meta.get("tablespaces") or []
    if not spaces:
        return {}
    return {"backup_id": meta["backup_id"],
            "tablespace_map": {str(t["oid"]): str(scratch / f"tblspc-{int(t['oid'])}") for t in spaces}}


def run_restore_test(repo: Repository, cluster: str, target: RecoveryTarget | None = None, *,
                     checks: list[str] | None = None, databases: list[str] | None = None, amcheck: bool = True,
                     amcheck_limit: int = 50, catalog=None, airflow: dict | None = None,
                     scratch_parent: str | None = None, os_user: str | None = None,
                     timeout_s: float = 3600) -> dict:
    """Restore `cluster` to `target` (default: latest) in a scratch directory, run the checks (and
    amcheck's bt_index_check where the extension exists), record the result, clean up."""
    from .server import default_os_user

    target = target or parse_target("latest")
    os_user = os_user if os_user is not None else default_os_user()
    scratch = Path(tempfile.mkdtemp(prefix=f"pgincr-restoretest-{cluster}-", dir=scratch_parent))
    procs.register_dir(scratch)  # removed, with the server in it, by procs.terminate_all (a killed task)
    scratch.chmod(0o755)
    t0 = time.monotonic()
    rec = {"cluster": cluster, "ok": False, "target_kind": target.kind, "target_value": target.value,
           "dag_id": (airflow or {}).get("dag_id"), "run_id": (airflow or {}).get("run_id")}
    srv = None
    try:
        rep = restore_pitr(repo, cluster, target, scratch / "data", os_user=os_user, keep_running=True,
                           timeout_s=timeout_s, **_scratch_tablespaces(repo, cluster, target, scratch))
        srv = rep.pop("server", None)
        rto = time.monotonic() - t0
        results = []
        if srv is not None:
            from .restore import run_checks

            user = "postgres"
            results = run_checks(srv, checks or ["SELECT 1"], user=user)
            if amcheck:
                for db in databases or ["postgres"]:
                    results += _amcheck(srv, db, amcheck_limit)
        ok = all(r["ok"] for r in results) and rep.get("state") != "failed"
        rec.update({"ok": ok, "backup_id": rep["backup_id"], "chain": rep.get("chain"),
                    "restore_seconds": round(rto, 3), "timings": rep.get("timings"),
                    "reached_lsn": rep.get("reached_lsn"),
                    "stopped_at": rep.get("stopped_at"), "checks": results,
                    "error": None if ok else "; ".join(r.get("error", "") for r in results if not r["ok"])[:2000]})
        log.info("restore test of %s to %s %s: %s in %.1f s (%s; backup %s, reached %s)", cluster, target.kind,
                 target.value or "", "PASSED" if ok else "FAILED", rto,
                 ", ".join(f"{k} {v:.1f} s" for k, v in (rep.get("timings") or {}).items()), rep["backup_id"],
                 rep.get("reached_lsn"))
    except Exception as e:
        rec.update({"ok": False, "error": str(e)[:2000], "restore_seconds": round(time.monotonic() - t0, 3)})
        log.error("restore test of %s FAILED: %s", cluster, e)
    finally:
        if srv is not None:
            srv.stop("immediate")
        procs.remove_dir(scratch)  # and a server still running in it, e.g. one whose start was interrupted
        procs.forget_dir(scratch)
    if catalog is not None:
        try:
            catalog.record_restore_test(**rec)
        except Exception as e:
            log.error("could not record the restore test in the catalog: %s", e)
    rec["scratch_removed"] = not scratch.exists()
    return rec


def _amcheck(srv, db: str, limit: int) -> list[dict]:
    from .pgconn import connect

    try:
        with connect(srv.local_conninfo(db, "postgres")) as c, c.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'amcheck'")
            if not cur.fetchone():
                return [{"sql": "amcheck", "ok": True, "rows": [["amcheck not available: skipped"]]}]
            cur.execute("CREATE EXTENSION IF NOT EXISTS amcheck")  # on the scratch copy only
            cur.execute(AMCHECK_SQL.format(limit=int(limit)))
            n = cur.fetchone()[0]
            return [{"sql": f"amcheck bt_index_check ({db})", "ok": True, "rows": [[f"{n} btree indexes checked"]]}]
    except Exception as e:
        return [{"sql": f"amcheck bt_index_check ({db})", "ok": False, "error": str(e)[:500]}]
