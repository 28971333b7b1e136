"""Operators for the WAL archive: switch, pull capture, continuity check. Thin: one engine call each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context

from airflow_pg_incremental.operators.backup import _PgBackupBase


class PgWalSwitchOperator(_PgBackupBase):
    """pg_switch_wal() on the primary (after pg_create_restore_point(name) when
    `restore_point_name` is set). XCom: {lsn, segment, timeline, restore_point?}."""

    template_fields: Sequence[str] = (*_PgBackupBase.template_fields, "restore_point_name")
    ui_color = "#e8d9f5"

    def __init__(self, *, restore_point_name: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.restore_point_name = restore_point_name

    def execute(self, context: Context) -> dict:
        from airflow_pg_incremental.core.capture import switch_wal

        name = self.restore_point_name or None
        return switch_wal(self._conninfo(), restore_point=name, repo=self._repo() if name else None,
                          cluster=self.cluster)


class PgWalCaptureOperator(_PgBackupBase):
    """Pull capture: stores every complete WAL segment from the end of the archive up to
    `upto_lsn` (templated; default the server's flushed WAL) through a physical replication slot
    created on first use, then advances the slot. XCom: segments, bytes, lag, slot retention."""

    template_fields: Sequence[str] = (*_PgBackupBase.template_fields, "upto_lsn", "slot_name")
    ui_color = "#e8d9f5"

    def __init__(self, *, upto_lsn: str | None = None, slot_name: str | None = None,
                 max_slot_retained_bytes: int = 8 << 30, compression_level: int = 3, timeout_s: float = 3600,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.upto_lsn = upto_lsn
        self.slot_name = slot_name
        self.max_slot_retained_bytes = max_slot_retained_bytes
        self.compression_level = compression_level
        self.timeout_s = timeout_s

    def execute(self, context: Context) -> dict:
        from airflow_pg_incremental.core.capture import capture_wal_pull

        from airflow_pg_incremental.metrics import emit

        out = capture_wal_pull(self._conninfo(), self._repo(), self.cluster, slot=self.slot_name or None,
                               upto_lsn=self.upto_lsn or None, max_retained_bytes=self.max_slot_retained_bytes,
                               level=self.compression_level, timeout_s=self.timeout_s, catalog=self._catalog())
        emit(self.cluster, {"wal.segments_captured": out.get("segments"), "wal.lag_bytes": out.get("lag_bytes"),
                            "wal.slot_retained_bytes": out.get("slot_retained_before_bytes")})
        return out


class PgWalContinuityOperator(_PgBackupBase):
    """Lists the archive per timeline and fails when WAL is missing between the oldest backup's
    start and the newest archived segment, or a timeline history file is missing. Records the
    archived segments in the catalog."""

    ui_color = "#e8d9f5"

    def __init__(self, *, fail_on_gap: bool = True, postgres_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(postgres_conn_id=postgres_conn_id or "", **kwargs)
        self.fail_on_gap = fail_on_gap

    def execute(self, context: Context) -> dict:
        from airflow_pg_incremental.core.capture import check_continuity

        rep = check_continuity(self._repo(), self.cluster, catalog=self._catalog(), fail_on_gap=self.fail_on_gap)
        return {k: rep[k] for k in ("cluster", "ok", "problems", "newest_timeline", "oldest_backup", "backups")} | {
            "timelines": {k: {kk: v[kk] for kk in ("first", "last", "count", "missing_count")}
                          for k, v in rep["timelines"].items()}}
