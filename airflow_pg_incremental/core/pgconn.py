"""Connection parameters for a PostgreSQL server, and running SQL on it.

The password never appears in argv, reprs, logs or returned dicts: libpq programs get it through
the PGPASSWORD environment variable of the child process only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ServerError

log = logging.getLogger(__name__)

_LIBPQ_EXTRA = ("sslmode", "sslrootcert", "sslcert", "sslkey", "connect_timeout", "application_name",
                "target_session_attrs", "options")


@dataclass(frozen=True)
class ConnInfo:
    host: str | None = None
    port: int | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    dbname: str | None = None
    extra: dict = field(default_factory=dict)
    # who the user configured it through: "cli" (flags, PG* variables, ~/.pgpass) or "airflow" (a
    # connection); error messages name the fix in that language
    origin: str | None = field(default=None, compare=False)

    def with_db(self, dbname: str) -> "ConnInfo":
        return replace(self, dbname=dbname)

    def describe(self) -> str:
        """Human description without secrets: user@host:port/db."""
        return f"{self.user or '(default user)'}@{self.host or '(local socket)'}:{self.port or 5432}/{self.dbname or ''}"

    def safe_dict(self) -> dict:
        return {"host": self.host, "port": self.port, "user": self.user, "dbname": self.dbname}

    def env(self) -> dict[str, str]:
        """Environment for libpq programs (pg_basebackup, psql ...)."""
        e = {"PGCONNECT_TIMEOUT": str(self.extra.get("connect_timeout", 10))}
        if self.host:
            e["PGHOST"] = self.host
        if self.port:
            e["PGPORT"] = str(self.port)
        if self.user:
            e["PGUSER"] = self.user
        if self.password:
            e["PGPASSWORD"] = self.password
        if self.dbname:
            e["PGDATABASE"] = self.dbname
        mapping = {"sslmode": "PGSSLMODE", "sslrootcert": "PGSSLROOTCERT", "sslcert": "PGSSLCERT",
                   "sslkey": "PGSSLKEY", "application_name": "PGAPPNAME", "options": "PGOPTIONS",
                   "target_session_attrs": "PGTARGETSESSIONATTRS"}
        for k, v in self.extra.items():
            if k in mapping and v is not None:
                e[mapping[k]] = str(v)
        return e

    def psycopg_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"connect_timeout": int(self.extra.get("connect_timeout", 10)),
                              "application_name": "pgincr"}
        for k in ("host", "port", "user", "password", "dbname"):
            v = getattr(self, k)
            if v is not None:
                kw[k] = v
        for k in _LIBPQ_EXTRA:
            if k in self.extra and k not in ("connect_timeout",):
                kw[k] = self.extra[k]
        return kw

    def redact(self, text: str) -> str:
        if self.password and text:
            return text.replace(self.password, "********")
        return text


_FIXES = {
    "password": {"cli": "set PGPASSWORD, or add a line for this host to ~/.pgpass (mode 0600)",
                 "airflow": "fix the password of the Airflow connection",
                 None: "fix the password (the Airflow connection's, or PGPASSWORD / ~/.pgpass for the CLI)"},
    "dbname": {"cli": "fix --dbname (or PGDATABASE)", "airflow": "fix the database (schema) of the Airflow connection",
               None: "fix the database name"},
    "user": {"cli": "fix --user (or PGUSER)", "airflow": "fix the login of the Airflow connection",
             None: "fix the user name"},
    "address": {"cli": "check that the server runs and that --host/--port (PGHOST/PGPORT) are right",
                "airflow": "check that the server runs and that host/port of the Airflow connection are right",
                None: "check that the server runs and that host and port are right"},
}


def fix_for(conn: ConnInfo, what: str) -> str:
    return _FIXES[what].get(conn.origin, _FIXES[what][None])


def classify_connect_error(conn: ConnInfo, message: str) -> ServerError:
    msg = conn.redact(message.strip())  # what we show
    where = conn.describe()
    low = message.lower()  # what we classify (a password may contain words like 'password')
    if "password authentication failed" in low or "no password supplied" in low:
        return ServerError(f"authentication failed for {where}: wrong or missing password; {fix_for(conn, 'password')} "
                           f"({msg.splitlines()[-1] if msg else ''})")
    if "no pg_hba.conf entry for replication" in low:
        return ServerError(f"{where}: the server's pg_hba.conf has no 'replication' entry for this user/host; add "
                           "one (host replication <user> <address> scram-sha-256) and reload")
    if "must have replication" in low or "permission denied to start wal sender" in low or \
            "must be superuser or replication role" in low or "replication permission" in low:
        role = conn.user or "<the connecting role>"
        return ServerError(f"{where}: role {role} lacks the REPLICATION attribute; run "
                           f"ALTER ROLE {role} REPLICATION; ({msg})")
    if "no pg_hba.conf entry" in low:
        return ServerError(f"{where}: rejected by pg_hba.conf; add an entry for this user/host ({msg})")
    if "does not exist" in low and "database" in low:
        return ServerError(f"{where}: {msg}; {fix_for(conn, 'dbname')}")
    if "does not exist" in low and "role" in low:
        return ServerError(f"{where}: {msg}; {fix_for(conn, 'user')}")
    if any(s in low for s in ("connection refused", "could not connect", "timeout expired", "could not translate",
                              "no route to host", "connection timed out", "is the server running",
                              "name or service not known", "network is unreachable")):
        return ServerError(f"cannot reach PostgreSQL at {where}: {msg.splitlines()[0] if msg else ''}; "
                           f"{fix_for(conn, 'address')}")
    return ServerError(f"PostgreSQL at {where}: {msg}")


def connect(conn: ConnInfo, *, autocommit: bool = True):
    import psycopg

    try:
        return psycopg.connect(autocommit=autocommit, **conn.psycopg_kwargs())
    except psycopg.OperationalError as e:
        raise classify_connect_error(conn, str(e)) from None


def query(conn: ConnInfo, sql: str, params: tuple | dict | None = None) -> list[tuple]:
    with connect(conn) as c, c.cursor() as cur:
        cur.execute(sql, params)
        return cur.fetchall() if cur.description else []


def query_one(conn: ConnInfo, sql: str, params: tuple | dict | None = None):
    rows = query(conn, sql, params)
    return rows[0] if rows else None
