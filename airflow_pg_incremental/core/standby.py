"""Base backups taken from a streaming standby, so the primary does no backup I/O.

pg_basebackup works against a standby, but a standby cannot checkpoint: the backup starts at its
last restartpoint, which follows the primary's last checkpoint (up to checkpoint_timeout old, and
a restore then replays everything since). With the primary's connection, the backup first asks
the primary for a checkpoint and waits until the standby has replayed it, so `-c fast` on the
standby makes an immediate restartpoint there: the backup starts now, as on the primary.
pgBackRest's backup-standby does the same.
"""

from __future__ import annotations

import logging
import time

from .errors import ConfigError, ServerError
from .pgconn import ConnInfo, connect

log = logging.getLogger(__name__)


def primary_facts(primary: ConnInfo) -> dict:
    """The primary's identity, refused when it is not a primary."""
    try:
        with connect(primary) as c, c.cursor() as cur:
            cur.execute("SELECT pg_is_in_recovery(), (SELECT system_identifier::text FROM pg_control_system())")
            in_recovery, sysid = cur.fetchone()
    except ServerError:
        raise
    except Exception as e:
        raise ServerError(f"the primary {primary.describe()} cannot be read: {str(e).strip()}") from None
    if in_recovery:
        raise ConfigError(f"{primary.describe()}, given as the primary, is in recovery too: give the connection of "
                          "the server the standby streams from")
    return {"system_identifier": sysid}


def check_standby_source(facts: dict, conn: ConnInfo, primary: ConnInfo | None) -> dict | None:
    """For a backup of `conn`: None when it is a primary (a primary connection is not used then);
    for a standby, the primary's facts, after checking both are the same cluster. Without a
    primary, a standby backup is allowed and says loudly where it starts."""
    if not facts.get("in_recovery"):
        return None
    if primary is None:
        log.warning("%s is a standby and no primary connection was given: the backup starts at the standby's last "
                    "restartpoint (up to checkpoint_timeout old; a restore replays all WAL since). Give the "
                    "primary's connection (--primary, or primary_conn_id) so it starts now", conn.describe())
        return None
    p = primary_facts(primary)
    if facts.get("system_identifier") and str(p["system_identifier"]) != str(facts["system_identifier"]):
        raise ConfigError(f"the primary {primary.describe()} (system identifier {p['system_identifier']}) is not the "
                          f"primary of the standby {conn.describe()} (system identifier "
                          f"{facts['system_identifier']}): fix the primary connection. Nothing was written")
    return p


def catch_up(standby: ConnInfo, primary: ConnInfo, *, timeout_s: float = 300.0) -> dict:
    """CHECKPOINT on the primary, then wait until the standby has replayed it. Returns
    {"checkpoint_lsn", "waited_s"}. Raises ServerError naming the fix (a grant, or the lag)."""
    t0 = time.monotonic()
    try:
        with connect(primary) as c, c.cursor() as cur:
            cur.execute("CHECKPOINT")
            cur.execute("SELECT pg_current_wal_lsn()::text")
            lsn = cur.fetchone()[0]
    except Exception as e:
        msg = str(e).strip()
        if "permission denied" in msg or "must be" in msg:
            raise ServerError(f"the primary {primary.describe()} refused CHECKPOINT ({msg}); run as a superuser: "
                              f"GRANT pg_checkpoint TO {primary.user or '<the backup role>'};") from None
        raise ServerError(f"the primary {primary.describe()}: {msg}") from None
    with connect(standby) as c, c.cursor() as cur:
        while True:
            cur.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn, pg_last_wal_replay_lsn()::text", (lsn,))
            done, replayed = cur.fetchone()
            if done:
                break
            if time.monotonic() - t0 > timeout_s:
                raise ServerError(f"the standby {standby.describe()} has replayed up to {replayed} and not yet the "
                                  f"primary's checkpoint at {lsn} after {timeout_s:.0f} s: it lags; check "
                                  "pg_stat_replication on the primary, or back up the primary")
            time.sleep(0.05)
    waited = time.monotonic() - t0
    log.info("standby %s replayed the primary's checkpoint (%s) in %.2f s: the backup starts there", standby.describe(),
             lsn, waited)
    return {"checkpoint_lsn": lsn, "waited_s": round(waited, 3)}
