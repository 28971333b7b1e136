"""Retention on real PostgreSQL 18: a history of three full chains (incremental and differential
backups) with the WAL captured between them and marker rows with their commit times. A recovery
window is applied (after a dry run, and through two simulated crashes midway); afterwards every
marker time inside the window, and the window's first instant, still restore exactly, the deleted
backups are gone and the repository shrank."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import uuid

import pytest

from airflow_pg_incremental.core import metadata as md
from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.capture import (
    capture_wal_pull,
    check_continuity,
    default_slot_name,
    switch_wal,
)
from airflow_pg_incremental.core.errors import BackupNotFound, RestoreError
from airflow_pg_incremental.core.incremental import take_planned_backup
from airflow_pg_incremental.core.lsn import parse_lsn, segment_name, segno_of
from airflow_pg_incremental.core.pgconn import query
from airflow_pg_incremental.core.pitr import parse_target, restore_pitr
from airflow_pg_incremental.core.repository import LocalRepository, S3Repository
from airflow_pg_incremental.core.retention import (
    RetentionPolicy,
    apply_retention,
    plan_retention,
)
from airflow_pg_incremental.core.wal import list_history, list_segments
from tests.conftest import created

pytestmark = pytest.mark.integration


class Crashing(LocalRepository):
    """The same repository; the process 'dies' at deletion number `crash_at`."""

    def __init__(self, root, crash_at):
        super().__init__(root)
        self.crash_at, self.deleted = crash_at, []

    def delete(self, key):
        if len(self.deleted) == self.crash_at:
            raise KeyboardInterrupt(f"simulated crash before deleting {key}")
        super().delete(key)
        self.deleted.append(key)


def _du(root) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)


def test_retention_keeps_the_window_restorable(pg, workdir, scratch, catalog):
    tag = uuid.uuid4().hex[:8]
    cluster, table = f"ret-{tag}", f"ret_markers_{tag}"
    repo = created(LocalRepository(workdir / f"ret-repo-{tag}"))  # readable by the server's OS user
    conn = pg.conninfo()
    markers: list[tuple[int, dt.datetime]] = []

    def marker() -> None:
        i = len(markers) + 1
        pg.psql(f"INSERT INTO {table} VALUES ({i})")
        ts = query(pg.superuser(), f"SELECT pg_xact_commit_timestamp(xmin) FROM {table} WHERE id = {i}")[0][0]
        markers.append((i, ts))

    def capture() -> None:
        capture_wal_pull(conn, repo, cluster, upto_lsn=switch_wal(conn)["lsn"], catalog=catalog)

    def incremental(kind: str) -> dict:
        m = take_planned_backup(conn, repo, cluster, kind=kind, catalog=catalog)
        assert m["kind"] == kind, m.get("plan")
        return m

    try:
        capture_wal_pull(conn, repo, cluster, catalog=catalog)  # creates the slot before the first backup
        pg.psql(f"CREATE TABLE {table} (id int PRIMARY KEY)")
        f1 = take_full_backup(conn, repo, cluster, catalog=catalog)
        marker()                                    # 1
        i1 = incremental("incremental")
        marker()                                    # 2
        capture()
        f2 = take_full_backup(conn, repo, cluster, catalog=catalog)
        marker()                                    # 3
        i2a = incremental("incremental")
        pg.pgbench_run(20)
        # the window's first instant: after I2a ended, amid pgbench commits, before marker 4
        w_start = query(pg.superuser(), "SELECT clock_timestamp()")[0][0]
        pg.pgbench_run(20)
        i2b = incremental("incremental")
        marker()                                    # 4: the first marker inside the window
        capture()
        f3 = take_full_backup(conn, repo, cluster, catalog=catalog)
        marker()                                    # 5
        d3 = incremental("differential")
        marker()                                    # 6
        pg.pgbench_run(50)                          # commits after the last marker: recovery can stop after it
        capture()

        # the promise: every point from w_start to now stays restorable
        now = md.utcnow()
        policy = RetentionPolicy(recovery_window_days=(now - w_start).total_seconds() / 86400)
        size_before = _du(repo.root)
        listing_before = repo.list("")

        plan = plan_retention(repo, cluster, policy, now=now)
        assert repo.list("") == listing_before
        ids = {n: b["backup_id"] for n, b in (("f1", f1), ("i1", i1), ("f2", f2), ("i2a", i2a), ("i2b", i2b),
                                              ("f3", f3), ("d3", d3))}
        assert plan["window"]["anchor"] == ids["i2a"]
        kept = [k["backup_id"] for k in plan["keep"]]
        assert kept == [ids[n] for n in ("f2", "i2a", "i2b", "f3", "d3")]
        assert plan["delete_backups"] == [ids["i1"], ids["f1"]]
        horizon = plan["wal_horizon"]
        assert horizon["backup_id"] == ids["f2"] and horizon["lsn"] == f2["start_lsn"]
        assert plan["delete_wal"] and all(segno_of(n[:24]) < parse_lsn(f2["start_lsn"]) // (16 << 20)
                                          for n in plan["delete_wal"])
        assert plan["bytes_freed"] > f1["stored_bytes"]
        dry = apply_retention(repo, cluster, plan, dry_run=True, catalog=catalog)
        assert dry["delete_backups"] == plan["delete_backups"] and repo.list("") == listing_before

        assert "window: anchor" in plan["keep"][1]["reasons"][0]
        # crash inside I1's deletion (after its backup.json), then in the WAL while re-running the same plan
        with pytest.raises(KeyboardInterrupt):
            apply_retention(Crashing(repo.root, crash_at=2), cluster, plan, catalog=catalog)
        assert ids["i1"] not in [b["backup_id"] for b in md.list_backups(repo, cluster)]
        mid = plan_retention(repo, cluster, policy, now=now)
        assert [lo["backup_id"] for lo in mid["leftovers"]] == [ids["i1"]]
        assert mid["delete_backups"] == [ids["f1"]]
        with pytest.raises(KeyboardInterrupt):
            apply_retention(Crashing(repo.root, crash_at=5), cluster, plan, catalog=catalog)
        assert [b["backup_id"] for b in md.list_backups(repo, cluster)] == kept
        res = apply_retention(repo, cluster, policy, now=now, catalog=catalog)
        assert res["applied"]["backups"] == [] and res["leftovers"] == []
        again = plan_retention(repo, cluster, policy, now=now)
        assert again["delete_backups"] == again["delete_wal"] == again["delete_other"] == []

        # the deleted backups are gone, the repository shrank, the archive is continuous
        for gone in (ids["f1"], ids["i1"]):
            assert not repo.list(md.backup_prefix(cluster, gone))
            with pytest.raises(BackupNotFound):
                md.load_backup(repo, cluster, gone)
        assert [b["backup_id"] for b in md.list_backups(repo, cluster)] == kept
        assert _du(repo.root) < size_before - f1["stored_bytes"]
        first_kept = list_segments(repo, cluster)[f2["timeline"]][0]
        assert segno_of(first_kept) == parse_lsn(f2["start_lsn"]) // (16 << 20)
        assert check_continuity(repo, cluster, fail_on_gap=False)["ok"]
        assert sorted(r["backup_id"] for r in catalog.backups(cluster)) == sorted(kept)
        assert min(r["segment"] for r in catalog.wal_segments(cluster)) >= first_kept

        # every marker inside the window, and the window's first instant, restore exactly
        points = [("window start", w_start)] + [(f"marker {i}", t) for i, t in markers if t >= w_start]
        assert [p[0] for p in points] == ["window start", "marker 4", "marker 5", "marker 6"]
        expected_backup = {"window start": ids["i2a"], "marker 4": ids["i2b"], "marker 5": ids["f3"],
                           "marker 6": ids["d3"]}  # every kind of chain: F+I, F+I+I, F, F+D
        for n, (label, t) in enumerate(points):
            target_dir = scratch / f"p{n}"
            rep = restore_pitr(repo, cluster, parse_target("time", t.isoformat()), target_dir,
                               os_user=pg.os_user, keep_running=True)
            srv = rep.pop("server")
            try:
                got = query(srv.local_conninfo(), f"SELECT coalesce(array_agg(id ORDER BY id), '{{}}') FROM {table}")
            finally:
                srv.stop()
            assert got[0][0] == [i for i, ts in markers if ts <= t], (label, rep)
            assert rep["backup_id"] == expected_backup[label], label
            shutil.rmtree(target_dir, ignore_errors=True)
        # a point before the window, once restorable from F1, is now refused before anything is touched
        with pytest.raises(RestoreError, match="before the oldest backup"):
            restore_pitr(repo, cluster, parse_target("time", markers[0][1].isoformat()), scratch / "old",
                         os_user=pg.os_user)
        assert not (scratch / "old").exists()
    finally:
        try:
            pg.psql(f"SELECT pg_drop_replication_slot('{default_slot_name(cluster)}')")
        except Exception:
            pass
        pg.psql(f"DROP TABLE IF EXISTS {table}")


def test_retention_on_s3_with_a_crash_midway(s3):
    """The same rules on SeaweedFS (listing by common prefixes, no directories): fake weekly chains
    and WAL across a timeline switch, a crash in the middle of a backup's deletion, a re-run."""
    from tests.unit.test_retention import NOW, C, weekly

    prefix = "ret-" + uuid.uuid4().hex[:8]
    repo = created(S3Repository(s3.client(), s3.bucket, prefix))
    f = weekly(repo)  # chains 1..4 (full at segment 10k), WAL 5..50 on timeline 1
    f.small("00000002.history", b"1\t0/2D000000\tno recovery target specified\n")
    f.wal(2, range(45, 53))
    f.restore_point("old", 12)
    f.restore_point("new", 47)
    policy = RetentionPolicy(keep_full_chains=2)
    plan = plan_retention(repo, C, policy, now=NOW)
    assert plan["delete_backups"] == ["I2b", "I2a", "F2", "I1b", "I1a", "F1"]
    assert plan["wal_horizon"]["segno"] == 30 and len(plan["delete_wal"]) == 25
    assert [r["name"] for r in plan["restore_points"]] == ["old"]

    class CrashingS3(S3Repository):
        def __init__(self, *a, crash_at):
            super().__init__(*a)
            self.n, self.crash_at = 0, crash_at

        def delete(self, key):
            if self.n == self.crash_at:
                raise KeyboardInterrupt("simulated crash")
            super().delete(key)
            self.n += 1

    with pytest.raises(KeyboardInterrupt):
        apply_retention(CrashingS3(s3.client(), s3.bucket, prefix, crash_at=4), C, plan)  # inside I2a
    assert "I2a" not in md.list_backup_ids(repo, C) or not repo.exists(f"{md.backup_prefix(C, 'I2a')}/backup.json")
    res = apply_retention(repo, C, plan)  # the approved plan again: I2a's remains are leftovers now
    assert res["applied"]["backups"] == ["F2", "I1b", "I1a", "F1"] and res["applied"]["leftovers"] == ["I2a"]
    assert [b["backup_id"] for b in md.list_backups(repo, C)] == ["F3", "I3a", "I3b", "F4", "I4a", "I4b"]
    for gone in plan["delete_backups"]:  # (SeaweedFS may still list the empty 'directory')
        assert repo.list(md.backup_prefix(C, gone)) == []
    segs = list_segments(repo, C)
    assert segs[1] == [segment_name(1, n) for n in range(30, 51)] and segs[2][0] == segment_name(2, 45)
    assert list_history(repo, C) == [2]
    assert [k.rsplit("/", 1)[-1] for k in repo.list(f"{C}/restore_points")] == ["new.json"]
    again = plan_retention(repo, C, policy, now=NOW)
    assert again["delete_backups"] == again["delete_wal"] == again["delete_other"] == []


@pytest.mark.slow
def test_retention_lets_what_a_verified_synthetic_full_absorbed_go(pg, workdir, scratch, catalog):
    """F, I1, I2, S (synthetic full of I2, verified), I3, I4 with pgbench and WAL capture between;
    a window starting after I2: without verification evidence nothing goes, with it I1, I2 and F go
    (incremental forever: the chain's full too, once the verified S stands in for it, and the WAL
    before S); afterwards every remaining backup and every point of the window restore to the data
    fingerprint the source had then, and the next incremental still builds on I4."""
    from airflow_pg_incremental.core.synthetic import synthesize
    from airflow_pg_incremental.core.verify import verify_backup
    from airflow_pg_incremental.sandbox import data_fingerprint

    cluster = f"rsyn-{uuid.uuid4().hex[:8]}"
    repo = created(LocalRepository(workdir / f"{cluster}-repo"))
    conn = pg.conninfo()
    fps: dict[str, dict] = {}     # backup id -> the source's data at its end
    points: list[tuple[str, dt.datetime, dict]] = []

    def capture() -> None:
        capture_wal_pull(conn, repo, cluster, upto_lsn=switch_wal(conn)["lsn"], catalog=catalog)

    def backup(kind: str) -> dict:
        m = take_planned_backup(conn, repo, cluster, kind="incremental", catalog=catalog)
        assert m["kind"] == kind, m.get("plan")
        fps[m["backup_id"]] = data_fingerprint(pg.superuser())
        pg.pgbench_run(30)
        return m

    def point(label: str) -> None:
        fp = data_fingerprint(pg.superuser())  # no commit between this and the time taken after it
        points.append((label, query(pg.superuser(), "SELECT clock_timestamp()")[0][0], fp))
        pg.pgbench_run(30)

    try:
        capture_wal_pull(conn, repo, cluster, catalog=catalog)  # the slot, before the first backup
        f = take_full_backup(conn, repo, cluster, catalog=catalog)
        fps[f["backup_id"]] = data_fingerprint(pg.superuser())
        pg.pgbench_run(30)
        i1, i2 = backup("incremental"), backup("incremental")
        s = synthesize(repo, cluster, i2["backup_id"], scratch_dir=scratch, catalog=catalog)
        assert s["stands_for"] == i2["backup_id"] and s["built_from"] == [f["backup_id"], i1["backup_id"],
                                                                         i2["backup_id"]]
        fps[s["backup_id"]] = fps[i2["backup_id"]]  # the point it stands for
        point("window start")
        capture()
        i3 = backup("incremental")
        point("between I3 and I4")
        capture()
        i4 = backup("incremental")
        assert (i3["parent_id"], i4["parent_id"]) == (i2["backup_id"], i3["backup_id"])
        point("after I4")
        capture()
        ids = [b["backup_id"] for b in (f, i1, i2, s, i3, i4)]
        F, I1, I2, S, I3, I4 = ids
        # (S shares I2's started_at; when they began in the same second S's id can sort first)
        assert sorted(b["backup_id"] for b in md.list_backups(repo, cluster)) == sorted(ids)

        now = md.utcnow()
        policy = RetentionPolicy(recovery_window_days=(now - points[0][1]).total_seconds() / 86400)
        # no verification evidence: S cannot replace its chain yet, nothing goes
        unverified = plan_retention(repo, cluster, policy, now=now, catalog=catalog)
        assert unverified["delete_backups"] == [] and unverified["window"]["anchor"] == S
        assert any("cannot replace it yet: not verified yet" in r for k in unverified["keep"] if k["backup_id"] == I2
                   for r in k["reasons"])
        rep = verify_backup(repo, cluster, S, catalog=catalog, chain=False, check_wal=False, staging_parent=scratch)
        assert rep["verified"] == [S], rep["failed"]

        plan = plan_retention(repo, cluster, policy, now=now, catalog=catalog)
        assert [k["backup_id"] for k in plan["keep"]] == [S, I3, I4]
        assert plan["delete_backups"] == [I2, I1, F] and plan["window"]["anchor"] == S
        assert plan["wal_horizon"]["backup_id"] == S
        res = apply_retention(repo, cluster, plan, catalog=catalog)
        assert res["applied"]["backups"] == [I2, I1, F]
        assert [b["backup_id"] for b in md.list_backups(repo, cluster)] == [S, I3, I4]
        assert sorted(r["backup_id"] for r in catalog.backups(cluster)) == sorted([S, I3, I4])
        assert check_continuity(repo, cluster, fail_on_gap=False)["ok"]
        again = plan_retention(repo, cluster, policy, now=now, catalog=catalog)
        assert again["delete_backups"] == [] and [k["backup_id"] for k in again["keep"]] == [S, I3, I4]
        # the server never sends a full again: the next incremental builds on I4, restored through S
        i5 = backup("incremental")
        assert i5["parent_id"] == I4 and i5["restore_chain"] == [S, I3, I4, i5["backup_id"]]
        capture()

        # every remaining backup restores to its own end, every point of the window exactly
        cases = [(f"backup {b}", parse_target("immediate"), b, fps[b], b) for b in (S, I3, I4, i5["backup_id"])]
        cases += [(label, parse_target("time", t.isoformat()), None, fp, base)
                  for (label, t, fp), base in zip(points, (S, I3, I4))]
        for n, (label, target, bid, fp, base) in enumerate(cases):
            target_dir = scratch / f"syn{n}"
            out = restore_pitr(repo, cluster, target, target_dir, backup_id=bid, os_user=pg.os_user,
                               keep_running=True)
            srv = out.pop("server")
            try:
                got = data_fingerprint(srv.local_conninfo())
            finally:
                srv.stop()
            assert out["backup_id"] == base, (label, out)
            assert got == fp, label
            shutil.rmtree(target_dir, ignore_errors=True)
    finally:
        try:
            pg.psql(f"SELECT pg_drop_replication_slot('{default_slot_name(cluster)}')")
        except Exception:
            pass
