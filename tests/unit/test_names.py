import pytest

from airflow_pg_incremental.core.errors import InvalidName, PgIncrError
from airflow_pg_incremental.core.names import (MAX_NAME_LEN, validate_backup_id, validate_cluster,
                                               validate_prefix)


@pytest.mark.parametrize("name", ["main", "a", "0", "prod-db_1.eu", "A.b-C_d", "x" * MAX_NAME_LEN,
                                  "20261121T124048Z-F", "20261121T124048Z.2-I", "trailing.", "trailing-"])
def test_valid_names_accepted(name):
    assert validate_cluster(name) == name
    assert validate_backup_id(name) == name


@pytest.mark.parametrize("name", [
    "", "a/b", "/abs", "a/", "..", "a..b", "../x", "a\\b", "\\", "a\nb", "a\tb", "\x00", "x\x7f", "\x1b[31m",
    "x" * 64, "x" * 200, ".hidden", "-rf", ".", "_a", "a b", "a:b", "a*b", "ü", "a;b",
])
def test_bad_names_rejected(name):
    with pytest.raises(InvalidName):
        validate_cluster(name)
    with pytest.raises(InvalidName):
        validate_backup_id(name)


def test_max_length_boundary():
    assert MAX_NAME_LEN == 63
    validate_cluster("a" * 63)
    with pytest.raises(InvalidName, match="64 characters"):
        validate_cluster("a" * 64)


@pytest.mark.parametrize("value", [None, 5, b"main", ["main"]])
def test_non_string_rejected(value):
    with pytest.raises(InvalidName, match="must be a string"):
        validate_cluster(value)


def test_invalid_name_is_a_value_error_and_pgincr_error():
    with pytest.raises(ValueError):
        validate_cluster("a/b")
    with pytest.raises(PgIncrError):
        validate_backup_id("..")


def test_messages_explain_problem():
    with pytest.raises(InvalidName, match="path separator"):
        validate_cluster("a/b")
    with pytest.raises(InvalidName, match=r"'\.\.'"):
        validate_cluster("a..b")
    with pytest.raises(InvalidName, match="control characters"):
        validate_cluster("a\x01")
    with pytest.raises(InvalidName, match="must not be empty"):
        validate_cluster("")
    with pytest.raises(InvalidName, match="start with a letter or digit"):
        validate_cluster(".x")


@pytest.mark.parametrize("prefix,expected", [
    ("", ""), (None, ""), ("/", ""), ("///", ""), ("prod", "prod"), ("/prod/", "prod"),
    ("a/b/c", "a/b/c"), ("/team-1/pg.backups/", "team-1/pg.backups"),
])
def test_validate_prefix_ok(prefix, expected):
    assert validate_prefix(prefix) == expected


@pytest.mark.parametrize("prefix", ["a//b", "a/../b", "..", "../x", "a/./b", "a/.b", "a\\b", "a b", "a/-x",
                                    "a/" + "x" * 64, "a/\x00"])
def test_validate_prefix_rejects(prefix):
    with pytest.raises(InvalidName):
        validate_prefix(prefix)
