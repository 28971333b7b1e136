"""core.verify on synthetic backups in a local repository (pg_verifybackup replaced by small
scripts): object damage named by key, staging removed, chain selection, skips through the catalog,
WAL range and tail checks, metadata damage; the operator's failure/return contract."""

from __future__ import annotations

import io
import os
import stat
import struct
import tarfile
from pathlib import Path

import pytest

from airflow_pg_incremental.core import verify as V
from airflow_pg_incremental.core.codec import CompressingReader, compress_bytes
from airflow_pg_incremental.core.errors import BackupNotFound, ConfigError
from airflow_pg_incremental.core.metadata import META_NAME, backup_prefix, write_meta
from airflow_pg_incremental.core.wal import wal_key
from tests.unit.fakes import new_repo

SEG = 16 * 1024 * 1024
CL = "vc"
SYSID = 7712132246622886859


class FakeCatalog:
    def __init__(self):
        self.rows = []

    def record_verification(self, **row):
        self.rows.append(row)
        return len(self.rows)

    def last_verification(self, cluster, backup_id):
        rows = [r for r in self.rows if r["cluster"] == cluster and r["backup_id"] == backup_id]
        return rows[-1] if rows else None


def _script(path: Path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.fixture
def env(tmp_path, monkeypatch):
    repo = new_repo(tmp_path / "repo")
    stage = tmp_path / "stage"
    stage.mkdir()
    progs = {"ok": _script(tmp_path / "vb_ok", "exit 0"),
             "bad": _script(tmp_path / "vb_bad", 'echo "pg_verifybackup: error: \\"base/5/1259\\" has checksum '
                                                  'mismatch" >&2; exit 1'),
             # fails while parsing WAL, passes with --no-parse-wal
             "nowal": _script(tmp_path / "vb_nowal", 'for a in "$@"; do [ "$a" = --no-parse-wal ] && exit 0; done; '
                                                     'echo "pg_verifybackup: error: WAL parsing failed" >&2; exit 1')}
    state = {"prog": progs["ok"], "calls": []}

    def find_program(name, major):
        assert name == "pg_verifybackup" and major == 18
        return state["prog"]

    orig_run = V._run

    def run(cmd):
        state["calls"].append(cmd)
        assert Path(cmd[-1]).is_dir() and Path(cmd[-1]).parent == stage
        assert (Path(cmd[-1]) / "PG_VERSION").read_text() == "18\n"  # extracted before the run
        return orig_run(cmd)

    monkeypatch.setattr(V, "find_program", find_program)
    monkeypatch.setattr(V, "_run", run)
    return {"repo": repo, "stage": stage, "progs": progs, "state": state}


def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in files.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def _put(repo, key, data: bytes) -> dict:
    r = CompressingReader(io.BytesIO(data), raw_hasher=False)  # as backups store them: no content SHA-256
    repo.put(key, r)
    return r.info(key).to_dict()


def _backup(repo, bid, *, kind="full", parent=None, segno=3, nseg=1, started="2026-01-01T00:00:00"):
    prefix = backup_prefix(CL, bid)
    base = _tar({"PG_VERSION": b"18\n", "base/1/1259": os.urandom(40000), "backup_manifest": b"{}"})
    objects = [_put(repo, f"{prefix}/base.tar.zst", base), _put(repo, f"{prefix}/backup_manifest.zst", b"{}" * 500)]
    meta = {"format": 1, "cluster": CL, "backup_id": bid, "kind": kind,
            "parent_id": parent["backup_id"] if parent else None,
            "chain_root_id": (parent.get("chain_root_id") or parent["backup_id"]) if parent else bid,
            "status": "complete", "started_at": started, "pg_major": 18, "timeline": 1, "wal_segment_size": SEG,
            "system_identifier": str(SYSID),
            "start_lsn": f"0/{segno * SEG + 0x28:X}", "stop_lsn": f"0/{(segno + nseg - 1) * SEG + 0x120:X}",
            "start_wal_file": f"00000001000000000000{segno:04X}",
            "stop_wal_file": f"00000001000000000000{segno + nseg - 1:04X}", "objects": objects}
    write_meta(repo, meta)
    return meta


def _segment(segno, *, tli=1, sysid=SYSID, pageaddr=None, magic=0xD118) -> bytes:
    """A WAL segment as PostgreSQL 18 writes it: its long page header, then (here) zeros."""
    header = struct.pack("<HHIQI4xQII", magic, 0x0002, tli, segno * SEG if pageaddr is None else pageaddr, 0,
                         sysid, SEG, 8192)
    return header + bytes(SEG - len(header))


def _wal(repo, *segnos, **kw):
    for s in segnos:
        repo.put_bytes(wal_key(CL, f"00000001000000000000{s:04X}"), compress_bytes(_segment(s, **kw)))


def _flip(repo, key, at=None):
    p = repo.root / key
    data = bytearray(p.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x55
    p.write_bytes(bytes(data))


def test_good_backup_verifies_and_is_recorded(env):
    repo = env["repo"]
    m = _backup(repo, "20260101T000000Z-F")
    _wal(repo, 2, 3, 4, 5)
    cat = FakeCatalog()
    res = V.verify_backup(repo, CL, m["backup_id"], catalog=cat, staging_parent=env["stage"],
                          airflow={"dag_id": "d", "run_id": "r"})
    assert res["verified"] == [m["backup_id"]] and res["failed"] == [] and res["skipped"] == []
    checks = {c["name"]: c for c in res["results"][0]["checks"]}
    assert list(checks) == ["objects", "pg_verifybackup", "wal", "wal_objects"]
    assert all(c["ok"] for c in checks.values())
    # every segment from its start to the newest archived one was read (not segment 2, before its start)
    assert checks["wal_objects"]["segments"] == 3 and "000000010000000000000003 .. 000000010000000000000005" in \
        checks["wal_objects"]["detail"]
    assert [o["key"] for o in checks["objects"]["objects"]] == [o["key"] for o in m["objects"]]
    assert "newest on timeline 1" in checks["wal"]["detail"] and "000000010000000000000005" in checks["wal"]["detail"]
    assert env["state"]["calls"][0][:2] == [env["progs"]["ok"], "--quiet"]  # WAL parsing on for a full
    row = cat.rows[0]
    assert row["ok"] is True and row["error"] is None and row["dag_id"] == "d" and row["run_id"] == "r"
    assert row["cluster"] == CL and row["backup_id"] == m["backup_id"] and row["duration_s"] >= 0
    assert list(env["stage"].iterdir()) == []  # staging removed


@pytest.mark.parametrize("obj", ["base.tar.zst", "backup_manifest.zst"])
def test_flipped_byte_names_the_object_and_staging_is_removed(env, obj):
    repo = env["repo"]
    m = _backup(repo, "20260101T000000Z-F")
    _wal(repo, 3)
    key = f"{backup_prefix(CL, m['backup_id'])}/{obj}"
    _flip(repo, key)
    cat = FakeCatalog()
    res = V.verify_backup(repo, CL, None, catalog=cat, staging_parent=env["stage"])
    assert res["verified"] == []
    assert [(f["backup_id"], f["check"]) for f in res["failed"]] == [(m["backup_id"], "objects")]
    msg = res["failed"][0]["message"]
    assert key in msg and m["backup_id"] in msg
    checks = {c["name"]: c for c in res["results"][0]["checks"]}
    assert {o["key"]: o["ok"] for o in checks["objects"]["objects"]}[key] is False
    if obj == "base.tar.zst":
        assert checks["pg_verifybackup"]["ok"] is None and env["state"]["calls"] == []  # not run on damaged data
    else:
        assert checks["pg_verifybackup"]["ok"] is True
    assert checks["wal"]["ok"] is True
    assert cat.rows[0]["ok"] is False and key in cat.rows[0]["error"]
    assert list(env["stage"].iterdir()) == []


def test_missing_and_truncated_objects(env):
    repo = env["repo"]
    m = _backup(repo, "20260101T000000Z-F")
    _wal(repo, 3)
    base, man = (o["key"] for o in m["objects"])
    (repo.root / man).unlink()
    p = repo.root / base
    p.write_bytes(p.read_bytes()[:-7])
    res = V.verify_backup(repo, CL, m["backup_id"], staging_parent=env["stage"])
    msg = res["failed"][0]["message"]
    assert f"object {man} is missing" in msg
    assert f"checksum mismatch for {base}: stored bytes: expected {m['objects'][0]['stored_size']} B" in msg
    assert len(res["failed"]) == 1 and res["failed"][0]["check"] == "objects"


def test_pg_verifybackup_failure_and_incremental_without_wal_parsing(env):
    repo = env["repo"]
    f = _backup(repo, "20260101T000000Z-F")
    i = _backup(repo, "20260101T010000Z-I", kind="incremental", parent=f, segno=5, started="2026-01-01T01:00:00")
    _wal(repo, 3, 4, 5)
    env["state"]["prog"] = env["progs"]["bad"]
    res = V.verify_backup(repo, CL, f["backup_id"], staging_parent=env["stage"])
    assert res["failed"][0]["check"] == "pg_verifybackup"
    assert f["backup_id"] in res["failed"][0]["message"] and "base/5/1259" in res["failed"][0]["message"]
    env["state"]["prog"] = env["progs"]["nowal"]
    env["state"]["calls"].clear()
    res = V.verify_backup(repo, CL, i["backup_id"], chain=False, staging_parent=env["stage"])
    assert res["verified"] == [i["backup_id"]]
    vb = next(c for c in res["results"][0]["checks"] if c["name"] == "pg_verifybackup")
    assert vb["ok"] and "--no-parse-wal" in vb["detail"] and "WAL parsing failed" in vb["detail"]
    assert [c[1:-1] for c in env["state"]["calls"]] == [["--quiet"], ["--quiet", "--no-parse-wal"]]
    # a full does not get the --no-parse-wal retry
    env["state"]["calls"].clear()
    res = V.verify_backup(repo, CL, f["backup_id"], staging_parent=env["stage"])
    assert res["failed"][0]["check"] == "pg_verifybackup" and len(env["state"]["calls"]) == 1


def test_chain_selection_skip_and_broken_chain(env):
    repo = env["repo"]
    f = _backup(repo, "20260101T000000Z-F")
    i1 = _backup(repo, "20260101T010000Z-I", kind="incremental", parent=f, segno=5, started="2026-01-01T01:00:00")
    i2 = _backup(repo, "20260101T020000Z-I", kind="incremental", parent=i1, segno=7, started="2026-01-01T02:00:00")
    _wal(repo, *range(3, 9))
    cat = FakeCatalog()
    ids = [f["backup_id"], i1["backup_id"], i2["backup_id"]]
    res = V.verify_backup(repo, CL, i1["backup_id"], catalog=cat, chain=False, staging_parent=env["stage"])
    assert res["verified"] == [i1["backup_id"]]
    chain_check = res["results"][0]["checks"][0]
    assert chain_check == {"name": "chain", "ok": True, "detail": f"{ids[0]} -> {ids[1]}"}
    res = V.verify_backup(repo, CL, i2["backup_id"], catalog=cat, staging_parent=env["stage"])
    assert res["verified"] == [ids[0], ids[2]] and res["skipped"] == [ids[1]]
    res = V.verify_backup(repo, CL, "latest", catalog=cat, staging_parent=env["stage"])
    assert res["verified"] == [] and res["skipped"] == ids
    res = V.verify_backup(repo, CL, None, catalog=cat, only_unverified=False, staging_parent=env["stage"])
    assert res["verified"] == ids and res["skipped"] == []
    # the WAL after the stop is checked for the newest of the chain only
    wal = {r["backup_id"]: next(c for c in r["checks"] if c["name"] == "wal")["detail"] for r in res["results"]}
    assert "continuous from its stop" in wal[ids[2]] and "continuous" not in wal[ids[0]]
    # a broken link: the incremental above it fails its chain check, naming the missing parent
    (repo.root / backup_prefix(CL, i1["backup_id"]) / META_NAME).unlink()
    res = V.verify_backup(repo, CL, i2["backup_id"], catalog=cat, only_unverified=False, staging_parent=env["stage"])
    assert res["verified"] == [] and [(x["backup_id"], x["check"]) for x in res["failed"]] == [(ids[2], "chain")]
    assert f"broken at {ids[1]}" in res["failed"][0]["message"]
    with pytest.raises(BackupNotFound):
        V.verify_backup(repo, CL, "20990101T000000Z-F", staging_parent=env["stage"])


def test_damaged_metadata_and_incomplete_backups(env):
    repo = env["repo"]
    m = _backup(repo, "20260101T000000Z-F")
    bad = _backup(repo, "20260102T000000Z-F", started="2026-01-02T00:00:00")
    _wal(repo, 3)
    key = f"{backup_prefix(CL, bad['backup_id'])}/{META_NAME}"
    (repo.root / key).write_text((repo.root / key).read_text().replace('"kind": "full"', '"kind": "fulL"'))
    repo.put_bytes(f"{backup_prefix(CL, '20260103T000000Z-F')}/in_progress.json", b"{}")  # running: not a backup
    cat = FakeCatalog()
    res = V.verify_backup(repo, CL, None, catalog=cat, staging_parent=env["stage"])
    assert res["verified"] == [m["backup_id"]]
    assert [(f["backup_id"], f["check"]) for f in res["failed"]] == [(bad["backup_id"], "metadata")]
    assert key in res["failed"][0]["message"]
    assert {r["backup_id"]: r["ok"] for r in cat.rows} == {m["backup_id"]: True, bad["backup_id"]: False}
    res = V.verify_backup(repo, CL, bad["backup_id"], catalog=cat, staging_parent=env["stage"])
    assert res["failed"][0]["check"] == "metadata"


def test_wal_checks(env):
    repo = env["repo"]
    f = _backup(repo, "20260101T000000Z-F", segno=3, nseg=3)  # needs segments 3..5
    res = V.verify_backup(repo, CL, None, staging_parent=env["stage"])
    assert res["failed"][0]["check"] == "wal" and "holds no segment at all" in res["failed"][0]["message"]
    _wal(repo, 3, 5, 6, 8, 9)
    res = V.verify_backup(repo, CL, None, staging_parent=env["stage"])
    [fail] = res["failed"]
    assert fail["check"] == "wal" and "000000010000000000000004 between its start" in fail["message"]
    assert "restores on its own" in fail["message"] and "point-in-time recovery" in fail["message"]
    # only the objects, pg_verifybackup and the archived segments there passed
    assert [c["ok"] for c in res["results"][0]["checks"]] == [True, True, False, True]
    _wal(repo, 4)
    res = V.verify_backup(repo, CL, f["backup_id"], staging_parent=env["stage"])
    [fail] = res["failed"]
    assert "WAL segment 000000010000000000000007 after its stop" in fail["message"]
    assert "up to 000000010000000000000009" in fail["message"] and "can reach only LSN 0/7000000" in fail["message"]
    _wal(repo, 7)
    assert V.verify_backup(repo, CL, f["backup_id"], staging_parent=env["stage"])["verified"] == [f["backup_id"]]
    assert V.verify_backup(repo, CL, f["backup_id"], check_wal=False, staging_parent=env["stage"])["results"][0][
        "checks"][-1]["name"] == "pg_verifybackup"


def test_staging_parent_is_checked(env, tmp_path):
    repo = env["repo"]
    _backup(repo, "20260101T000000Z-F")
    with pytest.raises(ConfigError, match="absolute"):
        V.verify_backup(repo, CL, None, staging_parent="relative/dir")
    with pytest.raises(ConfigError, match="does not exist"):
        V.verify_backup(repo, CL, None, staging_parent=tmp_path / "nope")
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (data / "PG_VERSION").write_text("18\n")
    with pytest.raises(ConfigError, match="inside a PostgreSQL data directory"):
        V.verify_backup(repo, CL, None, staging_parent=data / "sub")


def test_operator_contract(monkeypatch):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from airflow_pg_incremental.operators.verify import PgBackupVerifyOperator

    op = PgBackupVerifyOperator(task_id="verify", cluster="c1", repository="/r",
                                backup_id="{{ ti.xcom_pull(task_ids='full_backup')['backup_id'] }}")
    assert "backup_id" in op.template_fields and "cluster" in op.template_fields
    assert op.postgres_conn_id == "" and op.chain and op.check_wal and op.only_unverified
    calls = []
    result = {"cluster": "c1", "verified": ["B1"], "failed": [], "skipped": ["B0"], "duration_s": 1.0,
              "results": [{"backup_id": "B1", "checks": []}]}

    def fake_verify(repo, cluster, backup_id, **kw):
        calls.append((repo, cluster, backup_id, kw))
        return result

    import airflow_pg_incremental.core.verify as core_verify

    monkeypatch.setattr(core_verify, "verify_backup", fake_verify)
    monkeypatch.setattr(PgBackupVerifyOperator, "_repo", lambda self: "REPO")
    monkeypatch.setattr(PgBackupVerifyOperator, "_catalog", lambda self: "CAT")
    monkeypatch.setattr(PgBackupVerifyOperator, "_airflow_ids",
                        staticmethod(lambda ctx: {"dag_id": "d", "run_id": "r", "task_id": "t"}))
    for rendered, expected in (("B1", "B1"), ("None", None), ("", None), (None, None), ("latest", "latest")):
        op.backup_id = rendered
        assert op.execute({}) == {k: result[k] for k in ("cluster", "verified", "failed", "skipped", "duration_s")}
        assert calls[-1][:3] == ("REPO", "c1", expected)
        assert calls[-1][3]["catalog"] == "CAT" and calls[-1][3]["airflow"] == {"dag_id": "d", "run_id": "r"}
    result["failed"] = [{"backup_id": "B1", "check": "objects", "message": "checksum mismatch for c1/backups/B1/x"}]
    with pytest.raises(AirflowFailException, match="FAILED for 1 backup.s.: objects check: checksum mismatch for "
                                                   "c1/backups/B1/x"):
        op.execute({})
    result["failed"] = [{"backup_id": "B1", "check": "wal_objects", "message": "backup B1: segment X is damaged"}]
    with pytest.raises(AirflowFailException, match="wal_objects check: backup B1: segment X is damaged"):
        op.execute({})  # damaged WAL does not heal on a retry
    result["failed"] = [{"backup_id": "B1", "check": "wal", "message": "segment missing"}]
    with pytest.raises(AirflowException, match="backup B1: wal check: segment missing") as e:
        op.execute({})
    assert not isinstance(e.value, AirflowFailException)  # a late WAL capture may still fill it: retries allowed
    result["failed"] = []
    result["catalog_errors"] = ["B1: connection refused"]
    with pytest.raises(AirflowException, match="could not be recorded"):
        op.execute({})


# -- wal_objects: every archived segment a backup vouches for is read --------------------------------------------
def _seg_name(segno):
    return f"00000001000000000000{segno:04X}"


def _wal_fail(res, bid):
    r = next(r for r in res["results"] if r["backup_id"] == bid)
    return next(c for c in r["checks"] if c["name"] == "wal_objects")


def test_wal_objects_damage_of_every_kind_is_named(env):
    repo = env["repo"]
    f = _backup(repo, "20260101T000000Z-F", segno=3, nseg=2)  # vouches for 3..4, and (newest) up to 8
    _wal(repo, 3, 4, 5, 6, 7, 8)
    assert V.verify_backup(repo, CL, f["backup_id"], staging_parent=env["stage"])["failed"] == []
    # 4: a flipped byte (zstd frame checksum); 5: its checksum cut off (an incomplete frame);
    # 6: a valid segment of another cluster; 7: a valid segment of another position; 8: PostgreSQL 17's
    _flip(repo, wal_key(CL, _seg_name(4)), at=30)
    p = repo.root / wal_key(CL, _seg_name(5))
    p.write_bytes(p.read_bytes()[:-4])
    repo.put_bytes(wal_key(CL, _seg_name(6)), compress_bytes(_segment(6, sysid=SYSID + 1)))
    repo.put_bytes(wal_key(CL, _seg_name(7)), compress_bytes(_segment(2)))
    repo.put_bytes(wal_key(CL, _seg_name(8)), compress_bytes(_segment(8, magic=0xD116)))
    res = V.verify_backup(repo, CL, f["backup_id"], staging_parent=env["stage"])
    assert [(x["backup_id"], x["check"]) for x in res["failed"]] == [(f["backup_id"], "wal_objects")]
    check = _wal_fail(res, f["backup_id"])
    assert check["damaged"] == [_seg_name(s) for s in (4, 5, 6, 7, 8)]
    msg = check["detail"]
    assert f"{wal_key(CL, _seg_name(4))}: damaged zstd data" in msg
    assert f"{wal_key(CL, _seg_name(5))}: truncated zstd data" in msg
    assert f"{_seg_name(6)}: it belongs to another database system (system identifier {SYSID + 1}, the backup's " \
           f"is {SYSID})" in msg
    assert f"{_seg_name(7)}: it holds the WAL of LSN 0/2000000 (segment {_seg_name(2)}), not of its own position " \
           "LSN 0/7000000" in msg
    assert f"{_seg_name(8)}: not a PostgreSQL 18 WAL segment (page magic 0xD116, expected 0xD118)" in msg
    assert "point-in-time recovery past LSN 0/4000000 (into segment 000000010000000000000004) is impossible" in msg
    assert f"pgincr wal-push --cluster {CL}" in msg and "take a new full backup" in msg
    # the other checks are untouched: the backup restores on its own
    r = res["results"][0]
    assert {c["name"]: c["ok"] for c in r["checks"]} == {"objects": True, "pg_verifybackup": True, "wal": True,
                                                          "wal_objects": False}


def test_segment_header_checks():
    hdr = V.parse_long_page_header(_segment(5))
    name = _seg_name(5)
    assert V.segment_header_problem(hdr, name, SEG, system_identifier=str(SYSID), pg_major=18) is None
    assert V.parse_long_page_header(b"short") is None
    assert "shorter than" in V.segment_header_problem(None, name, SEG)
    # a later timeline's segment may begin with its parent's pages (the switch segment), not a newer one's
    assert V.segment_header_problem(V.parse_long_page_header(_segment(5, tli=1)), "000000020000000000000005",
                                    SEG) is None
    p = V.segment_header_problem(V.parse_long_page_header(_segment(5, tli=3)), "000000020000000000000005", SEG)
    assert "names timeline 3, impossible in a segment of timeline 2" in p
    assert "not a WAL segment" in V.segment_header_problem(V.parse_long_page_header(bytes(64)), name, SEG)
    # an unknown major version: any plausible magic
    assert V.segment_header_problem(V.parse_long_page_header(_segment(5, magic=0xD120)), name, SEG, pg_major=19) \
        is None


def test_wal_objects_read_once_in_parallel_with_progress_and_catalog_checksums(env, monkeypatch, caplog):
    import hashlib
    import logging
    import threading

    repo = env["repo"]
    f = _backup(repo, "20260101T000000Z-F", segno=3)
    i1 = _backup(repo, "20260101T010000Z-I", kind="incremental", parent=f, segno=6, started="2026-01-01T01:00:00")
    i2 = _backup(repo, "20260101T020000Z-I", kind="incremental", parent=i1, segno=9, started="2026-01-01T02:00:00")
    _wal(repo, *range(3, 13))
    reads, threads = [], set()
    orig = V._read_segment

    def counting(*a):
        reads.append(a[2])
        threads.add(threading.current_thread().name)
        return orig(*a)

    monkeypatch.setattr(V, "_read_segment", counting)

    class Cat(FakeCatalog):
        def wal_checksums(self, cluster):
            assert cluster == CL
            return {_seg_name(10): hashlib.sha256(b"another content").hexdigest(),
                    _seg_name(11): hashlib.sha256(_segment(11)).hexdigest()}

    with caplog.at_level(logging.INFO, logger="airflow_pg_incremental.core.verify"):
        res = V.verify_backup(repo, CL, None, catalog=Cat(), staging_parent=env["stage"], progress_interval=0)
    # each segment once, though the newest backup's range overlaps the others' (the WAL between two
    # backups is vouched for by the later one)
    assert sorted(reads) == [_seg_name(s) for s in range(3, 13)]
    assert all(t.startswith("pgincr-verify-wal") for t in threads)
    # progress: segments done and the rate, per backup for the segments it reads first
    assert "backup 20260101T020000Z-I: reading WAL objects 000000010000000000000006 .. 00000001000000000000000C" \
        in caplog.text and "6 of 6 segment(s) (done in" in caplog.text and "MiB/s" in caplog.text
    assert [(x["backup_id"], x["check"]) for x in res["failed"]] == [(i2["backup_id"], "wal_objects")]
    msg = res["failed"][0]["message"]
    assert f"{wal_key(CL, _seg_name(10))}: content SHA-256" in msg and "recorded in the catalog" in msg
    assert _seg_name(11) not in msg
    assert _wal_fail(res, i1["backup_id"])["segments"] == 4  # 3 .. 6: from the full's stop on
    assert _wal_fail(res, i2["backup_id"])["segments"] == 7  # 6 .. 12: to the newest archived


def test_wal_objects_before_the_backup_start_concern_older_backups(env):
    repo = env["repo"]
    f = _backup(repo, "20260101T000000Z-F", segno=3)
    g = _backup(repo, "20260101T010000Z-F", segno=6, started="2026-01-01T01:00:00")
    _wal(repo, *range(3, 8))
    _flip(repo, wal_key(CL, _seg_name(4)), at=30)
    res = V.verify_backup(repo, CL, g["backup_id"], staging_parent=env["stage"])
    [fail] = res["failed"]
    assert fail["check"] == "wal_objects" and _seg_name(4) in fail["message"]
    assert "from a backup older than this one" in fail["message"]
    assert f["backup_id"] not in res["verified"]  # a full's chain is itself


def test_damaged_latest_fails_verify_instead_of_an_older_backup(env):
    repo = env["repo"]
    old = _backup(repo, "20260101T000000Z-F")
    new = _backup(repo, "20260102T000000Z-F", started="2026-01-02T00:00:00")
    _wal(repo, 3)
    key = f"{backup_prefix(CL, new['backup_id'])}/{META_NAME}"
    (repo.root / key).write_bytes((repo.root / key).read_bytes()[:-20])
    repo.put_bytes(f"{backup_prefix(CL, '20260103T000000Z-F')}/in_progress.json", b"{}")  # running: ignored
    cat = FakeCatalog()
    for bid in ("latest", None):
        res = V.verify_backup(repo, CL, bid or "latest", catalog=cat, staging_parent=env["stage"])
        assert res["verified"] == [] and old["backup_id"] not in [r["backup_id"] for r in res["results"]]
        assert [(x["backup_id"], x["check"]) for x in res["failed"]] == [(new["backup_id"], "metadata")]
        msg = res["failed"][0]["message"]
        assert key in msg and f"--backup-id {old['backup_id']}" in msg
    assert cat.rows[-1]["backup_id"] == new["backup_id"] and cat.rows[-1]["ok"] is False
