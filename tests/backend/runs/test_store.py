"""The results store on a real SQLite file: specs, run ids, submissions from two processes, migrations, recovery."""

from __future__ import annotations

import multiprocessing
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from backend.runs.schema import MIGRATIONS, SCHEMA_VERSION, migrate
from backend.runs.spec import EvalSettings, RunSpec, SpecError, fingerprints, run_id
from backend.runs.store import DB_NAME, Store

SPEC = RunSpec(method="wanda", sparsity=0.5, calibration="self", nsamples=4, seqlen=32,
               evaluation=EvalSettings(ppl=None, jsd="demo", tasks=None, limit=2))


@pytest.mark.parametrize("changes, field", [
    ({"method": "prune-it"}, "method"),
    ({"sparsity": 1.5}, "sparsity"),
    ({"sparsity": "half"}, "sparsity"),
    ({"pattern": "3:2"}, "pattern"),
    ({"pattern": "2:4", "sparsity": 0.3}, "sparsity"),
    ({"model": " "}, "model"),
    ({"calibration": ""}, "calibration"),
    ({"nsamples": 0}, "nsamples"),
    ({"seqlen": -5}, "seqlen"),
    ({"seed": -1}, "seed"),
    ({"template": "markdown"}, "template"),
    ({"order": "random"}, "order"),
    ({"per_row": True}, "per_row"),
    ({"dtype": "int3"}, "dtype"),
    ({"evaluation": EvalSettings(limit=0)}, "limit"),
    ({"evaluation": EvalSettings(template="yaml")}, "template"),
    ({"evaluation": EvalSettings(ppl=None, jsd=None, tasks=None)}, "nothing to evaluate"),
])
def test_every_invalid_spec_is_rejected_naming_the_field(changes, field):
    with pytest.raises(SpecError, match=field):
        replace(SPEC, **changes).normalised()


def test_unknown_fields_in_a_stored_spec_are_named():
    with pytest.raises(SpecError, match="colour"):
        RunSpec.from_dict({**SPEC.to_dict(), "colour": "red"})
    with pytest.raises(SpecError, match="windows"):
        RunSpec.from_dict({**SPEC.to_dict(), "evaluation": {"windows": 3}})


def test_run_id_is_stable_for_the_same_experiment_and_changes_with_spec_or_data(tmp_path):
    spec = replace(SPEC, method=" Wanda ", pattern=" 2:4").normalised()
    assert spec.method == "wanda" and spec.pattern == "2:4"
    assert RunSpec.from_dict(spec.to_dict()) == spec
    prints = fingerprints(spec)
    assert run_id(spec, prints) == run_id(replace(SPEC, pattern="2:4").normalised(), fingerprints(spec))
    assert run_id(spec, prints) != run_id(replace(spec, seed=1), prints)
    data = tmp_path / "cal.txt"
    data.write_text("one text. " * 50)
    with_file = replace(spec, calibration=str(data)).normalised()
    before = run_id(with_file, fingerprints(with_file))
    data.write_text("another text. " * 50)
    assert run_id(with_file, fingerprints(with_file)) != before


def submit_at_once(root: str, barrier, results) -> None:
    store = Store(root)
    spec = SPEC.normalised()
    prints = fingerprints(spec)
    barrier.wait()
    submission = store.submit(spec, prints, run_id(spec, prints))
    results.put((submission.run_id, submission.job_id))


def test_two_identical_submissions_at_the_same_moment_give_one_run_and_one_job(tmp_path):
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=submit_at_once, args=(str(tmp_path), barrier, results)) for _ in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(60)
    answers = {results.get(timeout=5) for _ in workers}
    assert len(answers) == 1
    db = sqlite3.connect(tmp_path / DB_NAME)
    assert db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 1
    assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1


def fresh(root) -> tuple[Store, RunSpec, dict, str]:
    """A new store and the normalised SPEC with its fingerprints and run id."""
    spec = SPEC.normalised()
    prints = fingerprints(spec)
    return Store(root), spec, prints, run_id(spec, prints)


def test_a_finished_run_is_served_from_the_store_and_a_failed_one_is_queued_again(tmp_path):
    store, spec, prints, rid = fresh(tmp_path)
    first = store.submit(spec, prints, rid)
    job = store.claim_next(pid=12345)
    assert job["job_id"] == first.job_id and store.claim_next(pid=12345) is None
    assert not store.finish(job["job_id"], "failed", "ValueError: boom", worker_pid=999)
    assert store.finish(job["job_id"], "failed", "ValueError: boom", worker_pid=12345)
    assert not store.finish(job["job_id"], "done", worker_pid=12345)
    second = store.submit(spec, prints, rid)
    assert second.job_id != first.job_id and second.state == "queued"
    job = store.claim_next(pid=12345)
    store.save_results(rid, {"overall_sparsity": 0.5}, [], {"dense": {"ppl": 3.0}, "pruned": {"ppl": 4.0},
                                                          "jsd": 0.1}, [{"id": "jsd-0", "kind": "divergence"}])
    assert store.finish(job["job_id"], "done", worker_pid=12345)
    third = store.submit(spec, prints, rid)
    assert third.cached and third.state == "done"
    assert store.submit(spec, prints, rid, artifacts_ok=False).state == "queued"
    assert store.latest_job(rid)["kind"] == "rebuild"
    row = store.runs()[0]
    assert (row["state"], row["pruned_ppl"], row["jsd"]) == ("queued", 4.0, 0.1)


def test_cancel_stops_a_queued_job_and_flags_a_running_one(tmp_path):
    store, spec, prints, rid = fresh(tmp_path)
    store.submit(spec, prints, rid)
    assert store.cancel(rid) == "cancelled"
    assert store.cancel(rid) is None
    store.submit(spec, prints, rid)
    job = store.claim_next(pid=12345)
    assert store.cancel(rid) == "cancelling"
    assert store.progress(job["job_id"], "pruning", 1, 2) is True


def test_a_job_whose_worker_is_gone_becomes_interrupted(tmp_path):
    store, spec, prints, rid = fresh(tmp_path)
    store.submit(spec, prints, rid)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    job = store.claim_next(pid=gone.pid)
    assert store.recover_stale() == [job["job_id"]]
    assert store.latest_job(rid)["state"] == "interrupted"
    assert store.submit(spec, prints, rid).state == "queued"


def test_a_store_made_by_an_older_schema_is_migrated_keeping_its_runs(tmp_path):
    db = sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)
    assert migrate(db, target=1) == 1
    spec = SPEC.normalised()
    db.execute("INSERT INTO runs VALUES ('old-run', ?, '{}', 'm', 'wanda', 0.5, 'unstructured', 'c4', 0)",
               (__import__("json").dumps(spec.to_dict()),))
    db.execute("INSERT INTO jobs (run_id, state, created_at) VALUES ('old-run', 'done', 0)")
    db.close()
    store = Store(tmp_path)
    assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == len(MIGRATIONS)
    assert store.spec("old-run") == spec
    assert store.latest_job("old-run")["cancel_requested"] == 0
    assert store.dense_result("nothing") is None
    assert store.integrity() == "ok"


def test_a_store_from_a_newer_version_is_refused(tmp_path):
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(ValueError, match="newer"):
        Store(tmp_path)


def test_waiting_gives_up_with_the_log_when_no_worker_serves_the_store(tmp_path):
    from backend.runs.service import wait
    from backend.runs.store import StoreError
    store, spec, prints, rid = fresh(tmp_path)
    store.submit(spec, prints, rid)
    started = time.monotonic()
    with pytest.raises(StoreError, match=r"no worker has served .* see .*worker.log"):
        wait(store, [rid], poll_s=0.05, no_worker_s=0.5)
    assert time.monotonic() - started < 10
    assert store.latest_job(rid)["state"] == "queued"
