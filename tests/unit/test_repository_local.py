import errno
import io
import os

import pytest

from airflow_pg_incremental.core.codec import CHUNK
from airflow_pg_incremental.core.errors import (
    ConfigError,
    ObjectExists,
    ObjectNotFound,
    PgIncrError,
    RepositoryError,
    RepositoryNotFound,
)
from airflow_pg_incremental.core.repository import (
    LocalRepository,
    S3Repository,
    open_repository,
    validate_key,
)


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "repo").mkdir()  # the driver itself: a location without the repository marker
    return LocalRepository(tmp_path / "repo")


def _all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("key", ["a", "a/b", "main/backups/20261121T124048Z-F/base.tar.zst", "x.y_z-1/.hidden",
                                 "a/b/c/d/e/f"])
def test_validate_key_ok(key):
    assert validate_key(key) == key


@pytest.mark.parametrize("key", ["", "../x", "a/../b", "..", ".", "/abs", "a//b", "a/./b", "a\\b", "a/", "a b",
                                 " a", "a/b c/d", "a\nb", "a\x00b", "ü", "a:b", None, 5, b"a"])
def test_validate_key_rejects(key):
    with pytest.raises(ConfigError):
        validate_key(key)


def test_put_get_exists_size(repo):
    data = os.urandom(3 * CHUNK + 5)
    assert repo.put("c/backups/b1/base.tar.zst", io.BytesIO(data)) == len(data)
    assert repo.exists("c/backups/b1/base.tar.zst")
    assert not repo.exists("c/backups/b1/other")
    assert not repo.exists("c/backups/b1")  # a directory is not an object
    assert repo.size("c/backups/b1/base.tar.zst") == len(data)
    assert repo.get_bytes("c/backups/b1/base.tar.zst") == data
    with repo.open("c/backups/b1/base.tar.zst") as f:
        assert f.read(10) == data[:10]
    assert (repo.root / "c/backups/b1/base.tar.zst").read_bytes() == data
    assert repo.url == f"file://{repo.root}"


def test_put_overwrite_default_replaces(repo):
    repo.put_bytes("k/v", b"one")
    assert repo.put_bytes("k/v", b"two!") == 4
    assert repo.get_bytes("k/v") == b"two!"


def test_put_no_overwrite_on_existing_raises_and_keeps_content(repo):
    repo.put_bytes("k/v", b"original")
    with pytest.raises(ObjectExists, match="k/v"):
        repo.put_bytes("k/v", b"replacement", overwrite=False)
    assert repo.get_bytes("k/v") == b"original"
    assert repo.list("") == ["k/v"]
    assert _all_files(repo.root) == ["k/v"]  # no temp file left behind
    # a new key with overwrite=False works
    repo.put_bytes("k/w", b"new", overwrite=False)
    assert repo.get_bytes("k/w") == b"new"


def test_put_empty_object(repo):
    assert repo.put_bytes("e", b"") == 0
    assert repo.exists("e") and repo.size("e") == 0 and repo.get_bytes("e") == b""


def test_list_and_list_dirs(repo):
    for k in ["b/backups/2/x", "a/backups/1/y", "a/backups/1/z/deep", "a/backups/3/w", "top"]:
        repo.put_bytes(k, k.encode())
    assert repo.list("") == ["a/backups/1/y", "a/backups/1/z/deep", "a/backups/3/w", "b/backups/2/x", "top"]
    assert repo.list("a") == ["a/backups/1/y", "a/backups/1/z/deep", "a/backups/3/w"]
    assert repo.list("a/") == repo.list("a")
    assert repo.list("a/backups/1") == ["a/backups/1/y", "a/backups/1/z/deep"]
    assert repo.list("missing") == []
    assert repo.list("top") == []  # an object is not a prefix
    assert repo.list_dirs("") == ["a", "b"]
    assert repo.list_dirs("a/backups") == ["1", "3"]
    assert repo.list_dirs("a/backups/1") == ["z"]
    assert repo.list_dirs("nope") == []


def test_list_on_missing_root(tmp_path):
    r = LocalRepository(tmp_path / "does-not-exist")
    assert r.list("") == [] and r.list_dirs("") == []


def test_list_rejects_bad_prefix(repo):
    with pytest.raises(ConfigError):
        repo.list("../x")
    with pytest.raises(ConfigError):
        repo.list_dirs("a/../..")


def test_delete_prunes_empty_parents(repo):
    repo.put_bytes("c/backups/b1/one", b"1")
    repo.put_bytes("c/backups/b1/two", b"2")
    repo.put_bytes("c/backups/b2/three", b"3")
    repo.delete("c/backups/b1/one")
    assert (repo.root / "c/backups/b1").is_dir()  # not empty yet
    repo.delete("c/backups/b1/two")
    assert not (repo.root / "c/backups/b1").exists()
    assert repo.list_dirs("c/backups") == ["b2"]
    repo.delete("c/backups/b2/three")
    assert not (repo.root / "c").exists()
    assert repo.root.is_dir()  # the root itself stays
    assert repo.list("") == []


def test_delete_missing_is_not_an_error(repo):
    repo.delete("nothing/here")
    repo.put_bytes("a", b"x")
    repo.delete("a")
    repo.delete("a")
    assert not repo.exists("a")


def test_delete_prefix(repo):
    for k in ["p/1", "p/2/3", "q/4"]:
        repo.put_bytes(k, b"x")
    assert repo.delete_prefix("p") == 3 - 1
    assert repo.list("") == ["q/4"]


def test_open_and_size_missing(repo):
    with pytest.raises(ObjectNotFound, match="nope/x"):
        repo.open("nope/x")
    with pytest.raises(ObjectNotFound):
        repo.size("nope/x")
    with pytest.raises(ObjectNotFound):
        repo.get_bytes("nope/x")
    # ObjectNotFound is a KeyError but prints without quotes
    try:
        repo.open("nope/x")
    except KeyError as e:
        assert str(e).startswith("object nope/x not found")


@pytest.mark.parametrize("key", ["../escape", "/etc/passwd", "a//b", "a/./b", "a\\b", "a b"])
def test_every_operation_validates_keys(repo, tmp_path, key):
    for op in (lambda: repo.put_bytes(key, b"x"), lambda: repo.open(key), lambda: repo.exists(key),
               lambda: repo.size(key), lambda: repo.delete(key)):
        with pytest.raises(ConfigError):
            op()
    assert not (tmp_path / "escape").exists()


class _Exploding(io.RawIOBase):
    def __init__(self, good: int, exc: Exception):
        self.left = good
        self.exc = exc

    def readable(self):
        return True

    def read(self, n=-1):
        if self.left <= 0:
            raise self.exc
        take = min(self.left, n if n and n > 0 else self.left)
        self.left -= take
        return b"x" * take


@pytest.mark.parametrize("exc", [RuntimeError("source died"), OSError(5, "Input/output error")])
def test_failed_reader_leaves_nothing(repo, exc):
    repo.put_bytes("c/keep", b"keep")
    # the source's own error (or a RepositoryError wrapping it) reaches the caller
    with pytest.raises((type(exc), RepositoryError)):
        repo.put("c/b/obj", _Exploding(2 * CHUNK + 3, exc))
    assert not repo.exists("c/b/obj")
    assert repo.list("") == ["c/keep"]
    # no temp file either, not even a hidden one
    assert [f for f in _all_files(repo.root) if "tmp" in f] == []


def test_failed_reader_does_not_clobber_existing(repo):
    repo.put_bytes("c/obj", b"old")
    with pytest.raises(RuntimeError):
        repo.put("c/obj", _Exploding(10, RuntimeError("boom")))
    assert repo.get_bytes("c/obj") == b"old"


def test_os_error_from_reader_is_reported(repo):
    with pytest.raises((OSError, RepositoryError)) as ei:
        repo.put("c/obj", _Exploding(10, OSError(5, "Input/output error")))
    assert "Input/output error" in str(ei.value)
    assert not repo.exists("c/obj")


def test_list_hides_temp_files(repo):
    repo.put_bytes("c/real", b"x")
    (repo.root / "c" / ".real.tmp-0123456789ab").write_bytes(b"partial")
    assert repo.list("") == ["c/real"]


def test_root_under_regular_file(tmp_path):
    f = tmp_path / "plain-file"
    f.write_bytes(b"not a dir")
    r = LocalRepository(f / "repo")
    with pytest.raises(RepositoryError) as ei:
        r.put_bytes("c/x", b"data")
    msg = str(ei.value)
    assert str(f / "repo") in msg and "writing c/x" in msg
    with pytest.raises(RepositoryError):
        r.check_writable()
    assert f.read_bytes() == b"not a dir"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_root(tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o500)
    try:
        with pytest.raises(RepositoryError, match="not writable"):
            LocalRepository(root).check_writable()
    finally:
        root.chmod(0o700)


def test_check_writable_ok_and_leaves_nothing(tmp_path):
    r = LocalRepository(tmp_path / "new" / "repo")
    with pytest.raises(RepositoryNotFound):
        r.check_writable()  # never creates a repository implicitly
    assert not r.root.exists()
    r.create()
    r.check_writable()
    assert [p.name for p in r.root.iterdir()] == ["pgincr-repository.json"]


def test_relative_root_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = LocalRepository("rel")
    assert r.root == tmp_path / "rel"
    (tmp_path / "rel").mkdir()
    r.put_bytes("a", b"1")
    assert (tmp_path / "rel" / "a").read_bytes() == b"1"


def test_open_repository_local(tmp_path):
    r = open_repository(str(tmp_path))
    assert isinstance(r, LocalRepository) and r.root == tmp_path
    r2 = open_repository(f"file://{tmp_path}")
    assert isinstance(r2, LocalRepository) and r2.root == tmp_path


@pytest.mark.parametrize("url", ["relative/path", "file://relative", "ftp://x", "http://host/x", "", None,
                                 "s3://", "s3:///prefix"])
def test_open_repository_rejects(url):
    with pytest.raises(ConfigError):
        open_repository(url, s3_client=object())


def test_open_repository_s3():
    client = object()
    r = open_repository("s3://bucket/pre/fix", s3_client=client)
    assert isinstance(r, S3Repository)
    assert r.bucket == "bucket" and r.prefix == "pre/fix" and r.client is client
    assert r.url == "s3://bucket/pre/fix"
    assert r._key("c/x") == "pre/fix/c/x"
    r = open_repository("s3://bucket", s3_client=client)
    assert r.prefix == "" and r.url == "s3://bucket" and r._key("c/x") == "c/x"
    r = open_repository("s3://bucket/pre/", s3_client=client)
    assert r.prefix == "pre"


def test_open_repository_s3_bad_prefix():
    with pytest.raises(PgIncrError):
        open_repository("s3://bucket/../other", s3_client=object())


@pytest.mark.parametrize("err,text", [(errno.ENOSPC, "disk full"), (errno.EACCES, "not writable"),
                                      (errno.EROFS, "not writable")])
def test_write_errors_explained_and_cleaned_up(repo, monkeypatch, err, text):
    repo.put_bytes("c/existing", b"keep")

    def failing_fsync(fd):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(RepositoryError, match=text) as ei:
        repo.put_bytes("c/new", b"x" * 1000)
    assert "c/new" in str(ei.value)
    monkeypatch.undo()
    assert repo.list("") == ["c/existing"]
    assert _all_files(repo.root) == ["c/existing"]
