"""Keeping the store's size in check: how big it is, deleting runs, and collecting garbage (pruned models of old
runs, old or unused dense results, temporary folders left by a killed save). Torch-free.

Nothing outside the store's runs folder is ever removed: every path is resolved (symlinks followed) and must lie
inside the folder of its own run, `<store>/runs/<run id>`; a path that does not (an artifact row pointing at a
user's folder, a run folder that is a symlink) is refused, left alone and reported. Every function returns what
it removed (or, with dry_run, would remove) with its bytes, and the store's size before and after."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import stat
import time
from contextlib import nullcontext
from pathlib import Path

from backend.runs.artifacts import MODEL_ARTIFACT
from backend.runs.store import ACTIVE, DB_NAME, Store, StoreError

__all__ = ["RUN_TABLES", "delete_runs", "gc", "human_bytes", "store_size"]

# a run's rows, children first (foreign keys), the runs row last
RUN_TABLES = ("jobs", "layers", "metrics", "examples", "artifacts", "runs")
DB_FILES = (DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm")
TEMP_NAME = re.compile(r"^\..+\.tmp(\d+)$")
DAY_S = 86400.0


def human_bytes(n: float | None) -> str:
    """1234567 -> '1.2 MB' (powers of 1000, as disk tools print them)."""
    if n is None:
        return "–"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def tree_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder; symlinks count as themselves and are never followed."""
    try:
        info = os.lstat(path)
    except OSError:
        return 0
    if not stat.S_ISDIR(info.st_mode):
        return info.st_size
    total = 0
    for folder, dirs, files in os.walk(path):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def store_size(store: Store) -> dict:
    """The store's runs and bytes on disk: the SQLite files, the artifact folders (`runs/`), anything else (the
    worker's log and lock) and the total."""
    root = store.root
    db_bytes = sum(tree_bytes(root / name) for name in DB_FILES)
    artifact_bytes = tree_bytes(root / "runs")
    total = tree_bytes(root)
    runs = store.db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    models = store.db.execute("SELECT COUNT(*) FROM artifacts WHERE name = ?", (MODEL_ARTIFACT,)).fetchone()[0]
    return {"root": str(root), "runs": runs, "models": models, "db_bytes": db_bytes, "artifact_bytes": artifact_bytes,
            "other_bytes": max(total - db_bytes - artifact_bytes, 0), "total_bytes": total}


def _pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (a zombie counts as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class _Paths:
    """Resolves paths and says whether they lie inside the store's runs folder, and in which run's folder."""

    def __init__(self, store: Store) -> None:
        self.runs = (store.root / "runs").resolve()

    def own(self, path: Path, run_id: str, exact: bool = False) -> Path | None:
        """The path resolved when it lies inside this run's folder (is that folder, with exact); else None."""
        if not run_id or Path(run_id).name != run_id or run_id in (".", ".."):
            return None
        base = self.runs / run_id
        try:
            resolved = Path(path).resolve()
        except (OSError, RuntimeError):
            return None
        if exact:
            return resolved if resolved == base else None
        return resolved if resolved != base and resolved.is_relative_to(base) else None

    def inside(self, path: Path) -> Path | None:
        """The path resolved when it lies strictly inside the runs folder; else None."""
        try:
            resolved = Path(path).resolve()
        except (OSError, RuntimeError):
            return None
        return resolved if resolved != self.runs and resolved.is_relative_to(self.runs) else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _take(entries: list[dict], errors: list[dict], dry_run: bool) -> None:
    """Remove the entries' paths (each already checked to lie inside the runs folder); a failure is reported and
    the others go on."""
    if dry_run:
        return
    for entry in entries:
        if entry.get("path") is None:
            continue
        try:
            _remove(Path(entry["path"]))
        except OSError as err:
            errors.append({**entry, "reason": f"could not be removed: {err.strerror or err}"})


def _row_bytes(db: sqlite3.Connection, table: str, where: str, args: tuple) -> tuple[int, int]:
    """How many rows match and the bytes of what they hold (each column's stored text or blob length)."""
    columns = [r[1] for r in db.execute(f"PRAGMA table_info({table})")]
    size = " + ".join(f"COALESCE(LENGTH(CAST({c} AS BLOB)), 0)" for c in columns)
    row = db.execute(f"SELECT COUNT(*), COALESCE(SUM({size}), 0) FROM {table} WHERE {where}", args).fetchone()
    return int(row[0]), int(row[1])


def _projected(before: dict, entries: list[dict]) -> dict:
    """The size after removing these entries' files (rows free pages inside the database file, which shrinks when
    gc vacuums it)."""
    files = sum(e["bytes"] for e in entries if e.get("path"))
    runs = before["runs"] - sum(1 for e in entries if e["kind"] == "rows")
    models = before["models"] - sum(1 for e in entries if e["kind"] == "model") - sum(
        e["rows"]["artifacts"] for e in entries if e["kind"] == "rows")
    return {**before, "runs": runs, "models": models, "artifact_bytes": before["artifact_bytes"] - files,
            "total_bytes": before["total_bytes"] - files, "projected": True}


def _active_jobs(db: sqlite3.Connection) -> dict[str, str]:
    return {r[0]: r[1] for r in db.execute(f"SELECT run_id, state FROM jobs WHERE state IN {ACTIVE}")}


def _summary(dry_run: bool, before: dict, store: Store, removed: list[dict], refused: list[dict],
             errors: list[dict], **extra) -> dict:
    after = _projected(before, removed) if dry_run else {**store_size(store), "projected": False}
    failed = {(e["kind"], e.get("path"), e.get("key")) for e in errors}
    done = [e for e in removed if (e["kind"], e.get("path"), e.get("key")) not in failed]
    return {"dry_run": dry_run, **extra, "removed": done, "refused": refused, "errors": errors,
            "bytes": sum(e["bytes"] for e in done), "before": before, "after": after}


def delete_runs(store: Store, run_ids: list[str], dry_run: bool = False) -> dict:
    """Delete runs: their rows in every table (runs, jobs, layers, metrics, examples, artifacts), in one write
    transaction, and their run folders. A run with a queued or running job is refused (cancel it first) and then
    nothing is deleted. An artifact path outside the run's folder is left alone and reported under `refused`."""
    ids = list(dict.fromkeys(run_ids))
    if not ids:
        raise StoreError("no run to delete: give one or more run ids")
    store.recover_stale()
    before = store_size(store)
    paths = _Paths(store)
    removed: list[dict] = []
    refused: list[dict] = []
    errors: list[dict] = []
    with (nullcontext(store.db) if dry_run else store.write()) as db:
        known = {r[0] for r in db.execute(f"SELECT run_id FROM runs WHERE run_id IN ({','.join('?' * len(ids))})",
                                          ids)}
        missing = [rid for rid in ids if rid not in known]
        if missing:
            raise StoreError(f"run {missing[0]!r} is not in the store {store.root} (see `python -m backend list`)")
        active = _active_jobs(db)
        busy = [rid for rid in ids if rid in active]
        if busy:
            rid = busy[0]
            raise StoreError(f"run {rid} has a {active[rid]} job: cancel it first (`python -m backend cancel "
                             f"{rid[:8]}` or Cancel on the Run page), then delete it")
        for rid in ids:
            counts, size = {}, 0
            for table in RUN_TABLES:
                counts[table], nbytes = _row_bytes(db, table, "run_id = ?", (rid,))
                size += nbytes
            removed.append({"kind": "rows", "run_id": rid, "rows": counts, "bytes": size})
            for row in db.execute("SELECT name, path FROM artifacts WHERE run_id = ?", (rid,)):
                if paths.own(Path(row["path"]), rid) is None:
                    refused.append({"kind": "artifact", "run_id": rid, "name": row["name"], "path": row["path"],
                                    "reason": f"outside the run's folder {store.run_folder(rid)}: left alone"})
            folder = store.run_folder(rid)
            if os.path.lexists(folder):
                resolved = paths.own(folder, rid, exact=True)
                if resolved is None:
                    refused.append({"kind": "run folder", "run_id": rid, "path": str(folder),
                                    "reason": "it is a link or lies outside the store's runs folder: left alone"})
                else:
                    removed.append({"kind": "run folder", "run_id": rid, "path": str(resolved),
                                    "bytes": tree_bytes(resolved)})
        if not dry_run:
            for rid in ids:
                for table in RUN_TABLES:
                    db.execute(f"DELETE FROM {table} WHERE run_id = ?", (rid,))
            _take(removed, errors, dry_run)
    return _summary(dry_run, before, store, removed, refused, errors, runs=ids)


def _dense_keys_in_use(db: sqlite3.Connection) -> set[str] | None:
    """The dense-result keys of the store's runs; None when some run's key cannot be worked out."""
    import json

    from backend.runs.spec import RunSpec, dense_key

    keys = set()
    for row in db.execute("SELECT spec, fingerprints FROM runs"):
        try:
            keys.add(dense_key(RunSpec.from_dict(json.loads(row["spec"])), json.loads(row["fingerprints"])))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
    return keys


def gc(store: Store, keep_models: int | None = None, older_than_days: float | None = None, dry_run: bool = False,
       unused_dense: bool = False, vacuum: bool = True) -> dict:
    """Collect the store's garbage.

    - Pruned-model artifacts: with keep_models, all but the N most recently written; with older_than_days, those
      written more than N days ago; with both, only those both say. Their folder and artifact row go; the run's
      metrics, layers and examples stay (the dashboard still shows it) and `export` prunes it again. A run with a
      queued or running job keeps its model.
    - Dense results (the cached dense side of evaluations): those older than older_than_days, and with
      unused_dense every one no run in the store uses.
    - Always: temporary folders of saves (`.NAME.tmp<PID>`) whose process is gone, run folders of runs no longer
      in the database, and model folders no artifact row describes (a save killed before it was recorded).
    - vacuum: afterwards the database file is compacted, returning freed pages to the disk.
    Nothing is removed with dry_run; the result is the same list."""
    if keep_models is not None and keep_models < 0:
        raise StoreError(f"--keep-models {keep_models} is negative: give 0 or more")
    if older_than_days is not None and older_than_days < 0:
        raise StoreError(f"--older-than {older_than_days} is negative: give 0 or more days")
    store.recover_stale()
    before = store_size(store)
    paths = _Paths(store)
    cutoff = time.time() - older_than_days * DAY_S if older_than_days is not None else None
    removed: list[dict] = []
    refused: list[dict] = []
    kept: list[dict] = []
    errors: list[dict] = []
    notes: list[str] = []
    with (nullcontext(store.db) if dry_run else store.write()) as db:
        active = _active_jobs(db)
        runs = {r[0] for r in db.execute("SELECT run_id FROM runs")}
        tracked = set()
        models = db.execute("SELECT run_id, path, created_at FROM artifacts WHERE name = ? "
                            "ORDER BY created_at DESC, run_id", (MODEL_ARTIFACT,)).fetchall()
        for rank, row in enumerate(models):
            rid = row["run_id"]
            resolved = paths.own(Path(row["path"]), rid)
            if resolved is not None:
                tracked.add(resolved)
            if keep_models is None and cutoff is None:
                continue
            if (keep_models is not None and rank < keep_models) or (cutoff is not None and row["created_at"] >= cutoff):
                kept.append({"kind": "model", "run_id": rid, "path": row["path"]})
            elif rid in active:
                kept.append({"kind": "model", "run_id": rid, "path": row["path"],
                             "reason": f"the run has a {active[rid]} job"})
            elif resolved is None:
                refused.append({"kind": "model", "run_id": rid, "path": row["path"],
                                "reason": f"outside the run's folder {store.run_folder(rid)}: left alone"})
            else:
                removed.append({"kind": "model", "run_id": rid, "path": str(resolved), "bytes": tree_bytes(resolved)})
        if not dry_run:
            for entry in removed:
                db.execute("DELETE FROM artifacts WHERE run_id = ? AND name = ?", (entry["run_id"], MODEL_ARTIFACT))

        dense = []
        if cutoff is not None:
            dense = [r["dense_key"] for r in db.execute("SELECT dense_key FROM dense_results WHERE created_at < ?",
                                                        (cutoff,))]
        if unused_dense:
            used = _dense_keys_in_use(db)
            if used is None:
                notes.append("some run's dense key could not be worked out: unused dense results were kept")
            else:
                dense += [r["dense_key"] for r in db.execute("SELECT dense_key FROM dense_results")
                          if r["dense_key"] not in used and r["dense_key"] not in dense]
        for key in dense:
            _, size = _row_bytes(db, "dense_results", "dense_key = ?", (key,))
            removed.append({"kind": "dense result", "key": key, "bytes": size})
            if not dry_run:
                db.execute("DELETE FROM dense_results WHERE dense_key = ?", (key,))

        removed += _loose_folders(store, paths, runs, active, tracked, refused)
        _take(removed, errors, dry_run)
    if not dry_run and vacuum:
        try:
            store.db.execute("VACUUM")
            store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError as err:
            notes.append(f"the database was not compacted: {err}")
    return _summary(dry_run, before, store, removed, refused, errors, kept=kept, notes=notes)


def _loose_folders(store: Store, paths: _Paths, runs: set[str], active: dict[str, str], tracked: set[Path],
                   refused: list[dict]) -> list[dict]:
    """Temporary folders of dead processes, folders of runs no longer in the database and untracked model
    folders, all inside the runs folder."""
    found = []
    top = store.root / "runs"
    if not top.is_dir() or top.is_symlink():
        return found
    for entry in sorted(top.iterdir()):
        name = entry.name
        temp = TEMP_NAME.match(name)
        if temp:
            if not _pid_alive(int(temp.group(1))):
                found.append({"kind": "temporary", "path": str(entry if entry.is_symlink() else entry.resolve()),
                              "bytes": tree_bytes(entry)})
            continue
        folder = paths.own(entry, name, exact=True)
        if folder is None:
            if entry.is_symlink():
                refused.append({"kind": "run folder", "run_id": name, "path": str(entry),
                                "reason": "it is a link, maybe out of the store: left alone"})
            continue
        if not folder.is_dir():
            continue
        if name not in runs:
            found.append({"kind": "orphan run folder", "run_id": name, "path": str(folder),
                          "bytes": tree_bytes(folder)})
            continue
        for child in sorted(folder.iterdir()):
            temp = TEMP_NAME.match(child.name)
            if temp:
                if not _pid_alive(int(temp.group(1))):
                    where = child if child.is_symlink() else child.resolve()   # a link goes, never its target
                    found.append({"kind": "temporary", "run_id": name, "path": str(where), "bytes": tree_bytes(child)})
            elif (child.name == MODEL_ARTIFACT and name not in active and not child.is_symlink()
                  and child.resolve() not in tracked):
                found.append({"kind": "untracked model", "run_id": name, "path": str(child.resolve()),
                              "bytes": tree_bytes(child)})
    return found
