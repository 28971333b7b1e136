"""Backup metadata (backup.json) and the repository layout.

    <cluster>/backups/<backup-id>/base.tar.zst          tar stream of the data directory, zstd
    <cluster>/backups/<backup-id>/backup_manifest.zst   PostgreSQL's backup_manifest, zstd
    <cluster>/backups/<backup-id>/in_progress.json      written first, removed last
    <cluster>/backups/<backup-id>/backup.json           written last: the backup exists once it does

A backup directory without backup.json is incomplete: never listed, never restored, and removed
by `cleanup_incomplete`. A backup.json that cannot be read (bad JSON, checksum) is *damaged*: it
is left out of listings, but 'latest' (and a point-in-time target the damaged backup may serve)
refuses rather than silently falling back to an older backup (`DamagedBackup`, naming the
`--backup-id` that restores without it). Backup ids sort by time (20261121T124048Z-F), so a
damaged backup's position is known from its directory name.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import re

from .errors import BackupNotFound, ChecksumMismatch, ClusterNotFound, ObjectNotFound
from .names import validate_backup_id, validate_cluster
from .repository import Repository

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_NAME = "backup.json"
INPROGRESS_NAME = "in_progress.json"


def object_info(meta: dict, name: str):
    """The recorded ObjectInfo of the backup's object named `name` (e.g. 'base.tar.zst'), or None."""
    from .codec import ObjectInfo

    for o in meta.get("objects", []):
        if o["key"].rsplit("/", 1)[-1] == name:
            return ObjectInfo.from_dict(o)
    return None


def wal_span(meta: dict) -> tuple[int, int, str, str] | None:
    """(timeline, segment size, first segment, last segment) of the WAL from the backup's start to
    its stop; None when backup.json does not record them."""
    from .lsn import DEFAULT_SEGMENT_SIZE, parse_lsn, wal_file_name, wal_file_name_ending

    if not meta.get("start_lsn") or not meta.get("stop_lsn") or not meta.get("timeline"):
        return None
    seg = int(meta.get("wal_segment_size") or DEFAULT_SEGMENT_SIZE)
    tli = int(meta["timeline"])
    first = meta.get("start_wal_file") or wal_file_name(tli, parse_lsn(meta["start_lsn"]), seg)
    last = meta.get("stop_wal_file") or wal_file_name_ending(tli, parse_lsn(meta["stop_lsn"]), seg)
    return tli, seg, first, last


def backups_prefix(cluster: str) -> str:
    return f"{validate_cluster(cluster)}/backups"


def backup_prefix(cluster: str, backup_id: str) -> str:
    return f"{backups_prefix(cluster)}/{validate_backup_id(backup_id)}"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(t: dt.datetime) -> str:
    return t.astimezone(dt.timezone.utc).isoformat(timespec="milliseconds")


def _canonical(meta: dict) -> bytes:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def seal(meta: dict) -> bytes:
    meta = dict(meta)
    meta["meta_sha256"] = hashlib.sha256(_canonical(meta)).hexdigest()
    return json.dumps(meta, indent=2, sort_keys=True).encode()


def unseal(raw: bytes, key: str) -> dict:
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise ChecksumMismatch(f"{key} is not valid JSON ({e}); the backup metadata is damaged") from None
    if not isinstance(meta, dict):
        raise ChecksumMismatch(f"{key} does not hold a JSON object; the backup metadata is damaged")
    want = meta.get("meta_sha256")
    if want != hashlib.sha256(_canonical(meta)).hexdigest():
        raise ChecksumMismatch(f"{key}: metadata checksum mismatch; the backup metadata was altered or damaged")
    return meta


def write_meta(repo: Repository, meta: dict) -> None:
    repo.put_bytes(f"{backup_prefix(meta['cluster'], meta['backup_id'])}/{META_NAME}", seal(meta))


def load_backup(repo: Repository, cluster: str, backup_id: str) -> dict:
    key = f"{backup_prefix(cluster, backup_id)}/{META_NAME}"
    try:
        raw = repo.get_bytes(key)
    except ObjectNotFound:
        known = [b["backup_id"] for b in list_backups(repo, cluster)]
        hint = f"known backups: {', '.join(known[-10:])}" if known else "the cluster has no complete backup"
        raise BackupNotFound(f"unknown backup id {backup_id!r} for cluster {cluster!r} in {repo.url}; {hint}") from None
    return unseal(raw, key)


def list_backup_ids(repo: Repository, cluster: str) -> list[str]:
    return repo.list_dirs(backups_prefix(cluster))


class DamagedBackup(ChecksumMismatch):
    """A backup whose backup.json cannot be read may be the one asked for ('latest', or the
    backup a point-in-time target needs): refused, never silently replaced by an older backup."""

    def __init__(self, message: str, backup_id: str, fallback_id: str | None = None):
        super().__init__(message)
        self.backup_id = backup_id
        self.fallback_id = fallback_id


def _read_meta(repo: Repository, cluster: str, bid: str) -> dict | None:
    """backup.json of `bid`; None when the directory has none (an incomplete or running backup);
    ChecksumMismatch when it cannot be read."""
    key = f"{backups_prefix(cluster)}/{bid}/{META_NAME}"
    try:
        return unseal(repo.get_bytes(key), key)
    except ObjectNotFound:
        return None


def list_backups(repo: Repository, cluster: str) -> list[dict]:
    """Complete backups of `cluster`, oldest first. Damaged metadata is logged and skipped (see
    `refuse_damaged_newer` for the commands that must not skip it)."""
    out = []
    for bid in list_backup_ids(repo, cluster):
        try:
            meta = _read_meta(repo, cluster, bid)
        except ChecksumMismatch as e:
            log.error("skipping backup %s: %s", bid, e)
            continue
        if meta is not None:
            out.append(meta)
    # a synthetic full shares the started_at of the backup it stands for: it comes right after it,
    # whatever the ids (taken in the same second, 20261125T211209Z-S sorts before ...Z.002-I)
    out.sort(key=lambda m: (m.get("started_at", ""), m.get("kind") == "synthetic", m["backup_id"]))
    return out


_ID_TIME_RE = re.compile(r"^(\d{8}T\d{6}Z)(?:[.-]|$)")


def backup_id_time(backup_id: str) -> dt.datetime | None:
    """When a backup started, from its id (20261121T124048Z-F); None for an id of another form."""
    m = _ID_TIME_RE.match(backup_id)
    if not m:
        return None
    try:
        return dt.datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    except ValueError:
        return None


def _maybe_newer(bid: str, chosen: dict) -> bool:
    """Whether backup `bid` may have started after `chosen` (True when its id tells no time)."""
    t, tc = backup_id_time(bid), backup_id_time(chosen["backup_id"])
    if t is None or tc is None:
        return bid != chosen["backup_id"]
    return (t, bid) > (tc, chosen["backup_id"])


def damaged_backups(repo: Repository, cluster: str, newer_than: dict | None = None) -> list[tuple[str, str]]:
    """[(backup id, problem)] of the backup directories whose backup.json cannot be read, oldest
    first; with `newer_than`, only those that may be newer than that backup (only their
    backup.json is read)."""
    out = []
    for bid in list_backup_ids(repo, cluster):
        if newer_than is not None and not _maybe_newer(bid, newer_than):
            continue
        try:
            _read_meta(repo, cluster, bid)
        except ChecksumMismatch as e:
            out.append((bid, str(e)))
    return out


def refuse_damaged_newer(repo: Repository, cluster: str, chosen: dict, *, what: str = "'latest'",
                         until: str | dt.datetime | None = None) -> dict:
    """`chosen` (the newest readable backup fitting a request), unless a backup whose backup.json
    cannot be read may be newer (and, with `until`, started at or before that time): then
    DamagedBackup, naming it and the `--backup-id` that restores `chosen` explicitly."""
    damaged = damaged_backups(repo, cluster, newer_than=chosen)
    if until is not None:
        limit = dt.datetime.fromisoformat(until) if isinstance(until, str) else until
        damaged = [(b, p) for b, p in damaged if (backup_id_time(b) or limit) <= limit]
    if not damaged:
        return chosen
    bid, problem = damaged[-1]
    raise DamagedBackup(
        f"backup {bid} of cluster {cluster!r} cannot be read ({problem}); it is newer than backup "
        f"{chosen['backup_id']}, the one {what} would otherwise use, so {what} is refused instead of silently "
        f"using an older backup. To restore without it, name the older backup explicitly: --backup-id "
        f"{chosen['backup_id']} (backup_id='{chosen['backup_id']}' in a DAG). To repair: restore "
        f"{backup_prefix(cluster, bid)}/{META_NAME} from a copy of the repository, or take a new full backup "
        f"(then 'latest' is that one); `pgincr verify --cluster {cluster} --backup-id {bid}` shows the damage",
        bid, chosen["backup_id"])


def list_clusters(repo: Repository) -> list[str]:
    return repo.list_dirs("")


def require_cluster(repo: Repository, cluster: str) -> None:
    """The repository exists (its marker) and holds `cluster`: a misspelled name or repository is
    an error listing what is there, never an empty answer. (A cluster exists once something was
    written for it: a backup, WAL or a restore point.)"""
    validate_cluster(cluster)
    repo.identity()
    if repo.list_dirs(cluster):
        return
    known = list_clusters(repo)
    have = f"its clusters: {', '.join(known)}" if known else "it holds no cluster yet (take a backup or archive WAL)"
    raise ClusterNotFound(f"cluster {cluster!r} does not exist in the repository {repo.url}; {have}")


def resolve_backup(repo: Repository, cluster: str, backup_id: str | None) -> dict:
    """'latest' / None -> newest complete backup; DamagedBackup when the newest backup directory
    holding a backup.json cannot be read (never an older backup in its place)."""
    if backup_id is None or backup_id == "latest":
        backups = list_backups(repo, cluster)
        if not backups:
            damaged = damaged_backups(repo, cluster)
            if damaged:
                bid, problem = damaged[-1]
                raise DamagedBackup(
                    f"backup {bid} of cluster {cluster!r} cannot be read ({problem}), and the cluster has no other "
                    f"complete backup in {repo.url}: restore {backup_prefix(cluster, bid)}/{META_NAME} from a copy "
                    "of the repository, or take a new full backup", bid)
            raise BackupNotFound(f"cluster {cluster!r} has no complete backup in {repo.url}; take a full backup first")
        return refuse_damaged_newer(repo, cluster, backups[-1])
    return load_backup(repo, cluster, backup_id)


def find_incomplete(repo: Repository, cluster: str) -> list[dict]:
    """Backup directories without backup.json, with their start time when known."""
    out = []
    for bid in list_backup_ids(repo, cluster):
        prefix = f"{backups_prefix(cluster)}/{bid}"
        if repo.exists(f"{prefix}/{META_NAME}"):
            continue
        objects = repo.list(prefix)
        if not objects:  # some S3 servers keep empty 'directories'; nothing to clean there
            continue
        started = None
        try:
            started = json.loads(repo.get_bytes(f"{prefix}/{INPROGRESS_NAME}")).get("started_at")
        except (ObjectNotFound, ValueError):
            pass
        out.append({"backup_id": bid, "started_at": started, "objects": objects})
    return out


def cleanup_incomplete(repo: Repository, cluster: str, *, older_than_s: float = 6 * 3600,
                       dry_run: bool = False) -> list[str]:
    """Remove leftovers of interrupted backups. A backup still running (in-progress marker younger
    than `older_than_s`) is left alone. (A cluster without anything yet has nothing to clean: the
    preflight of its first backup calls this; the CLI checks the name.)"""
    repo.identity()
    removed = []
    now = utcnow()
    for inc in find_incomplete(repo, cluster):
        if inc["started_at"]:
            age = (now - dt.datetime.fromisoformat(inc["started_at"])).total_seconds()
            if age < older_than_s:
                log.info("incomplete backup %s started %.0f s ago: maybe still running, left alone",
                         inc["backup_id"], age)
                continue
        log.warning("%s leftovers of interrupted backup %s (%d objects)", "would remove" if dry_run else "removing",
                    inc["backup_id"], len(inc["objects"]))
        if not dry_run:
            # the marker goes last so a crash midway leaves it findable
            for key in sorted(inc["objects"], key=lambda k: k.endswith(INPROGRESS_NAME)):
                repo.delete(key)
        removed.append(inc["backup_id"])
    return removed


def cleanup_abandoned_writes(repo: Repository, cluster: str, *, older_than_s: float = 6 * 3600,
                             dry_run: bool = False) -> list[dict]:
    """Remove writes a killed process never finished below the cluster's prefix: local temp files
    ('.base.tar.zst.tmp-*', invisible to listings), S3 multipart uploads (whose parts are stored
    and billed until aborted). Only those untouched for `older_than_s` (local: last write; S3:
    initiation, so keep it above the longest backup)."""
    validate_cluster(cluster)
    items = repo.abandoned_writes(cluster, older_than_s)
    for it in items:
        log.warning("%s unfinished %s of %s (%s, %.1f h old)", "would remove" if dry_run else "removing", it["kind"],
                    it["key"], f"{it['bytes']} bytes" if it.get("bytes") is not None else "size unknown",
                    it["age_s"] / 3600)
        if not dry_run:
            repo.discard_write(it)
    return items


def new_backup_id(repo: Repository, cluster: str, kind: str, now: dt.datetime | None = None) -> str:
    """Sortable id not used yet: 20261121T124048Z-F (F full, I incremental, D differential, S synthetic full). Only
    a proposal: `claim_backup_id` makes it the caller's."""
    return _candidate_ids(repo, cluster, kind, now or utcnow())[0]


def _candidate_ids(repo: Repository, cluster: str, kind: str, now: dt.datetime, n: int = 1) -> list[str]:
    suffix = {"full": "F", "incremental": "I", "differential": "D", "synthetic": "S"}[kind]
    base = now.strftime("%Y%m%dT%H%M%SZ")
    existing = set(list_backup_ids(repo, cluster))
    out, i = [], 1
    while len(out) < n:
        bid = f"{base}-{suffix}" if i == 1 else f"{base}.{i:03d}-{suffix}"
        if bid not in existing:
            out.append(validate_backup_id(bid))
        i += 1
    return out


def claim_backup_id(repo: Repository, cluster: str, kind: str, marker: dict, now: dt.datetime | None = None,
                    attempts: int = 50) -> str:
    """Choose a backup id and make it ours: its in-progress marker is created only if absent
    (local: link(); S3: conditional PUT), so two backups started at the same moment, on one
    worker or on two, never share an id. `marker` is stored (with the id) as in_progress.json."""
    from .errors import ObjectExists, PgIncrError

    now = now or utcnow()
    for bid in _candidate_ids(repo, cluster, kind, now, attempts):
        prefix = backup_prefix(cluster, bid)
        try:
            repo.put_bytes(f"{prefix}/{INPROGRESS_NAME}", json.dumps({**marker, "backup_id": bid}).encode(),
                           overwrite=False)
        except ObjectExists:
            continue  # another backup claimed it first
        if repo.exists(f"{prefix}/{META_NAME}"):  # finished (its marker gone) between listing and claim
            repo.delete(f"{prefix}/{INPROGRESS_NAME}")
            continue
        return bid
    raise PgIncrError(f"could not claim a backup id for cluster {cluster} in {repo.url} after {attempts} attempts: "
                      "are many backups of this cluster starting at the same second? Retry later")
