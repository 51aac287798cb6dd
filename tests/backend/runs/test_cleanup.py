"""Deleting runs and collecting the store's garbage, on copies of a real store filled by the real CLI and worker:
rows and folders gone, the others intact, active runs refused, dry runs inert, paths outside the store left alone."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend.runs.artifacts import MODEL_ARTIFACT, intact
from backend.runs.cleanup import RUN_TABLES, delete_runs, gc, human_bytes, store_size
from backend.runs.spec import dense_key
from backend.runs.store import DB_NAME, Store, StoreError
from backend.runs.worker import stop_worker
from tests.conftest import ROOT, copy_store
from tests.conftest import backend_cli as cli


@pytest.fixture()
def root(filled_store, tmp_path) -> Path:
    folder = copy_store(filled_store, tmp_path / "store")
    yield folder
    stop_worker(folder)


def counts(store: Store, rid: str) -> dict[str, int]:
    return {t: store.db.execute(f"SELECT COUNT(*) FROM {t} WHERE run_id = ?", (rid,)).fetchone()[0]
            for t in RUN_TABLES}


def snapshot(root: Path) -> tuple[dict, dict]:
    """Every row of every table, and every file under the store with its size (not the SQLite files)."""
    db = sqlite3.connect(root / DB_NAME)
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    rows = {t: sorted(map(repr, db.execute(f"SELECT * FROM {t}"))) for t in tables}
    db.close()
    files = {str(p.relative_to(root)): p.lstat().st_size for p in root.rglob("*")
             if not p.name.startswith(DB_NAME) and not p.name.endswith(".lock") and not p.is_dir()}
    return rows, files


def hold_worker_lock(root: Path):
    """Hold the store's worker lock as a live worker would, so a 'running' job of this pid counts as alive."""
    handle = open(root / "worker.lock", "a+")  # noqa: SIM115  (held until the caller closes it)
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def dead_pid() -> int:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_store_size_counts_the_database_and_the_artifacts(root):
    store = Store(root)
    size = store_size(store)
    assert size["runs"] == 4 and size["models"] == 4
    assert size["db_bytes"] >= (root / DB_NAME).stat().st_size > 0
    models = sum(p.stat().st_size for p in (root / "runs").rglob("*") if p.is_file())
    assert size["artifact_bytes"] == models > 100_000
    assert size["total_bytes"] >= size["db_bytes"] + size["artifact_bytes"]
    assert human_bytes(1_234_567) == "1.2 MB" and human_bytes(999) == "999 B"


def test_delete_removes_every_row_and_the_folder_and_leaves_the_others(root):
    store = Store(root)
    rows = store.runs()
    gone, others = rows[0]["run_id"], [r["run_id"] for r in rows[1:]]
    kept = {rid: counts(store, rid) for rid in others}
    assert all(n > 0 for n in counts(store, gone).values())
    folder_bytes = sum(p.stat().st_size for p in store.run_folder(gone).rglob("*") if p.is_file())

    result = delete_runs(store, [gone])
    assert counts(store, gone) == dict.fromkeys(RUN_TABLES, 0)
    assert not store.run_folder(gone).exists()
    assert next(e for e in result["removed"] if e["kind"] == "run folder")["bytes"] == folder_bytes
    assert result["bytes"] > folder_bytes and not result["refused"] and not result["errors"]
    assert (result["before"]["runs"], result["after"]["runs"]) == (4, 3)
    assert result["after"]["artifact_bytes"] == result["before"]["artifact_bytes"] - folder_bytes
    for rid in others:
        assert counts(store, rid) == kept[rid]
        assert intact(store, rid, full=True)
    assert [r["run_id"] for r in store.runs()] == others
    assert store.integrity() == "ok"
    assert store.db.execute("PRAGMA foreign_key_check").fetchall() == []

    # the CLI takes a prefix and says the same in JSON
    out = cli(root, "delete", others[0][:6])
    assert out["runs"] == [others[0]] and not Store(root).run_folder(others[0]).exists()
    assert len(Store(root).runs()) == 2 and Store(root).integrity() == "ok"
    with pytest.raises(StoreError, match="not in the store"):
        delete_runs(store, [gone])


def test_a_run_with_a_queued_or_running_job_is_refused(root):
    store = Store(root)
    rid = store.runs()[0]["run_id"]
    before = snapshot(root)
    store.submit(store.spec(rid), store.fingerprints(rid), rid, artifacts_ok=False)   # a queued rebuild
    queued = snapshot(root)
    with pytest.raises(StoreError, match="has a queued job: cancel it first"):
        delete_runs(store, [store.runs()[1]["run_id"], rid])
    assert snapshot(root) == queued            # and the other run of the request is not deleted either
    done = cli(root, "delete", rid[:8], check=False)
    assert done["returncode"] == 2 and "cancel it first" in done["stderr"]
    assert len(done["stderr"].strip().splitlines()) == 1

    lock = hold_worker_lock(root)
    try:
        job = store.claim_next(pid=os.getpid())
        assert job["run_id"] == rid
        with pytest.raises(StoreError, match="has a running job: cancel it first"):
            delete_runs(store, [rid])
        done = cli(root, "delete", rid, check=False)
        assert done["returncode"] == 2 and "running job: cancel it first" in done["stderr"]
        assert store.latest_job(rid)["state"] == "running" and store.run_folder(rid).is_dir()
        with store.write() as db:
            db.execute("UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE job_id = ?",
                       (time.time(), job["job_id"]))
    finally:
        lock.close()
    assert snapshot(root)[1] == before[1]
    assert delete_runs(store, [rid])["runs"] == [rid] and counts(store, rid) == dict.fromkeys(RUN_TABLES, 0)


def test_a_dry_run_changes_nothing_and_reports_the_same_bytes(root):
    store = Store(root)
    rid = store.runs()[2]["run_id"]
    before = snapshot(root)
    dry = delete_runs(store, [rid], dry_run=True)
    assert snapshot(root) == before
    assert dry["dry_run"] and dry["after"]["projected"] and dry["after"]["runs"] == 3
    out = cli(root, "delete", rid, "--dry-run")
    assert snapshot(root) == before and out["bytes"] == dry["bytes"]
    real = delete_runs(store, [rid])
    assert real["bytes"] == dry["bytes"] > 0 and real["removed"] == dry["removed"]
    assert real["after"]["artifact_bytes"] == dry["after"]["artifact_bytes"]

    middle = snapshot(root)
    dry = gc(store, keep_models=1, dry_run=True)
    assert len(dry["removed"]) == 2 and snapshot(root) == middle
    assert gc(store, keep_models=1, dry_run=True) == dry and snapshot(root) == middle
    real = gc(store, keep_models=1)
    assert real["removed"] == dry["removed"] and real["bytes"] == dry["bytes"]


def test_gc_keep_models_keeps_the_newest_model_and_every_runs_results(root):
    store = Store(root)
    rows = store.runs()
    ids = [r["run_id"] for r in rows]
    with store.write() as db:   # the models written one hour apart, ids[1] last
        for hours, rid in enumerate(reversed(ids)):
            db.execute("UPDATE artifacts SET created_at = ? WHERE run_id = ?", (time.time() - 3600 * (4 - hours), rid))
        db.execute("UPDATE artifacts SET created_at = ? WHERE run_id = ?", (time.time(), ids[1]))
    results = {rid: (store.metrics(rid), store.layers(rid), store.examples(rid)) for rid in ids}
    result = cli(root, "gc", "--keep-models", "1")
    assert [e["run_id"] for e in result["removed"]] == [rid for rid in ids if rid != ids[1]]
    assert {e["kind"] for e in result["removed"]} == {"model"} and not result["refused"]
    assert [r[0] for r in store.db.execute("SELECT run_id FROM artifacts")] == [ids[1]]
    assert intact(store, ids[1], full=True)
    for rid in ids:
        assert (store.metrics(rid), store.layers(rid), store.examples(rid)) == results[rid]
        assert (store.run_folder(rid) / MODEL_ARTIFACT).is_dir() == (rid == ids[1])
        if rid != ids[1]:
            assert intact(store, rid) is None   # no artifact: export prunes again
    listed = store.runs()
    assert [r["run_id"] for r in listed] == ids and {r["state"] for r in listed} == {"done"}
    assert result["after"]["models"] == 1 and result["after"]["artifact_bytes"] < result["before"]["artifact_bytes"]
    assert store.integrity() == "ok"

    # a second gc has nothing left to do; --older-than keeps models written within the period
    assert cli(root, "gc", "--keep-models", "1")["removed"] == []
    assert cli(root, "gc", "--older-than", "1")["removed"] == []
    assert store.db.execute("SELECT COUNT(*) FROM artifacts").fetchone()[0] == 1


def test_export_after_gc_prunes_the_model_again(root, tmp_path):
    store = Store(root)
    rid = store.runs()[0]["run_id"]
    gc(store, keep_models=0)
    assert intact(store, rid) is None and not (store.run_folder(rid) / MODEL_ARTIFACT).exists()
    out = cli(root, "export", rid, "--to", str(tmp_path / "out"))
    assert "model" in out["files"] and (tmp_path / "out" / "model" / "model.safetensors").is_file()
    assert intact(store, rid, full=True)


def test_paths_outside_the_store_are_never_removed(root, tmp_path):
    store = Store(root)
    first, second, third = (r["run_id"] for r in store.runs()[:3])
    exported = tmp_path / "exported" / "model"            # a user's folder, named by a (damaged) artifact row
    shutil.copytree(store.run_folder(first) / MODEL_ARTIFACT, exported)
    with store.write() as db:
        db.execute("UPDATE artifacts SET path = ? WHERE run_id = ?", (str(exported), first))
        db.execute("UPDATE artifacts SET path = ? WHERE run_id = ?", (str(root / "runs" / third / MODEL_ARTIFACT),
                                                                       second))   # another run's model
    elsewhere = tmp_path / "elsewhere"                     # a run folder that is a link out of the store
    shutil.copytree(store.run_folder(third), elsewhere)
    shutil.rmtree(store.run_folder(third))
    store.run_folder(third).symlink_to(elsewhere, target_is_directory=True)
    def outside() -> list:
        return sorted((p, p.stat().st_size) for d in (exported, elsewhere) for p in d.rglob("*"))

    files = outside()

    result = gc(store, keep_models=0)
    refused = {e["run_id"]: e for e in result["refused"] if e["kind"] == "model"}
    assert set(refused) == {first, second, third} and "left alone" in refused[first]["reason"]
    assert store.artifact(first, MODEL_ARTIFACT)["path"] == exported   # row and folder both left
    assert {e["kind"] for e in result["refused"]} == {"model", "run folder"}
    assert not any(str(exported) in str(e.get("path")) or str(elsewhere) in str(e.get("path"))
                   for e in result["removed"])

    result = delete_runs(store, [first, third])
    assert counts(store, first) == counts(store, third) == dict.fromkeys(RUN_TABLES, 0)
    assert {(e["kind"], e["run_id"]) for e in result["refused"]} == {
        ("artifact", first), ("artifact", third), ("run folder", third)}
    assert outside() == files
    assert (exported / "model.safetensors").is_file() and (elsewhere / MODEL_ARTIFACT / "model.safetensors").is_file()
    assert store.run_folder(third).is_symlink()    # the link itself is reported, not followed nor removed
    assert cli(root, "gc", "--dry-run")["refused"][0]["kind"] == "run folder"
    assert store.integrity() == "ok"


def test_gc_removes_dead_temporary_folders_orphans_and_old_dense_results(root):
    store = Store(root)
    rid = store.runs()[0]["run_id"]
    folder = store.run_folder(rid)
    dead, alive = folder / f".model.tmp{dead_pid()}", folder / f".model.tmp{os.getpid()}"
    for tmp in (dead, alive):
        tmp.mkdir()
        (tmp / "model.safetensors").write_bytes(b"x" * 1000)
    orphan = root / "runs" / "0123456789abcdef"
    orphan.mkdir()
    (orphan / "leftover.bin").write_bytes(b"y" * 500)
    keys = [r[0] for r in store.db.execute("SELECT dense_key FROM dense_results")]
    used = {dense_key(store.spec(r), store.fingerprints(r)) for r in (x["run_id"] for x in store.runs())}
    assert keys and set(keys) == used
    with store.write() as db:
        db.execute("INSERT INTO dense_results VALUES ('old-unused', 'm', '{}', ?)", (time.time() - 10 * 86400,))
        db.execute("INSERT INTO dense_results VALUES ('new-unused', 'm', '{\"ppl\": 3}', ?)", (time.time(),))

    result = gc(store)
    assert {(e["kind"], Path(e.get("path") or "").name) for e in result["removed"]} == {
        ("temporary", dead.name), ("orphan run folder", orphan.name)}
    assert result["bytes"] == 1500 and not dead.exists() and not orphan.exists() and alive.is_dir()
    assert store.db.execute("SELECT COUNT(*) FROM artifacts").fetchone()[0] == 4   # no model option: all kept
    assert [e["key"] for e in gc(store, older_than_days=5)["removed"]] == ["old-unused"]
    assert [e["key"] for e in gc(store, unused_dense=True)["removed"]] == ["new-unused"]
    assert sorted(r[0] for r in store.db.execute("SELECT dense_key FROM dense_results")) == sorted(keys)
    assert store.db.execute("SELECT COUNT(*) FROM artifacts").fetchone()[0] == 4
    with pytest.raises(StoreError, match="negative"):
        gc(store, keep_models=-1)


def clone_runs(root: Path, total: int) -> list[str]:
    """Grow a store to `total` runs by copying its runs' rows and folders under new ids, each model written a
    minute after the one before."""
    db = sqlite3.connect(root / DB_NAME, isolation_level=None)
    sources = [r[0] for r in db.execute("SELECT run_id FROM runs ORDER BY run_id")]
    columns = {t: [r[1] for r in db.execute(f"PRAGMA table_info({t})") if r[1] != "job_id"] for t in RUN_TABLES}
    ids = list(sources)
    db.execute("BEGIN IMMEDIATE")
    for n in range(total - len(sources)):
        source = sources[n % len(sources)]
        rid = hashlib.sha256(f"clone-{n}".encode()).hexdigest()[:16]
        for table in ("runs", *RUN_TABLES[:-1]):
            cols = columns[table]
            picked = ", ".join("?" if c == "run_id" else c for c in cols)
            db.execute(f"INSERT INTO {table} ({', '.join(cols)}) SELECT {picked} FROM {table} WHERE run_id = ?",
                       (rid, source))
        db.execute("UPDATE runs SET created_at = created_at + ? WHERE run_id = ?", (n + 1, rid))
        db.execute("UPDATE artifacts SET path = ? WHERE run_id = ?", (str(root / "runs" / rid / MODEL_ARTIFACT), rid))
        shutil.copytree(root / "runs" / source, root / "runs" / rid)
        ids.append(rid)
    for minute, rid in enumerate(ids):
        db.execute("UPDATE artifacts SET created_at = ? WHERE run_id = ?", (time.time() - 60 * (len(ids) - minute), rid))
    db.execute("COMMIT")
    db.close()
    return ids


def test_gc_on_a_store_of_20_runs(root):
    ids = clone_runs(root, 20)
    store = Store(root)
    assert len(store.runs()) == 20 and all(intact(store, rid, full=True) for rid in ids)
    before = snapshot(root)
    dry = cli(root, "gc", "--keep-models", "5", "--dry-run")
    assert snapshot(root) == before
    real = cli(root, "gc", "--keep-models", "5")
    assert real["removed"] == dry["removed"] and real["bytes"] == dry["bytes"] and len(real["removed"]) == 15
    assert [r[0] for r in store.db.execute("SELECT run_id FROM artifacts ORDER BY created_at")] == ids[-5:]
    assert len(store.runs()) == 20 and all(store.metrics(rid) for rid in ids) and store.integrity() == "ok"
    assert real["after"]["total_bytes"] < real["before"]["total_bytes"]
    for name, result in (("gc --keep-models 5 --dry-run", dry), ("gc --keep-models 5", real)):
        b, a = result["before"], result["after"]
        print(f"\n{name}: removes {len(result['removed'])} models, {result['bytes']} bytes; before "
              f"{b['total_bytes']} bytes ({b['runs']} runs, {b['models']} models, database {b['db_bytes']}, "
              f"artifacts {b['artifact_bytes']}); after {a['total_bytes']} bytes ({a['runs']} runs, {a['models']} "
              f"models, database {a['db_bytes']}, artifacts {a['artifact_bytes']})"
              + (" [projected]" if a.get("projected") else ""))
    text = subprocess.run([sys.executable, "-m", "backend", "gc", "--dry-run", "--keep-models", "1", "--store",
                           str(root)], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert text.returncode == 0 and "would remove 4 item(s)" in text.stdout and "store before:" in text.stdout
    print(text.stdout)


def test_every_table_with_a_run_id_is_cleaned():
    """A new table keyed by run_id must be added to RUN_TABLES, or delete would leave its rows behind."""
    db = sqlite3.connect(":memory:")
    from backend.runs.schema import migrate
    migrate(db)
    keyed = {t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
             if any(c[1] == "run_id" for c in db.execute(f"PRAGMA table_info({t})"))}
    assert keyed == set(RUN_TABLES)
