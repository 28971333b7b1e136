"""Restore of a backup into an empty directory, with optional start of a server and check queries.

Steps: resolve the backup (refuse unknown ids), check the target directory (must be absent or
empty), check the binaries of the backup's major version exist, then stream each object from the
repository (stored checksum, zstd frame checksum and content checksum checked), extract, run
pg_verifybackup, set ownership/permissions a server accepts. Any failure removes what the restore
created. Chains (incrementals) and PITR slot in between extraction and start.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

from .binaries import find_program
from .codec import ObjectInfo, VerifyingReader
from .errors import ConfigError, RestoreError, ServerError
from .metadata import object_info, require_cluster, resolve_backup
from .names import validate_backup_id, validate_cluster
from .progress import CountingReader, Progress
from .repository import Repository
from .server import PgServer, chown_tree, ensure_traversable

log = logging.getLogger(__name__)


def check_target_dir(target_dir: str | os.PathLike) -> Path:
    target = Path(target_dir)
    if not target.is_absolute():
        raise ConfigError(f"target directory {target_dir} must be an absolute path")
    if target.exists():
        if not target.is_dir():
            raise ConfigError(f"target {target} exists and is not a directory")
        if any(target.iterdir()):
            raise ConfigError(f"target directory {target} is not empty; restore needs an empty or new directory "
                              "(nothing was changed)")
    if (target.parent / "PG_VERSION").exists() or any((p / "PG_VERSION").exists() for p in target.parents):
        raise ConfigError(f"target directory {target} lies inside a PostgreSQL data directory; choose another place")
    return target


def _object(meta: dict, name: str) -> ObjectInfo:
    info = object_info(meta, name)
    if info is not None:
        return info
    raise RestoreError(f"backup {meta['backup_id']} has no object {name} in its metadata; it cannot be restored")


def _base_backup_filter(member: tarfile.TarInfo, path: str) -> tarfile.TarInfo:
    """tarfile's 'tar' filter (no absolute paths, nothing outside the destination, no setuid bits)
    plus: no links at all. A base backup of a cluster without tablespaces has none, so a link can
    only come from a tampered archive; refusing them is as safe as the 'data' filter and avoids
    its two realpath() calls per member."""
    _guard(member.name, member.type)
    return tarfile.tar_filter(member, path)


def _guard(name: str, typeflag: bytes) -> None:
    """What GNU tar may be handed: regular files and directories with relative, '..'-free names."""
    if typeflag not in (b"0", b"\0", b"5") or name.startswith("/") or ".." in name.split("/"):
        raise RestoreError(f"unexpected member {name!r} (type {typeflag!r}) in a base backup archive; refusing it")


def extract_object(repo: Repository, info: ObjectInfo, dest: Path, what: str, interval: float = 10.0) -> None:
    """Stream one stored tar object into `dest`: decompressed and checksum-verified here, every
    header checked (no links, no absolute or '..' names), extracted by GNU tar when present
    (C speed; Python's tarfile otherwise)."""
    tar = shutil.which("tar")
    if tar is None:
        return _extract_with_tarfile(repo, info, dest, what, interval)
    import subprocess

    from .tarscan import TarScanner

    progress = Progress(f"restore {what}", info.raw_size, log, interval)
    scanner = TarScanner(capture=(), on_member=_guard)
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([tar, "-x", "-f", "-", "-C", str(dest), "--no-same-owner", "--delay-directory-restore"],
                            stdin=subprocess.PIPE, stderr=err)
    try:
        with repo.open(info.key) as stored:
            reader = VerifyingReader(stored, info)
            while True:
                data = reader.read(1 << 20)
                if not data:
                    break
                scanner.feed(data)  # raises before tar sees a forbidden member
                proc.stdin.write(data)
                progress.add(len(data))
        proc.stdin.close()
        rc = proc.wait()
        if rc != 0:
            err.seek(0)
            raise RestoreError(f"tar failed extracting {what} (exit {rc}): {err.read().decode(errors='replace')[-500:]}")
    except BaseException:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    finally:
        err.close()
    progress.finish()


def _extract_with_tarfile(repo: Repository, info: ObjectInfo, dest: Path, what: str, interval: float) -> None:
    progress = Progress(f"restore {what}", info.raw_size, log, interval)
    with repo.open(info.key) as stored:
        reader = VerifyingReader(stored, info)
        with tarfile.open(fileobj=CountingReader(reader, progress), mode="r|", bufsize=1 << 20) as tf:
            tf.extractall(dest, filter=_base_backup_filter)
        reader.drain()
    progress.finish()


def restore_backup(repo: Repository, cluster: str, backup_id: str | None, target_dir: str | os.PathLike, *,
                   verify: bool = True, os_user: str | None = None, progress_interval: float = 10.0,
                   keep_failed: bool = False) -> dict:
    """Restore backup `backup_id` ('latest' for the newest) of `cluster` into `target_dir`. On
    failure what it wrote is removed (kept with `keep_failed`, for debugging)."""
    validate_cluster(cluster)
    if backup_id not in (None, "latest"):
        validate_backup_id(backup_id)  # bad input is refused before any I/O
    require_cluster(repo, cluster)
    meta = resolve_backup(repo, cluster, backup_id)
    target = check_target_dir(target_dir)
    major = meta["pg_major"]
    verifybackup = find_program("pg_verifybackup", major) if verify else None
    base = _object(meta, "base.tar.zst")
    chain = [meta]
    if meta.get("kind", "full") != "full":
        from .incremental import resolve_chain

        chain = resolve_chain(repo, cluster, meta)  # refuses a broken chain before anything is touched
        combine = find_program("pg_combinebackup", major)
        for b in chain:
            _object(b, "base.tar.zst")
    created = not target.exists()
    t0 = time.monotonic()
    log.info("restoring backup %s of %s (PostgreSQL %s, %s) into %s", meta["backup_id"], cluster, major,
             meta.get("kind"), target)
    try:
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(target, 0o700)
        if len(chain) == 1:
            extract_object(repo, base, target, meta["backup_id"], progress_interval)
        else:
            _combine_chain(repo, chain, target, combine, verifybackup, major, progress_interval)
        if verify:
            r = _run([verifybackup, "--quiet", str(target)])
            if r.returncode != 0:
                raise RestoreError(f"pg_verifybackup rejected the restored backup {meta['backup_id']}: "
                                   f"{r.stderr.strip() or r.stdout.strip()}")
        os.chmod(target, 0o700)
        chown_tree(target, os_user)
    except BaseException:
        if not keep_failed:
            _undo(target, created)
        raise
    took = time.monotonic() - t0
    log.info("backup %s restored into %s in %.1f s%s", meta["backup_id"], target, took,
             " (pg_verifybackup passed)" if verify else "")
    return {"cluster": cluster, "backup_id": meta["backup_id"], "target_dir": str(target), "pg_major": major,
            "chain": [b["backup_id"] for b in chain],
            "verified": verify, "restore_seconds": round(took, 3), "stop_lsn": meta.get("stop_lsn"),
            "timeline": meta.get("timeline"), "bootstrap_superuser": meta.get("bootstrap_superuser")}


def _combine_chain(repo, chain, target: Path, combine: str, verifybackup: str | None, major: int,
                   progress_interval: float) -> None:
    """Stage every backup of the chain beside the target (same filesystem), verify each, then
    pg_combinebackup them oldest -> newest into the target. Staging is removed in every case."""
    staging = target.parent / f".{target.name}.pgincr-stage"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(mode=0o700)
    try:
        from concurrent.futures import ThreadPoolExecutor

        def stage(i_b):
            i, b = i_b
            d = staging / b["backup_id"]
            d.mkdir(mode=0o700)
            try:
                extract_object(repo, _object(b, "base.tar.zst"), d, b["backup_id"], progress_interval)
            except Exception as e:
                raise RestoreError(f"backup {b['backup_id']} ({b['kind']}, part {i + 1} of the chain of "
                                   f"{chain[-1]['backup_id']}) cannot be read: {e}") from e
            if verifybackup:
                r = _run([verifybackup, "--quiet", "--no-parse-wal", str(d)])
                if r.returncode != 0:
                    raise RestoreError(f"backup {b['backup_id']} of the chain fails pg_verifybackup: "
                                       f"{r.stderr.strip() or r.stdout.strip()}")
            return str(d)

        # the parts are independent until pg_combinebackup: extract them side by side (zstd and
        # the file writes release the GIL), two at a time
        with ThreadPoolExecutor(max_workers=2) as pool:
            dirs = list(pool.map(stage, enumerate(chain)))
        # the target must be empty for pg_combinebackup -o
        target.rmdir()
        mode = ["--link"] if major >= 18 else ["--copy-file-range"]
        t0 = time.monotonic()
        r = _run([combine, *mode, "-o", str(target), *dirs])
        if r.returncode != 0:
            log.info("pg_combinebackup %s failed (%s); retrying with plain copies", mode[0], r.stderr.strip()[:200])
            if target.exists():
                shutil.rmtree(target)
            r = _run([combine, "-o", str(target), *dirs])
        if r.returncode != 0:
            raise RestoreError(f"pg_combinebackup refused the chain {[b['backup_id'] for b in chain]}: "
                               f"{r.stderr.strip() or r.stdout.strip()}")
        log.info("combined %d backups (%s) with pg_combinebackup %s in %.1f s", len(chain),
                 " -> ".join(b["backup_id"] for b in chain), " ".join(mode), time.monotonic() - t0)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.exists():
            target.mkdir(mode=0o700)


def _run(cmd):
    import subprocess

    return subprocess.run(cmd, capture_output=True, text=True)


# what starting a server on a restored copy writes beside its data directory (PgServer's defaults
# and the private pg_hba of start_restored / restore_pitr)
SIBLING_SUFFIXES = (".log", ".pg_hba.conf", ".sock")


class Footprint:
    """What a restore into `target` writes: the target (or its contents, when it existed) and the
    files beside it that did not exist before. discard() removes exactly those."""

    def __init__(self, target: Path):
        self.target = target
        self.created = not target.exists()
        self.siblings = [p for p in (target.parent / f"{target.name}{s}" for s in SIBLING_SUFFIXES)
                         if not os.path.lexists(p)]

    def discard(self) -> None:
        _undo(self.target, self.created)
        self.discard_siblings()

    def discard_siblings(self) -> None:
        for p in self.siblings:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.lexists(p):
                p.unlink(missing_ok=True)

    def describe(self) -> str:
        kept = [f"data directory {self.target}"] if self.target.exists() else []
        return ", ".join(kept + [str(p) for p in self.siblings if os.path.lexists(p)]) or "nothing was written"


def _undo(target: Path, created: bool) -> None:
    if not target.exists():
        return
    if created:
        shutil.rmtree(target, ignore_errors=True)
    else:
        for p in target.iterdir():
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


SCRATCH_SETTINGS = {
    # a restored copy must never touch production: no archiving, no TCP listener (so no replication
    # client can reach it either; max_wal_senders etc. must stay >= the primary's for hot standby)
    "archive_mode": "off",
    "listen_addresses": "",
    "summarize_wal": "off",
    "hot_standby": "on",
}


def start_restored(target_dir: str | os.PathLike, major: int, *, port: int | None = None,
                   os_user: str | None = None, settings: dict | None = None, tcp: bool = False,
                   keep_failed: bool = False) -> PgServer:
    """Start a server on a restored data directory: private unix socket, private pg_hba (local trust
    only), archive_mode=off. Returns the running PgServer (call .stop()). When it does not start,
    the files it wrote beside the data directory (pg_hba, socket directory, log: its tail is in the
    error) are removed, unless `keep_failed`; the data directory is the caller's."""
    target = Path(target_dir)
    ensure_traversable(target.parent)
    beside = Footprint(target)
    srv = PgServer(target, major=major, port=port, os_user=os_user, listen="127.0.0.1" if tcp else "")
    try:
        s = scratch_settings(target, major, os_user, tcp=tcp)
        s.update(settings or {})
        srv.start(s)
    except BaseException:
        srv.stop("immediate")
        if not keep_failed:
            beside.discard_siblings()
        raise
    return srv


def scratch_settings(target: Path, major: int, os_user: str | None, *, tcp: bool = False) -> dict:
    """Settings of a server started on a restored copy: SCRATCH_SETTINGS, its private pg_hba, and
    the primary's values of the settings hot standby needs at least as high as the primary's
    (from the copy's control file: a primary started with `-c max_connections=500`, or
    max_prepared_transactions > 0, has no trace of it in the copied postgresql.conf, and recovery
    would stop with "insufficient parameter settings")."""
    s = dict(SCRATCH_SETTINGS, hba_file=str(write_private_hba(target, os_user, tcp=tcp)))
    if major < 17:
        s.pop("summarize_wal")
    if tcp:
        s["listen_addresses"] = "127.0.0.1"
    s.update(primary_settings(target, major))
    return s


_CONTROL_SETTINGS = {"max_connections setting": "max_connections",
                     "max_worker_processes setting": "max_worker_processes",
                     "max_wal_senders setting": "max_wal_senders",
                     "max_prepared_xacts setting": "max_prepared_transactions",
                     "max_locks_per_xact setting": "max_locks_per_transaction"}


def primary_settings(target: Path, major: int) -> dict:
    """The hot-standby-relevant settings the primary ran with, read from the restored control file."""
    import subprocess

    try:
        out = subprocess.run([find_program("pg_controldata", major), str(target)], capture_output=True, text=True,
                             env={"LC_ALL": "C", "PATH": os.environ.get("PATH", "")}, timeout=60).stdout
    except Exception as e:  # the server's own check still applies
        log.warning("could not read the control file of %s (%s): the restored server uses its copied settings",
                    target, e)
        return {}
    found = {}
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in _CONTROL_SETTINGS and value.strip().isdigit():
            found[_CONTROL_SETTINGS[key.strip()]] = int(value.strip())
    return found


def write_private_hba(target: Path, os_user: str | None, tcp: bool = False) -> Path:
    """The pg_hba of a restored copy, beside its data directory: local trust only (and loopback)."""
    hba = target.parent / f"{target.name}.pg_hba.conf"
    hba.write_text("local all all trust\n" + ("host all all 127.0.0.1/32 trust\n" if tcp else ""))
    chown_tree(hba, os_user)
    return hba


def run_checks(srv: PgServer, checks: list[str], dbname: str = "postgres", user: str = "postgres") -> list[dict]:
    from .pgconn import query

    results = []
    for sql in checks:
        try:
            rows = query(srv.local_conninfo(dbname, user), sql)
            results.append({"sql": sql, "ok": True, "rows": [list(map(str, r)) for r in rows[:5]]})
        except (ServerError, Exception) as e:
            results.append({"sql": sql, "ok": False, "error": str(e)[:500]})
    return results
