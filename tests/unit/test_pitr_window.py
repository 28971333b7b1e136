"""The end of the recoverable window: pg_waldump's transaction-end records in every form PostgreSQL
15-18 prints them (lines below are copied from real pg_waldump 15 and 18 output, run with TZ=UTC;
the origin / apply_feedback / sync forms follow xact_desc_commit), and the window check that
refuses targets recovery could not reach."""

from __future__ import annotations

import pytest

from airflow_pg_incremental.core.errors import RestoreError, TargetBeyondArchive
from airflow_pg_incremental.core.pitr import _fatal_lines, check_window, parse_target, parse_waldump

R = "rmgr: Transaction len (rec/tot):     46/    46, tx:        754, lsn: 0/0171D740, prev 0/0171D700, desc: "
HEAP = ("rmgr: Heap        len (rec/tot):     54/    54, tx:        761, lsn: 0/01725E00, prev 0/01725DC0, desc: "
        "INSERT off: 4, flags: 0x00, blkref #0: rel 1663/5/16388 blk 0")
SWITCH = "rmgr: XLOG        len (rec/tot):     24/    24, tx:          0, lsn: 0/01725F10, prev 0/01725E00, desc: SWITCH "

VARIANTS = {
    "plain": ("COMMIT 2026-11-25 13:01:02.345678 UTC", "2026-11-25T13:01:02.345678+00:00"),
    "subxacts": ("COMMIT 2026-11-25 13:01:02.345678 UTC; subxacts: 1234", "2026-11-25T13:01:02.345678+00:00"),
    "ddl": ("COMMIT 2026-11-25 15:31:20.063404 UTC; inval msgs: catcache 82 catcache 81 snapshot 2608 relcache 16388",
            "2026-11-25T15:31:20.063404+00:00"),
    "rels": ("COMMIT 2026-11-25 15:31:20.080576 UTC; rels: base/5/16391; dropped stats: 2/5/16391; inval msgs: "
             "catcache 82", "2026-11-25T15:31:20.080576+00:00"),
    "origin": ("COMMIT 2026-11-25 13:01:02.345678 UTC; origin: node 1, lsn 0/1A2B3C4D, at 2026-11-25 "
               "13:01:09.000001 UTC", "2026-11-25T13:01:02.345678+00:00"),
    "feedback-sync": ("COMMIT 2026-11-25 13:01:02.000001 UTC; apply_feedback; sync", "2026-11-25T13:01:02.000001+00:00"),
    "commit-prepared": ("COMMIT_PREPARED 757: 2026-11-25 15:31:20.069128 UTC", "2026-11-25T15:31:20.069128+00:00"),
    "abort": ("ABORT 2026-11-25 15:31:20.077532 UTC", "2026-11-25T15:31:20.077532+00:00"),
    "abort-rels": ("ABORT 2026-11-25 15:31:20.077532 UTC; rels: base/5/16399; subxacts: 760",
                   "2026-11-25T15:31:20.077532+00:00"),
    "abort-prepared": ("ABORT_PREPARED 758: 2026-11-25 15:31:20.074663 UTC", "2026-11-25T15:31:20.074663+00:00"),
    "gmt": ("COMMIT 2026-11-25 13:01:02.345678 GMT; subxacts: 9", "2026-11-25T13:01:02.345678+00:00"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_transaction_end_variant_gives_its_time(variant):
    desc, expect = VARIANTS[variant]
    got = parse_waldump("\n".join([HEAP, R + desc, SWITCH]) + "\n")
    assert got == {"last_record_lsn": "0/01725F10", "end_time": expect}


def test_the_latest_time_of_several_is_the_end_and_prepare_is_not_one():
    text = "\n".join([R + VARIANTS["abort"][0],
                      R + "PREPARE gid x, desc: COMMIT 2030-01-01 00:00:00.000000 UTC: 2026-11-25 16:00:00.000000 UTC",
                      R + VARIANTS["subxacts"][0], HEAP])
    assert parse_waldump(text) == {"last_record_lsn": "0/01725E00", "end_time": "2026-11-25T15:31:20.077532+00:00"}


def test_no_transaction_end_and_no_record():
    assert parse_waldump(HEAP + "\n" + SWITCH) == {"last_record_lsn": "0/01725F10", "end_time": None}
    assert parse_waldump("") == {"last_record_lsn": None, "end_time": None}
    assert parse_waldump("pg_waldump: error: could not find a valid record after 0/1000000\n") == \
        {"last_record_lsn": None, "end_time": None}


def test_a_zone_other_than_utc_is_not_guessed():
    # pg_waldump runs with TZ=UTC; should a local zone still appear, the time stays unknown
    got = parse_waldump(R + "COMMIT 2026-11-25 16:31:20.059896 CET; subxacts: 755\n")
    assert got["end_time"] is None and got["last_record_lsn"] == "0/0171D740"


# ---- the window check -------------------------------------------------------------------------
END = "2026-11-25T13:01:02.345678+00:00"


def window(**kw):
    w = {"backup_id": "B1", "start_lsn": "0/2000100", "start_time": "2026-11-25T12:00:00+00:00",
         "end_lsn": "0/5000000", "end_segment": "000000010000000000000004", "end_time": END,
         "last_record_lsn": "0/4FFFF00", "end_time_none": False, "gap_after": None}
    w.update(kw)
    return w


@pytest.mark.parametrize("value,inclusive,ok", [
    ("2026-11-25T13:01:02.345677+00:00", True, True),    # just before the last commit
    ("2026-11-25T13:01:02.345678+00:00", True, False),   # the last commit itself, inclusive: unreachable
    ("2026-11-25T13:01:02.345678+00:00", False, True),   # ... exclusive: stops before it
    ("2026-11-25T13:01:02.345679+00:00", False, False),
    ("2026-11-25T14:01:02.345678+01:00", True, False),   # the same instant in another zone
    ("2026-11-25T14:01:00+00:00", True, False),
])
def test_time_targets_at_the_end(value, inclusive, ok):
    target = parse_target("time", value, inclusive=inclusive)
    if ok:
        check_window(target, window())
        return
    with pytest.raises(TargetBeyondArchive, match="outside the recoverable window") as e:
        check_window(target, window())
    msg = str(e.value)
    assert "0/4FFFF00" in msg and END in msg and "--target latest" in msg


@pytest.mark.parametrize("value,ok", [("0/4FFFEFF", True), ("0/4FFFF00", True), ("0/4FFFF01", False),
                                      ("0/5000000", False), ("FF/0", False)])
def test_lsn_targets_at_the_end(value, ok):
    for inclusive in (True, False):
        target = parse_target("lsn", value, inclusive=inclusive)
        if ok:
            check_window(target, window())
        else:
            with pytest.raises(TargetBeyondArchive, match=r"last reachable point is LSN 0/4FFFF00.*--target latest"):
                check_window(target, window())


def test_lsn_end_unknown_falls_back_to_the_end_of_the_last_segment():
    w = window(last_record_lsn=None, end_time=None)
    check_window(parse_target("lsn", "0/4FFFFFF"), w)
    with pytest.raises(TargetBeyondArchive):
        check_window(parse_target("lsn", "0/5000000"), w)


def test_time_target_without_any_transaction_end_after_the_backup():
    with pytest.raises(TargetBeyondArchive, match="no transaction committed or aborted"):
        check_window(parse_target("time", "2026-11-25T12:30:00+00:00"), window(end_time=None, end_time_none=True))
    # unknown (pg_waldump could not tell): not refused
    check_window(parse_target("time", "2026-11-25T12:30:00+00:00"), window(end_time=None))


def test_beyond_the_archive_is_a_restore_error_with_the_gap():
    with pytest.raises(RestoreError, match="segment 000000010000000000000005 is missing"):
        check_window(parse_target("time", "2027-01-01T00:00:00+00:00"), window(gap_after="000000010000000000000005"))


# ---- the server log of a failed recovery ----------------------------------------------------------
LOG = """\
2026-11-25 15:00:00.001 UTC [10] LOG:  starting PostgreSQL 18.1
2026-11-25 15:00:00.002 UTC [11] LOG:  starting point-in-time recovery to XID 99999
2026-11-25 15:00:00.003 UTC [12] FATAL:  the database system is starting up
2026-11-25 15:00:00.004 UTC [11] LOG:  restored log file "000000010000000000000003" from archive
2026-11-25 15:00:00.005 UTC [11] LOG:  redo starts at 0/3000028
2026-11-25 15:00:00.006 UTC [11] LOG:  consistent recovery state reached at 0/3000120
2026-11-25 15:00:00.007 UTC [10] LOG:  database system is ready to accept read-only connections
2026-11-25 15:00:00.008 UTC [11] LOG:  restored log file "000000010000000000000004" from archive
pgincr wal-fetch: 000000010000000000000005 is not in the archive
2026-11-25 15:00:00.009 UTC [11] LOG:  redo done at 0/4000110 system usage: CPU: user: 0.00 s
2026-11-25 15:00:00.010 UTC [11] LOG:  last completed transaction was at log time 2026-11-25 14:59:00+00
2026-11-25 15:00:00.011 UTC [11] FATAL:  recovery ended before configured recovery target was reached
2026-11-25 15:00:00.012 UTC [10] LOG:  startup process (PID 11) exited with exit code 1
2026-11-25 15:00:00.013 UTC [10] LOG:  terminating any other active server processes
2026-11-25 15:00:00.014 UTC [10] LOG:  database system is shut down
"""


def test_fatal_lines_lead_with_the_cause():
    lines = _fatal_lines(LOG).splitlines()
    assert lines[0].endswith("FATAL:  recovery ended before configured recovery target was reached")
    assert not any("starting up" in ln or "terminating" in ln or "startup process" in ln for ln in lines)
    assert any("redo done at 0/4000110" in ln for ln in lines)
    assert any("last completed transaction" in ln for ln in lines)
    assert any("not in the archive" in ln for ln in lines)


def test_fatal_lines_keep_detail_and_hint():
    log = ("x LOG:  starting archive recovery\n"
           "x FATAL:  could not locate required checkpoint record at 0/3000060\n"
           "x HINT:  If you are restoring from a backup, touch recovery.signal\n"
           "x LOG:  startup process (PID 1) exited with exit code 1\n")
    lines = _fatal_lines(log).splitlines()
    assert lines[0].endswith("could not locate required checkpoint record at 0/3000060")
    assert lines[1].endswith("touch recovery.signal")
