"""Every metric of a stored evaluation carries an interval equal to scipy.stats.bootstrap on the run's own units
(its per-window NLLs, its divergence and task records as the examples table keeps them) with the same seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from backend.runs.store import Store
from backend.runs.uncertainty import SETTINGS, intervals_of, units_of


def scipy_interval(*samples, statistic=np.mean, paired=False) -> list[float] | None:
    """scipy's own bootstrap with the store's settings; zero width where every unit (or paired difference) is equal."""
    values = [np.asarray(s, dtype=float) for s in samples]
    if all(np.ptp(v) == 0 for v in values) or (paired and np.ptp(values[1] - values[0]) == 0 and statistic is np.mean):
        point = statistic(values[-1]) - (statistic(values[0]) if paired else 0)
        return [point, point]
    if paired:
        def compared(a, b, axis=-1):
            return statistic(b, axis=axis) - statistic(a, axis=axis)
    else:
        compared = statistic
    found = stats.bootstrap(tuple(values), compared, paired=paired, n_resamples=SETTINGS.resamples,
                            confidence_level=SETTINGS.confidence, method=SETTINGS.method,
                            rng=np.random.default_rng(SETTINGS.seed)).confidence_interval
    return [found.low, found.high]


def exp_mean(x, axis=-1):
    return np.exp(np.mean(x, axis=axis))


def test_a_stored_run_s_intervals_are_scipy_s_bootstrap_on_its_own_records(filled_store):
    db = Store(filled_store)
    checked = 0
    for row in db.runs():
        summary = db.metrics(row["run_id"])["summary"]
        units, intervals = summary["units"], summary["intervals"]
        assert (summary["confidence"], summary["resamples"], summary["seed"]) == (0.95, 2000, 0)
        # perplexity: each window's mean NLL; their exp-mean is the perplexity the run reports
        for side in ("dense", "pruned"):
            windows = units["ppl"][side]
            assert math.exp(np.mean(windows)) == pytest.approx(summary[side]["ppl"], rel=1e-9)
            assert intervals[f"{side}.ppl"] == pytest.approx(scipy_interval(windows, statistic=exp_mean), rel=1e-9)
        assert intervals["delta.ppl"] == pytest.approx(
            scipy_interval(units["ppl"]["dense"], units["ppl"]["pruned"], statistic=exp_mean, paired=True), rel=1e-9)
        # divergence: the per-sample means the examples table holds
        samples = db.examples(row["run_id"], "divergence")
        for key in ("jsd", "kl_dense_pruned", "flip_rate"):
            values = [s[key] for s in samples if not s["skipped"]]
            assert units["divergence"][key] == [None if s["skipped"] else s[key] for s in samples]
            assert np.mean(values) == pytest.approx(summary[key], rel=1e-12)
            assert intervals[key] == pytest.approx(scipy_interval(values), rel=1e-9, abs=1e-15)
        # task scores: each example's score as the examples table holds it, and pruned - dense paired over them
        tasks = db.examples(row["run_id"], "task")
        for score in ("em", "f1", "rouge1"):
            dense, pruned = ([e[side][score] for e in tasks] for side in ("dense", "pruned"))
            assert units["tasks"]["dense"][score] == dense and units["tasks"]["pruned"][score] == pruned
            assert intervals[f"pruned.{score}"] == pytest.approx(scipy_interval(pruned), abs=1e-12)
            assert intervals[f"delta.{score}"] == pytest.approx(scipy_interval(dense, pruned, paired=True), abs=1e-12)
        checked += 1
    assert checked == 4


def test_equal_units_give_zero_width_and_unscored_units_are_left_out():
    samples = [{"jsd": 0.1, "kl_dense_pruned": 0.2, "kl_pruned_dense": 0.3, "flip_rate": 0.5, "skipped": False}] * 5
    samples.append({"jsd": None, "kl_dense_pruned": None, "kl_pruned_dense": None, "flip_rate": None, "skipped": True})
    examples = [{"dense": {"em": 1.0, "f1": 1.0, "rouge1": 1.0}, "pruned": {"em": 1.0, "f1": 0.5, "rouge1": 0.5},
                 "answer_jsd": 0.2}] * 4
    judged = {"dense": [{"mean": 7.0, "error": None}] * 3 + [{"mean": None, "error": "timeout"}],
              "pruned": [{"mean": 6.0, "error": None}] * 4}
    units = units_of([2.0, 2.0], [2.5, 2.5], samples, examples, judged)
    assert units["divergence"]["jsd"][-1] is None and units["tasks"]["dense"]["judge"][-1] is None
    found = intervals_of(units)
    assert found["jsd"] == [0.1, 0.1] and found["flip_rate"] == [0.5, 0.5]
    assert found["delta.f1"] == [-0.5, -0.5] and found["pruned.f1"] == [0.5, 0.5]
    assert found["dense.judge"] == [7.0, 7.0] and found["delta.judge"] == [-1.0, -1.0]  # 3 examples judged on both
    assert found["ratio.ppl"] == pytest.approx([math.exp(0.5)] * 2) and found["delta.ppl"] == pytest.approx(
        [math.exp(2.5) - math.exp(2.0)] * 2)
    assert intervals_of(units_of([2.0], [2.1], None, None))["dense.ppl"] is None  # one window: no interval
