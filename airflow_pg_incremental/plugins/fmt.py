"""Small formatters shared by the Backups view's HTML and SVG (times in UTC)."""

from __future__ import annotations

import datetime as dt
from html import escape
from urllib.parse import quote


def esc(value) -> str:
    return escape("" if value is None else str(value), quote=True)


def fmt_bytes(n) -> str:
    if n is None:
        return "–"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def fmt_seconds(s) -> str:
    if s is None:
        return "–"
    if isinstance(s, dt.timedelta):
        s = s.total_seconds()
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    if s < 86400:
        return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"
    return f"{int(s // 86400)} d {int(s % 86400 // 3600)} h"


def fmt_time(t: dt.datetime | None) -> str:
    if t is None:
        return "–"
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_age(t: dt.datetime | None, now: dt.datetime) -> str:
    return "–" if t is None else f"{fmt_seconds(max(0.0, (now - t).total_seconds()))} ago"


def dag_run_href(airflow_root: str, dag_id: str | None, run_id: str | None) -> str | None:
    """The Airflow 3 UI page of a DAG run: <root>/dags/<dag_id>/runs/<run_id>."""
    if not dag_id or not run_id:
        return None
    return f"{airflow_root}/dags/{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"
