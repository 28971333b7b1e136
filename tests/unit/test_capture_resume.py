"""Where pull capture resumes, given what the archive holds and the server's timeline history."""

from __future__ import annotations

from airflow_pg_incremental.core.capture import resume_point
from airflow_pg_incremental.core.lsn import segment_name

SEG = 16 * 1024 * 1024


def arch(**tl):
    return {int(k[1:]): [segment_name(int(k[1:]), s, SEG) for s in segs] for k, segs in tl.items()}


def test_same_timeline_goes_on_after_the_newest_segment():
    assert resume_point(arch(t1=range(1, 8)), [], 1, SEG) == (1, 8, None)


def test_failover_after_the_archive_end_starts_on_the_old_timeline():
    # TL2 branched at 0/9800000 (segment 9), the archive ends with segment 7 of TL1: go on with
    # segment 8 of TL1, pg_receivewal follows onto TL2
    assert resume_point(arch(t1=range(1, 8)), [(1, 0x9800000)], 2, SEG) == (1, 8, None)
    # the archive ends exactly at the switch: the new timeline's first segment
    assert resume_point(arch(t1=range(1, 9)), [(1, 0x9000000)], 2, SEG) == (2, 9, None)


def test_pitr_rewind_resumes_at_the_switch_point_on_the_new_timeline():
    # TL1 archived up to segment 12, the cluster rewound to 0/5123456 and promoted onto TL2
    tli, segno, note = resume_point(arch(t1=range(1, 13)), [(1, 0x5123456)], 2, SEG)
    assert (tli, segno) == (2, 5)
    assert "abandoned branch" in note and segment_name(2, 5, SEG) in note


def test_already_on_the_new_timeline():
    a = arch(t1=range(1, 13), t2=range(5, 9))
    assert resume_point(a, [(1, 0x5123456)], 2, SEG) == (2, 9, None)


def test_two_rewinds_deep():
    # TL2 from TL1 at segment 5, TL3 from TL2 at segment 7; archive has TL1..12 and TL2 5..9
    a = arch(t1=range(1, 13), t2=range(5, 10))
    tli, segno, note = resume_point(a, [(1, 0x5000100), (2, 0x7000200)], 3, SEG)
    assert (tli, segno) == (3, 7) and note


def test_archive_timeline_off_the_servers_history_is_ignored():
    # the archive's TL3 belongs to another branch; the server is on TL2 (from TL1 at segment 5)
    a = arch(t1=range(1, 7), t3=range(6, 9))
    assert resume_point(a, [(1, 0x5000100)], 2, SEG)[:2] == (2, 5)
