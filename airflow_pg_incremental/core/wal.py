"""The WAL archive: layout, push/fetch of single files, listing, continuity, restore-point index.

    <cluster>/wal/<TTTTTTTT>/<segment>.zst           WAL segments of timeline T, zstd
    <cluster>/wal/<TTTTTTTT>/<segment>.<off>.backup.zst  backup history files
    <cluster>/wal/history/<TTTTTTTT>.history.zst      timeline history files
    <cluster>/restore_points/<name>.json              restore points created through pgincr

Integrity: each object is one zstd frame with its content checksum (checked on every read, along
with the frame being complete and a segment having exactly the segment size). Pushing a file that
is already archived succeeds only when the content is identical; otherwise ObjectExists.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .codec import compress_bytes, decompress_bytes
from .errors import ChecksumMismatch, ConfigError, ObjectExists, ObjectNotFound, PgIncrError
from .lsn import DEFAULT_SEGMENT_SIZE, format_lsn, parse_lsn, segment_name, segno_of, wal_name_kind
from .names import validate_cluster
from .repository import Repository

log = logging.getLogger(__name__)


_PACKAGE = Path(__file__).resolve().parent.parent
WALCMD_PY, WALCMD_SH = str(_PACKAGE / "walcmd.py"), str(_PACKAGE / "walcmd.sh")


def wal_command(verb: str, repo_url: str, cluster: str, extra: str = "") -> str:
    """The archive_command (`push`, ending in %p) or restore_command (`fetch`, ending in %f %p)
    line: walcmd.sh answers the calls a resident helper already served without starting Python,
    and runs the rest of the line (walcmd.py under `python -S`) for everything else."""
    tail = {"push": "%p", "fetch": "%f %p"}[verb]
    # exec: the shell PostgreSQL starts becomes walcmd.sh instead of forking it (one process less a call)
    return (f"exec /bin/sh {WALCMD_SH} {sys.executable} -S {WALCMD_PY} {verb} --repo {repo_url} --cluster "
            f"{cluster}{extra} {tail}")


class WalGap(PgIncrError):
    """WAL needed for a restore or a backup's consistency is missing from the archive."""


def wal_key(cluster: str, name: str) -> str:
    validate_cluster(cluster)
    kind = wal_name_kind(name)
    if kind == "history":
        return f"{cluster}/wal/history/{name}.zst"
    if kind == "partial":
        return f"{cluster}/wal/{name[:8]}/partial/{name}.zst"
    return f"{cluster}/wal/{name[:8]}/{name}.zst"


@dataclass
class PushResult:
    name: str
    status: str            # 'stored' or 'exists' (identical content already archived)
    raw_size: int
    stored_size: int
    raw_sha256: str | None

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def push_bytes(repo: Repository, cluster: str, name: str, data: bytes, *, level: int = 3,
               segment_size: int | None = None, checksum: bool = True) -> PushResult:
    """Store one WAL file. Durable when this returns (local: fsync; S3: PUT acknowledged).
    checksum=False skips the content SHA-256 unless it is needed (an object exists already): the
    stored frame carries its own content checksum, and archive_command needs every millisecond."""
    kind = wal_name_kind(name)
    if kind == "segment" and segment_size and len(data) != segment_size:
        raise ConfigError(f"{name}: {len(data)} bytes, not a whole WAL segment of {segment_size} bytes; refusing to "
                          "archive it")
    key = wal_key(cluster, name)
    sha = hashlib.sha256(data).hexdigest() if checksum else None
    stored = compress_bytes(data, level)
    try:
        repo.put_bytes(key, stored, overwrite=False)
        return PushResult(name, "stored", len(data), len(stored), sha)
    except ObjectExists:
        sha = sha or hashlib.sha256(data).hexdigest()
        existing = fetch_bytes(repo, cluster, name)
        if hashlib.sha256(existing).hexdigest() == sha:
            log.info("%s is archived already with identical content", name)
            return PushResult(name, "exists", len(data), len(stored), sha)
        raise ObjectExists(f"{name} is archived already in {repo.url} with DIFFERENT content (sha256 "
                           f"{hashlib.sha256(existing).hexdigest()[:16]}... vs {sha[:16]}... of the file to push). "
                           "Refusing to overwrite: two servers may be archiving into the same cluster name, or a "
                           "restored copy kept archive_mode on. Investigate before anything else.") from None


def push_file(repo: Repository, cluster: str, path: str, *, name: str | None = None, level: int = 3,
              checksum: bool = True) -> PushResult:
    name = name or os.path.basename(path)
    wal_name_kind(name)
    with open(path, "rb") as f:
        data = f.read()
    seg = len(data) if wal_name_kind(name) == "segment" else None
    return push_bytes(repo, cluster, name, data, level=level, segment_size=seg, checksum=checksum)


def fetch_bytes(repo: Repository, cluster: str, name: str, segment_size: int | None = None) -> bytes:
    key = wal_key(cluster, name)
    data = decompress_bytes(repo.get_bytes(key), key)
    if wal_name_kind(name) == "segment" and segment_size and len(data) != segment_size:
        raise ChecksumMismatch(f"{key}: {len(data)} bytes after decompression, expected a {segment_size}-byte segment")
    return data


def fetch_to(repo: Repository, cluster: str, name: str, dest: str, segment_size: int | None = None) -> int:
    """Fetch into `dest` atomically (temp file + rename). ObjectNotFound when not archived."""
    data = fetch_bytes(repo, cluster, name, segment_size)
    tmp = f"{dest}.pgincr-tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest)
    return len(data)


# ------------------------------------------------------------------------------------------
_SEG_KEY_RE = re.compile(r"/wal/([0-9A-F]{8})/([0-9A-F]{24})\.zst$")


def list_segments(repo: Repository, cluster: str) -> dict[int, list[str]]:
    """Archived WAL segment names per timeline, sorted."""
    out: dict[int, list[str]] = {}
    for key in repo.list(f"{validate_cluster(cluster)}/wal"):
        m = _SEG_KEY_RE.search("/" + key)
        if m:
            out.setdefault(int(m.group(1), 16), []).append(m.group(2))
    for v in out.values():
        v.sort()
    return out


def list_history(repo: Repository, cluster: str) -> list[int]:
    tl = []
    for key in repo.list(f"{validate_cluster(cluster)}/wal/history"):
        base = key.rsplit("/", 1)[-1]
        if base.endswith(".history.zst"):
            tl.append(int(base[:8], 16))
    return sorted(tl)


def read_history(repo: Repository, cluster: str, timeline: int) -> list[tuple[int, int]]:
    """[(parent timeline, switch LSN)] from <timeline>.history."""
    data = fetch_bytes(repo, cluster, f"{timeline:08X}.history").decode()
    out = []
    for line in data.splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.startswith("#"):
            out.append((int(parts[0]), parse_lsn(parts[1])))
    return out


def timeline_path(repo: Repository, cluster: str, timeline: str | int = "latest") -> dict[int, int | None]:
    """The timelines recovery follows, each with the LSN where the path leaves it (None for the
    target timeline itself, open-ended). As in PostgreSQL, 'latest' is the newest timeline whose
    history file is archived (1 when none is). ObjectNotFound when a needed history file is missing."""
    tli = max(list_history(repo, cluster), default=1) if timeline == "latest" else int(timeline)
    path: dict[int, int | None] = {tli: None}
    if tli > 1:
        try:
            history = read_history(repo, cluster, tli)
        except ObjectNotFound:
            raise ObjectNotFound(f"timeline {tli}'s history file {tli:08X}.history is not in the archive of "
                                 f"{cluster!r}") from None
        for parent, switch in history:
            path.setdefault(parent, switch)
    return path


def on_timeline_path(meta: dict, path: dict[int, int | None] | None, *, latest: bool = True) -> bool:
    """Whether recovery from this backup can follow `path`: its timeline is on it and the backup
    ends before the path leaves that timeline (else PostgreSQL stops with 'requested timeline is
    not a child of this server's history': the backup lies on an abandoned branch). With `latest`
    (recovery_target_timeline='latest'), a backup on a timeline newer than every archived history
    file is on its own, newest timeline."""
    if path is None:
        return True
    tli = int(meta.get("timeline") or 1)
    if latest and tli > max(path):
        return True
    if tli not in path:
        return False
    end = path[tli]
    return end is None or parse_lsn(meta["stop_lsn"]) <= end


def continuity(repo: Repository, cluster: str, *, from_lsn: int | None = None, timeline: int | None = None,
               segment_size: int = DEFAULT_SEGMENT_SIZE) -> dict:
    """Gaps and timeline facts of the archive.

    For each timeline: first/last segment, missing segment names between them (and between
    `from_lsn` and the first one on `timeline`), whether its history file is archived.
    `end_lsn`: the end of continuous WAL on the newest timeline starting from `from_lsn`."""
    segs = list_segments(repo, cluster)
    history = set(list_history(repo, cluster))
    report = {"cluster": cluster, "timelines": {}, "gaps": [], "missing_history": [], "end_lsn": None,
              "end_segment": None, "newest_timeline": max(segs) if segs else None}
    for tli, names in sorted(segs.items()):
        nums = [segno_of(n, segment_size) for n in names]
        first, last = nums[0], nums[-1]
        if from_lsn is not None and (timeline is None or tli == timeline):
            first = min(first, from_lsn // segment_size)
        have = set(nums)
        missing = [segment_name(tli, s, segment_size) for s in range(first, last + 1) if s not in have]
        report["timelines"][tli] = {"first": segment_name(tli, first, segment_size), "last": names[-1],
                                    "count": len(names), "missing": missing[:1000], "missing_count": len(missing)}
        for m in missing:
            report["gaps"].append(m)
        if tli > 1 and tli not in history:
            report["missing_history"].append(f"{tli:08X}.history")
    # continuous end from from_lsn on the requested (or newest) timeline
    tli = timeline or report["newest_timeline"]
    if tli in segs and from_lsn is not None:
        have = {segno_of(n, segment_size) for n in segs[tli]}
        s = from_lsn // segment_size
        if s in have:
            while s + 1 in have:
                s += 1
            report["end_segment"] = segment_name(tli, s, segment_size)
            report["end_lsn"] = format_lsn((s + 1) * segment_size)
    report["ok"] = not report["gaps"] and not report["missing_history"]
    return report


def newest_archived(repo: Repository, cluster: str) -> str | None:
    segs = list_segments(repo, cluster)
    if not segs:
        return None
    return segs[max(segs)][-1]


# ------------------------------------------------------------------------------------------
def record_restore_point(repo: Repository, cluster: str, name: str, lsn: str, timeline: int, created_at: str) -> None:
    from .names import _check

    _check("restore point name", name)
    key = f"{cluster}/restore_points/{name}.json"
    body = json.dumps({"name": name, "lsn": lsn, "timeline": timeline, "created_at": created_at}).encode()
    try:
        repo.put_bytes(key, body, overwrite=False)
    except ObjectExists:
        raise ConfigError(f"restore point {name!r} exists already for cluster {cluster}; choose a unique name") from None


def load_restore_point(repo: Repository, cluster: str, name: str) -> dict:
    from .names import _check

    _check("restore point name", name)
    try:
        return json.loads(repo.get_bytes(f"{cluster}/restore_points/{name}.json"))
    except ObjectNotFound:
        known = [k.rsplit("/", 1)[-1][:-5] for k in repo.list(f"{cluster}/restore_points")]
        raise ConfigError(f"unknown restore point {name!r} for cluster {cluster}; known: "
                          f"{', '.join(known[-10:]) or 'none'}") from None
