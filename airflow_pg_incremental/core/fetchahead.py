"""Fetch-ahead for restore_command: the mirror of walcmd's push-ahead.

PostgreSQL calls restore_command serially, once per WAL segment, and replays a segment in a few
tens of milliseconds: a call that imports the repository layer (and boto3) and builds a client
each time costs more than the replay itself. So the first `walcmd fetch` of a recovery starts ONE
prefetcher (this module; forked and detached, holding an flock in the spool so exactly one runs)
that keeps one repository object (one S3 client), fetches the segments recovery will ask for next
with a few threads, verifies them, and leaves them in a spool beside pg_wal, from which each later
call takes its segment with the standard library only.

The spool (`pg_wal/pgincr_fetch/`), written by the prefetcher, read by the calls:

    lock                  flock held by the prefetcher while it runs
    pid                   the prefetcher's process id
    request               "<segment> <caller> taken|direct|need": the newest request, written by
                          each call after it took its segment from the spool, or found it damaged
                          (it fetches it directly), or when it needs the prefetcher to fetch it
    ack                   the request the prefetcher has acted on (a segment it was asked for is
                          then in flight as <segment>.part, ready, or <segment>.error)
    <segment>.part        being downloaded: never handed out
    <segment>.<crc32 hex> verified, complete: zstd frame checksum, exact segment size, long page
                          header (its own address and a possible timeline); renamed into place only
                          then. The name carries the CRC-32 of the raw bytes
    <segment>.ok          "<segment>.<crc32 hex> <inode> <size> <mtime> <ctime>" (stat_key), written
                          right after that rename: the file as the prefetcher left it
    <segment>.error       why the prefetcher could not fetch it (the call fetches it directly and
                          reports this too if that fails)
    <segment>.missing     not archived: the repository answered "no such object" and holds the
                          cluster (require_cluster), checked after the call's request; the call exits
                          1 on it, as its own direct fetch would, without paying for one
    <TTTTTTTT>.history.<crc32>, .missing
                          a timeline history file asked for (PostgreSQL looks for the next timeline's
                          at the start and the end of a recovery), fetched or found missing the same
                          way; not part of the window

What comes next: PostgreSQL asks, for segment S, for the newest timeline of its expected history
whose begin segment is <= S (XLogFileReadAnyTLI), falling back to older ones. The plan mirrors that
with the archive's history files, anchored on the timeline of the names PostgreSQL actually
requests (re-planned when a request is not the predicted one). It never runs more than `window`
segments ahead of the newest request (so never further than that past a recovery target), stops at
the end of the archive (a segment not archived: nothing past it is spooled), deletes segments older
than the newest request, and removes itself and the spool when recovery ends (recovery.signal gone,
postmaster gone, or no request for `idle_exit` seconds). Killed, it leaves only .part files (never
handed out); the next call starts a new one.

Handing a segment over: a call renames the ready file to %p only while it is provably the file the
prefetcher verified, for a file damaged in the spool must never reach PostgreSQL (it would read as
the end of WAL and end recovery early, silently). Either its stat_key is still the one in
<segment>.ok (any write to the file since changed its ctime, which the kernel sets and nobody can
set back: walcmd.sh checks this with `stat` and `mv`, without starting Python), or its CRC-32 is
the one in its name (walcmd.py, when the key is missing or differs). A damaged file is removed and
the segment fetched directly.
"""

from __future__ import annotations

import os
import threading
import time
import zlib

from .errors import ChecksumMismatch, ObjectNotFound
from .lsn import segment_name, segno_of, timeline_of

SPOOL_DIR = "pgincr_fetch"
SIGNAL_FILES = ("recovery.signal", "standby.signal")
# test hooks (read from the environment the server passes to restore_command)
TEST_DELAY_ENV = "PGINCR_TEST_FETCH_DELAY"  # seconds each prefetch GET waits first
TRACE_ENV = "PGINCR_TEST_FETCH_TRACE"  # file to append "<event> <segment>" lines to


# -- the spool's names (walcmd's fast path reads them without importing this module) ---------------
def content_checksum(data) -> int:
    """CRC-32 of the raw segment, in the spooled file's name: what walcmd.py checks when the stat key
    recorded in <segment>.ok does not vouch for the file (~3-8 ms for 16 MB)."""
    return zlib.crc32(data) & 0xFFFFFFFF


def stat_key(st: os.stat_result) -> str:
    """"<inode> <size> <mtime> <ctime>", times as `stat -c %.9Y` prints them: what walcmd.sh
    compares with a spooled segment (fetch) or a WAL file (push, pushahead's marker)."""
    return (f"{st.st_ino} {st.st_size} {st.st_mtime_ns // 10**9}.{st.st_mtime_ns % 10**9:09d} "
            f"{st.st_ctime_ns // 10**9}.{st.st_ctime_ns % 10**9:09d}")


def ready_name(segment: str, checksum: int) -> str:
    return f"{segment}.{checksum:08x}"


def parse_ready_name(filename: str) -> tuple[str, int] | None:
    """(WAL file name, checksum) of a ready spool file (a segment or a timeline history file),
    None for any other file (.part, .error, .ok, .missing ...)."""
    name, dot, crc = filename.rpartition(".")
    if len(crc) != 8 or not set(crc) <= _HEX_LOWER:
        return None
    if not (len(name) == 24 and set(name) <= _HEX_UPPER or is_history_name(name)):
        return None
    return name, int(crc, 16)


def is_history_name(name: str) -> bool:
    return len(name) == 16 and name.endswith(".history") and set(name[:8]) <= _HEX_UPPER


_HEX_UPPER, _HEX_LOWER = set("0123456789ABCDEF"), set("0123456789abcdef")


def trace(event: str, name: str) -> None:
    path = os.environ.get(TRACE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{event} {name}\n")


# -- fetching one verified segment -------------------------------------------------------------
def check_segment(name: str, data: bytes, segment_size: int | None = None) -> None:
    """ChecksumMismatch unless `data` is a whole segment (a power of two between 1 MB and 1 GB, the
    size its header names, `segment_size` when known) whose long page header is that of `name`: its
    own address and a timeline <= the name's. (The zstd frame checksum was checked on decompression.)"""
    from .walpage import parse_long_page_header, segment_header_problem

    n = len(data)
    if segment_size and n != segment_size or n & (n - 1) or not (1 << 20) <= n <= (1 << 30):
        raise ChecksumMismatch(f"archived WAL segment {name} is {n} bytes after decompression, not a whole segment"
                               + (f" of {segment_size} bytes" if segment_size else "") + ": the object is damaged; "
                               "run `pgincr verify` and restore it from a copy")
    problem = segment_header_problem(parse_long_page_header(data), name, n)
    if problem:
        raise ChecksumMismatch(f"archived WAL segment {name} is not that segment: {problem}. Recovery would read it "
                               "as the end of WAL; run `pgincr verify` and restore the object from a copy")


def fetch_segment(repo, cluster: str, name: str, segment_size: int | None = None) -> bytes:
    """The raw bytes of archived segment `name`, checked (see check_segment). ObjectNotFound when
    it is not archived."""
    from .wal import fetch_bytes

    data = fetch_bytes(repo, cluster, name, segment_size)
    check_segment(name, data, segment_size)
    return data


def fetch_history(repo, cluster: str, name: str) -> bytes:
    """A timeline history file (ObjectNotFound when it is not archived)."""
    from .wal import fetch_bytes

    return fetch_bytes(repo, cluster, name)


def fetch_direct(repo, cluster: str, name: str, dest: str) -> bool:
    """restore_command's own fetch of WAL file `name` into `dest`: True once restored; False when
    it is not archived, which ends recovery, so said only of a reachable pgincr repository (its
    marker) that holds the cluster; raises for anything else (recovery must stop loudly)."""
    from .lsn import wal_name_kind
    from .metadata import require_cluster
    from .wal import fetch_bytes

    kind = wal_name_kind(name)
    try:
        data = fetch_segment(repo, cluster, name) if kind == "segment" else fetch_bytes(repo, cluster, name)
    except ObjectNotFound:
        require_cluster(repo, cluster)
        return False
    except ChecksumMismatch:
        if repo.keyring is None:
            repo.identity()  # an encrypted repository read without its key says so (not "damaged")
        raise
    write_unsynced(dest, data)
    return True


def write_unsynced(dest: str, data: bytes) -> None:
    """Write `dest` whole or not at all (temp file + rename). No fsync: PostgreSQL fsyncs a file
    restore_command gives it itself (and after a crash fetches the segment again), so an fsync
    here, on the same serial path, would only be paid twice. (The prefetcher's spooled copies are
    written back ahead of time instead: see Prefetcher._fetch_one.)"""
    tmp = f"{dest}.pgincr-tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, dest)


# -- the plan ----------------------------------------------------------------------------------
def timeline_begins(path: dict[int, int | None], segment_size: int) -> list[tuple[int, int]]:
    """[(timeline, first segment number)] oldest first, from wal.timeline_path's {timeline: LSN
    where the path leaves it}: a timeline begins in the segment where its parent was left."""
    out, begin = [], 0
    for tli in sorted(path):
        out.append((tli, begin))
        end = path[tli]
        if end is not None:
            begin = end // segment_size
    return out


def predicted_timeline(begins: list[tuple[int, int]], segno: int) -> int:
    """The timeline PostgreSQL asks for first for segment `segno`: the newest one of its expected
    history that has begun by then."""
    tli = begins[0][0]
    for t, first in begins:
        if first <= segno:
            tli = t
    return tli


def plan_names(begins: list[tuple[int, int]], after_segno: int, count: int, segment_size: int) -> list[str]:
    """The `count` segment names recovery asks for after segment number `after_segno`."""
    return [segment_name(predicted_timeline(begins, s), s, segment_size)
            for s in range(after_segno + 1, after_segno + 1 + count)]


def plan_for_request(repo, cluster: str, requested: str, segment_size: int) -> list[tuple[int, int]]:
    """The timeline path that explains the request: the newest archived timeline's history when it
    predicts the requested timeline (recovery_target_timeline 'latest'), else the requested
    timeline's own history (a timeline given explicitly, or 'current'), else that timeline alone."""
    from .wal import timeline_path

    tli, segno = timeline_of(requested), segno_of(requested, segment_size)
    for anchor in ("latest", tli):
        try:
            begins = timeline_begins(timeline_path(repo, cluster, anchor), segment_size)
        except ObjectNotFound:
            continue
        if predicted_timeline(begins, segno) == tli:
            return begins
    return [(tli, 0)]


# -- the prefetcher ------------------------------------------------------------------------------
class Prefetcher:
    """One per recovery; see the module's docstring. `data_dir`: the server's data directory (the
    postmaster's pid file and recovery.signal say whether recovery still runs)."""

    POLL = 0.003  # how often the newest request is looked at (a read of a small file)
    CHECK = 0.2  # how often the postmaster and recovery.signal are

    def __init__(self, repo, cluster: str, spool: str, data_dir: str, *, window: int = 8, parallel: int = 3,
                 idle_exit: float = 30.0):
        self.repo, self.cluster, self.spool, self.data_dir = repo, cluster, spool, data_dir
        self.window, self.parallel, self.idle_exit = max(1, window), max(1, parallel), idle_exit
        self.seg: int | None = None  # the segment size, known from the first segment fetched
        self.begins: list[tuple[int, int]] | None = None
        self.newest: str | None = None  # the newest requested segment
        self.end: int | None = None  # segment number found missing: the end of the archive
        self.inflight: dict[str, object] = {}  # name -> Future
        self.failed: set[str] = set()
        self.delivered: set[str] = set()  # spooled (and maybe taken since): not fetched again unless needed
        self.closing = False
        self.wake = threading.Event()
        self.stats = {"spooled": 0, "wasted": 0, "errors": 0, "asked_early": 0}
        self._request: str | None = None
        self._last_activity = time.monotonic()  # the last request or finished download

    def _p(self, name: str) -> str:
        return os.path.join(self.spool, name)

    def _server_gone(self) -> bool:
        """Checked before anything is written into the spool: once the postmaster has removed its
        pid file (it stopped, or recovery failed), whoever started it may be removing the data
        directory, and a file created then would leave a directory behind."""
        return not os.path.exists(os.path.join(self.data_dir, "postmaster.pid"))

    # requests --------------------------------------------------------------------------------
    def _new_request(self) -> str | None:
        """The token of a request not seen yet ("<segment> <pid> taken|direct|need"), else None.
        Compared by content: walcmd.sh rewrites the file in place (no rename), and two calls
        within one tick of the file clock leave the same size and mtime (their pids differ)."""
        try:
            with open(self._p("request")) as f:
                token = f.read().strip()
        except FileNotFoundError:
            return None
        if token == self._request or len(token.split()) != 3:
            return None  # seen, or caught between the truncation and the write of a rewrite
        self._request = token
        return token

    def _on_request(self, token: str) -> None:
        """A call asked for a segment: follow it (the window moves with the newest request, even
        backwards), re-plan when it is not the predicted one, fetch it now when the call needs it
        (unless spooled or in flight already), then acknowledge."""
        name, _pid, what = (token.split() + ["", "need"])[:3]
        self._last_activity = time.monotonic()
        self.failed.clear()  # a new request: what failed before is tried again
        if is_history_name(name):  # outside the window: fetched when needed, nothing planned
            if what == "need":
                self._fetch_now(name)
            self._write("ack", token)
            return
        self.newest = name
        if self.seg is not None:  # else its size tells the segment size; the plan waits for it
            segno = segno_of(name, self.seg)
            if self.end is not None and segno >= self.end:
                self.end = None  # asked at or past the end seen: the archive may have grown
            if self.begins is None or predicted_timeline(self.begins, segno) != timeline_of(name):
                self._replan(name)
            self._drop_stale()
        if what == "need":
            self.stats["asked_early"] += 1
            self._fetch_now(name)
        self._write("ack", token)

    def _fetch_now(self, name: str) -> None:
        """A call waits for `name`: unless spooled, or being fetched (its result comes after the
        request), its notes from an earlier fetch go and it is fetched again, so that what the
        call reads after the acknowledgement is about its request."""
        self._collect()  # a fetch of it that has finished counts as an earlier one
        self.delivered.discard(name)
        if name in self.inflight:
            return
        for note in (".missing", ".error"):
            self._unlink(name + note)
        if not self._spooled(name):
            self._start(name)

    def _replan(self, name: str) -> None:
        try:
            self.begins = plan_for_request(self.repo, self.cluster, name, self.seg)
        except Exception as e:  # e.g. the repository unreachable: follow the requested timeline
            self.begins = [(timeline_of(name), 0)]
            trace(f"replan-failed({type(e).__name__})", name)
        trace("plan", name)

    # the spool -----------------------------------------------------------------------------------
    def _write(self, name: str, text: str) -> None:
        if self._server_gone():
            raise _ServerGone()
        tmp = self._p(name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, self._p(name))

    def _entries(self) -> list[str]:
        return os.listdir(self.spool)

    def _spooled(self, name: str) -> bool:
        return any(parse_ready_name(e) and e.startswith(name + ".") for e in self._entries())

    def _wanted(self) -> set[str]:
        if self.seg is None or self.newest is None or self.begins is None:
            return set(self.inflight) | ({self.newest} if self.newest else set())
        base = segno_of(self.newest, self.seg)
        names = plan_names(self.begins, base, self.window, self.seg)
        if self.end is not None:
            names = [n for n in names if segno_of(n, self.seg) < self.end]
        return {self.newest, *names}  # what the newest request is told stays, even past the end

    def _drop_stale(self) -> None:
        """Remove spooled segments (and error notes) nobody will ask for: older than the newest
        request, off the plan, or past the end of the archive."""
        wanted = self._wanted()
        self.delivered &= wanted
        for e in self._entries():
            ready = parse_ready_name(e)
            seg = ready[0] if ready else e.rpartition(".")[0] if e.endswith((".error", ".ok", ".missing")) else None
            if seg and seg not in wanted and not is_history_name(seg):
                self._unlink(e)
                self.stats["wasted"] += bool(ready)

    def _unlink(self, entry: str) -> None:
        try:
            os.unlink(self._p(entry))
        except FileNotFoundError:
            pass

    # fetching ------------------------------------------------------------------------------------
    def _schedule(self) -> None:
        if self.seg is None or self.begins is None or self.newest is None:
            return
        if len(self.inflight) >= self.parallel:
            return
        have = {parse_ready_name(e)[0] for e in self._entries() if parse_ready_name(e)}
        base = segno_of(self.newest, self.seg)
        for name in plan_names(self.begins, base, self.window, self.seg):
            if len(self.inflight) >= self.parallel:
                break
            if self.end is not None and segno_of(name, self.seg) >= self.end:
                break
            if name not in have and name not in self.inflight and name not in self.failed \
                    and name not in self.delivered:
                self._start(name)

    def _start(self, name: str) -> None:
        if self._server_gone():
            raise _ServerGone()
        part = self._p(name + ".part")
        fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # before the ack: 'in flight'
        fut = self.pool.submit(self._fetch_one, name, fd)
        self.inflight[name] = fut
        fut.add_done_callback(lambda _f: self.wake.set())

    def _fetch_one(self, name: str, fd: int) -> tuple[str, int] | None:
        part = self._p(name + ".part")
        try:
            delay = float(os.environ.get(TEST_DELAY_ENV) or 0)
            if delay:
                time.sleep(delay)
            data = fetch_history(self.repo, self.cluster, name) if is_history_name(name) else \
                fetch_segment(self.repo, self.cluster, name, self.seg)
            with open(fd, "wb", closefd=True) as f:
                fd = -1
                f.write(data)
                f.flush()
                # Not for our sake: PostgreSQL fsyncs every segment restore_command gives it
                # (KeepFileRestoredFromArchive's durable_rename), in the startup process, between
                # two segments of replay. Written back here, ahead of it and beside the replay,
                # its fsync finds the pages clean and costs nothing on that serial path.
                os.fdatasync(f.fileno())
            if self.closing or self._server_gone():
                return None
            final = ready_name(name, content_checksum(data))
            os.rename(part, self._p(final))
            self._write(name + ".ok", f"{final} {stat_key(os.stat(self._p(final)))}\n")
            return final, len(data)
        except ObjectNotFound:
            self._note_missing(name)
            raise
        except Exception as e:
            self._error_note(name, e)  # before the .part goes: a waiting call reads it then
            raise
        finally:
            if fd >= 0:
                os.close(fd)
            if os.path.exists(part):
                self._unlink(name + ".part")

    def _note_missing(self, name: str) -> None:
        """`name` is not archived: say so (<name>.missing) once the repository is known to be one and
        to hold the cluster, the same proof the call's own direct fetch needs before its exit 1.
        Anything else is an error note (the call then fetches directly and reports it)."""
        from .metadata import require_cluster

        try:
            require_cluster(self.repo, self.cluster)
        except Exception as e:
            self._error_note(name, e)
            raise
        try:
            self._write(name + ".missing", f"{name} is not in the archive of {self.cluster}\n")
        except (OSError, _ServerGone):
            pass

    def _collect(self) -> None:
        """Act on finished downloads: a missing segment is the end of the archive (nothing past it
        stays in the spool), an error is left for the call to report."""
        for name, fut in list(self.inflight.items()):
            if not fut.done():
                continue
            del self.inflight[name]
            self._last_activity = time.monotonic()
            try:
                done = fut.result()
            except ObjectNotFound:
                if self.seg is not None and not is_history_name(name):
                    segno = segno_of(name, self.seg)
                    self.end = segno if self.end is None else min(self.end, segno)
                self.failed.add(name)
                trace("missing", name)
                continue
            except Exception as e:
                self.failed.add(name)
                self.stats["errors"] += 1
                trace(f"error({type(e).__name__})", name)
                continue
            if done:
                self.delivered.add(name)
                self.stats["spooled"] += 1
                trace("spooled", name)
                if self.seg is None and not is_history_name(name):  # the first segment: now the plan can be made
                    self.seg = done[1]
                    self._replan(self.newest)
        self._drop_stale()

    def _error_note(self, name: str, e: Exception) -> None:
        msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:2000]
        try:
            self._write(name + ".error", msg)
        except (OSError, _ServerGone):
            pass

    # lifetime ------------------------------------------------------------------------------------
    def _why_stop(self) -> str | None:
        if time.monotonic() - self._last_activity > self.idle_exit:
            return f"no request for {self.idle_exit:g}s"
        if not os.path.isdir(self.spool):
            return "the spool was removed"
        if not any(os.path.exists(os.path.join(self.data_dir, s)) for s in SIGNAL_FILES):
            return "recovery ended"
        try:
            with open(os.path.join(self.data_dir, "postmaster.pid")) as f:
                pid = int(f.readline())
            os.kill(pid, 0)
        except PermissionError:  # alive, run by another user
            return None
        except (OSError, ValueError):
            return "the server stopped"
        return None

    def run(self) -> str:
        from concurrent.futures import ThreadPoolExecutor

        why, next_check = None, 0.0
        self.pool = ThreadPoolExecutor(max_workers=self.parallel, thread_name_prefix="pgincr-fetch")
        try:
            self._adopt_spool()
            self._write("pid", str(os.getpid()))
            while why is None:
                token = self._new_request()
                if token:
                    self._on_request(token)
                if token or self.wake.is_set():
                    self.wake.clear()
                    self._collect()
                    self._schedule()
                now = time.monotonic()
                if now >= next_check:
                    why, next_check = self._why_stop(), now + self.CHECK
                self.wake.wait(self.POLL)
        except FileNotFoundError:
            why = "the spool was removed"
        except _ServerGone:
            why = "the server stopped"
        finally:
            # downloads still running are abandoned (the process exits; a thread finishing
            # meanwhile sees `closing` and removes its .part)
            self.closing = True
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.remove_spool()
        return why

    def _adopt_spool(self) -> None:
        """What a killed predecessor left: its downloads (.part) and notes go; its ready files are
        sound (checked whole when spooled, and again by the call) and tell the segment size."""
        for e in self._entries():
            if e.endswith((".part", ".error", ".missing", ".tmp")) or e == "ack":
                self._unlink(e)
            elif (ready := parse_ready_name(e)) and not is_history_name(ready[0]) and self.seg is None:
                size = os.stat(self._p(e)).st_size
                self.seg = size if (1 << 20) <= size <= (1 << 30) and not size & (size - 1) else None

    def remove_spool(self) -> None:
        try:
            entries = self._entries()
        except OSError:
            return
        for e in entries:
            if e != "lock":
                self._unlink(e)
        self._unlink("lock")
        try:
            os.rmdir(self.spool)
        except OSError:
            pass


class _ServerGone(Exception):
    """The postmaster is gone: write nothing more into its data directory."""


def run_prefetcher(repo_url: str, cluster: str, spool: str, data_dir: str, **kwargs) -> str:
    """Open the repository once and prefetch until recovery ends; returns why it stopped."""
    from .repository import env_options, open_repository

    t0 = os.times()
    repo = open_repository(repo_url, origin="cli", **env_options())
    p = Prefetcher(repo, cluster, spool, data_dir, **kwargs)
    why = p.run()
    s, t1 = p.stats, os.times()
    return (f"fetch-ahead stopped ({why}): {s['spooled']} segment(s) prefetched, {s['wasted']} unused, "
            f"{s['errors']} error(s); {s['asked_early']} asked for before they were spooled (more --ahead or "
            f"--parallel would not wait); CPU {t1.user + t1.system - t0.user - t0.system:.2f} s")


def run_detached(lock_fd: int, repo_url: str, cluster: str, spool: str, data_dir: str, **kwargs) -> None:
    """The body of the process walcmd forks (holding the spool's lock on `lock_fd`): detach from
    the call (own session, no descriptor PostgreSQL gave it but the log), prefetch until recovery
    ends, say so in the server's log."""
    os.setsid()
    _detach_fds(lock_fd)
    try:
        _say(run_prefetcher(repo_url, cluster, spool, data_dir, **kwargs))
    except BaseException as e:
        _say(f"fetch-ahead failed: {type(e).__name__}: {e}")


def _detach_fds(keep: int) -> None:
    """stdin/stdout to /dev/null; stderr stays only when it is the server's log file (not a pipe to
    a log collector, which our lifetime would hold open); every other inherited descriptor closed."""
    import stat

    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        log_is_file = stat.S_ISREG(os.fstat(2).st_mode)
    except OSError:
        log_is_file = False
    for fd in (0, 1) if log_is_file else (0, 1, 2):
        os.dup2(devnull, fd)
    os.closerange(3, keep)
    os.closerange(keep + 1, 65536)


def _say(msg: str) -> None:
    try:
        os.write(2, f"{time.strftime('%Y-%m-%d %H:%M:%S')} pgincr wal-fetch[{os.getpid()}]: {msg}\n".encode())
    except OSError:
        pass
