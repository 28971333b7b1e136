import pytest

from airflow_pg_incremental.core.errors import ServerError
from airflow_pg_incremental.core.pgconn import ConnInfo, classify_connect_error

PW = "S3cr3t-Pw-4711"


@pytest.fixture
def conn():
    return ConnInfo(host="db.example", port=5433, user="backup", password=PW, dbname="postgres",
                    extra={"sslmode": "require", "application_name": "x", "connect_timeout": 5})


def test_no_password_in_repr_describe_safe_dict(conn):
    assert PW not in repr(conn)
    assert PW not in str(conn)
    assert conn.describe() == "backup@db.example:5433/postgres"
    assert PW not in conn.describe()
    assert conn.safe_dict() == {"host": "db.example", "port": 5433, "user": "backup", "dbname": "postgres"}
    assert PW not in repr(conn.safe_dict())
    assert PW not in repr(conn.with_db("other"))


def test_describe_defaults():
    assert ConnInfo().describe() == "(default user)@(local socket):5432/"


def test_env_contains_password_and_settings(conn):
    env = conn.env()
    assert env["PGPASSWORD"] == PW
    assert env["PGHOST"] == "db.example" and env["PGPORT"] == "5433"
    assert env["PGUSER"] == "backup" and env["PGDATABASE"] == "postgres"
    assert env["PGSSLMODE"] == "require" and env["PGAPPNAME"] == "x"
    assert env["PGCONNECT_TIMEOUT"] == "5"
    assert all(isinstance(v, str) for v in env.values())


def test_env_without_password():
    env = ConnInfo(host="h").env()
    assert "PGPASSWORD" not in env and "PGUSER" not in env and "PGPORT" not in env
    assert env["PGCONNECT_TIMEOUT"] == "10"


def test_psycopg_kwargs(conn):
    kw = conn.psycopg_kwargs()
    assert kw["password"] == PW and kw["host"] == "db.example" and kw["port"] == 5433
    assert kw["connect_timeout"] == 5 and kw["sslmode"] == "require"
    assert "extra" not in kw
    assert "password" not in ConnInfo(host="h").psycopg_kwargs()


def test_with_db_keeps_the_rest(conn):
    other = conn.with_db("catalog")
    assert other.dbname == "catalog" and other.password == PW and other.host == conn.host
    assert conn.dbname == "postgres"


def test_redact(conn):
    assert conn.redact(f"bad password {PW} for {PW}!") == "bad password ******** for ********!"
    assert conn.redact("") == ""
    assert ConnInfo(password=None).redact("text") == "text"
    assert ConnInfo(password="").redact("text") == "text"


@pytest.mark.parametrize("message,expected", [
    (f'connection to server at "db.example" (10.0.0.1), port 5433 failed: FATAL:  password authentication failed '
     f'for user "backup" (tried {PW})', "fix the password"),
    ("fe_sendauth: no password supplied", "fix the password"),
    (f'connection to server at "db.example" (10.0.0.1), port 5433 failed: Connection refused\n\tIs the server '
     f'running on that host and accepting TCP/IP connections? password={PW}', "check that the server runs"),
    ('could not translate host name "db.example" to address: Name or service not known', "check that the server"),
    ("connection to server at \"db.example\", port 5433 failed: timeout expired", "check that the server runs"),
    (f'FATAL:  no pg_hba.conf entry for replication connection from host "10.0.0.9", user "backup", '
     f'no encryption {PW}', "host replication"),
    ('FATAL:  no pg_hba.conf entry for host "10.0.0.9", user "backup", database "postgres", no encryption',
     "add an entry"),
    (f"FATAL:  must have REPLICATION attribute to start a walsender ({PW})", "ALTER ROLE backup REPLICATION"),
    ("FATAL:  permission denied to start WAL sender\nDETAIL:  Only roles with the REPLICATION attribute may "
     "start a WAL sender process.", "ALTER ROLE backup REPLICATION"),
    ("FATAL:  must be superuser or replication role to start walsender", "ALTER ROLE backup REPLICATION"),
    ('FATAL:  database "nope" does not exist', "fix the database name"),
    ('FATAL:  role "nobody" does not exist', "fix the user"),
    (f"something unexpected {PW}", "PostgreSQL at backup@db.example:5433/postgres"),
])
def test_classify_connect_error(conn, message, expected):
    err = classify_connect_error(conn, message)
    assert isinstance(err, ServerError)
    text = str(err)
    assert expected in text
    assert PW not in text
    assert "backup@db.example:5433" in text


def test_classify_auth_is_not_reported_as_unreachable(conn):
    text = str(classify_connect_error(conn, 'FATAL:  password authentication failed for user "backup"'))
    assert "authentication failed" in text and "cannot reach" not in text


def test_classify_replication_hba_is_specific(conn):
    text = str(classify_connect_error(conn, 'FATAL:  no pg_hba.conf entry for replication connection from host '
                                            '"1.2.3.4", user "backup", no encryption'))
    assert "'replication' entry" in text and "reload" in text


def test_replication_fix_without_user():
    text = str(classify_connect_error(ConnInfo(host="h"), "FATAL:  must have REPLICATION attribute"))
    assert "None" not in text


def test_classification_survives_password_in_keywords():
    c = ConnInfo(host="h", user="bob", password="password")
    text = str(classify_connect_error(c, 'FATAL:  password authentication failed for user "bob"'))
    assert "fix the password" in text


@pytest.mark.parametrize("origin, fix", [("cli", "PGPASSWORD"), ("airflow", "Airflow connection")])
def test_fix_is_named_in_the_users_language(origin, fix):
    c = ConnInfo(host="h", user="bob", password="pw", origin=origin)
    auth = str(classify_connect_error(c, 'FATAL:  password authentication failed for user "bob"'))
    assert fix in auth
    unreachable = str(classify_connect_error(c, "connection refused"))
    assert ("--host" in unreachable) == (origin == "cli") and ("Airflow" in unreachable) == (origin == "airflow")
