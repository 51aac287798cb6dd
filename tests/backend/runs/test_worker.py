"""Runs through the CLI with real worker processes and a real store: completion, caching without torch, the
dense side computed once, kill -9 recovery, cancellation and a damaged artifact rebuilt."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from backend.runs.artifacts import MODEL_ARTIFACT, sha256
from backend.runs.store import Store
from backend.runs.worker import stop_worker
from tests.conftest import ROOT, TINY_EVAL, needs_shared
from tests.conftest import backend_cli as cli

pytestmark = needs_shared


def run_args(model: Path, method: str = "wanda", *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--method", method, "--sparsity", "0.5", "--calibration", "demo-prose",
            "--nsamples", "4", "--seqlen", "64", "--ppl", "wikitext2", "--ppl-seqlen", "64", "--ppl-windows", "2",
            "--jsd", "demo", "--tasks", "demo", "--limit", "4", "--max-new-tokens", "4", "--data-dir",
            str(ROOT.parent / "shared" / "data"), *extra]


# the CLI in a process that says on its last stderr line whether it imported torch or transformers
TORCH_FREE = ("import json, sys; from backend.cli.parser import main; rc = main(sys.argv[1:]); "
              "print(json.dumps({'torch': 'torch' in sys.modules or 'transformers' in sys.modules}), file=sys.stderr)")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    yield root
    stop_worker(root)


@pytest.fixture(scope="module")
def first(store, tiny_folder) -> dict:
    return cli(store, *run_args(tiny_folder))


def test_a_run_prunes_evaluates_and_records_everything(store, first):
    assert first["state"] == "done" and not first["cached"]
    assert set(first["dense"]) >= {"ppl", "em", "f1", "rouge1"} and "jsd" in first
    db = Store(store)
    rid = first["run_id"]
    assert len(db.layers(rid)) == 2 * 7
    assert {e["kind"] for e in db.examples(rid)} == {"divergence", "task"}
    artifact = db.artifact(rid, MODEL_ARTIFACT)
    assert (artifact["path"] / "model.safetensors").is_file()
    assert artifact["files"]["model.safetensors"]["sha256"] == sha256(artifact["path"] / "model.safetensors")
    assert db.integrity() == "ok"


def test_an_identical_spec_is_served_from_the_store_without_torch(store, first, tiny_folder):
    done = subprocess.run([sys.executable, "-c", TORCH_FREE, *run_args(tiny_folder), "--store", str(store), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    again = json.loads(done.stdout)
    assert again["cached"] and again["run_id"] == first["run_id"] and again["pruned"] == first["pruned"]
    assert json.loads(done.stderr.strip().splitlines()[-1]) == {"torch": False}
    assert Store(store).db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1


def test_the_dense_side_is_computed_once_per_model_and_setting(store, first, tiny_folder):
    second = cli(store, *run_args(tiny_folder, "magnitude"))
    assert second["run_id"] != first["run_id"]
    assert second["dense_reused"] and not first["dense_reused"]
    assert second["dense"] == first["dense"]
    assert "ppl_dense" not in second["seconds"]


def test_the_same_pruning_under_other_evaluation_settings_is_not_pruned_again(store, tiny_folder):
    """The worker keeps the last job's pruned model: a run that differs only in what it evaluates takes those weights
    and that per-layer report (its job has no calibration or pruning stage, its model is the same bytes) and
    evaluates them its own way (which runs prune alike: test_identity's prune key test)."""
    db = Store(store)
    pruned = cli(store, *run_args(tiny_folder, "magnitude", "--seed", "7"))
    again = cli(store, *run_args(tiny_folder, "magnitude", "--seed", "7", "--ppl-windows", "3"))
    assert db.metrics(again["run_id"])["prune"]["reused_from"] == pruned["run_id"]
    assert "reused_from" not in db.metrics(pruned["run_id"])["prune"]
    stages = [set(json.loads(db.latest_job(run["run_id"])["timings"])) for run in (pruned, again)]
    assert {"calibration", "pruning"} <= stages[0] and not {"calibration", "pruning"} & stages[1], stages
    weights = lambda run: db.artifact(run["run_id"], MODEL_ARTIFACT)["files"]["model.safetensors"]["sha256"]
    assert weights(again) == weights(pruned)
    rows = lambda run: [{k: v for k, v in r.items() if k != "run_id"} for r in db.layers(run["run_id"])]
    assert rows(again) == rows(pruned)
    assert db.metrics(again["run_id"])["summary"]["protocol"]["ppl"]["windows"] == 3


def wait_for(condition, timeout: float = 120.0, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def test_kill_9_mid_job_leaves_the_store_intact_and_a_second_submission_completes(store, first, tiny_folder):
    args = run_args(tiny_folder, "sparsegpt", "--nsamples", "32")
    queued = cli(store, *args, "--detach")
    rid = queued["run_id"]
    db = Store(store)
    job = wait_for(lambda: (j := db.latest_job(rid)) and j["state"] == "running"
                   and j["stage"] not in (None, "starting", "loading model") and j)
    os.kill(job["worker_pid"], signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{job['worker_pid']}").exists() or
             open(f"/proc/{job['worker_pid']}/stat").read().rsplit(")", 1)[1].split()[0] == "Z")
    assert db.integrity() == "ok"
    listed = cli(store, "list")
    assert next(r for r in listed["runs"] if r["run_id"] == rid)["state"] == "interrupted"
    assert db.metrics(rid) is None
    again = cli(store, *args)
    assert again["state"] == "done" and again["run_id"] == rid
    assert [j["state"] for j in db.db.execute("SELECT state FROM jobs WHERE run_id = ? ORDER BY job_id", (rid,))] \
        == ["interrupted", "done"]


def test_a_busy_job_is_never_declared_dead_by_a_stale_heartbeat_and_ends_exactly_once(store, first, tiny_folder):
    """The worker is frozen mid-job (SIGSTOP: no progress, no heartbeat, as in a long compute loop or another PID
    namespace) and its last heartbeat is made decades old; three processes submitting the same run meanwhile must
    find the job alive (its worker holds the store's lock), queue nothing, and the job must end once, done."""
    args = run_args(tiny_folder, "sparsegpt", "--nsamples", "16", "--seed", "3")
    rid = cli(store, *args, "--detach")["run_id"]
    db = Store(store)
    job = wait_for(lambda: (j := db.latest_job(rid)) and j["state"] == "running"
                   and j["stage"] not in (None, "starting", "loading model") and j)
    os.kill(job["worker_pid"], signal.SIGSTOP)
    try:
        with db.write() as w:
            w.execute("UPDATE jobs SET heartbeat = 1 WHERE job_id = ?", (job["job_id"],))
        submitters = [subprocess.Popen([sys.executable, "-c", TORCH_FREE, *args, "--detach", "--store", str(store),
                                        "--json"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True) for _ in range(3)]
        outputs = [p.communicate(timeout=120) for p in submitters]
        answers = [json.loads(out) for out, _ in outputs]
        assert {(a["run_id"], a["job_id"], a["state"]) for a in answers} == {(rid, job["job_id"], "running")}
        # joining a job already queued needs no checks again: no submitter loaded torch or transformers
        assert [json.loads(err.strip().splitlines()[-1]) for _, err in outputs] == [{"torch": False}] * 3
        assert cli(store, "list")["runs"][0]["state"] == "running"
    finally:
        os.kill(job["worker_pid"], signal.SIGCONT)
    assert cli(store, *args)["state"] == "done"
    assert [tuple(r) for r in db.db.execute("SELECT job_id, state FROM jobs WHERE run_id = ?", (rid,))] \
        == [(job["job_id"], "done")]


def test_a_damaged_pruned_model_is_found_and_rebuilt(store, first, tmp_path):
    db = Store(store)
    rid = first["run_id"]
    weights = db.artifact(rid, MODEL_ARTIFACT)["path"] / "model.safetensors"
    original = sha256(weights)
    data = bytearray(weights.read_bytes())
    data[-100:] = bytes(100)
    weights.write_bytes(bytes(data))
    exported = cli(store, "export", rid, "--to", str(tmp_path / "out"))
    assert set(exported["files"]) == {"model", "metrics.json", "layers.csv", "records.jsonl"}
    assert sha256(tmp_path / "out" / "model" / "model.safetensors") == original
    assert db.latest_job(rid)["kind"] == "rebuild"
    assert len((tmp_path / "out" / "layers.csv").read_text().splitlines()) == 1 + 2 * 7
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["run_id"] == rid


def test_cancel_stops_a_queued_run(store, first, tiny_folder):
    """The store's worker lock is held here, so the submission starts no worker and its job stays queued however fast
    a tiny job would run (a worker could otherwise finish it before `cancel` starts)."""
    from backend.runs.lock import try_lock

    stop_worker(store)
    lock = try_lock(store, attempts=150)
    assert lock is not None
    try:
        queued = cli(store, *run_args(tiny_folder, "wanda", "--seed", "7"), "--detach")
        assert Store(store).latest_job(queued["run_id"])["state"] == "queued"
        assert cli(store, "cancel", queued["run_id"])["state"] == "cancelled"
    finally:
        lock.close()
    final = Store(store).latest_job(queued["run_id"])
    assert (final["state"], final["message"]) == ("cancelled", "cancelled before it started")


def test_bad_specs_and_unknown_runs_are_one_line_errors(store, tiny_folder):
    bad = subprocess.run([sys.executable, "-m", "backend", *run_args(tiny_folder, "prune-it"), "--store", str(store)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "method 'prune-it' is not allowed" in bad.stderr
    missing = subprocess.run([sys.executable, "-m", "backend", "show", "zzzz", "--store", str(store)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "run 'zzzz' is not in the store" in missing.stderr


def test_the_whole_loop_runs_offline_with_self_calibration_and_demo_data(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.delenv("PRUNESCOPE_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        done = cli(tmp_path, "run", "--model", str(tiny_folder), "--method", "sparsegpt", "--sparsity", "0.5",
                   "--calibration", "self", "--nsamples", "2", "--seqlen", "32", *TINY_EVAL)
    finally:
        stop_worker(tmp_path)
    assert done["state"] == "done"
    assert done["protocol"]["ppl"]["source"].startswith("demo-prose (demo (built in)")
    assert done["protocol"]["tasks"]["source"] == "demo" and done["pruned"]["f1"] is not None


def test_a_sweep_again_is_served_from_the_store_and_list_show_report_read_it(filled_store, tiny_folder, tmp_path):
    jobs = Store(filled_store).db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    again = cli(filled_store, "sweep", "--model", str(tiny_folder), "--methods", "wanda", "magnitude", "--sparsities",
                "0.5", "--calibrations", "demo-prose", "demo", "--nsamples", "4", "--seqlen", "64", *TINY_EVAL)
    assert again["cached"] == again["queued"] == 4
    assert Store(filled_store).db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == jobs
    listed = cli(filled_store, "list")["runs"]
    assert {r["run_id"] for r in listed} == {r["run_id"] for r in again["runs"]}
    assert all(r["state"] == "done" and r["jsd"] is not None for r in listed)
    shown = cli(filled_store, "show", listed[0]["run_id"][:6])
    assert shown["run_id"] == listed[0]["run_id"] and len(shown["layers"]) == 2 * 7
    report = cli(filled_store, "report", "--out", str(tmp_path / "report.html"))
    page = (tmp_path / "report.html").read_text()
    assert report["done"] == 4 and all(r["run_id"] in page for r in listed) and "<script src=" not in page


def test_a_run_calibrated_on_its_evaluation_s_source_holds_those_records_out(filled_store):
    db = Store(filled_store)
    try:
        held = {r["calibration"]: db.metrics(r["run_id"])["prune"]["calibration_held_out"] for r in db.runs()}
    finally:
        db.close()
    assert held == {"demo": 6, "demo-prose": 0}  # the tasks and the divergence read the first 6 demo records


def test_a_refused_submission_stops_its_own_worker_but_never_someone_elses_job(tmp_path, tiny_folder):
    """The worker starts while a submission's checks run; when they refuse it, it goes again, and a job another
    submission queued meanwhile still runs to the end."""
    from backend.runs import service
    from backend.runs.service import submit, submit_many
    from backend.runs.spec import EvalSettings, RunSpec, SpecError
    from backend.runs.worker import worker_running
    from compression.targets import Targets

    db = Store(tmp_path)
    spec = RunSpec(method="wanda", sparsity=0.5, model=str(tiny_folder), calibration="demo-prose", nsamples=2,
                   seqlen=32, evaluation=EvalSettings(ppl="demo-prose", ppl_seqlen=64, ppl_windows=1, jsd=None,
                                                      tasks=None))
    bad = RunSpec(**{**vars(spec), "seed": 1, "targets": Targets(layers=(0.5, 0.5, 0.5))})
    try:
        with pytest.raises(SpecError, match="gives 3 sparsities"):
            submit_many(db, [bad])
        assert not worker_running(tmp_path) and not db.runs()
        queued = submit(db, spec, start_worker=False)
        with pytest.raises(SpecError, match="gives 3 sparsities"):
            submit_many(db, [bad])
        service.wait(db, [queued["run_id"]])
        assert db.latest_job(queued["run_id"])["state"] == "done"
    finally:
        stop_worker(tmp_path)


def test_a_job_queued_while_an_idle_worker_decides_to_exit_is_served(tmp_path, monkeypatch):
    """The race a submission could lose: the worker finds the queue empty and decides to exit while it still holds
    the store, so a submission in between sees a worker and starts none. Here a job is queued right after the
    worker's last empty look, its lock held; the worker must still take it (its run's spec is unreadable, so it fails
    at once: what matters is that it leaves the queue)."""
    from backend.runs.lock import lock_holder
    from backend.runs.worker import serve

    Store(tmp_path).close()
    claim, seen = Store.claim_next, []

    def claim_then_submit(self, pid):
        job = claim(self, pid)
        if job is None and not seen:
            seen.append(lock_holder(tmp_path))
            self.db.execute("INSERT INTO runs (run_id, spec, fingerprints, model, method, sparsity, pattern, "
                            "calibration, created_at) VALUES ('late', '{}', '{}', 'm', 'wanda', 0.5, 'unstructured', "
                            "'c4', 0)")
            self.db.execute("INSERT INTO jobs (run_id, kind, state, created_at) VALUES ('late', 'full', 'queued', 0)")
        return job

    monkeypatch.setattr(Store, "claim_next", claim_then_submit)
    assert serve(tmp_path, idle_exit=0, log=lambda _m: None) == 1
    assert seen == [os.getpid()]
    store = Store(tmp_path)
    assert [tuple(r) for r in store.db.execute("SELECT run_id, state FROM jobs")] == [("late", "failed")]
    assert lock_holder(tmp_path) is None
