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
    """Abstract repository. `url` never contains credentials.

    Encryption at rest sits below this interface: with a `keyring` (an encrypted repository),
    put() encrypts what callers give and open() returns what they put (authenticated: see crypt),
    size() is the size they put; so checksums recorded by callers hold either way. Drivers
    implement the stored-byte primitives `_put`, `_open`, `_size`."""

    url: str
    _identity: dict | None = None
    keyring = None  # crypt.Keyring: the repository key(s); None for an unencrypted repository

    def use_keyring(self, keyring) -> "Repository":
        """Give the repository key(s) (None: the repository is expected to be unencrypted); checked
        against the marker by identity(), before anything else is read or written."""
        self.keyring = keyring
        self._identity = None
        return self

    def _encrypts(self, key: str) -> bool:
        return self.keyring is not None and key != MARKER_KEY

    def put(self, key: str, src: BinaryIO, *, overwrite: bool = True) -> int:
        """Store everything `src.read()` yields under `key`; return the number of bytes stored.
        With overwrite=False an existing object raises ObjectExists (and is left unchanged)."""
        if not self._encrypts(key):
            return self._put(key, src, overwrite=overwrite)
        from .crypt import EncryptingReader

        self.identity()  # a wrong key fails here, before anything is written
        enc = EncryptingReader(src, self.keyring, validate_key(key))
        self._put(key, enc, overwrite=overwrite)
        return enc.plain_size

    def open(self, key: str, *, size: int | None = None) -> BinaryIO:
        """A readable stream of the object's bytes (as put); raises ObjectNotFound. `size`: the
        stored size the caller expects (a backup's metadata records it); a driver may read a large
        object by several requests at once (S3: ranged GETs side by side)."""
        encrypted = self._encrypts(key)
        # the key is checked against the marker before the object is opened (nothing left open)
        known = ((self.identity().get("encryption") or {}).get("checks") or {}) if encrypted else None
        stored = self._open(key) if size is None else self._open_sized(key, size)
        if not encrypted:
            return stored
        from .crypt import DecryptingReader

        return DecryptingReader(stored, self.keyring, validate_key(key), f" in {self.url}", known_ids=known)

    def size(self, key: str) -> int:
        n = self._size(key)
        if not self._encrypts(key):
            return n
        from .crypt import plain_size

        p = plain_size(n)
        return p if p >= 0 else n  # too short to be an object: a mismatch with any recorded size

    @abstractmethod
    def _put(self, key: str, src: BinaryIO, *, overwrite: bool = True) -> int:
        """Store the bytes `src.read()` yields (stored bytes: encrypted when the repository is)."""

    @abstractmethod
    def _open(self, key: str) -> BinaryIO:
        """A readable stream of the object's stored bytes; raises ObjectNotFound."""

    def _open_sized(self, key: str, size: int) -> BinaryIO:
        """_open for an object the caller expects to hold about `size` bytes."""
        return self._open(key)

    @abstractmethod
    def _size(self, key: str) -> int:
        """The number of stored bytes."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

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
            marker = _parse_marker(raw, self.url)
            self._check_keyring(marker)
            self._identity = marker
        return self._identity

    def _check_keyring(self, marker: dict) -> None:
        """The repository's encryption and the key given agree; else a RepositoryError naming the fix
        (raised by identity(), before anything else is read or written)."""
        from .crypt import CIPHER, KEY_ENV, Keyring

        enc = marker.get("encryption")
        if not enc:
            if self.keyring is not None:
                raise RepositoryError(f"{self.url} is not an encrypted repository, but a repository key was given "
                                      f"({KEY_ENV} / the cluster's encryption_key_conn_id): remove the key, or check "
                                      "the repository URL; nothing was read or written")
            return
        ids = sorted(enc.get("checks") or {})
        if self.keyring is None:
            raise RepositoryError(f"{self.url} is an encrypted repository (key id {', '.join(ids)}) and no key was "
                                  f"given: set {KEY_ENV} (CLI; for archive_command and restore_command in their "
                                  "--env-file) or encryption_key_conn_id for the cluster (Airflow); nothing was "
                                  "read or written")
        if enc.get("cipher") != CIPHER:
            raise RepositoryError(f"{self.url} is encrypted with {enc.get('cipher')!r}, which this version does not "
                                  "know: upgrade airflow-pg-incremental")
        kid = self.keyring.current_id
        if kid not in ids:
            raise RepositoryError(f"wrong repository key for {self.url}: the key given has id {kid}, the repository's "
                                  f"keys are {', '.join(ids)}. Check {KEY_ENV} / the encryption key connection; to "
                                  f"rotate to a new key, run `pgincr repo-key-add` first; nothing was read or written")
        if not Keyring.check_ok(self.keyring.current, enc["checks"][kid], str(marker.get("repository_id"))):
            raise RepositoryError(f"the key check of {self.url}/{MARKER_KEY} fails for key id {kid}: the marker was "
                                  "damaged or tampered with (or the key is wrong); nothing was read or written")

    def _encryption_entry(self, repository_id: str) -> dict | None:
        from .crypt import CHUNK, CIPHER

        if self.keyring is None:
            return None
        return {"cipher": CIPHER, "chunk_bytes": CHUNK,
                "checks": {self.keyring.current_id: self.keyring.check_value(repository_id)}}

    def add_key(self) -> tuple[dict, bool]:
        """Key rotation: add the keyring's current key to the encrypted repository's keys; one of its
        older keys must be a key of the repository already (the authority to add one). New objects
        are then written under the new key; the old ones stay readable with the old key given.
        Returns (marker, added)."""
        import json

        from .crypt import KEY_ENV, OLD_KEYS_ENV, Keyring

        try:
            raw = self.get_bytes(MARKER_KEY)
        except ObjectNotFound:
            raise self._not_a_repository() from None
        marker = _parse_marker(raw, self.url)
        enc = marker.get("encryption")
        if not enc:
            raise RepositoryError(f"{self.url} is not an encrypted repository: it has no keys to rotate")
        if self.keyring is None:
            raise RepositoryError(f"no keys given: set {KEY_ENV} to the new key and {OLD_KEYS_ENV} to a current one")
        rid, checks = str(marker.get("repository_id")), enc.get("checks") or {}
        if self.keyring.current_id in checks:
            self.use_keyring(self.keyring)
            return self.identity(), False
        if not any(kid in checks and Keyring.check_ok(self.keyring.get(kid), checks[kid], rid)
                   for kid in self.keyring.ids if kid != self.keyring.current_id):
            raise RepositoryError(f"none of the keys in {OLD_KEYS_ENV} is a key of {self.url} (its keys: "
                                  f"{', '.join(sorted(checks))}): give a current key there to authorize the new one; "
                                  "nothing was written")
        enc = {**enc, "checks": {**checks, self.keyring.current_id: self.keyring.check_value(rid)}}
        marker = {**marker, "encryption": enc}
        self._put(MARKER_KEY, io.BytesIO(json.dumps(marker, indent=2, sort_keys=True).encode()), overwrite=True)
        self._identity = None
        log.info("added the repository key %s to %s", self.keyring.current_id, self.url)
        return self.identity(), True

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

        rid = uuid.uuid4().hex
        if legacy and self.keyring is not None:
            raise RepositoryError(f"{self.url} holds cluster(s) {', '.join(legacy)} written without encryption: an "
                                  "encrypted repository cannot adopt them; choose an empty location")
        marker = {"kind": MARKER_KIND, "format": REPOSITORY_FORMAT, "repository_id": rid,
                  "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "created_by": f"airflow-pg-incremental {__version__}", "adopted_clusters": legacy,
                  "encryption": self._encryption_entry(rid)}
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
        if self._encrypts(key):
            from .crypt import encrypt_bytes

            self.identity()
            self._put_bytes(key, encrypt_bytes(data, self.keyring, validate_key(key)), overwrite=overwrite)
            return len(data)
        return self._put_bytes(key, data, overwrite=overwrite)

    def _put_bytes(self, key: str, data: bytes, *, overwrite: bool = True) -> int:
        return self._put(key, io.BytesIO(data), overwrite=overwrite)

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
