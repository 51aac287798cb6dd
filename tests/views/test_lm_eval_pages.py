"""lm-eval in the dashboard (AppTest of the real app over real stores): the Run form sends lm-eval tasks and refuses
an unknown one on submit with nothing queued; Compare offers each lm-eval score as the task score, and its table and
curves show the stored values; the Run page shows a finished run's lm-eval scores."""

from __future__ import annotations

import base64

import numpy as np

from backend.runs import service
from backend.runs.store import Store
from tests.views.test_pages import figures, open_page, title_of
from tests.views.test_run_form import clear_caches, fill, jobs, page, submit, widgets  # noqa: F401 (autouse)

KEY = "lm:prunescope_facts:acc"


def values(series) -> list[float]:
    """A plotly series as numbers (plotly ships arrays base64-encoded)."""
    if isinstance(series, dict):
        return np.frombuffer(base64.b64decode(series["bdata"]), dtype=series["dtype"]).tolist()
    return list(series)


def test_the_run_form_sends_lm_eval_tasks_and_refuses_an_unknown_one(monkeypatch, tmp_path, tiny_folder):
    store = tmp_path / "store"
    monkeypatch.setattr(service, "start", lambda *args, **kwargs: None)  # queue only: no worker for this test
    at = page(monkeypatch, store)
    fill(at, str(tiny_folder), **{"Tasks (comma-separated; empty: none)": "prunescope_fact",
                                  "Documents per task (0: all)": 12})
    at = submit(at)
    assert any("lm-eval task 'prunescope_fact' is not defined" in e.value and "did you mean prunescope_facts" in e.value
               for e in at.error), [e.value for e in at.error]
    assert jobs(store) == 0
    fill(at, str(tiny_folder), **{"Tasks (comma-separated; empty: none)": "prunescope_facts", "Shots": 0,
                                  "Documents per task (0: all)": 12})
    at = submit(at)
    assert not at.exception and not at.error, [e.value for e in at.error]
    evaluation = Store(store).spec(at.query_params["run"]).evaluation
    assert (evaluation.lm_eval, evaluation.lm_eval_limit, evaluation.lm_eval_fewshot) == (("prunescope_facts",), 12, 0)
    at.run()
    assert widgets(at)["Tasks (comma-separated; empty: none)"].value == "prunescope_facts"


def test_compare_offers_lm_eval_scores_and_shows_the_stored_values(monkeypatch, lm_store):
    rows = {r["run_id"]: r for r in Store(lm_store).runs()}
    at = open_page(monkeypatch, lm_store, "views/compare.py", task=KEY, metric=f"{KEY}_change")
    assert not at.exception
    picker = next(s for s in at.selectbox if s.label == "Task score")
    assert picker.value == KEY
    assert {"prunescope_facts acc (lm-eval)", "prunescope_facts acc_norm (lm-eval)", "F1"} <= set(picker.options)
    table = next(d for d in at.dataframe if f"pruned_{KEY}" in d.value.columns)
    # a protocol of lm-eval alone: the perplexity and divergence columns are named once as not measured, not shown
    assert f"pruned_{KEY}" in table.proto.column_order and "pruned_ppl" not in table.proto.column_order
    assert any(c.value.startswith("Not measured in this protocol: dense perplexity, pruned perplexity")
               for c in at.caption)
    for _, shown in table.value.iterrows():
        run = next(r for rid, r in rows.items() if rid.startswith(shown["run_id"]))
        assert shown[f"pruned_{KEY}"] == run[f"pruned_{KEY}"]
        assert shown[f"{KEY}_change"] == run[f"pruned_{KEY}"] - run[f"dense_{KEY}"]
    curves = next(f for f in figures(at) if title_of(f).startswith("prunescope_facts acc (lm-eval) change"))
    points = sorted(y for trace in curves["data"] for y in values(trace["y"]))
    assert points == sorted(r[f"pruned_{KEY}"] - r[f"dense_{KEY}"] for r in rows.values())


def test_the_run_page_shows_a_finished_runs_lm_eval_scores(monkeypatch, lm_store):
    run = next(r for r in Store(lm_store).runs() if r["method"] == "wanda")
    at = page(monkeypatch, lm_store, run=run["run_id"])
    assert not at.exception
    card = next(m for m in at.metric if m.label == "prunescope_facts acc (lm-eval)")
    assert card.value == f"{run[f'pruned_{KEY}']:.4f}"
