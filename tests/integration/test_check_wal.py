"""check-wal on a real server: a backup whose WAL (up to its stop segment) is not archived fails
the check, naming the backup and the fix, although the archive itself has no gap; capturing the
WAL makes it pass."""

from __future__ import annotations

import json
import uuid

import pytest

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.capture import (
    capture_wal_pull,
    check_continuity,
    default_slot_name,
    switch_wal,
)
from airflow_pg_incremental.core.repository import LocalRepository
from airflow_pg_incremental.core.wal import WalGap, list_segments
from tests.conftest import created
from tests.integration.test_cli import pgincr

pytestmark = pytest.mark.integration


def test_check_wal_fails_until_the_newest_backups_wal_is_archived(pg, tmp_path):
    repo = created(LocalRepository(tmp_path / "repo"))
    cl = f"cwal_{uuid.uuid4().hex[:8]}"
    args = ("check-wal", "--repo", str(repo.root), "--cluster", cl)
    try:
        capture_wal_pull(pg.conninfo(), repo, cl)  # the slot; the archive begins
        pg.pgbench_run(10)
        capture_wal_pull(pg.conninfo(), repo, cl, upto_lsn=switch_wal(pg.conninfo())["lsn"])
        assert list_segments(repo, cl)
        b = take_full_backup(pg.conninfo(), repo, cl)  # its WAL not captured
        bid, stop = b["backup_id"], b["stop_wal_file"]

        rep = check_continuity(repo, cl, fail_on_gap=False)
        assert not rep["ok"] and rep["gaps"] == []  # no gap inside the archive: it just ends too early
        [problem] = rep["problems"]
        assert f"backup {bid}'s WAL" in problem and f"its stop segment {stop} is not archived" in problem
        assert f"pgincr capture --cluster {cl}" in problem and "take a new full backup once archiving works" in problem
        assert rep["backups_without_wal"][0]["backup_id"] == bid
        with pytest.raises(WalGap, match=f"backup {bid}'s WAL"):
            check_continuity(repo, cl)
        r = pgincr(*args, "--json")
        assert r.returncode == 4 and bid in json.loads(r.stdout)["problems"][0]
        r = pgincr(*args)
        assert r.returncode == 4 and f"PROBLEM: backup {bid}'s WAL" in r.stdout, r.stdout

        capture_wal_pull(pg.conninfo(), repo, cl, upto_lsn=switch_wal(pg.conninfo())["lsn"])
        rep = check_continuity(repo, cl)
        assert rep["ok"] and rep["problems"] == [] and rep["backups_without_wal"] == []
        assert pgincr(*args).returncode == 0
    finally:
        pg.psql(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                f"WHERE slot_name = '{default_slot_name(cl)}'")
