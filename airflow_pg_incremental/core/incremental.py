"""Incremental chains: deciding whether a block-level incremental (PostgreSQL 17+) can be taken,
and resolving a backup's chain for restore.

`decide()` is a pure function of the facts, so every case is testable on its own; `plan_backup()`
gathers the facts from the server and the repository. When an incremental is not possible the
plan is a full backup, with the reason (logged, returned as XCom, recorded in backup.json).
"""

from __future__ import annotations

import datetime as dt
import logging

from .errors import ConfigError, RestoreError
from .lsn import format_lsn, parse_lsn
from .metadata import list_backups, load_backup
from .names import validate_cluster
from .pgconn import ConnInfo, connect
from .repository import Repository

log = logging.getLogger(__name__)

KINDS = ("incremental", "differential")


def current_chain(backups: list[dict]) -> list[dict]:
    """The newest chain of parents: the newest full backup taken from the server and the backups
    built on it, oldest first. Synthetic fulls are not parents (see core.synthetic). Found from the
    newest backup taken from the server, so it goes on once retention removed the chain's full (and
    the incrementals) a verified synthetic full absorbed: then it starts with an incremental."""
    real = [b for b in backups if b["kind"] != "synthetic"]
    if not real:
        return []
    newest = real[-1]
    root = newest["backup_id"] if newest["kind"] == "full" else newest.get("chain_root_id")
    return [b for b in real if b["backup_id"] == root or b.get("chain_root_id") == root]


def restore_chain_ids(chain: list[dict], backups: list[dict]) -> list[str]:
    """The backups a restore of the chain's newest combines: the chain, or the newest synthetic full
    standing for one of its members followed by the members after that one."""
    from .synthetic import synthetic_for

    synth = synthetic_for(backups)
    for i in range(len(chain) - 1, -1, -1):
        if chain[i]["backup_id"] in synth:
            return [synth[chain[i]["backup_id"]]["backup_id"]] + [b["backup_id"] for b in chain[i + 1:]]
    head = chain[0].get("parent_id") if chain else None  # the chain's start went (retention): its stand-in
    return ([synth[head]["backup_id"]] if head in synth else []) + [b["backup_id"] for b in chain]


def restore_length(chain: list[dict], backups: list[dict]) -> int:
    """How many backups a restore of the chain's newest combines (see restore_chain_ids)."""
    return len(restore_chain_ids(chain, backups))


def decide(kind: str, facts: dict, chain: list[dict], *, max_chain_length: int = 14,
           summaries: list[tuple[int, int, int]] | None = None, summarized_lsn: int | None = None,
           keep_time_s: float | None = None, now: dt.datetime | None = None, parent_ok: bool = True,
           parent_problem: str | None = None, restore_len: int | None = None) -> dict:
    """What to take. Returns {"kind": full|incremental|differential|none, "parent_id", "reason"}.

    facts: server facts (major, summarize_wal, system_identifier, timeline, data_checksums).
    summaries: (timeline, start_lsn, end_lsn) of pg_available_wal_summaries().
    restore_len: backups a restore of the chain's newest combines (shorter than the chain when a
    synthetic full stands for part of it); the chain's length by default."""
    if kind not in KINDS:
        raise ConfigError(f"unknown incremental kind {kind!r}; use 'incremental' (parent = newest backup of the "
                          "chain) or 'differential' (parent = the chain's full)")
    now = now or dt.datetime.now(dt.timezone.utc)

    def full(reason: str) -> dict:
        return {"kind": "full", "parent_id": None, "reason": reason, "requested": kind}

    if facts["major"] < 17:
        return {"kind": "none", "parent_id": None, "requested": kind,
                "reason": f"PostgreSQL {facts['major']} has no block-level incremental backup (17+): the WAL archive "
                          "is the incremental between full backups; nothing to do"}
    if not chain:
        return full("no full backup to build on yet")
    if kind == "differential" and chain[0]["kind"] != "full":
        return full(f"the chain's full {chain[0].get('chain_root_id')} was removed by retention once a synthetic "
                    "full absorbed it: a differential is taken against the chain's full (use incremental with "
                    "synthetic fulls)")
    parent = chain[-1] if kind == "incremental" else chain[0]
    pid = parent["backup_id"]
    if not facts.get("summarize_wal"):
        return full("summarize_wal is off on the server: incrementals need it on (ALTER SYSTEM SET summarize_wal = on; "
                    "SELECT pg_reload_conf();), and on since before the parent backup")
    if str(parent.get("system_identifier")) != str(facts.get("system_identifier")):
        return full(f"the server's database system identifier {facts.get('system_identifier')} differs from the "
                    f"parent {pid}'s {parent.get('system_identifier')}: it is another cluster")
    if parent.get("timeline") != facts.get("timeline"):
        return full(f"the timeline changed since the parent {pid} (timeline {parent.get('timeline')} -> "
                    f"{facts.get('timeline')}, a promotion or PITR): WAL summaries are per timeline")
    if bool(parent.get("data_checksums")) != bool(facts.get("data_checksums")):
        return full(f"data checksums were switched {'on' if facts.get('data_checksums') else 'off'} since the parent "
                    f"{pid}: every page changed")
    if not parent_ok:
        return full(f"the parent {pid} cannot be used: {parent_problem or 'missing or damaged'}")
    restore_len = len(chain) if restore_len is None else restore_len
    if kind == "incremental" and restore_len >= max_chain_length:
        return full(f"the chain of {restore_len} backups restored together from {chain[-restore_len]['backup_id']} "
                    f"reached the limit of {max_chain_length}: restores would combine too many backups (a synthetic "
                    "full, `pgincr synthesize`, shortens it without reading the server)")
    if keep_time_s is not None and parent.get("finished_at"):
        age = (now - dt.datetime.fromisoformat(parent["finished_at"])).total_seconds()
        if age > keep_time_s:
            return full(f"the parent {pid} is {age / 86400:.1f} days old, older than wal_summary_keep_time "
                        f"({keep_time_s / 86400:.1f} days): the summaries it needs may be gone")
    start = parse_lsn(parent["start_lsn"])
    tli = facts.get("timeline")
    if summaries is not None:
        ranges = sorted((s, e) for t, s, e in summaries if t == tli)
        if not ranges or ranges[0][0] > start:
            first = format_lsn(ranges[0][0]) if ranges else "none"
            return full(f"WAL summaries do not cover the parent {pid}'s start {parent['start_lsn']} (oldest summary "
                        f"on timeline {tli} starts at {first}): summarize_wal was off then, or the summaries were "
                        "removed (wal_summary_keep_time)")
        covered = ranges[0][0]
        for s, e in ranges:
            if s > covered:
                return full(f"WAL summaries have a hole from {format_lsn(covered)} to {format_lsn(s)} after the parent "
                            f"{pid}'s start")
            covered = max(covered, e)
    return {"kind": kind, "parent_id": pid, "reason": None, "requested": kind,
            "chain_length": len(chain) + 1 if kind == "incremental" else 2}


def plan_backup(conn: ConnInfo, repo: Repository, cluster: str, *, kind: str = "incremental",
                max_chain_length: int = 14) -> dict:
    """Gather the facts and decide. The returned dict has the decision plus what it was based on."""
    from .backup import server_facts

    validate_cluster(cluster)
    facts = server_facts(conn)
    with connect(conn) as c, c.cursor() as cur:
        cur.execute("SELECT timeline_id FROM pg_control_checkpoint()")
        facts["timeline"] = cur.fetchone()[0]
        summaries, summarized, keep_s = None, None, None
        if facts["major"] >= 17:
            cur.execute("SELECT tli, start_lsn::text, end_lsn::text FROM pg_available_wal_summaries()")
            summaries = [(t, parse_lsn(s), parse_lsn(e)) for t, s, e in cur.fetchall()]
            cur.execute("SELECT summarized_lsn::text FROM pg_get_wal_summarizer_state()")
            row = cur.fetchone()
            summarized = parse_lsn(row[0]) if row and row[0] else None
            cur.execute("SELECT setting::bigint * 60 FROM pg_settings WHERE name = 'wal_summary_keep_time'")
            keep_s = float(cur.fetchone()[0]) or None  # 0 = keep forever
    backups = list_backups(repo, cluster)
    chain = current_chain(backups)
    parent_ok, problem = True, None
    if chain:
        parent = chain[-1] if kind == "incremental" else chain[0]
        try:
            meta = load_backup(repo, cluster, parent["backup_id"])
            missing = [o["key"] for o in meta.get("objects", []) if not repo.exists(o["key"])]
            if missing:
                parent_ok, problem = False, f"objects missing from the repository: {', '.join(missing)}"
        except Exception as e:
            parent_ok, problem = False, str(e)
    d = decide(kind, facts, chain, max_chain_length=max_chain_length, summaries=summaries,
               summarized_lsn=summarized, keep_time_s=keep_s, parent_ok=parent_ok, parent_problem=problem,
               restore_len=restore_length(chain, backups))
    d.update({"cluster": cluster, "pg_major": facts["major"], "timeline": facts["timeline"],
              "chain": [b["backup_id"] for b in chain]})
    if d["kind"] in KINDS:  # what a restore of the new backup combines before it
        d["restore_chain"] = (restore_chain_ids(chain, backups) if d["kind"] == "incremental"
                              else [chain[0]["backup_id"]])
    if d["reason"]:
        log.warning("taking %s instead of %s: %s", d["kind"] if d["kind"] != "none" else "no backup", kind, d["reason"])
    else:
        log.info("%s backup possible on top of %s (chain of %d)", kind, d["parent_id"], len(chain))
    return d


def take_planned_backup(conn: ConnInfo, repo: Repository, cluster: str, *, kind: str = "incremental",
                        max_chain_length: int = 14, **backup_kwargs) -> dict:
    """Plan, then take what the plan says (incremental / differential, or a full with the reason)."""
    from .backup import take_backup

    plan = plan_backup(conn, repo, cluster, kind=kind, max_chain_length=max_chain_length)
    if plan["kind"] == "none":
        return {"cluster": cluster, "kind": "none", "backup_id": None, "reason": plan["reason"], "plan": plan}
    parent = load_backup(repo, cluster, plan["parent_id"]) if plan["parent_id"] else None
    restore_chain = plan.get("restore_chain")
    meta = take_backup(conn, repo, cluster, kind=plan["kind"], parent=parent, reason=plan["reason"],
                       restore_chain=restore_chain, **backup_kwargs)
    meta["plan"] = {k: plan[k] for k in ("requested", "kind", "reason", "parent_id", "chain")}
    meta["plan"]["restore_chain"] = meta.get("restore_chain")
    return meta


def resolve_chain(repo: Repository, cluster: str, meta: dict, *, synthetic: bool = True) -> list[dict]:
    """[full, ..., meta]: the backups a restore of `meta` combines, oldest first. Walking back from
    `meta`, the first backup a synthetic full stands for is replaced by it with all its ancestors
    (the newest such synthetic full whose objects are present; `synthetic=False`: the chain of
    parents only). A missing link is refused with a message naming it."""
    synth = {}
    if synthetic and meta.get("kind") != "synthetic":
        from .synthetic import synthetics

        synth = synthetics(repo, cluster)

    def stand_in(bid: str) -> dict | None:  # checked only for the backups the walk reaches
        s = synth.get(bid)
        return s if s is not None and all(repo.exists(o["key"]) for o in s.get("objects", [])) else None

    chain = [meta]
    seen = {meta["backup_id"]}
    while True:
        s = stand_in(chain[0]["backup_id"])
        if s is not None:
            chain[0] = s
            return chain
        if not chain[0].get("parent_id"):
            break
        pid = chain[0]["parent_id"]
        if pid in seen:
            raise RestoreError(f"backup chain of {meta['backup_id']} loops at {pid}")
        s = stand_in(pid)
        if s is not None:  # the parent itself may be gone (retention): its synthetic full stands for it
            chain.insert(0, s)
            return chain
        try:
            parent = load_backup(repo, cluster, pid)
        except Exception as e:
            raise RestoreError(f"backup {meta['backup_id']} cannot be restored: its chain is broken at {pid} "
                               f"(parent of {chain[0]['backup_id']}): {e}") from None
        chain.insert(0, parent)
        seen.add(pid)
    if chain[0]["kind"] not in ("full", "synthetic"):
        raise RestoreError(f"the chain of {meta['backup_id']} does not start with a full backup")
    return chain
