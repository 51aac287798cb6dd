"""A job's overall progress: the plan names exactly the stages a real job reports, the fraction only grows and ends
at 1, stage messages end with their stage, estimates come from the last job's measured rates, and generation
reports every decoding step."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from backend.runs.progress import (
    Reporter,
    TokenSteps,
    measured_rates,
    plan_for,
    rate_key,
)
from backend.runs.store import Store
from backend.runs.worker import stop_worker
from compression.calibration import windows_from_model
from metrics.generation import generate_answers
from tests.conftest import TINY_EVAL
from tests.conftest import backend_cli as cli


@pytest.fixture(scope="module")
def two_jobs(tmp_path_factory, tiny_folder) -> Store:
    """A store where a real worker ran two full jobs of the tiny model, the second with other sparsity."""
    root = tmp_path_factory.mktemp("progress-store")
    try:
        cli(root, "sweep", "--model", str(tiny_folder), "--methods", "wanda", "--sparsities", "0.5", "0.6",
            "--calibrations", "demo-prose", "--nsamples", "4", "--seqlen", "64", *TINY_EVAL)
    finally:
        stop_worker(root)
    return Store(root)


def jobs(store: Store) -> list[dict]:
    return [dict(r) for r in store.db.execute("SELECT * FROM jobs ORDER BY job_id")]


def test_the_plan_names_every_stage_a_real_job_went_through(two_jobs):
    first, second = jobs(two_jobs)
    spec = two_jobs.spec(first["run_id"])
    measured = json.loads(first["timings"])
    plan = plan_for(spec, params=10**6, layers=2, dense_reused=False, measured={})
    assert [s.name for s in plan] == list(measured)
    assert "perplexity dense" in measured and "answers dense" in measured
    # a job that reused the dense side plans and goes through the pruned side only
    reused = two_jobs.metrics(second["run_id"])["summary"]["dense_reused"]
    again = plan_for(two_jobs.spec(second["run_id"]), 10**6, 2, dense_reused=reused, measured={})
    assert [s.name for s in again] == list(json.loads(second["timings"]))
    assert any(s.name.endswith(" dense") for s in again) is not reused
    for job in (first, second):
        assert job["overall"] == pytest.approx(1.0) and job["remaining_s"] == pytest.approx(0.0, abs=1e-6)


def test_estimates_come_from_the_newest_finished_job_of_the_model_on_that_device(two_jobs, tiny_folder):
    second = jobs(two_jobs)[-1]
    rates = measured_rates(two_jobs, str(tiny_folder), "cpu", calibration_self=False)
    timings = json.loads(second["timings"])
    assert rates == {rate_key(name): t["seconds"] / t["work"] for name, t in timings.items()}
    spec = two_jobs.spec(second["run_id"])
    plan = plan_for(spec, 10**6, 2, dense_reused=True, measured=rates)
    assert [round(s.seconds, 9) for s in plan] == [round(timings[s.name]["seconds"], 9) for s in plan]
    assert measured_rates(two_jobs, str(tiny_folder), "cuda", calibration_self=False) == {}
    assert "calibration" not in measured_rates(two_jobs, str(tiny_folder), "cpu", calibration_self=True)


def test_the_fraction_only_grows_and_a_new_stage_drops_the_last_message(tmp_path, two_jobs):
    store = Store(tmp_path)
    spec = two_jobs.spec(jobs(two_jobs)[0]["run_id"])
    rid = "r" * 16
    store.submit(spec, {"data": {}}, rid)
    job = store.claim_next(pid=1)
    report = Reporter(store, job["job_id"], interval=0.0)
    plan = plan_for(spec, 10**6, 2, dense_reused=False, measured={})
    report("loading model", message="loading")
    report.start_plan(plan)
    seen = []
    for stage in plan:
        for done in range(0, 5):
            report(stage.name, done, 4, message=f"{stage.name} {done}" if stage.name == "pruning" else None)
            row = store.job(job["job_id"])
            seen.append((row["overall"], row["message"], row["stage"]))
    fractions = [f for f, _, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == pytest.approx(1.0) and fractions[0] == 0.0
    assert all(message is None for _, message, stage in seen if stage != "pruning")
    assert {message for _, message, stage in seen if stage == "pruning"} == {f"pruning {d}" for d in range(5)}


def test_generation_reports_every_decoding_step(tiny_folder):
    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    counts: list[int] = []
    steps = TokenSteps(counts.append)
    generate_answers(model, tokenizer, ["one", "two words", "three more words"], max_new_tokens=5, batch_size=2,
                     min_new_tokens=5, streamer=steps)
    # prefilled 2 and 1 at a time, decoded together, 5 tokens each (the prompt is not counted): one report per step
    assert counts == [3, 6, 9, 12, 15]
    counts.clear()
    torch.manual_seed(0)
    windows = windows_from_model(model, tokenizer, nsamples=3, seqlen=4, batch_size=2, streamer=TokenSteps(counts.append))
    assert windows.shape == (3, 4) and counts[-1] == 3 * 4 and len(counts) == 8
