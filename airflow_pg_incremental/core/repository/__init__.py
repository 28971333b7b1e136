"""The backup repository: one interface, two drivers (local directory, S3).

Keys are relative, '/'-separated, and validated so nothing can escape the repository root/prefix.
Writes are atomic: an object becomes visible only once complete (local: temp file + fsync +
rename; S3: single PUT or completed multipart upload). Reads and writes stream in bounded chunks.

The interface and the repository's identity are in `base`, the drivers in `local` and `s3`;
`open_repository` picks the driver for a URL.
"""

from __future__ import annotations

import os
import re

from ..errors import ConfigError
from .base import (CREATE_HINT, MARKER_KEY, MARKER_KIND, REPOSITORY_FORMAT, Repository,  # noqa: F401
                   validate_key)
from .local import LocalRepository
from .s3 import S3Repository, s3_client_from_env

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def open_repository(url: str, *, s3_client=None, origin: str | None = None, keyring=None,
                    s3_sse: str | None = None, s3_sse_kms_key_id: str | None = None) -> Repository:
    """'/path', 'file:///path' or 's3://bucket/prefix'. Opening touches nothing; call
    `identity()` (or `check_writable()`) to make sure a repository is there. `keyring`
    (crypt.Keyring): the key(s) of an encrypted repository; identity() checks it against the marker
    (an encrypted repository without it, or an unencrypted one with it, is refused). `s3_sse`,
    `s3_sse_kms_key_id`: S3 server-side encryption of what is written (S3 repositories only)."""
    repo = _open_driver(url, s3_client=s3_client, origin=origin, sse=s3_sse, sse_kms_key_id=s3_sse_kms_key_id)
    return repo.use_keyring(keyring)


def env_options(environ=None) -> dict:
    """open_repository's options from the environment (CLI, archive_command/restore_command and
    their --env-file): PGINCR_REPO_KEY (+ PGINCR_REPO_OLD_KEYS), PGINCR_S3_SSE,
    PGINCR_S3_SSE_KMS_KEY_ID."""
    from .crypt import keyring_from_env

    env = os.environ if environ is None else environ
    return {"keyring": keyring_from_env(env), "s3_sse": env.get("PGINCR_S3_SSE") or None,
            "s3_sse_kms_key_id": env.get("PGINCR_S3_SSE_KMS_KEY_ID") or None}


def _open_driver(url: str, *, s3_client=None, origin: str | None = None, sse: str | None = None,
                 sse_kms_key_id: str | None = None) -> Repository:
    if not url:
        raise ConfigError("no repository given: pass a local directory or s3://bucket/prefix")
    if url.startswith("s3://"):
        if not url[5:].partition("/")[0]:
            raise ConfigError(f"repository URL {url!r} names no bucket: write s3://bucket/prefix")
        rest = url[5:]
        bucket, _, prefix = rest.partition("/")
        repo = S3Repository(s3_client or s3_client_from_env(), bucket, prefix, sse=sse, sse_kms_key_id=sse_kms_key_id)
        repo.origin = origin
        return repo
    m = _SCHEME_RE.match(url)
    if m and m.group(1).lower() in ("s3", "s3a", "s3n") and not url.startswith("s3://"):
        raise ConfigError(f"malformed S3 repository URL {url!r}: write s3://bucket/prefix")
    if url.startswith("file://"):
        url = url[7:]
    elif m and len(m.group(1)) > 1:  # (a one-letter 'scheme' would be a Windows drive)
        raise ConfigError(f"unsupported repository URL {url!r}: use an absolute local directory, file:///path or "
                          "s3://bucket/prefix")
    if not os.path.isabs(url):
        raise ConfigError(f"local repository path {url!r} must be absolute")
    if sse or sse_kms_key_id:
        raise ConfigError(f"S3 server-side encryption (s3_sse) was asked for the local repository {url}: it applies "
                          "to s3:// repositories only; remove it (client-side encryption, PGINCR_REPO_KEY / "
                          "encryption_key_conn_id, serves both kinds)")
    return LocalRepository(url)
