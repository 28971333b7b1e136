"""The FastAPI app Airflow's API server mounts at /pgincr: the Backups view and the README.

Authentication: Airflow does not authenticate plugin apps (a mounted app inherits none of the core
API's dependencies), so every route here depends on Airflow's own `get_user` (the JWT of the UI's
`_token` cookie, or an `Authorization: Bearer` token), and a browser without a valid session is
sent to Airflow's login page. Authorization: a cluster is shown only to users who may read the
runs of one of its DAGs (`is_authorized_dag`, so per-DAG access control applies); the README
needs the DOCS view permission. Nothing here writes, and no secret is ever rendered.
"""
# no `from __future__ import annotations`: FastAPI reads the routes' annotations (Request, the
# user dependency), imported inside create_app, at runtime

import datetime as dt
import json
import logging
import os
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from functools import cache
from pathlib import Path

from .catalog_view import read_catalog
from .docs_page import MEDIA_TYPES, docs_page, image_path
from .page import ClusterEntry, Page, render_page

log = logging.getLogger(__name__)

URL_PREFIX = "/pgincr"
DETAIL_LIMIT = 25          # more clusters than this: the overview only, one cluster's timeline on demand
RESTORE_POINTS_BUDGET_S = 3.0
RESTORE_POINTS_TTL_S = 60.0
DAG_KINDS = ("weekly_full", "daily_incremental", "hourly_wal", "restore_test", "restore_test_on_backup", "retention")
ICON = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="{c}" stroke-width="2" '
        'stroke-linecap="round" stroke-linejoin="round"><ellipse cx="12" cy="5" rx="8" ry="3"/>'
        '<path d="M4 5v14c0 1.7 3.6 3 8 3s8-1.3 8-3V5"/><path d="M4 12c0 1.7 3.6 3 8 3s8-1.3 8-3"/></svg>')


# ------------------------------------------------------------------------------------------
# configuration: the DAG factory's file


def config_path() -> Path:
    """$PGINCR_CONFIG, else pgincr_clusters.yaml in the DAGs folder (as dags/pgincr_dags.py reads it)."""
    if os.environ.get("PGINCR_CONFIG"):
        return Path(os.environ["PGINCR_CONFIG"])
    from airflow.configuration import conf

    return Path(conf.get("core", "dags_folder")) / "pgincr_clusters.yaml"


_config_cache: dict = {}


def load_clusters():
    """The configured clusters, re-read when the file changes."""
    from airflow_pg_incremental.dag_factory import load_config

    path = config_path()
    try:
        mtime = path.stat().st_mtime
    except OSError:
        from airflow_pg_incremental.core.errors import ConfigError

        raise ConfigError(f"no pgincr configuration at {path}: set PGINCR_CONFIG for the API server as for the "
                          "DAG processor (the Backups view reads the same file)") from None
    key = (str(path), mtime)
    if _config_cache.get("key") != key:
        _config_cache.update(key=key, clusters=load_config(path))
    return _config_cache["clusters"]


def dag_ids(cluster) -> list[str]:
    return [f"{cluster.dag_prefix}_{kind}" for kind in DAG_KINDS]


def visible_clusters(auth_manager, user, clusters) -> list:
    """The clusters `user` may see: those with a DAG whose runs the user may read (so Airflow's
    per-DAG access control decides, and the check needs no DAG in the metadata DB)."""
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    return [c for c in clusters if any(
        auth_manager.is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN, details=DagDetails(id=d),
                                       user=user) for d in dag_ids(c))]


# ------------------------------------------------------------------------------------------
# reading the catalogs and the repositories' restore points


def read_entries(clusters, since: dt.datetime, detail: set[str]) -> tuple[list[ClusterEntry], int]:
    """The facts of `clusters`, each catalog read once (all its clusters together), catalogs in
    parallel. Returns (entries, number of catalog queries)."""
    entries = {c.name: ClusterEntry(c.name, c.rpo_minutes, c.max_backup_age_hours,
                                    f"{c.catalog_conn_id} / {c.catalog_schema}" if c.catalog_conn_id else "none")
               for c in clusters}
    groups: dict[tuple[str, str], list[str]] = {}
    for c in clusters:
        if c.catalog_conn_id:
            groups.setdefault((c.catalog_conn_id, c.catalog_schema), []).append(c.name)
        else:
            entries[c.name].error = ("no catalog configured for this cluster (catalog_conn_id): the Backups view "
                                     "reads the catalog")
    queries = 0
    if groups:
        with ThreadPoolExecutor(max_workers=min(8, len(groups))) as pool:
            futures = {key: pool.submit(_read_group, key, names, since) for key, names in groups.items()}
        for (conn_id, schema), fut in futures.items():
            result, error = fut.result()
            for name in groups[(conn_id, schema)]:
                if error:
                    entries[name].error = f"catalog {conn_id} / {schema}: {error}"
                else:
                    entries[name].facts = result.clusters[name]
            queries += result.queries if result else 0
    _add_restore_points([c for c in clusters if c.name in detail and entries[c.name].facts], entries)
    return list(entries.values()), queries


def _read_group(key: tuple[str, str], names: list[str], since: dt.datetime):
    conn_id, schema = key
    try:
        from airflow_pg_incremental.hooks.repository import PgClusterHook

        conninfo = PgClusterHook(conn_id).get_conninfo()
    except Exception as e:  # not defined here, secrets backend down ...: the message names the conn id only
        return None, (f"the connection {conn_id!r} cannot be read by the API server ({type(e).__name__}: {e}); "
                      "define it where the API server sees it (Admin > Connections, AIRFLOW_CONN_*, a secrets "
                      "backend)")
    result = read_catalog(conninfo, schema, names, since=since)
    return result, result.error


_points_cache: dict[str, tuple[float, list | None, str | None]] = {}
_points_lock = threading.Lock()


def _add_restore_points(clusters, entries: dict[str, ClusterEntry]) -> None:
    """Restore points live in the repository (the catalog does not index them): read each
    cluster's small index there, in parallel, within a time budget, cached for a minute."""
    now = time.monotonic()
    todo = [c for c in clusters if now - _points_cache.get(c.name, (-1e9,))[0] > RESTORE_POINTS_TTL_S]
    if todo:
        pool = ThreadPoolExecutor(max_workers=min(8, len(todo)))
        futures = {c.name: pool.submit(_read_points, c) for c in todo}
        wait(futures.values(), timeout=RESTORE_POINTS_BUDGET_S)
        pool.shutdown(wait=False)  # a slow repository finishes in the background and fills the cache
        for name, fut in futures.items():
            if not fut.done():
                entries[name].facts.restore_points_error = (
                    f"the repository did not answer within {RESTORE_POINTS_BUDGET_S:g} s; reload later")
    for c in clusters:
        cached = _points_cache.get(c.name)
        if cached and entries[c.name].facts.restore_points_error is None:
            entries[c.name].facts.restore_points = cached[1] or []
            entries[c.name].facts.restore_points_error = cached[2]


def _read_points(cluster) -> None:
    try:
        from airflow_pg_incremental.hooks.repository import PgBackupRepositoryHook

        repo = PgBackupRepositoryHook(cluster.repository, aws_conn_id=cluster.aws_conn_id,
                                      **cluster.repository_options()).get_repository()
        points = []
        for key in repo.list(f"{cluster.name}/restore_points"):
            if key.endswith(".json"):
                p = json.loads(repo.get_bytes(key))
                t = dt.datetime.fromisoformat(p["created_at"])
                points.append({**p, "created_at": t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)})
        value = (time.monotonic(), sorted(points, key=lambda p: p["created_at"]), None)
    except Exception as e:
        value = (time.monotonic(), None, f"{type(e).__name__}: {str(e)[:300]}")
    with _points_lock:
        _points_cache[cluster.name] = value


# ------------------------------------------------------------------------------------------
# the app


def _paths(request) -> tuple[str, str]:
    """(this app's URL path, the Airflow UI's URL path), whatever [api] base_url says."""
    mount = request.scope.get("root_path", "").rstrip("/") or URL_PREFIX
    root = mount[: -len(URL_PREFIX)] if mount.endswith(URL_PREFIX) else ""
    return mount, root


def _html(body: str, nonce: str | None = None):
    from fastapi.responses import HTMLResponse

    script = f"'nonce-{nonce}'" if nonce else "'none'"
    return HTMLResponse(body, headers={
        "Content-Security-Policy": f"default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
                                   f"script-src {script}; form-action 'self'; base-uri 'none'; frame-ancestors 'self'",
        "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "same-origin"})


@cache
def create_app():
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse, RedirectResponse, Response
    from starlette.exceptions import HTTPException

    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import AccessView
    from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_view

    # no /docs, /redoc or /openapi.json of its own: nothing here is reachable without a session
    app = FastAPI(title="pgincr Backups view", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def to_login(request: Request, exc: HTTPException):
        if exc.status_code == 401 and "text/html" in request.headers.get("accept", ""):
            return RedirectResponse(get_auth_manager().get_url_login(next_url=str(request.url)), status_code=303)
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.get("/")
    def backups(request: Request, user: GetUserDep, cluster: str | None = None, days: float = 14):
        t0 = time.monotonic()
        mount, root = _paths(request)
        days = min(max(days, 0.04), 366.0)
        notes = []
        try:
            configured = load_clusters()
        except Exception as e:
            configured = []
            notes.append(str(e))
        shown = visible_clusters(get_auth_manager(), user, configured)
        if len(shown) < len(configured):
            notes.append(f"{len(configured) - len(shown)} cluster(s) hidden: you may not read their DAGs' runs")
        if cluster:
            shown = [c for c in shown if c.name == cluster]
            if not shown:
                notes.append(f"no cluster {cluster!r} that you may see")
        detail = {c.name for c in shown} if cluster or len(shown) <= DETAIL_LIMIT else set()
        if not detail and shown:
            notes.append(f"{len(shown)} clusters: choose one for its timeline")
        now = dt.datetime.now(dt.timezone.utc)
        since = now - dt.timedelta(days=days)
        entries, queries = read_entries(shown, since, detail)
        page = Page(entries=entries, now=now, since=since, days=days, airflow_root=root, mount=mount,
                    nonce=secrets.token_urlsafe(16), detail=[e.name for e in entries if e.name in detail],
                    notes=notes, queries=queries, selected=cluster, elapsed_ms=(time.monotonic() - t0) * 1000)
        return _html(render_page(page), page.nonce)

    @app.get("/icon.svg")
    def icon(user: GetUserDep, dark: bool = False):
        return Response(ICON.format(c="#e2e8f0" if dark else "#2d3748"), media_type="image/svg+xml",
                        headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/docs", dependencies=[Depends(requires_access_view(AccessView.DOCS))])
    def docs(request: Request):
        mount, _ = _paths(request)
        return _html(docs_page(f"{mount}/docs", f"{mount}/"))

    @app.get("/docs/{name}", dependencies=[Depends(requires_access_view(AccessView.DOCS))])
    def docs_image(name: str):
        path = image_path(name)
        if path is None:
            raise HTTPException(404, "no such image")
        return Response(path.read_bytes(), media_type=MEDIA_TYPES[path.suffix[1:].lower()],
                        headers={"Cache-Control": "private, max-age=3600"})

    return app
