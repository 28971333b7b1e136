"""Full base backup: pg_basebackup (tar to stdout) streamed through zstd into the repository."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time

from .. import __version__
from . import backup_stream, procs, standby
from .binaries import find_program, major_from_version_num
from .codec import CompressingReader, PipeReader, raw_total
from .errors import BackupFailed, ConfigError, PgIncrError, ServerError
from .lsn import DEFAULT_SEGMENT_SIZE, parse_lsn, wal_file_name, wal_file_name_ending
from .metadata import INPROGRESS_NAME, backup_prefix, claim_backup_id, iso, utcnow, write_meta
from .names import validate_cluster
from .pgconn import ConnInfo, classify_connect_error, connect
from .progress import Progress, human_bytes
from .repository import Repository
from .tarscan import TarScanner

log = logging.getLogger(__name__)


def server_facts(conn: ConnInfo) -> dict:
    """What we need to know about the source server before a backup. Raises ServerError."""
    with connect(conn) as c, c.cursor() as cur:
        cur.execute("""
            SELECT current_setting('server_version_num')::int,
                   current_setting('data_checksums'),
                   pg_is_in_recovery(),
                   (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'),
                   (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
                   (SELECT rolname FROM pg_roles WHERE oid = 10),
                   current_user,
                   coalesce(current_setting('summarize_wal', true), 'off'),
                   current_setting('wal_level')""")
        (version_num, checksums, in_recovery, seg_size, can_replicate, superuser, user, summarize,
         wal_level) = cur.fetchone()
        # in-place tablespaces (allow_in_place_tablespaces, a relative location) travel in base.tar
        cur.execute("SELECT oid::bigint, spcname, pg_tablespace_location(oid) FROM pg_tablespace "
                    "WHERE spcname NOT IN ('pg_default', 'pg_global') "
                    "AND pg_tablespace_location(oid) LIKE '/%' ORDER BY 1")
        tablespaces = [{"oid": int(o), "name": n, "location": loc} for o, n, loc in cur.fetchall()]
        facts = {"version_num": version_num, "major": major_from_version_num(version_num),
                 "data_checksums": checksums == "on", "in_recovery": in_recovery,
                 "wal_segment_size": int(seg_size or DEFAULT_SEGMENT_SIZE), "can_replicate": bool(can_replicate),
                 "bootstrap_superuser": superuser, "user": user, "summarize_wal": summarize == "on",
                 "wal_level": wal_level, "tablespaces": tablespaces, "system_identifier": None, "size_estimate": None,
                 "server_zstd": False}
        for sql, key in (("SELECT system_identifier::text FROM pg_control_system()", "system_identifier"),
                         # zstd among wal_compression's values: the server was built with zstd (15+)
                         ("SELECT 'zstd' = ANY(enumvals) FROM pg_settings WHERE name = 'wal_compression'",
                          "server_zstd"),
                         ("SELECT sum(pg_database_size(oid))::bigint FROM pg_database WHERE datallowconn",
                          "size_estimate")):
            try:
                cur.execute(sql)
                facts[key] = cur.fetchone()[0]
                if key == "size_estimate" and facts[key] is not None:
                    facts[key] = int(facts[key]) + 2 * facts["wal_segment_size"]  # WAL included by -X fetch
            except Exception as e:  # permission: fine, we get it elsewhere
                log.debug("could not read %s: %s", key, e)
                c.rollback() if not c.autocommit else None
    return facts


def check_source(facts: dict, conn: ConnInfo) -> None:
    if not facts["can_replicate"]:
        raise ServerError(f"role {facts['user']!r} on {conn.describe()} lacks the REPLICATION attribute needed by "
                          f"pg_basebackup; run: ALTER ROLE {facts['user']} REPLICATION;")
    if facts["wal_level"] == "minimal":
        raise ServerError("wal_level is 'minimal': base backups need wal_level = replica (or logical); change it and "
                          "restart the server")


def _manifest_facts(manifest: bytes | None, label: bytes | None) -> dict:
    out: dict = {}
    if manifest:
        m = json.loads(manifest)
        ranges = m.get("WAL-Ranges") or []
        if ranges:
            out["timeline"] = int(ranges[-1]["Timeline"])
            out["start_lsn"] = ranges[0]["Start-LSN"]
            out["stop_lsn"] = ranges[-1]["End-LSN"]
        if m.get("System-Identifier") is not None:
            out["system_identifier"] = str(m["System-Identifier"])
        out["manifest_files"] = len(m.get("Files", []))
        out["manifest_bytes"] = sum(int(f.get("Size") or 0) for f in m.get("Files", []))
    if label:
        for line in label.decode("utf-8", "replace").splitlines():
            k, _, v = line.partition(": ")
            if k == "START WAL LOCATION":
                out.setdefault("start_lsn", v.split()[0])
            elif k == "START TIMELINE":
                out.setdefault("timeline", int(v))
            elif k == "START TIME":
                out["label_start_time"] = v
            elif k == "CHECKPOINT LOCATION":
                out["checkpoint_lsn"] = v
    return out


def take_full_backup(conn: ConnInfo, repo: Repository, cluster: str, **kwargs) -> dict:
    """Take a full base backup of the server at `conn` into `repo` under `cluster`."""
    return take_backup(conn, repo, cluster, kind="full", **kwargs)


def take_backup(conn: ConnInfo, repo: Repository, cluster: str, *, kind: str = "full", parent: dict | None = None,
                compression_level: int = 3, threads: int | None = None, compression: str = "auto",
                content_sha256: bool = False, catalog=None, airflow: dict | None = None,
                progress_interval: float = 10.0, fast_checkpoint: bool = True, reason: str | None = None,
                staging_dir: str | None = None, primary: ConnInfo | None = None,
                restore_chain: list[str] | None = None) -> dict:
    """Take a base backup: `kind` full, or incremental/differential on top of `parent` (the
    metadata of the backup whose manifest pg_basebackup --incremental compares against; see
    core.incremental.plan_backup for choosing it).

    compression: auto (on the database server when it supports zstd, else on this machine), server,
    or client; threads: zstd worker threads (None: the cores, see backup_stream.default_threads);
    staging_dir: where pg_basebackup writes when it compresses (a few MiB of disk, see
    backup_stream), the system's temporary directory by default; primary: when `conn` is a
    streaming standby, its primary, asked for a checkpoint first so the backup starts now (see
    core.standby); restore_chain: the backups a restore of this one combines, oldest first, as
    planned (core.incremental.plan_backup; it ends with this backup), recorded in its metadata.

    Returns the backup metadata (a JSON-able dict without secrets). Nothing is published unless
    the whole backup succeeded: backup.json is written last.
    """
    validate_cluster(cluster)
    if kind not in ("full", "incremental", "differential"):
        raise ConfigError(f"unknown backup kind {kind!r}")
    if (kind == "full") != (parent is None):
        raise ConfigError("an incremental or differential backup needs its parent; a full backup has none")
    if not 1 <= compression_level <= 22:
        raise ConfigError(f"compression level {compression_level} out of range 1..22")
    backup_stream.check_mode(compression)
    # 1. everything that can fail without side effects first
    facts = server_facts(conn)
    check_source(facts, conn)
    from_primary = standby.check_standby_source(facts, conn, primary)  # None: not a standby, or no primary
    pg_basebackup = find_program("pg_basebackup", facts["major"])
    repo.check_writable()

    started = utcnow()
    if parent is not None and facts["major"] < 17:
        raise ConfigError(f"block-level incremental backups need PostgreSQL 17+; the server runs {facts['major']}. "
                          "Take full backups; the WAL archive carries the changes in between")
    # a standby starts its backup at its last restartpoint: the primary checkpoints first (no side
    # effect on the repository yet, so a lagging standby fails with nothing to clean up)
    caught = standby.catch_up(conn, primary) if from_primary is not None else None
    backup_id = claim_backup_id(repo, cluster, kind, {"kind": kind, "started_at": iso(started),
                                                      "host": socket.gethostname(), "pid": os.getpid()}, started)
    prefix = backup_prefix(cluster, backup_id)
    log.info("%s backup %s of %s (PostgreSQL %s) into %s/%s%s", kind, backup_id, conn.describe(), facts["major"],
             repo.url, prefix, f" on top of {parent['backup_id']}" if parent else "")
    meta = {
        "format": 1, "cluster": cluster, "backup_id": backup_id, "kind": kind,
        "parent_id": parent["backup_id"] if parent else None,
        "chain_root_id": parent.get("chain_root_id") or parent["backup_id"] if parent else backup_id,
        "chain_length": (parent.get("chain_length") or 1) + 1 if parent else 1, "reason": reason,
        "status": "running", "started_at": iso(started),
        "pg_version_num": facts["version_num"], "pg_major": facts["major"],
        "system_identifier": facts["system_identifier"], "data_checksums": facts["data_checksums"],
        "wal_segment_size": facts["wal_segment_size"], "bootstrap_superuser": facts["bootstrap_superuser"],
        "summarize_wal": facts["summarize_wal"], "from_standby": facts["in_recovery"],
        "source": conn.safe_dict(), "primary": primary.safe_dict() if from_primary is not None else None,
        "standby_catch_up": caught, "airflow": airflow or {}, "repository": repo.url,
        "restore_chain": [*(restore_chain or []), backup_id] if parent else [backup_id],
        "tool": {"name": "airflow-pg-incremental", "version": __version__}, "wal_included": True,
    }
    if catalog is not None:
        catalog.record_backup(meta)

    t0 = time.monotonic()
    stderr_file = tempfile.TemporaryFile()
    plan = backup_stream.choose(compression, compression_level, threads, server_zstd=facts.get("server_zstd", False),
                                server_major=facts["major"], pg_basebackup=pg_basebackup)
    log.info("backup %s: %s", backup_id, plan.describe())
    cmd = [pg_basebackup, "-Ft", "-X", "fetch", "-w", "--manifest-checksums=CRC32C",
           "-l", f"pgincr {cluster} {backup_id}", "-c", "fast" if fast_checkpoint else "spread"]
    stage = stage_lock = None
    tablespaces = facts["tablespaces"]
    # -D - carries one archive: with tablespaces pg_basebackup writes one per tablespace into a stage
    staged = plan.staged or bool(tablespaces)
    if staged:
        stage, out_dir, stage_lock = backup_stream.make_stage(backup_id, staging_dir)
        procs.register_dir(stage)
        cmd += ["-D", out_dir, "--no-sync", *([plan.compress_option()] if plan.staged else [])]
    else:
        cmd += ["-D", "-"]
    parent_manifest = None
    if parent is not None:
        parent_manifest = _fetch_parent_manifest(repo, parent)
        cmd.append(f"--incremental={parent_manifest.name}")
    log.info("running: %s", " ".join(cmd))
    app_name = f"pgincr backup {backup_id}"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL if staged else subprocess.PIPE, stderr=stderr_file,
                            env={**os.environ, **conn.env(), "PGAPPNAME": app_name}, cwd="/",
                            preexec_fn=backup_stream.die_with_parent if staged else None)
    procs.register_child(proc)  # killed by procs.terminate_all (a killed task): the backup then fails
    progress = Progress(f"{kind} backup {backup_id}", facts["size_estimate"], log, progress_interval)

    def failure(rc: int) -> PgIncrError:
        return _pg_basebackup_failed(conn, rc, stderr_file)

    pipe = None
    try:
        if staged:
            infos, manifest, label = _store_staged(repo, prefix, out_dir, proc, progress, failure, conn, app_name,
                                                   content_sha256, plan, _archive_objects(plan, tablespaces))
        else:
            pipe, base_info, manifest, label = _store_piped(repo, f"{prefix}/base.tar.zst", proc, progress, failure,
                                                            plan, content_sha256)
            infos = {"base.tar.zst": base_info}
        base_info = infos["base.tar.zst"]
        progress.extra = f"stored {human_bytes(base_info.stored_size)}"
        progress.finish()
        if manifest is None:
            raise BackupFailed("the backup stream had no backup_manifest; pg_basebackup 13+ is required")
        man_info = store_manifest(repo, prefix, manifest, compression_level)
        mf = _manifest_facts(manifest, label)
        mf["next_xid"] = _next_xid(conn)
        finished = utcnow()
        seg = facts["wal_segment_size"]
        meta.update({
            "status": "complete", "finished_at": iso(finished), "duration_s": round(time.monotonic() - t0, 3),
            "start_lsn": mf.get("start_lsn"), "stop_lsn": mf.get("stop_lsn"), "timeline": mf.get("timeline"),
            "checkpoint_lsn": mf.get("checkpoint_lsn"), "next_xid": mf.get("next_xid"),
            "system_identifier": mf.get("system_identifier") or facts["system_identifier"],
            "file_count": mf.get("manifest_files"),
            "raw_bytes": raw_total(infos.values(), mf.get("manifest_bytes")),
            "stored_bytes": sum(i.stored_size for i in infos.values()) + man_info.stored_size,
            "objects": [base_info.to_dict(), man_info.to_dict(),
                        *(infos[tablespace_object(t["oid"])].to_dict() for t in tablespaces)],
            "compression": plan.to_dict(),
            "tablespaces": [{**t, "object": tablespace_object(t["oid"])} for t in tablespaces],
        })
        if meta["start_lsn"] and meta["timeline"]:
            meta["start_wal_file"] = wal_file_name(meta["timeline"], parse_lsn(meta["start_lsn"]), seg)
            meta["stop_wal_file"] = wal_file_name_ending(meta["timeline"], parse_lsn(meta["stop_lsn"]), seg)
        publish(repo, meta)  # the backup exists from here on
    except BaseException as e:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        abandon(repo, meta, catalog, conn.redact(str(e)))
        if isinstance(e, PgIncrError):
            raise
        if isinstance(e, Exception):
            raise BackupFailed(f"backup {backup_id} failed: {conn.redact(str(e))}") from e
        raise
    finally:
        procs.forget_child(proc)
        if pipe is not None:
            pipe.close()
        stderr_file.close()
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
            procs.forget_dir(stage)
            os.close(stage_lock)
        if parent_manifest is not None:
            parent_manifest.close()
        if proc.stdout:
            proc.stdout.close()
    if catalog is not None:
        catalog.record_backup(meta)
    ratio = (meta["raw_bytes"] or 0) / max(base_info.stored_size, 1)
    log.info("%s backup %s complete: %s read, %s stored (%.1fx), LSN %s..%s timeline %s, %.1f s", kind,
             backup_id, human_bytes(meta["raw_bytes"]), human_bytes(meta["stored_bytes"]), ratio, meta["start_lsn"],
             meta["stop_lsn"], meta["timeline"], meta["duration_s"])
    return meta


def _pg_basebackup_failed(conn: ConnInfo, rc: int, stderr_file) -> PgIncrError:
    """The error to raise for a pg_basebackup that exited with `rc`, from what it printed."""
    stderr_file.seek(0)
    err = conn.redact(stderr_file.read().decode("utf-8", "replace").strip())
    low = err.lower()
    if any(s in low for s in ("could not connect", "password", "pg_hba", "replication", "connection")):
        return classify_connect_error(conn, err)
    hint = ""
    if "copy stream ended" in low or "has already been removed" in low:
        hint = (" (if the server log says 'requested WAL segment ... has already been removed', the server "
                "recycled WAL the backup still needed: keep WAL with a replication slot (pull mode creates "
                "one) or a larger wal_keep_size)")
    if "compress" in low and "support" in low:
        hint = " (set compression: client for this cluster, or install a PostgreSQL built with zstd)"
    if rc == 0:
        return BackupFailed(f"pg_basebackup exited 0 but wrote no base.tar.zst: {err}")
    return BackupFailed(f"pg_basebackup failed (exit {rc}): {err}{hint}")


def _store_piped(repo: Repository, key: str, proc, progress: Progress, failure, plan, content_sha256: bool):
    """pg_basebackup writes the plain tar to our pipe; python-zstandard compresses it (plan.threads
    worker threads) while a thread drains the pipe, scans the tar (backup_manifest, backup_label)
    and counts progress. Returns (pipe, ObjectInfo, manifest, label)."""
    scanner = TarScanner()
    raw_hash = hashlib.sha256() if content_sha256 else None

    def on_raw(chunk) -> None:  # runs in the pipe reader's thread, beside compression
        if raw_hash is not None:
            raw_hash.update(chunk)
        scanner.feed(chunk)
        progress.add(len(chunk))

    pipe = PipeReader(proc.stdout, on_chunk=on_raw)
    reader = CompressingReader(pipe, level=plan.level, threads=plan.threads,
                               raw_hasher=raw_hash if raw_hash is not None else False)
    repo.put(key, reader)
    rc = proc.wait()
    if rc != 0:
        raise failure(rc)
    return pipe, reader.info(key), scanner.read_captured("backup_manifest"), scanner.read_captured("backup_label")


def _archive_objects(plan, tablespaces: list[dict]) -> dict[str, str]:
    """The archives pg_basebackup writes into its -D directory -> the objects they become: one per
    tablespace (named by its OID) and base for the data directory; '.tar.zst' when it compresses."""
    ext = ".tar.zst" if plan.staged else ".tar"
    names = {f"{t['oid']}{ext}": tablespace_object(t["oid"]) for t in tablespaces}
    names[f"base{ext}"] = "base.tar.zst"
    return names


def tablespace_object(oid) -> str:
    return f"tblspc-{int(oid)}.tar.zst"


def _store_staged(repo: Repository, prefix: str, stage: str, proc, progress: Progress, failure, conn: ConnInfo,
                  app_name: str, content_sha256: bool, plan, archives: dict[str, str]):
    """pg_basebackup writes its archives into `stage` one after another (each tablespace, then the
    data directory), then backup_manifest. Each archive is stored into its object (`archives`) as
    it grows (backup_stream.StagedFile), complete once pg_basebackup closed it: unchanged and hashed
    as it passes when pg_basebackup compressed it (server or client side), compressed here by
    python-zstandard otherwise. Returns ({object name: ObjectInfo}, manifest, label)."""
    streamed = _StreamedProbe(conn, app_name)
    stored: dict[str, object] = {}
    label = None
    try:
        while (name := _next_archive(stage, stored, proc, failure)) is not None:
            if name not in archives:
                raise BackupFailed(f"pg_basebackup wrote {name}, an archive this backup did not expect (a tablespace "
                                   "created while the backup ran?); take the backup again")
            obj = archives[name]
            info, lab = _store_archive(repo, f"{prefix}/{obj}", os.path.join(stage, name), proc, progress, failure,
                                       streamed, content_sha256, plan, want_label=obj == "base.tar.zst")
            stored[name] = info
            label = lab if lab is not None else label
        rc = proc.wait()
        if rc != 0:
            raise failure(rc)
    finally:
        streamed.close()
    _check_staged_complete(stage, archives, stored)
    try:
        with open(os.path.join(stage, "backup_manifest"), "rb") as f:
            manifest = f.read()
    except FileNotFoundError:
        manifest = None
    if plan.staged:
        progress.done = _manifest_facts(manifest, None).get("manifest_bytes") or progress.done
    return {archives[n]: i for n, i in stored.items()}, manifest, label


# pg_basebackup writes the manifest as backup_manifest.tmp and renames it when it is whole: neither
# name is an archive
MANIFEST_FILES = ("backup_manifest", "backup_manifest.tmp")


def _next_archive(stage: str, stored: dict, proc, failure) -> str | None:
    """The next archive pg_basebackup began in `stage` (oldest first), or None once it exited."""
    while True:
        exited = proc.poll() is not None
        if exited and proc.returncode != 0:
            raise failure(proc.returncode)
        new = []
        for n in os.listdir(stage):
            if n not in stored and n not in MANIFEST_FILES:
                try:
                    new.append((os.stat(os.path.join(stage, n)).st_mtime_ns, n))
                except FileNotFoundError:
                    continue
        if new:
            return min(new)[1]
        if exited:
            return None
        time.sleep(backup_stream.POLL)


def _store_archive(repo: Repository, key: str, path: str, proc, progress: Progress, failure, streamed,
                   content_sha256: bool, plan, want_label: bool):
    """Store one staged archive into `key` (see _store_staged). Returns (ObjectInfo, backup_label
    when `want_label` and found)."""
    from .codec import HashingReader, ObjectInfo

    compressed = plan.staged
    label = (backup_stream.LabelReader() if compressed else TarScanner(capture=("backup_label",))) \
        if want_label else None
    content = backup_stream.ContentHasher() if content_sha256 and compressed else None

    def on_chunk(chunk) -> None:
        if label is not None:
            label.feed(chunk)
        if content is not None:
            content.feed(chunk)
        if compressed:
            progress.extra = f"stored {human_bytes(staged.size)}"
            progress.update(lambda: streamed.bytes() or progress.done)
        else:
            progress.add(len(chunk))

    staged = backup_stream.StagedFile(path, proc, on_failure=failure, on_chunk=on_chunk,
                                      finished=lambda: not backup_stream.held_open(proc.pid, staged.descriptor))
    reader = HashingReader(staged) if compressed else \
        CompressingReader(staged, level=plan.level, threads=plan.threads, raw_hasher=None if content_sha256 else False)
    try:
        repo.put(key, reader)
    finally:
        staged.close()
    if compressed:
        raw_size, raw_sha = (content.size, content.hexdigest()) if content is not None else (None, None)
        info = ObjectInfo(key, raw_size, raw_sha, reader.size, reader.hexdigest())
    else:
        info = reader.info(key)
    found = None
    if label is not None:
        found = label.label() if compressed else label.read_captured("backup_label")
    return info, found


def _check_staged_complete(stage: str, archives: dict[str, str], stored: dict) -> None:
    """Every expected archive was stored and nothing else was left behind (pg_wal.tar, ...)."""
    missing = sorted(set(archives) - set(stored))
    if missing:
        raise BackupFailed(f"pg_basebackup did not write {', '.join(missing)} (a tablespace dropped while the backup "
                           "ran?); take the backup again")
    others = sorted(set(os.listdir(stage)) - set(archives) - {"backup_manifest"})
    if others:
        raise BackupFailed(f"pg_basebackup wrote files this version does not store: {', '.join(others)}")


class _StreamedProbe:
    """Bytes the server has streamed so far to our pg_basebackup (pg_stat_progress_basebackup),
    for the progress line of a compressed stream; None when it cannot be read."""

    def __init__(self, conn: ConnInfo, app_name: str):
        self.conn = conn
        self.app_name = app_name
        self._c = None
        self._failed = False

    def bytes(self) -> int | None:
        if self._failed:
            return None
        try:
            if self._c is None:
                self._c = connect(self.conn)
                self._c.autocommit = True
            with self._c.cursor() as cur:
                cur.execute("SELECT p.backup_streamed FROM pg_stat_progress_basebackup p JOIN pg_stat_activity a "
                            "USING (pid) WHERE a.application_name = %s", (self.app_name,))
                row = cur.fetchone()
            return int(row[0]) if row and row[0] is not None else None
        except Exception as e:
            log.debug("progress probe: %s", e)
            self._failed = True
            return None

    def close(self) -> None:
        if self._c is not None:
            try:
                self._c.close()
            except Exception:
                pass


def _fetch_parent_manifest(repo: Repository, parent: dict):
    """The parent's backup_manifest in a temporary file (checksums verified) for --incremental."""
    from .codec import VerifyingReader
    from .metadata import object_info

    info = object_info(parent, "backup_manifest.zst")
    if info is None:
        raise BackupFailed(f"parent backup {parent['backup_id']} has no backup_manifest object; take a full backup")
    f = tempfile.NamedTemporaryFile(prefix="pgincr-parent-manifest-", suffix=".json")
    with repo.open(info.key) as stored:
        shutil.copyfileobj(VerifyingReader(stored, info), f, 1 << 20)  # verified at its end
    f.flush()
    return f


def _next_xid(conn: ConnInfo) -> int | None:
    """The next transaction id to be assigned, read after the backup stopped: a transaction with
    an id at least this large committed after the backup's end (used to pick a backup for an xid
    target)."""
    try:
        with connect(conn) as c, c.cursor() as cur:
            cur.execute("SELECT (pg_snapshot_xmax(pg_current_snapshot())::text::bigint) % 4294967296")
            return int(cur.fetchone()[0])
    except Exception as e:
        log.debug("could not read the next xid: %s", e)
        return None


def store_manifest(repo: Repository, prefix: str, manifest: bytes, level: int):
    """The backup_manifest beside the archives, as backup_manifest.zst. Returns its ObjectInfo."""
    reader = CompressingReader(io.BytesIO(manifest), level=level)
    key = f"{prefix}/backup_manifest.zst"
    repo.put(key, reader)
    return reader.info(key)


def publish(repo: Repository, meta: dict) -> None:
    """backup.json, written last: the backup (or synthetic full) exists from here on; then its
    in-progress marker goes."""
    write_meta(repo, meta)
    repo.delete(f"{backup_prefix(meta['cluster'], meta['backup_id'])}/{INPROGRESS_NAME}")


def abandon(repo: Repository, meta: dict, catalog, error: str, stamp: str = "finished_at") -> None:
    """A backup that failed: what it wrote goes (best effort), the catalog row says failed with
    `error` (already free of secrets), stamped at `stamp`."""
    _discard(repo, backup_prefix(meta["cluster"], meta["backup_id"]))
    meta.update({"status": "failed", stamp: iso(utcnow()), "error": error[:2000]})
    if catalog is not None:
        try:
            catalog.record_backup(meta)
        except Exception as ce:  # the original error matters more
            log.error("could not record the failure in the catalog: %s", ce)


def _discard(repo: Repository, prefix: str) -> None:
    """Best-effort removal of a failed backup's objects (cleanup_incomplete catches what is left)."""
    try:
        keys = repo.list(prefix)
        for k in sorted(keys, key=lambda k: k.endswith(INPROGRESS_NAME)):
            repo.delete(k)
    except Exception as e:
        log.warning("could not remove the partial backup under %s (%s); cleanup_incomplete will", prefix, e)


def summary(meta: dict) -> dict:
    """Small JSON dict for XCom / CLI output."""
    keys = ("cluster", "backup_id", "kind", "parent_id", "chain_root_id", "chain_length", "reason", "status",
            "start_lsn", "stop_lsn",
            "timeline", "system_identifier", "pg_major", "raw_bytes", "stored_bytes", "duration_s", "started_at",
            "finished_at", "start_wal_file", "stop_wal_file", "repository", "compression", "from_standby",
            "primary", "standby_catch_up", "restore_chain")
    return {k: meta.get(k) for k in keys}
