"""Tablespaces in a restore: where each one goes, and how the restored copy points at it.

A backup of a cluster with tablespaces (backup.json `tablespaces: [{oid, name, location,
object}]`) holds one tar object per tablespace (`tblspc-<oid>.tar.zst`) beside base.tar.zst.
Its base tar holds `tablespace_map` (pg_basebackup -Ft asks for one) and an empty pg_tblspc/.

A restore needs a directory for each tablespace: a mapping {name or OID: directory}, or the
explicit choice of the original locations (`in_place`). Without either it is refused before
anything is touched: restoring over the source's own tablespace directories must never happen
by default. Each directory must be absent or empty, outside the data directory and the other
tablespaces' directories.

Steps: plan (checks only), make the directories (0700), extract each tablespace object into its
directory and link `pg_tblspc/<oid>` to it (what pg_verifybackup and pg_combinebackup read), then,
after verification, rewrite `tablespace_map` with the new directories: PostgreSQL recreates the
pg_tblspc links from that file when it starts from backup_label, so left as it is it would point
the restored copy at the source's directories.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, RestoreError

log = logging.getLogger(__name__)


@dataclass
class TablespaceTarget:
    oid: int
    name: str
    location: str  # where it was on the source
    object: str    # its object name in the backup
    dest: Path     # where this restore puts it
    created: bool  # dest did not exist before the restore
    anchor: Path   # the nearest directory that existed before (holds dest's entry)

    def report(self) -> dict:
        return {"oid": self.oid, "name": self.name, "location": self.location, "directory": str(self.dest),
                "created": self.created}


def plan_tablespaces(meta: dict, mapping: dict | None, in_place: bool, target: Path) -> list[TablespaceTarget]:
    """Where each tablespace of the backup `meta` goes; refuses (ConfigError, nothing touched) a
    backup with tablespaces that are neither mapped nor explicitly restored in place, a mapping
    naming no tablespace of the backup, and directories that are not absent or empty."""
    spaces = meta.get("tablespaces") or []
    chosen = _resolve_mapping(meta, spaces, mapping or {})
    unmapped = [t for t in spaces if int(t["oid"]) not in chosen]
    if unmapped and not in_place:
        raise ConfigError(_unmapped_message(meta, unmapped))
    plan = [_target(t, Path(chosen.get(int(t["oid"]), t["location"]))) for t in spaces]
    _check_apart(plan, target)
    return plan


def _resolve_mapping(meta: dict, spaces: list[dict], mapping: dict) -> dict[int, str]:
    by_key = {**{t["name"]: t for t in spaces}, **{str(t["oid"]): t for t in spaces}}
    unknown = [str(k) for k in mapping if str(k) not in by_key]
    if unknown:
        known = ", ".join(f"{t['name']} (OID {t['oid']})" for t in spaces) or "none"
        raise ConfigError(f"tablespace mapping names {', '.join(unknown)}, not a tablespace of backup "
                          f"{meta['backup_id']} (its tablespaces: {known}); fix the mapping. Nothing was changed.")
    chosen: dict[int, str] = {}
    for k, v in mapping.items():
        oid = int(by_key[str(k)]["oid"])
        if oid in chosen and chosen[oid] != str(v):
            raise ConfigError(f"tablespace {k} is mapped twice ({chosen[oid]} and {v}); map it once")
        chosen[oid] = str(v)
    return chosen


def _unmapped_message(meta: dict, unmapped: list[dict]) -> str:
    listed = "; ".join(f"{t['name']} (OID {t['oid']}, originally {t['location']})" for t in unmapped)
    example = " ".join(f"--tablespace-map {t['name']}=/new/dir/{t['name']}" for t in unmapped)
    return (f"backup {meta['backup_id']} holds tablespaces that need a directory: {listed}. Map each one to an "
            f"empty or new directory ({example}; tablespace_map={{name: directory}} in Python and Airflow), or "
            "restore them to their original directories with --tablespaces-in-place (tablespaces_in_place=True; "
            "they must then be empty or absent). Nothing was changed.")


def _target(t: dict, dest: Path) -> TablespaceTarget:
    from .durable import nearest_existing
    from .restore import check_target_dir

    if any(c in str(dest) for c in "\n\r"):
        raise ConfigError(f"tablespace {t['name']}: directory {dest!r} contains a line break; choose another")
    try:
        check_target_dir(dest)
    except ConfigError as e:
        raise ConfigError(f"tablespace {t['name']} (OID {t['oid']}): {e}") from None
    return TablespaceTarget(int(t["oid"]), t["name"], t["location"], t["object"], dest, not dest.exists(),
                            nearest_existing(dest))


def _check_apart(plan: list[TablespaceTarget], target: Path) -> None:
    """No tablespace directory inside (or holding) the data directory or another one."""
    places = [("the data directory", target)] + [(f"tablespace {t.name}", t.dest) for t in plan]
    for i, (a, pa) in enumerate(places):
        for b, pb in places[i + 1:]:
            if pa == pb or pa in pb.parents or pb in pa.parents:
                raise ConfigError(f"{b} ({pb}) and {a} ({pa}) overlap; give each its own directory. "
                                  "Nothing was changed.")


def make_tablespace_dirs(plan: list[TablespaceTarget]) -> None:
    for t in plan:
        t.dest.mkdir(parents=True, exist_ok=True)
        os.chmod(t.dest, 0o700)


def extract_with_tablespaces(repo, meta: dict, data_dir: Path, dirs: dict[int, Path], interval: float = 10.0) -> None:
    """Extract backup `meta` into data_dir and each of its tablespace objects into dirs[oid], side
    by side (each is its own stream: decompression and GNU tar per object), then link
    data_dir/pg_tblspc/<oid> to each. Every extraction is waited for; the first error is raised."""
    from concurrent.futures import ThreadPoolExecutor

    from .restore import _object, extract_backup, extract_object

    spaces = meta.get("tablespaces") or []
    if not spaces:
        return extract_backup(repo, meta, data_dir, interval)

    def space(t):
        dest = dirs[int(t["oid"])]
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        extract_object(repo, _object(meta, t["object"]), dest, f"{meta['backup_id']} tablespace {t['name']}",
                       interval)

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="pgincr-extract") as pool:
        futures = [pool.submit(extract_backup, repo, meta, data_dir, interval)]
        futures += [pool.submit(space, t) for t in spaces]
        for f in futures:
            f.result()
    for t in spaces:
        link_tablespace(data_dir, int(t["oid"]), dirs[int(t["oid"])])


def link_tablespace(data_dir: Path, oid: int, dest: Path) -> None:
    link = data_dir / "pg_tblspc" / str(oid)
    link.parent.mkdir(mode=0o700, exist_ok=True)
    if os.path.lexists(link):
        if not link.is_symlink():
            raise RestoreError(f"{link} is not a link to a tablespace directory; the backup is not as expected")
        link.unlink()
    os.symlink(dest, link)


def staged_tablespace_dirs(staging: Path, meta: dict) -> dict[int, Path]:
    """Where the chain restore stages the tablespaces of part `meta` (beside its data directory)."""
    return {int(t["oid"]): staging / f"{meta['backup_id']}.tblspc" / str(t["oid"])
            for t in meta.get("tablespaces") or []}


def relocations(staging: Path, newest: dict, plan: list[TablespaceTarget]) -> list[str]:
    """pg_combinebackup -T options: each tablespace of the newest part's staging -> its directory."""
    staged = staged_tablespace_dirs(staging, newest)
    return [f"-T{staged[t.oid]}={t.dest}" for t in plan]


def point_tablespaces(data_dir: Path, plan: list[TablespaceTarget]) -> None:
    """After verification: pg_tblspc/<oid> links and tablespace_map name the new directories."""
    if not plan:
        return
    for t in plan:
        link_tablespace(data_dir, t.oid, t.dest)
    path = data_dir / "tablespace_map"
    if not path.exists():
        return
    dests = {t.oid: t.dest for t in plan}
    lines = []
    for line in path.read_text().splitlines():
        oid = line.split(" ", 1)[0]
        if not oid.isdigit() or int(oid) not in dests:
            raise RestoreError(f"tablespace_map of the restored backup names {line!r}, a tablespace backup.json does "
                               "not list; the backup's metadata and content disagree")
        lines.append(f"{oid} {str(dests[int(oid)]).replace(chr(92), chr(92) * 2)}\n")
    tmp = path.with_name("tablespace_map.pgincr-tmp")
    tmp.write_text("".join(lines))
    os.chmod(tmp, 0o600)
    os.rename(tmp, path)
    log.info("tablespaces of the restored copy: %s", ", ".join(f"{t.name} -> {t.dest}" for t in plan))


def own_tablespace_dirs(plan: list[TablespaceTarget], os_user: str | None) -> None:
    from .server import chown_tree, ensure_traversable

    for t in plan:
        os.chmod(t.dest, 0o700)
        chown_tree(t.dest, os_user)
        if os_user:
            ensure_traversable(t.dest.parent)


def tablespace_paths(plan: list[TablespaceTarget]) -> list[Path]:
    """What make_durable flushes for the tablespaces: their directories and the entries naming them."""
    return [p for t in plan for p in (t.dest, t.anchor)]
