"""The three claims' verdicts on hand-made stores (a claim that clearly holds, one that clearly fails, one within
noise), the runs missing to decide them, and queueing exactly those with the cohort's settings."""

from __future__ import annotations

import json

import pytest

from backend.findings.claims import HELD, INCONCLUSIVE, NOT_HELD
from backend.findings.service import build, queue
from backend.findings.study import Cell, cells
from backend.runs.spec import EvalSettings
from backend.runs.store import Store
from tests.backend.findings.handmade import SAMPLES, WINDOWS, add_run, handmade_store, units
from tests.conftest import SHARED_DATA, needs_shared


def cell(method: str, sparsity: float = 0.5, calibration: str = "c4") -> Cell:
    return Cell(method, sparsity, "unstructured", calibration)


# (method, sparsity, calibration) -> perplexity ratio, task drop; JS follows the drop unless given
HOLDS = {("sparsegpt", 0.3, "c4"): (1.04, 0.02), ("wanda", 0.3, "c4"): (1.05, 0.04),
         ("sparsegpt", 0.5, "alpaca"): (1.17, 0.08), ("wanda", 0.5, "alpaca"): (1.22, 0.10),
         ("sparsegpt", 0.5, "c4"): (1.15, 0.16), ("wanda", 0.5, "c4"): (1.20, 0.20),
         ("magnitude", 0.5, "c4"): (5.0, 0.24), ("magnitude", 0.5, "alpaca"): (5.2, 0.26),
         ("sparsegpt", 0.6, "c4"): (1.8, 0.36), ("wanda", 0.6, "c4"): (2.0, 0.40)}
FAILS = {("sparsegpt", 0.3, "c4"): (1.04, 0.02), ("wanda", 0.3, "c4"): (1.06, 0.04),
         ("sparsegpt", 0.5, "c4"): (2.5, 0.16), ("wanda", 0.5, "c4"): (3.0, 0.20),
         ("magnitude", 0.5, "c4"): (3.2, 0.24), ("magnitude", 0.5, "alpaca"): (3.3, 0.26),
         ("sparsegpt", 0.5, "alpaca"): (3.4, 0.28), ("wanda", 0.5, "alpaca"): (3.5, 0.30),
         ("sparsegpt", 0.6, "c4"): (4.0, 0.36), ("wanda", 0.6, "c4"): (5.0, 0.40)}


def verdicts(found) -> dict[int, str]:
    return {f.claim: f.verdict for f in found.claims}


def test_claims_that_clearly_hold(tmp_path):
    runs = {cell(m, s, c): units(r, d, jsd=d, seed=i) for i, ((m, s, c), (r, d)) in enumerate(HOLDS.items())}
    found = build(handmade_store(tmp_path, runs))
    assert verdicts(found) == {1: HELD, 2: HELD, 3: HELD}, [f.to_dict() for f in found.claims]
    one = found.claims[0]
    assert [p.verdict for p in one.parts] == [HELD, HELD, NOT_HELD]  # magnitude's parenthesis fails, uncounted
    assert not one.parts[-1].counted and "clearly below" in one.parts[-1].why
    wanda = one.parts[0].numbers
    assert wanda[0].value == pytest.approx(1.20, rel=0.02) and wanda[0].interval[1] < 1.5
    assert wanda[1].value == pytest.approx(-0.20, abs=0.01) and wanda[1].interval[1] < 0
    two = found.claims[1]
    assert two.ranking.best == "jsd" and two.ranking.difference("jsd", "ppl_ratio")[1] > 0
    assert len(two.runs) == 10 and not two.missing
    three = found.claims[2].parts[0].numbers[-1]
    assert three.value == pytest.approx(0.10, abs=0.01) and three.interval[0] > 0
    assert found.missing == []  # the ladder's magnitude 30% is not needed: claim 2 has its 6 runs


def test_claims_that_clearly_fail(tmp_path):
    runs = {cell(m, s, c): units(r, d, jsd=0.5 - d, seed=i) for i, ((m, s, c), (r, d)) in enumerate(FAILS.items())}
    found = build(handmade_store(tmp_path, runs))
    assert verdicts(found) == {1: NOT_HELD, 2: NOT_HELD, 3: NOT_HELD}, [f.to_dict() for f in found.claims]
    assert "beyond 1.5x" in found.claims[0].parts[0].why
    assert found.claims[1].ranking.best == "ppl_ratio"
    assert all(p.numbers[-1].interval[1] < 0 for p in found.claims[2].parts)
    # a looser "close" threshold moves claim 1 from failing to holding, nothing else
    assert verdicts(build(Store(tmp_path), close=6.0)) == {1: HELD, 2: NOT_HELD, 3: NOT_HELD}


def test_claims_within_noise_are_inconclusive(tmp_path):
    noisy = {cell(m, s, c): units(1.5, 0.0, jsd=0.2, noise=0.4, seed=i)
             for i, (m, s, c) in enumerate(HOLDS)}
    found = build(handmade_store(tmp_path, noisy))
    assert verdicts(found) == {1: INCONCLUSIVE, 2: INCONCLUSIVE, 3: INCONCLUSIVE}, [f.to_dict() for f in found.claims]
    ratio, change = found.claims[0].parts[0].numbers
    assert ratio.interval[0] < 1.5 < ratio.interval[1] and "holds 1.5" in found.claims[0].parts[0].why
    low, high = found.claims[1].ranking.difference("jsd", "ppl_ratio")[1:]
    assert low < 0 < high
    assert all("holds 0" in p.why for p in found.claims[2].parts)
    assert all(f.needs for f in found.claims)  # each says what would narrow it


def test_an_empty_store_misses_the_whole_quick_study(tmp_path):
    found = build(Store(tmp_path))
    assert verdicts(found) == {1: INCONCLUSIVE, 2: INCONCLUSIVE, 3: INCONCLUSIVE}
    assert found.missing == list(cells("quick")) and found.cohort is None
    specs = found.missing_specs()
    assert {(s.nsamples, s.seqlen, s.evaluation.limit, s.evaluation.jsd_limit) for s in specs} == {(32, 256, 64, 32)}


def test_a_second_run_of_a_cell_and_a_run_without_units_are_left_out_by_name(tmp_path):
    store = Store(tmp_path)
    old = add_run(store, cell("wanda"), units(1.2, 0.2, 0.2, seed=1), finished_at=1.0)
    new = add_run(store, cell("wanda"), units(1.2, 0.2, 0.2, seed=2), finished_at=2.0)
    with store.write() as db:  # a run measured before per-unit values were kept
        summary = db.execute("SELECT summary FROM metrics WHERE run_id = ?", (old,)).fetchone()[0]
    bare = add_run(store, cell("sparsegpt"), units(1.2, 0.2, 0.2, seed=3))
    stripped = {k: v for k, v in json.loads(summary).items() if k not in ("units", "intervals")}
    with store.write() as db:
        db.execute("UPDATE metrics SET summary = ? WHERE run_id = ?", (json.dumps(stripped), bare))
    found = build(store)
    left = dict(found.cohort.left_out)
    assert set(left) == {old, bare} or set(left) == {new, bare}
    assert "second run" in left[old if old in left else new] and "per-example values" in left[bare]
    assert cell("sparsegpt") in found.missing


@needs_shared
def test_queue_submits_exactly_the_missing_runs_with_the_cohort_s_settings(tmp_path, tiny_folder):
    evaluation = EvalSettings(ppl_seqlen=64, ppl_windows=WINDOWS, limit=8, jsd_limit=SAMPLES, max_new_tokens=4)
    have = [cell("wanda"), cell("wanda", calibration="alpaca"), cell("sparsegpt"), cell("magnitude")]
    store = handmade_store(tmp_path, {c: units(1.2, 0.1, 0.1, seed=i) for i, c in enumerate(have)},
                           model=str(tiny_folder), evaluation=evaluation, nsamples=4, seqlen=64)
    found = build(store)
    wanted = [c for c in cells("quick") if c not in have]
    assert found.missing == wanted
    queued = queue(store, found, str(SHARED_DATA), start_worker=False)
    assert len(queued) == len(wanted) and not any(q["cached"] for q in queued)
    specs = [store.spec(q["run_id"]) for q in queued]
    assert [Cell(s.method, s.sparsity, s.pattern, s.calibration) for s in specs] == wanted
    assert {(s.model, s.nsamples, s.seqlen, s.evaluation) for s in specs} == {(str(tiny_folder), 4, 64, evaluation)}
    assert all(store.latest_job(q["run_id"])["state"] == "queued" for q in queued)
    again = build(store)
    assert again.missing == wanted  # queued is not finished: still missing, and queueing again adds no job
    assert {q["job_id"] for q in queue(store, again, str(SHARED_DATA), start_worker=False)} == {
        q["job_id"] for q in queued}
