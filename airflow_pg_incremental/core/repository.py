"""The backup repository: one interface, two drivers (local directory, S3).

Keys are relative, '/'-separated, and validated so nothing can escape the repository root/prefix.
Writes are atomic: an object becomes visible only once complete (local: temp file + fsync +
rename; S3: single PUT or completed multipart upload). Reads and writes stream in bounded chunks.
"""

from __future__ import annotations

import datetime
import errno
import io
import logging
import os
import re
import uuid
from abc import ABC, abstractmethod
from pathlib import Path
from typing import BinaryIO, Iterator

from .codec import CHUNK, NonClosing
from .errors import ConfigError, ObjectExists, ObjectNotFound, RepositoryError
from .names import validate_prefix

log = logging.getLogger(__name__)

_KEY_PART_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def validate_key(key: str) -> str:
    if not isinstance(key, str) or not key or key.startswith("/") or "\\" in key:
        raise ConfigError(f"invalid object key {key!r}")
    for part in key.split("/"):
        if part in ("", ".", "..") or not _KEY_PART_RE.match(part):
            raise ConfigError(f"invalid object key {key!r}: part {part!r} not allowed")
    return key


class Repository(ABC):
    """Abstract repository. `url` never contains credentials."""

    url: str

    @abstractmethod
    def put(self, key: str, src: BinaryIO, *, overwrite: bool = True) -> int:
        """Store everything `src.read()` yields under `key`; return the number of bytes stored.
        With overwrite=False an existing object raises ObjectExists (and is left unchanged)."""

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """A readable stream of the object's stored bytes; raises ObjectNotFound."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int: ...

    @abstractmethod
    def modified(self, key: str) -> "datetime.datetime":
        """When the object was written (timezone-aware UTC)."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """All keys below `prefix` (recursively), sorted."""

    @abstractmethod
    def list_dirs(self, prefix: str) -> list[str]:
        """Names of the immediate 'sub-directories' of `prefix`, sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete one object; deleting a missing object is not an error."""

    @abstractmethod
    def check_writable(self) -> None:
        """Raise RepositoryError with the fix when the repository cannot be written."""

    # conveniences -----------------------------------------------------------------------
    def put_bytes(self, key: str, data: bytes, *, overwrite: bool = True) -> int:
        return self.put(key, io.BytesIO(data), overwrite=overwrite)

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as f:
            return f.read()

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for k in keys:
            self.delete(k)
        return len(keys)


# --------------------------------------------------------------------------------------------
class LocalRepository(Repository):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).absolute()
        self.url = f"file://{self.root}"

    def _path(self, key: str) -> Path:
        p = self.root / validate_key(key)
        # defence in depth: the resolved path (symlinks followed) must stay below the resolved root
        real_root = os.path.realpath(self.root)
        if os.path.commonpath([os.path.realpath(p), real_root]) != real_root:
            raise ConfigError(f"object key {key!r} escapes the repository (through a symbolic link?)")
        return p

    def _wrap_oserror(self, e: OSError, what: str) -> RepositoryError:
        if e.errno == errno.ENOSPC:
            return RepositoryError(f"repository disk full while {what} ({self.root}): free space or move the "
                                   "repository; the partial object was removed")
        if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            access = "readable" if what.startswith(("reading", "listing", "checking")) else "writable"
            return RepositoryError(f"repository {self.root} is not {access} ({e.strerror}) while {what}: fix its "
                                   "permissions or choose another directory")
        return RepositoryError(f"repository {self.root}: {e.strerror or e} while {what}")

    def _owner(self):
        """(uid, gid) to give what we create when we are root and the repository root belongs to
        another user (e.g. the database's OS user running archive_command): one owner for all."""
        if os.geteuid() != 0:
            return None
        try:
            st = os.stat(self.root)
        except OSError:
            return None
        return None if st.st_uid == 0 else (st.st_uid, st.st_gid)

    def _mkdirs(self, d: Path) -> None:
        missing = []
        p = d
        while not p.exists() and p != self.root and self.root in p.parents:
            missing.append(p)
            p = p.parent
        d.mkdir(parents=True, exist_ok=True)
        owner = self._owner()
        if owner:
            for m in missing:
                try:
                    os.chown(m, *owner)
                except OSError:
                    pass

    def put(self, key: str, src: BinaryIO, *, overwrite: bool = True) -> int:
        path = self._path(key)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
        written = 0
        try:
            self._mkdirs(path.parent)
            with open(tmp, "xb") as out:
                while True:
                    try:
                        chunk = src.read(CHUNK)
                    except OSError as e:  # the source failed, not the repository
                        raise _SourceError(e) from e
                    if not chunk:
                        break
                    out.write(chunk)
                    written += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            owner = self._owner()
            if owner:
                os.chown(tmp, *owner)
            if overwrite:
                os.replace(tmp, path)
            else:
                try:
                    os.link(tmp, path)  # atomic create-if-absent
                except FileExistsError:
                    raise ObjectExists(f"object {key} exists already in {self.url}") from None
                finally:
                    tmp.unlink(missing_ok=True)
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except _SourceError as e:
            raise e.args[0]
        except OSError as e:
            raise self._wrap_oserror(e, f"writing {key}") from e
        finally:
            if tmp.exists():
                tmp.unlink(missing_ok=True)
        return written

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} not found in {self.url}") from None
        except OSError as e:
            raise self._wrap_oserror(e, f"reading {key}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} not found in {self.url}") from None

    def modified(self, key: str) -> datetime.datetime:
        try:
            ts = self._path(key).stat().st_mtime
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} not found in {self.url}") from None
        return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                if f.startswith(".") and ".tmp-" in f:
                    continue  # in-flight temp files are not objects
                out.append(os.path.relpath(os.path.join(dirpath, f), self.root).replace(os.sep, "/"))
        return sorted(out)

    def list_dirs(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as e:
            raise self._wrap_oserror(e, f"deleting {key}") from e
        # prune empty parent directories up to the root
        parent = path.parent
        while parent != self.root:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    def check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".pgincr-write-test-{uuid.uuid4().hex[:8]}"
            with open(probe, "wb") as f:
                f.write(b"ok")
                f.flush()
                os.fsync(f.fileno())
            probe.unlink()
        except OSError as e:
            raise self._wrap_oserror(e, "checking that it is writable") from e


# --------------------------------------------------------------------------------------------
class S3Repository(Repository):
    """S3 or any S3-compatible store. `client` is a boto3 S3 client (e.g. from Airflow's S3Hook)."""

    MULTIPART_CHUNK = 16 * 1024 * 1024

    def __init__(self, client, bucket: str, prefix: str = ""):
        if not bucket or "/" in bucket:
            raise ConfigError(f"invalid bucket name {bucket!r}")
        self.client = client
        self.bucket = bucket
        self.prefix = validate_prefix(prefix)
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def _key(self, key: str) -> str:
        key = validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1:] if self.prefix else full

    def _err(self, e: Exception, what: str) -> RepositoryError:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchBucket",) or (code == "404" and "bucket" in what):
                return RepositoryError(f"bucket {self.bucket!r} does not exist ({what}): create it or fix the "
                                       "repository URL")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return RepositoryError(f"access denied to s3://{self.bucket} ({what}, {code}): check the AWS "
                                       "connection's credentials and the bucket policy")
            return RepositoryError(f"S3 error {code} while {what} in {self.url}: {e}")
        if isinstance(e, EndpointConnectionError):
            return RepositoryError(f"S3 endpoint unreachable while {what}: {e}; check endpoint_url and the network")
        if isinstance(e, NoCredentialsError):
            return RepositoryError(f"no AWS credentials found while {what}: configure the AWS connection")
        return RepositoryError(f"S3 failure while {what} in {self.url}: {e}")

    def put(self, key: str, src: BinaryIO, *, overwrite: bool = True) -> int:
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(key)
        if not overwrite and self.exists(key):
            raise ObjectExists(f"object {key} exists already in {self.url}")
        counter = _CountingReader(src)
        cfg = TransferConfig(multipart_threshold=self.MULTIPART_CHUNK, multipart_chunksize=self.MULTIPART_CHUNK,
                             max_concurrency=4, use_threads=True)
        try:
            self.client.upload_fileobj(NonClosing(counter), self.bucket, full, Config=cfg)
        except (ClientError, BotoCoreError) as e:
            raise self._err(e, f"writing {key}") from e
        except Exception as e:  # S3 transfer wraps some errors
            inner = e.__cause__ or e.__context__
            if isinstance(inner, (ClientError, BotoCoreError)):
                raise self._err(inner, f"writing {key}") from e
            raise
        return counter.size

    def open(self, key: str) -> BinaryIO:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            resp = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ObjectNotFound(f"object {key} not found in {self.url}") from None
            raise self._err(e, f"reading {key}") from e
        except BotoCoreError as e:
            raise self._err(e, f"reading {key}") from e
        return _StreamingBody(resp["Body"])

    def _head(self, key: str):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._err(e, f"checking {key}") from e
        except BotoCoreError as e:
            raise self._err(e, f"checking {key}") from e

    def exists(self, key: str) -> bool:
        return self._head(key) is not None

    def size(self, key: str) -> int:
        h = self._head(key)
        if h is None:
            raise ObjectNotFound(f"object {key} not found in {self.url}")
        return int(h["ContentLength"])

    def modified(self, key: str) -> datetime.datetime:
        h = self._head(key)
        if h is None:
            raise ObjectNotFound(f"object {key} not found in {self.url}")
        lm = h["LastModified"]
        return lm if lm.tzinfo else lm.replace(tzinfo=datetime.timezone.utc)

    def put_bytes(self, key: str, data: bytes, *, overwrite: bool = True) -> int:
        """Small objects: one PUT request (no transfer threads); overwrite=False is a conditional
        write (If-None-Match: *), atomic on stores that support it, checked by HEAD before as well."""
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(key)
        if not overwrite and self.exists(key):
            raise ObjectExists(f"object {key} exists already in {self.url}")
        kwargs = {"Bucket": self.bucket, "Key": full, "Body": data}
        if not overwrite:
            kwargs["IfNoneMatch"] = "*"
        try:
            self.client.put_object(**kwargs)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise ObjectExists(f"object {key} exists already in {self.url}") from None
            raise self._err(e, f"writing {key}") from e
        except BotoCoreError as e:
            raise self._err(e, f"writing {key}") from e
        return len(data)

    def _paginate(self, prefix: str, delimiter: str | None) -> Iterator[dict]:
        from botocore.exceptions import BotoCoreError, ClientError

        p = prefix.strip("/")
        full = (self._key(p) + "/") if p else (self.prefix + "/" if self.prefix else "")
        kwargs = {"Bucket": self.bucket, "Prefix": full}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**kwargs):
                yield page
        except (ClientError, BotoCoreError) as e:
            raise self._err(e, f"listing {prefix or '/'} (bucket)") from e

    def list(self, prefix: str) -> list[str]:
        out = []
        for page in self._paginate(prefix, None):
            out += [self._rel(o["Key"]) for o in page.get("Contents", [])]
        return sorted(out)

    def list_dirs(self, prefix: str) -> list[str]:
        out = []
        for page in self._paginate(prefix, "/"):
            out += [cp["Prefix"].rstrip("/").rsplit("/", 1)[-1] for cp in page.get("CommonPrefixes", [])]
        return sorted(out)

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as e:
            raise self._err(e, f"deleting {key}") from e

    def check_writable(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                raise RepositoryError(f"bucket {self.bucket!r} does not exist: create it or fix the repository "
                                      "URL") from None
            raise self._err(e, "checking the bucket") from e
        except BotoCoreError as e:
            raise self._err(e, "checking the bucket") from e
        probe = f".pgincr-write-test-{uuid.uuid4().hex[:8]}"
        self.put_bytes(probe, b"ok")
        self.delete(probe)


class _SourceError(Exception):
    """Carries an OSError raised by the data source through the repository's own error handling."""


class _CountingReader(io.RawIOBase):
    def __init__(self, src):
        self._src = src
        self.size = 0

    def readable(self):
        return True

    def read(self, n=-1):
        data = self._src.read(n)
        self.size += len(data)
        return data

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class _StreamingBody(io.RawIOBase):
    def __init__(self, body):
        self._body = body

    def readable(self):
        return True

    def read(self, n=-1):
        return self._body.read(None if n is None or n < 0 else n)

    def readinto(self, b):
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self):
        try:
            self._body.close()
        finally:
            super().close()


# --------------------------------------------------------------------------------------------
def s3_client_from_env(endpoint_url: str | None = None):
    """A boto3 S3 client from the standard AWS environment (for the CLI; Airflow uses S3Hook)."""
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get("PGINCR_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") \
        or os.environ.get("AWS_ENDPOINT_URL")
    attempts = int(os.environ.get("PGINCR_S3_MAX_ATTEMPTS", "4"))
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url,
        config=Config(retries={"max_attempts": attempts, "mode": "standard"}, s3={"addressing_style": "path"},
                      connect_timeout=5, read_timeout=60),
    )


def open_repository(url: str, *, s3_client=None) -> Repository:
    """'/path', 'file:///path' or 's3://bucket/prefix'."""
    if not url:
        raise ConfigError("no repository given: pass a local directory or s3://bucket/prefix")
    if url.startswith("s3://"):
        rest = url[5:]
        bucket, _, prefix = rest.partition("/")
        return S3Repository(s3_client or s3_client_from_env(), bucket, prefix)
    if url.startswith("file://"):
        url = url[7:]
    if "://" in url:
        raise ConfigError(f"unsupported repository URL {url!r}: use a local directory or s3://bucket/prefix")
    if not os.path.isabs(url):
        raise ConfigError(f"local repository path {url!r} must be absolute")
    return LocalRepository(url)
