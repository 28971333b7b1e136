"""Where zstd runs, on the embedded PostgreSQL 18 (built without zstd): the server cannot compress
and neither can its pg_basebackup, so pgincr compresses, and says so; threads default to the cores.
(Server- and client-side zstd on a server that has it: test_pg15.py.)"""

from __future__ import annotations

import logging

import pytest

from airflow_pg_incremental.core import backup_stream
from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.errors import ConfigError
from airflow_pg_incremental.core.restore import restore_backup, start_restored
from airflow_pg_incremental.sandbox import data_fingerprint

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("asked", ["server", "auto"])
def test_server_compression_falls_back_on_a_server_without_zstd(pg, repo, scratch, caplog, asked):
    before = data_fingerprint(pg.superuser())
    with caplog.at_level(logging.INFO, logger="airflow_pg_incremental"):
        meta = take_full_backup(pg.conninfo(), repo, "fb", compression=asked)
    assert meta["compression"] == {"where": "python", "level": 3, "threads": backup_stream.default_threads()}
    said = [r for r in caplog.records if "the server was built without zstd" in r.getMessage()]
    assert said, [r.getMessage() for r in caplog.records]
    if asked == "server":  # asked for explicitly: a warning, not a silent change
        assert any(r.levelno == logging.WARNING for r in said)
    base = next(o for o in meta["objects"] if o["key"].endswith("base.tar.zst"))
    assert base["raw_size"] == meta["raw_bytes"] > base["stored_size"]
    restore_backup(repo, "fb", meta["backup_id"], scratch / "d", os_user=pg.os_user)
    srv = start_restored(scratch / "d", 18, os_user=pg.os_user)
    try:
        assert data_fingerprint(srv.local_conninfo()) == before
    finally:
        srv.stop()


def test_an_unknown_compression_is_refused_before_anything_runs(pg, repo):
    with pytest.raises(ConfigError, match="auto, server, client"):
        take_full_backup(pg.conninfo(), repo, "fb2", compression="gzip")
    assert repo.list("fb2/backups/") == []
