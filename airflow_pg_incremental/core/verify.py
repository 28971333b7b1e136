"""Backup verification: prove, without touching any server, that backups in the repository are
whole and usable.

For each backup:

- **metadata / chain**: backup.json unseals (its own checksum), and an incremental's chain of
  parents resolves down to a full (``resolve_chain``).
- **objects**: every object listed in backup.json is re-read from the repository through
  ``VerifyingReader`` (stored size and SHA-256, zstd frame checksum, raw size); a failure names the
  object's key.
- **pg_verifybackup**: base.tar.zst is extracted (in the same pass as its object check) into a
  temporary staging directory under ``staging_parent`` (never inside a data directory; removed in
  every case) and ``pg_verifybackup`` of the backup's major version checks it against its
  backup_manifest, parsing the WAL the backup includes (``-X fetch``). An incremental whose WAL
  cannot be parsed is checked again with ``--no-parse-wal`` (said so in the check's detail).
- **wal** (``check_wal``): the segments from the backup's start to its stop are in the WAL archive
  and, for the newest backup of a chain, the archive is continuous from its stop to the newest
  archived segment of its timeline. Backups carry their own WAL (``-X fetch``) and restore without
  the archive, so a failed 'wal' check means point-in-time recovery from (or across) the backup is
  impossible, not that the backup is damaged; the message says so, and names the fix (capture the
  WAL while the server still has it, else a new full backup once archiving works).
- **wal_objects** (with ``check_wal``; a check of its own, so that damage is told apart from WAL
  not archived yet): every archived segment the backup vouches for is read and checked: from the
  stop of the backup that started just before it (when on the same timeline; else from its own
  start) to its stop, for the newest of a chain up to the newest archived segment of its timeline
  (so the WAL archived between two backups is read when the later one is verified, even when the
  earlier one is skipped as verified already). Each object must be one
  whole zstd frame with a matching content checksum, decompress to exactly the segment size, match
  the raw SHA-256 the catalog recorded at capture (when there is one), and carry in its long page
  header (XLogLongPageHeaderData) the backup's system identifier, its own start address, a
  timeline at most its own and the segment size: a valid segment of another cluster or position
  stored under this name is caught too. Each segment is read once per run, however many backups
  need it, by a few threads (``WAL_READERS``; zstd and SHA-256 release the GIL; one segment in
  memory per thread), with progress lines (segments, MiB/s). A failure names the damaged
  segment(s), the consequence (recovery past it is impossible) and the fix (archive the server's
  copy again, else a new full backup).

Each verified backup gets a row in the catalog's ``verifications`` table (ok, checks, error,
Airflow ids). With ``only_unverified`` the backups whose last verification passed are skipped.
No Airflow import here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from .binaries import find_program
from .codec import CHUNK, ObjectInfo, VerifyingReader, raw_total
from .errors import (
    ChecksumMismatch,
    ConfigError,
    ObjectNotFound,
    RepositoryError,
    RestoreError,
)
from .lsn import (
    format_lsn,
    segment_name,
    segno_of,
)
from .walpage import parse_long_page_header, segment_header_problem
from .metadata import (
    META_NAME,
    DamagedBackup,
    backups_prefix,
    list_backup_ids,
    list_backups,
    load_backup,
    require_cluster,
    resolve_backup,
    unseal,
    wal_span,
)
from .names import validate_cluster
from .progress import CountingReader, Progress, human_bytes
from .repository import Repository

log = logging.getLogger(__name__)

BASE_NAME = "base.tar.zst"
_MAX_DETAIL = 2000


def verify_backup(repo: Repository, cluster: str, backup_id: str | None = None, *, catalog=None, chain: bool = True,
                  check_wal: bool = True, only_unverified: bool = True, staging_parent: str | os.PathLike | None = None,
                  airflow: dict | None = None, progress_interval: float = 10.0) -> dict:
    """Verify backup `backup_id` of `cluster` ('latest' for the newest; with `chain`, every backup
    of its chain too), or every complete backup of the cluster when `backup_id` is None.

    Returns {"cluster", "verified": [ids that passed], "failed": [{backup_id, check, message}],
    "skipped": [ids whose last verification in the catalog passed], "duration_s", "results":
    [per backup: backup_id, kind, ok, duration_s, checks]} (plus "catalog_errors" when a result
    could not be recorded). Unknown backup ids and missing PostgreSQL programs raise before
    anything is verified; damage is reported, never raised."""
    validate_cluster(cluster)
    require_cluster(repo, cluster)
    t0 = time.monotonic()
    airflow = airflow or {}
    staging = _check_staging_parent(staging_parent)
    out: dict = {"cluster": cluster, "verified": [], "failed": [], "skipped": [], "duration_s": 0.0, "results": []}

    selected, broken = _select(repo, cluster, backup_id or None, chain)
    newest_of_chain = _newest_of_chains(selected, backup_id or None)

    todo = []
    for meta in selected:
        bid = meta["backup_id"]
        if only_unverified and catalog is not None:
            last = catalog.last_verification(cluster, bid)
            if last and last.get("ok"):
                log.info("backup %s: verified already (%s), skipped", bid, last.get("started_at"))
                out["skipped"].append(bid)
                continue
        todo.append(meta)
    # everything that can fail without side effects first: the programs of every major version
    verifybackup = {m: find_program("pg_verifybackup", m) for m in sorted({int(b["pg_major"]) for b in todo})}
    log.info("verifying %d backup(s) of cluster %s in %s%s: %s", len(todo) + len(broken), cluster, repo.url,
             f" ({len(out['skipped'])} verified already, skipped)" if out["skipped"] else "",
             ", ".join([b["backup_id"] for b in todo] + [b for b, _ in broken]) or "nothing to do")

    def finish(bid: str, res: dict) -> None:
        out["results"].append({"backup_id": bid, **res})
        failures = [c for c in res["checks"] if c["ok"] is False]
        if res["ok"]:
            out["verified"].append(bid)
            log.info("backup %s: verified OK in %.1f s (%s)", bid, res["duration_s"],
                     ", ".join(c["name"] for c in res["checks"]))
        for c in failures:
            out["failed"].append({"backup_id": bid, "check": c["name"], "message": c["detail"]})
            log.error("backup %s: %s check FAILED: %s", bid, c["name"], c["detail"])
        if catalog is not None:
            try:
                catalog.record_verification(
                    cluster=cluster, backup_id=bid, ok=res["ok"], duration_s=res["duration_s"], checks=res["checks"],
                    error="; ".join(f"{c['name']}: {c['detail']}" for c in failures)[:8000] or None,
                    dag_id=airflow.get("dag_id"), run_id=airflow.get("run_id"))
            except Exception as e:  # the verification result itself must not be lost
                log.error("could not record the verification of backup %s in the catalog: %s", bid, e)
                out.setdefault("catalog_errors", []).append(f"{bid}: {e}")

    for bid, msg in broken:
        finish(bid, _damaged_metadata_result(bid, msg))
    wal_cache: dict = {"previous": _previous_backups(repo, cluster, todo) if check_wal and todo else {}}
    for n, meta in enumerate(todo, start=1):
        log.info("backup %s (%s, %d of %d): verifying", meta["backup_id"], meta.get("kind"), n, len(todo))
        finish(meta["backup_id"], _verify_one(
            repo, cluster, meta, verifybackup=verifybackup[int(meta["pg_major"])], check_wal=check_wal,
            tail=meta["backup_id"] in newest_of_chain, staging_parent=staging, wal_cache=wal_cache, catalog=catalog,
            progress_interval=progress_interval))
    out["duration_s"] = round(time.monotonic() - t0, 3)
    if out["failed"]:
        log.error("verification of cluster %s: %d backup(s) OK, %d check(s) FAILED in %d backup(s), %d skipped, "
                  "%.1f s", cluster, len(out["verified"]), len(out["failed"]),
                  len({f["backup_id"] for f in out["failed"]}), len(out["skipped"]), out["duration_s"])
    else:
        log.info("verification of cluster %s: %d backup(s) OK, %d skipped, %.1f s", cluster, len(out["verified"]),
                 len(out["skipped"]), out["duration_s"])
    return out


# ------------------------------------------------------------------------------------------
def _check_staging_parent(staging_parent) -> Path:
    """Where staging directories go: an existing absolute directory outside any data directory."""
    p = Path(staging_parent) if staging_parent else Path(tempfile.gettempdir())
    if not p.is_absolute():
        raise ConfigError(f"staging directory {staging_parent} must be an absolute path")
    if not p.is_dir():
        raise ConfigError(f"staging directory {p} does not exist or is not a directory; create it (it needs room "
                          "for the largest backup, uncompressed)")
    if any((d / "PG_VERSION").exists() for d in (p, *p.parents)):
        raise ConfigError(f"staging directory {p} lies inside a PostgreSQL data directory; choose another place")
    return p


def _select(repo: Repository, cluster: str, backup_id: str | None, chain: bool) -> tuple[list[dict], list]:
    """(backups to verify oldest first, [(backup_id, problem)] of backups whose backup.json is damaged)."""
    if backup_id is None:
        metas, broken = [], []
        for bid in list_backup_ids(repo, cluster):
            key = f"{backups_prefix(cluster)}/{bid}/{META_NAME}"
            try:
                metas.append(unseal(repo.get_bytes(key), key))
            except ObjectNotFound:
                log.info("backup directory %s has no %s: an incomplete or running backup, not verified", bid,
                         META_NAME)
            except ChecksumMismatch as e:
                broken.append((bid, str(e)))
        metas.sort(key=lambda m: (m.get("started_at", ""), m["backup_id"]))
        return metas, broken
    try:
        meta = resolve_backup(repo, cluster, backup_id)  # unknown id: BackupNotFound, raised
    except DamagedBackup as e:  # 'latest' is a backup that cannot be read: it fails, no older one stands in
        return [], [(e.backup_id, str(e))]
    except ChecksumMismatch as e:
        return [], [(backup_id, str(e))]
    if not chain or not meta.get("parent_id"):  # a full or a synthetic full
        return [meta], []
    from .incremental import resolve_chain

    try:  # what a restore of it combines (through a synthetic full that stands for part of it)
        members = resolve_chain(repo, cluster, meta)
        return (members if members[-1]["backup_id"] == meta["backup_id"] else [*members, meta]), []
    except RestoreError:
        pass
    # the ancestors that can be loaded; a broken link is reported by the 'chain' check of the
    # backup above it
    members = [meta]
    seen = {meta["backup_id"]}
    while members[0].get("parent_id") and members[0]["parent_id"] not in seen:
        try:
            parent = load_backup(repo, cluster, members[0]["parent_id"])
        except Exception:
            break
        members.insert(0, parent)
        seen.add(parent["backup_id"])
    return members, []


def _newest_of_chains(selected: list[dict], backup_id: str | None) -> set[str]:
    """The backups whose WAL is also checked up to the newest archived segment: the requested
    backup, or (all backups) the newest of each chain."""
    if not selected:
        return set()
    if backup_id is not None:
        return {selected[-1]["backup_id"]}
    newest: dict[str, str] = {}
    for m in selected:  # oldest first
        newest[m.get("chain_root_id") or m["backup_id"]] = m["backup_id"]
    return set(newest.values())


def _previous_backups(repo: Repository, cluster: str, todo: list[dict]) -> dict[str, dict]:
    """For each backup to verify, the complete backup of the cluster that started just before it
    (any chain): the WAL between the two is vouched for by the later one."""
    every = list_backups(repo, cluster)  # oldest first
    ids = [b["backup_id"] for b in every]
    out = {}
    for m in todo:
        i = ids.index(m["backup_id"]) if m["backup_id"] in ids else 0
        if i > 0:
            out[m["backup_id"]] = every[i - 1]
    return out


def _damaged_metadata_result(backup_id: str, message: str) -> dict:
    return {"kind": None, "ok": False, "duration_s": 0.0,
            "checks": [{"name": "metadata", "ok": False,
                        "detail": f"backup {backup_id}: {message}; the backup cannot be listed nor restored"}]}


def _check(name: str, ok: bool | None, detail: str, **extra) -> dict:
    return {"name": name, "ok": ok, "detail": detail[:_MAX_DETAIL], **extra}


def _verify_one(repo: Repository, cluster: str, meta: dict, *, verifybackup: str, check_wal: bool, tail: bool,
                staging_parent: Path, wal_cache: dict, progress_interval: float, catalog=None) -> dict:
    bid = meta["backup_id"]
    t0 = time.monotonic()
    checks = []
    if meta.get("parent_id"):
        checks.append(_chain_check(repo, cluster, meta))
    try:
        checks += _objects_and_verifybackup(repo, meta, verifybackup, staging_parent, progress_interval)
    except Exception as e:  # e.g. the staging directory cannot be created: this backup stays unverified
        checks.append(_check("objects", False, f"backup {bid}: its objects could not be checked: "
                             f"{type(e).__name__}: {e}"))
    if check_wal:
        try:
            checks.append(_wal_check(repo, cluster, meta, tail, wal_cache))
        except Exception as e:  # e.g. the repository cannot be listed
            checks.append(_check("wal", False, f"backup {bid}: the WAL archive could not be checked: {e}"))
        try:
            checks.append(_wal_objects_check(repo, cluster, meta, tail, wal_cache, catalog, progress_interval))
        except Exception as e:
            checks.append(_check("wal_objects", False, f"backup {bid}: the archived WAL could not be read: "
                                 f"{type(e).__name__}: {e}"))
        checks = [c for c in checks if c is not None]
    ok = all(c["ok"] is not False for c in checks) and any(c["ok"] for c in checks)
    return {"kind": meta.get("kind"), "ok": ok, "duration_s": round(time.monotonic() - t0, 3), "checks": checks}


def _chain_check(repo: Repository, cluster: str, meta: dict) -> dict:
    from .incremental import resolve_chain

    try:
        members = resolve_chain(repo, cluster, meta)
    except RestoreError as e:
        return _check("chain", False, str(e))
    return _check("chain", True, " -> ".join(b["backup_id"] for b in members))


# ------------------------------------------------------------------------------------------
def _read_object(repo: Repository, info: ObjectInfo, dest: Path | None, what: str,
                 progress_interval: float) -> tuple[str | None, str | None]:
    """Read one object to its end through VerifyingReader, extracting it (a tar) into `dest` when
    given. Returns (object problem, extraction problem); the object is whole when the first is None.
    After an extraction error the rest is still read, so damage is told apart from a staging problem."""
    progress = Progress(f"verify {what}", info.raw_size, log, progress_interval)
    extract_error = None
    try:
        with repo.open(info.key, size=info.stored_size) as stored:
            reader = VerifyingReader(stored, info)
            counting = CountingReader(reader, progress)
            if dest is not None:
                try:
                    with tarfile.open(fileobj=counting, mode="r|") as tf:
                        tf.extractall(dest, filter="data")
                except (ChecksumMismatch, RepositoryError):
                    raise
                except Exception as e:  # tar damage, full disk, ...: read on to know which
                    extract_error = f"{type(e).__name__}: {e}"
            while counting.read(CHUNK):  # to EOF: sizes and SHA-256 are compared there
                pass
    except ObjectNotFound:
        return f"object {info.key} is missing from the repository {repo.url}", None
    except ChecksumMismatch as e:
        msg = str(e)
        return (msg if info.key in msg else f"{info.key}: {msg}"), None
    except RepositoryError as e:
        return f"object {info.key} cannot be read from {repo.url}: {e}", None
    except Exception as e:  # e.g. a connection reset while streaming from S3
        return f"object {info.key} cannot be read from {repo.url}: {type(e).__name__}: {e}", None
    progress.finish()
    return None, extract_error


def _objects_and_verifybackup(repo: Repository, meta: dict, verifybackup: str, staging_parent: Path,
                              progress_interval: float) -> list[dict]:
    bid = meta["backup_id"]
    objects = [ObjectInfo.from_dict(o) for o in meta.get("objects") or []]
    base = next((o for o in objects if o.key.rsplit("/", 1)[-1] == BASE_NAME), None)
    spaces = {t["object"]: int(t["oid"]) for t in meta.get("tablespaces") or []}
    per_object = []
    vb_check = None
    root = stage = None
    if base is not None:
        free = shutil.disk_usage(staging_parent).free
        need = raw_total([base, *(o for o in objects if _name(o) in spaces)], int(meta.get("raw_bytes") or 0))
        if free < need * 1.05:
            vb_check = _check("pg_verifybackup", False,
                              f"backup {bid}: not run: staging needs about {human_bytes(need)}, only "
                              f"{human_bytes(free)} free in {staging_parent}; choose a larger staging directory")
        else:
            stage = Path(tempfile.mkdtemp(prefix=f"pgincr-verify-{bid}-", dir=staging_parent))
            root = stage.with_name(stage.name + ".tblspc")  # its tablespaces, linked from pg_tblspc
    failed = None  # (object, its problem, extraction problem) of the first staged object that failed
    try:
        for info in objects:
            dest = stage if info is base else _tablespace_stage(root, spaces.get(_name(info)))
            problem, extract_problem = _read_object(repo, info, dest, f"{bid} {_name(info)}", progress_interval)
            per_object.append({"key": info.key, "ok": problem is None, **({"error": problem} if problem else {})})
            if dest is not None and failed is None and (problem or extract_problem):
                failed = (info, problem, extract_problem)
        if stage is not None:
            vb_check = _verify_staged(repo, meta, verifybackup, stage, root, failed, spaces)
    finally:
        for d in (stage, root):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
    bad = [o for o in per_object if not o["ok"]]
    if not objects:
        obj_check = _check("objects", False, f"backup {bid}: backup.json lists no objects")
    elif base is None:
        obj_check = _check("objects", False, f"backup {bid}: backup.json lists no {BASE_NAME}; the backup cannot be "
                           "restored", objects=per_object)
    elif bad:
        obj_check = _check("objects", False, f"backup {bid}: " + "; ".join(o["error"] for o in bad),
                           objects=per_object)
    else:
        stored = sum(o.stored_size for o in objects)
        obj_check = _check("objects", True, f"{len(objects)} object(s), {human_bytes(stored)} stored: sizes and "
                           "checksums match", objects=per_object)
    return [obj_check] + ([vb_check] if vb_check else [])


def _name(info: ObjectInfo) -> str:
    return info.key.rsplit("/", 1)[-1]


def _tablespace_stage(root: Path | None, oid: int | None) -> Path | None:
    """Where a tablespace object is extracted beside the staged data directory (None: not staged)."""
    if root is None or oid is None:
        return None
    d = root / str(oid)
    d.mkdir(mode=0o700, parents=True)
    return d


def _verify_staged(repo: Repository, meta: dict, program: str, stage: Path, root: Path, failed,
                   spaces: dict) -> dict:
    """pg_verifybackup on the staged backup once every object was read; not run when one of the
    staged objects was damaged or could not be extracted (said so)."""
    from .tablespaces import link_tablespace

    bid = meta["backup_id"]
    if failed is not None:
        info, problem, extract_problem = failed
        if problem:
            return _check("pg_verifybackup", None, f"not run: {_name(info)} is damaged")
        return _check("pg_verifybackup", False, f"backup {bid}: not run: {info.key} could not be extracted into "
                      f"{stage} (its checksums are fine): {extract_problem}")
    for oid in spaces.values():
        link_tablespace(stage, oid, root / str(oid))
    return _verify_extracted(repo, meta, program, stage)


def _verify_extracted(repo: Repository, meta: dict, program: str, stage: Path) -> dict:
    """pg_verifybackup on an extracted backup, its backup_manifest placed beside it when the tar
    held none (a backup PostgreSQL compressed)."""
    from .restore import place_manifest

    try:
        place_manifest(repo, meta, stage)
    except Exception as e:
        return _check("pg_verifybackup", False, f"backup {meta['backup_id']}: not run: its backup_manifest cannot be "
                      f"read: {e}")
    return _run_verifybackup(program, stage, meta)


def _run_verifybackup(program: str, stage: Path, meta: dict) -> dict:
    bid = meta["backup_id"]
    t0 = time.monotonic()
    r = _run([program, "--quiet", str(stage)])
    if r.returncode == 0:
        return _check("pg_verifybackup", True, f"passed (files and WAL) in {time.monotonic() - t0:.1f} s")
    first = (r.stderr.strip() or r.stdout.strip())
    if meta.get("parent_id"):
        r2 = _run([program, "--quiet", "--no-parse-wal", str(stage)])
        if r2.returncode == 0:
            log.warning("backup %s: pg_verifybackup could not parse the WAL of the incremental backup (%s); its "
                        "files pass with --no-parse-wal", bid, first[:300])
            return _check("pg_verifybackup", True, f"files pass with --no-parse-wal; WAL parsing of the incremental "
                          f"failed: {first}")
        first = r2.stderr.strip() or r2.stdout.strip() or first
    return _check("pg_verifybackup", False, f"backup {bid} fails pg_verifybackup (exit {r.returncode}): {first}")


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


# ------------------------------------------------------------------------------------------
# The WAL archive: which segments a backup needs ('wal'), and what they hold ('wal_objects')

def _segments(repo: Repository, cluster: str, cache: dict) -> dict[int, list[str]]:
    if "segments" not in cache:
        from .wal import list_segments

        cache["segments"] = list_segments(repo, cluster)
    return cache["segments"]


def _wal_fix(cluster: str) -> str:
    return (f"Fix: capture the missing WAL now (`pgincr capture --cluster {cluster}`, or the cluster's hourly DAG) if "
            "the server still has it; otherwise set up WAL archiving (capture or archive_command) and take a new "
            "full backup, whose point-in-time recovery needs only WAL archived after it")


def _wal_check(repo: Repository, cluster: str, meta: dict, tail: bool, cache: dict) -> dict:
    bid = meta["backup_id"]
    span = wal_span(meta)
    if span is None:
        return _check("wal", False, f"backup {bid}: backup.json records no start/stop LSN or timeline; the WAL "
                      "it needs cannot be determined")
    tli, seg, first, last = span
    segs = _segments(repo, cluster, cache)
    consequence = ("the backup itself is consistent and restores on its own (its WAL was included with -X fetch), "
                   "but the archive is not continuous through it: point-in-time recovery from this backup is refused "
                   "(it needs archived WAL from the backup's start on) and recovery from an older backup cannot "
                   "replay across this range")
    if not segs:
        return _check("wal", False, f"backup {bid}: the WAL archive of cluster {cluster} in {repo.url} holds no "
                      f"segment at all (needed: {first} .. {last}, timeline {tli}): {consequence}. {_wal_fix(cluster)}; "
                      "or verify with check_wal off when the cluster has no WAL archive")
    have = {segno_of(n, seg) for n in segs.get(tli, [])}
    missing = [segment_name(tli, s, seg) for s in range(segno_of(first, seg), segno_of(last, seg) + 1)
               if s not in have]
    if missing:
        names = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        return _check("wal", False, f"backup {bid}: WAL segment(s) {names} between its start {meta['start_lsn']} and "
                      f"stop {meta['stop_lsn']} (timeline {tli}, segments {first} .. {last}) are missing from the WAL "
                      f"archive: {consequence}. {_wal_fix(cluster)}", missing=missing[:100])
    detail = f"segments {first} .. {last} archived"
    if tail:
        from .wal import continuity

        # from the start of the stop segment (a stop exactly on a segment boundary ends the segment before)
        cont = continuity(repo, cluster, from_lsn=segno_of(last, seg) * seg, timeline=tli, segment_size=seg)
        newest = segs[tli][-1]
        end = cont.get("end_segment") or last
        if segno_of(end, seg) < segno_of(newest, seg):
            gap = segment_name(tli, segno_of(end, seg) + 1, seg)
            return _check("wal", False, f"backup {bid}: WAL segment {gap} after its stop {meta['stop_lsn']} is missing "
                          f"from the WAL archive while newer WAL up to {newest} (timeline {tli}) is archived: the "
                          f"backup restores on its own, but point-in-time recovery from it can reach only LSN "
                          f"{cont.get('end_lsn') or meta['stop_lsn']}. {_wal_fix(cluster)}", missing=[gap])
        detail += f"; continuous from its stop to {end} (LSN {cont['end_lsn']}), the newest on timeline {tli}"
        newer = sorted(t for t in segs if t > tli)
        if newer:
            detail += (f"; newer timeline(s) {', '.join(str(t) for t in newer)} archived (not followed here"
                       + (f"; missing history: {', '.join(cont['missing_history'])}" if cont.get("missing_history")
                          else "") + ")")
    return _check("wal", True, detail)


# -- wal_objects ---------------------------------------------------------------------------
WAL_READERS = min(4, (os.cpu_count() or 2) + 1)  # threads reading WAL objects (zstd and SHA-256 release the GIL)


def _read_segment(repo: Repository, cluster: str, name: str, seg: int, want_sha256: str | None) -> dict:
    """Read one archived segment: whole zstd frame with its checksum, exact size, the SHA-256
    recorded at capture (when there is one), its long page header. Holds one segment in memory."""
    from .wal import fetch_bytes, wal_key

    key = wal_key(cluster, name)
    try:
        data = fetch_bytes(repo, cluster, name, seg)
    except ObjectNotFound:
        return {"problem": f"{key} was listed but can no longer be read (removed meanwhile?)", "read": False}
    except ChecksumMismatch as e:
        return {"problem": str(e) if key in str(e) else f"{key}: {e}", "read": False}
    except Exception as e:  # e.g. a connection reset from S3
        return {"problem": f"{key} cannot be read from {repo.url}: {type(e).__name__}: {e}", "read": False}
    problem = None
    if want_sha256:
        got = hashlib.sha256(data).hexdigest()
        if got != want_sha256:
            problem = (f"{key}: content SHA-256 {got[:16]}... differs from {want_sha256[:16]}... recorded in the "
                       "catalog when it was captured")
    return {"problem": problem, "read": True, "header": parse_long_page_header(data)}


def _recorded_sha256(catalog, cluster: str, cache: dict) -> dict[str, str]:
    """The raw SHA-256 of segments as recorded by pull capture in the catalog ({} without one)."""
    if "recorded" not in cache:
        cache["recorded"] = {}
        if catalog is not None and hasattr(catalog, "wal_checksums"):
            try:
                cache["recorded"] = catalog.wal_checksums(cluster)
            except Exception as e:
                log.warning("the catalog's WAL checksums could not be read (%s): WAL objects are checked by their "
                            "zstd checksums, sizes and page headers only", e)
    return cache["recorded"]


def _read_wal_objects(repo: Repository, cluster: str, names: list[str], seg: int, cache: dict, recorded: dict,
                      what: str, progress_interval: float) -> None:
    """Read the segments not read yet in this run, in parallel; results into cache['objects']."""
    objects = cache.setdefault("objects", {})
    todo = [n for n in names if n not in objects]
    if not todo:
        return
    progress = Progress(what, len(todo) * seg, log, progress_interval)
    pool = ThreadPoolExecutor(max_workers=WAL_READERS, thread_name_prefix="pgincr-verify-wal")
    try:
        futures = {pool.submit(_read_segment, repo, cluster, n, seg, recorded.get(n)): n for n in todo}
        for done, fut in enumerate(as_completed(futures), start=1):
            objects[futures[fut]] = fut.result()
            progress.extra = f"{done} of {len(todo)} segment(s)"
            progress.add(seg)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    progress.finish()


def _wal_object_names(meta: dict, tail: bool, previous: dict | None, segs: dict[int, list[str]]) -> list[str]:
    """The archived segments a backup vouches for, on its timeline: from the stop of the previous
    backup on that timeline (or its own start) to its stop, for the newest of a chain to the
    newest archived segment."""
    tli, seg, first, last = wal_span(meta)
    lo, hi = segno_of(first, seg), segno_of(last, seg)
    prev_span = wal_span(previous) if previous else None
    if prev_span and prev_span[0] == tli and prev_span[1] == seg:
        lo = min(lo, segno_of(prev_span[3], seg))
    names = segs.get(tli, [])
    if tail and names:
        hi = max(hi, segno_of(names[-1], seg))
    return [n for n in names if lo <= segno_of(n, seg) <= hi]


def _wal_objects_check(repo: Repository, cluster: str, meta: dict, tail: bool, cache: dict, catalog,
                       progress_interval: float) -> dict | None:
    bid = meta["backup_id"]
    if wal_span(meta) is None:
        return None  # the 'wal' check says so
    seg = wal_span(meta)[1]
    names = _wal_object_names(meta, tail, cache.get("previous", {}).get(bid), _segments(repo, cluster, cache))
    if not names:
        return None  # nothing archived in its range: the 'wal' check fails
    t0 = time.monotonic()
    _read_wal_objects(repo, cluster, names, seg, cache, _recorded_sha256(catalog, cluster, cache),
                      f"backup {bid}: reading WAL objects {names[0]} .. {names[-1]}", progress_interval)
    bad = []
    for n in names:
        r = cache["objects"][n]
        problems = [r["problem"]]
        if r["read"]:  # decompressed: what it holds (also when its SHA-256 differs, to tell what it is)
            problems.append(segment_header_problem(r["header"], n, seg, system_identifier=meta.get("system_identifier"),
                                                   pg_major=meta.get("pg_major")))
        if any(problems):
            bad.append((n, "; ".join(p for p in problems if p)))
    if not bad:
        return _check("wal_objects", True, f"{len(names)} archived segment(s) {names[0]} .. {names[-1]} read: zstd "
                      f"checksums, sizes and page headers (system identifier, position, timeline) match "
                      f"({time.monotonic() - t0:.1f} s)", segments=len(names))
    from .wal import wal_key

    first = bad[0][0]
    who = ("from a backup older than this one (this backup starts later and does not need it)"
           if segno_of(first, seg) < segno_of(wal_span(meta)[2], seg) else "from this backup and from any older one")
    listed = "; ".join(f"{n}: {p}" for n, p in bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
    return _check("wal_objects", False, (
        f"backup {bid}: {len(bad)} of {len(names)} archived WAL segment(s) it relies on are unusable: {listed}. "
        f"A restore replaying them fails: point-in-time recovery past LSN {format_lsn(segno_of(first, seg) * seg)} "
        f"(into segment {first}) is impossible {who}. Fix: if the server still "
        f"has the segment(s) in its pg_wal, delete the damaged object(s) (e.g. {wal_key(cluster, first)}) and archive "
        f"them again from there (`pgincr wal-push --cluster {cluster} <data directory>/pg_wal/{first}`); otherwise "
        "take a new full backup now (recovery from it does not need this WAL)"),
        segments=len(names), damaged=[n for n, _ in bad][:100])
