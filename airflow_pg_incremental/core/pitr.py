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
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .binaries import find_program
from .errors import ConfigError, ObjectNotFound, RestoreError
from .lsn import format_lsn, parse_lsn, segment_name, segno_of
from .metadata import list_backups, load_backup, refuse_damaged_newer, require_cluster
from .names import _check, validate_cluster
from .repository import LocalRepository, Repository, S3Repository
from .restore import SCRATCH_SETTINGS, check_target_dir, restore_backup
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
        if not str(value).strip().isdigit() or int(value) < 3:
            raise ConfigError(f"transaction id {value!r} is not a valid xid (a positive integer >= 3)")
        value = str(int(value))
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


def archive_window(repo: Repository, cluster: str, meta: dict) -> dict:
    """What this backup can reach: continuous WAL from its start segment on, with the time of the
    last commit in the archive (read with pg_waldump) when it can be determined."""
    seg = meta.get("wal_segment_size") or 16 * 1024 * 1024
    # a backup taken with -X fetch carries its own WAL from start to stop: the archive is needed
    # from its stop on (without that WAL, from its start)
    start = parse_lsn(meta["stop_lsn"] if meta.get("wal_included", True) else meta["start_lsn"])
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
           "end_lsn": cont["end_lsn"], "end_segment": cont["end_segment"], "end_time": None, "gap_after": None,
           "timeline": tli, "timelines": path, "newest_timeline": newest_tli}
    if cont["end_segment"]:
        nxt = segment_name(end_tli, segno_of(cont["end_segment"], seg) + 1, seg)
        later = [n for n in segs.get(end_tli, []) if n > nxt]
        if later:
            win["gap_after"] = nxt  # missing, while newer segments exist
        win["end_time"] = _last_commit_time(repo, cluster, meta, cont["end_segment"], seg)
    elif segs.get(tli):
        win["gap_after"] = segment_name(tli, start // seg, seg)
    return win


_COMMIT_RE = re.compile(r"(?:COMMIT|ABORT) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) (\S+)")


def _last_commit_time(repo, cluster, meta, last_segment, seg) -> str | None:
    try:
        waldump = find_program("pg_waldump", meta["pg_major"])
    except Exception:
        return None
    segno = segno_of(last_segment, seg)
    tli = int(last_segment[:8], 16)
    with tempfile.TemporaryDirectory(prefix="pgincr-waldump-") as d:
        for s in range(segno, max(segno - 4, -1), -1):
            name = segment_name(tli, s, seg)
            try:
                (Path(d) / name).write_bytes(fetch_bytes(repo, cluster, name, seg))
            except Exception:
                return None
            r = subprocess.run([waldump, "-p", d, name], capture_output=True, text=True)
            times = _COMMIT_RE.findall(r.stdout)
            if times:
                ts, zone = times[-1]
                t = dt.datetime.fromisoformat(ts)
                if zone in ("UTC", "GMT"):
                    t = t.replace(tzinfo=dt.timezone.utc)
                else:
                    return None  # a server time zone we would have to resolve: do not guess
                return t.isoformat()
    return None


def check_window(target: RecoveryTarget, win: dict) -> None:
    where = (f"recoverable window with backup {win['backup_id']}: from {win['start_time']} (LSN {win['start_lsn']}) "
             f"to {win['end_time'] or 'the end of the archive'} (LSN {win['end_lsn']})")
    if win["end_lsn"] is None and target.kind != "immediate":
        raise WalGap(f"the archive has no WAL after backup {win['backup_id']}'s end (first missing segment "
                     f"{win['gap_after']}): only its own end point (target 'immediate') is restorable. {where}")
    if target.kind == "lsn" and parse_lsn(target.value) > parse_lsn(win["end_lsn"]):
        gap = f"; segment {win['gap_after']} is missing from the archive" if win["gap_after"] else ""
        raise RestoreError(f"target LSN {target.value} lies outside the {where}{gap}")
    if target.kind == "time" and win["end_time"] and parse_time(target.value) > parse_time(win["end_time"]):
        gap = f"; segment {win['gap_after']} is missing from the archive" if win["gap_after"] else ""
        raise RestoreError(f"target time {target.value} lies outside the {where}{gap}")
    if target.kind == "latest" and win["gap_after"]:
        raise WalGap(f"segment {win['gap_after']} is missing from the archive while newer WAL exists: 'latest' "
                     f"would silently stop at LSN {win['end_lsn']}. Restore to an explicit target at or before "
                     f"that LSN, or repair the archive. ({where})")


def restore_command(repo: Repository, cluster: str) -> str:
    import airflow_pg_incremental.walcmd as walcmd

    return (f"{sys.executable} -S {walcmd.__file__} fetch --repo {repo.url} --cluster {cluster} %f %p")


def repo_env(repo: Repository) -> dict:
    """Environment the restore_command needs to reach the repository (S3 credentials); passed to
    the server process only, never written to a file."""
    if not isinstance(repo, S3Repository):
        return {}
    client = repo.client
    env = {"PGINCR_S3_ENDPOINT_URL": client.meta.endpoint_url or "", "AWS_DEFAULT_REGION": client.meta.region_name
           or "us-east-1"}
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


_STOP_RE = re.compile(r"recovery stopping (before|after) (.*)")


def restore_pitr(repo: Repository, cluster: str, target: RecoveryTarget, target_dir: str | os.PathLike, *,
                 backup_id: str | None = None, os_user: str | None = None, port: int | None = None,
                 verify: bool = True, keep_running: bool = False, checks: list[str] | None = None,
                 timeout_s: float = 3600, allow_archive: bool = False, progress_interval: float = 10.0) -> dict:
    """Restore `cluster` to `target` in `target_dir`; returns the report (and the running server
    under key 'server' when keep_running, for the caller to stop)."""
    validate_cluster(cluster)
    t0 = time.monotonic()
    meta = choose_backup(repo, cluster, target, backup_id)
    target_path = check_target_dir(target_dir)
    win = archive_window(repo, cluster, meta)
    check_window(target, win)
    python_usable_by(os_user)
    if isinstance(repo, LocalRepository):
        repository_readable_by(repo.root, os_user)
    log.info("point-in-time restore of %s to %s %s (action %s) from backup %s; WAL available up to %s",
             cluster, target.kind, target.value or "", target.action, meta["backup_id"], win["end_lsn"])
    res = restore_backup(repo, cluster, meta["backup_id"], target_path, verify=verify, os_user=os_user,
                         progress_interval=progress_interval)
    srv = None
    try:
        configure_recovery(target_path, repo, cluster, target, allow_archive=allow_archive, os_user=os_user)
        srv = PgServer(target_path, major=meta["pg_major"], port=port, os_user=os_user, listen="")
        hba = target_path.parent / f"{target_path.name}.pg_hba.conf"
        hba.write_text("local all all trust\n")
        chown_tree(hba, os_user)
        settings = dict(SCRATCH_SETTINGS, hba_file=str(hba))
        if not allow_archive:
            settings["archive_mode"] = "off"
        if meta["pg_major"] < 17:
            settings.pop("summarize_wal", None)
        report = _run_recovery(srv, settings, target, repo_env(repo), timeout_s)
    except BaseException:
        if srv is not None:
            srv.stop("immediate")
        raise
    report.update({"cluster": cluster, "backup_id": meta["backup_id"], "chain": res.get("chain"),
                   "target": target.to_dict(),
                   "target_dir": str(target_path), "window": win, "pg_major": meta["pg_major"],
                   "base_restore_seconds": res["restore_seconds"]})
    if checks and report.get("server_running"):
        from .restore import run_checks

        report["checks"] = run_checks(srv, checks, user=meta.get("bootstrap_superuser") or "postgres")
    report["restore_seconds"] = round(time.monotonic() - t0, 3)
    if keep_running and report.get("server_running"):
        report["server"] = srv
    else:
        srv.stop()
        report["server_running"] = False
    log.info("restore of %s reached %s (%s) in %.1f s", cluster, report.get("reached_lsn"),
             report.get("stopped_at") or "end of archive", report["restore_seconds"])
    return report


def _run_recovery(srv: PgServer, settings: dict, target: RecoveryTarget, env: dict, timeout_s: float) -> dict:
    from .pgconn import query_one

    srv.start(settings, env=env, wait=target.action != "shutdown")
    deadline = time.monotonic() + timeout_s
    conn = srv.local_conninfo()
    state = None
    seen_running = False  # pg_ctl start -W returns before postmaster.pid exists
    while time.monotonic() < deadline:
        alive = (srv.data_dir / "postmaster.pid").exists()
        seen_running = seen_running or alive
        logtext = srv.log_file.read_text(errors="replace") if srv.log_file.exists() else ""
        if "FATAL" in logtext and ("recovery ended before configured recovery target was reached" in logtext
                                   or "could not locate" in logtext or "database system is shut down" in logtext
                                   and target.action != "shutdown"):
            raise RestoreError("recovery failed: " + _fatal_lines(logtext))
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


def _fatal_lines(logtext: str) -> str:
    lines = [ln for ln in logtext.splitlines() if any(k in ln for k in ("FATAL", "recovery stopping", "restored log",
                                                                          "pgincr wal-fetch", "LOG:  redo"))]
    return "\n".join(lines[-12:])


def plan_restore(repo: Repository, cluster: str, target: RecoveryTarget, backup_id: str | None = None) -> dict:
    """What a restore to `target` would use, checked (backup, chain, WAL range, window), touching
    nothing: the dry run of the on-demand restore."""
    from .incremental import resolve_chain

    validate_cluster(cluster)
    meta = choose_backup(repo, cluster, target, backup_id)
    chain = resolve_chain(repo, cluster, meta)
    win = archive_window(repo, cluster, meta)
    check_window(target, win)
    needs_wal = target.kind != "immediate"
    return {"cluster": cluster, "target": target.to_dict(), "backup_id": meta["backup_id"],
            "chain": [{"backup_id": b["backup_id"], "kind": b["kind"], "stop_lsn": b.get("stop_lsn"),
                       "finished_at": b.get("finished_at"), "stored_bytes": b.get("stored_bytes")} for b in chain],
            "wal_from": meta.get("start_wal_file"), "wal_to": win["end_segment"] if needs_wal else
            meta.get("stop_wal_file"), "window": win, "pg_major": meta["pg_major"]}
