"""A repository has an identity: a marker written when it is created. A location without one is
never read as an empty repository, and nothing creates a repository implicitly."""

from __future__ import annotations

import json
import os
import stat

import pytest

from airflow_pg_incremental.core.errors import (
    ClusterNotFound,
    ConfigError,
    RepositoryError,
    RepositoryNotFound,
)
from airflow_pg_incremental.core.metadata import require_cluster
from airflow_pg_incremental.core.repository import (
    MARKER_KEY,
    LocalRepository,
    open_repository,
)


def test_missing_directory_is_not_an_empty_repository(tmp_path):
    repo = LocalRepository(tmp_path / "nonexistent")
    with pytest.raises(RepositoryNotFound, match="does not exist") as e:
        repo.identity()
    assert "pgincr repo-create" in str(e.value)
    with pytest.raises(RepositoryNotFound):
        repo.check_writable()
    assert not (tmp_path / "nonexistent").exists()  # nothing created


def test_create_is_explicit_and_idempotent(tmp_path):
    repo = LocalRepository(tmp_path / "r")
    marker, created = repo.create()
    assert created and marker["format"] == 1 and marker["kind"] == "pgincr-repository"
    again, created2 = LocalRepository(tmp_path / "r").create()
    assert not created2 and again["repository_id"] == marker["repository_id"]
    assert json.loads((tmp_path / "r" / MARKER_KEY).read_bytes())["repository_id"] == marker["repository_id"]
    LocalRepository(tmp_path / "r").check_writable()


def test_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        repo = LocalRepository(tmp_path / "r")
        repo.create()
        repo.put_bytes("c/backups/b/x.zst", b"data")
    finally:
        os.umask(old)
    for p in (tmp_path / "r", tmp_path / "r" / "c", tmp_path / "r" / "c" / "backups" / "b"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    for p in (tmp_path / "r" / MARKER_KEY, tmp_path / "r" / "c" / "backups" / "b" / "x.zst"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p


def test_one_level_too_deep_names_the_real_repository(tmp_path):
    repo = LocalRepository(tmp_path / "r")
    repo.create()
    repo.put_bytes("main/wal/00000001/000000010000000000000001.zst", b"x")
    deep = LocalRepository(tmp_path / "r" / "main")
    with pytest.raises(RepositoryNotFound, match=r"inside the repository file://.*/r: did you mean --repo .*/r "
                                                 r"--cluster main"):
        deep.identity()
    with pytest.raises(RepositoryError, match="cannot hold another"):
        deep.create()


def test_non_empty_foreign_directory_is_refused(tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "notes.txt").write_text("mine")
    repo = LocalRepository(tmp_path / "r")
    with pytest.raises(RepositoryNotFound, match="not a pgincr repository"):
        repo.identity()
    with pytest.raises(RepositoryError, match="not empty"):
        repo.create()
    assert sorted(os.listdir(tmp_path / "r")) == ["notes.txt"]


def test_repository_of_an_earlier_version_is_adopted_explicitly(tmp_path):
    (tmp_path / "r" / "main" / "backups").mkdir(parents=True)
    (tmp_path / "r" / "main" / "wal").mkdir()
    repo = LocalRepository(tmp_path / "r")
    with pytest.raises(RepositoryNotFound, match="written before repositories carried an identity marker"):
        repo.identity()
    marker, created = repo.create()
    assert created and marker["adopted_clusters"] == ["main"]


def test_damaged_or_newer_marker(tmp_path):
    repo = LocalRepository(tmp_path / "r")
    repo.create()
    (tmp_path / "r" / MARKER_KEY).write_text("{not json")
    with pytest.raises(RepositoryError, match="damaged"):
        LocalRepository(tmp_path / "r").identity()
    (tmp_path / "r" / MARKER_KEY).write_text(json.dumps({"kind": "pgincr-repository", "format": 99}))
    with pytest.raises(RepositoryError, match="newer"):
        LocalRepository(tmp_path / "r").identity()


def test_unknown_cluster_lists_the_known_ones(tmp_path):
    repo = LocalRepository(tmp_path / "r")
    repo.create()
    with pytest.raises(ClusterNotFound, match="holds no cluster yet"):
        require_cluster(repo, "main")
    repo.put_bytes("main/wal/00000001/000000010000000000000001.zst", b"x")
    require_cluster(repo, "main")
    with pytest.raises(ClusterNotFound, match="its clusters: main"):
        require_cluster(repo, "mian")


@pytest.mark.parametrize("url,msg", [("s3:/bucket/p", "malformed S3"), ("s3://", "names no bucket"),
                                     ("http://x/y", "unsupported"), ("relative/dir", "must be absolute")])
def test_malformed_urls(url, msg):
    with pytest.raises(ConfigError, match=msg):
        open_repository(url)
