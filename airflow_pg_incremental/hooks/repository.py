"""Hooks: Airflow connections -> engine objects. No backup logic here."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseHook

from airflow_pg_incremental.core.catalog import Catalog
from airflow_pg_incremental.core.pgconn import ConnInfo
from airflow_pg_incremental.core.repository import (
    LocalRepository,
    Repository,
    open_repository,
)

_LIBPQ_EXTRAS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout", "application_name",
                 "target_session_attrs", "options")


class PgClusterHook(BaseHook):
    """A PostgreSQL server to back up, from a standard `postgres` connection.

    Host, port, login, password and schema (database) are used; libpq options (sslmode, sslrootcert,
    sslcert, sslkey, connect_timeout, options ...) come from the connection's extra. The password is
    handed to PostgreSQL programs through their environment only.
    """

    conn_name_attr = "postgres_conn_id"
    default_conn_name = "postgres_default"
    conn_type = "postgres"
    hook_name = "PostgreSQL cluster (backups)"

    def __init__(self, postgres_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.postgres_conn_id = postgres_conn_id

    def get_conninfo(self, dbname: str | None = None) -> ConnInfo:
        conn = self.get_connection(self.postgres_conn_id)
        extra = conn.extra_dejson or {}
        return ConnInfo(host=conn.host or None, port=int(conn.port) if conn.port else None, user=conn.login or None,
                        password=conn.password or None, dbname=dbname or conn.schema or "postgres",
                        extra={k: extra[k] for k in _LIBPQ_EXTRAS if k in extra}, origin="airflow")

    def get_conn(self) -> ConnInfo:
        return self.get_conninfo()

    def get_catalog(self, schema: str = "pgincr") -> Catalog:
        return Catalog(self.get_conninfo(), schema=schema)


class PgBackupRepositoryHook(BaseHook):
    """The backup repository: a local directory, or `s3://bucket/prefix` reached through an Amazon
    (`aws`) connection, whose extra may carry `endpoint_url` for any S3-compatible store."""

    conn_name_attr = "aws_conn_id"
    default_conn_name = "aws_default"
    conn_type = "aws"
    hook_name = "PostgreSQL backup repository"

    def __init__(self, repository: str, aws_conn_id: str | None = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.repository = repository
        self.aws_conn_id = aws_conn_id

    def get_repository(self, must_exist: bool = True) -> Repository:
        """The repository; with `must_exist` (the default) its identity marker is checked: a
        location holding no pgincr repository is an error naming the fix, never an empty one."""
        if self.repository.startswith("s3://"):
            from airflow.providers.amazon.aws.hooks.s3 import (
                S3Hook,  # lazy: only S3 users pay for it
            )

            client = S3Hook(aws_conn_id=self.aws_conn_id).get_conn()
            repo: Repository = open_repository(self.repository, s3_client=client, origin="airflow")
        else:
            repo = open_repository(self.repository)
            assert isinstance(repo, LocalRepository)
        if must_exist:
            repo.identity()
        return repo

    def get_conn(self) -> Repository:
        return self.get_repository()
