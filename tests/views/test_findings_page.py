"""The Findings page over real stores (AppTest, no mocks): three verdicts with their rules and numbers, the
predictors chart, and the button that queues exactly the missing runs (or says why nothing was queued)."""

from __future__ import annotations

import json

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from backend.findings.study import Cell, cells
from backend.runs.spec import EvalSettings
from backend.runs.store import Store
from backend.runs.worker import stop_worker
from tests.backend.findings.handmade import SAMPLES, WINDOWS, handmade_store, units
from tests.backend.findings.test_claims import HOLDS
from tests.conftest import ROOT, SHARED_DATA, needs_shared


@pytest.fixture(autouse=True)
def clear_caches():
    st.cache_data.clear()


def open_findings(monkeypatch, store, data_dir: str | None = None) -> AppTest:
    monkeypatch.setenv("PRUNESCOPE_STORE", str(store))
    if data_dir:
        monkeypatch.setenv("PRUNESCOPE_DATA_DIR", data_dir)
    else:
        monkeypatch.delenv("PRUNESCOPE_DATA_DIR", raising=False)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.switch_page("views/findings.py")
    return at.run()


def verdicts(at: AppTest) -> list[str]:
    return [a.value for kind in ("success", "error", "warning") for a in getattr(at, kind)
            if a.value.startswith("Verdict: ")]


def test_three_verdicts_with_their_rules_numbers_and_predictors(monkeypatch, tmp_path):
    runs = {Cell(m, s, "unstructured", c): units(r, d, jsd=d, seed=i)
            for i, ((m, s, c), (r, d)) in enumerate(HOLDS.items())}
    handmade_store(tmp_path, runs)
    at = open_findings(monkeypatch, tmp_path)
    assert not at.exception, at.exception
    assert at.title[0].value == "🔎 Findings"
    assert sorted(verdicts(at)) == ["Verdict: held"] * 3
    text = " ".join(m.value for m in at.markdown)
    for claim in (1, 2, 3):
        assert f"Claim {claim}" in [h.value for h in at.subheader]
    assert text.count("**Rule.**") == 3 and "lies below 1.5" in text
    numbers = next(df.value for df in at.dataframe if "95% interval" in df.value.columns)
    assert {"wanda", "sparsegpt"} <= set(numbers["part"]) and numbers["95% interval"].str.startswith("[").all()
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    assert any("Which metric predicts" in str(s["layout"].get("title")) for s in specs)
    assert any("Every run the claims need" in s.value for s in at.success)
    # another task score and a looser threshold come from the page's own controls
    at.number_input(key="close").set_value(1.1).run()
    assert not at.exception and "Verdict: not held" in verdicts(at)


def test_an_empty_store_shows_the_whole_study_missing_and_queues_nothing_without_its_data(monkeypatch, tmp_path):
    at = open_findings(monkeypatch, tmp_path)
    assert not at.exception, at.exception
    assert sorted(verdicts(at)) == ["Verdict: inconclusive"] * 3
    button = at.button(key="queue-missing")
    assert button.proto.label == f"Queue the {len(cells('quick'))} missing run(s)"
    button.click().run()
    assert not at.exception, at.exception
    errors = [e.value for e in at.error]
    assert any(e.startswith("Nothing was queued:") and "c4" in e for e in errors), errors
    assert Store(tmp_path).runs() == []


@needs_shared
def test_the_button_queues_exactly_the_missing_runs(monkeypatch, tmp_path, tiny_folder):
    evaluation = EvalSettings(ppl_seqlen=64, ppl_windows=WINDOWS, limit=8, jsd_limit=SAMPLES, max_new_tokens=4)
    have = [Cell("wanda", 0.5), Cell("sparsegpt", 0.5), Cell("wanda", 0.5, calibration="alpaca")]
    handmade_store(tmp_path, {c: units(1.2, 0.1, 0.1, seed=i) for i, c in enumerate(have)}, model=str(tiny_folder),
                   evaluation=evaluation, nsamples=4, seqlen=64)
    try:
        at = open_findings(monkeypatch, tmp_path, str(SHARED_DATA))
        wanted = [c for c in cells("quick") if c not in have]
        at.button(key="queue-missing").click().run()
        assert not at.exception, at.exception
        said = [s.value for s in at.success]
        assert any(s.startswith(f"Queued {len(wanted)} run(s)") for s in said), said
        db = Store(tmp_path)
        new = [r for r in db.runs() if r["run_id"] not in {x["run_id"] for x in db.runs() if x["state"] == "done"}]
        assert sorted(Cell(r["method"], r["sparsity"], r["pattern"], r["calibration"]) for r in new) == sorted(wanted)
        assert {(r["nsamples"], r["seqlen"], r["model"]) for r in new} == {(4, 64, str(tiny_folder))}
    finally:
        stop_worker(tmp_path)
