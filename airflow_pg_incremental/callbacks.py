"""Alerting: failure callbacks that record the alert in the catalog and hand it to the notifiers
configured per cluster (SMTP, Slack, or any Airflow notifier class)."""

from __future__ import annotations

import importlib
import logging
from typing import Any, Callable

log = logging.getLogger(__name__)


def build_notifiers(specs: list[dict] | None) -> list:
    """[{"class": "airflow.providers.smtp.notifications.smtp.SmtpNotifier", "kwargs": {...}}] ->
    notifier instances (callables taking the context)."""
    out = []
    for spec in specs or []:
        path = spec["class"]
        mod, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(mod), name)  # lazy: only the configured providers
        out.append(cls(**(spec.get("kwargs") or {})))
    return out


def restore_failure(clusters: dict[str, dict]) -> Callable:
    """The on-demand restore DAG's failure callback: one DAG for all clusters, so the cluster comes
    from the run's params; the alert goes to that cluster's catalog and notifiers."""

    def _callback(context: Any) -> None:
        cluster = (context.get("params") or {}).get("cluster")
        cfg = clusters.get(cluster) or {}
        record_failure(cluster, cfg.get("catalog_conn_id"), cfg.get("catalog_schema") or "pgincr")(context)
        for notifier in build_notifiers(cfg.get("notifiers")):
            try:
                notifier(context)
            except Exception as e:  # one notifier must not silence the others
                log.error("notifier %s failed: %s", type(notifier).__name__, e)

    return _callback


def record_failure(cluster: str, catalog_conn_id: str | None, catalog_schema: str = "pgincr") -> Callable:
    """A callback that records a failed task (and a missed RPO) in the catalog's alerts table."""

    def _callback(context: Any) -> None:
        ti = context.get("ti") or context.get("task_instance")
        exc = context.get("exception")
        task_id = getattr(ti, "task_id", None)
        kind = {"wal_fresh": "rpo_breached", "backup_fresh": "backup_stale"}.get(task_id, "task_failed")
        message = f"{getattr(ti, 'dag_id', '?')}.{task_id} failed: {exc}"
        log.error("pgincr alert (%s) for %s: %s", kind, cluster, message)
        if not catalog_conn_id:
            return
        try:
            from airflow_pg_incremental.hooks.repository import PgClusterHook

            PgClusterHook(catalog_conn_id).get_catalog(catalog_schema).record_alert(
                kind=kind, message=message, cluster=cluster, dag_id=getattr(ti, "dag_id", None), task_id=task_id,
                run_id=getattr(ti, "run_id", None))
        except Exception as e:  # an alert must never hide the failure it reports
            log.error("could not record the alert in the catalog: %s", e)

    return _callback
