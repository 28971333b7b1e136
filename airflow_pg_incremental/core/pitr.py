"""Point-in-time recovery: restore a base backup, replay archived WAL to a target, report.

Targets: time (with time zone), LSN, transaction id, named restore point, 'latest' (end of the
archive) or 'immediate' (the backup's consistency point). Everything is validated, and the backup,
the window and WAL continuity are checked, before the target directory is touched.

The restored server gets restore_command = walcmd fetch (no secret in any file: S3 credentials
reach it through the server process's environment only), archive_mode=off unless explicitly
allowed, a private unix socket and pg_hba. Recovery is followed until the target is reached
(promoted / paused / shut down); the report gives the LSN, time and transaction where it stopped.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .binaries import find_program
from .errors import ConfigError, ObjectNotFound, PgIncrError, RestoreError, ServerError, TargetBeyondArchive
from .lsn import format_lsn, parse_lsn, segment_name, segno_of
from .metadata import list_backups, load_backup, refuse_damaged_newer, require_cluster
from .names import _check, validate_cluster
from .repository import LocalRepository, Repository, S3Repository
from .durable import make_durable
from .tablespaces import plan_tablespaces
from .restore import Footprint, Timings, check_target_dir, restore_backup, scratch_settings
from .server import PgServer, chown_tree, python_usable_by, repository_readable_by
from .wal import (
    WalGap,
    continuity,
    fetch_bytes,
    list_segments,
    load_restore_point,
    on_timeline_path,
    read_history,
    timeline_path,
    wal_command,
)

log = logging.getLogger(__name__)

TARGET_KINDS = ("time", "lsn", "xid", "name", "latest", "immediate")
ACTIONS = ("promote", "pause", "shutdown")


@dataclass
class RecoveryTarget:
    kind: str
    value: str | None = None
    inclusive: bool = True
    action: str = "promote"
    timeline: str = "latest"

    def to_dict(self) -> dict:
        return asdict(self)


def parse_time(value: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(str(value).strip().replace(" UTC", "+00:00"))
    except ValueError:
        raise ConfigError(f"target time {value!r} does not parse; write ISO 8601 with a time zone, e.g. "
                          "2026-11-21T13:05:00+00:00") from None
    if t.tzinfo is None:
        raise ConfigError(f"target time {value!r} has no time zone; add one (e.g. +00:00 or Z): a time without a "
                          "zone is ambiguous")
    return t


XID_LIMIT = 1 << 32


def parse_xid(value) -> int:
    """A recovery target xid: the 32-bit transaction id PostgreSQL's recovery_target_xid takes
    (3 <= xid < 2^32; 0-2 are reserved), or EPOCH:XID (the epoch is dropped: recovery compares the
    32-bit id). A larger number is refused, not truncated as PostgreSQL would do silently."""
    text = str(value).strip()
    epoch, sep, xid = text.rpartition(":")
    if not xid.isdigit() or (sep and not epoch.isdigit()):
        raise ConfigError(f"transaction id {value!r} is not a valid xid: write a 32-bit transaction id (an integer "
                          ">= 3, e.g. from pg_current_xact_id() % 4294967296) or EPOCH:XID")
    n = int(xid)
    if n >= XID_LIMIT:
        raise ConfigError(f"transaction id {n} does not fit in 32 bits: PostgreSQL would silently truncate it to "
                          f"{n % XID_LIMIT}. A 64-bit id from pg_current_xact_id() / txid_current() is epoch * 2^32 + "
                          f"xid: give the 32-bit part, {n % XID_LIMIT} (= {n} % 4294967296), or write it as "
                          f"{n >> 32}:{n % XID_LIMIT}")
    if n < 3:
        raise ConfigError(f"transaction id {value!r} is not a valid xid: 0, 1 and 2 are reserved; a transaction id "
                          "is >= 3")
    return n


def parse_target(kind: str, value=None, *, inclusive: bool = True, action: str = "promote",
                 timeline: str = "latest") -> RecoveryTarget:
    if kind not in TARGET_KINDS:
        raise ConfigError(f"unknown target type {kind!r}; one of {', '.join(TARGET_KINDS)}")
    if action not in ACTIONS:
        raise ConfigError(f"unknown action at target {action!r}; one of {', '.join(ACTIONS)}")
    if timeline != "latest" and timeline != "current" and not str(timeline).isdigit():
        raise ConfigError(f"recovery timeline {timeline!r}: use 'latest', 'current' or a timeline number")
    if kind == "time":
        value = parse_time(value).isoformat()
    elif kind == "lsn":
        value = format_lsn(parse_lsn(value))
    elif kind == "xid":
        value = str(parse_xid(value))
    elif kind == "name":
        _check("restore point name", value)
    else:
        value = None
    return RecoveryTarget(kind, value, bool(inclusive), action, str(timeline))


def recovery_timelines(repo: Repository, cluster: str, target: RecoveryTarget) -> dict[int, int | None] | None:
    """The timelines recovery to `target` follows (see wal.timeline_path); None for 'current'."""
    if target.timeline == "current":
        return None
    try:
        return timeline_path(repo, cluster, target.timeline)
    except ObjectNotFound as e:
        raise RestoreError(f"{e}: recovery cannot follow that timeline. Archive the history file (capture stores "
                           "it; archive_command pushes it after a promotion) or choose target timeline 'current'")


def _describe_path(path: dict[int, int | None]) -> str:
    parts = [f"timeline {t} up to {format_lsn(e)}" if e is not None else f"timeline {t}" for t, e in sorted(path.items())]
    return ", then ".join(parts)


def choose_backup(repo: Repository, cluster: str, target: RecoveryTarget, backup_id: str | None = None) -> dict:
    """The newest backup whose stop point lies before the target and on the timeline path recovery
    follows (or the given one, checked)."""
    require_cluster(repo, cluster)
    backups = list_backups(repo, cluster)
    if not backups:
        raise RestoreError(f"cluster {cluster!r} has no complete backup in {repo.url}")
    path = recovery_timelines(repo, cluster, target)
    latest = target.timeline == "latest"
    if backup_id and backup_id != "latest":
        meta = load_backup(repo, cluster, backup_id)
        if not on_timeline_path(meta, path, latest=latest):
            raise RestoreError(
                f"backup {backup_id} (timeline {meta.get('timeline') or 1}, ends at LSN {meta.get('stop_lsn')}) is not "
                f"on the history of the timeline recovery follows ({_describe_path(path)}): it belongs to an "
                "abandoned branch. Omit the backup id to let the restore choose, or set the target timeline to "
                f"{meta.get('timeline') or 1}")
        if not _before(meta, target, repo, cluster):
            raise RestoreError(f"backup {backup_id} ends ({meta.get('finished_at')}, LSN {meta.get('stop_lsn')}) after "
                               f"the target {target.kind} {target.value}: choose an older backup or omit the backup id")
        return meta
    usable = [b for b in backups if on_timeline_path(b, path, latest=latest)]
    if not usable:
        raise RestoreError(f"no backup of {cluster!r} lies on the history of the timeline recovery follows "
                           f"({_describe_path(path)}); the newest backup, {backups[-1]['backup_id']}, is on timeline "
                           f"{backups[-1].get('timeline') or 1}. Take a new full backup, or set the target timeline")
    skipped = [b["backup_id"] for b in backups if b not in usable]
    if skipped:
        log.info("backups on an abandoned timeline branch, not usable for this target: %s", ", ".join(skipped))
    if target.kind in ("latest", "immediate"):
        return refuse_damaged_newer(repo, cluster, usable[-1], what=f"target {target.kind}")
    fits = [b for b in usable if _before(b, target, repo, cluster)]
    if not fits:
        oldest = usable[0]
        raise RestoreError(
            f"target {target.kind} {target.value} lies before the oldest backup's end "
            f"({oldest['backup_id']}: {oldest.get('finished_at')}, LSN {oldest.get('stop_lsn')})"
            f"{' among those on the timeline path' if skipped else ''}; the recoverable "
            f"window starts there")
    return refuse_damaged_newer(repo, cluster, fits[-1], what=f"target {target.kind} {target.value}",
                                until=target.value if target.kind == "time" else None)


def _before(meta: dict, target: RecoveryTarget, repo: Repository, cluster: str) -> bool:
    if target.kind == "time":
        return dt.datetime.fromisoformat(meta["finished_at"]) <= parse_time(target.value)
    if target.kind == "lsn":
        return parse_lsn(meta["stop_lsn"]) <= parse_lsn(target.value)
    if target.kind == "name":
        rp = load_restore_point(repo, cluster, target.value)
        return parse_lsn(meta["stop_lsn"]) <= parse_lsn(rp["lsn"])
    if target.kind == "xid":
        nx = meta.get("next_xid")
        return nx is not None and int(nx) <= int(target.value)
    return True


def _archive_from(meta: dict) -> tuple[int, int]:
    """(segment size, the LSN the archive is needed from) for this backup: a backup taken with
    -X fetch carries its own WAL from start to stop, so from its stop on (else from its start)."""
    seg = meta.get("wal_segment_size") or 16 * 1024 * 1024
    return seg, parse_lsn(meta["stop_lsn"] if meta.get("wal_included", True) else meta["start_lsn"])


def archive_window(repo: Repository, cluster: str, meta: dict, *, read_end: bool = True) -> dict:
    """What this backup can reach: continuous WAL from its start segment on, with the time of the
    last commit in the archive (read with pg_waldump) when it can be determined. Without
    `read_end`, that last read is left to the caller (read_archive_end)."""
    seg, start = _archive_from(meta)
    tli = meta.get("timeline") or 1
    segs = list_segments(repo, cluster)
    newest_tli = max(segs) if segs else tli
    cont = continuity(repo, cluster, from_lsn=start, timeline=tli, segment_size=seg)
    # follow the timeline history (failover, earlier PITR): recovery_target_timeline='latest' goes
    # from the backup's timeline to the newest one through each switch point
    path = [tli]
    if newest_tli > tli and cont["end_lsn"]:
        try:
            history = read_history(repo, cluster, newest_tli)
        except Exception:
            history = []
        cur, cur_end = tli, parse_lsn(cont["end_lsn"])
        for parent, switch in history:
            if parent != cur or switch < start:
                continue
            if cur_end < (switch // seg) * seg:  # the parent timeline's WAL does not reach the switch
                break
            nxt = next((t for t, _ in history if t > cur), newest_tli)
            c2 = continuity(repo, cluster, from_lsn=switch, timeline=nxt, segment_size=seg)
            if not c2["end_lsn"]:
                break
            cont, cur, cur_end = c2, nxt, parse_lsn(c2["end_lsn"])
            path.append(nxt)
    end_tli = path[-1]
    win = {"backup_id": meta["backup_id"], "start_lsn": meta["stop_lsn"], "start_time": meta.get("finished_at"),
           "end_lsn": cont["end_lsn"], "end_segment": cont["end_segment"], "end_time": None,
           "last_record_lsn": None, "end_time_none": False, "gap_after": None,
           "timeline": tli, "timelines": path, "newest_timeline": newest_tli}
    if cont["end_segment"]:
        nxt = segment_name(end_tli, segno_of(cont["end_segment"], seg) + 1, seg)
        later = [n for n in segs.get(end_tli, []) if n > nxt]
        if later:
            win["gap_after"] = nxt  # missing, while newer segments exist
        if read_end:
            win.update(archive_end(repo, cluster, meta["pg_major"], cont["end_segment"], seg, start // seg))
    elif segs.get(tli):
        win["gap_after"] = segment_name(tli, start // seg, seg)
    return win


# pg_waldump's description of the records a time target can stop at (recoveryStopsBefore looks at
# these four only): "COMMIT <time> <zone>[; subxacts: ...][; inval msgs: ...][; rels: ...][; origin: ...]",
# "COMMIT_PREPARED <xid>: <time> <zone>[; ...]", and the same for ABORT / ABORT_PREPARED (PREPARE is not one)
# a record's line up to its description (anchored: a PREPARE's gid may hold any text)
_RECORD = (r"^rmgr: {rmgr} +len \(rec/tot\): +\d+/ *\d+, tx: +\d+, lsn: ([0-9A-F]+/[0-9A-F]+), "
           r"prev [0-9A-F]+/[0-9A-F]+, desc: ")
_XACT_END_RE = re.compile(_RECORD.format(rmgr="Transaction") + r"(?:COMMIT|ABORT)(?:_PREPARED \d+:)? "
                          r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) ([^\s;]+)", re.M)
_RECORD_LSN_RE = re.compile(_RECORD.format(rmgr=r"\S+"), re.M)
_UTC_ZONES = ("UTC", "GMT", "UCT", "Z", "+00", "+0000", "+00:00")
WALDUMP_SEGMENTS = 4  # how far back from the archive's end to look for the last transaction end


def parse_waldump(text: str) -> dict:
    """From pg_waldump's output: the start LSN of the last complete record, and the latest time
    of a transaction end (commit/abort, prepared or not), ISO 8601 in UTC. pg_waldump runs with
    TZ=UTC, so times print in UTC; a time in any other zone is not guessed at (None)."""
    last = None
    tail = text.rfind("\nrmgr: ") + 1
    m = _RECORD_LSN_RE.search(text, tail)
    if m:
        last = m.group(1)
    times = []
    for _, ts, zone in _XACT_END_RE.findall(text):
        if zone not in _UTC_ZONES:
            log.warning("pg_waldump printed a transaction end time in zone %r, not UTC: the archive's last commit "
                        "time is not known", zone)
            return {"last_record_lsn": last, "end_time": None}
        times.append(dt.datetime.fromisoformat(ts).replace(tzinfo=dt.timezone.utc))
    return {"last_record_lsn": last, "end_time": max(times).isoformat() if times else None}


def _waldump(waldump: str, directory: str, first: str, last: str) -> str:
    from .server import server_environment

    r = subprocess.run([waldump, "-p", directory, first, last], capture_output=True, text=True,
                       env=server_environment({"TZ": "UTC", "LC_ALL": "C"}))
    return r.stdout  # exit 1 at the end of valid WAL ("invalid record length") is its normal end here


def read_archive_end(repo: Repository, cluster: str, meta: dict, win: dict):
    """Start reading the archive's end (archive_end: a few segments through pg_waldump) for
    `win`, made by archive_window(..., read_end=False) for `meta`, beside whatever the caller does
    next; the returned function waits for it and puts it into `win`."""
    if not win["end_segment"]:
        return lambda: None
    import threading

    seg, start = _archive_from(meta)
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(archive_end(repo, cluster, meta["pg_major"], win["end_segment"],
                                                               seg, start // seg)),
                         name="pgincr-archive-end", daemon=True)
    t.start()

    def done() -> None:
        t.join()
        win.update(out)
    return done


def archive_end(repo: Repository, cluster: str, major: int, last_segment: str, seg: int,
                first_segno: int = 0) -> dict:
    """The last point recovery can reach in the archive ending with `last_segment`: the start LSN
    of its last complete record (`last_record_lsn`) and the time of the last transaction end
    (`end_time`), read with pg_waldump from the last segments (at most WALDUMP_SEGMENTS, not
    before `first_segno`). `end_time_none` says no transaction ended in the whole range read from
    `first_segno` on. Unknown values are None (pg_waldump missing, a segment unreadable)."""
    out = {"last_record_lsn": None, "end_time": None, "end_time_none": False}
    try:
        waldump = find_program("pg_waldump", major)
    except Exception as e:
        log.warning("cannot read the end of the WAL archive: %s", e)
        return out
    segno, tli = segno_of(last_segment, seg), int(last_segment[:8], 16)
    with tempfile.TemporaryDirectory(prefix="pgincr-waldump-") as d:
        for s in range(segno, max(segno - WALDUMP_SEGMENTS, first_segno - 1), -1):
            name = segment_name(tli, s, seg)
            try:
                (Path(d) / name).write_bytes(fetch_bytes(repo, cluster, name, seg))
            except Exception as e:  # the end stays unknown: the window check says so
                log.warning("cannot read WAL segment %s to find the end of the archive: %s", name, e)
                return out
            # this segment and the next: a record crossing into the next one is read whole
            found = parse_waldump(_waldump(waldump, d, name, segment_name(tli, min(s + 1, segno), seg)))
            if found["last_record_lsn"] is None:  # nothing readable: no conclusion from here on
                return out
            out["last_record_lsn"] = out["last_record_lsn"] or found["last_record_lsn"]
            if found["end_time"]:
                out["end_time"] = found["end_time"]
                return out
        out["end_time_none"] = s <= first_segno  # read back to the window's start: no transaction ended
    return out


def describe_window(win: dict) -> str:
    """'recoverable window: from <time> (LSN, oldest backup) to <time> (LSN)': the whole window when
    known (from the oldest usable backup's end), else the chosen backup's."""
    if win.get("window_start_backup"):
        start = (f"from {win['window_start_time']} (LSN {win['window_start_lsn']}, the end of the oldest backup "
                 f"{win['window_start_backup']})")
    else:
        start = f"with backup {win['backup_id']}: from {win['start_time']} (LSN {win['start_lsn']})"
    return (f"recoverable window {start} to {win['end_time'] or 'the end of the archive'} (LSN "
            f"{win['last_record_lsn'] or win['end_lsn']})")


def whole_window(repo: Repository, cluster: str, target: RecoveryTarget, win: dict) -> dict:
    """`win` (one backup's reach) with the start of the whole recoverable window: the end of the
    oldest backup on the timeline path recovery follows (what a user may ask for, whichever backup
    serves it)."""
    path = recovery_timelines(repo, cluster, target)
    usable = [b for b in list_backups(repo, cluster) if on_timeline_path(b, path, latest=target.timeline == "latest")]
    if usable:
        first = usable[0]
        win.update(window_start_backup=first["backup_id"], window_start_time=first.get("finished_at"),
                   window_start_lsn=first.get("stop_lsn"))
    return win


def wal_needed(meta: dict, win: dict, target: RecoveryTarget, repo: Repository, cluster: str) -> tuple[str, str]:
    """(last segment the target needs, how sure): the target's own segment for an LSN or a restore
    point, the backup's end for 'immediate', the archive's end for 'latest'; for a time or a
    transaction id the first commit after it decides, so at most the archive's end."""
    seg = int(meta.get("wal_segment_size") or 16 * 1024 * 1024)
    tli = (win.get("timelines") or [meta.get("timeline") or 1])[-1]
    if target.kind == "immediate":
        return meta.get("stop_wal_file"), "exact"
    if target.kind == "lsn":
        return segment_name(tli, parse_lsn(target.value) // seg, seg), "exact"
    if target.kind == "name":
        rp = load_restore_point(repo, cluster, target.value)
        return segment_name(int(rp.get("timeline") or tli), parse_lsn(rp["lsn"]) // seg, seg), "exact"
    if target.kind == "latest":
        return win["end_segment"], "exact"
    return win["end_segment"], "at most"


def check_window(target: RecoveryTarget, win: dict) -> None:
    """Refuse, before anything is touched, a target recovery cannot reach with this backup and the
    archived WAL (TargetBeyondArchive when it lies beyond the archive's end)."""
    where = describe_window(win)
    if win["end_lsn"] is None and target.kind != "immediate":
        raise WalGap(f"the archive has no WAL after backup {win['backup_id']}'s end (first missing segment "
                     f"{win['gap_after']}): only its own end point (target 'immediate') is restorable. {where}")
    if target.kind == "lsn":
        _check_lsn_reachable(target, win, where)
    if target.kind == "time":
        _check_time_reachable(target, win, where)
    if target.kind == "latest" and win["gap_after"]:
        raise WalGap(f"segment {win['gap_after']} is missing from the archive while newer WAL exists: 'latest' "
                     f"would silently stop at LSN {win['end_lsn']}. Restore to an explicit target at or before "
                     f"that LSN, or repair the archive. ({where})")


def _last_reachable(win: dict) -> str:
    gap = f"; segment {win['gap_after']} is missing from the archive" if win["gap_after"] else ""
    at = [f"LSN {win['last_record_lsn']} (the last archived record)"] if win["last_record_lsn"] else []
    if win["end_time"]:
        at.append(f"a time before {win['end_time']} (the last archived commit or abort; that time itself with "
                  "an exclusive target)")
    point = " or ".join(at) or f"an LSN before {win['end_lsn']}"
    return (f"{gap}. The last reachable point is {point}; to restore everything archived, use target 'latest' "
            "(--target latest)")


def _check_lsn_reachable(target: RecoveryTarget, win: dict, where: str) -> None:
    # recovery stops at an LSN target on reading a record that starts at or after it
    want = parse_lsn(target.value)
    last = win["last_record_lsn"]
    if (want > parse_lsn(last)) if last else (want >= parse_lsn(win["end_lsn"])):
        raise TargetBeyondArchive(f"target LSN {target.value} lies outside the {where}: recovery stops there only "
                                  f"on reading a record that starts at or after it{_last_reachable(win)}")


def _check_time_reachable(target: RecoveryTarget, win: dict, where: str) -> None:
    # recovery stops at a time target on reading a commit/abort later than it (inclusive), or at
    # least as late (exclusive): the archive's last one bounds what is reachable
    if win["end_time"] is None:
        if win["end_time_none"]:
            raise TargetBeyondArchive(f"target time {target.value} lies outside the {where}: no transaction "
                                      f"committed or aborted in the archived WAL after the backup, and recovery "
                                      f"stops at a time only on reading one{_last_reachable(win)}")
        log.warning("the time of the archive's last commit is unknown: target time %s cannot be checked against the "
                    "end of the archive", target.value)
        return
    want, end = parse_time(target.value), parse_time(win["end_time"])
    if want > end or (target.inclusive and want == end):
        raise TargetBeyondArchive(f"target time {target.value} lies outside the {where}: recovery stops there only "
                                  f"on reading a commit or abort {'later than' if target.inclusive else 'at or after'} "
                                  f"it{_last_reachable(win)}")


def restore_command(repo: Repository, cluster: str) -> str:
    return wal_command("fetch", repo.url, cluster)


# how our S3 client reaches the endpoint (certificates, proxies, retries): the restore_command needs
# the same, and the server it runs under gets none of our environment otherwise
S3_REACH_ENV = ("AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR", "HTTPS_PROXY", "https_proxy",
                "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "PGINCR_S3_MAX_ATTEMPTS")


def repo_env(repo: Repository) -> dict:
    """Environment the restore_command needs to reach the repository (S3 credentials, the key of
    an encrypted repository); passed to the server process only, never written to a file."""
    keys = repo.keyring.env() if repo.keyring is not None else {}
    if not isinstance(repo, S3Repository):
        return keys
    return {**_s3_env(repo), **keys}


def _s3_env(repo: S3Repository) -> dict:
    client = repo.client
    env = {k: v for k, v in os.environ.items() if k in S3_REACH_ENV}  # the server's environment is clean
    env.update({"PGINCR_S3_ENDPOINT_URL": client.meta.endpoint_url or "", "AWS_DEFAULT_REGION": client.meta.region_name
                or "us-east-1"})
    creds = client._request_signer._credentials
    if creds is not None:
        fc = creds.get_frozen_credentials()
        env.update({"AWS_ACCESS_KEY_ID": fc.access_key, "AWS_SECRET_ACCESS_KEY": fc.secret_key})
        if fc.token:
            env["AWS_SESSION_TOKEN"] = fc.token
    return env


def configure_recovery(target_dir: Path, repo: Repository, cluster: str, target: RecoveryTarget, *,
                       allow_archive: bool = False, os_user: str | None = None) -> None:
    lines = ["", "# --- added by pgincr restore (point-in-time recovery) ---",
             f"restore_command = '{restore_command(repo, cluster)}'",
             f"recovery_target_timeline = '{target.timeline}'"]
    if not allow_archive:
        lines.append("archive_mode = 'off'")
    if target.kind != "latest":
        setting = {"time": "recovery_target_time", "lsn": "recovery_target_lsn", "xid": "recovery_target_xid",
                   "name": "recovery_target_name", "immediate": "recovery_target"}[target.kind]
        value = "immediate" if target.kind == "immediate" else target.value
        lines.append(f"{setting} = '{value}'")
        if target.kind in ("time", "lsn", "xid"):
            lines.append(f"recovery_target_inclusive = {'on' if target.inclusive else 'off'}")
        lines.append(f"recovery_target_action = '{target.action}'")
    with open(target_dir / "postgresql.auto.conf", "a") as f:
        f.write("\n".join(lines) + "\n")
    (target_dir / "recovery.signal").touch()
    (target_dir / "standby.signal").unlink(missing_ok=True)
    chown_tree(target_dir / "postgresql.auto.conf", os_user)
    chown_tree(target_dir / "recovery.signal", os_user)


# "recovery stopping before|after commit of transaction ..., time ...", "... after WAL location (LSN)
# ...", "... after reaching consistency", "recovery stopping at restore point "name", time ..."
_STOP_RE = re.compile(r"recovery stopping (before|after|at) (.*)")


def restore_pitr(repo: Repository, cluster: str, target: RecoveryTarget, target_dir: str | os.PathLike, *,
                 backup_id: str | None = None, os_user: str | None = None, port: int | None = None,
                 verify: bool = True, keep_running: bool = False, checks: list[str] | None = None,
                 timeout_s: float = 3600, allow_archive: bool = False, progress_interval: float = 10.0,
                 keep_failed: bool = False, tablespace_map: dict | None = None,
                 tablespaces_in_place: bool = False) -> dict:
    """Restore `cluster` to `target` in `target_dir` (tablespaces: see restore_backup); returns the report (and the running server
    under key 'server' when keep_running, for the caller to stop). A failure after the checks
    stops the server and removes everything the restore wrote (the target's contents, or the
    target it created, and the log, pg_hba and socket beside it); the error keeps the server log's
    relevant lines. `keep_failed` keeps it all for debugging (the error says where)."""
    validate_cluster(cluster)
    t0 = time.monotonic()
    timings = Timings()
    with timings.step("plan"):
        meta = choose_backup(repo, cluster, target, backup_id)
        target_path = check_target_dir(target_dir)
        # the archive's last commit time and record serve the checks of time, xid and LSN targets;
        # for the others they only go into the report: read beside the restore
        early = target.kind not in ("latest", "immediate")
        win = whole_window(repo, cluster, target, archive_window(repo, cluster, meta, read_end=early))
        check_window(target, win)
        plan_tablespaces(meta, tablespace_map, tablespaces_in_place, target_path)  # refused before anything
        python_usable_by(os_user)
        if isinstance(repo, LocalRepository):
            repository_readable_by(repo.root, os_user)
    log.info("point-in-time restore of %s to %s %s (action %s) from backup %s; WAL available up to %s",
             cluster, target.kind, target.value or "", target.action, meta["backup_id"], win["end_lsn"])
    written = Footprint(target_path)
    srv = None
    end_read = read_archive_end(repo, cluster, meta, win) if not early else (lambda: None)
    try:
        res = restore_backup(repo, cluster, meta["backup_id"], target_path, verify=verify, os_user=os_user,
                             progress_interval=progress_interval, keep_failed=keep_failed,
                             tablespace_map=tablespace_map, tablespaces_in_place=tablespaces_in_place)
        written.add_tablespaces(res)
        timings.add(res["timings"])
        configure_recovery(target_path, repo, cluster, target, allow_archive=allow_archive, os_user=os_user)
        srv = PgServer(target_path, major=meta["pg_major"], port=port, os_user=os_user, listen="")
        settings = scratch_settings(target_path, meta["pg_major"], os_user)
        if allow_archive:
            settings.pop("archive_mode")
        with timings.step("replay"):  # server start until the target is reached
            report = _run_recovery(srv, settings, target, repo_env(repo), timeout_s)
    except BaseException as e:
        _after_failure(e, srv, written, keep_failed)
        raise
    end_read()
    report.update({"cluster": cluster, "backup_id": meta["backup_id"], "chain": res.get("chain"),
                   "target": target.to_dict(),
                   "target_dir": str(target_path), "window": win, "pg_major": meta["pg_major"],
                   "base_restore_seconds": res["restore_seconds"]})
    if checks and report.get("server_running"):
        from .restore import run_checks

        with timings.step("checks"):
            report["checks"] = run_checks(srv, checks, user=meta.get("bootstrap_superuser") or "postgres")
    if keep_running and report.get("server_running"):
        report["server"] = srv
    else:
        srv.stop()
        report["server_running"] = False
        # the private pg_hba and socket directory served the recovery only; its log stays beside it
        for p in written.siblings:
            if p != srv.log_file and p.exists():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        with timings.step("sync"):  # what recovery wrote, whatever the copied configuration says of fsync
            make_durable(target_path)
    report["restore_seconds"] = round(time.monotonic() - t0, 3)
    report["timings"] = timings.as_dict()
    report["server_log"] = str(srv.log_file)
    log.info("restore of %s reached %s (%s) in %.1f s (%s)", cluster, report.get("reached_lsn"),
             report.get("stopped_at") or "end of archive", report["restore_seconds"],
             ", ".join(f"{k} {v:.1f} s" for k, v in report["timings"].items()))
    return report


def _after_failure(e: BaseException, srv: PgServer | None, written: Footprint, keep_failed: bool) -> None:
    """Stop the server, then remove what the restore wrote (or keep it, saying where); the error
    message gets the server log's relevant lines first (the log itself goes)."""
    if srv is not None:
        srv.stop("immediate")
    msg = str(e)
    logtext = srv.log_file.read_text(errors="replace") if srv is not None and srv.log_file.exists() else ""
    excerpt = _fatal_lines(logtext)
    if excerpt and excerpt.splitlines()[0] not in msg:  # the log's lines are not in the error yet
        msg += "\nserver log:\n" + excerpt
    if keep_failed:
        msg += f"\nkept for debugging (remove before retrying): {written.describe()}"
    else:
        written.discard()
        msg += ("\nthe restore removed everything it wrote; keep_failed (--keep-failed) keeps it for debugging")
    if isinstance(e, PgIncrError):
        e.args = (msg,)
    else:
        log.error("restore failed: %s", msg)


def _run_recovery(srv: PgServer, settings: dict, target: RecoveryTarget, env: dict, timeout_s: float) -> dict:
    from .pgconn import query_one

    try:
        srv.start(settings, env=env, wait=target.action != "shutdown")
    except ServerError as e:  # recovery failed while pg_ctl waited: say why, cause first
        cause = _fatal_lines(srv.log_file.read_text(errors="replace") if srv.log_file.exists() else "")
        if "FATAL:" in cause.split("\n", 1)[0] or "PANIC:" in cause.split("\n", 1)[0]:
            raise RestoreError("recovery failed: " + cause) from e
        raise
    deadline = time.monotonic() + timeout_s
    conn = srv.local_conninfo()
    state = None
    seen_running = False  # pg_ctl start -W returns before postmaster.pid exists
    from . import procs

    while time.monotonic() < deadline:
        procs.check_running()  # killed (on_kill from another thread): stop waiting
        alive = procs.postmaster_running(srv.data_dir)  # a postmaster killed -9 leaves its pid file
        logtext = srv.log_file.read_text(errors="replace") if srv.log_file.exists() else ""
        if "FATAL" in logtext and ("recovery ended before configured recovery target was reached" in logtext
                                   or "could not locate" in logtext or "database system is shut down" in logtext
                                   and target.action != "shutdown"):
            raise RestoreError("recovery failed: " + _fatal_lines(logtext))
        if seen_running and not alive and target.action != "shutdown":
            cause = _fatal_lines(logtext) if ("FATAL" in logtext or "PANIC" in logtext) else \
                f"the server stopped during recovery without saying why; its log ends:\n{srv.log_tail(10)}"
            raise RestoreError("recovery failed: " + cause)
        seen_running = seen_running or alive
        if target.action == "shutdown":
            shut = "database system is shut down" in logtext and "recovery stopping" in logtext
            if not alive and (seen_running or shut):
                if not shut and "FATAL" in logtext:
                    raise RestoreError("recovery failed: " + _fatal_lines(logtext))
                state = "shut down at target"
                break
        else:
            try:
                rec, paused, lsn, ts = query_one(conn, """SELECT pg_is_in_recovery(),
                    CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() ELSE 'not paused' END,
                    pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp()::text""")
                if not rec:
                    state = "promoted"
                    break
                if target.action == "pause" and paused == "paused" and target.kind not in ("latest",):
                    state = "paused at target"
                    break
            except Exception:
                if not alive and "FATAL" in logtext:
                    raise RestoreError("recovery failed: " + _fatal_lines(logtext)) from None
        time.sleep(0.2)
    else:
        raise RestoreError(f"recovery did not reach the target within {timeout_s:.0f}s; server log:\n{srv.log_tail()}")
    logtext = srv.log_file.read_text(errors="replace")
    m = _STOP_RE.findall(logtext)
    report = {"state": state, "stopped_at": f"{m[-1][0]} {m[-1][1]}".strip() if m else None,
              "server_running": state != "shut down at target", "port": srv.port,
              "socket_dir": str(srv.socket_dir)}
    if report["server_running"]:
        row = query_one(conn, """SELECT coalesce(pg_last_wal_replay_lsn(), pg_current_wal_lsn())::text,
                                        pg_last_xact_replay_timestamp()::text,
                                        (SELECT timeline_id FROM pg_control_checkpoint())""")
        report.update({"reached_lsn": row[0], "last_replayed_commit_time": row[1], "timeline": row[2]})
    else:
        cd = subprocess.run([find_program("pg_controldata", srv.major), str(srv.data_dir)], capture_output=True,
                            text=True).stdout
        mm = re.search(r"Minimum recovery ending location:\s+(\S+)", cd)
        mm2 = re.search(r"Latest checkpoint's REDO location:\s+(\S+)", cd)
        report["reached_lsn"] = (mm.group(1) if mm and mm.group(1) != "0/0" else mm2.group(1) if mm2 else None)
    return report


# FATAL lines of our own polling connections while the server starts or stops: not the cause
_CONNECTION_NOISE = ("the database system is starting up", "not yet accepting connections",
                     "the database system is shutting down", "the database system is in recovery mode")
_CONTEXT = ("starting point-in-time recovery", "starting archive recovery", "recovery stopping", "restored log file",
            "pgincr wal-fetch", "redo starts", "redo done", "last completed transaction", "consistent recovery state")


def _fatal_lines(logtext: str) -> str:
    """What a failed recovery's log says, cause first: PostgreSQL's FATAL/PANIC lines (with their
    DETAIL/HINT), then the last lines that say how far recovery got."""
    lines = logtext.splitlines()
    cause, follow = [], False
    for ln in lines:
        if ("FATAL:" in ln or "PANIC:" in ln) and not any(n in ln for n in _CONNECTION_NOISE):
            cause.append(ln)
            follow = True
        elif follow and any(k in ln for k in ("DETAIL:", "HINT:", "CONTEXT:")):
            cause.append(ln)
        else:
            follow = False
    context = [ln for ln in lines if any(k in ln for k in _CONTEXT)]
    return "\n".join(cause[-6:] + context[-8:])


def plan_restore(repo: Repository, cluster: str, target: RecoveryTarget, backup_id: str | None = None) -> dict:
    """What a restore to `target` would use, checked (backup, chain, WAL range, window), touching
    nothing: the dry run of the on-demand restore."""
    from .incremental import resolve_chain

    validate_cluster(cluster)
    meta = choose_backup(repo, cluster, target, backup_id)
    chain = resolve_chain(repo, cluster, meta)
    win = whole_window(repo, cluster, target, archive_window(repo, cluster, meta))
    check_window(target, win)
    wal_to, sure = wal_needed(meta, win, target, repo, cluster)
    return {"cluster": cluster, "target": target.to_dict(), "backup_id": meta["backup_id"],
            "chain": [{"backup_id": b["backup_id"], "kind": b["kind"], "stop_lsn": b.get("stop_lsn"),
                       "finished_at": b.get("finished_at"), "stored_bytes": b.get("stored_bytes")} for b in chain],
            "wal_from": meta.get("start_wal_file"), "wal_to": wal_to, "wal_to_is": sure,
            "archive_end_segment": win["end_segment"], "window": win, "window_text": describe_window(win),
            "pg_major": meta["pg_major"]}
