"""The timeline picture of one cluster, as server-rendered SVG (no script, no external asset):

    recoverable   ████████████▌▐██████         band: times a point-in-time restore can reach; red: WAL gaps
    chain 1       [F]─[I]─[I]─[I]              boxes on a time axis: full / incremental / differential / synthetic full
    chain 2                      [F]─[I]       (outline: green verified, red verification failed)
    tests/points      ●        ▲     ●        restore tests (green passed / red failed, with RTO), restore points
    stored        ▁▂▂▃▃▃▄▅▅▆▆▇                 bytes the repository holds, cumulated over time
                  |-----|-----|-----|-----|    time axis (UTC)
"""

from __future__ import annotations

import datetime as dt

from .catalog_view import ClusterFacts, recoverable_ranges, stored_bytes_series
from .fmt import dag_run_href, esc, fmt_bytes, fmt_seconds, fmt_time

WIDTH, LEFT, RIGHT = 1000, 96, 14
ROW_H, LANE_H, LANE_GAP = 16, 16, 6
STORED_H, AXIS_H = 46, 20
MIN_SPAN = dt.timedelta(seconds=15)
MAX_LANES = 8
KIND_CLASS = {"full": "full", "incremental": "incr", "differential": "diff", "synthetic": "synt"}
_STEPS = [dt.timedelta(seconds=s) for s in (2, 5, 10, 15, 30)] + \
         [dt.timedelta(minutes=m) for m in (1, 2, 5, 10, 15, 30)] + \
         [dt.timedelta(hours=h) for h in (1, 2, 3, 6, 12)] + [dt.timedelta(days=d) for d in (1, 2, 7, 14, 28)]


class Axis:
    def __init__(self, t0: dt.datetime, t1: dt.datetime, now: dt.datetime):
        self.t0, self.t1, self.now = t0, t1, now
        self.span = (t1 - t0).total_seconds()

    def x(self, t: dt.datetime) -> float:
        f = (t - self.t0).total_seconds() / self.span
        return round(LEFT + min(max(f, 0.0), 1.0) * (WIDTH - LEFT - RIGHT), 1)

    def ticks(self) -> list[dt.datetime]:
        step = next((s for s in _STEPS if self.span / s.total_seconds() <= 7), _STEPS[-1])
        sec = step.total_seconds()
        first = dt.datetime.fromtimestamp((self.t0.timestamp() // sec + 1) * sec, dt.timezone.utc)
        out, t = [], first
        while t <= self.t1:
            out.append(t)
            t += step
        return out


def axis_for(f: ClusterFacts, now: dt.datetime, since: dt.datetime) -> Axis:
    """From the earliest thing to show (not before `since`) to now, padded a little."""
    times = [b["started_at"] for b in f.backups if b["started_at"]]
    times += [r["started_at"] for r in f.restore_tests] + [p["created_at"] for p in f.restore_points]
    if f.wal and f.wal.get("oldest_archived_at"):
        times.append(f.wal["oldest_archived_at"])
    earliest = max(min(times, default=now), since)
    span = max(now - earliest, MIN_SPAN)
    return Axis(now - span * 1.04, now + span * 0.02, now)


def chain_lanes(backups: list[dict], axis: Axis) -> list[tuple[str, list[dict]]]:
    """Backups grouped by chain (the full they build on), oldest chain first; only the chains with a
    backup inside the axis; unchained ones (failed before their metadata) in a last lane."""
    chains: dict[str, list[dict]] = {}
    for b in backups:
        root = b["chain_root_id"] or (b["backup_id"] if b["kind"] == "full" else "")
        chains.setdefault(root, []).append(b)
    lanes = [(root, bs) for root, bs in chains.items()
             if any((b["finished_at"] or axis.t1) >= axis.t0 for b in bs)]
    lanes.sort(key=lambda rb: (rb[0] == "", min(b["started_at"] for b in rb[1])))
    return lanes[-MAX_LANES:]


def render_timeline(f: ClusterFacts, *, now: dt.datetime, since: dt.datetime, airflow_root: str) -> str:
    axis = axis_for(f, now, since)
    lanes = chain_lanes(f.backups, axis)
    y = 4
    parts: list[str] = []
    parts += _window_row(f, axis, now, y)
    y += ROW_H + LANE_GAP
    for i, (root, bs) in enumerate(lanes):
        parts += _chain_lane(f, root, bs, axis, y, i, airflow_root)
        y += LANE_H + LANE_GAP
    if not lanes:
        parts.append(_label(y, LANE_H, "no backups"))
        y += LANE_H + LANE_GAP
    parts += _marks_row(f, axis, y)
    y += ROW_H + LANE_GAP
    parts += _stored_row(f, axis, since, y)
    y += STORED_H + 4
    parts += _axis(axis, y, top=4)
    height = y + AXIS_H
    return (f'<svg class="timeline" viewBox="0 0 {WIDTH} {height}" width="100%" role="img" '
            f'aria-label="backup timeline of {esc(f.name)}" xmlns="http://www.w3.org/2000/svg">'
            + "".join(parts) + "</svg>")


def _label(y: float, h: float, text: str) -> str:
    return f'<text class="row-label" x="4" y="{y + h / 2 + 4}">{esc(text)}</text>'


def _rect(x0: float, x1: float, y: float, h: float, cls: str, title: str, min_w: float = 2.0) -> str:
    w = max(x1 - x0, min_w)
    return (f'<rect class="{cls}" x="{x0}" y="{y}" width="{round(w, 1)}" height="{h}">'
            f'<title>{esc(title)}</title></rect>')


def _window_row(f: ClusterFacts, axis: Axis, now: dt.datetime, y: float) -> list[str]:
    out = [_label(y, ROW_H, "recoverable")]
    for s, e in recoverable_ranges(f, now):
        if e < axis.t0:
            continue
        out.append(_rect(axis.x(s), axis.x(e), y, ROW_H, "window-band",
                         f"point-in-time recovery possible from {fmt_time(s)} to {fmt_time(e)} "
                         "(end: the newest archived WAL, or the last segment before a gap)"))
    for g in f.wal_gaps:
        after = g["after_at"] or g["before_at"]
        out.append(_rect(axis.x(g["before_at"]), axis.x(after), y - 2, ROW_H + 4, "wal-gap",
                         f"WAL gap on timeline {g['timeline']}: {g['from_lsn']} .. {g['to_lsn']} missing "
                         f"(archived around {fmt_time(g['before_at'])} .. {fmt_time(after)})", min_w=3))
    return out


def _backup_title(b: dict, ver: dict | None) -> str:
    lines = [f"{b['backup_id']} ({b['kind']}, {b['status']})",
             f"{fmt_time(b['started_at'])} .. {fmt_time(b['finished_at'])} ({fmt_seconds(b['duration_s'])})",
             f"LSN {b['start_lsn'] or '?'} .. {b['stop_lsn'] or '?'}, timeline {b['timeline'] or '?'}",
             f"stored {fmt_bytes(b['stored_bytes'])} of {fmt_bytes(b['raw_bytes'])}"]
    if b["parent_id"]:
        lines.append(f"parent {b['parent_id']}")
    if ver:
        lines.append(f"verification {'passed' if ver['ok'] else 'FAILED'} {fmt_time(ver['started_at'])}")
    if b["error"]:
        lines.append(f"error: {b['error'][:300]}")
    if b["dag_id"]:
        lines.append(f"DAG run {b['dag_id']} / {b['run_id']} (click to open)")
    return "\n".join(lines)


def _chain_lane(f: ClusterFacts, root: str, bs: list[dict], axis: Axis, y: float, i: int,
                airflow_root: str) -> list[str]:
    out = [_label(y, LANE_H, f"chain {i + 1}" if root else "other")]
    ends: dict[str, float] = {}
    for b in bs:
        x0 = axis.x(b["started_at"])
        x1 = axis.x(b["finished_at"] or axis.now)
        if b["parent_id"] in ends:  # the link to the parent it was built on
            out.append(f'<line class="chain-link" x1="{ends[b["parent_id"]]}" y1="{y + LANE_H / 2}" x2="{x0}" '
                       f'y2="{y + LANE_H / 2}"/>')
        ends[b["backup_id"]] = max(x1, x0 + 6)
        ver = f.verifications.get(b["backup_id"])
        cls = ["backup", KIND_CLASS.get(b["kind"], "full"), b["status"]]
        if ver:
            cls.append("verified-ok" if ver["ok"] else "verified-failed")
        box = _rect(x0, x1, y, LANE_H, " ".join(cls), _backup_title(b, ver), min_w=6)
        href = dag_run_href(airflow_root, b["dag_id"], b["run_id"])
        out.append(f'<a class="dagrun" href="{esc(href)}" data-backup="{esc(b["backup_id"])}">{box}</a>'
                   if href else box)
    return out


def _marks_row(f: ClusterFacts, axis: Axis, y: float) -> list[str]:
    out = [_label(y, ROW_H, "tests / points")]
    cy, last_label_x = y + ROW_H / 2, -1e9
    for p in f.restore_points:
        x = axis.x(p["created_at"])
        title = f"restore point {p['name']!r} at {p['lsn']}, {fmt_time(p['created_at'])}"
        out.append(f'<path class="rp-mark" d="M{x - 5},{cy + 5} L{x},{cy - 6} L{x + 5},{cy + 5} Z">'
                   f'<title>{esc(title)}</title></path>')
    tests = [r for r in f.restore_tests if r["started_at"] >= axis.t0]
    for r in tests:
        x = axis.x(r["started_at"])
        state = "ok" if r["ok"] else "failed"
        rto = f"RTO {fmt_seconds(r['restore_seconds'])}"
        title = (f"restore test {'passed' if r['ok'] else 'FAILED'}: {fmt_time(r['started_at'])}, target "
                 f"{r['target_kind']} {r['target_value'] or ''}, backup {r['backup_id'] or '?'}, {rto}"
                 + (f", reached {r['reached_lsn']}" if r["reached_lsn"] else "")
                 + (f"\nerror: {r['error'][:300]}" if r["error"] else ""))
        out.append(f'<circle class="rt-mark {state}" cx="{x}" cy="{cy}" r="5"><title>{esc(title)}</title></circle>')
        if x - last_label_x > 80 or r is tests[-1]:
            anchor = "end" if x > WIDTH - 90 else "start"
            dx = -8 if anchor == "end" else 8
            out.append(f'<text class="rt-label {state}" x="{x + dx}" y="{cy + 4}" text-anchor="{anchor}">'
                       f'{esc(rto)}</text>')
            last_label_x = x
    return out


def _stored_row(f: ClusterFacts, axis: Axis, since: dt.datetime, y: float) -> list[str]:
    series = stored_bytes_series(f, max(since, axis.t0))
    out = [_label(y, STORED_H, "stored")]
    if not series:
        return out
    top = max(n for _, n in series) or 1
    pts, prev = [], y + STORED_H
    for t, n in series:
        x = axis.x(t)
        pts += [f"{x},{prev}", f"{x},{round(y + STORED_H - n / top * STORED_H, 1)}"]
        prev = round(y + STORED_H - n / top * STORED_H, 1)
    pts.append(f"{axis.x(axis.now)},{prev}")
    d = f"M{axis.x(series[0][0])},{y + STORED_H} L" + " L".join(pts) + f" L{axis.x(axis.now)},{y + STORED_H} Z"
    out.append(f'<path class="stored-area" d="{d}"><title>{esc(f"stored now: {fmt_bytes(series[-1][1])}")}'
               f'</title></path>')
    out.append(f'<text class="stored-max" x="{WIDTH - RIGHT}" y="{y + 10}" text-anchor="end">'
               f'{esc(fmt_bytes(series[-1][1]))}</text>')
    return out


def _axis(axis: Axis, y: float, top: float) -> list[str]:
    out = [f'<line class="axis" x1="{LEFT}" y1="{y}" x2="{WIDTH - RIGHT}" y2="{y}"/>']
    ticks = axis.ticks()
    multi_day = ticks and ticks[0].date() != ticks[-1].date()
    for t in ticks:
        x = axis.x(t)
        fmt = "%m-%d %H:%M" if multi_day and (t.hour or t.minute) else ("%m-%d" if multi_day else "%H:%M")
        if len(ticks) > 1 and (ticks[1] - ticks[0]) < dt.timedelta(minutes=1):
            fmt = "%H:%M:%S"
        out.append(f'<line class="tick" x1="{x}" y1="{top}" x2="{x}" y2="{y + 4}"/>'
                   f'<text class="tick-label" x="{x}" y="{y + 15}" text-anchor="middle">{t.strftime(fmt)}</text>')
    now_x = axis.x(axis.now)
    out.append(f'<line class="now" x1="{now_x}" y1="{top}" x2="{now_x}" y2="{y}"><title>now</title></line>')
    return out
