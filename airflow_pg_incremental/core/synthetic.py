"""Synthetic full backups: a chain (full or synthetic full + incrementals) combined on this machine,
never on the database server, into a new full backup in the repository.

A synthetic full stands for the newest backup it was built from (`stands_for`): the same LSNs,
timeline, system identifier and point in time (`finished_at`). It is not a parent: the next
incremental still takes the newest real backup's manifest, as PostgreSQL's WAL summaries were
computed against it; a restore of any later backup combines the newest synthetic full that covers
a prefix of its chain with the tail (see incremental.resolve_chain), so restore chains stay short
while the server never sends a full again.

Steps: plan (which chain, refusals before anything is written), claim an id, combine the chain
into a scratch directory (restore's staging: every part checked against its stored checksums,
pg_combinebackup, then pg_verifybackup with checksums on the result), store it as a tar stream
compressed with zstd plus its backup_manifest, and publish backup.json last: a crash at any
point leaves nothing visible.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .. import __version__
from . import procs
from .binaries import find_program
from .codec import CompressingReader, PipeReader
from .errors import BackupFailed, BinaryNotFound, ConfigError, PgIncrError
from .backup import abandon, publish, store_manifest
from .metadata import backup_prefix, claim_backup_id, iso, require_cluster, resolve_backup, utcnow
from .names import validate_backup_id, validate_cluster
from .progress import Progress, human_bytes
from .repository import Repository

log = logging.getLogger(__name__)

# what a synthetic full copies from the backup it stands for
_INHERITED = ("start_lsn", "stop_lsn", "timeline", "checkpoint_lsn", "next_xid", "system_identifier",
              "pg_version_num", "pg_major", "data_checksums", "wal_segment_size", "bootstrap_superuser",
              "summarize_wal", "from_standby", "start_wal_file", "stop_wal_file", "started_at", "finished_at",
              "file_count", "source", "wal_included")


def plan_synthesis(repo: Repository, cluster: str, upto: str | None = "latest") -> dict:
    """What `synthesize` would combine: {"stands_for", "chain": [ids], "skip": reason or None}.
    Refuses (ConfigError) what cannot be synthesized; touches nothing."""
    from .incremental import resolve_chain

    validate_cluster(cluster)
    if upto not in (None, "latest"):
        validate_backup_id(upto)
    require_cluster(repo, cluster)
    meta = resolve_backup(repo, cluster, upto)
    if meta.get("kind") == "synthetic":
        meta = resolve_backup(repo, cluster, meta["stands_for"]) if upto in (None, "latest") else meta
    if meta.get("kind") == "synthetic":
        return {"stands_for": meta["stands_for"], "chain": [meta["backup_id"]], "meta": meta,
                "skip": f"{meta['backup_id']} is a synthetic full already"}
    if not meta.get("parent_id"):
        return {"stands_for": meta["backup_id"], "chain": [meta["backup_id"]], "meta": meta,
                "skip": f"{meta['backup_id']} is a full backup: there is no chain to combine"}
    if int(meta.get("pg_major") or 0) < 17:
        raise ConfigError(f"backup {meta['backup_id']} is of PostgreSQL {meta.get('pg_major')}: synthetic fulls "
                          "combine block-level incrementals (PostgreSQL 17+)")
    chain = resolve_chain(repo, cluster, meta)  # a broken chain is refused here, naming the link
    if len(chain) == 1 and chain[0].get("kind") == "synthetic":
        return {"stands_for": meta["backup_id"], "chain": [chain[0]["backup_id"]], "meta": meta,
                "skip": f"{chain[0]['backup_id']} already stands for {meta['backup_id']}"}
    return {"stands_for": meta["backup_id"], "chain": [b["backup_id"] for b in chain], "meta": meta,
            "chain_meta": chain, "skip": None}


def _refuse_tablespaces(chain: list[dict]) -> None:
    with_spaces = [b["backup_id"] for b in chain if b.get("tablespaces")]
    if with_spaces:
        raise ConfigError(f"backups {', '.join(with_spaces)} hold tablespaces; this version builds synthetic fulls "
                          "only of clusters without tablespaces. Take a new full backup instead (pgincr backup "
                          "--kind full); restores of the chain work as they are. Nothing was written.")


def synthesize(repo: Repository, cluster: str, upto: str | None = "latest", *, compression_level: int = 3,
               threads: int | None = None, scratch_dir: str | os.PathLike | None = None, catalog=None,
               airflow: dict | None = None, progress_interval: float = 10.0) -> dict:
    """Combine the restore chain of backup `upto` ('latest': the newest) into a synthetic full.

    scratch_dir: where the chain is combined (the cluster's size, plus the incrementals, of free
    disk); the system's temporary directory by default. Returns the new backup's metadata, or
    {"kind": "none", "reason": ...} when there is nothing to combine (a full, or already done)."""
    from .backup_stream import default_threads

    if not 1 <= compression_level <= 22:
        raise ConfigError(f"compression level {compression_level} out of range 1..22")
    plan = plan_synthesis(repo, cluster, upto)
    if plan["skip"]:
        log.info("nothing to synthesize for %s: %s", cluster, plan["skip"])
        return {"cluster": cluster, "kind": "none", "backup_id": None, "stands_for": plan["stands_for"],
                "reason": plan["skip"]}
    chain, target = plan["chain_meta"], plan["meta"]
    _refuse_tablespaces(chain)
    major = int(target["pg_major"])
    programs = _programs(major)
    scratch = _scratch(scratch_dir, chain)
    repo.check_writable()
    started = utcnow()
    backup_id = claim_backup_id(repo, cluster, "synthetic", {"kind": "synthetic", "started_at": iso(started),
                                                             "host": socket.gethostname(), "pid": os.getpid()},
                                started)
    prefix = backup_prefix(cluster, backup_id)
    meta = _new_meta(repo, cluster, backup_id, target, chain, started, airflow)
    log.info("synthetic full %s of %s: combining %s on this machine into %s/%s", backup_id, cluster,
             " -> ".join(b["backup_id"] for b in chain), repo.url, prefix)
    if catalog is not None:
        catalog.record_backup(meta)
    t0 = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"pgincr-synthesize-{backup_id}-", dir=scratch))
    procs.register_dir(work)
    try:
        timings = _combine(repo, chain, work / "combined", programs, major, progress_interval)
        t1 = time.monotonic()
        threads = threads or default_threads()
        base_info, man_info, raw = _store(repo, prefix, work / "combined", programs["tar"], compression_level,
                                          threads, progress_interval)
        timings["store"] = round(time.monotonic() - t1, 3)
        meta.update({"status": "complete", "synthesized_at": iso(utcnow()),
                     "duration_s": round(time.monotonic() - t0, 3), "timings": timings,
                     "raw_bytes": raw, "stored_bytes": base_info.stored_size + man_info.stored_size,
                     "objects": [base_info.to_dict(), man_info.to_dict()],
                     "compression": {"where": "client", "by": "python-zstandard", "level": compression_level,
                                     "threads": threads}})
        publish(repo, meta)  # the synthetic full exists from here on
    except BaseException as e:
        abandon(repo, meta, catalog, str(e), stamp="synthesized_at")
        if isinstance(e, Exception) and not isinstance(e, PgIncrError):
            raise BackupFailed(f"synthetic full {backup_id} failed: {e}") from e
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        procs.forget_dir(work)
    if catalog is not None:
        catalog.record_backup(meta)
    log.info("synthetic full %s complete: stands for %s (LSN %s), %s of data, %s stored, %.1f s (%s)", backup_id,
             meta["stands_for"], meta["stop_lsn"], human_bytes(raw), human_bytes(meta["stored_bytes"]),
             meta["duration_s"], ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()))
    return meta


def _programs(major: int) -> dict:
    tar = shutil.which("tar")
    if tar is None:
        raise BinaryNotFound("GNU tar is needed to write a synthetic full (apt-get install tar)")
    return {"combine": find_program("pg_combinebackup", major), "verify": find_program("pg_verifybackup", major),
            "tar": tar}


def _scratch(scratch_dir, chain: list[dict]) -> Path:
    """The scratch directory, refused up front when it lacks the room: the combined cluster plus
    the incrementals staged beside it."""
    scratch = Path(scratch_dir or tempfile.gettempdir())
    if not scratch.is_dir():
        raise ConfigError(f"scratch directory {scratch} does not exist; create it or pass another (--scratch-dir)")
    need = int(chain[-1].get("raw_bytes") or 0) + sum(int(b.get("raw_bytes") or 0) for b in chain[1:])
    st = os.statvfs(scratch)
    free = st.f_bavail * st.f_frsize
    if need and free < need * 1.1:
        raise ConfigError(f"scratch directory {scratch} has {human_bytes(free)} free; combining the chain "
                          f"{chain[0]['backup_id']}..{chain[-1]['backup_id']} needs about {human_bytes(need)}: "
                          "pass a larger one (--scratch-dir, or scratch_dir in the cluster's configuration). "
                          "Nothing was written")
    return scratch


def _new_meta(repo: Repository, cluster: str, backup_id: str, target: dict, chain: list[dict], started,
              airflow: dict | None) -> dict:
    meta = {"format": 1, "cluster": cluster, "backup_id": backup_id, "kind": "synthetic", "parent_id": None,
            "chain_root_id": backup_id, "chain_length": 1, "status": "running",
            "stands_for": target["backup_id"], "built_from": [b["backup_id"] for b in chain],
            "synthesis_started_at": iso(started), "reason": None, "airflow": airflow or {},
            "repository": repo.url, "tool": {"name": "airflow-pg-incremental", "version": __version__}}
    meta.update({k: target.get(k) for k in _INHERITED})
    return meta


def _combine(repo: Repository, chain: list[dict], out: Path, programs: dict, major: int,
             progress_interval: float) -> dict:
    """The chain combined into `out` exactly as a restore does it (every part checked, then
    pg_combinebackup, then pg_verifybackup with checksums on the result), not flushed: it is only
    read back once, to be stored."""
    from .restore import Timings, _combine_chain

    out.mkdir(mode=0o700)
    timings = Timings()
    _combine_chain(repo, chain, out, programs["combine"], programs["verify"], major, progress_interval, timings,
                   flush=False)
    return timings.as_dict()


def _store(repo: Repository, prefix: str, out: Path, tar: str, level: int, threads: int,
           interval: float) -> tuple:
    """`out` as a tar stream (GNU tar; backup_label first, as PostgreSQL writes it; backup_manifest
    stored beside it, as for a backup PostgreSQL compressed), zstd-compressed here, checksummed,
    into base.tar.zst and backup_manifest.zst. Returns (base info, manifest info, raw bytes)."""
    entries = sorted(os.listdir(out), key=lambda n: (n != "backup_label", n))
    entries = [e for e in entries if e != "backup_manifest"]
    manifest = (out / "backup_manifest").read_bytes()
    raw_total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    progress = Progress(f"store synthetic full {prefix.rsplit('/', 1)[-1]}", raw_total, log, interval)
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([tar, "-c", "-f", "-", "-b", "2048", "--format=gnu", "--hard-dereference",
                             "--owner=0", "--group=0", "--numeric-owner", "-C", str(out), "--", *entries],
                            stdout=subprocess.PIPE, stderr=err)
    procs.register_child(proc)
    pipe = PipeReader(proc.stdout, on_chunk=lambda c: progress.add(len(c)))
    try:
        reader = CompressingReader(pipe, level=level, threads=threads, raw_hasher=False)
        key = f"{prefix}/base.tar.zst"
        repo.put(key, reader)
        rc = proc.wait()
        if rc != 0:
            err.seek(0)
            raise BackupFailed(f"tar failed writing the synthetic full (exit {rc}): "
                               f"{err.read().decode(errors='replace')[-500:]}")
        base_info = reader.info(key)
        progress.extra = f"stored {human_bytes(base_info.stored_size)}"
        progress.finish()
        return base_info, store_manifest(repo, prefix, manifest, level), raw_total
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        procs.forget_child(proc)
        pipe.close()
        proc.stdout.close()
        err.close()


def synthetics(repo: Repository, cluster: str) -> dict[str, dict]:
    """synthetic_for over the repository, reading only the synthetic fulls' backup.json (the ids
    pgincr gives them end in -S; an id of another form is read to see): one listing and a read per
    synthetic full, not one per backup of the cluster. A damaged one is skipped (verify reports it)."""
    from .errors import ChecksumMismatch
    from .metadata import _read_meta, backup_id_time, list_backup_ids

    found = []
    for bid in list_backup_ids(repo, cluster):
        if bid.endswith("-S") or backup_id_time(bid) is None:
            try:
                meta = _read_meta(repo, cluster, bid)
            except ChecksumMismatch as e:
                log.error("skipping synthetic full %s: %s", bid, e)
                continue
            if meta is not None and meta.get("kind") == "synthetic":
                found.append(meta)
    found.sort(key=lambda m: (m.get("started_at", ""), m["backup_id"]))
    return synthetic_for(found)


def synthetic_for(backups: list[dict]) -> dict[str, dict]:
    """{backup id: the newest complete synthetic full standing for it} among `backups`."""
    out: dict[str, dict] = {}
    for b in backups:  # oldest first: the newest synthetic wins
        if b.get("kind") == "synthetic" and b.get("status", "complete") == "complete" and b.get("stands_for"):
            out[b["stands_for"]] = b
    return out


def summary(meta: dict) -> dict:
    """Small JSON dict for XCom / CLI output."""
    keys = ("cluster", "backup_id", "kind", "stands_for", "built_from", "reason", "status", "start_lsn",
            "stop_lsn", "timeline", "pg_major", "raw_bytes", "stored_bytes", "duration_s", "timings",
            "finished_at", "synthesized_at", "repository")
    return {k: meta.get(k) for k in keys if k in meta}


