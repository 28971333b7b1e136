import io

import boto3
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

from airflow_pg_incremental.core.errors import (
    ConfigError,
    InvalidName,
    ObjectExists,
    ObjectNotFound,
    RepositoryError,
)
from airflow_pg_incremental.core.repository import S3Repository

BUCKET = "bkt"


@pytest.fixture
def client():
    return boto3.client("s3", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")


@pytest.fixture
def stub(client):
    with Stubber(client) as s:
        yield s
        s.assert_no_pending_responses()


@pytest.fixture
def repo(client, stub):
    return S3Repository(client, BUCKET, "pre/fix")


def _body(data: bytes) -> StreamingBody:
    return StreamingBody(io.BytesIO(data), len(data))


def test_keys_are_prefixed(client):
    r = S3Repository(client, BUCKET, "/pre/fix/")
    assert r.prefix == "pre/fix"
    assert r.url == "s3://bkt/pre/fix"
    assert r._key("c/backups/b/base.tar.zst") == "pre/fix/c/backups/b/base.tar.zst"
    assert r._rel("pre/fix/c/x") == "c/x"
    r0 = S3Repository(client, BUCKET)
    assert r0._key("c/x") == "c/x" and r0.url == "s3://bkt"


@pytest.mark.parametrize("prefix", ["..", "a/../b", "../b", "a//b", "a/./b", "a b", "a\\b"])
def test_bad_prefix_rejected(client, prefix):
    with pytest.raises(InvalidName):
        S3Repository(client, BUCKET, prefix)


@pytest.mark.parametrize("bucket", ["", "a/b", None])
def test_bad_bucket_rejected(client, bucket):
    with pytest.raises(ConfigError):
        S3Repository(client, bucket, "p")


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a b"])
def test_bad_keys_rejected_before_any_request(repo, key):
    # the stubber has no response queued: any request would fail with a stubber error instead
    for op in (lambda: repo.open(key), lambda: repo.exists(key), lambda: repo.delete(key),
               lambda: repo.put_bytes(key, b"x")):
        with pytest.raises(ConfigError):
            op()


def test_check_writable_missing_bucket(repo, stub):
    stub.add_client_error("head_bucket", service_error_code="404", http_status_code=404,
                          expected_params={"Bucket": BUCKET})
    with pytest.raises(RepositoryError, match="does not exist") as ei:
        repo.check_writable()
    assert "'bkt'" in str(ei.value)


def test_check_writable_access_denied(repo, stub):
    stub.add_client_error("head_bucket", service_error_code="403", http_status_code=403,
                          expected_params={"Bucket": BUCKET})
    with pytest.raises(RepositoryError, match="access denied"):
        repo.check_writable()


def test_check_writable_ok_writes_and_deletes_probe(repo, stub, client):
    seen = []
    client.meta.events.register("before-parameter-build.s3.*", lambda params, **kw: seen.append(dict(params)))
    import io
    import json as _json

    from botocore.response import StreamingBody

    marker = _json.dumps({"kind": "pgincr-repository", "format": 1}).encode()
    stub.add_response("head_bucket", {}, {"Bucket": BUCKET})
    stub.add_response("get_object", {"Body": StreamingBody(io.BytesIO(marker), len(marker))},
                      {"Bucket": BUCKET, "Key": "pre/fix/pgincr-repository.json"})
    stub.add_response("put_object", {})
    stub.add_response("delete_object", {})
    repo.check_writable()
    put = [p for p in seen if "Body" in p]
    assert len(put) == 1
    assert put[0]["Bucket"] == BUCKET and put[0]["Key"].startswith("pre/fix/.pgincr-write-test-")
    deleted = [p for p in seen if "Body" not in p and p.get("Key")]
    assert deleted[-1]["Key"] == put[0]["Key"]


def test_put_small_object(repo, stub, client):
    seen = []
    client.meta.events.register("before-parameter-build.s3.PutObject", lambda params, **kw: seen.append(params))
    stub.add_response("put_object", {})
    assert repo.put_bytes("c/x", b"hello") == 5
    assert seen[0]["Key"] == "pre/fix/c/x" and seen[0]["Bucket"] == BUCKET


def test_put_no_overwrite_existing(repo, stub):
    stub.add_response("head_object", {"ContentLength": 3}, {"Bucket": BUCKET, "Key": "pre/fix/c/x"})
    with pytest.raises(ObjectExists, match="c/x"):
        repo.put_bytes("c/x", b"new", overwrite=False)


def test_open_missing_key(repo, stub):
    stub.add_client_error("get_object", service_error_code="NoSuchKey", http_status_code=404,
                          expected_params={"Bucket": BUCKET, "Key": "pre/fix/c/missing"})
    with pytest.raises(ObjectNotFound, match="c/missing"):
        repo.open("c/missing")


def test_open_missing_bucket(repo, stub):
    stub.add_client_error("get_object", service_error_code="NoSuchBucket", http_status_code=404,
                          expected_params={"Bucket": BUCKET, "Key": "pre/fix/c/x"})
    with pytest.raises(RepositoryError, match="does not exist") as ei:
        repo.open("c/x")
    assert not isinstance(ei.value, ObjectNotFound)


def test_open_reads_body(repo, stub):
    data = b"stored bytes" * 1000
    stub.add_response("get_object", {"Body": _body(data), "ContentLength": len(data)},
                      {"Bucket": BUCKET, "Key": "pre/fix/c/obj"})
    with repo.open("c/obj") as f:
        assert f.read(5) == data[:5]
        assert f.read() == data[5:]
        assert f.read(10) == b""


def test_get_bytes(repo, stub):
    stub.add_response("get_object", {"Body": _body(b"abc")}, {"Bucket": BUCKET, "Key": "pre/fix/k"})
    assert repo.get_bytes("k") == b"abc"


def test_exists_and_size(repo, stub):
    stub.add_response("head_object", {"ContentLength": 42}, {"Bucket": BUCKET, "Key": "pre/fix/c/a"})
    stub.add_client_error("head_object", service_error_code="404", http_status_code=404,
                          expected_params={"Bucket": BUCKET, "Key": "pre/fix/c/b"})
    stub.add_response("head_object", {"ContentLength": 42}, {"Bucket": BUCKET, "Key": "pre/fix/c/a"})
    stub.add_client_error("head_object", service_error_code="404", http_status_code=404,
                          expected_params={"Bucket": BUCKET, "Key": "pre/fix/c/b"})
    assert repo.exists("c/a") is True
    assert repo.exists("c/b") is False
    assert repo.size("c/a") == 42
    with pytest.raises(ObjectNotFound):
        repo.size("c/b")


def test_head_access_denied_is_not_missing(repo, stub):
    stub.add_client_error("head_object", service_error_code="403", http_status_code=403,
                          expected_params={"Bucket": BUCKET, "Key": "pre/fix/c/a"})
    with pytest.raises(RepositoryError, match="access denied"):
        repo.exists("c/a")


def test_list_strips_prefix_and_sorts(repo, stub):
    stub.add_response("list_objects_v2", {"Contents": [{"Key": "pre/fix/c/b/2"}, {"Key": "pre/fix/c/a/1"}],
                                          "IsTruncated": True, "NextContinuationToken": "t"},
                      {"Bucket": BUCKET, "Prefix": "pre/fix/c/"})
    stub.add_response("list_objects_v2", {"Contents": [{"Key": "pre/fix/c/0"}], "IsTruncated": False},
                      {"Bucket": BUCKET, "Prefix": "pre/fix/c/", "ContinuationToken": "t"})
    assert repo.list("c") == ["c/0", "c/a/1", "c/b/2"]


def test_list_root_and_empty(repo, stub):
    stub.add_response("list_objects_v2", {"Contents": [{"Key": "pre/fix/z"}]}, {"Bucket": BUCKET, "Prefix": "pre/fix/"})
    stub.add_response("list_objects_v2", {}, {"Bucket": BUCKET, "Prefix": "pre/fix/nothing/"})
    assert repo.list("") == ["z"]
    assert repo.list("nothing/") == []


def test_list_dirs(repo, stub):
    stub.add_response("list_objects_v2",
                      {"CommonPrefixes": [{"Prefix": "pre/fix/c/backups/B/"}, {"Prefix": "pre/fix/c/backups/A/"}]},
                      {"Bucket": BUCKET, "Prefix": "pre/fix/c/backups/", "Delimiter": "/"})
    assert repo.list_dirs("c/backups") == ["A", "B"]


def test_list_missing_bucket(repo, stub):
    stub.add_client_error("list_objects_v2", service_error_code="NoSuchBucket", http_status_code=404)
    with pytest.raises(RepositoryError, match="does not exist"):
        repo.list("c")


def test_delete_prefixed(repo, stub):
    stub.add_response("delete_object", {}, {"Bucket": BUCKET, "Key": "pre/fix/c/x"})
    repo.delete("c/x")


def test_delete_error_wrapped(repo, stub):
    stub.add_client_error("delete_object", service_error_code="AccessDenied", http_status_code=403)
    with pytest.raises(RepositoryError, match="access denied") as ei:
        repo.delete("c/x")
    assert "credentials" in str(ei.value)
    repo.origin = "cli"
    stub.add_client_error("delete_object", service_error_code="AccessDenied", http_status_code=403)
    with pytest.raises(RepositoryError, match="AWS_ACCESS_KEY_ID"):
        repo.delete("c/x")


def test_delete_prefix(repo, stub):
    stub.add_response("list_objects_v2", {"Contents": [{"Key": "pre/fix/p/1"}, {"Key": "pre/fix/p/2"}]},
                      {"Bucket": BUCKET, "Prefix": "pre/fix/p/"})
    stub.add_response("delete_object", {}, {"Bucket": BUCKET, "Key": "pre/fix/p/1"})
    stub.add_response("delete_object", {}, {"Bucket": BUCKET, "Key": "pre/fix/p/2"})
    assert repo.delete_prefix("p") == 2


class _FakeClient:
    """A tiny fake of the boto3 client surface S3Repository uses (no botocore at all)."""

    def __init__(self):
        self.objects = {}

    def upload_fileobj(self, f, bucket, key, Config=None):
        self.objects[(bucket, key)] = f.read()
        f.close()  # boto3 closes what it gets; the repository must survive it


def test_put_survives_upload_closing_its_source():
    fake = _FakeClient()
    r = S3Repository(fake, BUCKET, "p")
    src = io.BytesIO(b"x" * 1000)
    assert r.put("c/k", src) == 1000
    assert fake.objects == {(BUCKET, "p/c/k"): b"x" * 1000}
    assert not src.closed
