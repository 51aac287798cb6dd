"""Which metric predicts the task loss: point correlations equal scipy's spearmanr/kendalltau on each run's metrics
recomputed in float64 from its units, and the intervals equal scipy.stats.bootstrap run directly (one resample at a
time, scipy's own spearmanr) over the same unit sets and seed."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from backend.findings.evidence import Evidence
from backend.findings.predictors import MIN_RUNS, ranking
from backend.reports import charts
from metrics.intervals import Bootstrap
from tests.backend.findings.handmade import units

SETTINGS = Bootstrap(resamples=300)
# perplexity ratio, F1 drop, JS level of six runs, close enough that resamples reorder them: JS follows the drop
# more closely than the ratio does
MADE = [(1.10, 0.05, 0.060), (1.30, 0.08, 0.075), (1.20, 0.10, 0.085), (1.50, 0.12, 0.100), (1.40, 0.15, 0.110),
        (1.60, 0.18, 0.130)]
NOISE = 0.2


def evidence() -> list[Evidence]:
    return [Evidence({"run_id": f"run{i}"}, units(r, d, j, noise=NOISE, seed=i)) for i, (r, d, j) in enumerate(MADE)]


def test_point_correlations_equal_scipy_on_each_run_s_recomputed_metrics():
    runs = evidence()
    table = ranking(runs, "f1", settings=SETTINGS).table.set_index("metric")
    ratio = [math.exp(np.mean(e.units["ppl"]["pruned"]) - np.mean(e.units["ppl"]["dense"])) for e in runs]
    drop = [np.mean(e.units["tasks"]["dense"]["f1"]) - np.mean(e.units["tasks"]["pruned"]["f1"]) for e in runs]
    jsd = [np.mean(e.units["divergence"]["jsd"]) for e in runs]
    for metric, values in (("ppl_ratio", ratio), ("jsd", jsd)):
        assert table.loc[metric, "spearman"] == pytest.approx(stats.spearmanr(values, drop).statistic, abs=1e-12)
        assert table.loc[metric, "kendall"] == pytest.approx(stats.kendalltau(values, drop).statistic, abs=1e-12)
        assert table.loc[metric, "spearman_p"] == pytest.approx(stats.spearmanr(values, drop).pvalue, abs=1e-12)
    assert list(table["n"]) == [6] * 5


def test_intervals_equal_scipy_s_bootstrap_over_the_same_units_and_seed():
    runs = evidence()
    found = ranking(runs, "f1", compare=[("jsd", "ppl_ratio")], settings=SETTINGS)
    table = found.table.set_index("metric")
    dense_f1 = np.array([e.units["tasks"]["dense"]["f1"] for e in runs])
    pruned_f1 = np.array([e.units["tasks"]["pruned"]["f1"] for e in runs])
    dense_nll = np.array([e.units["ppl"]["dense"] for e in runs])
    pruned_nll = np.array([e.units["ppl"]["pruned"] for e in runs])
    jsd = np.array([e.units["divergence"]["jsd"] for e in runs])

    def oracle(examples, windows, samples):
        drop = dense_f1[:, examples].mean(axis=1) - pruned_f1[:, examples].mean(axis=1)
        ratio = np.exp(pruned_nll[:, windows].mean(axis=1) - dense_nll[:, windows].mean(axis=1))
        by_js = stats.spearmanr(jsd[:, samples].mean(axis=1), drop).statistic
        by_ratio = stats.spearmanr(ratio, drop).statistic
        return np.round([by_js, by_ratio, by_js - by_ratio], 12)  # exact ties between resamples of a rank statistic

    sets = tuple(np.arange(n) for n in (dense_f1.shape[1], dense_nll.shape[1], jsd.shape[1]))
    expected = stats.bootstrap(sets, oracle, vectorized=False, n_resamples=SETTINGS.resamples, method=SETTINGS.method,
                               confidence_level=SETTINGS.confidence,
                               rng=np.random.default_rng(SETTINGS.seed)).confidence_interval
    ours = [(table.loc["jsd", "spearman_low"], table.loc["jsd", "spearman_high"]),
            (table.loc["ppl_ratio", "spearman_low"], table.loc["ppl_ratio", "spearman_high"]),
            found.difference("jsd", "ppl_ratio")[1:]]
    for i, (low, high) in enumerate(ours):
        assert (low, high) == pytest.approx((expected.low[i], expected.high[i]), abs=1e-9)
    assert found.best == "jsd" and "distinguishable" in found.sentence()


def test_too_few_runs_or_a_constant_drop_give_notes_not_numbers():
    few = ranking(evidence()[:MIN_RUNS - 1], "f1", settings=SETTINGS)
    assert few.best is None and few.table["spearman"].isna().all() and "at least 3 runs" in few.note
    assert charts.predictors_chart(few.table).data == ()  # a message, no bars
    flat = [Evidence({"run_id": f"r{i}"}, units(1.1 + i / 10, 0.0, 0.1 + i / 10, noise=0.0, seed=i)) for i in range(4)]
    table = ranking(flat, "f1", settings=SETTINGS).table.set_index("metric")
    assert table["spearman"].isna().all() and "constant f1 drop" in table.loc["jsd", "note"]


def test_the_chart_draws_each_correlation_with_its_interval():
    found = ranking(evidence(), "f1", settings=SETTINGS)
    chart = charts.predictors_chart(found.table, task="f1")
    assert [t.name for t in chart.data] == ["Spearman ρ", "Kendall τ"]
    bars = chart.data[0]
    assert list(bars.x) == ["perplexity ratio", "JS divergence", "KL(dense‖pruned)", "KL(pruned‖dense)",
                            "top-1 flip rate"]
    table = found.table
    for i in range(5):
        assert bars.y[i] + bars.error_y.array[i] == pytest.approx(table["spearman_high"][i])
        assert bars.y[i] - bars.error_y.arrayminus[i] == pytest.approx(table["spearman_low"][i])
    low, high = chart.layout.yaxis.range
    assert all(t.cliponaxis is False and t.textposition == "outside" for t in chart.data) and low < -1.2 and high > 1.2
