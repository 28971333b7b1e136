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


REPOSITORY_OPTIONS = ("encryption_key_conn_id", "s3_sse", "s3_sse_kms_key_id")


class PgBackupRepositoryHook(BaseHook):
    """The backup repository: a local directory, or `s3://bucket/prefix` reached through an Amazon
    (`aws`) connection, whose extra may carry `endpoint_url` for any S3-compatible store.

    `encryption_key_conn_id`: the connection (any type; served by Airflow's secrets backends like
    every connection) whose password is the key of an encrypted repository (base64 or hex of 32
    random bytes) and whose extra may list older keys, `{"old_keys": ["..."]}`, after a rotation.
    `s3_sse` (AES256 | aws:kms) and `s3_sse_kms_key_id`: S3 server-side encryption of writes."""

    conn_name_attr = "aws_conn_id"
    default_conn_name = "aws_default"
    conn_type = "aws"
    hook_name = "PostgreSQL backup repository"

    def __init__(self, repository: str, aws_conn_id: str | None = default_conn_name, *,
                 encryption_key_conn_id: str | None = None, s3_sse: str | None = None,
                 s3_sse_kms_key_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.repository = repository
        self.aws_conn_id = aws_conn_id
        self.encryption_key_conn_id = encryption_key_conn_id or None
        self.s3_sse = s3_sse or None
        self.s3_sse_kms_key_id = s3_sse_kms_key_id or None

    def get_keyring(self):
        """The repository key(s) of `encryption_key_conn_id` (None without one). The key texts are
        registered with Airflow's secrets masker: they never reach a log in clear."""
        if not self.encryption_key_conn_id:
            return None
        from airflow.sdk.log import mask_secret

        from airflow_pg_incremental.core.errors import ConfigError
        from airflow_pg_incremental.core.repository.crypt import Keyring

        cid = self.encryption_key_conn_id
        conn = self.get_connection(cid)
        old = (conn.extra_dejson or {}).get("old_keys") or []
        if isinstance(old, str):
            old = old.split(",")
        for text in [conn.password, *old]:
            if text:
                mask_secret(text)
        if not conn.password:
            raise ConfigError(f"the connection {cid!r} (encryption_key_conn_id) holds no key: put the repository key "
                              "(base64 or hex of 32 random bytes, `pgincr repo-key-new`) in its password")
        return Keyring.from_texts(conn.password, old, what=f"the password of connection {cid!r}",
                                  old_what=f"an old_keys entry of connection {cid!r}")

    def get_repository(self, must_exist: bool = True) -> Repository:
        """The repository; with `must_exist` (the default) its identity marker is checked: a
        location holding no pgincr repository is an error naming the fix, never an empty one."""
        if self.repository.startswith("s3://"):
            from airflow.providers.amazon.aws.hooks.s3 import (
                S3Hook,  # lazy: only S3 users pay for it
            )

            client = S3Hook(aws_conn_id=self.aws_conn_id).get_conn()
            repo: Repository = open_repository(self.repository, s3_client=client, origin="airflow",
                                               keyring=self.get_keyring(), s3_sse=self.s3_sse,
                                               s3_sse_kms_key_id=self.s3_sse_kms_key_id)
        else:
            repo = open_repository(self.repository, keyring=self.get_keyring(), s3_sse=self.s3_sse,
                                   s3_sse_kms_key_id=self.s3_sse_kms_key_id)
            assert isinstance(repo, LocalRepository)
        if must_exist:
            repo.identity()
        return repo

    def get_conn(self) -> Repository:
        return self.get_repository()
