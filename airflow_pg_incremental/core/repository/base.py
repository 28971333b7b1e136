"""The repository interface (every driver implements it), key validation, and the repository's
identity: the marker written when a repository is created."""

from __future__ import annotations

import datetime
import io
import logging
import re
import uuid
from abc import ABC, abstractmethod
from typing import BinaryIO

from ..errors import ConfigError, ObjectExists, ObjectNotFound, RepositoryError, RepositoryNotFound

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
        from ..names import validate_cluster

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
        from ... import __version__

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
