"""Triggers behind the deferrable WAL sensors, and the blocking checks both sensors and triggers run.

Each trigger polls the repository every `poll_interval` seconds (the blocking repository calls run in
a worker thread through `asyncio.to_thread`) and yields exactly one event:

    WalArchivedTrigger   {"status": "success", "segment", "key", ...}
                         {"status": "timeout", "segment", "key", "message", ...}
    WalFreshnessTrigger  {"status": "fresh", "segment", "key", "age_s", "max_age_s", ...}
                         {"status": "stale", "segment" (None when the archive is empty), "age_s", "message", ...}
    both                 {"status": "error", "message"} when the repository could not be read

A trigger never waits forever: it gives up at its own deadline (`timeout_s` after it was created,
kept as an absolute `deadline` in its serialized kwargs so a triggerer restart does not extend it).
The payload carries everything the task needs on resume (Airflow 3.3.2 drops `defer(kwargs=...)`).
Serialized kwargs hold the repository string and the connection id only, never credentials.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_pg_incremental.core.errors import ObjectNotFound
from airflow_pg_incremental.core.repository import Repository
from airflow_pg_incremental.core.wal import newest_archived, wal_key


# ---------------------------------------------------------------------------------------------
# blocking checks, shared by the sensors (poke mode, first check before deferring) and the triggers
def format_duration(seconds: float) -> str:
    """90 -> '1m 30s', 7380 -> '2h 3m', 900 -> '15m', 93600 -> '1d 2h'."""
    s = int(round(max(0.0, float(seconds))))
    if s < 60:
        return f"{s}s"
    days, rest = divmod(s, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h {minutes}m" if minutes else f"{hours}h"
    return f"{minutes}m {secs}s" if secs else f"{minutes}m"


def check_archived(repo: Repository, cluster: str, segment: str) -> dict | None:
    """{'segment', 'key'} when `segment` is in the archive, else None."""
    key = wal_key(cluster, segment)
    return {"segment": segment, "key": key} if repo.exists(key) else None


def check_freshness(repo: Repository, cluster: str, max_age_s: float,
                    now: dt.datetime | None = None) -> dict:
    """Age of the newest archived WAL segment of `cluster`.

    {'fresh', 'segment', 'key', 'modified', 'age_s', 'max_age_s'}; segment/key/modified/age_s are
    None when the archive holds no segment (then fresh is False)."""
    for attempt in (1, 2):
        newest = newest_archived(repo, cluster)
        if newest is None:
            return {"fresh": False, "segment": None, "key": None, "modified": None, "age_s": None,
                    "max_age_s": max_age_s}
        key = wal_key(cluster, newest)
        try:
            modified = repo.modified(key)
        except ObjectNotFound:  # removed by retention between listing and HEAD: list once more
            if attempt == 2:
                raise
            continue
        now = now or dt.datetime.now(dt.timezone.utc)
        age = max(0.0, (now - modified).total_seconds())  # clamp clock skew of an S3 server
        return {"fresh": age < max_age_s, "segment": newest, "key": key, "modified": modified.isoformat(),
                "age_s": round(age, 3), "max_age_s": max_age_s}
    raise AssertionError("unreachable")


def stale_message(cluster: str, repository: str, state: dict) -> str:
    """The RPO breach message for a freshness state from check_freshness()."""
    limit = format_duration(state["max_age_s"])
    if not state.get("segment"):
        return (f"RPO breached: the WAL archive of cluster {cluster!r} in {repository} is empty (no WAL segment "
                f"archived at all; limit {limit}). Check archive_command / the WAL capture of this cluster.")
    return (f"RPO breached: newest archived WAL {state['segment']} of cluster {cluster!r} was written "
            f"{format_duration(state['age_s'])} ago (limit {limit}; repository {repository}). WAL archiving is "
            "stalled or failing: check archive_command / pg_stat_archiver on the server.")


def _repository(repository: str, aws_conn_id: str | None, encryption_key_conn_id: str | None = None) -> Repository:
    from airflow_pg_incremental.hooks.repository import PgBackupRepositoryHook

    return PgBackupRepositoryHook(repository, aws_conn_id,
                                  encryption_key_conn_id=encryption_key_conn_id).get_repository()


# ---------------------------------------------------------------------------------------------
class _RepositoryPollingTrigger(BaseTrigger):
    """Poll `_check()` (blocking, in a thread) until it reports done or the deadline passes."""

    def __init__(self, *, cluster: str, repository: str, aws_conn_id: str | None = None,
                 poll_interval: float = 30.0, timeout_s: float = 1800.0, deadline: float | None = None,
                 encryption_key_conn_id: str | None = None) -> None:
        super().__init__()
        self.cluster = cluster
        self.repository = repository
        self.aws_conn_id = aws_conn_id
        self.encryption_key_conn_id = encryption_key_conn_id  # the connection's id, never the key
        self.poll_interval = max(0.05, float(poll_interval))
        self.timeout_s = float(timeout_s)
        # absolute (epoch seconds), fixed when the sensor creates the trigger; serialized with it
        self.deadline = float(deadline) if deadline is not None else time.time() + self.timeout_s
        self._repo: Repository | None = None

    def _common_kwargs(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "repository": self.repository, "aws_conn_id": self.aws_conn_id,
                "poll_interval": self.poll_interval, "timeout_s": self.timeout_s, "deadline": self.deadline,
                **({"encryption_key_conn_id": self.encryption_key_conn_id} if self.encryption_key_conn_id else {})}

    def _get_repo(self) -> Repository:  # blocking: call from the worker thread only
        if self._repo is None:
            from airflow_pg_incremental.core.names import validate_cluster

            validate_cluster(self.cluster)  # a bad name is refused before any I/O
            self._repo = _repository(self.repository, self.aws_conn_id, self.encryption_key_conn_id)
        return self._repo

    # subclasses ------------------------------------------------------------------------------
    def _check(self) -> tuple[bool, dict]:
        """Blocking: (done, state)."""
        raise NotImplementedError

    def _done_event(self, state: dict) -> dict:
        raise NotImplementedError

    def _timeout_event(self, state: dict | None) -> dict:
        raise NotImplementedError

    # -----------------------------------------------------------------------------------------
    async def run(self) -> AsyncIterator[TriggerEvent]:
        polls = 0
        state: dict | None = None
        while True:
            try:
                done, state = await asyncio.to_thread(self._check)
            except Exception as e:  # reported to the task, which fails with it
                self.log.exception("checking the WAL archive failed")
                yield TriggerEvent({"status": "error", "cluster": self.cluster, "repository": self.repository,
                                    "message": f"{type(e).__name__}: {e}"})
                return
            polls += 1
            if done:
                yield TriggerEvent({**self._done_event(state), "polls": polls})
                return
            remaining = self.deadline - time.time()
            if remaining <= 0:
                yield TriggerEvent({**self._timeout_event(state), "polls": polls})
                return
            await asyncio.sleep(min(self.poll_interval, remaining))


class WalArchivedTrigger(_RepositoryPollingTrigger):
    """Fires when WAL segment `segment` of `cluster` is in the repository."""

    def __init__(self, *, segment: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.segment = segment

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("airflow_pg_incremental.triggers.wal.WalArchivedTrigger",
                {**self._common_kwargs(), "segment": self.segment})

    def _check(self) -> tuple[bool, dict]:
        found = check_archived(self._get_repo(), self.cluster, self.segment)
        return (found is not None), (found or {"segment": self.segment, "key": wal_key(self.cluster, self.segment)})

    def _done_event(self, state: dict) -> dict:
        return {"status": "success", **state}

    def _timeout_event(self, state: dict | None) -> dict:
        return {"status": "timeout", "segment": self.segment, "key": wal_key(self.cluster, self.segment),
                "cluster": self.cluster, "repository": self.repository, "timeout_s": self.timeout_s,
                "message": f"WAL segment {self.segment} of cluster {self.cluster!r} was not archived in "
                           f"{self.repository} within {format_duration(self.timeout_s)}: check archive_command / "
                           "pg_stat_archiver on the server"}


class WalFreshnessTrigger(_RepositoryPollingTrigger):
    """Fires 'fresh' as soon as the newest archived segment is younger than `max_age_s`, or 'stale'
    (with the newest segment and its age) at the deadline."""

    def __init__(self, *, max_age_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_age_s = float(max_age_s)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return ("airflow_pg_incremental.triggers.wal.WalFreshnessTrigger",
                {**self._common_kwargs(), "max_age_s": self.max_age_s})

    def _check(self) -> tuple[bool, dict]:
        state = check_freshness(self._get_repo(), self.cluster, self.max_age_s)
        return state["fresh"], state

    def _done_event(self, state: dict) -> dict:
        return {"status": "fresh", **state}

    def _timeout_event(self, state: dict | None) -> dict:
        state = state or {"fresh": False, "segment": None, "key": None, "modified": None, "age_s": None,
                          "max_age_s": self.max_age_s}
        return {"status": "stale", **state, "cluster": self.cluster, "repository": self.repository,
                "timeout_s": self.timeout_s, "message": stale_message(self.cluster, self.repository, state)}
