"""Fake repositories for unit tests: sealed backup.json files with chain fields, WAL objects pushed
with core.wal.push_bytes, restore points."""

from __future__ import annotations

import datetime as dt
import json

from airflow_pg_incremental.core import metadata as md
from airflow_pg_incremental.core.lsn import format_lsn, segment_name
from airflow_pg_incremental.core.wal import push_bytes

UTC = dt.timezone.utc
SEG = 16 * 1024 * 1024
ZERO = bytes(SEG)
C = "main"
NOW = dt.datetime(2026, 11, 29, 0, 0, tzinfo=UTC)
DAY = dt.timedelta(days=1)


def lsn(segno: int, off: int = 0x28) -> str:
    return format_lsn(segno * SEG + off)


class Fake:
    """A repository filled with fake backups and WAL."""

    def __init__(self, repo, cluster=C):
        self.repo, self.cluster = repo, cluster
        self.metas: dict[str, dict] = {}

    def backup(self, bid, start_seg, finished, kind="full", parent=None, timeline=1, size=1000, extra=None):
        p = self.metas[parent] if parent else None
        prefix = md.backup_prefix(self.cluster, bid)
        objects = []
        for name, n in (("base.tar.zst", size), ("backup_manifest.zst", 10)):
            self.repo.put_bytes(f"{prefix}/{name}", b"x" * n)
            objects.append({"key": f"{prefix}/{name}", "stored_size": n})
        meta = {"format": 1, "cluster": self.cluster, "backup_id": bid, "kind": kind, "status": "complete",
                "parent_id": parent, "chain_root_id": (p.get("chain_root_id") or p["backup_id"]) if p else bid,
                "chain_length": (p["chain_length"] + 1) if p else 1,
                "started_at": md.iso(finished - dt.timedelta(minutes=5)), "finished_at": md.iso(finished),
                "start_lsn": lsn(start_seg), "stop_lsn": lsn(start_seg, 0x2000), "timeline": timeline,
                "wal_segment_size": SEG, "pg_major": 18, "stored_bytes": size + 10, "objects": objects}
        meta.update(extra or {})
        md.write_meta(self.repo, meta)
        self.metas[bid] = meta
        return meta

    def synthetic(self, bid, stands_for):
        """A synthetic full standing for `stands_for` (its LSNs, timeline and times), built from its chain."""
        t = self.metas[stands_for]
        chain, cur = [], t
        while cur is not None:
            chain.insert(0, cur["backup_id"])
            cur = self.metas.get(cur["parent_id"]) if cur["parent_id"] else None
        same = {k: t[k] for k in ("start_lsn", "stop_lsn", "timeline", "started_at", "finished_at")}
        return self.backup(bid, 0, dt.datetime.fromisoformat(t["finished_at"]), kind="synthetic",
                           size=t["stored_bytes"] * 3, extra={**same, "stands_for": stands_for, "built_from": chain})

    def wal(self, tli, segnos):
        for s in segnos:
            push_bytes(self.repo, self.cluster, segment_name(tli, s), ZERO, segment_size=SEG, checksum=False)

    def small(self, name, data=b"x"):
        push_bytes(self.repo, self.cluster, name, data)

    def restore_point(self, name, segno, tli=1):
        self.repo.put_bytes(f"{self.cluster}/restore_points/{name}.json",
                            json.dumps({"name": name, "lsn": lsn(segno), "timeline": tli,
                                        "created_at": "2026-11-01T00:00:00+00:00"}).encode())


def branched(repo, a1_days_ago: float = 12) -> Fake:
    """A PITR rewound the cluster to 0/14000000 (segment 20 of TL1) and promoted it (TL2); the old
    primary had gone on: A1 (TL1, segment 24) lies on the abandoned branch. B1, B2 (TL1, before
    the switch), B3, B4 (TL2). WAL: TL1 1..30, TL2 20..40."""
    f = Fake(repo)
    f.backup("B1", 2, NOW - 20 * DAY)
    f.backup("B2", 12, NOW - 15 * DAY)
    f.backup("A1", 24, NOW - a1_days_ago * DAY)
    f.backup("B3", 25, NOW - 8 * DAY, timeline=2)
    f.backup("B4", 35, NOW - 1 * DAY, timeline=2)
    f.wal(1, range(1, 31))
    f.wal(2, range(20, 41))
    f.small("00000002.history", b"1\t0/14000000\tbefore 2026-11-14 00:00:00+00\n")
    return f


def only_abandoned(repo) -> Fake:
    """The one backup, A1, lies on timeline 1 past the point where timeline 2 left it."""
    f = Fake(repo)
    f.backup("A1", 24, NOW - 2 * DAY)
    f.wal(1, range(20, 30))
    f.wal(2, range(20, 30))
    f.small("00000002.history", b"1\t0/14000000\tno recovery target specified\n")
    return f



def new_repo(path):
    """A new (created: it has its identity marker) local repository at `path`."""
    from airflow_pg_incremental.core.repository import LocalRepository

    repo = LocalRepository(path)
    repo.create()
    return repo
