"""A second repository (3-2-1): copying what one repository holds of a cluster into another, and
restoring from the copy when the first cannot serve.

`copy_cluster(src, dst, cluster)` brings into `dst` what it lacks: WAL segments, history and backup
history files first (each zstd frame decompressed and checked before it is stored), then restore
points, then every complete backup (each object read against the SHA-256 recorded when it was
written, backup.json last, so a copy that stops half-way leaves no visible backup; the next run
completes it). Nothing is ever deleted in `dst`: retention applies to each repository on its own.
A damaged object in `src` is not copied; the copy goes on with the rest and then fails, naming it.

`restore_with_fallback(repos, restore, ...)` runs a restore (plain or point-in-time) against the
first repository and, when that one is unreachable or holds a damaged or missing object, against
the next, saying so; the failed attempt has removed what it wrote.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from .codec import HashingReader, ObjectInfo, decompress_bytes
from .errors import BackupNotFound, ChecksumMismatch, ClusterNotFound, ConfigError, RepositoryError
from .metadata import META_NAME, backup_prefix, list_backups, require_cluster, unseal
from .names import validate_cluster
from .progress import Progress, human_bytes
from .repository import Repository

log = logging.getLogger(__name__)


def copy_cluster(src: Repository, dst: Repository, cluster: str, *, workers: int = 4,
                 progress_interval: float = 10.0) -> dict:
    """Replicate `cluster` from `src` into `dst` (both existing repositories). Returns a report:
    {"cluster", "source", "copy", "wal_copied", "restore_points_copied", "backups_copied", "bytes",
    "damaged": [...], "duration_s"}; raises ChecksumMismatch after copying everything else when
    `src` holds damaged objects."""
    validate_cluster(cluster)
    _check_pair(src, dst)
    require_cluster(src, cluster)
    t0 = time.monotonic()
    report = {"cluster": cluster, "source": src.url, "copy": dst.url, "wal_copied": 0, "restore_points_copied": 0,
              "backups_copied": [], "bytes": 0, "damaged": []}
    _copy_wal(src, dst, cluster, report, workers)
    _copy_restore_points(src, dst, cluster, report)
    _copy_backups(src, dst, cluster, report, progress_interval)
    report["duration_s"] = round(time.monotonic() - t0, 3)
    log.info("copied %s of %s into %s: %d WAL file(s), %d restore point(s), %d backup(s) (%s), %s in %.1f s", cluster,
             src.url, dst.url, report["wal_copied"], report["restore_points_copied"], len(report["backups_copied"]),
             ", ".join(report["backups_copied"]) or "none new", human_bytes(report["bytes"]), report["duration_s"])
    if report["damaged"]:
        raise ChecksumMismatch(f"{src.url} holds {len(report['damaged'])} damaged object(s) that were not copied: "
                               + "; ".join(report["damaged"][:5]) + f". Everything else is in {dst.url}. Run "
                               f"`pgincr verify --repo {src.url} --cluster {cluster}`; a damaged backup is replaced by "
                               "the next one, a damaged WAL segment only by the server's copy if it still has it")
    return report


def _check_pair(src: Repository, dst: Repository) -> None:
    a, b = src.identity(), dst.identity()  # both must be repositories (RepositoryNotFound names the fix)
    if a.get("repository_id") and a.get("repository_id") == b.get("repository_id"):
        raise ConfigError(f"{src.url} and {dst.url} are the same repository (id {a.get('repository_id')}): a copy "
                          "needs another bucket, endpoint or directory, created with `pgincr repo-create`")


def _copy_wal(src: Repository, dst: Repository, cluster: str, report: dict, workers: int) -> None:
    have = set(dst.list(f"{cluster}/wal"))
    todo = [k for k in src.list(f"{cluster}/wal") if k not in have and k.endswith(".zst")]

    def one(key: str) -> int:
        data = src.get_bytes(key)
        try:
            decompress_bytes(data, key)  # the whole frame, its checksum included
        except ChecksumMismatch as e:
            report["damaged"].append(str(e))
            return 0
        dst.put_bytes(key, data)
        return len(data)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for n in pool.map(one, todo):
            if n:
                report["wal_copied"] += 1
                report["bytes"] += n


def _copy_restore_points(src: Repository, dst: Repository, cluster: str, report: dict) -> None:
    import json

    have = set(dst.list(f"{cluster}/restore_points"))
    for key in src.list(f"{cluster}/restore_points"):
        if key in have:
            continue
        data = src.get_bytes(key)
        try:
            json.loads(data)
        except ValueError:
            report["damaged"].append(f"{key}: not valid JSON")
            continue
        dst.put_bytes(key, data)
        report["restore_points_copied"] += 1


def _copy_backups(src: Repository, dst: Repository, cluster: str, report: dict, interval: float) -> None:
    for meta in list_backups(src, cluster):  # oldest first: parents before what builds on them
        key = f"{backup_prefix(cluster, meta['backup_id'])}/{META_NAME}"
        if dst.exists(key):
            continue
        try:
            for obj in meta.get("objects", []):
                report["bytes"] += _copy_object(src, dst, ObjectInfo.from_dict(obj), meta["backup_id"], interval)
        except ChecksumMismatch as e:
            report["damaged"].append(str(e))
            continue
        raw = src.get_bytes(key)
        unseal(raw, key)  # unchanged since it was listed
        dst.put_bytes(key, raw)  # visible in the copy from here on
        report["backups_copied"].append(meta["backup_id"])


def _copy_object(src: Repository, dst: Repository, info: ObjectInfo, backup_id: str, interval: float) -> int:
    """Stream one object, its stored bytes hashed on the way; a mismatch with what was recorded
    when it was written removes it from `dst` and raises."""
    if dst.exists(info.key) and dst.size(info.key) == info.stored_size:
        return 0  # a copy that stopped after this object: it was checked then
    progress = Progress(f"copy {backup_id} {info.key.rsplit('/', 1)[-1]}", info.stored_size, log, interval)
    with src.open(info.key, size=info.stored_size) as stored:
        reader = HashingReader(stored, on_chunk=lambda c: progress.add(len(c)))
        dst.put(info.key, reader)
    if reader.size != info.stored_size or reader.hexdigest() != info.stored_sha256:
        dst.delete(info.key)
        raise ChecksumMismatch(f"{info.key} in {src.url}: read {reader.size} B sha256 {reader.hexdigest()[:16]}..., "
                               f"recorded {info.stored_size} B sha256 {info.stored_sha256[:16]}... (backup "
                               f"{backup_id} not copied)")
    progress.finish()
    return reader.size


# ------------------------------------------------------------------------------------------
def _serves_no_more(e: BaseException) -> bool:
    """An error of the repository (unreachable, damaged or missing object, unknown backup or
    cluster), not of the request or the restore itself: another copy may serve."""
    for err in (e, e.__cause__):
        if isinstance(err, (RepositoryError, BackupNotFound, ClusterNotFound)):
            return True
    return False


def restore_with_fallback(repos: list[Repository], restore, *args, **kwargs) -> dict:
    """`restore(repo, *args, **kwargs)` against each repository in turn until one serves; the
    report says which (`repository`) and why the ones before it did not (`fell_back`)."""
    if not repos:
        raise ConfigError("no repository to restore from")
    failed: list[dict] = []
    for i, repo in enumerate(repos):
        try:
            out = restore(repo, *args, **kwargs)
        except Exception as e:
            if i == len(repos) - 1 or not _serves_no_more(e):
                if failed:
                    log.error("the copies were tried too: %s", "; ".join(f"{f['repository']}: {f['error']}"
                                                                          for f in failed))
                raise
            nxt = repos[i + 1].url
            log.warning("restore from %s failed (%s: %s): restoring from the copy %s", repo.url, type(e).__name__,
                        e, nxt)
            failed.append({"repository": repo.url, "error": f"{type(e).__name__}: {e}"[:500]})
            continue
        out["repository"] = repo.url
        out["fell_back"] = failed
        if failed:
            log.warning("restored from the copy %s after %d failed repository(ies)", repo.url, len(failed))
        return out
    raise AssertionError("unreachable")
