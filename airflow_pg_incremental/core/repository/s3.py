"""S3 driver (boto3 client, e.g. from Airflow's S3Hook): multipart uploads, conditional PUTs,
streaming reads; errors name the fix in the user's terms (CLI environment or Airflow connection)."""

from __future__ import annotations

import datetime
import io
import logging
import os
import uuid
from typing import BinaryIO, Iterator

from ..codec import HashingReader, NonClosing, _ReadInto
from ..errors import ConfigError, ObjectExists, ObjectNotFound, RepositoryError
from ..names import validate_prefix

log = logging.getLogger(__name__)
from .base import MARKER_KEY, Repository, validate_key


class S3Repository(Repository):
    """S3 or any S3-compatible store. `client` is a boto3 S3 client (e.g. from Airflow's S3Hook)."""

    MULTIPART_CHUNK = 16 * 1024 * 1024
    READ_PART = 8 * 1024 * 1024  # bytes per ranged GET of a large object
    READ_ATTEMPTS = 3  # per part, for a connection that breaks mid-body (botocore retries the request itself)
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

    def __init__(self, client, bucket: str, prefix: str = "", *, sse: str | None = None,
                 sse_kms_key_id: str | None = None, read_streams: int | None = None):
        """`sse`: S3 server-side encryption of what is written: AES256 (SSE-S3) or aws:kms (SSE-KMS,
        with `sse_kms_key_id`, else the account's default KMS key); None: the bucket's default.
        `read_streams`: ranged GETs in flight when a large object is read (default
        PGINCR_S3_READ_STREAMS, else 4; 1 reads it as one stream)."""
        if not bucket or "/" in bucket:
            raise ConfigError(f"invalid bucket name {bucket!r}")
        self.read_streams = read_streams_setting(read_streams)
        self.client = client
        self.bucket = bucket
        self.prefix = validate_prefix(prefix)
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.sse_args = sse_args(sse, sse_kms_key_id)

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

    def _put(self, key: str, src: BinaryIO, *, overwrite: bool = True) -> int:
        from boto3.s3.transfer import TransferConfig
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(key)
        if not overwrite and self.exists(key):
            raise ObjectExists(f"object {key} exists already in {self.url}")
        counter = HashingReader(src, hash=False)  # counts what passes
        cfg = TransferConfig(multipart_threshold=self.MULTIPART_CHUNK, multipart_chunksize=self.MULTIPART_CHUNK,
                             max_concurrency=4, use_threads=True)
        try:
            self.client.upload_fileobj(NonClosing(counter), self.bucket, full, Config=cfg,
                                       **({"ExtraArgs": dict(self.sse_args)} if self.sse_args else {}))
        except (ClientError, BotoCoreError) as e:
            raise self._err(e, f"writing {key}") from e
        except Exception as e:  # S3 transfer wraps some errors
            inner = e.__cause__ or e.__context__
            if isinstance(inner, (ClientError, BotoCoreError)):
                raise self._err(inner, f"writing {key}") from e
            raise
        return counter.size

    def _open(self, key: str) -> BinaryIO:
        return _StreamingBody(self._get(key)["Body"])

    def _open_sized(self, key: str, size: int) -> BinaryIO:
        """A large object (a backup's tar) is read by `read_streams` ranged GETs in flight side by
        side: one S3 connection is slower than several (AWS advises byte-range fetches in
        parallel), and a failed part is asked again rather than failing the whole read. Small
        objects (WAL segments, metadata) are one GET."""
        if self.read_streams < 2 or size <= 2 * self.READ_PART:
            return self._open(key)
        return _RangedBody(self, key, self.READ_PART, self.read_streams)

    def _get(self, key: str, **kwargs) -> dict:
        """get_object, its errors named (a missing object is ObjectNotFound)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key), **kwargs)
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code in ("NoSuchKey", "404"):
                raise ObjectNotFound(f"object {key} not found in {self.url}") from None
            if code == "InvalidRange":  # a range past the end: the object is shorter than asked
                raise _InvalidRange(f"{key} in {self.url} is shorter than {kwargs.get('Range')}") from e
            raise self._err(e, f"reading {key}") from e
        except BotoCoreError as e:
            raise self._err(e, f"reading {key}") from e

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

    def _size(self, key: str) -> int:
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

    def _put_bytes(self, key: str, data: bytes, *, overwrite: bool = True) -> int:
        """Small objects: one PUT request (no transfer threads); overwrite=False is a conditional
        write (If-None-Match: *), atomic on stores that support it, checked by HEAD before as well."""
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._key(key)
        if not overwrite and self.exists(key):
            raise ObjectExists(f"object {key} exists already in {self.url}")
        kwargs = {"Bucket": self.bucket, "Key": full, "Body": data, **self.sse_args}
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


SSE_MODES = ("AES256", "aws:kms")
MAX_READ_STREAMS = 32


def read_streams_setting(value: int | str | None = None) -> int:
    """`value`, else PGINCR_S3_READ_STREAMS, else 4: ranged GETs in flight per large object."""
    if value is None:
        value = os.environ.get("PGINCR_S3_READ_STREAMS") or 4
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if not 1 <= n <= MAX_READ_STREAMS:
        raise ConfigError(f"S3 read streams {value!r} (PGINCR_S3_READ_STREAMS) must be a whole number from 1 to "
                          f"{MAX_READ_STREAMS}")
    return n


def sse_args(sse: str | None, kms_key_id: str | None = None) -> dict:
    """The PUT parameters of S3 server-side encryption (also the ExtraArgs of upload_fileobj)."""
    if not sse:
        if kms_key_id:
            raise ConfigError("an S3 SSE-KMS key id was given without s3_sse: aws:kms (PGINCR_S3_SSE=aws:kms)")
        return {}
    if sse not in SSE_MODES:
        raise ConfigError(f"S3 server-side encryption {sse!r} is not one of {', '.join(SSE_MODES)} (s3_sse / "
                          "PGINCR_S3_SSE)")
    if kms_key_id and sse != "aws:kms":
        raise ConfigError("an SSE-KMS key id needs s3_sse: aws:kms, not AES256")
    return {"ServerSideEncryption": sse, **({"SSEKMSKeyId": kms_key_id} if kms_key_id else {})}


class _StreamingBody(_ReadInto, io.RawIOBase):
    def __init__(self, body):
        self._body = body

    def read(self, n=-1):
        return self._body.read(None if n is None or n < 0 else n)

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


class _RangedBody(_ReadInto, io.RawIOBase):
    """One object read as ranged GETs of `part` bytes, `streams` of them in flight side by side,
    handed on in order. Memory: at most streams + 1 parts. The first GET (bytes 0..part-1) gives the
    object's size and ETag; every later part must come from the same object version (its ETag), or
    the read fails: an object replaced mid-read is never spliced. A part whose body breaks off is
    asked again (READ_ATTEMPTS); errors surface in read(), in order, named as by the driver."""

    def __init__(self, repo: S3Repository, key: str, part: int, streams: int):
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self._repo, self._key, self._part = repo, key, part
        self._closed_evt = threading.Event()
        self._buf, self._pos = b"", 0
        self._single: BinaryIO | None = None
        try:
            first = repo._get(key, Range=f"bytes=0-{part - 1}")
        except _InvalidRange:  # an empty object: its checks will say it is not what was stored
            self._single = repo._open(key)
            return
        total = _content_range_total(first.get("ContentRange"))
        if total is None:  # the server ignored Range (200, whole object): one stream after all
            self._single = _StreamingBody(first["Body"])
            return
        self.size, self._etag, self._streams = total, first.get("ETag"), streams
        self._nparts = max(1, -(-total // part))
        self._pool = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="pgincr-s3-read")
        self._ahead: list = [self._pool.submit(self._first, first)]
        self._next = 1
        self._fill()

    # -- workers ---------------------------------------------------------------------------------
    def _range(self, index: int) -> tuple[int, int]:
        start = index * self._part
        return start, min(self.size, start + self._part) - 1

    def _fetch(self, index: int) -> bytes:
        import time

        start, end = self._range(index)
        for attempt in range(1, self._repo.READ_ATTEMPTS + 1):
            if self._closed_evt.is_set():
                return b""
            resp = self._repo._get(self._key, Range=f"bytes={start}-{end}")
            try:
                return self._body(index, resp)
            except _BrokenPart as e:
                if attempt == self._repo.READ_ATTEMPTS:
                    raise RepositoryError(f"S3 failure while reading {self._key} (bytes {start}-{end}) in "
                                          f"{self._repo.url}: {e} ({attempt} attempts); "
                                          f"{self._repo._fix('endpoint')}") from e.__cause__
                log.info("reading %s bytes %d-%d again (attempt %d): %s", self._key, start, end, attempt + 1, e)
                time.sleep(0.2 * attempt)
        raise AssertionError("unreachable")

    def _first(self, resp: dict) -> bytes:
        try:
            return self._body(0, resp)
        except _BrokenPart as e:
            log.info("reading %s bytes 0-%d again: %s", self._key, self._range(0)[1], e)
            return self._fetch(0)

    def _body(self, index: int, resp: dict) -> bytes:
        start, end = self._range(index)
        etag = resp.get("ETag")
        if etag != self._etag or _content_range_total(resp.get("ContentRange")) != self.size:
            resp["Body"].close()
            raise RepositoryError(f"{self._key} in {self._repo.url} changed while it was read (ETag {self._etag} "
                                  f"became {etag}): something rewrote it; a stored object is never rewritten, so "
                                  "find what writes into this repository, then read it again")
        try:
            data = resp["Body"].read()
        except Exception as e:  # a connection reset, a timeout, an incomplete body
            raise _BrokenPart(f"{type(e).__name__}: {e}") from e
        if len(data) != end - start + 1:
            raise _BrokenPart(f"{len(data)} bytes instead of {end - start + 1}")
        return data

    def _fill(self) -> None:
        while self._next < self._nparts and len(self._ahead) < self._streams:
            self._ahead.append(self._pool.submit(self._fetch, self._next))
            self._next += 1

    # -- the stream ------------------------------------------------------------------------------
    def read(self, n: int = -1) -> bytes:
        if self._single is not None:
            return self._single.read(n)
        if n is None or n < 0:
            out = [self._buf[self._pos:]]
            self._buf, self._pos = b"", 0
            while self._ahead:
                out.append(self._take())
            return b"".join(out)
        while self._pos >= len(self._buf):
            if not self._ahead:
                return b""
            self._buf, self._pos = self._take(), 0
        data = self._buf[self._pos:self._pos + n]
        self._pos += len(data)
        return data

    def _take(self) -> bytes:
        future = self._ahead.pop(0)
        data = future.result()  # the part's error, in order
        self._fill()
        return data

    def close(self) -> None:
        if not self.closed:
            self._closed_evt.set()
            if self._single is not None:
                self._single.close()
            else:
                for f in self._ahead:
                    f.cancel()
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._ahead = []
        super().close()


class _InvalidRange(RepositoryError):
    """A ranged GET past the object's end (HTTP 416)."""


class _BrokenPart(Exception):
    """A part's body broke off or came short: worth asking for again."""


def _content_range_total(value: str | None) -> int | None:
    """The object's size from a Content-Range header ('bytes 0-8388607/123456789'), or None."""
    if not value or "/" not in value:
        return None
    total = value.rsplit("/", 1)[1]
    return int(total) if total.isdigit() else None
