"""A full backup restored from SeaweedFS through several ranged GETs side by side comes back
exact (and its verification reads it the same way); an S3 outage in the middle of those reads
stops the restore loudly, leaves nothing behind, and a retry after the outage is exact."""

from __future__ import annotations

import threading
import uuid

import pytest

from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.errors import PgIncrError
from airflow_pg_incremental.core.repository import S3Repository
from airflow_pg_incremental.core.restore import restore_backup
from airflow_pg_incremental.core.verify import verify_backup
from airflow_pg_incremental.sandbox import SeaweedS3, data_fingerprint
from tests.conftest import created
from tests.restore_evidence import restored_fingerprint

pytestmark = pytest.mark.integration

PART = 256 * 1024  # small parts, so the test cluster's backup is many of them


class Watching:
    """A boto3 S3 client that counts the ranged GETs of base tars, the most in flight at once, and
    runs `on_ranged(n)` before the n-th one."""

    def __init__(self, client):
        self._client = client
        self.ranged = 0
        self.in_flight = self.max_in_flight = 0
        self.on_ranged = None
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._client, name)

    def get_object(self, **kw):
        if "Range" not in kw or not kw["Key"].endswith("base.tar.zst"):
            return self._client.get_object(**kw)
        with self._lock:
            self.ranged += 1
            n = self.ranged
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.on_ranged:
                self.on_ranged(n)
            resp = self._client.get_object(**kw)
            resp["Body"].read = _slow(resp["Body"].read)  # parts overlap even on a fast loopback
            return resp
        finally:
            with self._lock:
                self.in_flight -= 1


def _slow(read):
    def slowly(*a, **kw):
        threading.Event().wait(0.01)
        return read(*a, **kw)
    return slowly


def _repo(client, bucket: str, prefix: str, streams: int = 4) -> S3Repository:
    repo = S3Repository(client, bucket, prefix, read_streams=streams)
    repo.READ_PART = PART
    return repo


def test_full_restores_exactly_through_ranged_reads_side_by_side(pg, s3, scratch):
    client = Watching(s3.client())
    repo = created(_repo(client, s3.bucket, f"streams-{uuid.uuid4().hex[:8]}"))
    before = data_fingerprint(pg.superuser())
    meta = take_full_backup(pg.conninfo(), repo, "st")
    stored = next(o for o in meta["objects"] if o["key"].endswith("base.tar.zst"))["stored_size"]
    assert stored > 4 * PART, "the backup must span several parts for this test to mean anything"

    res = restore_backup(repo, "st", meta["backup_id"], scratch / "d", os_user=pg.os_user)
    assert res["verified"] is True
    assert client.ranged >= stored // PART
    assert client.max_in_flight >= 2, "the parts were read one after another"
    assert restored_fingerprint(scratch / "d", pg.os_user) == before

    read_before = client.ranged
    rep = verify_backup(repo, "st", meta["backup_id"], check_wal=False)
    assert rep["failed"] == [] and rep["verified"] == [meta["backup_id"]], rep
    assert client.ranged > read_before  # verification reads the same way, and finds it whole


def test_s3_outage_mid_restore_is_loud_and_a_retry_is_exact(pg, workdir, scratch):
    s3 = SeaweedS3(workdir / f"s3-streams-{uuid.uuid4().hex[:6]}").start()
    try:
        client = Watching(s3.client())
        repo = created(_repo(client, s3.bucket, "outage"))
        before = data_fingerprint(pg.superuser())
        meta = take_full_backup(pg.conninfo(), repo, "so")
        client.on_ranged = lambda n: n == 4 and s3.stop()
        # SeaweedFS stopping mid-transfer ends a part's body early (asked again, then unreachable) or,
        # now and then, sends the right number of wrong bytes: the zstd check refuses those
        with pytest.raises(PgIncrError, match="unreachable|S3 failure|corrupt"):
            restore_backup(repo, "so", meta["backup_id"], scratch / "d", os_user=pg.os_user)
        assert not (scratch / "d").exists(), "a failed restore leaves nothing behind"

        client.on_ranged = None
        s3.start()
        restore_backup(repo, "so", meta["backup_id"], scratch / "d", os_user=pg.os_user)
        assert restored_fingerprint(scratch / "d", pg.os_user) == before
    finally:
        s3.stop()
