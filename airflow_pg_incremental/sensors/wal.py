"""Sensors on the WAL archive: "is the WAL of this backup archived?" and "is archiving keeping up?"
(the RPO check). Both work in poke/reschedule mode and, with deferrable=True, through the triggers
in airflow_pg_incremental.triggers.wal. Both return a small JSON dict as XCom.

Errors are never swallowed: soft_fail stays False unless you set it, a bad argument fails the task
without retries, and a timeout fails it with a message that says what was waited for.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Sequence
from typing import Any

from airflow.sdk import BaseSensorOperator, Context, PokeReturnValue
from airflow.sdk.exceptions import AirflowException, AirflowFailException, AirflowSensorTimeout

from airflow_pg_incremental.core.errors import ConfigError
from airflow_pg_incremental.core.lsn import DEFAULT_SEGMENT_SIZE, parse_lsn, wal_file_name, wal_name_kind

# A deferred task that the trigger does not resume (triggerer down, ...) is failed by the
# scheduler this long after the trigger's own deadline.
_DEFER_GRACE_S = 120.0


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def _clean_str(value: Any, what: str, example: str) -> str:
    """A rendered template value as a plain string; clear errors for None / dicts / lists."""
    if isinstance(value, dict):
        keys = ", ".join(map(str, list(value)[:8]))
        raise ConfigError(f"{what} is a dict (keys: {keys}), not a string like {example!r}: pick one field, "
                          f"e.g. \"{{{{ ti.xcom_pull(task_ids='full_backup')['stop_lsn'] }}}}\"")
    if isinstance(value, (list, tuple, set)):
        raise ConfigError(f"{what} is a {type(value).__name__}, not a string like {example!r}")
    if value is None:
        raise ConfigError(f"{what} is empty (None): the upstream XCom it is templated from is missing?")
    text = str(value).strip().strip("'\"").strip()
    if text in ("", "None", "null"):
        raise ConfigError(f"{what} rendered to {str(value)!r}: the upstream XCom it is templated from is missing "
                          f"or has no such field; expected a string like {example!r}")
    if text.startswith("{"):
        raise ConfigError(f"{what} rendered to a dict {text[:80]!r}, not a string like {example!r}: pick one "
                          f"field, e.g. \"{{{{ ti.xcom_pull(task_ids='full_backup')['stop_lsn'] }}}}\"")
    return text


def _timeline(value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"timeline must be a positive integer, got {value!r}")
    try:
        tli = int(value) if isinstance(value, int) else int(_clean_str(value, "timeline", "1"))
    except ValueError:
        raise ConfigError(f"timeline must be a positive integer, got {value!r}") from None
    if not 1 <= tli <= 0xFFFFFFFF:
        raise ConfigError(f"timeline must be between 1 and 4294967295, got {tli}")
    return tli


def _seconds(value: Any, what: str) -> float:
    """int/float/numeric string/timedelta -> positive float seconds."""
    if isinstance(value, dt.timedelta):
        out = value.total_seconds()
    elif isinstance(value, bool):
        raise ConfigError(f"{what} must be a number of seconds, got {value!r}")
    elif isinstance(value, (int, float)):
        out = float(value)
    else:
        text = _clean_str(value, what, "3600")
        try:
            out = float(text)
        except ValueError:
            raise ConfigError(f"{what} must be a number of seconds (e.g. 900), got {value!r}") from None
    if not out > 0 or out != out or out == float("inf"):
        raise ConfigError(f"{what} must be a positive number of seconds, got {value!r}")
    return out


def resolve_segment(*, lsn: Any = None, segment: Any = None, timeline: Any = 1,
                    segment_size: int = DEFAULT_SEGMENT_SIZE) -> str:
    """The WAL segment name to wait for: `segment` itself, or the segment holding `lsn` on `timeline`."""
    if (lsn is None) == (segment is None):
        raise ConfigError("give exactly one of lsn (e.g. '0/3000028') or segment (e.g. '000000010000000000000003')")
    if segment is not None:
        name = _clean_str(segment, "segment", "000000010000000000000003").upper()
        try:
            kind = wal_name_kind(name)
        except ConfigError:
            kind = None
        if kind != "segment":
            raise ConfigError(f"segment {segment!r} is not a WAL segment name (24 hex digits, e.g. "
                              "000000010000000000000003)")
        return name
    return wal_file_name(_timeline(timeline), parse_lsn(_clean_str(lsn, "lsn", "0/3000028")), segment_size)


class _WalSensorBase(BaseSensorOperator):
    template_fields: Sequence[str] = ("cluster", "repository", "aws_conn_id", "encryption_key_conn_id")
    ui_color = "#e0ecd9"

    def __init__(self, *, cluster: str, repository: str, aws_conn_id: str | None = None, deferrable: bool = False,
                 poke_interval: float = 30, timeout: float = 1800, mode: str = "poke",
                 encryption_key_conn_id: str | None = None, s3_sse: str | None = None,
                 s3_sse_kms_key_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(poke_interval=poke_interval, timeout=timeout, mode=mode, **kwargs)
        self.cluster = cluster
        self.repository = repository
        self.aws_conn_id = aws_conn_id
        self.encryption_key_conn_id = encryption_key_conn_id  # the key of an encrypted repository
        # (s3_sse, s3_sse_kms_key_id: accepted with the cluster's other repository options; a sensor
        # only reads, and S3 decrypts server-side-encrypted objects by itself)
        self.deferrable = deferrable

    # engine objects at execute time only (no I/O in constructors)
    def _repo(self):
        from airflow_pg_incremental.hooks.repository import PgBackupRepositoryHook

        return PgBackupRepositoryHook(self.repository, self.aws_conn_id,
                                      encryption_key_conn_id=self.encryption_key_conn_id).get_repository()

    def _timeout_message(self) -> str:
        raise NotImplementedError

    def execute(self, context: Context) -> Any:
        if self.deferrable:
            return self._execute_deferrable(context)
        try:
            return super().execute(context)
        except AirflowSensorTimeout as e:  # Airflow's message says nothing about what was awaited
            raise AirflowSensorTimeout(f"{self._timeout_message()} ({e})") from e

    def _execute_deferrable(self, context: Context) -> Any:
        raise NotImplementedError

    def _defer_to(self, trigger) -> None:
        self.defer(trigger=trigger, method_name="execute_complete",
                   timeout=dt.timedelta(seconds=self.timeout + max(_DEFER_GRACE_S, 3 * self.poke_interval)))

    @staticmethod
    def _event(event: Any) -> dict:
        if not isinstance(event, dict):
            raise AirflowException(f"the trigger ended without a usable event ({event!r})")
        return event


class WalArchivedSensor(_WalSensorBase):
    """Waits until one WAL segment is in the repository: the segment holding `lsn` on `timeline`
    (e.g. a backup's stop LSN, "{{ ti.xcom_pull(task_ids='full_backup')['stop_lsn'] }}"), or the
    segment named by `segment`.

    XCom: {"segment": "000000010000000000000003", "key": "<cluster>/wal/00000001/...zst"}.
    """

    template_fields: Sequence[str] = (*_WalSensorBase.template_fields, "lsn", "segment", "timeline")

    def __init__(self, *, cluster: str, repository: str, aws_conn_id: str | None = None, lsn: str | None = None,
                 segment: str | None = None, timeline: int | str = 1, segment_size: int = DEFAULT_SEGMENT_SIZE,
                 deferrable: bool = False, poke_interval: float = 30, timeout: float = 1800,
                 **kwargs: Any) -> None:
        super().__init__(cluster=cluster, repository=repository, aws_conn_id=aws_conn_id, deferrable=deferrable,
                         poke_interval=poke_interval, timeout=timeout, **kwargs)
        if (lsn is None) == (segment is None):
            raise ConfigError("WalArchivedSensor: give exactly one of lsn (e.g. '0/3000028' or a template) or "
                              "segment (e.g. '000000010000000000000003')")
        if not isinstance(segment_size, int) or segment_size < 1024 * 1024 or segment_size > 1024 ** 3 \
                or segment_size & (segment_size - 1):
            raise ConfigError(f"segment_size must be a power of two between 1 MiB and 1 GiB, got {segment_size!r}")
        self.lsn = lsn
        self.segment = segment
        self.timeline = timeline
        self.segment_size = segment_size
        # fail at DAG parse time for literal garbage; templated values are checked once rendered
        if not any(_is_template(v) for v in (lsn, segment, timeline)):
            resolve_segment(lsn=lsn, segment=segment, timeline=timeline, segment_size=segment_size)

    def target_segment(self) -> str:
        """The segment name from the (rendered) arguments; AirflowFailException (no retry) when invalid."""
        try:
            return resolve_segment(lsn=self.lsn, segment=self.segment, timeline=self.timeline,
                                   segment_size=self.segment_size)
        except ConfigError as e:
            raise AirflowFailException(f"{self.task_id}: {e}") from e

    def _timeout_message(self) -> str:
        what = f"holding LSN {self.lsn} on timeline {self.timeline}" if self.lsn is not None else "named"
        try:
            seg = self.target_segment()
        except AirflowFailException:
            seg = "?"
        return (f"WAL segment {seg} ({what}) of cluster {self.cluster!r} was not archived in {self.repository} "
                f"within {self.timeout:g}s: check archive_command / pg_stat_archiver on the server")

    def poke(self, context: Context) -> bool | PokeReturnValue:
        """False while the segment is missing; PokeReturnValue(True, {"segment", "key"}) (truthy) once it is there."""
        from airflow_pg_incremental.triggers.wal import check_archived

        seg = self.target_segment()
        found = check_archived(self._repo(), self.cluster, seg)
        if found is None:
            self.log.info("WAL segment %s of cluster %s is not archived yet", seg, self.cluster)
            return False
        self.log.info("WAL segment %s is archived (%s)", seg, found["key"])
        return PokeReturnValue(is_done=True, xcom_value=found)

    def _execute_deferrable(self, context: Context) -> Any:
        from airflow_pg_incremental.triggers.wal import WalArchivedTrigger, check_archived

        seg = self.target_segment()
        started = time.time()
        found = check_archived(self._repo(), self.cluster, seg)
        if found is not None:
            self.log.info("WAL segment %s is archived already (%s)", seg, found["key"])
            return found
        self.log.info("WAL segment %s of cluster %s is not archived yet: deferring (poll every %gs, up to %gs)",
                      seg, self.cluster, self.poke_interval, self.timeout)
        self._defer_to(WalArchivedTrigger(cluster=self.cluster, repository=self.repository,
                                          encryption_key_conn_id=self.encryption_key_conn_id,
                                          aws_conn_id=self.aws_conn_id, segment=seg,
                                          poll_interval=self.poke_interval, timeout_s=self.timeout,
                                          deadline=started + self.timeout))

    def execute_complete(self, context: Context, event: dict | None = None) -> dict:
        event = self._event(event)
        if event.get("status") == "success":
            self.log.info("WAL segment %s is archived (%s)", event["segment"], event["key"])
            return {"segment": event["segment"], "key": event["key"]}
        if event.get("status") == "timeout":
            raise AirflowSensorTimeout(event.get("message") or self._timeout_message())
        raise AirflowException(f"waiting for WAL segment {event.get('segment') or self.segment or self.lsn} of "
                               f"cluster {self.cluster!r} failed: {event.get('message', event)}")


def _rpo_metric(cluster: str, breached: bool) -> None:
    from airflow_pg_incremental.metrics import emit

    emit(cluster, {"rpo.breached": 1 if breached else 0})


class WalFreshnessSensor(_WalSensorBase):
    """The RPO check: succeeds when the newest archived WAL segment of `cluster` was written less than
    `max_age_s` seconds ago. While the archive is empty or stale it keeps checking until `timeout`
    (default 10 minutes, so an archive in flight can land), then fails with e.g.
    "RPO breached: newest archived WAL 000000010000000000000005 ... was written 2h 3m ago (limit 15m)".

    With `postgres_conn_id`, an old newest segment is not a breach when the server has written no
    WAL past it (an idle server produces no segment to archive: nothing is at risk); the server is
    asked on the worker, never from the triggerer. Without it, an idle server looks stale.

    XCom: {"segment", "key", "modified" (ISO time), "age_s", "max_age_s"}, plus "idle" and
    "unarchived_bytes" when the server was asked.
    """

    template_fields: Sequence[str] = (*_WalSensorBase.template_fields, "max_age_s", "postgres_conn_id")

    def __init__(self, *, cluster: str, repository: str, aws_conn_id: str | None = None,
                 max_age_s: float | str = 3600, postgres_conn_id: str | None = None, deferrable: bool = False,
                 poke_interval: float = 30, timeout: float = 600, **kwargs: Any) -> None:
        super().__init__(cluster=cluster, repository=repository, aws_conn_id=aws_conn_id, deferrable=deferrable,
                         poke_interval=poke_interval, timeout=timeout, **kwargs)
        self.max_age_s = max_age_s
        self.postgres_conn_id = postgres_conn_id
        if not _is_template(max_age_s):
            _seconds(max_age_s, "max_age_s")
        self._last_state: dict | None = None

    def max_age_seconds(self) -> float:
        try:
            return _seconds(self.max_age_s, "max_age_s")
        except ConfigError as e:
            raise AirflowFailException(f"{self.task_id}: {e}") from e

    @staticmethod
    def _xcom(state: dict) -> dict:
        out = {k: state.get(k) for k in ("segment", "key", "modified", "age_s", "max_age_s")}
        out.update({k: state[k] for k in ("idle", "unarchived_bytes") if k in state})  # when the server was asked
        return out

    def _check(self) -> dict:
        from airflow_pg_incremental.triggers.wal import check_freshness, format_duration

        from airflow_pg_incremental.metrics import emit

        state = check_freshness(self._repo(), self.cluster, self.max_age_seconds())
        self._last_state = state
        emit(self.cluster, {"wal.archive_age_seconds": state.get("age_s")})
        if state["segment"] is None:
            self.log.warning("the WAL archive of cluster %s is empty", self.cluster)
        else:
            self.log.info("newest archived WAL %s was written %s ago (limit %s): %s", state["segment"],
                          format_duration(state["age_s"]), format_duration(state["max_age_s"]),
                          "fresh" if state["fresh"] else "STALE")
        if not state["fresh"] and state["segment"] and self.postgres_conn_id:
            self._idle_check(state)
        return state

    def _idle_check(self, state: dict) -> None:
        """Stale archive, but has the server written anything since? Asked on the worker."""
        from airflow_pg_incremental.core.capture import wal_beyond_archive
        from airflow_pg_incremental.core.errors import PgIncrError
        from airflow_pg_incremental.hooks.repository import PgClusterHook

        try:
            pos = wal_beyond_archive(PgClusterHook(self.postgres_conn_id).get_conninfo(), state["segment"])
        except PgIncrError as e:
            self.log.warning("could not ask the server whether it wrote WAL past %s: %s", state["segment"], e)
            return
        state["unarchived_bytes"] = pos["unarchived_bytes"]
        if pos["unarchived_bytes"] == 0:
            state.update(fresh=True, idle=True)
            self.log.info("the server has written no WAL past %s (server at %s, archive ends at %s): idle, nothing "
                          "unarchived, the RPO holds", state["segment"], pos["server_lsn"], pos["archive_end_lsn"])
        elif pos["unarchived_bytes"] is None:
            self.log.warning("the server is on timeline %s, the archive's newest segment %s is not: not comparable",
                             pos["server_timeline"], state["segment"])
        else:
            self.log.warning("the server holds %d bytes of WAL past the archive's end %s (server at %s)",
                             pos["unarchived_bytes"], pos["archive_end_lsn"], pos["server_lsn"])

    def poke(self, context: Context) -> bool | PokeReturnValue:
        """False while the archive is empty or stale; PokeReturnValue(True, xcom) (truthy) when fresh."""
        state = self._check()
        if state["fresh"]:
            _rpo_metric(self.cluster, breached=False)
            return PokeReturnValue(is_done=True, xcom_value=self._xcom(state))
        return False

    def _timeout_message(self) -> str:  # the sensor gives up: the RPO is breached
        _rpo_metric(self.cluster, breached=True)
        from airflow_pg_incremental.triggers.wal import stale_message

        state = self._last_state or {"segment": None, "age_s": None, "max_age_s": self.max_age_seconds()}
        return stale_message(self.cluster, self.repository, state)

    def _execute_deferrable(self, context: Context) -> Any:
        from airflow_pg_incremental.triggers.wal import WalFreshnessTrigger

        started = time.time()
        state = self._check()
        if state["fresh"]:
            _rpo_metric(self.cluster, breached=False)
            return self._xcom(state)
        self.log.info("deferring: polling every %gs for up to %gs", self.poke_interval, self.timeout)
        self._defer_to(WalFreshnessTrigger(cluster=self.cluster, repository=self.repository,
                                           encryption_key_conn_id=self.encryption_key_conn_id,
                                           aws_conn_id=self.aws_conn_id, max_age_s=state["max_age_s"],
                                           poll_interval=self.poke_interval, timeout_s=self.timeout,
                                           deadline=started + self.timeout))

    def execute_complete(self, context: Context, event: dict | None = None) -> dict:
        from airflow_pg_incremental.triggers.wal import stale_message

        event = self._event(event)
        status = event.get("status")
        if status == "fresh":
            _rpo_metric(self.cluster, breached=False)
            return self._xcom(event)
        if status == "stale":
            if self.postgres_conn_id and event.get("segment"):  # an idle server is not a breach
                state = self._check()
                if state["fresh"]:
                    _rpo_metric(self.cluster, breached=False)
                    return self._xcom(state)
            _rpo_metric(self.cluster, breached=True)
            raise AirflowSensorTimeout(event.get("message") or stale_message(self.cluster, self.repository, event))
        raise AirflowException(f"checking the WAL archive of cluster {self.cluster!r} failed: "
                               f"{event.get('message', event)}")
