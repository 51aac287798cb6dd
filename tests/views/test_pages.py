"""The Compare, Layers and Generations pages over a real store (AppTest, no mocks), and their pure helpers; Home's
store size and its run deletion."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
from pathlib import Path

import plotly.graph_objects as go
import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

from backend.reports.charts import PX_PER_LAYER
from backend.runs.cleanup import human_bytes, store_size
from backend.runs.protocol import metric_note
from backend.runs.store import Store
from backend.runs.worker import stop_worker
from tests.conftest import ROOT, TINY, TINY_EVAL, backend_cli, copy_store
from views.common import (
    LN2,
    by_divergence,
    filter_flips,
    filter_rows,
    jsd_legend,
    selected_run,
    token_html,
    visible_tokens,
)

PAGES = ("views/compare.py", "views/layers.py", "views/generations.py")


@pytest.fixture(autouse=True)
def clear_caches():
    """AppTest instances share one session id: start each test with empty caches."""
    st.cache_data.clear()
    st.cache_resource.clear()


def open_page(monkeypatch, store, page: str, **params: str | list[str]) -> AppTest:
    monkeypatch.setenv("PRUNESCOPE_STORE", str(store))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.switch_page(page)
    at.query_params.update(params)
    return at.run()


def figures(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def title_of(fig: dict) -> str:
    title = fig["layout"].get("title", {})
    return title.get("text", "") if isinstance(title, dict) else str(title)


def shape(z) -> tuple[int, int]:
    """A heatmap's z as (rows, cols), whether plain lists or Plotly's typed-array encoding."""
    if isinstance(z, dict):
        rows, cols = (int(n) for n in str(z["shape"]).split(","))
        return rows, cols
    return len(z), len(z[0])


@pytest.fixture(scope="module")
def runs(filled_store) -> list[dict]:
    db = Store(filled_store)
    try:
        return [r for r in db.runs() if r["state"] == "done"]
    finally:
        db.close()


def table(at: AppTest, column: str):
    """The page's dataframe element that has `column`."""
    return next(df for df in at.dataframe if column in df.value.columns)


def test_compare_page(monkeypatch, filled_store, runs):
    at = open_page(monkeypatch, filled_store, "views/compare.py")
    assert not at.exception, at.exception
    assert at.title[0].value == "📈 Compare"
    figs = figures(at)
    assert len(figs) == 2  # the tiny runs' task scores are all 0: nothing to correlate, so no empty bar chart
    scatter = next(f for f in figs if title_of(f).startswith("Perplexity vs divergence"))
    ids = {point[0] for trace in scatter["data"] for point in trace["customdata"]}
    assert ids == {r["run_id"] for r in runs}
    assert any("vs sparsity" in title_of(f) for f in figs)
    assert not any(s.label.startswith("Protocol") for s in at.selectbox) and not at.warning  # one protocol only
    assert any(f"protocol `{runs[0]['protocol_key']}`" in m.value for m in at.markdown)

    # human column names; each metric's unit and protocol on hover; no "None" for missing values
    relative = table(at, "ppl_ratio")
    assert {"jsd", "flip_rate", "f1_relative"} <= set(relative.value.columns) and len(relative.value) == 4
    config = json.loads(relative.proto.columns)
    assert config["dense_ppl"]["label"] == "dense perplexity" and config["kl_dense_pruned"]["label"] == (
        "KL(dense‖pruned)")
    assert config["jsd"]["help"] == metric_note("jsd", runs[0]["protocol"]) and "nats" in config["jsd"]["help"]
    assert "windows" in config["ppl_ratio"]["help"] and relative.proto.placeholder == "–"
    # what every run shares is said once, not repeated in a column, so the table fits the page
    assert list(relative.proto.column_order) == ["run_id", "method", "calibration", "pruned_ppl", "ppl_ratio",
                                                 "ppl_ratio_ci", "jsd", "jsd_ci", "kl_dense_pruned", "flip_rate",
                                                 "pruned_f1", "f1_relative", "f1_change", "f1_change_ci"]
    # each run's own 95% intervals, as text beside their numbers, with how they were drawn on hover
    by_run = {r["run_id"][:8]: r for r in runs}
    for _, shown in relative.value.iterrows():
        low, high = by_run[shown["run_id"]]["intervals"]["jsd"]
        assert shown["jsd_ci"] == f"[{low:.3g}, {high:.3g}]" and low <= by_run[shown["run_id"]]["jsd"] <= high
    assert "bootstrap" in config["jsd_ci"]["help"] and config["jsd_ci"]["label"] == "JS divergence 95% interval"
    dense_ppl = f"{runs[0]['dense_ppl']:.2f}"
    assert any(c.value.startswith("Same for every run shown: model ") and f"dense perplexity {dense_ppl}" in c.value
               and "target sparsity 0.50" in c.value for c in at.caption)
    paired = table(at, "B - A")  # two runs of the protocol, paired over their units
    assert {"ppl", "jsd", "f1"} <= set(paired.value["metric"]) and set(paired.value["units"].str.split().str[1]) == {
        "windows", "samples", "examples"}
    predictors = table(at, "spearman")
    assert set(predictors.value["metric"]) >= {"perplexity ratio", "JS divergence", "top-1 flip rate"}
    assert predictors.proto.placeholder == "–" and json.loads(predictors.proto.columns)["spearman"]["label"] == (
        "Spearman ρ")
    assert any("No metric can be correlated" in i.value and "constant f1 drop" in i.value for i in at.info)

    # a filter in the URL narrows every view, and stays in the URL
    at = open_page(monkeypatch, filled_store, "views/compare.py", method="wanda", task="rouge1")
    assert not at.exception, at.exception
    scatter = next(f for f in figures(at) if title_of(f).startswith("Perplexity vs divergence"))
    ids = {point[0] for trace in scatter["data"] for point in trace["customdata"]}
    assert ids == {r["run_id"] for r in runs if r["method"] == "wanda"} and len(ids) == 2
    assert at.query_params.get("method") == "wanda"
    assert "rouge1_relative" in table(at, "ppl_ratio").value.columns

    # one run: no correlation table or chart, a message that says why
    at = open_page(monkeypatch, filled_store, "views/compare.py", method="wanda", calibration="demo")
    assert not at.exception, at.exception
    titles = [title_of(f) for f in figures(at)]
    assert len(titles) == 2 and titles[0].startswith("Perplexity vs divergence") and "vs sparsity" in titles[1]
    assert not any("spearman" in df.value.columns for df in at.dataframe) and len(table(at, "ppl_ratio").value) == 1
    assert any("at least 3 runs measured with one protocol; 1 shown" in i.value for i in at.info)


def test_layers_page(monkeypatch, filled_store, runs):
    first, second = runs[0]["run_id"], runs[1]["run_id"]
    at = open_page(monkeypatch, filled_store, "views/layers.py", run=first)
    assert not at.exception, at.exception
    assert at.title[0].value == "🧱 Layers"
    figs = figures(at)
    assert len(figs) == 2 and title_of(figs[1]) == "Sparsity per decoder layer: target and reached"
    heat = figs[0]["data"][0]
    assert heat["type"] == "heatmap" and shape(heat["z"]) == (2, 7) and len(heat["x"]) == 7
    assert heat["colorbar"]["title"]["text"] == "relative reconstruction error"
    assert figs[0]["layout"]["height"] == max(400, 2 * PX_PER_LAYER)
    assert any(h.value == "Compare with another run" for h in at.subheader)

    at = open_page(monkeypatch, filled_store, "views/layers.py", run=first, vs=second, value="sparsity")
    assert not at.exception, at.exception
    figs = figures(at)
    assert len(figs) == 3
    difference = figs[2]["data"][0]
    assert difference.get("zmid") == 0 and shape(difference["z"]) == (2, 7)
    assert difference["colorbar"]["title"]["text"] == "sparsity, a - b"
    assert at.query_params.get("vs") == second and at.query_params.get("value") == "sparsity"


def count_shown(at: AppTest) -> tuple[int, list[str]]:
    """How many task examples the page says match, and the ids of those it shows, in order."""
    caption = next(c.value for c in at.caption if "task examples match" in c.value)
    shown = [m.value[2:].split("**")[0] for m in at.markdown if m.value.startswith("**task-")]
    return int(re.match(r"(\d+) of", caption).group(1)), shown


@pytest.fixture()
def flipped_store(filled_store, runs, tmp_path) -> tuple[Path, str]:
    """A copy of the filled store whose last run has one example lost and two gained (the tiny model gets none
    right, so no example flips on its own), and whose first divergence example lost its special-token marks, as a
    record made before runs marked them."""
    root = tmp_path / "store"
    shutil.copytree(filled_store, root, ignore=shutil.ignore_patterns("runs", "*.lock"))
    rid = runs[-1]["run_id"]
    db = Store(root)
    with db.write() as conn:
        for example in db.examples(rid, "task")[:3]:
            lost = example["id"] == "task-0"
            example.update(dense={**example["dense"], "em": float(lost)}, flip="lost" if lost else "gained",
                           pruned={**example["pruned"], "em": float(not lost)})
            conn.execute("UPDATE examples SET record = ? WHERE run_id = ? AND example_id = ?",
                         (json.dumps(example), rid, example["id"]))
        old = db.examples(rid, "divergence")[0]
        assert old.pop("special") and "<|im_end|>" in old["tokens"]
        conn.execute("UPDATE examples SET record = ? WHERE run_id = ? AND example_id = ?",
                     (json.dumps(old), rid, old["id"]))
    db.close()
    return root, rid


def span_titles(fragment: str) -> list[str]:
    return re.findall(r'title="([^"]*)"', fragment)


def test_generations_page(monkeypatch, flipped_store):
    store, rid = flipped_store
    db = Store(store)
    tasks, divergence = db.examples(rid, "task"), db.examples(rid, "divergence")
    db.close()
    assert tasks and divergence
    at = open_page(monkeypatch, store, "views/generations.py", run=rid)
    assert not at.exception, at.exception
    assert at.title[0].value == "💬 Generations"
    assert at.query_params.get("run") == rid
    matched, shown = count_shown(at)
    assert matched == len(tasks) and shown == [e["id"] for e in sorted(tasks, key=lambda e: -e["answer_jsd"])]
    coloured = [h.value for h in at.get("html") if "<span" in h.value]
    # the legend, one pruned answer per task example that is not blank (the random tiny model mostly writes
    # whitespace: "(empty answer)" then, as on the dense side) and one reference per divergence example
    written = [e for e in tasks
               if "".join(visible_tokens(e["pruned_tokens"], e["pruned_token_jsd"], e["pruned_special"])[0]).strip()]
    blank = sum(not e["output_dense"] for e in tasks) + len(tasks) - len(written)
    assert len(coloured) == 1 + len(written) + len(divergence)
    assert sum(c.value == "(empty answer)" for c in at.caption) == blank
    assert sum(m.value.startswith("**jsd-") for m in at.markdown) == len(divergence)
    assert "(nats, max 0.693)" in coloured[0]

    # the real run scored the chat template's end token after each reference; the page shows no special-token text,
    # from the record's marks or (the first, older record) its text, and each value stays with its token
    assert all("<|im_end|>" in e["tokens"] for e in divergence)
    assert [e.get("special") for e in divergence[1:]] == [[t == "<|im_end|>" for t in e["tokens"]]
                                                          for e in divergence[1:]]
    assert not any(re.search(r"im_end|im_start|endoftext", h) for h in coloured)
    for example, fragment in zip(by_divergence(divergence, "jsd"), coloured[-len(divergence):]):
        assert span_titles(fragment) == [f"JSD {v:.4f} nats" for t, v in zip(example["tokens"], example["token_jsd"])
                                         if t != "<|im_end|>"]

    for which, want in (("lost", (1.0, 0.0)), ("gained", (0.0, 1.0))):
        expected = {e["id"] for e in tasks if (e["dense"]["em"], e["pruned"]["em"]) == want}
        at.radio(key="flips").set_value(which).run()
        assert not at.exception, at.exception
        matched, shown = count_shown(at)
        assert matched == len(expected) and set(shown) == expected
    assert len(expected) == 2
    at.radio(key="flips").set_value("all").run()
    at.number_input(key="task-cap").set_value(2).run()
    assert count_shown(at)[0] == len(tasks) and len(count_shown(at)[1]) == 2


@pytest.fixture(scope="module")
def stopping_store(tmp_path_factory, tokenizer) -> tuple[Path, str]:
    """A store with one finished run, divergences in bits, of a tiny Llama built to answer every prompt with its stop
    token at once: the residual stream's dimension 0 stays positive (no layer writes to it, which pruning cannot
    change) and only <|im_end|>'s output row reads it."""
    from transformers import AutoConfig, AutoModelForCausalLM
    options = dict(TINY["llama"], max_position_embeddings=128, tie_word_embeddings=False)
    config = AutoConfig.for_model(options.pop("model_type"), vocab_size=len(tokenizer), **options)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id, 0] = 1.0
    folder = tmp_path_factory.mktemp("stopping-llama")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    root = tmp_path_factory.mktemp("stopping-store")
    made = backend_cli(root, "sweep", "--model", str(folder), "--methods", "magnitude", "--sparsities", "0.5",
                       "--calibrations", "demo", "--nsamples", "4", "--seqlen", "64", *TINY_EVAL, "--log2")
    yield root, made["runs"][0]["run_id"]
    stop_worker(root)


def test_an_answer_of_only_the_stop_token_shows_no_special_text(monkeypatch, stopping_store):
    store, rid = stopping_store
    db = Store(store)
    tasks = db.examples(rid, "task")
    db.close()
    assert tasks and all(e["pruned_tokens"] == ["<|im_end|>"] and e["pruned_special"] == [True] for e in tasks)
    assert all(e["output_dense"] == e["output_pruned"] == "" for e in tasks)
    at = open_page(monkeypatch, store, "views/generations.py", run=rid)
    assert not at.exception, at.exception
    shown = [h.value for h in at.get("html")]
    assert "(bits, max 1.000)" in shown[0]  # the run's protocol: JS in bits
    assert not any("im_end" in h for h in shown)
    assert sum(c.value == "(empty answer)" for c in at.caption) == 2 * len(tasks)  # dense and pruned alike
    headers = [m.value for m in at.markdown if m.value.startswith(("**task-", "**jsd-"))]
    assert headers and all(" bits" in h and " nats" not in h for h in headers)


def test_layers_offers_no_comparison_without_another_run(monkeypatch, stopping_store):
    store, rid = stopping_store
    at = open_page(monkeypatch, store, "views/layers.py", run=rid)
    assert not at.exception, at.exception
    assert len(figures(at)) == 2  # the heatmap and the targets per layer, no difference
    assert not any(h.value == "Compare with another run" for h in at.subheader)
    assert not any(s.label == "Compare with" for s in at.selectbox)
    assert any("No other finished run of this model" in c.value for c in at.caption)


@pytest.mark.parametrize("page", PAGES)
def test_pages_with_an_empty_store(monkeypatch, tmp_path, page):
    at = open_page(monkeypatch, tmp_path / "empty", page, run="nope")
    assert not at.exception, at.exception
    assert at.title and at.info and "No finished runs" in at.info[0].value


def test_token_html_escapes_and_scales():
    out = token_html(["<b>", " & ", '"x"'], [LN2, 0.0, None])
    assert "<b>" not in out and "&lt;b&gt;" in out and "&amp;" in out and "&quot;x&quot;" in out
    spans = re.findall(r'rgba\(239, 85, 59, ([\d.]+)\)', out)
    assert spans == ["1.000", "0.000", "0.000"]
    assert 'title="JSD 0.6931 nats"' in out and 'title="JSD –"' in out
    bits = token_html(["a", "b"], [0.5], unit="bits")
    assert bits.count("<span") == 2 and "rgba(239, 85, 59, 0.500)" in bits  # fewer values: the rest uncoloured
    assert "(bits, max 1.000)" in jsd_legend("bits") and "(nats, max 0.693)" in jsd_legend()
    with pytest.raises(ValueError, match="'log2'.*nats, bits"):
        token_html(["a"], [0.1], unit="log2")


def test_visible_tokens_hide_the_marked_special_tokens_and_keep_values_aligned():
    tokens, values = ["Paris", "<|im_end|>", "</s>", "!"], [0.1, 0.2, 0.3]
    assert visible_tokens(tokens, values, [False, True, False, False]) == (["Paris", "</s>", "!"], [0.1, 0.3, None], 1)
    # a record made before runs marked special tokens: tokens whose whole text is special-token text
    assert visible_tokens(tokens, values) == (["Paris", "!"], [0.1, None], 2)
    assert visible_tokens(["a <|x|> b"], [0.5]) == (["a <|x|> b"], [0.5], 0)


def test_example_filters_and_selection():
    examples = [{"id": "a", "dense": {"em": 1.0}, "pruned": {"em": 0.0}, "answer_jsd": 0.1},
                {"id": "b", "dense": {"em": 0.0}, "pruned": {"em": 1.0}, "answer_jsd": None},
                {"id": "c", "dense": {"em": 1.0}, "pruned": {"em": 1.0}, "answer_jsd": 0.3}]
    assert [e["id"] for e in filter_flips(examples, "lost")] == ["a"]
    assert [e["id"] for e in filter_flips(examples, "gained")] == ["b"]
    assert [e["id"] for e in by_divergence(examples, "answer_jsd")] == ["c", "a", "b"]
    rows = [{"method": "wanda", "sparsity": 0.5}, {"method": "magnitude", "sparsity": 0.6}]
    assert filter_rows(rows, {"method": [], "sparsity": ["0.5"]}) == rows[:1]

    fig = go.Figure([go.Scatter(x=[1], y=[1], customdata=[["r1"]]), go.Scatter(x=[1, 2], y=[1, 2],
                                                                                 customdata=[["r2"], ["r3"]])])
    assert selected_run({"selection": {"points": [{"customdata": ["r9"]}]}}, fig) == "r9"
    assert selected_run({"selection": {"points": [{"curve_number": 1, "point_index": 1}]}}, fig) == "r3"
    assert selected_run({"selection": {"points": []}}, fig) is None


def test_home_shows_the_store_size_and_deletes_a_run(monkeypatch, filled_store, tmp_path):
    root = copy_store(filled_store, tmp_path / "store")
    db = Store(root)
    size, ids = store_size(db), [r["run_id"] for r in db.runs()]
    at = open_page(monkeypatch, root, "views/home.py")
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Runs in the store"] == "4" and metrics["On disk"] == human_bytes(size["total_bytes"])
    assert any(f"4 runs, {size['total_bytes'] / 1e6:.1f} MB on disk" in c.value for c in at.caption)
    assert at.expander and at.expander[0].label == "Manage the store"

    # without the confirmation tick nothing goes
    gone, busy = ids[1], ids[2]
    at.selectbox(key="delete-run").set_value(gone)
    at.button(key="delete-button").click().run()
    assert at.warning and "Tick the confirmation" in at.warning[0].value
    assert len(db.runs()) == 4

    at.checkbox(key="delete-confirm-0").check()
    at.button(key="delete-button").click().run()
    assert not at.exception, at.exception
    assert at.success and f"Deleted run {gone}" in at.success[0].value and "freed" in at.success[0].value
    assert [r["run_id"] for r in db.runs()] == [rid for rid in ids if rid != gone]
    assert not db.run_folder(gone).exists() and db.integrity() == "ok"
    assert {m.label: m.value for m in at.metric}["Runs in the store"] == "3"
    assert not any(option.startswith(gone[:8]) for option in at.selectbox(key="delete-run").options)

    # a running run is refused with the backend's one-line message (this process holds the worker lock and the job)
    with open(root / "worker.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        db.submit(db.spec(busy), db.fingerprints(busy), busy, artifacts_ok=False)
        assert db.claim_next(pid=os.getpid())["run_id"] == busy
        at.selectbox(key="delete-run").set_value(busy)
        at.checkbox(key="delete-confirm-1").check()
        at.button(key="delete-button").click().run()
        assert at.error and "has a running job: cancel it first" in at.error[0].value
        assert db.latest_job(busy)["state"] == "running"
        assert busy in {r["run_id"] for r in db.runs()} and db.run_folder(busy).is_dir()
    db.close()
