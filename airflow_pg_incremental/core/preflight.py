"""Checks run before a backup, with nothing written to the repository except a probe object.

A backup is only useful for point-in-time recovery when the WAL from its start on reaches the
repository: `ensure_wal_archiving` makes sure it will, before the backup starts (pull mode: the
replication slot exists and holds the WAL; push mode: archive_command pushes into this
repository and cluster), or refuses, naming the fix.
"""

from __future__ import annotations

import logging
import re

from .backup import check_source, server_facts
from .binaries import find_program
from .errors import ConfigError
from .metadata import cleanup_abandoned_writes, cleanup_incomplete
from .names import validate_cluster
from .pgconn import ConnInfo, connect
from .repository import LocalRepository, Repository

log = logging.getLogger(__name__)

WAL_MODES = ("auto", "pull", "push", "none")
_NOOP_COMMANDS = {"", "/bin/true", "/usr/bin/true", "true", ":", "exit 0", "(disabled)"}


def preflight_full(conn: ConnInfo, repo: Repository, cluster: str, *, cleanup_after_s: float = 6 * 3600,
                   slot: str | None = None, catalog=None, create_repository: bool = False,
                   wal_mode: str | None = None, max_slot_retained_bytes: int | None = None,
                   primary: ConnInfo | None = None) -> dict:
    """`slot`: pull mode's replication slot, created here if missing so that it holds the WAL from
    before the backup's start (a slot created after the backup could not capture its WAL).
    `wal_mode` 'push': archive_command must push into this repository and cluster.
    `catalog`: its rows of killed backups (left 'running') are settled, with the same age rule.
    `create_repository`: create the repository when the location holds none yet (an explicit
    setting: otherwise a missing repository is an error, never created by a typo).
    `primary`: `conn` is a streaming standby and this its primary, which archives the WAL (the
    slot and archive_command are checked there); a standby without it is refused when WAL is
    archived, as pg_switch_wal() and the slot need the primary."""
    from .standby import check_standby_source

    validate_cluster(cluster)
    facts = server_facts(conn)
    check_source(facts, conn)
    check_standby_source(facts, conn, primary)
    if facts["in_recovery"] and primary is None and (slot or wal_mode in ("pull", "push")):
        raise ConfigError(f"{conn.describe()} is a streaming standby: its WAL is switched and archived on the primary. "
                          "Give the primary's connection (primary_conn_id in the cluster's configuration, "
                          "--primary-host in the CLI); backups are still read from the standby")
    wal_conn = primary if facts["in_recovery"] and primary is not None else conn
    find_program("pg_basebackup", facts["major"])
    created = _create_repository(repo) if create_repository else False
    repo.check_writable()
    wal = None
    if slot or wal_mode in ("pull", "push"):
        wal = ensure_wal_archiving(wal_conn, repo, cluster, "pull" if slot else wal_mode, slot=slot,
                                   max_slot_retained_bytes=max_slot_retained_bytes)
    removed = cleanup_incomplete(repo, cluster, older_than_s=cleanup_after_s)
    abandoned = cleanup_abandoned_writes(repo, cluster, older_than_s=cleanup_after_s)
    settled = catalog.settle_running(repo, cluster, older_than_s=cleanup_after_s) if catalog is not None else []
    result = {"cluster": cluster, "pg_major": facts["major"], "system_identifier": facts["system_identifier"],
              "data_checksums": facts["data_checksums"], "summarize_wal": facts["summarize_wal"],
              "from_standby": facts["in_recovery"], "size_estimate": facts["size_estimate"],
              "primary": primary.describe() if facts["in_recovery"] and primary is not None else None,
              "removed_incomplete": removed, "removed_unfinished_writes": [a["key"] for a in abandoned],
              "settled_catalog_rows": settled, "repository": repo.url,
              "repository_created": created, "slot": (wal or {}).get("slot_info"), "wal_archiving": wal,
              "warnings": (wal or {}).get("warnings", [])}
    if wal:
        wal.pop("slot_info", None)
    log.info("preflight ok for %s: PostgreSQL %s, ~%s bytes, repository %s writable%s", cluster, facts["major"],
             facts["size_estimate"], repo.url, f"; removed leftovers {removed}" if removed else "")
    return result


def _create_repository(repo: Repository) -> bool:
    from .server import repository_owner_default

    owner = repository_owner_default() if isinstance(repo, LocalRepository) else None
    return repo.create(owner=owner)[1]


# ------------------------------------------------------------------------------------------
def archiving_state(conn: ConnInfo, slot: str | None = None) -> dict:
    """archive_mode, archive_command (None when this role may not read it), pg_stat_archiver, and
    whether the replication slot `slot` exists."""
    with connect(conn) as c, c.cursor() as cur:
        cur.execute("SELECT current_setting('archive_mode')")
        mode = cur.fetchone()[0]
        try:
            cur.execute("SELECT current_setting('archive_command')")
            command = cur.fetchone()[0]
        except Exception:  # needs pg_read_all_settings on some versions
            command = None
        cur.execute("""SELECT archived_count, last_archived_wal, last_archived_time::text, failed_count,
                              last_failed_wal, last_failed_time::text,
                              coalesce(last_failed_time > coalesce(last_archived_time, '-infinity'), false)
                       FROM pg_stat_archiver""")
        a = cur.fetchone()
        slot_exists = False
        if slot:
            cur.execute("SELECT slot_type FROM pg_replication_slots WHERE slot_name = %s", (slot,))
            row = cur.fetchone()
            slot_exists = bool(row)
    return {"archive_mode": mode, "archive_command": command, "slot_exists": slot_exists,
            "archiver": {"archived_count": a[0], "last_archived_wal": a[1], "last_archived_time": a[2],
                         "failed_count": a[3], "last_failed_wal": a[4], "last_failed_time": a[5],
                         "failing": bool(a[6])}}


def _pushes_here(command: str | None, repo: Repository, cluster: str) -> str | None:
    """None when `command` is pgincr's push into this repository and cluster; else why not."""
    if command is None:
        return None  # unreadable: trusted (said in a warning)
    if command.strip() in _NOOP_COMMANDS:
        return f"archive_command is {command.strip() or 'empty'!r}: it archives nothing"
    if not re.search(r"walcmd(\.py)?\s+push|wal-push", command):
        return f"archive_command ({command[:120]}) is not pgincr's `walcmd push`: it archives elsewhere"
    m = re.search(r"--cluster[ =](\S+)", command)
    if m and m.group(1).strip("'\"") != cluster:
        return f"archive_command pushes cluster {m.group(1)!r}, not {cluster!r}"
    m = re.search(r"--repo[ =](\S+)", command)
    if m:
        where = m.group(1).strip("'\"")
        same = {repo.url, repo.url.removeprefix("file://")} | ({str(repo.root)} if isinstance(repo, LocalRepository)
                                                               else set())
        if where.rstrip("/") not in {s.rstrip("/") for s in same}:
            return f"archive_command pushes into {where}, not into {repo.url}"
    return None


def ensure_wal_archiving(conn: ConnInfo, repo: Repository, cluster: str, mode: str = "auto", *,
                         slot: str | None = None, max_slot_retained_bytes: int | None = None) -> dict:
    """Make sure the WAL of a backup about to start will reach the repository, or refuse naming the
    fix. 'pull': the replication slot exists (created now if missing: it must exist before the
    backup starts, or the backup's own WAL may be recycled before the first capture). 'push':
    archive_mode is on and archive_command is pgincr's push into this repository and cluster.
    'auto': pull when the cluster's slot exists, push when archive_command pushes here, else
    refused. 'none': no archiving, said loudly (the backup restores on its own, to its end point
    only). Returns {"mode", "slot", "warnings", ...}."""
    from .capture import default_slot_name, describe_slot_advice, ensure_slot, slot_advice, slot_health

    if mode not in WAL_MODES:
        raise ConfigError(f"unknown WAL mode {mode!r}; one of {', '.join(WAL_MODES)}")
    slot = slot or default_slot_name(cluster)
    state = archiving_state(conn, slot)
    warnings: list[str] = []
    if mode == "auto":
        if state["slot_exists"]:
            mode = "pull"
        elif state["archive_mode"] in ("on", "always") and _pushes_here(state["archive_command"], repo, cluster) \
                is None and state["archive_command"] is not None:
            mode = "push"
        else:
            raise ConfigError(
                f"no WAL archiving into {repo.url} is set up for cluster {cluster!r}: a backup without its WAL "
                "archived cannot be used for point-in-time recovery. Choose one: --wal-mode pull (creates the "
                f"replication slot {slot} now, before the backup; then run `pgincr capture --cluster {cluster}` "
                "regularly, since the slot keeps WAL on the server until captured), --wal-mode push (set "
                f"archive_command as `pgincr wal-commands --repo {repo.url} --cluster {cluster}` prints), or "
                "--wal-mode none (no archiving: the backup restores only to its own end point). Nothing was written")
    out: dict = {"mode": mode, "slot": None, "warnings": warnings}
    if mode == "pull":
        info = ensure_slot(conn, slot)
        out.update(slot=slot, slot_created=info["created"], slot_info=info)
        health = slot_health(conn, slot)
        out["slot_health"] = health
        if health["max_slot_wal_keep_size_bytes"] is None:
            warnings.append(
                f"max_slot_wal_keep_size is unset on the server: if captures stop, replication slot {slot} retains "
                "WAL without limit until the primary's disk is full and it stops. Set it (ALTER SYSTEM SET "
                "max_slot_wal_keep_size = '<most of the free space of pg_wal's disk>'; SELECT pg_reload_conf();): "
                "beyond it the slot is invalidated, the archive gets a gap and a new full backup is needed, but the "
                "primary keeps running")
        if max_slot_retained_bytes:
            advice = slot_advice(health, max_slot_retained_bytes)
            out["slot_advice"] = advice
            log.info("replication slot %s: %s", slot, describe_slot_advice(advice))
    elif mode == "push":
        if state["archive_mode"] not in ("on", "always"):
            raise ConfigError(f"archive_mode is {state['archive_mode']!r} on the server: push mode needs archive_mode "
                              "= on and archive_command = pgincr's push (see `pgincr wal-commands`), then a restart")
        why = _pushes_here(state["archive_command"], repo, cluster)
        if why:
            raise ConfigError(f"push mode, but {why}: the backup's WAL would not reach {repo.url}. Set archive_command "
                              f"as `pgincr wal-commands --repo {repo.url} --cluster {cluster}` prints and reload, or "
                              "use pull mode")
        if state["archive_command"] is None:
            warnings.append("archive_command cannot be read by this role (grant pg_read_all_settings): not checked "
                            "that it pushes into this repository")
        if state["archiver"]["failing"]:
            a = state["archiver"]
            warnings.append(f"archive_command is failing: {a['last_failed_wal']} failed at {a['last_failed_time']} "
                            f"(last success {a['last_archived_wal'] or 'never'}); see the server log")
    else:
        warnings.append("no WAL archiving (--wal-mode none): this backup restores only to its own end point; "
                        "point-in-time recovery from it, and verification of its WAL, are impossible")
    out["archive_mode"] = state["archive_mode"]
    out["archiver"] = state["archiver"]
    for w in warnings:
        log.warning("%s", w)
    return out
