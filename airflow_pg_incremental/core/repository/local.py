"""Local directory driver: temp file + fsync + rename (link() for create-if-absent), directory
fsync, private modes (0700/0600), one owner for a shared repository."""

from __future__ import annotations

import datetime
import errno
import logging
import os
import uuid
from pathlib import Path
from typing import BinaryIO

from ..codec import CHUNK
from ..errors import ConfigError, ObjectExists, ObjectNotFound, RepositoryError, RepositoryNotFound

log = logging.getLogger(__name__)
from .base import CREATE_HINT, MARKER_KEY, Repository, validate_key


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

    def _put(self, key: str, src: BinaryIO, *, overwrite: bool = True) -> int:
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

    def _open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise ObjectNotFound(f"object {key} not found in {self.url}") from None
        except OSError as e:
            raise self._wrap_oserror(e, f"reading {key}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _size(self, key: str) -> int:
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


class _SourceError(Exception):
    """Carries an OSError raised by the data source through the repository's own error handling."""
