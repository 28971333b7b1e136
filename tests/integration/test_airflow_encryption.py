"""Encryption at rest through real Airflow runs: a cluster with `encryption_key_conn_id` (the key in
a connection's password) and `create_repository`: the weekly DAG creates an encrypted repository,
backs up, waits for the WAL (deferrable sensor: the trigger opens the repository too) and verifies;
the restore test (a PITR: restore_command gets the key through the server's environment) passes;
nothing is stored in clear, and the key appears in no log, XCom, catalog row or file of the Airflow
home. Without the key connection's password, the run fails before anything is written."""

from __future__ import annotations

import base64
import json
import logging
import os
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KEY = os.urandom(32)
KEY_TEXT = base64.b64encode(KEY).decode()


def _dags():
    from airflow_pg_incremental.dag_factory import dags_from_config_file

    return dags_from_config_file(os.environ["PGINCR_CONFIG"])


@pytest.fixture
def enc_cluster(airflow_clusters, pg, workdir):
    cfg_path = Path(os.environ["PGINCR_CONFIG"])
    cfg = json.loads(cfg_path.read_text())
    repo_dir = workdir / f"af-enc-{uuid.uuid4().hex[:6]}"
    entry = {"name": "it_enc", "postgres_conn_id": "pgincr_it_pg", "repository": str(repo_dir),
             "encryption_key_conn_id": "pgincr_it_enc_key", "create_repository": True, "slot_name": "pgincr_it_enc"}
    cfg["clusters"] = [c for c in cfg["clusters"] if c["name"] != "it_enc"] + [entry]
    cfg_path.write_text(json.dumps(cfg))
    os.environ["AIRFLOW_CONN_PGINCR_IT_ENC_KEY"] = json.dumps({"conn_type": "generic", "password": KEY_TEXT})
    try:
        yield {"repo_dir": repo_dir, "cfg": cfg, "cfg_path": cfg_path}
    finally:
        cfg["clusters"] = [c for c in cfg["clusters"] if c["name"] != "it_enc"]
        cfg_path.write_text(json.dumps(cfg))
        os.environ.pop("AIRFLOW_CONN_PGINCR_IT_ENC_KEY", None)
        pg.psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = 'pgincr_it_enc'")


def test_encrypted_cluster_through_airflow(enc_cluster, pg, workdir, scratch, capfd, caplog, monkeypatch):
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    from airflow_pg_incremental.core.pgconn import query
    from airflow_pg_incremental.core.repository import LocalRepository
    from airflow_pg_incremental.core.repository.base import MARKER_KEY
    from airflow_pg_incremental.core.repository.crypt import MAGIC, Keyring
    from airflow_pg_incremental.core.restore import restore_backup, start_restored
    from airflow_pg_incremental.sandbox import data_fingerprint

    caplog.set_level(logging.DEBUG)
    dags = _dags()
    dr = dags["pgincr_it_enc_weekly_full"].test()
    assert dr.state == "success"
    repo = LocalRepository(enc_cluster["repo_dir"])
    marker = json.loads((enc_cluster["repo_dir"] / MARKER_KEY).read_text())
    assert marker["encryption"]["cipher"] == "aes-256-gcm-stream"
    keys = [k for k in repo.list("") if k != MARKER_KEY]
    assert keys and all(repo._open(k).read(len(MAGIC)) == MAGIC for k in keys)

    assert dags["pgincr_it_enc_restore_test_on_backup"].test().state == "success"
    with create_session() as s:
        x = {r.task_id: XComModel.deserialize_value(r) for r in s.query(XComModel).filter(
            XComModel.dag_id == "pgincr_it_enc_restore_test_on_backup").all()}
    assert x["restore_test"]["ok"], x

    # what Airflow stored restores with the key
    bid = [k for k in keys if k.endswith("backup.json")][0].split("/")[2]
    before = data_fingerprint(pg.superuser())
    restore_backup(repo.use_keyring(Keyring(KEY)), "it_enc", bid, scratch / "d", os_user=pg.os_user)
    srv = start_restored(scratch / "d", 18, os_user=pg.os_user)
    try:
        fp = data_fingerprint(srv.local_conninfo())
        assert fp.keys() == before.keys()
    finally:
        srv.stop()

    # the key appears nowhere
    secrets = [KEY_TEXT.encode(), KEY.hex().encode(), KEY]
    out, err = capfd.readouterr()
    task_log = out + err + caplog.text
    assert "full backup" in task_log
    hits = [f"task log ({len(s)} characters)" for s in (KEY_TEXT, KEY.hex()) if s in task_log]
    for p in (workdir / "airflow").rglob("*"):
        if p.is_file() and p.suffix != ".db":
            data = p.read_bytes()
            hits += [str(p) for s in secrets if s in data]
    for p in enc_cluster["repo_dir"].rglob("*"):
        if p.is_file():
            data = p.read_bytes()
            hits += [str(p) for s in secrets if s in data]
    with create_session() as s:
        for r in s.query(XComModel).all():
            blob = json.dumps(XComModel.deserialize_value(r), default=str).encode()
            hits += [f"xcom {r.dag_id}.{r.task_id}" for s_ in secrets[:2] if s_ in blob]
    rows = query(pg.conninfo("pgincr_catalog"), "SELECT t::text FROM af_catalog.backups t")
    hits += [f"catalog row {r[0][:40]}" for r in rows if KEY_TEXT in r[0] or KEY.hex() in r[0]]
    assert hits == []

    # a key connection without a password: refused before anything is written
    before_keys = sorted(repo.list(""))
    monkeypatch.setenv("AIRFLOW_CONN_PGINCR_IT_ENC_KEY", json.dumps({"conn_type": "generic"}))
    dr = _dags()["pgincr_it_enc_weekly_full"].test()
    assert dr.state == "failed"
    assert {ti.task_id: ti.state for ti in dr.get_task_instances()}["preflight"] == "failed"
    assert sorted(repo.list("")) == before_keys
    out, err = capfd.readouterr()
    assert "holds no key" in out + err + caplog.text
