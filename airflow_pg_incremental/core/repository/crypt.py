"""Client-side encryption at rest: authenticated, streaming AES-256-GCM under every object of an
encrypted repository (all but its marker).

Keys: the repository key (32 random bytes; `PGINCR_REPO_KEY` as base64 or hex, or an Airflow
connection's password) wraps a fresh random data key per object. Older keys
(`PGINCR_REPO_OLD_KEYS`, comma-separated) still open the objects written under them, so a key
rotation writes new objects under the new key and leaves the old ones readable. A key is known by
its id (16 hex digits of a SHA-256 of the key: never the key itself).

Object format (version 1), all lengths fixed so the plaintext size follows from the stored size:

    header (84 B): magic "PGINCENC" | version 1 | key id (8) | nonce prefix (7) | wrap nonce (12)
                   | data key wrapped with AES-256-GCM under the repository key (32 + 16 tag);
                   associated data: the header's first 36 bytes and the object's KEY NAME, so an
                   object moved or copied under another name does not open.
    records:       the plaintext in chunks of CHUNK bytes (the last one shorter, maybe empty), each
                   AES-256-GCM under the data key with nonce = prefix | counter (4, big-endian) |
                   last flag (1): the STREAM construction, so truncation, reordering, dropping or
                   appending chunks fail authentication.

Memory stays bounded (a chunk or two). `cryptography` is imported only when an encrypted
repository is used. A failed authentication raises ChecksumMismatch, naming the object.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import struct

from ..errors import ChecksumMismatch, ConfigError

MAGIC = b"PGINCENC"
VERSION = 1
CIPHER = "aes-256-gcm-stream"
CHUNK = 1024 * 1024
TAG = 16
_KEY_ID_LEN = 8
_PREFIX_LEN = 7
_AAD_LEN = len(MAGIC) + 1 + _KEY_ID_LEN + _PREFIX_LEN  # 24: what the wrap authenticates besides the name
HEADER_LEN = _AAD_LEN + 12 + 32 + TAG  # 84
_CHECK_PLAIN = b"pgincr repository key check v1"

KEY_ENV = "PGINCR_REPO_KEY"
OLD_KEYS_ENV = "PGINCR_REPO_OLD_KEYS"


def _aesgcm(key: bytes):
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # lazy: only encrypted repositories pay

    return AESGCM(key)


def _invalid_tag():
    from cryptography.exceptions import InvalidTag

    return InvalidTag


def parse_key(text: str, what: str = KEY_ENV) -> bytes:
    """32 bytes from base64 (44 characters) or hex (64); anything else is refused without echoing it."""
    s = (text or "").strip()
    raw = None
    if len(s) == 64:
        try:
            raw = bytes.fromhex(s)
        except ValueError:
            raw = None
    if raw is None:
        try:
            raw = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            raw = None
    if raw is None or len(raw) != 32:
        raise ConfigError(f"{what} is not a repository key: it must be 32 random bytes written as base64 (44 "
                          "characters) or hex (64); make one with `pgincr repo-key-new` or "
                          "`python -c 'import os,base64; print(base64.b64encode(os.urandom(32)).decode())'`")
    return raw


def key_id(key: bytes) -> str:
    return hashlib.sha256(b"pgincr-key-id\0" + key).hexdigest()[:2 * _KEY_ID_LEN]


def new_key_text() -> str:
    return base64.b64encode(os.urandom(32)).decode()


class Keyring:
    """The current repository key (new objects) and older ones (reading only)."""

    def __init__(self, current: bytes, old: list[bytes] | tuple = ()):
        self.current = current
        self.current_id = key_id(current)
        self._by_id = {key_id(k): k for k in old}
        self._by_id[self.current_id] = current

    def __repr__(self) -> str:  # never the keys
        return f"Keyring(current={self.current_id}, ids={sorted(self._by_id)})"

    @property
    def ids(self) -> list[str]:
        return sorted(self._by_id)

    def get(self, kid: str) -> bytes | None:
        return self._by_id.get(kid)

    @classmethod
    def from_texts(cls, current: str, old: str | list[str] | None = None, *, what: str = KEY_ENV,
                   old_what: str = OLD_KEYS_ENV) -> "Keyring":
        olds = old.split(",") if isinstance(old, str) else list(old or [])
        return cls(parse_key(current, what), [parse_key(o, old_what) for o in olds if o.strip()])

    def env(self) -> dict:
        """The environment variables that give this keyring to a child (restore_command)."""
        old = [base64.b64encode(k).decode() for kid, k in sorted(self._by_id.items()) if kid != self.current_id]
        out = {KEY_ENV: base64.b64encode(self.current).decode()}
        if old:
            out[OLD_KEYS_ENV] = ",".join(old)
        return out

    # the repository marker's key check --------------------------------------------------------
    def check_value(self, repository_id: str, key: bytes | None = None) -> str:
        nonce = os.urandom(12)
        ct = _aesgcm(key or self.current).encrypt(nonce, _CHECK_PLAIN, repository_id.encode())
        return base64.b64encode(nonce + ct).decode()

    @staticmethod
    def check_ok(key: bytes, value: str, repository_id: str) -> bool:
        try:
            raw = base64.b64decode(value)
            return _aesgcm(key).decrypt(raw[:12], raw[12:], repository_id.encode()) == _CHECK_PLAIN
        except (_invalid_tag(), ValueError, binascii.Error):
            return False


def keyring_from_env(environ=None) -> Keyring | None:
    """The keyring of PGINCR_REPO_KEY (+ PGINCR_REPO_OLD_KEYS), or None when no key is set."""
    env = os.environ if environ is None else environ
    cur = env.get(KEY_ENV, "").strip()
    if not cur:
        if env.get(OLD_KEYS_ENV, "").strip():
            raise ConfigError(f"{OLD_KEYS_ENV} is set but {KEY_ENV} is not: set the current repository key too")
        return None
    return Keyring.from_texts(cur, env.get(OLD_KEYS_ENV, ""))


# --- object format ---------------------------------------------------------------------------------
def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", counter, 1 if last else 0)


def _wrap_aad(head: bytes, name: str) -> bytes:
    return head[:_AAD_LEN] + b"\0" + name.encode()


def plain_size(stored: int) -> int:
    """The plaintext size of an object of `stored` bytes (-1 when too short to be one)."""
    body = stored - HEADER_LEN
    if body < TAG:
        return -1
    n = -(-body // (CHUNK + TAG))
    return body - n * TAG


def _read_full(src, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        b = src.read(n - got)
        if not b:
            break
        parts.append(bytes(b))
        got += len(b)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _FillReader(io.RawIOBase):
    """read(n) returns n bytes (fewer only at the end) from successive records of _next()."""

    def __init__(self):
        self._buf = b""
        self._view = memoryview(b"")
        self._pos = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def _next(self) -> bytes:  # b"" at the end
        raise NotImplementedError

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 << 62
        parts, want = [], n
        while want > 0:
            if self._pos >= len(self._buf):
                if self._done:
                    break
                self._buf, self._pos = self._next(), 0
                self._view = memoryview(self._buf)
                if not self._buf:
                    self._done = True
                    break
            whole = not self._pos and want >= len(self._buf)
            piece = self._buf if whole else self._view[self._pos:self._pos + want]  # a view: no copy yet
            self._pos += len(piece)
            want -= len(piece)
            parts.append(piece)
        if len(parts) == 1 and isinstance(parts[0], bytes):
            return parts[0]
        return b"".join(parts)  # the one copy

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


class EncryptingReader(_FillReader):
    """read() yields the encrypted object (header, then records) of what `src.read()` yields."""

    def __init__(self, src, keyring: Keyring, name: str):
        super().__init__()
        self._src = src
        self.plain_size = 0
        data_key, prefix, wrap_nonce = os.urandom(32), os.urandom(_PREFIX_LEN), os.urandom(12)
        head = MAGIC + bytes([VERSION]) + bytes.fromhex(keyring.current_id) + prefix
        self._header = head + wrap_nonce + _aesgcm(keyring.current).encrypt(wrap_nonce, data_key,
                                                                            _wrap_aad(head, name))
        self._aead, self._prefix, self._counter = _aesgcm(data_key), prefix, 0
        self._pending: bytes | None = None

    def _next(self) -> bytes:
        if self._header is not None:
            h, self._header = self._header, None
            self._pending = _read_full(self._src, CHUNK)
            return h
        if self._pending is None:
            return b""
        cur = self._pending
        nxt = _read_full(self._src, CHUNK) if len(cur) == CHUNK else b""
        last = not nxt
        rec = self._aead.encrypt(_nonce(self._prefix, self._counter, last), cur, None)
        self.plain_size += len(cur)
        self._counter += 1
        self._pending = None if last else nxt
        return rec


class DecryptingReader(_FillReader):
    """read() yields the plaintext of an encrypted object; a failed authentication (damage,
    tampering, truncation, a swapped name) raises ChecksumMismatch."""

    def __init__(self, src, keyring: Keyring, name: str, where: str = "", known_ids=None):
        # known_ids: the key ids of the repository (its marker): a header naming another is damaged
        super().__init__()
        self._src, self._keyring, self._name, self._where = src, keyring, name, where
        self._known = set(known_ids) if known_ids is not None else None
        self._aead = None  # the header is read with the first read(), so errors come from reading
        self._finished = False

    def _start(self) -> None:
        head = _read_full(self._src, HEADER_LEN)
        if len(head) < HEADER_LEN or head[:len(MAGIC)] != MAGIC:
            raise self._bad("it is not an encrypted pgincr object (written without encryption, truncated, or "
                            "replaced)")
        if head[len(MAGIC)] != VERSION:
            raise ChecksumMismatch(f"{self._name}{self._where}: encrypted with format version {head[len(MAGIC)]}, "
                                   f"this version reads {VERSION}: upgrade airflow-pg-incremental (or the object is "
                                   "damaged or tampered with)")
        kid = head[len(MAGIC) + 1:len(MAGIC) + 1 + _KEY_ID_LEN].hex()
        key = self._keyring.get(kid)
        if key is None and self._known is not None and kid not in self._known:
            raise self._bad(f"its header names key id {kid}, which is no key of this repository")
        if key is None:
            from ..errors import RepositoryError

            raise RepositoryError(f"{self._name} was encrypted under the repository key with id {kid}, which is not "
                                  f"given (given: {', '.join(self._keyring.ids)}): add that older key to "
                                  f"{OLD_KEYS_ENV} (or to the `old_keys` of the encryption key's connection extra)")
        try:
            data_key = _aesgcm(key).decrypt(head[_AAD_LEN:_AAD_LEN + 12], head[_AAD_LEN + 12:],
                                            _wrap_aad(head, self._name))
        except _invalid_tag():
            raise self._bad("its data key does not authenticate (the header was damaged or tampered with, or the "
                            "object was moved here from another name)") from None
        self._aead, self._prefix, self._counter = _aesgcm(data_key), head[len(MAGIC) + 1 + _KEY_ID_LEN:_AAD_LEN], 0
        self._rec = _read_full(self._src, CHUNK + TAG)

    def _bad(self, why: str) -> ChecksumMismatch:
        return ChecksumMismatch(f"{self._name}{self._where}: damaged or tampered with: {why}; the object cannot be "
                                "used (restore it from a copy)")

    def _next(self) -> bytes:
        if self._finished:
            return b""
        if self._aead is None:
            self._start()
        rec = self._rec
        nxt = _read_full(self._src, CHUNK + TAG) if len(rec) == CHUNK + TAG else b""
        last = not nxt
        try:
            plain = self._aead.decrypt(_nonce(self._prefix, self._counter, last), rec, None)
        except (_invalid_tag(), ValueError):
            raise self._bad(f"chunk {self._counter} does not authenticate"
                            + (" (the object ends early or was cut)" if last else "")) from None
        self._counter += 1
        self._rec = nxt
        self._finished = last
        return plain  # empty only as the (authenticated) last record of an empty object

    def close(self) -> None:
        try:
            self._src.close()
        finally:
            super().close()


def encrypt_bytes(data: bytes, keyring: Keyring, name: str) -> bytes:
    return EncryptingReader(io.BytesIO(data), keyring, name).read()


def decrypt_bytes(data: bytes, keyring: Keyring, name: str, known_ids=None) -> bytes:
    return DecryptingReader(io.BytesIO(data), keyring, name, known_ids=known_ids).read()
