"""What a started server (and the restore_command it runs) inherits: nothing of ours but locale,
time zone and paths, plus exactly what the caller passes (for an S3 repository: the credentials,
endpoint, certificates and proxies the restore_command needs). The real-server check, a postmaster's
/proc/<pid>/environ, is in tests/integration/test_pitr_edges.py."""

from __future__ import annotations

import boto3

from airflow_pg_incremental.core.pitr import S3_REACH_ENV, repo_env
from airflow_pg_incremental.core.repository import LocalRepository, S3Repository
from airflow_pg_incremental.core.server import server_environment


def test_server_environment_is_an_allow_list(monkeypatch):
    for k, v in {"PGPASSWORD": "pw", "AWS_SECRET_ACCESS_KEY": "k", "AIRFLOW_CONN_X": "postgres://u:p@h/d",
                 "PYTHONPATH": "/x", "HOME": "/root", "LC_ALL": "C.UTF-8", "TZ": "Europe/Berlin", "PATH": "/bin"}.items():
        monkeypatch.setenv(k, v)
    env = server_environment({"AWS_ACCESS_KEY_ID": "given"})
    assert (env["PATH"], env["LC_ALL"], env["TZ"], env["AWS_ACCESS_KEY_ID"]) == ("/bin", "C.UTF-8", "Europe/Berlin",
                                                                                 "given")
    assert not {"PGPASSWORD", "AWS_SECRET_ACCESS_KEY", "AIRFLOW_CONN_X", "PYTHONPATH", "HOME"} & set(env)


def test_local_repository_passes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "k")
    assert repo_env(LocalRepository(tmp_path)) == {}


def test_s3_repository_passes_what_reaching_it_needs(monkeypatch):
    for k in S3_REACH_ENV:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_CA_BUNDLE", "/etc/ssl/corp.pem")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")
    monkeypatch.setenv("PGPASSWORD", "pw")
    client = boto3.session.Session().client("s3", endpoint_url="http://127.0.0.1:9", region_name="eu-west-1",
                                            aws_access_key_id="AKIDTEST", aws_secret_access_key="SECRETTEST")
    env = repo_env(S3Repository(client, "b", "p"))
    assert env == {"PGINCR_S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_DEFAULT_REGION": "eu-west-1",
                   "AWS_ACCESS_KEY_ID": "AKIDTEST", "AWS_SECRET_ACCESS_KEY": "SECRETTEST",
                   "AWS_CA_BUNDLE": "/etc/ssl/corp.pem", "HTTPS_PROXY": "http://proxy:3128"}
