"""The Backups view as one server-rendered HTML page (inline SVG and CSS, one small script; no
build step, no CDN)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from .catalog_view import ClusterFacts, recoverable_ranges
from .fmt import dag_run_href, esc, fmt_age, fmt_bytes, fmt_seconds, fmt_time
from .timeline import render_timeline

MAX_BACKUP_ROWS = 60


@dataclass
class ClusterEntry:
    name: str
    rpo_minutes: float
    max_backup_age_hours: float
    catalog: str                       # "conn_id / schema", shown to say where the facts come from
    facts: ClusterFacts | None = None
    error: str | None = None


@dataclass
class Page:
    entries: list[ClusterEntry]
    now: dt.datetime
    since: dt.datetime
    days: float
    airflow_root: str                  # URL path of the Airflow UI ("" when served at the host's root)
    mount: str                         # URL path of this plugin app
    nonce: str
    detail: list[str] = field(default_factory=list)   # clusters shown in full
    notes: list[str] = field(default_factory=list)    # configuration problems, hidden clusters ...
    elapsed_ms: float = 0.0
    queries: int = 0
    selected: str | None = None


def render_page(p: Page) -> str:
    body = [_header(p), *(f'<p class="note">{esc(n)}</p>' for n in p.notes), _overview(p)]
    by_name = {e.name: e for e in p.entries}
    body += [_cluster_section(by_name[n], p) for n in p.detail if n in by_name]
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Backups · pgincr</title>"
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
            f'<body>{"".join(body)}<script nonce="{esc(p.nonce)}">{SCRIPT}</script></body></html>')


def _header(p: Page) -> str:
    days = "".join(f'<option value="{d}"{" selected" if d == p.days else ""}>{label}</option>'
                   for d, label in ((1, "1 day"), (3, "3 days"), (7, "7 days"), (14, "14 days"), (35, "35 days"),
                                    (90, "90 days")))
    all_link = f' · <a href="{esc(p.mount)}/?days={p.days:g}">all clusters</a>' if p.selected else ""
    return (f'<header><h1>Backups</h1><p class="sub">{len(p.entries)} cluster(s) · read in '
            f'{p.elapsed_ms:.0f} ms ({p.queries} queries) · times in UTC · now {esc(fmt_time(p.now))} · '
            f'<a class="docs" href="{esc(p.mount)}/docs">documentation</a>{all_link}</p>'
            f'<form method="get" action="{esc(p.mount)}/">'
            + (f'<input type="hidden" name="cluster" value="{esc(p.selected)}">' if p.selected else "")
            + f'<label>range <select id="days" name="days">{days}</select></label> '
            f'<label>filter <input id="filter" type="search" placeholder="cluster name"></label></form></header>')


def _state(e: ClusterEntry, now: dt.datetime) -> tuple[str, list[str]]:
    """ok / warn / bad, with the reasons."""
    f = e.facts
    if e.error or f is None:
        return "bad", [e.error or "no facts"]
    bad, warn = [], []
    complete = [b for b in f.backups if b["status"] == "complete"]
    if not complete:
        warn.append("no complete backup")
    elif now - max(b["finished_at"] for b in complete) > dt.timedelta(hours=e.max_backup_age_hours):
        bad.append(f"newest backup older than {e.max_backup_age_hours:g} h")
    wal_at = (f.wal or {}).get("newest_archived_at")
    if wal_at is None:
        warn.append("no WAL archived")
    elif now - wal_at > dt.timedelta(minutes=e.rpo_minutes):
        bad.append(f"newest WAL older than the RPO of {e.rpo_minutes:g} min")
    if (f.window or {}).get("gaps"):
        bad.append(f"{f.window['gaps']} WAL gap(s)")
    if f.last_verification and not f.last_verification["ok"]:
        bad.append("last verification failed")
    rt = f.last_restore_test
    if rt is None:
        warn.append("never restore-tested")
    elif not rt["ok"]:
        bad.append("last restore test failed")
    return ("bad" if bad else "warn" if warn else "ok"), bad + warn


def _rpo(f: ClusterFacts, now: dt.datetime) -> str:
    wal_at = (f.wal or {}).get("newest_archived_at")
    return "–" if wal_at is None else fmt_seconds((now - wal_at).total_seconds())


def _last_verification(f: ClusterFacts, now: dt.datetime) -> str:
    v = f.last_verification
    if not v:
        return "never"
    return (f'<span class="{"ok" if v["ok"] else "bad"}">{"passed" if v["ok"] else "FAILED"}</span> '
            f'{esc(fmt_age(v["started_at"], now))} <span class="id">{esc(v["backup_id"])}</span>')


def _last_restore_test(f: ClusterFacts, now: dt.datetime) -> str:
    r = f.last_restore_test
    if not r:
        return "never"
    return (f'<span class="{"ok" if r["ok"] else "bad"}">{"passed" if r["ok"] else "FAILED"}</span> '
            f'{esc(fmt_age(r["started_at"], now))} · RTO {esc(fmt_seconds(r["restore_seconds"]))}')


def _window(f: ClusterFacts) -> str:
    w = f.window
    if not w:
        return "–"
    gaps = f' · <span class="bad">{w["gaps"]} gap(s)</span>' if w["gaps"] else ""
    return (f'{esc(fmt_time(w["window_start_time"]))} → {esc(w["window_end_lsn"] or "?")} '
            f'(WAL archived {esc(fmt_time(w["newest_archived_at"]))}){gaps}')


def _overview(p: Page) -> str:
    rows = []
    for e in p.entries:
        state, reasons = _state(e, p.now)
        f = e.facts
        link = f'{esc(p.mount)}/?cluster={esc(e.name)}&amp;days={p.days:g}'
        name = (f'<a href="#cluster-{esc(e.name)}">{esc(e.name)}</a>' if e.name in p.detail
                else f'<a href="{link}">{esc(e.name)}</a>')
        if f is None or e.error:
            cells = f'<td colspan="6" class="bad">{esc(e.error or "no facts")}</td>'
        else:
            last = max((b for b in f.backups if b["status"] == "complete"), key=lambda b: b["finished_at"],
                       default=None)
            cells = (f'<td class="rpo">{esc(_rpo(f, p.now))}</td>'
                     f'<td>{esc(fmt_age(last["finished_at"], p.now)) if last else "none"}'
                     f'{" <span class=id>" + esc(last["backup_id"]) + "</span>" if last else ""}</td>'
                     f'<td>{_last_verification(f, p.now)}</td><td>{_last_restore_test(f, p.now)}</td>'
                     f'<td>{_window(f)}</td><td>{len(f.alerts)}</td>')
        why = f'<div class="reasons {state}">{esc("; ".join(reasons))}</div>' if reasons else ""
        rows.append(f'<tr class="cluster-row state-{state}" data-cluster="{esc(e.name)}"><td>'
                    f'<span class="dot {state}"></span>{name}{why}</td>{cells}</tr>')
    return ('<table class="overview"><thead><tr><th>cluster</th><th>RPO now</th><th>last backup</th>'
            '<th>last verification</th><th>last restore test</th><th>recoverable window (catalog)</th>'
            f'<th>alerts</th></tr></thead><tbody>{"".join(rows)}</tbody></table>')


LEGEND = ('<p class="legend"><span class="sw full"></span>full <span class="sw incr"></span>incremental '
          '<span class="sw diff"></span>differential <span class="sw synt"></span>synthetic full '
          '<span class="sw band"></span>recoverable '
          '<span class="sw gap"></span>WAL gap <span class="sw rt-ok"></span>restore test passed '
          '<span class="sw rt-failed"></span>failed <span class="sw rp"></span>restore point · green outline: '
          'verified · click a backup to open its DAG run</p>')


def _cluster_section(e: ClusterEntry, p: Page) -> str:
    head = f'<section class="cluster" id="cluster-{esc(e.name)}" data-cluster="{esc(e.name)}"><h2>{esc(e.name)}</h2>'
    if e.error or e.facts is None:
        return head + f'<p class="bad">{esc(e.error or "no facts")}</p></section>'
    f = e.facts
    return (head + _facts(e, p) + render_timeline(f, now=p.now, since=p.since, airflow_root=p.airflow_root)
            + LEGEND + _backups_table(f, p) + _tests_table(f, p) + _alerts(f) + "</section>")


def _facts(e: ClusterEntry, p: Page) -> str:
    f = e.facts
    m = f.metrics or {}
    ranges = recoverable_ranges(f, p.now)
    rp = (f'{len(f.restore_points)}' if f.restore_points_error is None
          else f'<span class="warn">not read: {esc(f.restore_points_error)}</span>')
    items = [("RPO now (age of the newest archived WAL)", esc(_rpo(f, p.now))),
             ("last verification", _last_verification(f, p.now)),
             ("last restore test", _last_restore_test(f, p.now)),
             ("recoverable (catalog window)", _window(f)),
             ("recoverable ranges in view", esc(", ".join(f"{fmt_time(s)} → {fmt_time(t)}" for s, t in ranges)
                                               or "none")),
             ("stored", esc(f"{fmt_bytes(m.get('stored_bytes'))} in backups, "
                            f"{fmt_bytes((f.wal or {}).get('stored_bytes'))} of WAL "
                            f"({(f.wal or {}).get('segments', 0)} segments)")),
             ("restore points", rp),
             ("catalog", esc(e.catalog))]
    return '<dl class="facts">' + "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in items) + "</dl>"


def _run_link(p: Page, dag_id, run_id, text: str = "DAG run") -> str:
    href = dag_run_href(p.airflow_root, dag_id, run_id)
    return f'<a class="dagrun" href="{esc(href)}" title="{esc(dag_id)} / {esc(run_id)}">{esc(text)}</a>' if href \
        else "–"


def _backups_table(f: ClusterFacts, p: Page) -> str:
    rows = []
    for b in sorted(f.backups, key=lambda b: b["started_at"], reverse=True)[:MAX_BACKUP_ROWS]:
        v = f.verifications.get(b["backup_id"])
        ver = "–" if v is None else (f'<span class="{"ok" if v["ok"] else "bad"}">'
                                     f'{"passed" if v["ok"] else "FAILED"}</span> {esc(fmt_time(v["started_at"]))}')
        status = b["status"] if b["status"] == "complete" else f'<span class="bad">{esc(b["status"])}</span>'
        rows.append(f'<tr class="backup-row" data-backup="{esc(b["backup_id"])}"><td class="id">{esc(b["backup_id"])}'
                    f'</td><td><span class="sw {esc(b["kind"][:4])}"></span>{esc(b["kind"])}</td>'
                    f'<td class="id">{esc(b["parent_id"] or "")}</td><td>{esc(fmt_time(b["started_at"]))}</td>'
                    f'<td>{esc(fmt_seconds(b["duration_s"]))}</td><td>{esc(fmt_bytes(b["stored_bytes"]))} / '
                    f'{esc(fmt_bytes(b["raw_bytes"]))}</td><td>{status}</td><td>{ver}</td>'
                    f'<td>{_run_link(p, b["dag_id"], b["run_id"])}</td></tr>')
    more = len(f.backups) - MAX_BACKUP_ROWS
    return ('<table class="backups"><thead><tr><th>backup</th><th>kind</th><th>parent</th><th>started</th>'
            '<th>took</th><th>stored / raw</th><th>status</th><th>verification</th><th>Airflow</th></tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table>' + (f'<p class="note">{more} older backups not listed</p>'
                                                        if more > 0 else ""))


def _tests_table(f: ClusterFacts, p: Page) -> str:
    tests = sorted(f.restore_tests, key=lambda r: r["started_at"], reverse=True)[:5]
    if not tests:
        return '<p class="note">No restore test recorded yet.</p>'
    rows = "".join(
        f'<tr class="restore-test {"passed" if r["ok"] else "failed"}"><td>{esc(fmt_time(r["started_at"]))}</td>'
        f'<td class="{"ok" if r["ok"] else "bad"}">{"passed" if r["ok"] else "FAILED"}</td>'
        f'<td>{esc(r["target_kind"])} {esc(r["target_value"] or "")}</td><td class="id">{esc(r["backup_id"] or "")}</td>'
        f'<td class="rto">{esc(fmt_seconds(r["restore_seconds"]))}</td><td class="id">{esc(r["reached_lsn"] or "")}'
        f'</td><td>{_run_link(p, r["dag_id"], r["run_id"])}</td></tr>' for r in tests)
    return ('<table class="tests"><thead><tr><th>restore test</th><th>result</th><th>target</th><th>backup</th>'
            f'<th>RTO</th><th>reached</th><th>Airflow</th></tr></thead><tbody>{rows}</tbody></table>')


def _alerts(f: ClusterFacts) -> str:
    if not f.alerts:
        return ""
    items = "".join(f'<li><b>{esc(a["kind"])}</b> {esc(fmt_time(a["created_at"]))} {esc(a["dag_id"] or "")} '
                    f'{esc(a["task_id"] or "")}: {esc((a["message"] or "")[:400])}</li>' for a in f.alerts)
    return f'<details class="alerts"><summary>{len(f.alerts)} recent alert(s)</summary><ul>{items}</ul></details>'


CSS = """
:root{color-scheme:light;--fg:#1a202c;--muted:#4a5568;--line:#e2e8f0;--bg:#fff;--ok:#2f855a;--bad:#c53030;
--warn:#b7791f;--full:#1f4e79;--incr:#5b9bd5;--diff:#8e6cc2}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg);
margin:0;padding:12px 18px}
h1{font-size:22px;margin:0 0 2px}h2{font-size:17px;margin:0 0 6px}
.sub,.note,.legend{color:var(--muted);font-size:12.5px;margin:2px 0 8px}
header form{margin:6px 0 10px;display:flex;gap:14px}
table{border-collapse:collapse;width:100%;margin:6px 0 14px;font-size:13px}
th,td{text-align:left;padding:4px 8px;border-bottom:1px solid var(--line);vertical-align:top}
th{font-weight:600;color:var(--muted);background:#f7fafc}
.id{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
.ok{color:var(--ok)}.bad{color:var(--bad)}.warn{color:var(--warn)}
.dot{display:inline-block;width:9px;height:9px;border-radius:50%;margin-right:6px;background:#a0aec0}
.dot.ok{background:var(--ok)}.dot.warn{background:var(--warn)}.dot.bad{background:var(--bad)}
section.cluster{border:1px solid var(--line);border-radius:8px;padding:10px 14px;margin:14px 0}
dl.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:4px 0 8px;font-size:13px}
dl.facts dt{color:var(--muted)}dl.facts dd{margin:0}
svg.timeline{display:block;max-width:1100px;font-size:11px}
.row-label{fill:var(--muted)}.tick-label{fill:var(--muted);font-size:10px}
.axis{stroke:#a0aec0}.tick{stroke:#edf2f7}.now{stroke:#718096;stroke-dasharray:3 3}
.window-band{fill:#c6f6d5;stroke:#68d391}.wal-gap{fill:var(--bad)}
.backup{stroke:#fff;stroke-width:1}.backup.full{fill:var(--full)}.backup.incr{fill:var(--incr)}
.backup.diff{fill:var(--diff)}.backup.synt{fill:var(--full);fill-opacity:.55}.backup.failed{fill:#fff;stroke:var(--bad);stroke-dasharray:3 2}
.backup.running{fill:#cbd5e0}.backup.verified-ok{stroke:var(--ok);stroke-width:2}
.backup.verified-failed{stroke:var(--bad);stroke-width:2}
a.dagrun rect:hover{opacity:.75}.chain-link{stroke:#a0aec0;stroke-width:2}
.rt-mark.ok{fill:var(--ok)}.rt-mark.failed{fill:var(--bad)}.rt-label{font-size:10.5px}
.rt-label.ok{fill:var(--ok)}.rt-label.failed{fill:var(--bad)}.rp-mark{fill:#d69e2e}
.stored-area{fill:#bee3f8;stroke:#4299e1}.stored-max{fill:var(--muted);font-size:10px}
.sw{display:inline-block;width:12px;height:10px;margin:0 4px 0 8px;vertical-align:middle;border-radius:2px}
.sw.full{background:var(--full)}.sw.incr{background:var(--incr)}.sw.diff{background:var(--diff)}.sw.synt{background:var(--full);opacity:.55}
.sw.band{background:#c6f6d5;border:1px solid #68d391}.sw.gap{background:var(--bad)}
.sw.rt-ok{background:var(--ok);border-radius:50%}.sw.rt-failed{background:var(--bad);border-radius:50%}
.sw.rp{background:#d69e2e}
details.alerts{font-size:13px}.reasons{font-size:11.5px;max-width:260px}
"""

# Links to Airflow pages leave the iframe the Airflow UI shows this view in: the iframe may not
# navigate the top window itself (sandbox), so the link is handed to the UI's router through the
# History API of the (same-origin) top window; opened on its own, a link is a plain link.
SCRIPT = """
document.addEventListener('click', function (ev) {
  var a = ev.target.closest ? ev.target.closest('a.dagrun') : null;
  if (!a || window.top === window || ev.button !== 0 || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.altKey) return;
  try {
    var url = new URL(a.getAttribute('href'), document.baseURI), top = window.top;
    if (top.location.origin !== url.origin) return;
    var st = top.history.state, idx = st && typeof st.idx === 'number' ? st.idx + 1 : 0;
    top.history.pushState({usr: null, key: Math.random().toString(36).slice(2, 10), idx: idx}, '',
                          url.pathname + url.search + url.hash);
    top.dispatchEvent(new PopStateEvent('popstate', {state: top.history.state}));
    ev.preventDefault();
  } catch (e) { /* a plain navigation then */ }
});
var d = document.getElementById('days');
if (d) d.addEventListener('change', function () { d.form.submit(); });
var f = document.getElementById('filter');
if (f) f.addEventListener('input', function () {
  var q = f.value.toLowerCase();
  document.querySelectorAll('[data-cluster]').forEach(function (el) {
    el.style.display = el.getAttribute('data-cluster').toLowerCase().indexOf(q) >= 0 ? '' : 'none';
  });
});
"""
