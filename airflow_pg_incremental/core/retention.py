"""Retention: which backups, WAL and restore points can go, and deleting them in a crash-safe order.

Invariant: retention never deletes a backup that a kept backup depends on (its chain ancestors),
nor WAL needed to make a kept backup consistent or to reach any point inside the promised recovery
window; the plan can always be printed (dry run) before it is applied.

A policy keeps the union of
  - the newest `keep_full_chains` full chains (a full and every backup built on it),
  - what the recovery window [now - D days, now] needs: the newest backup that ended at or before
    the window's start (the *anchor*: a point-in-time restore to the window's first instant starts
    from it) and every backup that ended after it, each with its chain ancestors,
  - the newest `min_redundancy` full chains, whatever else the policy says,
  - the pinned backups and their ancestors.
Every other complete backup is deleted (a parent of a kept backup is kept, by construction).
Only backups on the newest timeline's history count toward these rules. A backup on an abandoned
branch (after a point-in-time restore rewound the cluster and promoted it, the old timeline's
backups past the switch point) can start no recovery along the newest timeline: it is kept while it
ended inside the period the kept backups span (restorable with an explicit recovery timeline), and
deleted with the older ones.

WAL: the horizon is the start LSN of the oldest backup that stays (kept, or left alone because its
chain is broken). Every archived segment, backup history file and partial segment *below the
horizon's segment number* is deleted, on every timeline; everything at or above it stays, on every
timeline. Why one position for all timelines rather than one per timeline: a kept backup on timeline
T replays T from its start and then, after each switch point, the newer timelines (recovery follows
the history to the latest timeline): a segment it needs on any timeline has a segment number at or
above its start. A per-timeline horizon (the oldest kept backup *on that timeline*) would delete the
beginning of a newer timeline that an older kept backup crosses on its way to the present. Timeline
history files are always kept. Segments at or above the horizon on an abandoned branch are kept (a
restore with an explicit recovery_target_timeline may want them); they go once the horizon passes
them. The newest archived segment always stays (pull capture resumes after it, the freshness sensor
reads its age), even when capture lags behind the newest backup. Restore points below the horizon
(unreachable: no backup ends before them) go.

Order of deletion (apply_retention), each step safe to interrupt and re-run:
  1. backups, newest first (children before parents: a crash never leaves an orphan): backup.json
     first (the backup stops being listed and restorable), then its other objects. A crash in
     between leaves a directory without backup.json and without in-progress marker: the next plan
     lists it as a leftover and removes it (like metadata.cleanup_incomplete);
  2. leftovers of interrupted backups (in-progress marker older than a day, or no marker), the
     marker last;
  3. restore points below the horizon (the index first, then the data it points into);
  4. WAL, oldest first: what remains is always a continuous archive;
  5. catalog rows of what was deleted; rows left behind by an earlier interrupted run (complete
     backups no longer in the repository and older than the horizon, segments below it) too.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time
from dataclasses import dataclass, field

from .errors import ConfigError, ObjectNotFound, RepositoryError
from .lsn import DEFAULT_SEGMENT_SIZE, format_lsn, parse_lsn, segment_name, segno_of
from .metadata import (
    INPROGRESS_NAME,
    META_NAME,
    backup_prefix,
    backups_prefix,
    find_incomplete,
    iso,
    list_backup_ids,
    list_backups,
    require_cluster,
    utcnow,
)
from .names import validate_backup_id, validate_cluster
from .progress import human_bytes
from .repository import LocalRepository, Repository
from .wal import on_timeline_path, timeline_path, wal_key

log = logging.getLogger(__name__)

LEFTOVER_AGE_S = 24 * 3600  # an interrupted backup's leftovers go once its in-progress marker is this old


class RetentionRefused(ConfigError):
    """The plan would break a promise (or the repository is in a state retention must not touch)."""


# ------------------------------------------------------------------------------------------------
@dataclass
class RetentionPolicy:
    """What to keep. At least one of keep_full_chains / recovery_window_days.

    keep_full_chains: the newest N full chains (a full and every backup built on it).
    recovery_window_days: every point of [now - D days, now] stays restorable.
    min_redundancy: the newest M full chains are never deleted, whatever else the policy says.
    pinned: backup ids kept (with their chain ancestors) until unpinned."""

    keep_full_chains: int | None = None
    recovery_window_days: float | None = None
    min_redundancy: int = 1
    pinned: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        def whole(name, v, allow_none):
            if v is None and allow_none:
                return None
            if isinstance(v, bool) or not isinstance(v, int):
                if isinstance(v, float) and v.is_integer():
                    v = int(v)
                else:
                    raise ConfigError(f"{name} must be a whole number, got {v!r}")
            if v < 1:
                raise ConfigError(f"{name} must be at least 1, got {v}")
            return v

        self.keep_full_chains = whole("keep_full_chains", self.keep_full_chains, True)
        self.min_redundancy = whole("min_redundancy", self.min_redundancy, False)
        d = self.recovery_window_days
        if d is not None:
            if isinstance(d, bool) or not isinstance(d, (int, float)):
                raise ConfigError(f"recovery_window_days must be a number of days, got {d!r}")
            d = float(d)
            if not d > 0 or d != d or d == float("inf"):
                raise ConfigError(f"recovery_window_days must be a positive, finite number of days, got {d}")
            self.recovery_window_days = d
        if self.keep_full_chains is None and self.recovery_window_days is None:
            raise ConfigError("a retention policy needs keep_full_chains (how many full chains to keep) or "
                              "recovery_window_days (how far back every point must stay restorable), or both")
        pinned = self.pinned
        if pinned is None:
            pinned = []
        elif isinstance(pinned, str):
            pinned = [p for p in re.split(r"[,\s]+", pinned) if p]
        elif not isinstance(pinned, (list, tuple, set, frozenset)):
            raise ConfigError(f"pinned must be a list of backup ids, got {type(pinned).__name__}")
        out = []
        for p in pinned:
            validate_backup_id(p)
            if p not in out:
                out.append(p)
        self.pinned = out

    def to_dict(self) -> dict:
        return {"keep_full_chains": self.keep_full_chains, "recovery_window_days": self.recovery_window_days,
                "min_redundancy": self.min_redundancy, "pinned": list(self.pinned)}

    @classmethod
    def from_dict(cls, d: dict) -> "RetentionPolicy":
        unknown = set(d) - {"keep_full_chains", "recovery_window_days", "min_redundancy", "pinned"}
        if unknown:
            raise ConfigError(f"unknown retention policy setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def describe(self) -> str:
        parts = []
        if self.keep_full_chains is not None:
            parts.append(f"keep_full_chains={self.keep_full_chains}")
        if self.recovery_window_days is not None:
            parts.append(f"recovery_window_days={self.recovery_window_days:g}")
        parts.append(f"min_redundancy={self.min_redundancy}")
        if self.pinned:
            parts.append(f"pinned={','.join(self.pinned)}")
        return ", ".join(parts)


# ------------------------------------------------------------------------------------------------
def _as_time(value) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"time {value!r} does not parse; use ISO 8601 with a time zone") from None
    if not isinstance(value, dt.datetime):
        raise ConfigError(f"expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        raise ConfigError(f"time {value.isoformat()} has no time zone; give an aware datetime (e.g. UTC)")
    return value.astimezone(dt.timezone.utc)


def _finished(b: dict) -> dt.datetime | None:
    try:
        return _as_time(b.get("finished_at"))
    except ConfigError:
        return None


_WAL_KEY_RE = re.compile(r"/wal/([0-9A-F]{8})/(?:(([0-9A-F]{24})(?:\.[0-9A-F]{8}\.backup)?)|partial/(([0-9A-F]{24})"
                         r"\.partial))\.zst$")


def _wal_objects(repo: Repository, cluster: str) -> list[tuple[str, str, int]]:
    """(name, key, timeline) of every archived segment, backup history file and partial segment.
    History files and unknown objects are not listed (never deleted)."""
    out = []
    for key in repo.list(f"{cluster}/wal"):
        m = _WAL_KEY_RE.search("/" + key)
        if not m:
            continue
        name, seg = (m.group(2), m.group(3)) if m.group(2) else (m.group(4), m.group(5))
        if m.group(1) == seg[:8]:
            out.append((name, key, int(m.group(1), 16)))
    return out


def _sizes(repo: Repository, keys: list[str], sample: int = 64) -> int:
    """Stored bytes of `keys`: exact on a local repository; on S3 a sample of HEAD requests,
    extrapolated (an estimate is enough for a plan, thousands of HEADs are not)."""
    if not keys:
        return 0
    if isinstance(repo, LocalRepository) or len(keys) <= sample:
        picked = keys
    else:
        step = len(keys) / sample
        picked = [keys[int(i * step)] for i in range(sample)]
    total = 0
    for k in picked:
        try:
            total += repo.size(k)
        except (ObjectNotFound, RepositoryError):
            pass
    return int(total * len(keys) / len(picked))


# ------------------------------------------------------------------------------------------------
# chains: what a restore of each backup combines (core.incremental.resolve_chain, on the listing)
# and what it would combine without the synthetic fulls that are not verified yet.

def _synthetic_evidence(catalog, cluster: str, backups: list[dict]) -> dict[str, str | None]:
    """{synthetic full: None when its last verification passed, else why it is not trusted yet}.
    The evidence is the catalog's verifications table, where core.verify records every run."""
    out: dict[str, str | None] = {}
    for b in backups:
        sid = b["backup_id"]
        if b.get("kind") != "synthetic":
            continue
        if catalog is None:
            out[sid] = ("no verification evidence: retention ran without the catalog, where `pgincr verify` "
                        "records its results (pass the catalog)")
            continue
        try:
            last = catalog.last_verification(cluster, sid)
        except Exception as e:  # noqa: BLE001 - no evidence is a reason to keep, not to fail
            out[sid] = f"its verification record could not be read from the catalog ({type(e).__name__}: {e})"
            continue
        if last is None:
            out[sid] = f"not verified yet (run `pgincr verify` on {sid} with the catalog)"
        elif not last.get("ok"):
            out[sid] = f"its last verification ({last.get('started_at')}) failed: {last.get('error') or 'see the catalog'}"
        else:
            out[sid] = None
    return out


def _synthetic_maps(repo: Repository, backups: list[dict], by_id: dict, evidence: dict) -> tuple[dict, dict]:
    """({stands_for: synthetic id} a restore uses now: the newest complete one with its objects
    present, as resolve_chain; {stands_for: synthetic id} a kept chain may rest on: verified, or the
    only way left to its point because the backup it stands for is gone)."""
    present: dict[str, str] = {}
    anchoring: dict[str, str] = {}
    for b in backups:  # oldest first: the newest wins
        if b.get("kind") != "synthetic" or not b.get("stands_for") or b.get("status", "complete") != "complete":
            continue
        if not all(repo.exists(o["key"]) for o in b.get("objects", [])):
            continue
        present[b["stands_for"]] = b["backup_id"]
        if evidence.get(b["backup_id"]) is None or b["stands_for"] not in by_id:
            anchoring[b["stands_for"]] = b["backup_id"]
    return present, anchoring


def _walk(b: dict, by_id: dict, synth: dict) -> tuple[list[str], str | None]:
    """The ids a restore of `b` combines, oldest first, through the synthetic fulls in `synth`
    ({stands_for: synthetic id}), as incremental.resolve_chain walks; and what breaks the chain."""
    bid = b["backup_id"]
    if b.get("kind") == "synthetic":
        return [bid], None
    if bid in synth:
        return [synth[bid]], None
    chain, cur = [bid], b
    while cur.get("parent_id"):
        pid = cur["parent_id"]
        if pid in chain:
            return chain, f"its chain loops at {pid}"
        if pid in synth:
            return [synth[pid]] + chain, None
        if pid not in by_id:
            return chain, (f"its chain is broken: {pid} (parent of {cur['backup_id']}) is not a complete backup in "
                           "the repository")
        chain.insert(0, pid)
        cur = by_id[pid]
    if cur.get("kind") != "full":
        return chain, f"its chain does not start with a full backup ({cur['backup_id']} is {cur.get('kind')})"
    return chain, None


@dataclass
class _Chains:
    """Per backup: `rc` what a restore combines now; `tc` what it combines through verified synthetic
    fulls only (for an unverified one: the chain of the backup it stands for); `root` the full or
    synthetic full the backup's chain rests on (None: broken); `absorbed` {backup: the verified
    synthetic full standing for it}; `untrusted` {synthetic full: why it cannot replace its chain}."""

    order: dict[str, int]
    rc: dict[str, list[str]] = field(default_factory=dict)
    tc: dict[str, list[str]] = field(default_factory=dict)
    root: dict[str, str | None] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)
    absorbed: dict[str, str] = field(default_factory=dict)
    untrusted: dict[str, str] = field(default_factory=dict)
    synthetic: set[str] = field(default_factory=set)

    def needs(self, bid: str) -> list[str]:
        """What must stay for `bid`'s point to restore, oldest first (`bid` itself unless absorbed)."""
        return sorted(set(self.rc[bid]) | set(self.tc[bid]), key=self.order.__getitem__)

    def label(self, a: str, bid: str) -> str:
        """Why `a` stays for `bid`."""
        if a not in self.rc[bid]:
            return f"ancestor of {bid} (its chain without the unverified synthetic full {self.rc[bid][0]})"
        if a in self.synthetic:
            return f"restore chain of {bid}: the synthetic full it starts from"
        return f"ancestor of {bid}"


def _chains(repo: Repository, backups: list[dict], by_id: dict, evidence: dict) -> _Chains:
    present, anchoring = _synthetic_maps(repo, backups, by_id, evidence)
    ch = _Chains(order={b["backup_id"]: n for n, b in enumerate(backups)},
                 untrusted={s: why for s, why in evidence.items() if why is not None},
                 synthetic={b["backup_id"] for b in backups if b.get("kind") == "synthetic"})
    for b in backups:
        bid = b["backup_id"]
        ch.rc[bid], problem = _walk(b, by_id, present)
        src = by_id[b["stands_for"]] if bid in ch.untrusted and b.get("stands_for") in by_id else b
        ch.tc[bid], t_problem = _walk(src, by_id, anchoring)
        if problem:
            ch.broken[bid], ch.root[bid] = problem, None
            continue
        ch.root[bid] = ch.rc[bid][0] if t_problem else ch.tc[bid][0]
        if bid not in ch.tc[bid] and b.get("kind") != "synthetic" and not t_problem:
            ch.absorbed[bid] = ch.tc[bid][0]
    return ch


def _check_chain_roots(backups: list[dict], by_id: dict, warnings: list[str]) -> None:
    """Warn where a backup's recorded chain_root_id is not the full its parents lead to."""
    for b in backups:
        chain, problem = _walk(b, by_id, {})
        if not problem and b.get("kind") != "synthetic" and b.get("chain_root_id") not in (None, chain[0]):
            warnings.append(f"{b['backup_id']}: chain_root_id {b.get('chain_root_id')} differs from the full its "
                            f"parents lead to ({chain[0]}); the parents are what a restore follows")


def _note_unverified(keep: dict[str, list[str]], by_id: dict, ch: _Chains) -> None:
    """Say why a kept backup that a synthetic full absorbed is not left to it."""
    for sid, why in ch.untrusted.items():
        for bid in by_id[sid].get("built_from") or []:
            if bid in keep:
                keep[bid].append(f"absorbed by the synthetic full {sid}, which cannot replace it yet: {why}")


def _parent_roles(backups: list[dict], restorable: set[str], ch: "_Chains") -> list[tuple[str, str]]:
    """(backup, reason) the next backup taken from the server needs, whatever the policy says. The
    chain's full stays while the newest backup restores through it; once a verified synthetic full
    stands for part of the chain, the policy decides about it (incremental forever: otherwise the
    first full, and all WAL since, would stay for ever)."""
    from .incremental import current_chain

    chain = current_chain(backups)
    if not chain:
        return []
    newest = chain[-1]["backup_id"]
    out = [(newest, "parent of the next incremental: it is taken against this backup's "
                    "backup_manifest (the newest backup of the current parent chain)")]
    through_root = chain[0]["backup_id"] in ch.tc.get(newest, [chain[0]["backup_id"]])
    if chain[0]["kind"] == "full" and chain[0] is not chain[-1] and through_root:
        out.append((chain[0]["backup_id"], "root of the current parent chain: the next incremental's chain is "
                                           "found through it and a differential's parent is it (it goes once a "
                                           "newer full starts a new chain)"))
    return [(bid, why) for bid, why in out if bid in restorable]


# ------------------------------------------------------------------------------------------------
def plan_retention(repo: Repository, cluster: str, policy: RetentionPolicy | dict, now=None, *,
                   raise_on_refusal: bool = True, catalog=None) -> dict:
    """What `policy` keeps and deletes in `cluster`, computed from the repository listing alone
    (nothing is deleted). Raises RetentionRefused (a ConfigError) when the policy must not be
    applied; with raise_on_refusal=False the plan is returned with `refused` set and nothing to
    delete instead. catalog: where the verification evidence of synthetic fulls is read (without it
    no synthetic full counts as verified, and the backups it absorbed stay)."""
    validate_cluster(cluster)
    if isinstance(policy, dict):
        policy = RetentionPolicy.from_dict(policy)
    if not isinstance(policy, RetentionPolicy):
        raise ConfigError(f"expected a RetentionPolicy, got {type(policy).__name__}")
    require_cluster(repo, cluster)
    now = _as_time(now) or utcnow()
    try:
        plan, _ = _plan(repo, cluster, policy, now, catalog)
        return plan
    except RetentionRefused as e:
        if raise_on_refusal:
            raise
        log.error("retention of %s refused: %s", cluster, e)
        return {"cluster": cluster, "repository": repo.url, "policy": policy.to_dict(), "now": now.isoformat(),
                "keep": [], "delete_backups": [], "delete_wal": [], "delete_other": [], "leftovers": [],
                "abandoned_writes": [],
                "restore_points": [], "untouched": [], "window": None, "wal_horizon": None, "wal_timelines": {},
                "bytes_freed": 0, "bytes_by_kind": {}, "warnings": [], "refused": str(e)}


def _plan(repo: Repository, cluster: str, policy: RetentionPolicy, now: dt.datetime,
          catalog=None) -> tuple[dict, dict]:
    warnings: list[str] = []
    backups = list_backups(repo, cluster)
    dir_ids = list_backup_ids(repo, cluster)
    incomplete = find_incomplete(repo, cluster)
    inc_ids = {i["backup_id"] for i in incomplete}

    # -- the repository must be in a state we understand ------------------------------------------
    meta_ids = [b["backup_id"] for b in backups]
    stray = sorted({i for i in meta_ids if meta_ids.count(i) > 1} | {i for i in meta_ids if i not in dir_ids})
    if stray:
        raise RetentionRefused(f"backup.json of {', '.join(stray)} names a backup id that does not match its "
                               f"directory under {repo.url}/{backups_prefix(cluster)}: a copied or moved backup? "
                               "Fix the repository before running retention; nothing was deleted")
    damaged = [i for i in dir_ids if i not in meta_ids and i not in inc_ids
               and repo.exists(f"{backup_prefix(cluster, i)}/{META_NAME}")]
    if damaged:
        raise RetentionRefused(f"backup metadata of {', '.join(damaged)} is damaged (unreadable or checksum "
                               "mismatch): retention cannot know what depends on it. Investigate (restore the "
                               "object, or remove the backup by hand) before running retention; nothing was deleted")
    if not backups:
        raise RetentionRefused(f"cluster {cluster!r} has no complete backup in {repo.url}: nothing to keep, so "
                               "retention refuses to delete anything (take a full backup first)")

    by_id = {b["backup_id"]: b for b in backups}
    order = {b["backup_id"]: n for n, b in enumerate(backups)}  # oldest first (started_at)

    # -- chains: what a restore of each backup combines (core.incremental.resolve_chain), and the
    # same through verified synthetic fulls only: a backup an unverified one absorbed stays ----------
    evidence = _synthetic_evidence(catalog, cluster, backups)
    ch = _chains(repo, backups, by_id, evidence)
    _check_chain_roots(backups, by_id, warnings)
    ancestors = {bid: [a for a in ch.needs(bid) if a != bid] for bid in by_id}
    root_of, broken = ch.root, ch.broken
    restorable = [b for b in backups if root_of[b["backup_id"]] is not None]
    # -- timelines: a backup on an abandoned branch (its timeline went on past the point where the
    # newest timeline's history left it) cannot start a recovery along the newest timeline: it
    # never counts toward a keep rule or anchors the window ---------------------------------------
    try:
        path = timeline_path(repo, cluster)
    except ObjectNotFound as e:
        path = None
        warnings.append(f"{e}: the timeline path is unknown, every backup counts as on it")
    off_path = {b["backup_id"] for b in restorable if not on_timeline_path(b, path)}
    current = [b for b in restorable if b["backup_id"] not in off_path]
    fulls = [b for b in current if b["kind"] == "full" or root_of[b["backup_id"]] == b["backup_id"]]  # + synthetic
    if not fulls and off_path:
        raise RetentionRefused(f"no restorable full backup of {cluster!r} lies on the newest timeline's history "
                               f"(backups {', '.join(sorted(off_path))} are on an abandoned branch): take a full "
                               "backup of the current server first; nothing was deleted")
    if not fulls:
        raise RetentionRefused(f"cluster {cluster!r} has no restorable full backup in {repo.url} (every backup's "
                               "chain is broken): the policy would delete everything or keep nothing useful; "
                               "nothing was deleted")
    members: dict[str, list[str]] = {f["backup_id"]: [] for f in fulls}
    for b in restorable:
        if root_of[b["backup_id"]] in members and b["backup_id"] not in ch.absorbed:  # abandoned ones too
            members[root_of[b["backup_id"]]].append(b["backup_id"])
    chain_rank = {f["backup_id"]: len(fulls) - n for n, f in enumerate(fulls)}  # 1 = newest

    unknown = [p for p in policy.pinned if p not in by_id]
    if unknown:
        known = ", ".join(meta_ids[-10:])
        raise RetentionRefused(f"pinned backup(s) {', '.join(unknown)} do not exist in cluster {cluster!r} "
                               f"({repo.url}); known backups: {known}. Nothing was deleted")

    # -- keep ------------------------------------------------------------------------------------
    keep: dict[str, list[str]] = {}

    def add(bid: str, reason: str, with_ancestors: bool = True) -> None:
        keep.setdefault(bid, [])
        if reason not in keep[bid]:
            keep[bid].append(reason)
        if with_ancestors:
            for a in ancestors[bid]:
                r = ch.label(a, bid)
                keep.setdefault(a, [])
                if r not in keep[a]:
                    keep[a].append(r)

    def add_point(bid: str, reason: str) -> None:
        """Keep what restores `bid`'s point: the verified synthetic full standing for it, if any."""
        if bid in ch.absorbed:
            add(ch.absorbed[bid], f"{reason} (stands for {bid}, which it absorbed)")
        else:
            add(bid, reason)

    for bid, why in _parent_roles(backups, {b["backup_id"] for b in restorable}, ch):
        add(bid, why)
    for f in fulls[::-1][:policy.min_redundancy]:
        for m in members[f["backup_id"]]:
            add(m, f"min_redundancy={policy.min_redundancy}: chain of {f['backup_id']} "
                   f"(#{chain_rank[f['backup_id']]} newest)", with_ancestors=False)
    if policy.keep_full_chains is not None:
        for f in fulls[::-1][:policy.keep_full_chains]:
            for m in members[f["backup_id"]]:
                add(m, f"keep_full_chains={policy.keep_full_chains}: chain of {f['backup_id']} "
                       f"(#{chain_rank[f['backup_id']]} newest)", with_ancestors=False)

    window = None
    if policy.recovery_window_days is not None:
        start = now - dt.timedelta(days=policy.recovery_window_days)
        ended = [(_finished(b), order[b["backup_id"]], b) for b in current]
        before = [e for e in ended if e[0] is not None and e[0] <= start]
        window = {"days": policy.recovery_window_days, "start": start.isoformat(), "end": now.isoformat(),
                  "anchor": None,
                  "anchor_finished_at": None, "covered": bool(before), "restorable_from": None}
        if before:
            anchor_t, _, anchor = max(before, key=lambda e: (e[0], e[1]))
            anchor = by_id[ch.absorbed.get(anchor["backup_id"], anchor["backup_id"])]
            window.update({"anchor": anchor["backup_id"], "anchor_finished_at": iso(anchor_t),
                           "restorable_from": iso(anchor_t)})
            add_point(anchor["backup_id"], f"window: anchor, the newest backup ended at or before the window's start "
                                     f"{iso(start)}")
            for t, _, b in ended:
                if t is None or t > anchor_t:
                    add_point(b["backup_id"], "window: ended inside the recovery window")
        else:
            oldest_t = min((e[0] for e in ended if e[0] is not None), default=None)
            window["restorable_from"] = iso(oldest_t) if oldest_t else None
            warnings.append(f"the recovery window starts at {iso(start)}, before the oldest restorable backup ended "
                            f"({window['restorable_from']}): the promise cannot be kept yet for that part; every "
                            "backup is kept")
            for b in restorable:
                add(b["backup_id"], "window: the window reaches back past every backup")
    for p in policy.pinned:
        if p in broken:
            warnings.append(f"pinned backup {p} cannot be restored: {broken[p]}")
        add(p, "pinned")
    if off_path:
        # abandoned-branch backups stay while they are inside the period the kept backups span
        # (restorable with an explicit recovery timeline), and go with the older ones
        kept_t = [t for t in (_finished(by_id[k]) for k in keep if k not in off_path) if t is not None]
        oldest_kept = min(kept_t, default=None)
        for b in restorable:
            bid, t = b["backup_id"], _finished(b)
            if bid in off_path and bid not in keep and oldest_kept is not None and t is not None and t >= oldest_kept:
                add(bid, f"abandoned timeline branch (timeline {b.get('timeline') or 1}): ended inside the retained "
                         "period; not counted, restorable with that recovery timeline")
        warnings.append(f"backup(s) {', '.join(sorted(off_path))} lie on an abandoned timeline branch (the newest "
                        "timeline's history left their timeline before they ended): they count toward no rule")

    _note_unverified(keep, by_id, ch)

    # -- delete / untouched ------------------------------------------------------------------------
    untouched = [{"backup_id": bid, "reason": f"left alone, not restorable: {why}"} for bid, why in broken.items()
                 if bid not in keep]
    for u in untouched:
        warnings.append(f"backup {u['backup_id']} is {u['reason']}; delete it by hand once you are sure it is not "
                        "needed (its WAL is kept meanwhile)")
    delete = [b for b in restorable if b["backup_id"] not in keep][::-1]  # newest first: children before parents
    delete_ids = {b["backup_id"] for b in delete}
    for bid in list(keep) + [u["backup_id"] for u in untouched]:
        bad = [a for a in ancestors[bid] if a in delete_ids]
        if bad:  # cannot happen: keep is closed under ancestry; refuse rather than trust it
            raise RetentionRefused(f"internal error: the plan deletes {', '.join(bad)}, ancestor(s) of {bid} which "
                                   "stays; nothing was deleted")
    if not keep:
        raise RetentionRefused(f"the policy ({policy.describe()}) would delete every backup of {cluster!r}; "
                               "nothing was deleted")
    remaining_fulls = [f for f in fulls if f["backup_id"] not in delete_ids]
    if delete and len(remaining_fulls) < policy.min_redundancy:
        raise RetentionRefused(f"the plan would leave {len(remaining_fulls)} full chain(s), fewer than "
                               f"min_redundancy={policy.min_redundancy}; nothing was deleted")
    if len(fulls) < policy.min_redundancy:
        warnings.append(f"only {len(fulls)} full chain(s) exist, fewer than min_redundancy={policy.min_redundancy}: "
                        "every chain is kept")

    def why_deleted(b: dict) -> str:
        if b["backup_id"] in ch.absorbed:
            s = ch.absorbed[b["backup_id"]]
            return (f"absorbed by the verified synthetic full {s}: a restore of its point ({b.get('finished_at')}) "
                    f"combines {s} instead, and no kept backup's restore chain includes it; not pinned")
        if b["backup_id"] in off_path:
            return (f"on an abandoned timeline branch (timeline {b.get('timeline') or 1}, ended {b.get('finished_at')}), "
                    "older than every backup kept; not pinned")
        root = root_of[b["backup_id"]]
        parts = [f"chain of {root} is #{chain_rank[root]} newest"]
        if window and window["anchor"]:
            parts.append(f"ended {b.get('finished_at')}, before the window anchor {window['anchor']} "
                         f"({window['anchor_finished_at']})")
        parts.append("not pinned, no kept backup depends on it")
        return "; ".join(parts)

    # -- leftovers of interrupted backups (real time: a running backup's marker is real time) -------
    real_now = utcnow()
    leftovers = []
    for inc in incomplete:
        if inc["backup_id"] in by_id:
            continue
        age = None
        if inc["started_at"]:
            try:
                age = (real_now - _as_time(inc["started_at"])).total_seconds()
            except ConfigError:
                age = None
        if inc["started_at"] and age is not None and age < LEFTOVER_AGE_S:
            log.info("incomplete backup %s started %.0f s ago: maybe still running, left alone", inc["backup_id"], age)
            continue
        leftovers.append({"backup_id": inc["backup_id"], "started_at": inc["started_at"],
                          "objects": sorted(inc["objects"], key=lambda k: k.endswith(INPROGRESS_NAME)),
                          "why": (f"interrupted backup, started {inc['started_at']}" if inc["started_at"] else
                                  "no backup.json and no in-progress marker: remains of an interrupted deletion or "
                                  "backup")})

    # unfinished writes of killed processes (temp files, multipart uploads), same age rule
    abandoned = repo.abandoned_writes(cluster, LEFTOVER_AGE_S)

    # -- WAL horizon -------------------------------------------------------------------------------
    staying = [by_id[bid] for bid in keep] + [by_id[u["backup_id"]] for u in untouched]
    seg_sizes = {int(b.get("wal_segment_size") or DEFAULT_SEGMENT_SIZE) for b in staying}
    horizon = None
    wal_objs = _wal_objects(repo, cluster)
    delete_wal: list[tuple[int, int, str, str]] = []
    timelines: dict[int, dict] = {}
    no_lsn = [b["backup_id"] for b in staying if not b.get("start_lsn")]
    if no_lsn:
        warnings.append(f"backup(s) {', '.join(no_lsn)} have no start LSN: no WAL is deleted")
    elif len(seg_sizes) != 1:
        warnings.append(f"backups of {cluster} disagree on the WAL segment size ({sorted(seg_sizes)}): no WAL is "
                        "deleted")
    else:
        seg = seg_sizes.pop()
        oldest = min(staying, key=lambda b: (parse_lsn(b["start_lsn"]), order[b["backup_id"]]))
        h_lsn = parse_lsn(oldest["start_lsn"])
        h_seg = h_lsn // seg
        horizon = {"lsn": format_lsn(h_lsn), "segno": h_seg, "backup_id": oldest["backup_id"],
                   "timeline": oldest.get("timeline"),
                   "segment": segment_name(int(oldest.get("timeline") or 1), h_seg, seg), "segment_size": seg}
        # the newest archived segment always stays: pull capture resumes after it, the freshness
        # sensor reads its age (it can only be below the horizon when capture lags the newest backup)
        newest = max(((tli, name) for name, _, tli in wal_objs if len(name) == 24), default=(None, None))[1]
        for name, key, tli in wal_objs:
            s = segno_of(name[:24], seg)
            if name == newest and s < h_seg:
                warnings.append(f"the newest archived segment {name} lies below the WAL horizon ({horizon['lsn']}): "
                                "WAL capture lags the newest backup; it is kept")
                s = h_seg
            t = timelines.setdefault(tli, {"objects": 0, "delete": 0, "first_kept": None, "last": None})
            t["objects"] += 1
            t["last"] = max(t["last"] or name, name)
            if s < h_seg:
                delete_wal.append((s, tli, name, key))
                t["delete"] += 1
            elif name[:24] == name and (t["first_kept"] is None or name < t["first_kept"]):
                t["first_kept"] = name
        delete_wal.sort()

    # -- restore points below the horizon ----------------------------------------------------------
    restore_points = []
    for key in repo.list(f"{cluster}/restore_points"):
        if not key.endswith(".json"):
            continue
        try:
            rp = json.loads(repo.get_bytes(key))
            rp_lsn = parse_lsn(rp["lsn"])
        except (ObjectNotFound, ValueError, KeyError, TypeError) as e:
            warnings.append(f"restore point {key} unreadable ({e}); left alone")
            continue
        if horizon is not None and rp_lsn < parse_lsn(horizon["lsn"]):
            restore_points.append({"name": rp.get("name"), "lsn": rp["lsn"], "key": key,
                                   "created_at": rp.get("created_at")})

    # -- sizes -----------------------------------------------------------------------------------
    bytes_backups = sum(int(b.get("stored_bytes") or 0) for b in delete)
    bytes_wal = _sizes(repo, [d[3] for d in delete_wal])
    bytes_other = _sizes(repo, [k for lo in leftovers for k in lo["objects"]] + [r["key"] for r in restore_points])

    keep_list = [{"backup_id": b["backup_id"], "kind": b["kind"], "finished_at": b.get("finished_at"),
                  "start_lsn": b.get("start_lsn"), "timeline": b.get("timeline"), "reasons": keep[b["backup_id"]]}
                 for b in backups if b["backup_id"] in keep]
    plan = {
        "cluster": cluster, "repository": repo.url, "policy": policy.to_dict(), "now": now.isoformat(),
        "planned_at": iso(real_now),
        "keep": keep_list,
        "delete_backups": [b["backup_id"] for b in delete],
        "delete_backup_details": [{"backup_id": b["backup_id"], "kind": b["kind"], "finished_at": b.get("finished_at"),
                                   "stored_bytes": b.get("stored_bytes"), "why": why_deleted(b)} for b in delete],
        "delete_wal": [d[2] for d in delete_wal],
        "delete_other": [k for lo in leftovers for k in lo["objects"]] + [r["key"] for r in restore_points],
        "leftovers": leftovers,
        "abandoned_writes": abandoned,
        "restore_points": restore_points,
        "untouched": untouched,
        "abandoned_branch": sorted(off_path),
        "window": window,
        "synthetics": {sid: {"stands_for": by_id[sid].get("stands_for"), "verified": sid not in ch.untrusted,
                             "why_not": ch.untrusted.get(sid)} for sid in sorted(ch.synthetic)},
        "wal_horizon": horizon,
        "wal_timelines": {f"{t:08X}": v for t, v in sorted(timelines.items())},
        "bytes_freed": bytes_backups + bytes_wal + bytes_other + sum(a.get("bytes") or 0 for a in abandoned),
        "bytes_by_kind": {"backups": bytes_backups, "wal": bytes_wal, "other": bytes_other,
                          "unfinished_writes": sum(a.get("bytes") or 0 for a in abandoned)},
        "warnings": warnings,
        "refused": None,
    }
    return plan, {"wal_names": {o[0] for o in wal_objs}}


# ------------------------------------------------------------------------------------------------
def _span(days: float) -> str:
    s = days * 86400
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if days < 2:
        return f"{s / 3600:.1f} h"
    return f"{days:g} days"


def format_plan(plan: dict) -> str:
    """The plan as lines for a log or a terminal: what, why, how many bytes."""
    L = [f"retention plan for cluster {plan['cluster']} in {plan['repository']} "
         f"(policy: {RetentionPolicy.from_dict(plan['policy']).describe()}; now {plan['now']})"]
    if plan.get("refused"):
        L.append(f"  REFUSED: {plan['refused']}")
        return "\n".join(L)
    w = plan.get("window")
    if w:
        if w["anchor"]:
            L.append(f"  window {_span(w['days'])}: every point from {w['start']} to {w['end']} stays restorable "
                     f"(anchor {w['anchor']}, ended {w['anchor_finished_at']})")
        else:
            L.append(f"  window {_span(w['days'])} from {w['start']}: reaches past every backup; restorable only "
                     f"from {w['restorable_from']}")
    for sid, sy in plan.get("synthetics", {}).items():
        L.append(f"  synthetic full {sid} stands for {sy['stands_for']}: " + (
            "verified, the backups it absorbed may go" if sy["verified"] else f"NOT trusted yet, {sy['why_not']}"))
    for k in plan["keep"]:
        L.append(f"  keep    {k['backup_id']:<26} {k['kind']:<12} ended {k['finished_at']}: {'; '.join(k['reasons'])}")
    for d in plan.get("delete_backup_details", []):
        L.append(f"  DELETE  {d['backup_id']:<26} {d['kind']:<12} ended {d['finished_at']} "
                 f"({human_bytes(int(d['stored_bytes'] or 0))}): {d['why']}")
    for u in plan.get("untouched", []):
        L.append(f"  leave   {u['backup_id']:<26} {u['reason']}")
    h = plan.get("wal_horizon")
    if h:
        n = len(plan["delete_wal"])
        span = f" ({plan['delete_wal'][0]} .. {plan['delete_wal'][-1]})" if n else ""
        L.append(f"  WAL: DELETE {n} file(s) below segment number {h['segno']} (start {h['lsn']} of the oldest "
                 f"backup that stays, {h['backup_id']}, timeline {h['timeline']}){span}, "
                 f"{human_bytes(plan['bytes_by_kind']['wal'])}; history files always stay")
        for tli, t in plan.get("wal_timelines", {}).items():
            L.append(f"       timeline {tli}: {t['objects']} file(s), delete {t['delete']}, keep from "
                     f"{t['first_kept'] or '-'} to {t['last']}")
    else:
        L.append("  WAL: nothing deleted (no horizon)")
    for r in plan.get("restore_points", []):
        L.append(f"  DELETE  restore point {r['name']} at {r['lsn']}: below the WAL horizon, unreachable")
    for lo in plan.get("leftovers", []):
        L.append(f"  DELETE  leftovers of {lo['backup_id']} ({len(lo['objects'])} object(s)): {lo['why']}")
    for a in plan.get("abandoned_writes", []):
        L.append(f"  DELETE  unfinished {a['kind']} of {a['key']} ({human_bytes(a.get('bytes') or 0)}, "
                 f"{a['age_s'] / 3600:.1f} h old): a killed backup or push left it")
    for wmsg in plan.get("warnings", []):
        L.append(f"  WARNING {wmsg}")
    L.append(f"  frees about {human_bytes(plan['bytes_freed'])}: {len(plan['delete_backups'])} backup(s), "
             f"{len(plan['delete_wal'])} WAL file(s), {len(plan['delete_other'])} other object(s); "
             f"keeps {len(plan['keep'])} backup(s)")
    return "\n".join(L)


def _restrict(repo: Repository, cluster: str, approved: dict, catalog=None) -> dict:
    """Re-plan with the approved plan's policy and time, and keep only what the approved plan
    deletes. Refuses (nothing touched) when the approved plan deletes something that must now stay."""
    if approved.get("refused"):
        raise RetentionRefused(f"the plan was refused: {approved['refused']}")
    if approved.get("cluster") != cluster:
        raise ConfigError(f"the plan is for cluster {approved.get('cluster')!r}, not {cluster!r}")
    if approved.get("repository") and approved["repository"] != repo.url:
        raise ConfigError(f"the plan is for repository {approved['repository']}, not {repo.url}")
    policy = RetentionPolicy.from_dict(approved["policy"])
    fresh, internals = _plan(repo, cluster, policy, _as_time(approved["now"]), catalog)
    staying = {k["backup_id"] for k in fresh["keep"]} | {u["backup_id"] for u in fresh["untouched"]}
    want_b = set(approved.get("delete_backups", [])) | {lo["backup_id"] for lo in approved.get("leftovers", [])}
    conflict = sorted(want_b & staying)
    want_w = set(approved.get("delete_wal", []))
    needed_w = sorted((want_w & internals["wal_names"]) - set(fresh["delete_wal"]))
    want_o = set(approved.get("delete_other", []))
    fresh_rp = {r["key"] for r in fresh["restore_points"]}
    rp_keys = {k for k in want_o if "/restore_points/" in k}
    needed_rp = sorted(k for k in rp_keys - fresh_rp if repo.exists(k))
    if conflict or needed_w or needed_rp:
        what = []
        if conflict:
            what.append(f"backup(s) {', '.join(conflict)} must now stay")
        if needed_w:
            what.append(f"WAL {', '.join(needed_w[:5])}{' ...' if len(needed_w) > 5 else ''} is now needed")
        if needed_rp:
            what.append(f"restore point(s) {', '.join(needed_rp)} are now reachable")
        raise RetentionRefused(f"the approved plan no longer holds ({'; '.join(what)}): the repository changed since "
                               "it was made. Nothing was deleted; plan again")
    out = dict(fresh)
    out["delete_backups"] = [b for b in fresh["delete_backups"] if b in want_b]
    out["delete_backup_details"] = [d for d in fresh["delete_backup_details"] if d["backup_id"] in want_b]
    out["leftovers"] = [lo for lo in fresh["leftovers"] if lo["backup_id"] in want_b or set(lo["objects"]) & want_o]
    out["restore_points"] = [r for r in fresh["restore_points"] if r["key"] in want_o]
    want_a = {a["id"] for a in approved.get("abandoned_writes", [])}
    out["abandoned_writes"] = [a for a in fresh.get("abandoned_writes", []) if a["id"] in want_a]
    out["delete_wal"] = [n for n in fresh["delete_wal"] if n in want_w]
    out["delete_other"] = [k for lo in out["leftovers"] for k in lo["objects"]] + [r["key"] for r in
                                                                                     out["restore_points"]]
    skipped = {"backups": len(fresh["delete_backups"]) - len(out["delete_backups"]),
               "wal": len(fresh["delete_wal"]) - len(out["delete_wal"]),
               "other": len(fresh["delete_other"]) - len(out["delete_other"])}
    if any(skipped.values()):
        out["warnings"] = out["warnings"] + [f"not in the approved plan, left for the next run: {skipped}"]
    by_b = {d["backup_id"]: d for d in fresh["delete_backup_details"]}
    bb = sum(int(by_b[b]["stored_bytes"] or 0) for b in out["delete_backups"])
    bw = _sizes(repo, [wal_key(cluster, n) for n in out["delete_wal"]])
    bo = _sizes(repo, out["delete_other"])
    ba = sum(a.get("bytes") or 0 for a in out["abandoned_writes"])
    out["bytes_by_kind"] = {"backups": bb, "wal": bw, "other": bo, "unfinished_writes": ba}
    out["bytes_freed"] = bb + bw + bo + ba
    return out


def apply_retention(repo: Repository, cluster: str, plan_or_policy, *, catalog=None, dry_run: bool = False,
                    now=None) -> dict:
    """Apply a retention policy (planned now, or at `now`), or a plan made earlier by
    plan_retention (re-checked against the repository as it is now: only what it lists is deleted,
    and it is refused if any of that must now stay). dry_run: log and return the plan, delete
    nothing. Returns the plan with `applied` (what was deleted) and `dry_run`."""
    validate_cluster(cluster)
    if isinstance(plan_or_policy, dict) and "delete_backups" in plan_or_policy:
        plan = _restrict(repo, cluster, plan_or_policy, catalog)
    else:
        plan = plan_retention(repo, cluster, plan_or_policy, now=now, catalog=catalog)
    text = format_plan(plan)
    for line in text.splitlines():
        log.info("%s%s", "[dry run] " if dry_run else "", line)
    if dry_run:
        return {**plan, "dry_run": True, "applied": None}
    t0 = time.monotonic()
    applied = {"backups": [], "leftovers": [], "restore_points": 0, "wal": 0, "catalog_backup_rows": 0,
               "catalog_wal_rows": 0}
    # 1. backups, newest first; backup.json first
    for bid in plan["delete_backups"]:
        prefix = backup_prefix(cluster, bid)
        repo.delete(f"{prefix}/{META_NAME}")
        for key in repo.list(prefix):
            repo.delete(key)
        applied["backups"].append(bid)
        log.info("deleted backup %s", bid)
    # 2. leftovers of interrupted backups or deletions, the in-progress marker last
    for lo in plan["leftovers"]:
        prefix = backup_prefix(cluster, lo["backup_id"])
        if repo.exists(f"{prefix}/{META_NAME}"):  # completed meanwhile: not a leftover
            log.warning("%s completed since the plan was made; left alone", lo["backup_id"])
            continue
        keys = sorted(set(lo["objects"]) | set(repo.list(prefix)), key=lambda k: k.endswith(INPROGRESS_NAME))
        for key in keys:
            repo.delete(key)
        applied["leftovers"].append(lo["backup_id"])
        log.info("deleted leftovers of %s (%d object(s))", lo["backup_id"], len(keys))
    # 2b. unfinished writes of killed processes
    applied["unfinished_writes"] = 0
    for a in plan.get("abandoned_writes", []):
        repo.discard_write(a)
        applied["unfinished_writes"] += 1
    # 3. restore points (the index) before the WAL they point into
    for rp in plan["restore_points"]:
        repo.delete(rp["key"])
        applied["restore_points"] += 1
    # 4. WAL, oldest first: what remains stays continuous
    for n, name in enumerate(plan["delete_wal"], start=1):
        repo.delete(wal_key(cluster, name))
        applied["wal"] = n
    if plan["delete_wal"]:
        log.info("deleted %d WAL file(s) %s .. %s", len(plan["delete_wal"]), plan["delete_wal"][0],
                 plan["delete_wal"][-1])
    # 5. the catalog (an index): rows of what is gone, including rows an interrupted run left
    if catalog is not None:
        applied.update(_catalog_cleanup(repo, cluster, plan, catalog))
    applied["seconds"] = round(time.monotonic() - t0, 3)
    log.info("retention of %s applied in %.1f s: %d backup(s), %d leftover(s), %d restore point(s), %d WAL file(s) "
             "deleted, about %s freed", cluster, applied["seconds"], len(applied["backups"]), len(applied["leftovers"]),
             applied["restore_points"], applied["wal"], human_bytes(plan["bytes_freed"]))
    return {**plan, "dry_run": False, "applied": applied}


def _catalog_cleanup(repo: Repository, cluster: str, plan: dict, catalog) -> dict:
    """Remove the catalog rows of what is gone. Like Catalog.rebuild_from_repository, a 'complete'
    row whose backup.json is no longer in the repository is stale (deleted by an earlier
    run interrupted before this step, or by hand); WAL rows below the horizon whose object is gone
    likewise. Rows of failed or running backups are history and stay."""
    gone = set(plan["delete_backups"])
    staying = {k["backup_id"] for k in plan["keep"]} | {u["backup_id"] for u in plan["untouched"]}
    for row in catalog.backups(cluster, status="complete"):
        bid = row["backup_id"]
        if bid not in gone and bid not in staying and not repo.exists(f"{backup_prefix(cluster, bid)}/{META_NAME}"):
            gone.add(bid)
    for bid in sorted(gone):
        catalog.delete_backup_row(cluster, bid)
    wal_gone = [n for n in plan["delete_wal"] if len(n) == 24]
    h = plan.get("wal_horizon")
    if h is not None:
        listed = set(wal_gone)
        present_w = {o[0] for o in _wal_objects(repo, cluster)}
        for row in catalog.wal_segments(cluster):
            n = row["segment"]
            if n not in listed and n not in present_w and segno_of(n, h["segment_size"]) < h["segno"]:
                wal_gone.append(n)
    if wal_gone:
        catalog.delete_wal_rows(cluster, wal_gone)
    return {"catalog_backup_rows": len(gone), "catalog_wal_rows": len(wal_gone)}


def summary(result: dict) -> dict:
    """Small JSON dict for XCom / CLI output."""
    w = result.get("window") or {}
    return {
        "cluster": result["cluster"], "dry_run": bool(result.get("dry_run")),
        "applied": bool(result.get("applied")), "refused": result.get("refused"),
        "kept": [k["backup_id"] for k in result["keep"]],
        "delete_backups": result["delete_backups"],
        "wal_files": len(result["delete_wal"]),
        "wal_first": result["delete_wal"][0] if result["delete_wal"] else None,
        "wal_last": result["delete_wal"][-1] if result["delete_wal"] else None,
        "other_objects": len(result["delete_other"]),
        "leftovers": [lo["backup_id"] for lo in result.get("leftovers", [])],
        "unfinished_writes": [a["key"] for a in result.get("abandoned_writes", [])],
        "restore_points": [r["name"] for r in result.get("restore_points", [])],
        "bytes_freed": result["bytes_freed"],
        "wal_horizon": (result.get("wal_horizon") or {}).get("lsn"),
        "window_start": w.get("start"), "window_anchor": w.get("anchor"),
        "warnings": result.get("warnings", []),
    }
