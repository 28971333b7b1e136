"""Pull capture of WAL: needs nothing installed on the database host.

A physical replication slot (created on first use) keeps the server from recycling WAL the
repository does not have yet. pg_receivewal runs WITHOUT the slot, starting right after the last
segment the repository holds (a sparse '.partial' placeholder tells it where to start), up
to a segment boundary at or below the server's flushed WAL. Every completed segment (and timeline
history file) is stored compressed as soon as it is complete; only after all of them are stored
is the slot advanced (pg_replication_slot_advance). A crash at any point therefore loses nothing:
the next run starts again from what the repository holds. No gap, no duplicate.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time

from . import procs
from .binaries import find_program, major_from_version_num
from .errors import ConfigError, ServerError, SlotRetentionExceeded, WalCaptureError
from .lsn import format_lsn, parse_lsn, segment_name, segno_of
from .names import validate_cluster
from .pgconn import ConnInfo, classify_connect_error, connect
from .progress import human_bytes
from .repository import Repository
from .wal import list_segments, push_file, record_restore_point

log = logging.getLogger(__name__)

_SLOT_RE = re.compile(r"^[a-z0-9_]{1,63}$")


def default_slot_name(cluster: str) -> str:
    return ("pgincr_" + re.sub(r"[^a-z0-9_]", "_", cluster.lower()))[:63]


def ensure_slot(conn: ConnInfo, slot: str) -> dict:
    """Create the physical slot if missing (reserving WAL now); refuse a slot of another type."""
    if not _SLOT_RE.match(slot):
        raise ConfigError(f"replication slot name {slot!r} invalid: lower-case letters, digits and '_' only")
    with connect(conn) as c, c.cursor() as cur:
        cur.execute("SELECT slot_type, restart_lsn::text, active, wal_status FROM pg_replication_slots "
                    "WHERE slot_name = %s", (slot,))
        row = cur.fetchone()
        if row and row[0] != "physical":
            raise ConfigError(f"replication slot {slot!r} exists but is a {row[0]} slot; pgincr needs a physical "
                              "slot: choose another name or drop it")
        if row and row[3] == "lost":
            raise WalCaptureError(f"replication slot {slot!r} is lost (the server removed WAL it needed): WAL between "
                                  "the archive's end and now is gone. Drop the slot, take a new full backup.")
        created = False
        if not row:
            try:
                cur.execute("SELECT lsn::text FROM pg_create_physical_replication_slot(%s, true)", (slot,))
            except Exception as e:
                raise ServerError(f"cannot create replication slot {slot!r}: {e}; the role needs REPLICATION and "
                                  "max_replication_slots must allow one more") from None
            created = True
            cur.execute("SELECT slot_type, restart_lsn::text, active, wal_status FROM pg_replication_slots "
                        "WHERE slot_name = %s", (slot,))
            row = cur.fetchone()
        if created:
            log.info("created physical replication slot %s (restart_lsn %s)", slot, row[1])
        return {"slot": slot, "restart_lsn": row[1], "active": row[2], "created": created}


def slot_health(conn: ConnInfo, slot: str | None) -> dict:
    """What keeps a replication slot from filling the primary's disk: max_slot_wal_keep_size (None
    when unset: the slot may retain WAL without limit), the slot's wal_status and how much WAL it
    retains now, and the cluster's average WAL rate since its statistics were reset (pg_stat_wal)."""
    with connect(conn) as c, c.cursor() as cur:
        cur.execute("""SELECT (SELECT setting::bigint FROM pg_settings WHERE name = 'max_slot_wal_keep_size'),
                              (SELECT wal_bytes::bigint FROM pg_stat_wal),
                              (SELECT extract(epoch FROM now() - stats_reset)::float8 FROM pg_stat_wal)""")
        keep_mb, wal_bytes, since = cur.fetchone()
        row = None
        if slot:
            cur.execute("""SELECT wal_status, safe_wal_size,
                                  pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
                                                       ELSE pg_current_wal_flush_lsn() END, restart_lsn)::bigint
                           FROM pg_replication_slots WHERE slot_name = %s""", (slot,))
            row = cur.fetchone()
    out = {"max_slot_wal_keep_size_bytes": None if keep_mb is None or keep_mb < 0 else int(keep_mb) << 20,
           "avg_wal_rate_bytes_per_s": round(wal_bytes / since, 1) if wal_bytes and since and since > 60 else None,
           "slot": slot, "wal_status": row[0] if row else None, "safe_wal_size": row[1] if row else None,
           "retained_bytes": int(row[2] or 0) if row else None}
    return out


def slot_advice(health: dict, max_retained_bytes: int, interval_rate: float | None = None) -> dict:
    """The capture cadence this cluster's WAL rate needs so that the slot never holds more than
    `max_retained_bytes` (nor reaches max_slot_wal_keep_size, which would invalidate it): the time
    the server takes to write that much WAL at the higher of its long-term average rate and the
    rate measured over the last interval between captures. Capture at most every half of it."""
    bound = max_retained_bytes
    if health.get("max_slot_wal_keep_size_bytes"):
        bound = min(bound, health["max_slot_wal_keep_size_bytes"])
    rates = [r for r in (health.get("avg_wal_rate_bytes_per_s"), interval_rate) if r]
    rate = max(rates) if rates else None
    fill_s = bound / rate if rate else None
    return {"bound_bytes": bound, "wal_rate_bytes_per_s": round(rate, 1) if rate else None,
            "interval_wal_rate_bytes_per_s": round(interval_rate, 1) if interval_rate else None,
            "fills_bound_in_s": round(fill_s) if fill_s else None,
            "capture_every_s": round(fill_s / 2) if fill_s else None}


def describe_slot_advice(advice: dict) -> str:
    if not advice.get("wal_rate_bytes_per_s"):
        return "the WAL rate is not known yet"
    return (f"at {human_bytes(advice['wal_rate_bytes_per_s'])}/s of WAL the slot reaches "
            f"{human_bytes(advice['bound_bytes'])} in {_duration(advice['fills_bound_in_s'])}: capture at least every "
            f"{_duration(advice['capture_every_s'])}")


def _duration(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _server_positions(conn: ConnInfo) -> dict:
    with connect(conn) as c, c.cursor() as cur:
        cur.execute("""SELECT current_setting('server_version_num')::int, pg_is_in_recovery(),
                              (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'),
                              CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()::text
                                   ELSE pg_current_wal_flush_lsn()::text END,
                              CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()::text
                                   ELSE pg_current_wal_insert_lsn()::text END,
                              (SELECT timeline_id FROM pg_control_checkpoint())""")
        v, rec, seg, flush, insert, tli = cur.fetchone()
    # insert_lsn: WAL inserted, even not yet flushed (synchronous_commit=off); a standby's receive LSN
    return {"version_num": v, "major": major_from_version_num(v), "in_recovery": rec, "segment_size": int(seg),
            "flush_lsn": parse_lsn(flush), "insert_lsn": parse_lsn(insert), "timeline": tli}


def server_timeline_history(conn: ConnInfo, timeline: int) -> list[tuple[int, int]]:
    """[(timeline, switch LSN)] of the server's history file for `timeline`, through the
    replication protocol's TIMELINE_HISTORY command (no superuser needed, only REPLICATION)."""
    if timeline <= 1:
        return []
    from psycopg import pq
    from psycopg.conninfo import make_conninfo

    kw = {k: v for k, v in conn.psycopg_kwargs().items()}
    kw["replication"] = "true"
    pgc = pq.PGconn.connect(make_conninfo(**kw).encode())
    try:
        if pgc.status != pq.ConnStatus.OK:
            raise classify_connect_error(conn, (pgc.error_message or b"").decode("utf-8", "replace"))
        res = pgc.exec_(f"TIMELINE_HISTORY {int(timeline)}".encode())
        if res.status != pq.ExecStatus.TUPLES_OK:
            raise ServerError(f"TIMELINE_HISTORY {timeline} failed: {(res.error_message or b'').decode()}")
        content = res.get_value(0, 1).decode()
    finally:
        pgc.finish()
    out = []
    for line in content.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit():
            out.append((int(parts[0]), parse_lsn(parts[1])))
    return out


def timeline_at(history: list[tuple[int, int]], current: int, lsn: int, from_tli: int) -> int:
    """The timeline that holds WAL position `lsn`, walking the history from `from_tli` on. A
    position exactly at a switch point belongs to the newer timeline (the server answers a request
    to stream an old timeline from its switch point with no WAL, which pg_receivewal rejects)."""
    tli = from_tli
    for t, switch in history:
        if t == tli and lsn >= switch:
            later = [h[0] for h in history if h[0] > t]
            tli = later[0] if later else current
    return tli


def resume_point(archived: dict[int, list[str]], history: list[tuple[int, int]], server_tli: int,
                 seg: int) -> tuple[int, int, str | None]:
    """(timeline, segment number) where capture resumes, and a note when the archive holds WAL the
    server's history abandoned.

    The archive is followed along the server's own history (its timeline and the ancestors in its
    history file, each left at a switch point), not just by its newest segment: after a
    point-in-time restore that rewound the cluster and promoted it, the archive's old timeline goes
    on past the switch point (the abandoned future) and the new timeline starts *before* the
    archive's end. Resuming after the newest archived segment would then skip the new timeline's
    beginning, and capture would find nothing to do until the server passed the old end."""
    leaves = {}  # ancestor timeline -> switch LSN where the server's history leaves it
    for t, switch in history:
        leaves.setdefault(t, switch)
    on_path = [t for t in archived if t == server_tli or t in leaves]
    if not on_path:
        # nothing archived on this server's history (a new cluster in an old archive, or a
        # history file the server no longer has): go on after the newest archived segment
        last_tli = max(archived)
        return last_tli, segno_of(archived[last_tli][-1], seg) + 1, None
    tli = max(on_path)
    end_segno = segno_of(archived[tli][-1], seg) + 1
    note = None
    if tli != server_tli:
        switch = leaves[tli]
        if end_segno * seg > switch:
            # the archive holds this timeline past the point where the server left it: resume in
            # the segment of the switch point, on the timeline that starts there
            later = [t for t, _ in history if t > tli]
            child = later[0] if later else server_tli
            note = (f"the archive's timeline {tli} goes on past the server's switch point {format_lsn(switch)} "
                    f"(to segment {archived[tli][-1]}): that WAL belongs to an abandoned branch. Capture resumes "
                    f"at {segment_name(child, switch // seg, seg)} on timeline {child}")
            return child, switch // seg, note
        # the archive ends before the switch: go on from there on the timeline that holds that
        # position (pg_receivewal follows the history onto the newer timelines and stores .history)
        return timeline_at(history, server_tli, end_segno * seg, tli), end_segno, None
    return tli, end_segno, None


def capture_wal_pull(conn: ConnInfo, repo: Repository, cluster: str, *, slot: str | None = None,
                     upto_lsn: str | int | None = None, max_retained_bytes: int = 8 << 30, level: int = 3,
                     timeout_s: float = 3600, catalog=None, staging_parent: str | None = None,
                     threads: int | None = None) -> dict:
    """Store every complete WAL segment between the archive's end and `upto_lsn` (default: the
    server's flushed WAL), `threads` segments at a time (default: capture_threads()), then advance
    the slot. Returns segments/bytes captured and the lag."""
    validate_cluster(cluster)
    slot = slot or default_slot_name(cluster)
    pos = _server_positions(conn)
    seg = pos["segment_size"]
    slot_info = ensure_slot(conn, slot)
    receivewal = find_program("pg_receivewal", pos["major"])
    repo.check_writable()
    health = slot_health(conn, slot)

    archived = list_segments(repo, cluster)
    if archived:
        # the server's history is needed only while its own timeline is not archived yet (after a
        # failover or a PITR); [] on timeline 1, without asking
        history = [] if pos["timeline"] in archived else server_timeline_history(conn, pos["timeline"])
        start_tli, start_segno, note = resume_point(archived, history, pos["timeline"], seg)
        if note:
            log.warning("%s", note)
    else:
        start_tli = pos["timeline"]
        start_segno = parse_lsn(slot_info["restart_lsn"]) // seg if slot_info["restart_lsn"] else \
            pos["flush_lsn"] // seg
    # stop at a segment boundary the server has flushed (complete segments only)
    flush = pos["flush_lsn"]
    target = flush if upto_lsn is None else min(parse_lsn(upto_lsn) if isinstance(upto_lsn, str) else upto_lsn, flush)
    if upto_lsn is not None and target % seg:
        boundary = (target // seg + 1) * seg
        target = boundary if boundary <= flush else (target // seg) * seg
    else:
        target = (target // seg) * seg
    start_lsn = start_segno * seg
    interval_rate = _interval_rate(repo, cluster, archived, start_tli, start_segno, seg, flush)
    result = {"cluster": cluster, "slot": slot, "slot_created": slot_info["created"], "segments": 0,
              "history_files": 0, "raw_bytes": 0, "stored_bytes": 0, "first_segment": None, "last_segment": None,
              "start_lsn": format_lsn(start_lsn), "end_lsn": format_lsn(max(target, start_lsn)),
              "server_flush_lsn": format_lsn(flush), "timeline": pos["timeline"]}
    if target <= start_lsn:
        log.info("nothing to capture: the archive already ends at %s (server flushed %s)", format_lsn(start_lsn),
                 format_lsn(flush))
        _finish(conn, slot, start_lsn, flush, result, max_retained_bytes, health, interval_rate)
        _enforce_slot_bound(result, health, max_retained_bytes)
        return result

    threads = threads or capture_threads()
    staging = tempfile.mkdtemp(prefix=f"pgincr-recv-{cluster}-", dir=staging_parent)
    t0 = time.monotonic()
    proc = None
    try:
        # placeholder: a sparse '<start segment>.partial' of the right size makes pg_receivewal stream
        # from the beginning of that segment (a complete placeholder of segment 0 would be ignored)
        with open(os.path.join(staging, segment_name(start_tli, start_segno, seg) + ".partial"), "wb") as f:
            f.truncate(seg)
        cmd = [receivewal, "-D", staging, "--no-loop", "--no-password", "--no-sync", f"--endpos={format_lsn(target)}",
               "--status-interval=1", "--verbose"]
        log.info("capturing WAL %s .. %s (timeline %s), storing %d segment(s) at a time, with: %s",
                 format_lsn(start_lsn), format_lsn(target), start_tli, threads, " ".join(cmd))
        err_path = os.path.join(staging, ".stderr")
        with open(err_path, "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, **conn.env()},
                                    cwd=staging)
        procs.register_child(proc)  # killed by procs.terminate_all: the capture then fails
        stopped_by_us = _receive_and_store(proc, _Uploader(repo, cluster, staging, result, level, seg, threads),
                                           target, timeout_s)
        msg = conn.redact(open(err_path, "rb").read().decode("utf-8", "replace").strip())
        result["_receivewal_log"] = msg[-2000:]
        if proc.returncode != 0 and not stopped_by_us:
            if "has already been removed" in msg:
                raise WalCaptureError(
                    f"the server no longer has WAL segment {segment_name(start_tli, start_segno, seg)} that the "
                    f"archive needs next: the archive has a gap from {format_lsn(start_lsn)}. Take a new full "
                    f"backup; pg_receivewal said: {msg.splitlines()[-1]}")
            if any(s in msg.lower() for s in ("could not connect", "password", "pg_hba", "replication")):
                raise classify_connect_error(conn, msg)
            raise WalCaptureError(f"pg_receivewal failed (exit {proc.returncode}): {msg}")
    finally:
        if proc is not None:
            procs.forget_child(proc)
        shutil.rmtree(staging, ignore_errors=True)
    # everything up to target is stored: check, then let the server recycle it
    segs = list_segments(repo, cluster)
    newest_tli = max(segs) if segs else start_tli
    have = {segno_of(n, seg) for n in segs.get(newest_tli, [])}
    end_segno = target // seg  # exclusive
    first_needed = start_segno if newest_tli == start_tli else min(have or {end_segno})
    missing = [segment_name(newest_tli, s, seg) for s in range(first_needed, end_segno) if s not in have]
    if missing:
        raise WalCaptureError(f"after capture, segments are missing from the archive: {missing[:5]}; the slot was "
                              f"not advanced. pg_receivewal said: {result.get('_receivewal_log', '')}")
    result.pop("_receivewal_log", None)
    result["duration_s"] = round(time.monotonic() - t0, 3)
    _finish(conn, slot, target, flush, result, max_retained_bytes, health, interval_rate)
    if catalog is not None and result["segments"]:
        catalog.record_wal(cluster, result.pop("_stored", []), method="pull")
    result.pop("_stored", None)
    log.info("captured %d segment(s) (%s raw, %s stored) and %d history file(s) in %.1f s; lag %s",
             result["segments"], human_bytes(result["raw_bytes"]), human_bytes(result["stored_bytes"]),
             result["history_files"], result.get("duration_s", 0), human_bytes(result["lag_bytes"]))
    _enforce_slot_bound(result, health, max_retained_bytes)
    return result


def _interval_rate(repo, cluster, archived, tli, start_segno, seg, flush) -> float | None:
    """WAL rate since the previous capture: the WAL the server wrote after the archive's end, over
    the time since the archive's newest segment was stored (None when too recent to tell)."""
    if start_segno < 1 or segment_name(tli, start_segno - 1, seg) not in set(archived.get(tli, [])):
        return None
    try:
        from .metadata import utcnow
        from .wal import wal_key

        elapsed = (utcnow() - repo.modified(wal_key(cluster, segment_name(tli, start_segno - 1, seg)))).total_seconds()
    except Exception:
        return None
    written = flush - start_segno * seg
    return written / elapsed if elapsed >= 60 and written > 0 else None


def _enforce_slot_bound(result: dict, health: dict, max_retained_bytes: int) -> None:
    """Fail (after the capture itself succeeded and the slot was advanced) when the slot held more
    WAL before this capture than the bound: the primary's pg_wal grew that much between captures.
    An alert, not a log line: the slot must never be the reason a primary stops."""
    before = health.get("retained_bytes") or 0
    if before <= max_retained_bytes:
        return
    advice = result.get("slot_advice") or {}
    keep = health.get("max_slot_wal_keep_size_bytes")
    raise SlotRetentionExceeded(
        f"replication slot {result['slot']} held {human_bytes(before)} of WAL on the server before this capture, "
        f"more than the bound of {human_bytes(max_retained_bytes)} (max_slot_retained_gb): captures are too far "
        f"apart, or were failing, for this cluster's WAL rate, and the primary's pg_wal grew that much. This capture "
        f"succeeded (the slot now holds {human_bytes(result.get('slot_retained_bytes') or 0)}). Fix: "
        f"{describe_slot_advice(advice)} (the hourly_wal schedule), or raise max_slot_retained_gb if the server's "
        "disk allows; "
        + (f"max_slot_wal_keep_size ({human_bytes(keep)}) invalidates the slot beyond that (the archive then has a "
           "gap and needs a new full backup)" if keep else
           "and set max_slot_wal_keep_size on the server (it is unset: nothing limits what the slot retains)"))


def _receive_and_store(proc, up: "_Uploader", target: int, timeout_s: float) -> bool:
    """Store what pg_receivewal completes while it runs, until every segment below `target` is
    complete (it is then stopped: on an idle server it would wait for WAL beyond --endpos before
    noticing it is done) or it exits; then wait for the stores. Whether we stopped it."""
    last_log = time.monotonic()
    deadline = time.monotonic() + timeout_s
    stopped_by_us = False
    try:
        while True:
            running = proc.poll() is None
            up.submit_complete()
            if not running:
                break
            if up.newest_complete is not None and up.newest_complete >= target // up.seg - 1:
                proc.terminate()
                proc.wait()
                stopped_by_us = True
                up.submit_complete()
                break
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise WalCaptureError(f"pg_receivewal did not reach {format_lsn(target)} within {timeout_s:.0f}s")
            if time.monotonic() - last_log > 10:
                last_log = time.monotonic()
                r = up.result
                log.info("captured %d segment(s), %s so far", r["segments"], human_bytes(r["raw_bytes"]))
            time.sleep(0.05)
        up.finish()
    finally:
        up.close()
    return stopped_by_us


def capture_threads() -> int:
    """Segments compressed and stored at once: the cores (backup_stream.default_threads), at most
    4 (zstd and the repository's I/O release the GIL; each store holds a segment and its
    compressed copy in memory)."""
    from .backup_stream import default_threads

    return min(4, default_threads())


class _Uploader:
    """Stores the complete files pg_receivewal leaves in `staging` (segments of the full size,
    timeline history files), `threads` at a time; each store is durable on its own (push_file),
    the slot moves only after all of them."""

    def __init__(self, repo, cluster, staging, result, level, seg, threads):
        from concurrent.futures import ThreadPoolExecutor

        self.repo, self.cluster, self.staging, self.result, self.level, self.seg = repo, cluster, staging, result, \
            level, seg
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="pgincr-capture")
        self.inflight: dict = {}  # name -> future
        self.seen: set[str] = set()
        self.newest_complete: int | None = None  # segment number of the newest complete segment

    def submit_complete(self) -> None:
        self.collect()
        for n in sorted(os.listdir(self.staging)):
            if n in self.seen or n.startswith(".") or n.endswith(".partial"):
                continue
            p = os.path.join(self.staging, n)
            is_segment = len(n) == 24
            if is_segment and os.path.getsize(p) != self.seg:
                continue
            if not n.endswith(".history") and not is_segment:
                continue
            self.seen.add(n)
            if is_segment:
                self.newest_complete = max(self.newest_complete or 0, segno_of(n, self.seg))
            self.inflight[n] = self.pool.submit(self._store, n, p, is_segment)

    def _store(self, n: str, p: str, is_segment: bool):
        r = push_file(self.repo, self.cluster, p, name=n, level=self.level)
        if is_segment:
            os.unlink(p)  # keep the staging area small; the name stays in `seen`
        return r

    def collect(self, wait: bool = False) -> None:
        """Count the finished stores (in name order at the end); the first failure is raised."""
        for n in sorted(self.inflight):
            fut = self.inflight[n]
            if not wait and not fut.done():
                continue
            r = fut.result()  # raises the store's error
            del self.inflight[n]
            res = self.result
            if len(n) != 24:
                res["history_files"] += 1
                continue
            res["segments"] += 1
            res["raw_bytes"] += r.raw_size
            res["stored_bytes"] += r.stored_size
            res["first_segment"] = min(res["first_segment"] or n, n)
            res["last_segment"] = max(res["last_segment"] or n, n)
            res.setdefault("_stored", []).append(r.to_dict() | {"name": n})

    def finish(self) -> None:
        self.submit_complete()
        self.collect(wait=True)
        self.result.get("_stored", []).sort(key=lambda d: d["name"])

    def close(self) -> None:
        """Stores not finished are abandoned (a failure or a kill ends the capture; the slot does
        not move, so the next capture stores them again)."""
        self.pool.shutdown(wait=True, cancel_futures=True)


def _finish(conn, slot, advance_to, flush, result, max_retained_bytes, health, interval_rate) -> None:
    with connect(conn) as c, c.cursor() as cur:
        cur.execute("SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        current = cur.fetchone()[0]
        if current is None or parse_lsn(str(current)) < advance_to:
            cur.execute("SELECT end_lsn::text FROM pg_replication_slot_advance(%s, %s::pg_lsn)",
                        (slot, format_lsn(advance_to)))
        cur.execute("""SELECT restart_lsn::text,
                              pg_wal_lsn_diff(CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
                                                   ELSE pg_current_wal_flush_lsn() END, restart_lsn)::bigint
                       FROM pg_replication_slots WHERE slot_name = %s""", (slot,))
        restart, retained = cur.fetchone()
    result["slot_restart_lsn"] = restart
    result["slot_retained_bytes"] = int(retained or 0)
    result["lag_bytes"] = max(0, flush - parse_lsn(result["end_lsn"]))
    result["slot_retained_before_bytes"] = health.get("retained_bytes")
    result["max_slot_wal_keep_size_bytes"] = health.get("max_slot_wal_keep_size_bytes")
    result["slot_advice"] = advice = slot_advice(health, max_retained_bytes, interval_rate)
    log.info("replication slot %s: held %s before this capture, %s now (bound %s%s); %s", slot,
             human_bytes(health.get("retained_bytes") or 0), human_bytes(result["slot_retained_bytes"]),
             human_bytes(max_retained_bytes),
             "" if health.get("max_slot_wal_keep_size_bytes") else "; max_slot_wal_keep_size unset",
             describe_slot_advice(advice))
    if result["slot_retained_bytes"] > max_retained_bytes:
        log.warning("WARNING: replication slot %s still retains %s of WAL on the server after the capture (bound "
                    "%s): the server writes WAL faster than it can be captured", slot,
                    human_bytes(result["slot_retained_bytes"]), human_bytes(max_retained_bytes))
        result["slot_retention_warning"] = True


def switch_wal(conn: ConnInfo, *, restore_point: str | None = None, repo: Repository | None = None,
               cluster: str | None = None) -> dict:
    """pg_switch_wal() (after pg_create_restore_point(name) when asked): closes the current segment
    so it can be archived. Returns the switch LSN, the segment it completed and the timeline. A
    restore point is also indexed in the repository, so restores can validate and locate it."""
    from .metadata import iso, utcnow
    from .names import _check

    if restore_point is not None:
        _check("restore point name", restore_point)
        if repo is None or cluster is None:
            raise ConfigError("a restore point needs the repository and cluster to index it")
    with connect(conn) as c, c.cursor() as cur:
        try:
            cur.execute("SELECT pg_is_in_recovery()")
            if cur.fetchone()[0]:
                raise ConfigError("the server is a standby: pg_switch_wal() and restore points run on the primary")
            rp_lsn = None
            if restore_point is not None:
                cur.execute("SELECT pg_create_restore_point(%s)::text", (restore_point,))
                rp_lsn = cur.fetchone()[0]
            cur.execute("SELECT pg_switch_wal()::text")
            lsn = cur.fetchone()[0]
            cur.execute("SELECT pg_walfile_name(%s::pg_lsn), (SELECT timeline_id FROM pg_control_checkpoint()), "
                        "now()::text", (lsn,))
            segment, tli, now = cur.fetchone()
        except ConfigError:
            raise
        except Exception as e:
            msg = str(e)
            if "permission denied" in msg:
                fn = "pg_create_restore_point(text)" if "restore_point" in msg else "pg_switch_wal()"
                raise ServerError(f"{conn.describe()}: {msg.strip()}; run as a superuser: GRANT EXECUTE ON FUNCTION "
                                  f"{fn} TO {conn.user or '<the backup role>'};") from None
            raise ServerError(f"{conn.describe()}: {msg.strip()}") from None
    out = {"lsn": lsn, "segment": segment, "timeline": tli, "server_time": now}
    if restore_point is not None:
        record_restore_point(repo, cluster, restore_point, rp_lsn, tli, iso(utcnow()))
        out.update({"restore_point": restore_point, "restore_point_lsn": rp_lsn})
    log.info("switched WAL at %s (segment %s complete, timeline %s)%s", lsn, segment, tli,
             f"; restore point {restore_point!r} at {out.get('restore_point_lsn')}" if restore_point else "")
    return out


_LONG_PAGE_HEADER = 40  # SizeOfXLogLongPHD


def wal_beyond_archive(conn: ConnInfo, newest_segment: str | None) -> dict:
    """How much WAL the server holds past the archive's newest segment: 0 when the server is idle
    (no WAL written since the segment that was archived last), the true RPO exposure otherwise.
    {'server_lsn', 'server_timeline', 'archive_end_lsn', 'unarchived_bytes' (None when the
    timelines differ: not comparable)}."""
    pos = _server_positions(conn)
    seg = pos["segment_size"]
    lsn = pos["insert_lsn"]  # inserted, even not yet flushed, is at risk too
    out = {"server_lsn": format_lsn(lsn), "server_timeline": pos["timeline"],
           "archive_end_lsn": None, "unarchived_bytes": None}
    if newest_segment:
        end = (segno_of(newest_segment, seg) + 1) * seg
        out["archive_end_lsn"] = format_lsn(end)
        if int(newest_segment[:8], 16) == pos["timeline"]:
            beyond = lsn - end
            # at the start of a segment the insert position stands past its long page header (40 bytes):
            # no record there yet
            out["unarchived_bytes"] = beyond if beyond > _LONG_PAGE_HEADER else 0
    return out


def check_continuity(repo: Repository, cluster: str, *, catalog=None, fail_on_gap: bool = True) -> dict:
    """Gaps in the archive from the oldest complete backup's start to the newest WAL, timeline
    switches and missing history files, and every backup's WAL from its start to its stop segment
    on its timeline (in particular the newest backup's stop segment: an archive that ends before it
    has no gap, yet no point-in-time recovery from that backup is possible). A gap or unarchived
    backup WAL older than the newest backup's start is reported but does not fail. Archived
    segments are (re)recorded in the catalog."""
    from .metadata import list_backups, require_cluster
    from .wal import WalGap, continuity, list_segments

    require_cluster(repo, cluster)
    backups = list_backups(repo, cluster)
    oldest = backups[0] if backups else None
    seg = (oldest or {}).get("wal_segment_size") or 16 * 1024 * 1024
    start = parse_lsn(oldest["start_lsn"]) if oldest and oldest.get("start_lsn") else None
    rep = continuity(repo, cluster, from_lsn=start, timeline=(oldest or {}).get("timeline"), segment_size=seg)
    rep["oldest_backup"] = oldest["backup_id"] if oldest else None
    rep["backups"] = len(backups)
    segs = list_segments(repo, cluster)
    if catalog is not None:
        catalog.record_wal(cluster, [{"name": n} for names in segs.values() for n in names], method="scan",
                           segment_size=seg)
    # a gap older than the newest backup's start no longer breaks recovery to now (the advice below,
    # a new full after the gap, has been followed): it only cuts the older part of the window, until
    # retention drops the backups before it. It is reported, not failed on.
    newest = backups[-1] if backups else None
    newest_seg = parse_lsn(newest["start_lsn"]) // seg if newest and newest.get("start_lsn") else None
    fatal = [g for g in rep["gaps"] if newest_seg is None or segno_of(g, seg) >= newest_seg]
    rep["gaps_before_newest_backup"] = [g for g in rep["gaps"] if g not in fatal]
    if rep["gaps_before_newest_backup"]:
        old = rep["gaps_before_newest_backup"]
        log.warning("WAL archive of %s has %d missing segment(s) before the newest backup %s (first %s): points in "
                    "time between such a gap and the next backup cannot be restored; recovery from %s on is "
                    "unaffected, and retention removes the older part in time", cluster, len(old),
                    newest["backup_id"], old[0], newest["backup_id"])
    problems = []
    if fatal:
        problems.append(f"{len(fatal)} missing segment(s), first {fatal[0]}")
    if rep["missing_history"]:
        problems.append(f"missing timeline history: {', '.join(rep['missing_history'])}")
    rep["backups_without_wal"] = _backups_without_wal(backups, segs)
    for b in rep["backups_without_wal"]:
        b["fails"] = newest_seg is None or segno_of(b["last_missing"], seg) >= newest_seg
        if b["fails"]:
            problems.append(_unarchived_backup_wal(cluster, b))
        else:
            log.warning("WAL of the older backup %s is not all archived (%s): point-in-time recovery from it is "
                        "impossible; recovery from the newest backup %s is unaffected", b["backup_id"],
                        ", ".join(b["missing"][:3]), newest["backup_id"])
    rep["problems"] = problems
    rep["ok"] = not problems
    rep["timelines"] = {str(k): v for k, v in rep["timelines"].items()}
    if problems:
        log.error("WAL archive of %s is NOT continuous: %s", cluster, "; ".join(problems))
        if fail_on_gap:
            raise WalGap(f"WAL archive of {cluster} is not continuous: {'; '.join(problems)}. Point-in-time recovery "
                         "past a gap is impossible: find why (capture failing? archive_command errors?), and take a "
                         "new full backup after the gap.")
    else:
        log.info("WAL archive of %s is continuous from %s to %s", cluster,
                 rep["timelines"] and min(v["first"] for v in rep["timelines"].values()),
                 rep["timelines"] and max(v["last"] for v in rep["timelines"].values()))
    return rep


def _backups_without_wal(backups: list[dict], segs: dict[int, list[str]]) -> list[dict]:
    """The backups whose WAL from start to stop segment is not all archived on their timeline."""
    from .metadata import wal_span

    out = []
    for b in backups:
        span = wal_span(b)
        if span is None:
            continue
        tli, seg, first, last = span
        have = {segno_of(n, seg) for n in segs.get(tli, [])}
        missing = [segment_name(tli, s, seg) for s in range(segno_of(first, seg), segno_of(last, seg) + 1)
                   if s not in have]
        if missing:
            out.append({"backup_id": b["backup_id"], "timeline": tli, "first": first, "last": last,
                        "missing": missing[:100], "missing_count": len(missing), "last_missing": missing[-1]})
    return out


def _unarchived_backup_wal(cluster: str, b: dict) -> str:
    what = (f"its stop segment {b['last']} is not archived" if b["last_missing"] == b["last"] else
            f"segment(s) {', '.join(b['missing'][:3])} are not archived")
    return (f"backup {b['backup_id']}'s WAL ({b['first']} .. {b['last']}, timeline {b['timeline']}) is not all in the "
            f"archive: {what} ({b['missing_count']} missing), so no point-in-time recovery from it is possible. Capture "
            f"WAL now: `pgincr capture --cluster {cluster}` / the hourly DAG, if the server still has it; otherwise "
            "take a new full backup once archiving works")
