"""Restore of a backup into an empty directory, with optional start of a server and check queries.

Steps: resolve the backup (refuse unknown ids), check the target directory (must be absent or
empty), check the binaries of the backup's major version exist, then stream each object from the
repository (stored checksum, zstd frame checksum and content checksum checked), extract (GNU tar),
run pg_verifybackup (files and sizes against backup_manifest: the stream's checksums proved the
bytes; a combined chain also gets the manifest's checksums), set ownership/permissions a server
accepts, and flush the filesystem (durable before it returns; the write-back overlaps the
extraction). Any failure removes what the restore created. Chains (incrementals) and PITR slot in
between extraction and start. The report's `timings` splits the wall time per step.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tarfile
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from .binaries import find_program
from .codec import ObjectInfo, VerifyingReader, _grow_pipe
from .durable import WriteBehind, make_durable, nearest_existing
from .errors import ConfigError, RestoreError, ServerError
from .metadata import object_info, require_cluster, resolve_backup
from .names import validate_backup_id, validate_cluster
from .progress import CountingReader, Progress
from .repository import Repository
from .server import PgServer, chown_tree, ensure_traversable
from .tablespaces import (
    extract_with_tablespaces,
    make_tablespace_dirs,
    own_tablespace_dirs,
    plan_tablespaces,
    point_tablespaces,
    relocations,
    staged_tablespace_dirs,
    tablespace_paths,
)

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


def extract_backup(repo: Repository, meta: dict, dest: Path, interval: float = 10.0) -> None:
    """Extract a backup's base.tar.zst into `dest`, with its backup_manifest beside it."""
    extract_object(repo, _object(meta, "base.tar.zst"), dest, meta["backup_id"], interval)
    place_manifest(repo, meta, dest)


def place_manifest(repo: Repository, meta: dict, dest: Path) -> None:
    """Write the backup's backup_manifest into `dest` when its tar did not hold one (a backup that
    PostgreSQL compressed keeps the manifest only as the object backup_manifest.zst; see
    backup_stream), checksums verified."""
    path = Path(dest) / "backup_manifest"
    if path.exists():
        return
    info = _object(meta, "backup_manifest.zst")
    tmp = path.with_name("backup_manifest.pgincr-tmp")
    with repo.open(info.key) as stored, open(tmp, "wb") as out:
        shutil.copyfileobj(VerifyingReader(stored, info), out, 1 << 20)
    os.chmod(tmp, 0o600)
    os.rename(tmp, path)


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


TAR_RECORD = 1 << 20  # bytes per read of GNU tar, per write of ours, and the pipe's size between us


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
    # 1 MiB records read whole (-b 2048 -B) from a 1 MiB pipe: GNU tar's default 10 KiB reads from a
    # 64 KiB pipe cost a third of the extraction's wall time (scale 20: 0.70 s -> 0.48 s)
    proc = subprocess.Popen([tar, "-x", "-f", "-", "-b", str(TAR_RECORD // 512), "-B", "-C", str(dest),
                             "--no-same-owner", "--delay-directory-restore"], stdin=subprocess.PIPE, stderr=err)
    _grow_pipe(proc.stdin.fileno(), TAR_RECORD)
    try:
        with repo.open(info.key, size=info.stored_size) as stored:
            reader = VerifyingReader(stored, info)
            ahead = _ReadAhead(reader.read, TAR_RECORD)
            try:
                with ahead:
                    for data in ahead:
                        scanner.feed(data)  # raises before tar sees a forbidden member
                        proc.stdin.write(data)
                        progress.add(len(data))
            except Exception as e:
                _blame_damage(reader, ahead.error, e)
                raise
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


class _ReadAhead:
    """The chunks `read(size)` returns, read by a background thread up to `depth` chunks ahead:
    reading the stored object, its SHA-256 and the decompression (which all release the GIL) run
    beside the tar scan and the writes into tar's pipe. An error of the reader (a checksum
    mismatch at the end) is raised to the consumer; leaving the `with` block stops the thread."""

    def __init__(self, read, size: int, depth: int = 4):
        import queue
        import threading

        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self.error: BaseException | None = None  # the reader's error, even if never consumed
        self._thread = threading.Thread(target=self._run, args=(read, size), name="pgincr-read-ahead", daemon=True)
        self._thread.start()

    def _run(self, read, size: int) -> None:
        try:
            while True:
                data = read(size)
                if not self._put(data) or not data:
                    return
        except BaseException as e:  # handed to the consumer
            self.error = e
            self._put(e)

    def _put(self, item) -> bool:
        import queue

        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        while True:
            item = self._q.get()
            if isinstance(item, BaseException):
                raise item
            if not item:
                return
            yield item

    def __enter__(self) -> "_ReadAhead":
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _extract_with_tarfile(repo: Repository, info: ObjectInfo, dest: Path, what: str, interval: float) -> None:
    progress = Progress(f"restore {what}", info.raw_size, log, interval)
    with repo.open(info.key, size=info.stored_size) as stored:
        reader = VerifyingReader(stored, info)
        try:
            with tarfile.open(fileobj=CountingReader(reader, progress), mode="r|", bufsize=1 << 20) as tf:
                tf.extractall(dest, filter=_base_backup_filter)
        except Exception as e:
            _blame_damage(reader, None, e)
            raise
        reader.drain()
    progress.finish()


def _blame_damage(reader: VerifyingReader, read_error: BaseException | None, error: Exception) -> None:
    """An extraction stopped part-way (a header that is no tar header, a refused member, tar
    exiting): when the stored object is damaged, that is the cause to report. A server-compressed
    backup's zstd frames carry no content checksum, so a flipped byte decompresses into a garbled
    tar stream; the object's stored SHA-256, checked by reading it to its end, names the damage."""
    from .errors import ChecksumMismatch

    if isinstance(error, ChecksumMismatch):
        return
    if isinstance(read_error, ChecksumMismatch):
        raise read_error from error
    try:
        reader.drain()
    except ChecksumMismatch as damaged:
        raise damaged from error
    except Exception:  # the stored object cannot be read to its end: the first error stands
        return
    from .tarscan import TarFormatError

    if isinstance(error, TarFormatError):  # the object is as stored, and is no tar archive
        raise RestoreError(f"{reader.expected.key} is not a readable tar archive: {error}") from error


class Timings:
    """Wall time per step of a restore (the RTO split): `with timings.step("extract"): ...`. Steps
    run one after another, so their sum never exceeds the whole."""

    def __init__(self):
        self.parts: dict[str, float] = {}

    @contextmanager
    def step(self, name: str):
        t = time.monotonic()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.monotonic() - t

    def add(self, other: dict) -> None:
        for k, v in other.items():
            self.parts[k] = self.parts.get(k, 0.0) + v

    def as_dict(self) -> dict:
        return {k: round(v, 3) for k, v in self.parts.items()}


# What pg_verifybackup checks after an extraction. The stored SHA-256 and the zstd frame checksum,
# both checked while streaming, already prove every byte of the tar that GNU tar wrote: re-reading
# the extracted files for the manifest's checksums proves nothing more (they come from the page
# cache, not the disk). So an extracted backup gets --skip-checksums: every file the manifest lists
# is present with its size, and (a whole backup) its WAL parses. The output of pg_combinebackup is
# produced here, from several parts: it gets the full check, checksums included.
VERIFY_EXTRACTED = ["--skip-checksums"]
VERIFY_COMBINED: list[str] = []
# background flush interval while a single backup is extracted (None: off). Scale-20 full, median of
# 10-15 runs: no flush 0.55 s; one flush at the end 0.79 s; every 0.5 s 0.67-0.70 s; every 0.25 s 0.56-0.68 s
WRITE_BEHIND_S = 0.25
OVERLAP_FLUSH = True  # a combined chain is flushed while pg_verifybackup reads it (False: after it)


def restore_backup(repo: Repository, cluster: str, backup_id: str | None, target_dir: str | os.PathLike, *,
                   verify: bool = True, os_user: str | None = None, progress_interval: float = 10.0,
                   keep_failed: bool = False, tablespace_map: dict | None = None,
                   tablespaces_in_place: bool = False) -> dict:
    """Restore backup `backup_id` ('latest' for the newest) of `cluster` into `target_dir`. Durable
    when it returns (every file and directory entry flushed to disk). On failure what it wrote is
    removed (kept with `keep_failed`, for debugging). The report's `timings` splits the wall time
    into extract, combine, verify and sync.

    A backup of a cluster with tablespaces needs `tablespace_map` ({name or OID: new directory},
    each absent or empty) or `tablespaces_in_place` (its original directories, absent or empty);
    without either it is refused before anything is touched (see core.tablespaces)."""
    validate_cluster(cluster)
    if backup_id not in (None, "latest"):
        validate_backup_id(backup_id)  # bad input is refused before any I/O
    require_cluster(repo, cluster)
    meta = resolve_backup(repo, cluster, backup_id)
    target = check_target_dir(target_dir)
    major = meta["pg_major"]
    verifybackup = find_program("pg_verifybackup", major) if verify else None
    _object(meta, "base.tar.zst")  # refused before anything is touched when missing
    chain = [meta]
    if meta.get("parent_id"):
        from .incremental import resolve_chain

        # refuses a broken chain before anything is touched; a synthetic full stands in for its prefix
        chain = resolve_chain(repo, cluster, meta)
        if len(chain) > 1:
            combine = find_program("pg_combinebackup", major)
        for b in chain:
            _object(b, "base.tar.zst")
    spaces = plan_tablespaces(meta, tablespace_map, tablespaces_in_place, target)
    for b in chain:
        for t in b.get("tablespaces") or []:
            _object(b, t["object"])
    created = not target.exists()
    anchor = nearest_existing(target)  # holds the entry of what the restore creates
    t0 = time.monotonic()
    timings = Timings()
    log.info("restoring backup %s of %s (PostgreSQL %s, %s) into %s", meta["backup_id"], cluster, major,
             meta.get("kind"), target)
    try:
        target.mkdir(parents=True, exist_ok=True)
        os.chmod(target, 0o700)
        make_tablespace_dirs(spaces)
        if len(chain) == 1:
            with timings.step("extract"), _write_behind(target):
                extract_with_tablespaces(repo, chain[0], target, {t.oid: t.dest for t in spaces}, progress_interval)
            if verify:
                with timings.step("verify"):
                    _verify(verifybackup, target, VERIFY_EXTRACTED, f"the restored backup {chain[0]['backup_id']}")
        else:
            _combine_chain(repo, chain, target, combine, verifybackup, major, progress_interval, timings,
                           spaces=spaces)
        _drop_signal_files(target, meta)
        point_tablespaces(target, spaces)
        os.chmod(target, 0o700)
        chown_tree(target, os_user)
        own_tablespace_dirs(spaces, os_user)
        with timings.step("sync"):
            make_durable(target, anchor, *tablespace_paths(spaces))
    except BaseException:
        if not keep_failed:
            _undo(target, created)
            for t in spaces:
                _undo(t.dest, t.created)
        raise
    took = time.monotonic() - t0
    split = timings.as_dict()
    log.info("backup %s restored into %s in %.1f s (%s)%s", meta["backup_id"], target, took,
             ", ".join(f"{k} {v:.2f} s" for k, v in split.items()), " (pg_verifybackup passed)" if verify else "")
    return {"cluster": cluster, "backup_id": meta["backup_id"], "target_dir": str(target), "pg_major": major,
            "chain": [b["backup_id"] for b in chain],
            "verified": verify, "restore_seconds": round(took, 3), "timings": split, "durable": True,
            "tablespaces": [t.report() for t in spaces],
            "stop_lsn": meta.get("stop_lsn"),
            "timeline": meta.get("timeline"), "bootstrap_superuser": meta.get("bootstrap_superuser")}


# A backup taken from a standby holds its standby.signal (and primary_conninfo in
# postgresql.auto.conf): started as it is, the restored copy would enter standby mode and stream
# from the live primary. A restore is never a standby of its source; the signal files go (after
# pg_verifybackup, whose manifest lists them), and PITR writes its own recovery.signal.
SIGNAL_FILES = ("standby.signal", "recovery.signal")


def _drop_signal_files(target: Path, meta: dict) -> None:
    for name in SIGNAL_FILES:
        path = target / name
        if path.exists():
            path.unlink()
            log.info("removed %s from the restored copy of %s (taken from a standby): it would stream from the "
                     "source's primary; create it again to make this copy a standby", name, meta["backup_id"])


def _write_behind(target: Path):
    return WriteBehind(target, WRITE_BEHIND_S) if WRITE_BEHIND_S else nullcontext()


def _verify(verifybackup: str, directory: Path, options: list[str], what: str) -> None:
    r = _run([verifybackup, "--quiet", *options, str(directory)])
    if r.returncode != 0:
        raise RestoreError(f"pg_verifybackup rejected {what}: {r.stderr.strip() or r.stdout.strip()}")


def _combine_chain(repo, chain, target: Path, combine: str, verifybackup: str | None, major: int,
                   progress_interval: float, timings: Timings, *, flush: bool = True,
                   spaces: list | None = None) -> None:
    """Stage every backup of the chain beside the target (same filesystem), verify each, then
    pg_combinebackup them oldest -> newest into the target (no fsync of its own: the restore
    flushes the filesystem once at the end), each tablespace of the newest into its directory of
    `spaces` (pg_combinebackup -T). Staging is removed in every case."""
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
                extract_with_tablespaces(repo, b, d, staged_tablespace_dirs(staging, b), progress_interval)
            except Exception as e:
                raise RestoreError(f"backup {b['backup_id']} ({b['kind']}, part {i + 1} of the chain of "
                                   f"{chain[-1]['backup_id']}) cannot be read: {e}") from e
            return d

        # the parts are independent until pg_combinebackup: extract them side by side (zstd and
        # the file writes release the GIL), two at a time
        # no write-behind here: it would also write back the incremental parts, which go once combined
        with timings.step("extract"), ThreadPoolExecutor(max_workers=2) as pool:
            dirs = list(pool.map(stage, enumerate(chain)))
        if verifybackup:
            with timings.step("verify"):
                for b, d in zip(chain, dirs):
                    _verify(verifybackup, d, ["--no-parse-wal", *VERIFY_EXTRACTED],
                            f"backup {b['backup_id']} of the chain")
        # the target must be empty for pg_combinebackup -o
        target.rmdir()
        relocate = relocations(staging, chain[-1], spaces or [])
        with timings.step("combine"):
            mode = _combine(combine, major, target, dirs, relocate, [t.dest for t in spaces or []])
        log.info("combined %d backups (%s) with pg_combinebackup %s in %.1f s", len(chain),
                 " -> ".join(b["backup_id"] for b in chain), " ".join(mode), timings.parts["combine"])
        shutil.rmtree(staging, ignore_errors=True)  # the parts' dirty pages go unwritten
        if verifybackup:
            # pg_verifybackup reads the output from the page cache while the kernel writes it back
            flusher = WriteBehind(target, immediate=True).start() if OVERLAP_FLUSH and flush else None
            try:
                with timings.step("verify"):
                    _verify(verifybackup, target, VERIFY_COMBINED, f"the combined backup {chain[-1]['backup_id']}")
            finally:
                if flusher is not None:
                    with timings.step("sync"):
                        flusher.stop()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.exists():
            target.mkdir(mode=0o700)


def _combine(combine: str, major: int, target: Path, dirs: list[Path], relocate: list[str] = (),
             tablespace_dirs: list[Path] = ()) -> list[str]:
    """pg_combinebackup the staged parts into `target` (`relocate`: its -T options): hard links
    (18+; the staging goes afterwards) or copy_file_range, plain copies when that fails. Returns
    the mode used."""
    mode = ["--link"] if major >= 18 else ["--copy-file-range"]
    r = _run([combine, *mode, "--no-sync", *relocate, "-o", str(target), *map(str, dirs)])
    if r.returncode != 0:
        log.info("pg_combinebackup %s failed (%s); retrying with plain copies", mode[0], r.stderr.strip()[:200])
        if target.exists():
            shutil.rmtree(target)
        for d in tablespace_dirs:
            _undo(d, False)
        mode = ["--copy"]
        r = _run([combine, "--no-sync", *relocate, "-o", str(target), *map(str, dirs)])
    if r.returncode != 0:
        raise RestoreError(f"pg_combinebackup refused the chain {[d.name for d in dirs]}: "
                           f"{r.stderr.strip() or r.stdout.strip()}")
    return mode


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
        self.tablespaces: list[tuple[Path, bool]] = []

    def add_tablespaces(self, report: dict) -> None:
        """The tablespace directories a restore (its report) filled: emptied by discard()."""
        self.tablespaces += [(Path(t["directory"]), t["created"]) for t in report.get("tablespaces") or []]

    def discard(self) -> None:
        _undo(self.target, self.created)
        for d, created in self.tablespaces:
            _undo(d, created)
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
    if major >= 14 and sys.platform.startswith("linux"):
        # the restore flushed the copy already: PostgreSQL's own pass over a copy that was not shut
        # down cleanly is then one syncfs instead of an fsync per file (0.2 s at pgbench scale 20)
        s["recovery_init_sync_method"] = "syncfs"
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
