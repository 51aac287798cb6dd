"""Comparison charts and the HTML report over plain run rows (real plotly / pandas / scipy, no mocks)."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from plotly.offline import get_plotlyjs

from backend.reports import charts
from backend.reports.html import write_report
from backend.runs.protocol import metric_note, part_label, protocol_key

DENSE = {"dense_ppl": 29.2, "dense_em": 0.115, "dense_f1": 0.151, "dense_rouge1": 0.146}
# (method, sparsity) -> pruned ppl, jsd, flip rate, pruned f1
MEASURED = {
    ("magnitude", 0.3): (33.1, 0.061, 0.18, 0.140), ("magnitude", 0.5): (142.0, 0.301, 0.55, 0.071),
    ("wanda", 0.3): (31.0, 0.048, 0.15, 0.145), ("wanda", 0.5): (67.3, 0.179, 0.41, 0.096),
    ("sparsegpt", 0.3): (30.6, 0.041, 0.13, 0.147), ("sparsegpt", 0.5): (55.9, 0.152, 0.37, 0.104),
}


def run(run_id: str, method: str, sparsity: float, calibration: str = "c4", state: str = "done", **metrics) -> dict:
    ppl, jsd, flips, f1 = MEASURED.get((method, sparsity), (40.0, 0.1, 0.3, 0.12))
    row = {"run_id": run_id, "model": "smollm2-135m", "method": method, "sparsity": sparsity, "pattern": "unstructured",
           "calibration": calibration, "nsamples": 32, "seqlen": 256, "seed": 0, "state": state,
           "overall_sparsity": sparsity, **DENSE, "pruned_ppl": ppl * (1.05 if calibration == "alpaca" else 1.0),
           "jsd": jsd, "kl_dense_pruned": jsd * 5.1, "kl_pruned_dense": jsd * 7.4, "flip_rate": flips,
           "pruned_em": f1 * 0.75, "pruned_f1": f1, "pruned_rouge1": f1 * 0.96, "dense_judge": None,
           "pruned_judge": None}
    row.update(metrics)
    return row


@pytest.fixture
def rows() -> list[dict]:
    out = [run(f"{m[:3]}{c[:2]}{int(s * 100):02d}", m, s, c)
           for m in ("magnitude", "wanda", "sparsegpt") for c in ("c4", "alpaca") for s in (0.3, 0.5)
           if not (m == "magnitude" and c == "alpaca")]  # magnitude needs no calibration
    out.append(run("running0001", "wanda", 0.7, state="running", pruned_ppl=None, jsd=None))
    out.append(run("failed00001", "sparsegpt", 0.7, state="failed"))
    return out


def test_frame_adds_ratio_and_change_columns(rows):
    df = charts.frame(rows).set_index("run_id")
    wanda = df.loc["wanc450"]
    assert wanda["ppl_ratio"] == pytest.approx(67.3 / 29.2)
    assert wanda["f1_change"] == pytest.approx(0.096 - 0.151)
    assert wanda["f1_relative"] == pytest.approx(0.096 / 0.151)
    assert wanda["em_change"] == pytest.approx(0.096 * 0.75 - 0.115)
    assert wanda["rouge1_relative"] == pytest.approx(0.096 * 0.96 / 0.146)
    assert math.isnan(wanda["judge_change"]) and math.isnan(wanda["judge_relative"])  # None on both sides
    assert math.isnan(df.loc["running0001", "ppl_ratio"])  # pruned ppl not measured yet
    assert len(df) == len(rows)  # unfinished runs stay in the frame

    zero = charts.frame([run("zero", "wanda", 0.5, dense_f1=0.0, pruned_f1=0.0, dense_ppl=0.0)]).iloc[0]
    assert math.isnan(zero["f1_relative"]) and math.isnan(zero["ppl_ratio"])  # dense 0 -> NaN, not inf
    assert zero["f1_change"] == 0.0
    assert charts.frame([]).empty and "ppl_ratio" in charts.frame([]).columns


def test_tradeoff_scatter_groups_by_method_and_carries_run_ids(rows):
    fig = charts.tradeoff_scatter(rows, task="f1")
    assert {t.legendgroup for t in fig.data} == {"magnitude", "wanda", "sparsegpt"}
    ids = [c[0] for t in fig.data for c in t.customdata]
    finished = [r["run_id"] for r in rows if r["state"] == "done"]
    assert sorted(ids) == sorted(finished)  # only done runs, each once
    assert fig.layout.xaxis.type == "log"
    trace = next(t for t in fig.data if t.name == "wanda · c4")
    point = [c[0] for c in trace.customdata].index("wanc450")
    assert trace.x[point] == pytest.approx(67.3 / 29.2) and trace.y[point] == pytest.approx(0.179)
    assert trace.text[point] == f"{0.096 / 0.151:.0%}"  # the task score kept, on the marker
    assert "wanc450" in trace.hovertext[point] and "67.30" in trace.hovertext[point]
    symbols = {t.name.split(" · ")[1]: t.marker.symbol for t in fig.data}
    assert symbols["c4"] != symbols["alpaca"]
    assert charts.tradeoff_scatter([r for r in rows if r["state"] != "done"]).data == ()  # nothing finished: empty


def test_metric_vs_sparsity_lines_and_unknown_metric(rows):
    fig = charts.metric_vs_sparsity(rows, "jsd")
    assert {t.name for t in fig.data} == {"magnitude · c4", "wanda · c4", "wanda · alpaca", "sparsegpt · c4",
                                          "sparsegpt · alpaca"}
    wanda = next(t for t in fig.data if t.name == "wanda · c4")
    assert list(wanda.x) == [0.3, 0.5] and list(wanda.y) == pytest.approx([0.048, 0.179])  # 0.7 is still running
    dashes = {t.name: t.line.dash for t in fig.data}
    assert dashes["wanda · c4"] != dashes["wanda · alpaca"]
    assert len(charts.metric_vs_sparsity(rows, "f1_change").data) == 5
    with pytest.raises(ValueError, match="'perplexity'.*ppl_ratio.*jsd"):
        charts.metric_vs_sparsity(rows, "perplexity")


def test_intervals_become_error_bars_and_interval_columns(rows):
    bounded = {"wanc450": {"ratio.ppl": [2.0, 2.6], "jsd": [0.15, 0.2], "delta.f1": [-0.09, -0.02]}}
    made = [{**r, "intervals": bounded.get(r["run_id"], {})} for r in rows]
    df = charts.frame(made).set_index("run_id")
    assert df.loc["wanc450", "ppl_ratio_ci"] == [2.0, 2.6] and df.loc["wanc450", "f1_change_ci"] == [-0.09, -0.02]
    assert df.loc["wanc430", "jsd_ci"] is None and charts.interval_text(None) == charts.MISSING
    assert charts.interval_text([0.15, 0.2]) == "[0.15, 0.2]"
    trace = next(t for t in charts.tradeoff_scatter(made, "f1").data if t.name == "wanda · c4")
    point = [c[0] for c in trace.customdata].index("wanc450")
    x, y = trace.x[point], trace.y[point]
    assert (x - trace.error_x.arrayminus[point], x + trace.error_x.array[point]) == pytest.approx((2.0, 2.6))
    assert (y - trace.error_y.arrayminus[point], y + trace.error_y.array[point]) == pytest.approx((0.15, 0.2))
    other = [c[0] for c in trace.customdata].index("wanc430")
    assert trace.error_y.array[other] is None  # no interval, no bar
    assert "[-0.09, -0.02]" in trace.hovertext[point]
    curve = next(t for t in charts.metric_vs_sparsity(made, "jsd").data if t.name == "wanda · c4")
    assert list(curve.error_y.array) == [None, pytest.approx(0.2 - 0.179)]
    # a point that averages several runs has no interval of its own
    twice = made + [{**made[[r["run_id"] for r in made].index("wanc450")], "run_id": "again"}]
    curve = next(t for t in charts.metric_vs_sparsity(twice, "jsd").data if t.name == "wanda · c4")
    assert curve.error_y.array is None or list(curve.error_y.array)[1] is None
    assert charts.tradeoff_scatter(rows, "f1").data[0].error_x is None or all(
        v is None for v in (charts.tradeoff_scatter(rows, "f1").data[0].error_x.array or []))


PROTOCOL = {"ppl": {"source": "wikitext2", "data": "sha256:1", "seqlen": 2048, "windows": 40, "windows_requested": 40},
            "divergence": {"source": "alpaca", "data": "sha256:2", "records": 100, "template": "chat",
                           "positions": "response", "unit": "bits", "scored_tokens": 9000},
            "tasks": {"source": "unnatural", "data": "sha256:3", "examples": 100, "template": "chat",
                      "max_new_tokens": 32, "decoding": "greedy", "judge": None}}


def measured(rows: list[dict], protocol: dict = PROTOCOL) -> list[dict]:
    """The rows as the store gives them, each with its protocol and key."""
    return [{**r, "protocol": protocol, "protocol_key": protocol_key(protocol)} for r in rows]


def test_the_scatter_says_units_and_protocol_and_keeps_js_at_zero_or_above(rows):
    fig = charts.tradeoff_scatter(measured(rows), task="f1")
    assert fig.layout.yaxis.title.text == "Jensen-Shannon divergence (bits)" and fig.layout.yaxis.rangemode == "tozero"
    assert "log" in fig.layout.xaxis.title.text
    template = fig.data[0].hovertemplate
    for part in ("ppl", "divergence", "tasks"):
        assert part_label(part, PROTOCOL[part]).replace("<", "&lt;") in template
    assert "pruned / dense perplexity" in template and "bits" in template
    nats = {**PROTOCOL, "divergence": {**PROTOCOL["divergence"], "unit": "nats"}}
    assert charts.tradeoff_scatter(rows, "f1", nats).layout.yaxis.title.text == "Jensen-Shannon divergence (nats)"
    # rows of several protocols share no unit: the chart claims none
    mixed = measured(rows[:3]) + measured(rows[3:], nats)
    assert charts.rows_protocol(mixed) == {} and charts.tradeoff_scatter(mixed).layout.yaxis.title.text == (
        "Jensen-Shannon divergence")

    one = charts.tradeoff_scatter(measured(rows[:1]))
    assert one.layout.yaxis.rangemode == "tozero" and len(one.data) == 1


def ticks_read(axis, values) -> None:
    """A log axis whose tick labels are distinct, few, inside its range around every value, and spaced apart."""
    low, high = axis.range
    positions = [math.log10(t) for t in axis.tickvals]
    assert axis.type == "log" and 2 <= len(positions) <= 6
    assert len(set(axis.ticktext)) == len(axis.ticktext) and len(axis.ticktext) == len(positions)
    assert all(low <= p <= high for p in positions) and all(low < math.log10(v) < high for v in values)
    assert min(b - a for a, b in zip(positions, positions[1:])) >= 0.05 * (high - low)


@pytest.mark.parametrize("ratios", [[1.0017], [1.0008, 1.003], [0.97, 1.2], [1.05, 4.9], [1.0, 9.0], [1.0, 50.0],
                                    [1.0, 2e4], [3.0]])
def test_log_ratio_ticks_never_overlap(ratios):
    made = [run(f"r{i}", "wanda", round(0.3 + 0.1 * i, 1), pruned_ppl=29.2 * r) for i, r in enumerate(ratios)]
    ticks_read(charts.tradeoff_scatter(made).layout.xaxis, ratios)
    ticks_read(charts.metric_vs_sparsity(made, "ppl_ratio").layout.yaxis, ratios)


def test_curves_keep_sparsity_in_its_range_and_say_units(rows):
    fig = charts.metric_vs_sparsity(measured(rows), "kl_dense_pruned")
    assert tuple(fig.layout.xaxis.range) == (0, 1)
    assert fig.layout.yaxis.title.text == "KL(dense‖pruned) (bits)"
    note = metric_note("kl_dense_pruned", PROTOCOL)
    assert all(note.split("; ")[1] in t.hovertemplate and "bits" in t.hovertemplate for t in fig.data)
    one = charts.metric_vs_sparsity(measured(rows[:1]), "jsd")
    assert tuple(one.layout.xaxis.range) == (0, 1) and all(t.cliponaxis is False for t in one.data)
    # measured sparsity is the pruning's own count, not an evaluation: no protocol to name
    assert "protocol" not in charts.metric_vs_sparsity(measured(rows), "overall_sparsity").data[0].hovertemplate
    assert "protocol unknown" in charts.metric_vs_sparsity(rows, "jsd").data[0].hovertemplate


MODULES = ["self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"]


def layer_rows(scale: float, layers: int = 3, modules=MODULES) -> list[dict]:
    return [{"layer": layer, "module": m, "sparsity": 0.5, "rel_error": scale * (layer + 1) * (j + 1) / 100}
            for layer in range(layers) for j, m in enumerate(modules)]


def test_layer_heatmap_cells():
    fig = charts.layer_heatmap(list(reversed(layer_rows(1.0))), value="rel_error", title="run a")
    heat = fig.data[0]
    z = np.array(heat.z)
    assert z.shape == (3, 3)  # layers x modules
    assert list(heat.y) == [0, 1, 2] and list(heat.x) == list(reversed(MODULES))  # first-seen module order
    assert z[list(heat.y).index(2), list(heat.x).index("self_attn.k_proj")] == pytest.approx(3 * 2 / 100)
    assert fig.layout.title.text == "run a"
    assert heat.colorbar.title.text == "relative reconstruction error" and fig.layout.height == 400
    assert np.array(charts.layer_heatmap(layer_rows(1.0), value="sparsity").data[0].z).tolist() == [[0.5] * 3] * 3
    with pytest.raises(ValueError, match="'error'.*rel_error"):
        charts.layer_heatmap(layer_rows(1.0), value="error")


def test_layer_difference_is_a_minus_b_on_common_cells():
    a = layer_rows(2.0, layers=3)
    b = layer_rows(1.0, layers=2, modules=MODULES[:2] + ["mlp.up_proj"])
    heat = charts.layer_difference(a, b, "rel_error").data[0]
    assert list(heat.y) == [0, 1] and list(heat.x) == MODULES[:2]
    z = np.array(heat.z)
    for i, layer in enumerate(heat.y):
        for j, module in enumerate(heat.x):
            expected = (2.0 - 1.0) * (layer + 1) * (MODULES.index(module) + 1) / 100
            assert z[i, j] == pytest.approx(expected)
    assert heat.zmid == 0 and heat.colorbar.title.text == "relative reconstruction error, a - b"


def test_a_deep_model_gets_a_heatmap_tall_enough_for_every_layer_label():
    fig = charts.layer_heatmap(layer_rows(1.0, layers=30), value="sparsity")
    assert fig.layout.height >= 30 * charts.PX_PER_LAYER and fig.layout.yaxis.dtick == 1
    assert fig.data[0].colorbar.title.text == "sparsity"
    assert charts.layer_difference(layer_rows(1.0, 30), layer_rows(2.0, 30)).layout.height == fig.layout.height


def test_write_report_is_self_contained(rows, tmp_path):
    layers = {"wanc450": layer_rows(1.0), "spac450": layer_rows(0.5)}
    path = write_report(rows, tmp_path / "out" / "report.html", layers_by_run=layers, title="Smol <report>")
    page = path.read_text(encoding="utf-8")
    assert path.name == "report.html" and page.lstrip().startswith("<!DOCTYPE html>") and "<html" in page
    assert "Smol &lt;report&gt;" in page  # escaped
    for r in rows:
        assert r["run_id"] in page
    bundle = get_plotlyjs()
    assert page.count(bundle) == 1  # plotly.js inline, once, not per figure
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)  # no external script
    # Outside plotly.js (whose source holds URL strings for map tiles and docs) the page names no URL at all.
    rest = page.replace(bundle, "")
    assert not re.search(r"https?://|//cdn\.", rest)
    assert rest.count("Plotly.newPlot") == 7  # scatter, 3 x vs sparsity, predictors (a message here: no per-unit
    # values), 2 layer heatmaps
    assert "wanc450: rel_error per layer" in page
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temp file left


def test_write_report_without_finished_runs(tmp_path):
    page = write_report([], tmp_path / "empty.html").read_text()
    assert "<html" in page and "No finished runs yet" in page
    pending = [run("queued00001", "wanda", 0.5, state="running", pruned_ppl=None)]
    page = write_report(pending, tmp_path / "pending.html").read_text()
    assert "No finished runs yet" in page and "queued00001" in page
