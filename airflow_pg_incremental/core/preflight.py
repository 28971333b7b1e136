"""Checks run before a backup, with nothing written to the repository except a probe object."""

from __future__ import annotations

import logging

from .backup import check_source, server_facts
from .binaries import find_program
from .metadata import cleanup_incomplete
from .names import validate_cluster
from .pgconn import ConnInfo
from .repository import Repository

log = logging.getLogger(__name__)


def preflight_full(conn: ConnInfo, repo: Repository, cluster: str, *, cleanup_after_s: float = 6 * 3600,
                   slot: str | None = None, catalog=None, create_repository: bool = False) -> dict:
    """`slot`: pull mode's replication slot, created here if missing so that it holds the WAL from
    before the backup's start (a slot created after the backup could not capture its WAL).
    `catalog`: its rows of killed backups (left 'running') are settled, with the same age rule.
    `create_repository`: create the repository when the location holds none yet (an explicit
    setting: otherwise a missing repository is an error, never created by a typo)."""
    validate_cluster(cluster)
    facts = server_facts(conn)
    check_source(facts, conn)
    find_program("pg_basebackup", facts["major"])
    if create_repository:
        from .server import repository_owner_default

        created = repo.create(owner=repository_owner_default())[1]
    else:
        created = False
    repo.check_writable()
    slot_info = None
    if slot:
        from .capture import ensure_slot

        slot_info = ensure_slot(conn, slot)
    removed = cleanup_incomplete(repo, cluster, older_than_s=cleanup_after_s)
    settled = catalog.settle_running(repo, cluster, older_than_s=cleanup_after_s) if catalog is not None else []
    result = {"cluster": cluster, "pg_major": facts["major"], "system_identifier": facts["system_identifier"],
              "data_checksums": facts["data_checksums"], "summarize_wal": facts["summarize_wal"],
              "from_standby": facts["in_recovery"], "size_estimate": facts["size_estimate"],
              "removed_incomplete": removed, "settled_catalog_rows": settled, "repository": repo.url,
              "repository_created": created, "slot": slot_info}
    log.info("preflight ok for %s: PostgreSQL %s, ~%s bytes, repository %s writable%s", cluster, facts["major"],
             facts["size_estimate"], repo.url, f"; removed leftovers {removed}" if removed else "")
    return result
