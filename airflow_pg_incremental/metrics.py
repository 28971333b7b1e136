"""Airflow metrics of the backups (StatsD / OpenTelemetry through Airflow's `Stats`).

Every name is `pgincr.<cluster>.<metric>`:

    backup.raw_bytes, backup.stored_bytes, backup.duration_seconds   each backup (its kind in the XCom)
    backup.age_seconds                                               the newest backup's age (backup_fresh)
    backup.stale                                                     1 when older than max_backup_age_hours
    wal.segments_captured, wal.lag_bytes, wal.slot_retained_bytes    each pull capture
    wal.archive_age_seconds, rpo.breached                            each RPO check (wal_fresh)
    verify.ok                                                        each verification (1 passed, 0 failed)
    restore_test.rto_seconds, restore_test.ok                        each restore test

Emitting never fails a task: without a metrics backend configured (`[metrics] statsd_on`, and the
`statsd` package), nothing is sent.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def emit(cluster: str, values: dict) -> None:
    """Gauges `pgincr.<cluster>.<name>` for every value that is not None."""
    try:
        from airflow.sdk.observability.stats import Stats
    except Exception:  # pragma: no cover - outside Airflow
        return
    for name, v in values.items():
        if v is None:
            continue
        try:
            Stats.gauge(f"pgincr.{cluster}.{name}", float(v))
        except Exception as e:  # a metric must never fail the task it describes
            log.debug("could not emit metric %s: %s", name, e)
