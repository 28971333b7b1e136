"""Validation of every user-supplied name that becomes part of a path or an object key."""

from __future__ import annotations

import re

from .errors import InvalidName

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
MAX_NAME_LEN = 63


def _check(kind: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidName(f"{kind} must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidName(f"{kind} must not be empty")
    if len(value) > MAX_NAME_LEN:
        raise InvalidName(f"{kind} {value[:20]!r}... is {len(value)} characters; at most {MAX_NAME_LEN} are allowed")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidName(f"{kind} {value!r} contains control characters")
    if "/" in value or "\\" in value:
        raise InvalidName(f"{kind} {value!r} contains a path separator; use letters, digits, '.', '_' and '-'")
    if ".." in value:
        raise InvalidName(f"{kind} {value!r} contains '..'; use letters, digits, '.', '_' and '-'")
    if not _NAME_RE.match(value):
        raise InvalidName(
            f"{kind} {value!r} is not allowed: it must start with a letter or digit and contain only "
            "letters, digits, '.', '_' and '-'"
        )
    return value


def validate_cluster(name: object) -> str:
    return _check("cluster name", name)


def validate_backup_id(backup_id: object) -> str:
    return _check("backup id", backup_id)


def validate_prefix(prefix: str) -> str:
    """A repository prefix: '/'-separated parts, each a valid name (or empty prefix)."""
    prefix = (prefix or "").strip("/")
    if not prefix:
        return ""
    for part in prefix.split("/"):
        _check("repository prefix part", part)
    return prefix
