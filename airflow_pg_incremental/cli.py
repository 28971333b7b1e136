"""pgincr: command line of airflow-pg-incremental. Imports no Airflow (except `demo`, lazily).

Repository: --repo (or $PGINCR_REPO): an absolute directory or s3://bucket/prefix; S3 credentials
come from the standard AWS environment, endpoint from $PGINCR_S3_ENDPOINT_URL / $AWS_ENDPOINT_URL.
PostgreSQL connection: --host/--port/--user/--dbname or the PG* environment; the password only
from $PGPASSWORD or ~/.pgpass, never from the command line.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .core.errors import PgIncrError


def _repo(args, must_exist: bool = True):
    """The repository of --repo / $PGINCR_REPO; unless told otherwise, its identity marker is
    checked: a mistyped location is an error, never an empty repository."""
    from .core.names import validate_cluster
    from .core.repository import open_repository

    if getattr(args, "cluster", None) is not None:
        validate_cluster(args.cluster)  # bad input is refused before anything is touched
    url = args.repo or os.environ.get("PGINCR_REPO")
    if not url:
        raise PgIncrError("no repository: pass --repo DIR|s3://bucket/prefix or set PGINCR_REPO")
    repo = open_repository(url, origin="cli", **_options())
    if must_exist:
        repo.identity()
    return repo


def _options(copy: bool = False) -> dict:
    """open_repository's options from the environment: the repository key(s) from $PGINCR_REPO_KEY
    (+ $PGINCR_REPO_OLD_KEYS; for the destination of `copy`, $PGINCR_COPY_REPO_KEY and
    $PGINCR_COPY_REPO_OLD_KEYS when set), S3 server-side encryption from $PGINCR_S3_SSE and
    $PGINCR_S3_SSE_KMS_KEY_ID."""
    from .core.repository import env_options
    from .core.repository.crypt import Keyring

    opts = env_options()
    if copy and os.environ.get("PGINCR_COPY_REPO_KEY", "").strip():
        opts["keyring"] = Keyring.from_texts(os.environ["PGINCR_COPY_REPO_KEY"],
                                             os.environ.get("PGINCR_COPY_REPO_OLD_KEYS"),
                                             what="PGINCR_COPY_REPO_KEY", old_what="PGINCR_COPY_REPO_OLD_KEYS")
    return opts


def cmd_repo_create(args) -> int:
    from .core.server import repository_owner_default

    repo = _repo(args, must_exist=False)
    if args.encrypt and repo.keyring is None:
        raise PgIncrError("--encrypt needs the repository key in PGINCR_REPO_KEY (32 random bytes, base64 or hex; "
                          "`pgincr repo-key-new` makes one: keep it safe, without it nothing can be restored)")
    if repo.keyring is not None and not args.encrypt:
        raise PgIncrError("PGINCR_REPO_KEY is set: pass --encrypt to create an encrypted repository, or unset it")
    marker, created = repo.create(owner=args.owner or (repository_owner_default()
                                                      if not str(repo.url).startswith("s3://") else None))
    out = {"repository": repo.url, "created": created, **{k: marker.get(k) for k in
                                                           ("repository_id", "format", "created_at",
                                                            "adopted_clusters")},
           "encrypted": bool(marker.get("encryption")),
           "key_ids": sorted((marker.get("encryption") or {}).get("checks") or {})}
    if getattr(repo, "root", None) is not None:
        import pwd

        out["owner"] = pwd.getpwuid(os.stat(repo.root).st_uid).pw_name
    if args.json:
        _print(out, True)
    elif created:
        adopted = marker.get("adopted_clusters") or []
        print(f"created repository {repo.url} (id {marker['repository_id']}"
              + (f", owner {out['owner']}" if out.get("owner") else "")
              + (f", encrypted, key id {out['key_ids'][0]}" if out["encrypted"] else "") + ")"
              + (f"; adopted the existing cluster(s) {', '.join(adopted)}" if adopted else ""))
    else:
        print(f"{repo.url} is a repository already (id {marker.get('repository_id')}, created "
              f"{marker.get('created_at')}): nothing changed")
    return 0


def cmd_repo_key_new(args) -> int:
    from .core.repository.crypt import new_key_text

    print(new_key_text())
    return 0


def cmd_repo_key_add(args) -> int:
    repo = _repo(args, must_exist=False)
    marker, added = repo.add_key()
    ids = sorted((marker.get("encryption") or {}).get("checks") or {})
    out = {"repository": repo.url, "added": added, "key_id": repo.keyring.current_id, "key_ids": ids}
    _emit(args, out, [(f"added key id {out['key_id']} to {repo.url}: new objects are written under it; keep the "
                       "older key(s) in PGINCR_REPO_OLD_KEYS to read what they wrote" if added else
                       f"key id {out['key_id']} is a key of {repo.url} already: nothing changed"),
                      f"  the repository's keys: {', '.join(ids)}"])
    return 0


def _conninfo(args, dbname_default="postgres"):
    from .core.pgconn import ConnInfo

    return ConnInfo(host=args.host or os.environ.get("PGHOST"), port=int(args.port or os.environ.get("PGPORT") or 5432),
                    user=args.user or os.environ.get("PGUSER"), password=os.environ.get("PGPASSWORD"),
                    dbname=args.dbname or os.environ.get("PGDATABASE") or dbname_default, origin="cli")


def _primary(args, conn):
    """--primary-host/--primary-port: the primary of the standby being backed up (same role, password
    and database as the standby's connection)."""
    if not getattr(args, "primary_host", None):
        if getattr(args, "primary_port", None):
            from .core.errors import ConfigError

            raise ConfigError("--primary-port needs --primary-host")
        return None
    from .core.pgconn import ConnInfo

    return ConnInfo(host=args.primary_host, port=int(args.primary_port or 5432), user=conn.user,
                    password=conn.password, dbname=conn.dbname, origin="cli")


def _catalog(args):
    if not getattr(args, "catalog_db", None):
        return None
    from .core.catalog import Catalog
    from .core.pgconn import ConnInfo

    base = _conninfo(args)
    return Catalog(ConnInfo(host=base.host, port=base.port, user=base.user, password=base.password,
                            dbname=args.catalog_db, origin="cli"), schema=args.catalog_schema)


def _jsonable(row):
    if row is None:
        return None
    return {k: (str(v) if not isinstance(v, (str, int, float, bool, list, dict, type(None))) else v)
            for k, v in row.items()}


def _print(obj, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))
    else:
        print(obj if isinstance(obj, str) else json.dumps(obj, indent=2, default=str))


def _emit(args, data: dict, lines: list[str]) -> None:
    """JSON with --json, else the short human summary."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print("\n".join(line for line in lines if line is not None))


def _compressed_by(c: dict | None) -> str:
    if not c:
        return ""
    where = {"server": "the database server", "client": "pg_basebackup", "python": "pgincr"}.get(c.get("where"), "?")
    return f", zstd-{c.get('level')} by {where} ({c.get('threads')} thread(s))"


def cmd_backup(args) -> int:
    from .core.backup import summary, take_full_backup
    from .core.preflight import ensure_wal_archiving
    from .core.progress import human_bytes

    conn, repo = _conninfo(args), _repo(args)
    primary = _primary(args, conn)
    # the backup's WAL must reach the repository, or the backup is no use for point-in-time recovery
    # (from a standby's backup: the primary archives it)
    wal = ensure_wal_archiving(primary or conn, repo, args.cluster, args.wal_mode, slot=args.slot)
    kw = {"compression_level": args.level, "threads": args.threads, "compression": args.compression,
          "catalog": _catalog(args), "primary": primary}
    if args.kind == "full":
        meta = take_full_backup(conn, repo, args.cluster, **kw)
    else:
        from .core.incremental import take_planned_backup

        meta = take_planned_backup(conn, repo, args.cluster, kind=args.kind, max_chain_length=args.max_chain, **kw)
        if meta["kind"] == "none":
            _emit(args, {"cluster": args.cluster, "kind": "none", "reason": meta["reason"]},
                  [f"no backup taken: {meta['reason']}"])
            return 0
    out = summary(meta)
    if meta.get("plan"):
        out["plan"] = meta["plan"]
    out["wal_archiving"] = {k: wal.get(k) for k in ("mode", "slot", "warnings")}
    reason = (meta.get("plan") or {}).get("reason")
    nxt = {"pull": f"WAL: replication slot {wal['slot']} holds it on the server until `pgincr capture --cluster "
                   f"{args.cluster}` stores it: capture regularly",
           "push": "WAL: archive_command pushes it", "none": "WAL: not archived (--wal-mode none): no point-in-time "
                                                             "recovery from this backup"}[wal["mode"]]
    _emit(args, out, [
        f"{out['kind']} backup {out['backup_id']} of {args.cluster} complete: {human_bytes(out['raw_bytes'] or 0)} "
        f"read, {human_bytes(out['stored_bytes'] or 0)} stored in {out['duration_s']:.1f} s",
        f"  LSN {out['start_lsn']} .. {out['stop_lsn']}, timeline {out['timeline']}, PostgreSQL {out['pg_major']}"
        + _compressed_by(out.get("compression"))
        + (f", on top of {out['parent_id']}" if out.get("parent_id") else ""),
        f"  a full was taken instead of {args.kind}: {reason}" if reason else None,
        _from_standby(meta),
        f"  {nxt}", *[f"  WARNING: {w}" for w in wal["warnings"]]])
    return 0


def _from_standby(meta: dict) -> str | None:
    if not meta.get("from_standby"):
        return None
    caught = meta.get("standby_catch_up")
    if caught:
        p = meta.get("primary") or {}
        return (f"  taken from the standby; the primary {p.get('host')}:{p.get('port')} checkpointed at "
                f"{caught['checkpoint_lsn']} first (replayed in {caught['waited_s']:.2f} s)")
    return ("  taken from the standby without its primary: it starts at the standby's last restartpoint "
            "(--primary-host makes it start now)")


def cmd_info(args) -> int:
    from .core.metadata import (
        find_incomplete,
        list_backups,
        list_clusters,
        require_cluster,
    )
    from .core.metadata import damaged_backups
    from .core.progress import human_bytes
    from .core.wal import continuity, list_history

    repo = _repo(args)
    if args.cluster:
        require_cluster(repo, args.cluster)
    clusters = [args.cluster] if args.cluster else list_clusters(repo)
    ident = repo.identity()
    enc = ident.get("encryption")
    out = {"repository": repo.url, "repository_id": ident.get("repository_id"),
           "repository_created_at": ident.get("created_at"),
           "encryption": {"cipher": enc.get("cipher"), "key_ids": sorted(enc.get("checks") or {}),
                          "current_key_id": repo.keyring.current_id} if enc else None, "clusters": {}}
    for cl in clusters:
        backups = list_backups(repo, cl)
        out["clusters"][cl] = {
            "backups": [{k: b.get(k) for k in ("backup_id", "kind", "parent_id", "start_lsn", "stop_lsn", "timeline",
                                               "pg_major", "started_at", "finished_at", "duration_s", "raw_bytes",
                                               "stored_bytes", "system_identifier")} for b in backups],
            "incomplete": [i["backup_id"] for i in find_incomplete(repo, cl)],
            "unfinished_writes": [{k: w[k] for k in ("key", "kind", "age_s", "bytes")}
                                  for w in repo.abandoned_writes(cl, 0)],
        }
        bl = out["clusters"][cl]["backups"]
        from .core.lsn import parse_lsn

        start = parse_lsn(bl[0]["start_lsn"]) if bl and bl[0]["start_lsn"] else None
        cont = continuity(repo, cl, from_lsn=start, timeline=bl[0]["timeline"] if bl else None)
        out["clusters"][cl]["wal"] = {
            "timelines": {str(k): {kk: v[kk] for kk in ("first", "last", "count", "missing_count")}
                          for k, v in cont["timelines"].items()},
            "history": list_history(repo, cl), "gaps": cont["gaps"][:20], "missing_history": cont["missing_history"],
            "continuous": cont["ok"], "window": _window(repo, cl, backups)}
        out["clusters"][cl]["damaged"] = [{"backup_id": b, "problem": p} for b, p in damaged_backups(repo, cl)]
    cat = _catalog(args)
    if cat is not None:
        for cl, d in out["clusters"].items():
            d["last_verification"] = {b["backup_id"]: _jsonable(cat.last_verification(cl, b["backup_id"]))
                                      for b in d["backups"]}
            tests = cat.restore_tests(cl, limit=1)
            d["last_restore_test"] = _jsonable(tests[0]) if tests else None
            d["metrics"] = _jsonable(cat.metrics(cl))
    if args.json:
        _print(out, True)
        return 0
    enc = out["encryption"]
    print(f"repository {repo.url} (id {out['repository_id']}, created {out['repository_created_at']}"
          + (f"; encrypted, {enc['cipher']}, key id {enc['current_key_id']} of {', '.join(enc['key_ids'])}"
             if enc else "") + ")")
    for cl, d in out["clusters"].items():
        print(f"\ncluster {cl}: {len(d['backups'])} backup(s)")
        print(f"  {'backup id':<24} {'kind':<12} {'PG':>3} {'start LSN':>12} {'stop LSN':>12} {'TL':>3} "
              f"{'raw':>10} {'stored':>10} {'secs':>6}  finished")
        for b in d["backups"]:
            print(f"  {b['backup_id']:<24} {b['kind']:<12} {b['pg_major']:>3} {b['start_lsn'] or '':>12} "
                  f"{b['stop_lsn'] or '':>12} {b['timeline'] or '':>3} {human_bytes(b['raw_bytes'] or 0):>10} "
                  f"{human_bytes(b['stored_bytes'] or 0):>10} {b['duration_s'] or 0:>6.1f}  {b['finished_at']}")
        wal = d["wal"]
        for tl, v in wal["timelines"].items():
            missing = f", {v['missing_count']} MISSING" if v["missing_count"] else ""
            print(f"  WAL timeline {tl}: {v['count']} segment(s) {v['first']} .. {v['last']}{missing}")
        if wal["window"]:
            w = wal["window"]
            end = (f"{w['end_time'] or 'time unknown'} (LSN {w['end_lsn']})" if w.get("end_lsn") else
                   "its start only (no WAL archived after it)")
            print(f"  recoverable window: {w['start_time']} (LSN {w['start_lsn']}) .. {end}"
                  f"{'' if wal['continuous'] else '  (GAPS: ' + ', '.join(wal['gaps'][:3]) + ')'}")
        for dmg in d["damaged"]:
            print(f"  DAMAGED backup {dmg['backup_id']}: {dmg['problem']}")
        if d.get("last_restore_test"):
            t = d["last_restore_test"]
            print(f"  last restore test: {t['started_at']} {'PASSED' if t['ok'] else 'FAILED'} to {t['target_kind']} "
                  f"{t['target_value'] or ''} in {t['restore_seconds']} s (backup {t['backup_id']})")
        if d.get("last_verification"):
            ver = {k: v for k, v in d["last_verification"].items() if v}
            bad = [k for k, v in ver.items() if not v["ok"]]
            print(f"  verified: {len(ver)} of {len(d['backups'])} backup(s)" + (f"; FAILED: {', '.join(bad)}" if bad else ""))
        if d["incomplete"]:
            print(f"  incomplete (interrupted, not restorable; removed by 'pgincr cleanup'): {', '.join(d['incomplete'])}")
        if d["unfinished_writes"]:
            w = d["unfinished_writes"]
            print(f"  unfinished writes (running, or left by a killed process; 'pgincr cleanup' removes those older "
                  f"than 6 h): {len(w)}, {human_bytes(sum(x['bytes'] or 0 for x in w))}, oldest "
                  f"{max(x['age_s'] for x in w) / 3600:.1f} h")
    return 0


def _window(repo, cluster: str, backups: list[dict]) -> dict | None:
    """The recoverable window from the oldest backup on: its start, and the last point recovery
    can reach (the last archived record's LSN and the last commit's time)."""
    from .core.pitr import archive_window

    if not backups:
        return None
    first = backups[0]
    out = {"from_backup": first["backup_id"], "start_lsn": first.get("stop_lsn"), "start_time": first.get("finished_at"),
           "end_lsn": None, "end_time": None, "archive_end_lsn": None}
    try:
        win = archive_window(repo, cluster, first)
    except Exception as e:  # e.g. a missing history file: shown, not fatal for info
        out["problem"] = str(e)
        return out
    out.update(end_lsn=win.get("last_record_lsn") or win.get("end_lsn"), end_time=win.get("end_time"),
               archive_end_lsn=win.get("end_lsn"), gap_after=win.get("gap_after"))
    return out


def _target(args):
    given = [(k, getattr(args, f"target_{k}")) for k in ("time", "lsn", "xid", "name") if getattr(args, f"target_{k}")]
    if args.target:
        given.append((args.target, None))
    if len(given) > 1:
        raise PgIncrError("give one recovery target: --target-time, --target-lsn, --target-xid, --target-name or "
                          "--target latest|immediate")
    if not given:
        return None
    from .core.pitr import parse_target

    kind, value = given[0]
    return parse_target(kind, value, inclusive=not args.exclusive, action=args.action)


def cmd_restore(args) -> int:
    from .core.server import default_os_user

    os_user = args.os_user if args.os_user is not None else default_os_user()
    target = _target(args)

    def restore(repo) -> dict:
        if target is None:
            return _restore_and_check(args, os_user, repo)
        from .core.pitr import restore_pitr

        rep = restore_pitr(repo, args.cluster, target, args.target_dir,
                           backup_id=None if args.backup_id == "latest" else args.backup_id, os_user=os_user,
                           port=args.port, verify=not args.no_verify, keep_running=args.start,
                           checks=args.check, timeout_s=args.timeout, **_keep_failed(args), **_tablespaces(args))
        rep.pop("server", None)
        return rep

    if args.fallback_repo:
        from .core.copies import restore_with_fallback
        from .core.repository import open_repository

        first = _repo(args, must_exist=False)  # unreachable or gone: the copies serve
        rep = restore_with_fallback([first, *(open_repository(u, origin="cli", **_options())
                                              for u in args.fallback_repo)],
                                    restore)
    else:
        rep = restore(_repo(args))
    _emit(args, rep, _restore_lines(rep, target))
    failed = [c for c in rep.get("checks", []) if not c["ok"]]
    if failed:
        print(f"pgincr: {len(failed)} check(s) failed on the restored copy (exit 3): "
              + "; ".join(f"{c['sql']}: {c.get('error')}" for c in failed), file=sys.stderr)
        return 3
    return 0


def cmd_copy(args) -> int:
    from .core.copies import copy_cluster
    from .core.progress import human_bytes
    from .core.repository import open_repository

    src = _repo(args)
    rep = copy_cluster(src, open_repository(args.to, origin="cli", **_options(copy=True)), args.cluster)
    _emit(args, rep, [f"copied {args.cluster} from {rep['source']} into {rep['copy']}: {rep['wal_copied']} WAL file(s), "
                      f"{len(rep['backups_copied'])} backup(s), {rep['restore_points_copied']} restore point(s), "
                      f"{human_bytes(rep['bytes'])} in {rep['duration_s']:.1f} s",
                      f"  new backups: {', '.join(rep['backups_copied'])}" if rep["backups_copied"] else
                      "  the copy had every backup already"])
    return 0


def _keep_failed(args) -> dict:
    return {"keep_failed": bool(args.keep_failed)}


def _tablespaces(args) -> dict:
    """--tablespace-map NAME_OR_OID=DIR (repeatable) and --tablespaces-in-place, as restore takes them."""
    mapping = {}
    for item in args.tablespace_map or []:
        key, sep, directory = item.partition("=")
        if not sep or not key or not directory:
            raise PgIncrError(f"--tablespace-map {item!r}: give NAME_OR_OID=/new/directory")
        mapping[key] = directory
    return {"tablespace_map": mapping or None, "tablespaces_in_place": bool(args.tablespaces_in_place)}


def _restore_and_check(args, os_user, repo) -> dict:
    """Restore a backup (no recovery target), then start it for --start / --check. When the
    server does not start or a check cannot run, what the restore wrote is removed (unless
    --keep-failed), as a failed PITR does; a check that runs and fails leaves the copy (exit 3)."""
    from pathlib import Path

    from .core.restore import Footprint, restore_backup, run_checks, start_restored

    written = Footprint(Path(args.target_dir))
    rep = restore_backup(repo, args.cluster, args.backup_id, args.target_dir, verify=not args.no_verify,
                         os_user=os_user, **_keep_failed(args), **_tablespaces(args))
    written.add_tablespaces(rep)
    if not (args.start or args.check):
        return rep
    try:
        srv = start_restored(args.target_dir, rep["pg_major"], port=args.port, os_user=os_user,
                             **_keep_failed(args))
        try:
            rep["checks"] = run_checks(srv, args.check or ["SELECT 1"], user=rep["bootstrap_superuser"])
            rep.update(server_running=bool(args.start), port=srv.port, socket_dir=str(srv.socket_dir))
        finally:
            if not args.start:
                srv.stop()
    except BaseException:
        if not args.keep_failed:
            written.discard()
        raise
    return rep


def _restore_lines(rep: dict, target) -> list[str]:
    chain = rep.get("chain") or [rep.get("backup_id")]
    lines = [f"restored from the copy {rep['repository']}: " + "; ".join(f"{f['repository']} failed ({f['error']})"
                                                                       for f in rep["fell_back"])
             if rep.get("fell_back") else None]
    lines += [f"restored {' + '.join(chain)} of {rep['cluster']} into {rep['target_dir']}"
             + (f" in {rep.get('restore_seconds'):.1f} s" if rep.get("restore_seconds") is not None else "")
             + (", on disk (flushed)" if rep.get("durable") or target is not None else "")]
    t = rep.get("timings") or {}
    steps = [f"{k} {t[k]:.2f} s" for k in ("plan", "extract", "combine", "verify", "sync", "replay", "checks")
             if t.get(k) is not None]
    if steps:
        lines.append("  time: " + ", ".join(steps))
    if target is not None:
        lines.append(f"  recovery to {target.kind} {target.value or ''}: {rep.get('state')}, "
                     f"{rep.get('stopped_at') or 'at the end of the archive'}; reached LSN {rep.get('reached_lsn')}"
                     + (f", last commit {rep['last_replayed_commit_time']}" if rep.get("last_replayed_commit_time")
                        else ""))
    for c in rep.get("checks", []):
        lines.append(f"  check {'ok    ' if c['ok'] else 'FAILED'} {c['sql']}: "
                     + (", ".join(" ".join(r) for r in c.get("rows", [])[:3]) if c["ok"] else str(c.get("error"))))
    if rep.get("server_running"):
        lines.append(f"  server running on socket {rep.get('socket_dir')} port {rep.get('port')} (archive_mode=off); "
                     f"stop it with pg_ctl -D {rep['target_dir']} stop")
    else:
        lines.append(f"  the copy is stopped (archive_mode=off); start it with pg_ctl -D {rep['target_dir']} start")
    return lines


def cmd_wal_push(args) -> int:
    from . import walcmd

    return walcmd.main(["push", "--repo", args.repo or os.environ.get("PGINCR_REPO", ""), "--cluster", args.cluster,
                        *(["--env-file", args.env_file] if args.env_file else []), args.path])


def cmd_wal_fetch(args) -> int:
    from . import walcmd

    return walcmd.main(["fetch", "--repo", args.repo or os.environ.get("PGINCR_REPO", ""), "--cluster", args.cluster,
                        *(["--env-file", args.env_file] if args.env_file else []), args.name, args.dest])


def cmd_wal_commands(args) -> int:
    from .core.names import validate_cluster

    validate_cluster(args.cluster)
    repository = _repo(args)  # the repository must exist: archive_command refuses to create one
    repo = repository.url
    _env_file_has_key(args.env_file, repository)
    if args.env_file:
        import stat

        try:
            mode = stat.S_IMODE(os.stat(args.env_file).st_mode)
        except OSError as e:
            raise PgIncrError(f"env file {args.env_file}: {e.strerror}; create it (KEY=VALUE lines: AWS_ACCESS_KEY_ID, "
                              "AWS_SECRET_ACCESS_KEY, PGINCR_S3_ENDPOINT_URL), owned by the server's OS user, mode "
                              "0600") from None
        if mode & 0o077:
            raise PgIncrError(f"env file {args.env_file} holds credentials but group or others can access it (mode "
                              f"{mode:04o}): run `chmod 600 {args.env_file}` (walcmd refuses it otherwise)")
    env = f" --env-file {args.env_file}" if args.env_file else ""
    from .core.wal import wal_command

    print(f"archive_mode = on\narchive_command = '{wal_command('push', repo, args.cluster, env)}'")
    print(f"# for restores (pgincr restore writes it by itself):\n"
          f"restore_command = '{wal_command('fetch', repo, args.cluster, env)}'")
    return 0


def _env_file_has_key(env_file: str | None, repo) -> None:
    """An encrypted repository: archive_command and restore_command get its key from the env file."""
    if repo.keyring is None:
        return
    if not env_file:
        raise PgIncrError(f"{repo.url} is encrypted: archive_command and restore_command need its key; pass "
                          "--env-file FILE holding the line PGINCR_REPO_KEY=... (mode 0600, owned by the server's OS "
                          "user)")
    try:
        with open(env_file) as f:
            has = any(line.strip().startswith("PGINCR_REPO_KEY=") for line in f)
    except OSError:
        return  # reported below
    if not has:
        raise PgIncrError(f"{repo.url} is encrypted but the env file {env_file} has no PGINCR_REPO_KEY= line: add the "
                          "repository key (and PGINCR_REPO_OLD_KEYS= after a rotation) to it")


def cmd_capture(args) -> int:
    from .core.capture import capture_wal_pull, describe_slot_advice
    from .core.progress import human_bytes

    r = capture_wal_pull(_conninfo(args), _repo(args), args.cluster, slot=args.slot, upto_lsn=args.upto_lsn,
                         catalog=_catalog(args), max_retained_bytes=int(args.max_slot_retained_gb * (1 << 30)))
    _emit(args, r, [
        f"captured {r['segments']} segment(s) of {args.cluster} ({human_bytes(r['raw_bytes'])} raw, "
        f"{human_bytes(r['stored_bytes'])} stored)" + (f": {r['first_segment']} .. {r['last_segment']}"
                                                      if r["segments"] else ": nothing new")
        + f"; the archive now ends at {r['end_lsn']}",
        f"  slot {r['slot']}: held {human_bytes(r.get('slot_retained_before_bytes') or 0)} before, "
        f"{human_bytes(r.get('slot_retained_bytes') or 0)} now; {describe_slot_advice(r.get('slot_advice') or {})}"])
    return 0


def cmd_switch(args) -> int:
    from .core.capture import switch_wal

    r = switch_wal(_conninfo(args), restore_point=args.restore_point,
                   repo=_repo(args) if args.restore_point else None, cluster=args.cluster)
    _emit(args, r, [(f"restore point {r['restore_point']!r} at {r['restore_point_lsn']}; " if r.get("restore_point")
                     else "") + f"switched WAL at {r['lsn']}: segment {r['segment']} (timeline {r['timeline']}) is "
                    "complete and can be archived"])
    return 0


def cmd_check_wal(args) -> int:
    from .core.capture import check_continuity

    rep = check_continuity(_repo(args), args.cluster, catalog=_catalog(args), fail_on_gap=False)
    lines = [f"WAL archive of {args.cluster}: {'continuous' if rep['ok'] else 'NOT usable'}"
             + (f" from the oldest backup {rep['oldest_backup']}" if rep.get("oldest_backup") else "")]
    for tl, v in sorted(rep["timelines"].items()):
        lines.append(f"  timeline {int(tl)}: {v['count']} segment(s) {v['first']} .. {v['last']}"
                     + (f", {v['missing_count']} missing" if v["missing_count"] else ""))
    lines += [f"  PROBLEM: {p}" for p in rep.get("problems", [])]
    if rep.get("gaps_before_newest_backup"):
        lines.append(f"  note: {len(rep['gaps_before_newest_backup'])} segment(s) missing before the newest backup "
                     "(older points in time cannot be restored; recovery from the newest backup on is unaffected)")
    _emit(args, rep, lines)
    return 0 if rep["ok"] else 4


def cmd_verify(args) -> int:
    from .core.verify import verify_backup

    rep = verify_backup(_repo(args), args.cluster, None if args.all else args.backup_id, catalog=_catalog(args),
                        chain=not args.no_chain, check_wal=not args.no_wal, only_unverified=not args.again)
    ok, bad = rep["verified"], sorted({f["backup_id"] for f in rep["failed"]})
    lines = [f"verification of {args.cluster}: {len(ok)} backup(s) OK, {len(bad)} FAILED in {rep['duration_s']:.1f} s"
             + (f"; {len(rep['skipped'])} verified before, skipped (--again re-checks them)" if rep["skipped"] else "")]
    lines += [f"  ok      {b}" for b in ok]
    lines += [f"  FAILED  {f['backup_id']}: {f['check']}: {f['message']}" for f in rep["failed"]]
    lines += [f"  WARNING: the result of {e} could not be recorded in the catalog" for e in rep.get("catalog_errors", [])]
    _emit(args, rep, lines)
    return 5 if rep.get("failed") else 0


def cmd_synthesize(args) -> int:
    """Combine a backup's chain on this machine into a synthetic full (the server is not read);
    --dry-run prints the chain it would combine and writes nothing."""
    from .core import synthetic
    from .core.names import validate_backup_id
    from .core.progress import human_bytes

    if args.upto != "latest":
        validate_backup_id(args.upto)  # bad input is refused before anything is touched
    if not 1 <= args.compression_level <= 22:
        raise PgIncrError(f"--compression-level {args.compression_level} is out of range: give 1..22 (3, the "
                          "default, is fast and compresses well)")
    if args.scratch_dir and not os.path.isdir(args.scratch_dir):
        raise PgIncrError(f"scratch directory {args.scratch_dir} does not exist: create it (it needs about the "
                          "cluster's size free) or pass another --scratch-dir")
    repo = _repo(args)
    plan = synthetic.plan_synthesis(repo, args.cluster, args.upto)
    if args.dry_run or plan["skip"]:
        return _synthesis_plan(args, plan)
    meta = synthetic.synthesize(repo, args.cluster, args.upto, compression_level=args.compression_level,
                                threads=args.threads, scratch_dir=args.scratch_dir, catalog=_catalog(args))
    if meta["kind"] == "none":  # another process synthesized it meanwhile
        _emit(args, meta, [f"nothing to synthesize: {meta['reason']}"])
        return 0
    out = synthetic.summary(meta)
    t = out.get("timings") or {}
    _emit(args, out, [
        f"synthetic full {out['backup_id']} of {args.cluster} complete: combined {' -> '.join(out['built_from'])} "
        "on this machine (the database server was not read)",
        f"  stands for {out['stands_for']}: LSN {out['start_lsn']} .. {out['stop_lsn']}, timeline {out['timeline']}, "
        f"PostgreSQL {out['pg_major']}, finished at {out['finished_at']}",
        f"  {human_bytes(out['raw_bytes'] or 0)} of data, {human_bytes(out['stored_bytes'] or 0)} stored "
        f"(zstd-{args.compression_level}) in {out['duration_s']:.1f} s"
        + (" (" + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()) + ")" if t else ""),
        f"  restores of {out['stands_for']} and of the incrementals after it now start from {out['backup_id']}; "
        f"the next incremental still builds on {out['stands_for']}"])
    return 0


def _synthesis_plan(args, plan: dict) -> int:
    """--dry-run, or nothing to combine: what synthesize would do; nothing written."""
    out = {"cluster": args.cluster, "dry_run": bool(args.dry_run), "stands_for": plan["stands_for"],
           "chain": plan["chain"], "skip": plan["skip"]}
    if plan["skip"]:
        out["kind"] = "none"
        _emit(args, out, [f"nothing to synthesize: {plan['skip']}"])
        return 0
    from .core.progress import human_bytes

    raw = sum(int(b.get("raw_bytes") or 0) for b in plan["chain_meta"])
    out["chain_raw_bytes"] = raw
    _emit(args, out, [f"would combine {' -> '.join(plan['chain'])} ({len(plan['chain'])} backups, "
                      f"{human_bytes(raw)} uncompressed) into a synthetic full standing for {plan['stands_for']} "
                      f"(LSN {plan['meta'].get('stop_lsn')})",
                      "dry run: nothing written (drop --dry-run to build it)"])
    return 0


def cmd_retention(args) -> int:
    from .core.retention import RetentionPolicy, apply_retention, format_plan, plan_retention, summary

    policy = RetentionPolicy(keep_full_chains=args.keep_full_chains, recovery_window_days=args.window_days,
                             min_redundancy=args.min_redundancy, pinned=args.pin or [])
    repo, catalog = _repo(args), _catalog(args)
    plan = plan_retention(repo, args.cluster, policy, catalog=catalog)  # the catalog: synthetic fulls' verification
    if not args.apply:
        _emit(args, summary(plan) | {"dry_run": True}, [format_plan(plan), "dry run: nothing deleted (--apply deletes)"])
        return 0
    res = summary(apply_retention(repo, args.cluster, plan, catalog=catalog))
    _emit(args, res, [format_plan(plan), f"applied: {len(res['delete_backups'])} backup(s), {res['wal_files']} WAL "
                                         f"file(s), {res['other_objects']} other object(s) deleted"])
    return 0


def cmd_cleanup(args) -> int:
    from .core.metadata import cleanup_abandoned_writes, cleanup_incomplete, require_cluster
    from .core.progress import human_bytes

    repo = _repo(args)
    require_cluster(repo, args.cluster)
    age = args.older_than_hours * 3600
    removed = cleanup_incomplete(repo, args.cluster, older_than_s=age, dry_run=args.dry_run)
    writes = cleanup_abandoned_writes(repo, args.cluster, older_than_s=age, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    _emit(args, {"cluster": args.cluster, "dry_run": args.dry_run, "removed": removed,
                 "unfinished_writes": [{k: w[k] for k in ("key", "kind", "age_s", "bytes")} for w in writes]},
          [f"{verb} the leftovers of {len(removed)} interrupted backup(s)" + (f": {', '.join(removed)}" if removed
                                                                             else ""),
           f"{verb} {len(writes)} unfinished write(s) (temp files, multipart uploads) older than "
           f"{args.older_than_hours:g} h" + (": " + ", ".join(f"{w['key']} ({human_bytes(w['bytes'] or 0)})"
                                                            for w in writes[:5]) if writes else "")])
    return 0


def cmd_catalog_rebuild(args) -> int:
    cat = _catalog(args)
    if cat is None:
        raise PgIncrError("--catalog-db is required")
    _print(cat.rebuild_from_repository(_repo(args), [args.cluster] if args.cluster else None), True)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(s3=args.s3, scale=args.scale, keep=args.keep, workdir=args.workdir, use_airflow=not args.no_airflow)


EXIT_CODES = """exit codes:
  0    success
  2    refused or failed: the message on stderr says why and what to fix (nothing was changed when refused)
  3    restore --check: a check query failed on the restored copy
  4    check-wal: the WAL archive is not usable (a gap, missing history, a backup's WAL missing)
  5    verify: a backup failed a check
  130  interrupted (Ctrl-C)
  synthesize: 0 also when there is nothing to combine (the newest backup is a full, or has a synthetic full)
  wal-push: 0 stored, 1 not stored (PostgreSQL retries); wal-fetch: 0 restored, 1 not in the archive, 126 any
  other failure (recovery stops instead of ending early)"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgincr", description="PostgreSQL incremental-forever backups (airflow-pg-incremental)",
                                epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def repo_args(sp, cluster_required=True):
        sp.add_argument("--repo", help="repository: absolute directory or s3://bucket/prefix (default $PGINCR_REPO)")
        sp.add_argument("--cluster", required=cluster_required, help="cluster name")

    def conn_args(sp):
        sp.add_argument("--host")
        sp.add_argument("--port", type=int)
        sp.add_argument("--user")
        sp.add_argument("--dbname")
        sp.add_argument("--catalog-db", help="database of the same server holding the catalog (optional)")
        sp.add_argument("--catalog-schema", default="pgincr")

    sp = sub.add_parser("repo-create", help="create a repository (an explicit act: nothing else creates one)")
    sp.add_argument("--repo", help="absolute directory or s3://bucket/prefix (default $PGINCR_REPO)")
    sp.add_argument("--owner", help="local repositories, as root: the OS user owning it and everything written "
                                    "into it (default: the user PostgreSQL runs as, postgres/$PGINCR_OS_USER, "
                                    "so that archive_command and restore_command can use it)")
    sp.add_argument("--encrypt", action="store_true",
                    help="encrypt everything stored (AES-256-GCM) under the key in $PGINCR_REPO_KEY")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_repo_create)

    sp = sub.add_parser("repo-key-new", help="print a new random repository key (base64) for PGINCR_REPO_KEY")
    sp.set_defaults(func=cmd_repo_key_new)

    sp = sub.add_parser("repo-key-add", help="key rotation: add $PGINCR_REPO_KEY (new) to an encrypted repository, "
                                             "authorized by a current key in $PGINCR_REPO_OLD_KEYS")
    sp.add_argument("--repo", help="absolute directory or s3://bucket/prefix (default $PGINCR_REPO)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_repo_key_add)

    sp = sub.add_parser("backup", help="take a full base backup (password from PGPASSWORD/.pgpass)")
    repo_args(sp)
    conn_args(sp)
    sp.add_argument("--level", type=int, default=3, help="zstd level (default 3)")
    sp.add_argument("--threads", type=int, default=None,
                    help="zstd worker threads (default: the cores this machine gives pgincr, at most 8; 0: none)")
    sp.add_argument("--compression", choices=("auto", "server", "client"), default="auto",
                    help="where zstd runs: server (the database server compresses; PostgreSQL 15+ built with zstd), "
                         "client (this machine), auto (server when it can, else client; the default)")
    sp.add_argument("--kind", choices=("full", "incremental", "differential"), default="full",
                    help="incremental/differential need PostgreSQL 17+ and summarize_wal; a full is taken (and the "
                         "reason printed) when not possible")
    sp.add_argument("--max-chain", type=int, default=14, help="take a full once the chain is this long")
    sp.add_argument("--wal-mode", choices=("auto", "pull", "push", "none"), default="auto",
                    help="how the backup's WAL reaches the repository: pull (replication slot, created before the "
                         "backup if missing; then run `pgincr capture`), push (archive_command), none (no PITR from "
                         "this backup); auto (default): pull when the slot exists, push when archive_command pushes "
                         "here, else refused")
    sp.add_argument("--slot", help="replication slot of pull mode (default pgincr_<cluster>)")
    sp.add_argument("--primary-host", help="backing up a streaming standby (--host): its primary, which checkpoints "
                                           "first so the backup starts now, and whose WAL is archived (same role "
                                           "and password)")
    sp.add_argument("--primary-port", type=int, help="port of --primary-host (default 5432)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_backup)

    sp = sub.add_parser("info", help="backups, chains, WAL window, last verification and restore test")
    repo_args(sp, cluster_required=False)
    conn_args(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_info)

    sp = sub.add_parser("restore", help="restore a backup into an empty directory")
    repo_args(sp)
    sp.add_argument("--backup-id", default="latest")
    sp.add_argument("--target-dir", required=True)
    sp.add_argument("--no-verify", action="store_true", help="skip pg_verifybackup")
    sp.add_argument("--start", action="store_true", help="start a server on the restored copy and leave it running")
    sp.add_argument("--check", action="append", help="SQL to run on the restored copy (repeatable); server is stopped after")
    sp.add_argument("--port", type=int, help="port of the restored server (default: a free one)")
    sp.add_argument("--os-user", help="OS user to run the server as when root (default postgres/pgincr)")
    sp.add_argument("--tablespace-map", action="append", metavar="NAME_OR_OID=DIR",
                    help="where a tablespace of the backup goes (repeatable; an absent or empty directory)")
    sp.add_argument("--tablespaces-in-place", action="store_true",
                    help="restore unmapped tablespaces to their original directories (which must be empty or absent)")
    sp.add_argument("--target-time", help="recover to this time (ISO 8601 with a time zone)")
    sp.add_argument("--target-lsn", help="recover to this WAL location, e.g. 0/3000060")
    sp.add_argument("--target-xid", help="recover to this transaction id")
    sp.add_argument("--target-name", help="recover to this named restore point")
    sp.add_argument("--target", choices=("latest", "immediate"), help="end of the archive, or the backup's end")
    sp.add_argument("--exclusive", action="store_true", help="stop just before the target (time/LSN/xid)")
    sp.add_argument("--action", choices=("promote", "pause", "shutdown"), default="promote",
                    help="what the server does at the target (default promote)")
    sp.add_argument("--timeout", type=float, default=3600, help="seconds to wait for recovery to reach the target")
    sp.add_argument("--keep-failed", action="store_true",
                    help="keep what a failed point-in-time restore wrote (for debugging); by default it is removed")
    sp.add_argument("--fallback-repo", action="append", metavar="URL",
                    help="a copy of the repository (see `pgincr copy`), restored from when --repo is unreachable or "
                         "holds a damaged or missing object (repeatable, tried in order)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_restore)

    sp = sub.add_parser("copy", help="copy what --repo holds of a cluster into a second repository (3-2-1): only "
                                     "what the copy lacks, every object checked as it is read")
    repo_args(sp)
    sp.add_argument("--to", required=True, metavar="URL", help="the second repository (created with repo-create)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_copy)

    sp = sub.add_parser("wal-push", help="archive_command: store one WAL file (see walcmd for the fast form)")
    repo_args(sp)
    sp.add_argument("--env-file")
    sp.add_argument("path")
    sp.set_defaults(func=cmd_wal_push)

    sp = sub.add_parser("wal-fetch", help="restore_command: fetch one WAL file (exit 1 when not archived)")
    repo_args(sp)
    sp.add_argument("--env-file")
    sp.add_argument("name")
    sp.add_argument("dest")
    sp.set_defaults(func=cmd_wal_fetch)

    sp = sub.add_parser("wal-commands", help="print the archive_command/restore_command lines for postgresql.conf")
    repo_args(sp)
    sp.add_argument("--env-file", help="KEY=VALUE file with AWS_* credentials for the server's OS user (mode 0600)")
    sp.set_defaults(func=cmd_wal_commands)

    sp = sub.add_parser("capture", help="pull WAL through a replication slot up to now (or --upto-lsn)")
    repo_args(sp)
    conn_args(sp)
    sp.add_argument("--slot")
    sp.add_argument("--upto-lsn")
    sp.add_argument("--max-slot-retained-gb", type=float, default=8.0,
                    help="fail (exit 2, after capturing) when the slot held more WAL than this before the capture: "
                         "captures are too far apart for the WAL rate (default 8)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_capture)

    sp = sub.add_parser("switch", help="pg_switch_wal(), optionally after a named restore point")
    repo_args(sp)
    conn_args(sp)
    sp.add_argument("--restore-point")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_switch)

    sp = sub.add_parser("check-wal", help="continuity of the WAL archive (exit 4 on a gap)")
    repo_args(sp)
    conn_args(sp)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_check_wal)

    sp = sub.add_parser("verify", help="re-read and check backups (checksums, pg_verifybackup, WAL); exit 5 on failure")
    repo_args(sp)
    conn_args(sp)
    sp.add_argument("--backup-id", default="latest")
    sp.add_argument("--all", action="store_true", help="every backup of the cluster")
    sp.add_argument("--again", action="store_true", help="also backups verified before")
    sp.add_argument("--no-chain", action="store_true")
    sp.add_argument("--no-wal", action="store_true")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_verify)

    sp = sub.add_parser("synthesize", help="combine a backup's chain (full + incrementals, PostgreSQL 17+) on this "
                                           "machine into a synthetic full; the database server is not read")
    repo_args(sp)
    conn_args(sp)
    sp.add_argument("--upto", default="latest",
                    help="the backup the synthetic full stands for: a backup id, or latest (the default)")
    sp.add_argument("--scratch-dir", help="where the chain is combined: needs about the cluster's size plus the "
                                          "incrementals free (default: the system's temporary directory)")
    sp.add_argument("--compression-level", type=int, default=3, help="zstd level 1..22 (default 3)")
    sp.add_argument("--threads", type=int, default=None,
                    help="zstd worker threads (default: the cores this machine gives pgincr, at most 8)")
    sp.add_argument("--dry-run", action="store_true", help="print the chain it would combine; write nothing")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_synthesize)

    sp = sub.add_parser("retention", help="plan (--dry-run, default) or --apply a retention policy")
    repo_args(sp)
    conn_args(sp)
    sp.add_argument("--keep-full-chains", type=int)
    sp.add_argument("--window-days", type=float, help="keep every point of the last D days restorable")
    sp.add_argument("--min-redundancy", type=int, default=1, help="full chains never removed (default 1)")
    sp.add_argument("--pin", action="append", help="backup id never removed (repeatable)")
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--dry-run", action="store_true", help="print the plan only (the default)")
    g.add_argument("--apply", action="store_true", help="delete what the plan says")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_retention)

    sp = sub.add_parser("cleanup", help="remove leftovers of interrupted backups and unfinished writes (temp files, "
                                        "S3 multipart uploads)")
    repo_args(sp)
    sp.add_argument("--older-than-hours", type=float, default=6.0)
    sp.add_argument("--dry-run", action="store_true")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_cleanup)

    sp = sub.add_parser("catalog-rebuild", help="rebuild the catalog tables from the repository alone")
    repo_args(sp, cluster_required=False)
    conn_args(sp)
    sp.set_defaults(func=cmd_catalog_rebuild)

    sp = sub.add_parser("demo", help="full backup through Airflow, restore, compare, report (embedded PostgreSQL 18)")
    sp.add_argument("--s3", action="store_true", help="use a SeaweedFS S3 repository instead of a local directory")
    sp.add_argument("--scale", type=int, default=1, help="pgbench scale (default 1, about 16 MB)")
    sp.add_argument("--keep", action="store_true", help="keep the work directory")
    sp.add_argument("--workdir", help="work directory (default: a new one under /var/tmp)")
    sp.add_argument("--no-airflow", action="store_true", help="call the engine directly instead of through Airflow")
    sp.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from .core import procs

    args = build_parser().parse_args(argv)
    # SIGTERM: stop the servers and programs the engine started, remove its scratch, exit 143
    previous = procs.install_sigterm_handler() if args.func not in (cmd_wal_push, cmd_wal_fetch) else None
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        return args.func(args)
    except PgIncrError as e:
        print(f"pgincr: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        if previous is not None:
            import signal

            signal.signal(signal.SIGTERM, previous)  # when called as a function (tests, other programs)


if __name__ == "__main__":
    sys.exit(main())
