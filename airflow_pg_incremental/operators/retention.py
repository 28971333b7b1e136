"""Retention operator: plan (dry run, logged) or apply a retention policy. One engine call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from airflow.sdk import Context

from airflow_pg_incremental.operators.backup import _PgBackupBase

_TRUE = {"true", "1", "yes", "on", "y", "t"}
_FALSE = {"false", "0", "no", "off", "n", "f", ""}


def _opt_number(name: str, value, cast):
    """Templated fields arrive as strings ('7', 'None', ''); None/''/'None' mean 'not set'."""
    from airflow_pg_incremental.core.errors import ConfigError

    if value is None or (isinstance(value, str) and value.strip() in ("", "None", "none", "null")):
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    try:
        num = float(value) if isinstance(value, str) else value
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if cast is int and isinstance(num, float):
        if not num.is_integer():
            raise ConfigError(f"{name} must be a whole number, got {value!r}")
        num = int(num)
    return num


def _flag(name: str, value) -> bool:
    from airflow_pg_incremental.core.errors import ConfigError

    if isinstance(value, bool):
        return value
    if value is None:
        return False
    s = str(value).strip().lower()
    if s in _TRUE:
        return True
    if s in _FALSE:
        return False
    raise ConfigError(f"{name} must be true or false, got {value!r}")


class PgRetentionOperator(_PgBackupBase):
    """Deletes backups, WAL and restore points a retention policy no longer needs, never a backup a
    kept backup depends on nor WAL needed for a kept backup or the recovery window.

    Policy: `keep_full_chains` (newest N full chains), `recovery_window_days` (every point of the
    last D days stays restorable), `min_redundancy` (newest M full chains never deleted, default 1),
    `pinned` (backup ids kept with their ancestors; a list or a comma-separated string). With
    `dry_run=True` the plan is only computed and logged: a DAG can run plan -> apply.
    `postgres_conn_id` is not needed (the repository alone is read).

    XCom: {cluster, dry_run, applied, kept, delete_backups, wal_files, wal_first, wal_last,
    other_objects, leftovers, restore_points, bytes_freed, wal_horizon, window_start,
    window_anchor, warnings}.
    """

    template_fields: Sequence[str] = (*_PgBackupBase.template_fields, "keep_full_chains", "recovery_window_days",
                                      "min_redundancy", "pinned", "dry_run")
    ui_color = "#f5e0d3"

    def __init__(self, *, keep_full_chains: int | str | None = None, recovery_window_days: float | str | None = None,
                 min_redundancy: int | str = 1, pinned: list[str] | str | None = None, dry_run: bool | str = False,
                 postgres_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(postgres_conn_id=postgres_conn_id or "", **kwargs)
        self.keep_full_chains = keep_full_chains
        self.recovery_window_days = recovery_window_days
        self.min_redundancy = min_redundancy
        self.pinned = pinned
        self.dry_run = dry_run

    def _policy(self):
        from airflow_pg_incremental.core.retention import RetentionPolicy

        pinned = self.pinned
        if isinstance(pinned, str) and pinned.strip() in ("None", "[]"):
            pinned = None
        mr = _opt_number("min_redundancy", self.min_redundancy, int)
        return RetentionPolicy(keep_full_chains=_opt_number("keep_full_chains", self.keep_full_chains, int),
                               recovery_window_days=_opt_number("recovery_window_days", self.recovery_window_days,
                                                                float),
                               min_redundancy=1 if mr is None else mr, pinned=pinned)

    def execute(self, context: Context) -> dict:
        from airflow_pg_incremental.core.retention import apply_retention, summary

        policy = self._policy()
        dry_run = _flag("dry_run", self.dry_run)
        self.log.info("Retention of %s (%s)%s", self.cluster, policy.describe(), ": plan only (dry run)" if dry_run
                      else "")
        result = apply_retention(self._repo(), self.cluster, policy, dry_run=dry_run,
                                 catalog=self._catalog())  # also read by a dry run: verification evidence
        out = summary(result)
        for w in out["warnings"]:
            self.log.warning("%s", w)
        return out
