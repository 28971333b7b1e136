import json

import pytest

from airflow_pg_incremental.core.errors import ConfigError, InvalidName
from airflow_pg_incremental.dag_factory import DEFAULT_SCHEDULES, ClusterConfig, load_config, parse_config


def _cl(**kw):
    d = {"name": "main", "postgres_conn_id": "pg_main", "repository": "/srv/backups"}
    d.update(kw)
    return d


def test_valid_config_with_defaults():
    raw = {
        "defaults": {"catalog_conn_id": "cat", "compression_level": 7, "schedules": {"weekly_full": "0 3 * * 6"}},
        "clusters": [
            _cl(),
            _cl(name="eu-2", repository="s3://pg-backups/prod", aws_conn_id="aws_backups",
                schedules={"weekly_full": "0 1 * * 0"}, compression_level=1, tags=["eu"]),
            _cl(name="us.1", repository="s3://pg-backups"),
            _cl(name="f", repository="file:///var/backups"),
        ],
    }
    out = parse_config(raw)
    assert [c.name for c in out] == ["main", "eu-2", "us.1", "f"]
    assert all(isinstance(c, ClusterConfig) for c in out)
    main, eu, us, f = out
    assert main.catalog_conn_id == "cat" and main.compression_level == 7
    assert main.schedules == {"weekly_full": "0 3 * * 6", "daily_incremental": "0 2 * * 1-6", "hourly_wal": "5 * * * *",
                              "restore_test": "30 6 * * *", "retention": "0 5 * * *"}
    assert main.aws_conn_id is None
    assert eu.aws_conn_id == "aws_backups" and eu.compression_level == 1 and eu.tags == ["eu"]
    assert eu.schedules["weekly_full"] == "0 1 * * 0" and eu.schedules["hourly_wal"] == "5 * * * *"
    assert us.aws_conn_id == "aws_default"
    assert f.repository == "file:///var/backups"
    assert main.dag_prefix == "pgincr_main"
    assert eu.engine_kwargs() == {"cluster": "eu-2", "postgres_conn_id": "pg_main", "repository":
                                  "s3://pg-backups/prod", "aws_conn_id": "aws_backups", "catalog_conn_id": "cat",
                                  "catalog_schema": "pgincr"}
    # the input is not modified
    assert "aws_conn_id" not in raw["clusters"][2]


def test_minimal_config_defaults():
    (c,) = parse_config({"clusters": [_cl()]})
    assert c.schedules == DEFAULT_SCHEDULES and c.schedules is not DEFAULT_SCHEDULES
    assert c.catalog_schema == "pgincr" and c.owner == "dba" and c.retries == 1


@pytest.mark.parametrize("raw", [None, [], {}, {"clusters": []}, {"clusters": {}}, {"clusters": "main"},
                                 {"defaults": {}}])
def test_missing_clusters(raw):
    with pytest.raises(ConfigError, match="clusters"):
        parse_config(raw)


def test_cluster_entry_must_be_mapping():
    with pytest.raises(ConfigError, match=r"clusters\[1\]"):
        parse_config({"clusters": [_cl(), "other"]})


def test_duplicate_names():
    with pytest.raises(ConfigError, match="listed twice"):
        parse_config({"clusters": [_cl(), _cl(repository="/other")]})


@pytest.mark.parametrize("name", ["a/b", "../x", ".hidden", "a b", "x" * 64])
def test_bad_cluster_name(name):
    with pytest.raises((ConfigError, InvalidName)) as ei:
        parse_config({"clusters": [_cl(name=name)]})
    assert isinstance(ei.value, ValueError)


def test_unknown_key():
    with pytest.raises(ConfigError, match="schedule") as ei:
        parse_config({"clusters": [_cl(schedule="@daily")]})
    assert "unknown keys ['schedule']" in str(ei.value)
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_config({"defaults": {"pasword": "x"}, "clusters": [_cl()]})


@pytest.mark.parametrize("missing", ["name", "postgres_conn_id", "repository"])
def test_required_keys(missing):
    entry = _cl()
    del entry[missing]
    with pytest.raises(ConfigError, match=f"'{missing}' is required"):
        parse_config({"clusters": [entry]})


@pytest.mark.parametrize("repo", ["relative/dir", "backups", "file://relative", "ftp://host/x", "./x", "~/b"])
def test_bad_repository(repo):
    with pytest.raises(ConfigError, match="repository"):
        parse_config({"clusters": [_cl(repository=repo)]})


@pytest.mark.parametrize("raw", [
    {"clusters": [_cl(repository=123)]},
    {"clusters": [_cl(schedules="0 2 * * 0")]},
    {"defaults": ["x"], "clusters": [_cl()]},
])
def test_wrong_types_are_config_errors(raw):
    with pytest.raises(ConfigError):
        parse_config(raw)


def test_load_config_json_and_yaml(tmp_path):
    raw = {"clusters": [_cl(repository="s3://b/p")]}
    j = tmp_path / "c.json"
    j.write_text(json.dumps(raw))
    y = tmp_path / "c.yaml"
    y.write_text("clusters:\n  - name: main\n    postgres_conn_id: pg_main\n    repository: s3://b/p\n")
    for p in (j, y):
        (c,) = load_config(p)
        assert c.name == "main" and c.aws_conn_id == "aws_default"


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_load_config_empty_yaml(tmp_path):
    p = tmp_path / "empty.yml"
    p.write_text("")
    with pytest.raises(ConfigError, match="clusters"):
        load_config(p)


@pytest.mark.parametrize("fname,text", [("c.json", "{bad"), ("c.yaml", "clusters: [")])
def test_load_config_malformed(tmp_path, fname, text):
    p = tmp_path / fname
    p.write_text(text)
    with pytest.raises(ConfigError, match=fname):
        load_config(p)


def test_full_mode_defaults_to_server_and_is_validated():
    (c,) = parse_config({"clusters": [_cl()]})
    assert c.full_mode == "server"
    (c,) = parse_config({"defaults": {"full_mode": "synthetic"}, "clusters": [_cl()]})
    assert c.full_mode == "synthetic"
    for bad in ("Synthetic", "incremental", 1, None):
        with pytest.raises(ConfigError, match="full_mode must be 'server'.*'synthetic'"):
            parse_config({"clusters": [_cl(full_mode=bad)]})


def test_weekly_dag_of_each_full_mode():
    """server: preflight -> full_backup; synthetic: preflight -> incremental -> synthetic_full, the
    WAL wait and the verification following the synthetic full's XCom; the doc says which."""
    from airflow_pg_incremental.dag_factory import build_weekly_full

    server, syn = (build_weekly_full(c) for c in parse_config({"clusters": [
        _cl(), _cl(name="s", full_mode="synthetic", scratch_dir="/srv/scratch")]}))
    assert [t.task_id for t in server.topological_sort()][:2] == ["preflight", "full_backup"]
    assert [t.task_id for t in syn.topological_sort()][:3] == ["preflight", "incremental_backup", "synthetic_full"]
    tasks = {t.task_id: t for t in syn.tasks}
    assert tasks["synthetic_full"].incremental_task_id == "incremental_backup"
    assert tasks["synthetic_full"].scratch_dir == "/srv/scratch"
    assert "synthetic_full" in tasks["wal_archived"].segment and "synthetic_full" in tasks["verify"].backup_id
    assert "full_mode: synthetic" in syn.doc_md and "full_mode: server" in server.doc_md
