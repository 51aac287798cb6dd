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
from streamlit.testing.v1 import AppTest

from backend.runs.cleanup import human_bytes, store_size
from backend.runs.store import Store
from tests.conftest import ROOT
from views.common import (
    LN2,
    by_divergence,
    filter_flips,
    filter_rows,
    selected_run,
    token_html,
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


def test_compare_page(monkeypatch, filled_store, runs):
    at = open_page(monkeypatch, filled_store, "views/compare.py")
    assert not at.exception, at.exception
    assert at.title[0].value == "📈 Compare"
    figs = figures(at)
    assert len(figs) >= 3
    scatter = next(f for f in figs if title_of(f).startswith("Perplexity vs divergence"))
    ids = {point[0] for trace in scatter["data"] for point in trace["customdata"]}
    assert ids == {r["run_id"] for r in runs}
    assert any("vs sparsity" in title_of(f) for f in figs)
    tables = [df.value for df in at.dataframe]
    relative = next(t for t in tables if "ppl_ratio" in t.columns)
    assert {"jsd", "flip_rate", "f1_change", "f1_relative"} <= set(relative.columns) and len(relative) == 4
    predictors = next(t for t in tables if "spearman" in t.columns)
    assert set(predictors["metric"]) >= {"ppl_ratio", "jsd", "flip_rate"}

    # a filter in the URL narrows every view, and stays in the URL
    at = open_page(monkeypatch, filled_store, "views/compare.py", method="wanda", task="rouge1")
    assert not at.exception, at.exception
    scatter = next(f for f in figures(at) if title_of(f).startswith("Perplexity vs divergence"))
    ids = {point[0] for trace in scatter["data"] for point in trace["customdata"]}
    assert ids == {r["run_id"] for r in runs if r["method"] == "wanda"} and len(ids) == 2
    assert at.query_params.get("method") == "wanda"
    assert "rouge1_relative" in next(df.value for df in at.dataframe if "ppl_ratio" in df.value.columns).columns


def test_layers_page(monkeypatch, filled_store, runs):
    first, second = runs[0]["run_id"], runs[1]["run_id"]
    at = open_page(monkeypatch, filled_store, "views/layers.py", run=first)
    assert not at.exception, at.exception
    assert at.title[0].value == "🧱 Layers"
    figs = figures(at)
    assert len(figs) == 1
    heat = figs[0]["data"][0]
    assert heat["type"] == "heatmap" and shape(heat["z"]) == (2, 7) and len(heat["x"]) == 7

    at = open_page(monkeypatch, filled_store, "views/layers.py", run=first, vs=second, value="sparsity")
    assert not at.exception, at.exception
    figs = figures(at)
    assert len(figs) == 2
    difference = figs[1]["data"][0]
    assert difference.get("zmid") == 0 and shape(difference["z"]) == (2, 7)
    assert at.query_params.get("vs") == second and at.query_params.get("value") == "sparsity"


def count_shown(at: AppTest) -> tuple[int, list[str]]:
    """How many task examples the page says match, and the ids of those it shows, in order."""
    caption = next(c.value for c in at.caption if "task examples match" in c.value)
    shown = [m.value[2:].split("**")[0] for m in at.markdown if m.value.startswith("**task-")]
    return int(re.match(r"(\d+) of", caption).group(1)), shown


@pytest.fixture()
def flipped_store(filled_store, runs, tmp_path) -> tuple[Path, str]:
    """A copy of the filled store whose last run has one example lost and two gained (the tiny model gets none
    right, so no example flips on its own)."""
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
    db.close()
    return root, rid


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
    # the legend, one pruned answer per task example and one reference per divergence example
    assert len(coloured) == 1 + len(tasks) + len(divergence)
    assert sum(m.value.startswith("**jsd-") for m in at.markdown) == len(divergence)

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
    assert 'title="JSD 0.6931"' in out and 'title="JSD –"' in out
    assert token_html(["a", "b"], [0.5], top=1.0).count("<span") == 2   # fewer values: the rest uncoloured


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


def copied_store(source: Path, target: Path) -> Path:
    """A copy of a store (not its lock) whose artifact rows point into the copy, as its worker would write them."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.lock"))
    db = Store(target)
    with db.write() as conn:
        for row in conn.execute("SELECT run_id, name FROM artifacts").fetchall():
            conn.execute("UPDATE artifacts SET path = ? WHERE run_id = ? AND name = ?",
                         (str((target / "runs" / row["run_id"] / row["name"]).resolve()), row["run_id"], row["name"]))
    db.close()
    return target


def test_home_shows_the_store_size_and_deletes_a_run(monkeypatch, filled_store, tmp_path):
    root = copied_store(filled_store, tmp_path / "store")
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
