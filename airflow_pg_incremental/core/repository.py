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
from .errors import (
    ConfigError,
    ObjectExists,
    ObjectNotFound,
    RepositoryError,
    RepositoryNotFound,
)
from .names import validate_prefix

log = logging.getLogger(__name__)

_KEY_PART_RE = re.compile(r"^[A-Za-z0-9._-]+$")

# A repository has an identity: this object, written once when the repository is created (an
# explicit act: `pgincr repo-create`, or `create_repository: true` in the DAG configuration). A
# location without it is never read as an empty repository.
MARKER_KEY = "pgincr-repository.json"
MARKER_KIND = "pgincr-repository"
REPOSITORY_FORMAT = 1
_LAYOUT_DIRS = {"backups", "wal", "restore_points"}
CREATE_HINT = ("create it once with `pgincr repo-create --repo {url}` (CLI) or set `create_repository: true` for "
               "the cluster in the DAG configuration (Airflow)")


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
    _identity: dict | None = None

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

    @abstractmethod
    def abandoned_writes(self, prefix: str, older_than_s: float) -> list[dict]:
        """Writes below `prefix` that never completed and were last touched more than
        `older_than_s` ago: local temp files, S3 multipart uploads. Each: {"key", "kind", "age_s",
        "bytes", "id"}. Invisible to list(); `discard_write` removes one."""

    @abstractmethod
    def discard_write(self, item: dict) -> None:
        """Remove one abandoned write (delete the temp file / abort the multipart upload)."""

    @abstractmethod
    def _top_level(self) -> tuple[list[str], list[str]]:
        """(directory names, object names) directly at the repository's root; ([], []) when the
        location does not exist."""

    def _ancestor_repository(self) -> str | None:
        """URL of an enclosing repository (the given location lies inside one), or None."""
        return None

    def _location_note(self) -> str:
        return ""

    # identity ---------------------------------------------------------------------------
    def identity(self) -> dict:
        """The repository's marker (format, id, creation time). RepositoryNotFound, naming the
        likely mistake and the fix, when the location holds no pgincr repository. Read once."""
        if self._identity is None:
            try:
                raw = self.get_bytes(MARKER_KEY)
            except ObjectNotFound:
                raise self._not_a_repository() from None
            self._identity = _parse_marker(raw, self.url)
        return self._identity

    def is_repository(self) -> bool:
        try:
            self.identity()
            return True
        except RepositoryNotFound:
            return False

    def _legacy_clusters(self, dirs: list[str]) -> list[str]:
        """Top-level directories laid out like clusters of a repository made before markers."""
        from .names import validate_cluster

        out = []
        for d in dirs:
            try:
                validate_cluster(d)
            except ConfigError:
                continue
            sub = set(self.list_dirs(d))
            if sub and sub <= _LAYOUT_DIRS:
                out.append(d)
        return out

    def _not_a_repository(self) -> RepositoryNotFound:
        url = self.url
        parent = self._ancestor_repository()
        if parent:
            inner = url[len(parent):].strip("/").split("/")[0]
            return RepositoryNotFound(f"{url} is not a pgincr repository, but it lies inside the repository {parent}: "
                                      f"did you mean --repo {parent} --cluster {inner}? (nothing was read or written)")
        note = self._location_note()
        if note:
            return RepositoryNotFound(f"no pgincr repository at {url}: {note}. Check the repository URL "
                                      f"(--repo / PGINCR_REPO / the cluster's `repository`); to start a new one, "
                                      + CREATE_HINT.format(url=url))
        dirs, files = self._top_level()
        legacy = self._legacy_clusters(dirs)
        if legacy:
            return RepositoryNotFound(
                f"{url} holds cluster(s) {', '.join(legacy)} written before repositories carried an identity marker "
                f"({MARKER_KEY}): adopt it once with `pgincr repo-create --repo {url}` (nothing else changes)")
        what = "is empty" if not dirs and not files else f"holds other things ({', '.join((dirs + files)[:5])})"
        return RepositoryNotFound(f"{url} is not a pgincr repository (no {MARKER_KEY}; the location {what}). Check "
                                  "the repository URL (--repo / PGINCR_REPO / the cluster's `repository`); to start "
                                  "a new repository there, " + CREATE_HINT.format(url=url))

    def _prepare_root(self, owner: str | None) -> None:
        """Make the location ready to hold a repository (local: the directory, private)."""

    def create(self, *, owner: str | None = None) -> tuple[dict, bool]:
        """Create the repository here: write its marker. Returns (marker, created). An existing
        repository is returned as it is; a location holding anything but an earlier pgincr
        repository (which is adopted) is refused. `owner` (local, as root): the OS user that owns
        the repository and everything pgincr writes into it (the database's user, so that its
        archive_command and restore_command can use it)."""
        import json

        try:
            return self.identity(), False
        except RepositoryNotFound:
            pass
        parent = self._ancestor_repository()
        if parent:
            raise RepositoryError(f"{self.url} lies inside the repository {parent}: a repository cannot hold another; "
                                  f"use --repo {parent} with a new --cluster name")
        self._prepare_root(owner)
        dirs, files = self._top_level()
        legacy = self._legacy_clusters(dirs)
        foreign = [d for d in dirs if d not in legacy] + [f for f in files if not f.startswith(".pgincr-write-test-")]
        if foreign:
            raise RepositoryError(f"{self.url} is not empty and holds no pgincr repository ({', '.join(foreign[:5])}"
                                  f"{' ...' if len(foreign) > 5 else ''}): choose an empty location. Nothing was "
                                  "written")
        from .. import __version__

        marker = {"kind": MARKER_KIND, "format": REPOSITORY_FORMAT, "repository_id": uuid.uuid4().hex,
                  "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "created_by": f"airflow-pg-incremental {__version__}", "adopted_clusters": legacy,
                  "encryption": None}
        try:
            self.put_bytes(MARKER_KEY, json.dumps(marker, indent=2, sort_keys=True).encode(), overwrite=False)
        except ObjectExists:  # another process created it meanwhile: that one is the repository
            self._identity = None
            return self.identity(), False
        self._identity = marker
        log.info("created pgincr repository %s (id %s)%s", self.url, marker["repository_id"],
                 f"; adopted the existing cluster(s) {', '.join(legacy)}" if legacy else "")
        return marker, True

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
        if e.errno == errno.ENOENT and not self.root.is_dir():
            return RepositoryNotFound(f"no pgincr repository at {self.url} ({what}): the directory {self.root} does "
                                      "not exist; nothing is created implicitly: "
                                      + CREATE_HINT.format(url=self.url))
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
        """Create the missing directories below the root, private to the owner (0700 whatever the
        umask); the root itself exists (a repository is created explicitly)."""
        missing = []
        p = d
        while not p.exists() and p != self.root and self.root in p.parents:
            missing.append(p)
            p = p.parent
        owner = self._owner()
        for m in reversed(missing):
            try:
                os.mkdir(m, 0o700)
            except FileExistsError:
                continue
            os.chmod(m, 0o700)
            if owner:
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
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
            os.fchmod(fd, 0o600)  # readable by the owner only, whatever the umask
            with open(fd, "wb") as out:
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

    def abandoned_writes(self, prefix: str, older_than_s: float) -> list[dict]:
        import time

        base = self._path(prefix.rstrip("/")) if prefix.strip("/") else self.root
        if not base.is_dir():
            return []
        now, out = time.time(), []
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                if not (f.startswith(".") and ".tmp-" in f):
                    continue
                p = os.path.join(dirpath, f)
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue  # completed meanwhile
                age = now - st.st_mtime
                if age >= older_than_s:
                    rel = os.path.relpath(p, self.root).replace(os.sep, "/")
                    final = rel.rsplit("/", 1)[0] + "/" + f[1:f.rindex(".tmp-")] if "/" in rel else f
                    out.append({"key": final, "kind": "temp file", "age_s": round(age), "bytes": st.st_size,
                                "id": rel})
        return sorted(out, key=lambda d: d["id"])

    def discard_write(self, item: dict) -> None:
        name = item["id"].rsplit("/", 1)[-1]
        if not (name.startswith(".") and ".tmp-" in name):
            raise ConfigError(f"{item['id']!r} is not a temporary file of an unfinished write")
        path = self.root / item["id"]
        if os.path.commonpath([os.path.realpath(path), os.path.realpath(self.root)]) != os.path.realpath(self.root):
            raise ConfigError(f"{item['id']!r} lies outside the repository")
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise self._wrap_oserror(e, f"removing {item['id']}") from e

    def check_writable(self) -> None:
        """The location is this repository (its marker: never created here implicitly) and can be
        written."""
        self.identity()
        try:
            probe = self.root / f".pgincr-write-test-{uuid.uuid4().hex[:8]}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"ok")
                os.fsync(fd)
            finally:
                os.close(fd)
            probe.unlink()
        except OSError as e:
            raise self._wrap_oserror(e, "checking that it is writable") from e

    def _top_level(self) -> tuple[list[str], list[str]]:
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return [], []
        except OSError as e:
            raise self._wrap_oserror(e, "listing /") from e
        dirs = sorted(e.name for e in entries if e.is_dir(follow_symlinks=False))
        files = sorted(e.name for e in entries if not e.is_dir(follow_symlinks=False))
        return dirs, files

    def _ancestor_repository(self) -> str | None:
        for p in list(self.root.parents)[:-1]:
            try:
                if (p / MARKER_KEY).is_file():
                    return f"file://{p}"
            except OSError:
                return None
        return None

    def _location_note(self) -> str:
        if not self.root.exists():
            return f"the directory {self.root} does not exist"
        if not self.root.is_dir():
            return f"{self.root} is not a directory"
        return ""

    def _prepare_root(self, owner: str | None) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not any(self.root.iterdir()):
                os.chmod(self.root, 0o700)
            if owner:
                import pwd

                try:
                    pw = pwd.getpwnam(owner)
                except KeyError:
                    raise ConfigError(f"OS user {owner!r} (the repository's owner) does not exist") from None
                if os.geteuid() == 0:
                    os.chown(self.root, pw.pw_uid, pw.pw_gid)
                elif pw.pw_uid != os.geteuid():
                    raise ConfigError(f"only root can give the repository to OS user {owner!r}; run as that user "
                                      "or omit --owner")
        except OSError as e:
            raise self._wrap_oserror(e, "creating the repository") from e


# --------------------------------------------------------------------------------------------
class S3Repository(Repository):
    """S3 or any S3-compatible store. `client` is a boto3 S3 client (e.g. from Airflow's S3Hook)."""

    MULTIPART_CHUNK = 16 * 1024 * 1024
    # how the user configured it: "cli" (environment, --env-file) or "airflow" (an aws connection);
    # error messages name the fix in that language
    origin: str | None = None
    _FIX = {"endpoint": {"cli": "check PGINCR_S3_ENDPOINT_URL (or AWS_ENDPOINT_URL) and the network",
                         "airflow": "check endpoint_url in the extra of the AWS connection, and the network",
                         None: "check the S3 endpoint URL and the network"},
            "credentials": {"cli": "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the AWS profile) and the "
                                   "bucket policy",
                            "airflow": "check the AWS connection's credentials and the bucket policy",
                            None: "check the S3 credentials and the bucket policy"},
            "none": {"cli": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or an AWS profile; for archive_command "
                            "and restore_command, in the --env-file)",
                     "airflow": "configure the credentials of the AWS connection",
                     None: "configure S3 credentials"}}

    def _fix(self, what: str) -> str:
        return self._FIX[what].get(self.origin, self._FIX[what][None])

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
        from botocore.exceptions import (
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
        )

        if isinstance(e, ClientError):
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchBucket",) or (code == "404" and "bucket" in what):
                return RepositoryError(f"bucket {self.bucket!r} does not exist ({what}): create it or fix the "
                                       "repository URL")
            if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                return RepositoryError(f"access denied to s3://{self.bucket} ({what}, {code}): {self._fix('credentials')}")
            return RepositoryError(f"S3 error {code} while {what} in {self.url}: {e}")
        if isinstance(e, EndpointConnectionError):
            return RepositoryError(f"S3 endpoint unreachable while {what}: {e}; {self._fix('endpoint')}")
        if isinstance(e, NoCredentialsError):
            return RepositoryError(f"no S3 credentials found while {what}: {self._fix('none')}")
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
        missing = self._location_note()
        if missing:
            raise RepositoryError(f"{missing}: create it or fix the repository URL")
        self.identity()
        probe = f".pgincr-write-test-{uuid.uuid4().hex[:8]}"
        self.put_bytes(probe, b"ok")
        self.delete(probe)

    def abandoned_writes(self, prefix: str, older_than_s: float) -> list[dict]:
        """Multipart uploads below `prefix` initiated more than `older_than_s` ago and never
        completed or aborted (a killed backup leaves one; its parts cost storage until aborted)."""
        from botocore.exceptions import BotoCoreError, ClientError

        p = prefix.strip("/")
        full = (self._key(p) + "/") if p else (self.prefix + "/" if self.prefix else "")
        now = datetime.datetime.now(datetime.timezone.utc)
        out = []
        kwargs = {"Bucket": self.bucket, "Prefix": full}
        try:
            while True:
                resp = self.client.list_multipart_uploads(**kwargs)
                for u in resp.get("Uploads", []) or []:
                    init = u["Initiated"] if u["Initiated"].tzinfo else u["Initiated"].replace(
                        tzinfo=datetime.timezone.utc)
                    age = (now - init).total_seconds()
                    if age >= older_than_s:
                        out.append({"key": self._rel(u["Key"]), "kind": "multipart upload", "age_s": round(age),
                                    "bytes": self._upload_bytes(u["Key"], u["UploadId"]), "id": u["UploadId"]})
                if not resp.get("IsTruncated"):
                    break
                kwargs.update(KeyMarker=resp.get("NextKeyMarker"), UploadIdMarker=resp.get("NextUploadIdMarker"))
        except (ClientError, BotoCoreError) as e:
            raise self._err(e, f"listing unfinished uploads below {prefix or '/'}") from e
        return sorted(out, key=lambda d: (d["key"], d["id"]))

    def _upload_bytes(self, full_key: str, upload_id: str) -> int | None:
        try:
            parts = self.client.list_parts(Bucket=self.bucket, Key=full_key, UploadId=upload_id).get("Parts", [])
            return sum(int(p.get("Size", 0)) for p in parts or [])
        except Exception:  # the size is informative only
            return None

    def discard_write(self, item: dict) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.abort_multipart_upload(Bucket=self.bucket, Key=self._key(item["key"]), UploadId=item["id"])
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchUpload", "404"):
                return  # completed or aborted meanwhile
            raise self._err(e, f"aborting the unfinished upload of {item['key']}") from e
        except BotoCoreError as e:
            raise self._err(e, f"aborting the unfinished upload of {item['key']}") from e

    def _top_level(self) -> tuple[list[str], list[str]]:
        dirs, files = [], []
        for page in self._paginate("", "/"):
            dirs += [cp["Prefix"].rstrip("/").rsplit("/", 1)[-1] for cp in page.get("CommonPrefixes", [])]
            files += [self._rel(o["Key"]) for o in page.get("Contents", [])]
        return sorted(dirs), sorted(files)

    def _ancestor_repository(self) -> str | None:
        parts = self.prefix.split("/") if self.prefix else []
        for i in range(len(parts) - 1, -1, -1):
            key = "/".join(parts[:i] + [MARKER_KEY])
            try:
                self.client.head_object(Bucket=self.bucket, Key=key)
            except Exception:
                continue
            return f"s3://{self.bucket}/{'/'.join(parts[:i])}".rstrip("/")
        return None

    def _location_note(self) -> str:
        """'the bucket ... does not exist', or '' when it does (other errors raise, explained)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchBucket", "NotFound"):
                return f"the bucket {self.bucket!r} does not exist"
            raise self._err(e, "checking the bucket") from e
        except BotoCoreError as e:
            raise self._err(e, "checking the bucket") from e
        return ""


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


def _parse_marker(raw: bytes, url: str) -> dict:
    import json

    try:
        marker = json.loads(raw)
    except ValueError:
        marker = None
    if not isinstance(marker, dict) or marker.get("kind") != MARKER_KIND or not isinstance(marker.get("format"), int):
        raise RepositoryError(f"the repository marker {url}/{MARKER_KEY} is damaged or not pgincr's: restore it from "
                              "a copy, or investigate what wrote it; nothing was read")
    if marker["format"] > REPOSITORY_FORMAT:
        raise RepositoryError(f"{url} is a repository of format {marker['format']}, written by a newer "
                              f"airflow-pg-incremental ({marker.get('created_by')}); this version reads format "
                              f"{REPOSITORY_FORMAT}: upgrade airflow-pg-incremental")
    return marker


_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def open_repository(url: str, *, s3_client=None, origin: str | None = None) -> Repository:
    """'/path', 'file:///path' or 's3://bucket/prefix'. Opening touches nothing; call
    `identity()` (or `check_writable()`) to make sure a repository is there."""
    if not url:
        raise ConfigError("no repository given: pass a local directory or s3://bucket/prefix")
    if url.startswith("s3://"):
        if not url[5:].partition("/")[0]:
            raise ConfigError(f"repository URL {url!r} names no bucket: write s3://bucket/prefix")
        rest = url[5:]
        bucket, _, prefix = rest.partition("/")
        repo = S3Repository(s3_client or s3_client_from_env(), bucket, prefix)
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
    return LocalRepository(url)
