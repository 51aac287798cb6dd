"""The Run page's form tells the truth (AppTest of the real app over real stores, no mocks): a chosen data folder
moves the pickers to its sources, a watched run's settings fill the form, a failed run says what to change, and the
backend's early checks refuse a bad spec on submit with their message while nothing is queued."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from backend.runs import service
from backend.runs.spec import EvalSettings, RunSpec
from backend.runs.store import Store
from backend.sources.datasets import LOCAL_FILES
from tests.conftest import ROOT, SHARED_DATA, needs_shared

FOLDER_LABEL = "Folder with local data files"
PICKERS = {"calibration": "Calibration data", "ppl": "Perplexity data", "jsd": "JS divergence data (teacher forcing)",
           "tasks": "Task data (generated answers)"}


@pytest.fixture(autouse=True)
def clear_caches(monkeypatch):
    """AppTest instances share one session id: start each test with empty caches and no data folder."""
    st.cache_data.clear()
    st.cache_resource.clear()
    monkeypatch.delenv("PRUNESCOPE_DATA_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def page(monkeypatch, store: Path, **params: str) -> AppTest:
    monkeypatch.setenv("PRUNESCOPE_STORE", str(store))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.switch_page("views/run.py")
    at.query_params.update(params)
    return at.run()


def widgets(at: AppTest) -> dict:
    """The page's widgets by label (the data folder's by its label's start)."""
    found = {w.label: w for w in [*at.text_input, *at.number_input, *at.selectbox, *at.slider, *at.toggle, *at.radio]}
    found["folder"] = next(w for w in at.text_input if w.label.startswith(FOLDER_LABEL))
    return found


def pickers(at: AppTest) -> dict[str, str]:
    form = widgets(at)
    return {key: form[label].value for key, label in PICKERS.items()}


def jobs(store: Path) -> int:
    return Store(store).db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]


@pytest.fixture
def shared_folder(tmp_path) -> Path:
    """A data folder of symlinks to ../shared/data's files, named as LOCAL_FILES expects."""
    folder = tmp_path / "data"
    for rel in LOCAL_FILES.values():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(SHARED_DATA / rel, folder / rel)
    return folder


def data_folder(tmp_path: Path, files: dict[str, list[dict]]) -> Path:
    """A data folder whose named sources hold the given rows."""
    folder = tmp_path / "small-data"
    for name, rows in files.items():
        path = folder / LOCAL_FILES[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def fill(at: AppTest, model: str, **changes) -> None:
    """The form set to the tiny model and small built-in settings that pass every check, then `changes` by label."""
    form = widgets(at)
    values = {"Model": model, "Samples": 4, "Sequence length": 64, "Seed": 0, "Examples": 6,
              "Perplexity windows": 2, "Perplexity length": 64, "Max new tokens": 4, "Method": "wanda",
              PICKERS["calibration"]: "demo-prose", PICKERS["ppl"]: "demo-prose", PICKERS["jsd"]: "demo",
              PICKERS["tasks"]: "demo", **changes}
    for label, value in values.items():
        form[label].set_value(value)


def submit(at: AppTest) -> AppTest:
    next(b for b in at.button if b.label == "Prune and evaluate").click()
    return at.run()


@needs_shared
def test_choosing_a_data_folder_moves_the_pickers_to_its_sources(monkeypatch, tmp_path, shared_folder):
    at = page(monkeypatch, tmp_path / "store")
    assert not at.exception
    before = pickers(at)
    assert before["calibration"] != "c4" and before["ppl"] != "wikitext2"
    widgets(at)["folder"].set_value(str(shared_folder))
    at.run()
    assert not at.exception and not at.error
    assert pickers(at) == {"calibration": "c4", "ppl": "wikitext2", "jsd": "alpaca", "tasks": "unnatural"}
    assert any(f"Data folder {shared_folder} holds c4" in c.value for c in at.caption)
    options = widgets(at)[PICKERS["calibration"]].options
    assert "c4" in options and "c4 (not available offline)" not in options


def test_a_folder_with_only_some_sources_moves_only_their_pickers(monkeypatch, tmp_path):
    folder = data_folder(tmp_path, {"alpaca": [{"instruction": "Say hi.", "output": "Hi."}]})
    at = page(monkeypatch, tmp_path / "store")
    before = pickers(at)
    widgets(at)["folder"].set_value(str(folder))
    at.run()
    assert pickers(at) == {"calibration": "alpaca", "ppl": before["ppl"], "jsd": "alpaca", "tasks": "alpaca"}


def test_an_invalid_data_folder_says_why_and_keeps_the_pickers(monkeypatch, tmp_path):
    at = page(monkeypatch, tmp_path / "store")
    before = pickers(at)
    widgets(at)["folder"].set_value(str(tmp_path / "nowhere"))
    at.run()
    assert any(f"data folder {tmp_path / 'nowhere'} does not exist" in e.value and LOCAL_FILES["c4"] in e.value
               for e in at.error)
    (tmp_path / "empty").mkdir()
    widgets(at)["folder"].set_value(str(tmp_path / "empty"))
    at.run()
    assert any("holds none of the expected files" in e.value and LOCAL_FILES["wikitext2"] in e.value
               for e in at.error)
    assert pickers(at) == before and not at.exception


def watched_spec(model: str) -> RunSpec:
    return RunSpec(method="magnitude", sparsity=0.5, model=model, pattern="2:4", calibration="demo", nsamples=5,
                   seqlen=48, seed=7, evaluation=EvalSettings(ppl="demo-prose", ppl_seqlen=32, ppl_windows=3, jsd=None,
                                                              tasks="demo", limit=4, max_new_tokens=5,
                                                              judge_model="judge-x"))


def test_the_form_shows_the_watched_run_s_settings_and_keeps_later_edits(monkeypatch, tmp_path, tiny_folder):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    # queue only: a refused submission would otherwise start a worker that runs these two jobs (and calls the
    # made-up judge) in the background of the rest of the suite
    monkeypatch.setattr(service, "start", lambda *args, **kwargs: None)
    store = tmp_path / "store"
    folder = data_folder(tmp_path, {"alpaca": [{"instruction": "Say hi.", "output": "Hi."}]})
    first = service.submit(Store(store), watched_spec(str(tiny_folder)), str(folder), start_worker=False)
    second = service.submit(Store(store), RunSpec(method="wanda", sparsity=0.3, model=str(tiny_folder),
                                                  calibration="demo-prose", nsamples=4, seqlen=64,
                                                  evaluation=EvalSettings(ppl=None, jsd="demo", tasks=None)),
                            start_worker=False)
    at = page(monkeypatch, store, run=first["run_id"])
    assert not at.exception
    form = widgets(at)
    shown = {label: form[label].value for label in (
        "Model", "Method", "Pattern", "Sparsity (N:M patterns use N/M)", *PICKERS.values(), "Samples",
        "Sequence length", "Seed", "Examples", "Perplexity windows", "Perplexity length", "Max new tokens",
        "Judge model")}
    assert shown == {"Model": str(tiny_folder), "Method": "magnitude", "Pattern": "2:4",
                     "Sparsity (N:M patterns use N/M)": 0.5, PICKERS["calibration"]: "demo",
                     PICKERS["ppl"]: "demo-prose", PICKERS["jsd"]: "(skip)", PICKERS["tasks"]: "demo", "Samples": 5,
                     "Sequence length": 48, "Seed": 7, "Examples": 4, "Perplexity windows": 3,
                     "Perplexity length": 32, "Max new tokens": 5, "Judge model": "judge-x"}
    assert next(t for t in at.toggle if t.label.startswith("LLM judge")).value is True
    assert form["folder"].value == str(folder)

    form["Samples"].set_value(9)
    form["Sequence length"].set_value(200)
    at = submit(at)
    assert any("calibration seqlen 200 is beyond the model's context" in e.value for e in at.error)
    assert at.query_params["run"] == first["run_id"] and jobs(store) == 2
    for _ in range(2):
        form = widgets(at)
        assert (form["Samples"].value, form["Sequence length"].value, form["Seed"].value) == (9, 200, 7)
        at.run()

    at.query_params["run"] = second["run_id"]
    at.run()
    form = widgets(at)
    assert (form["Method"].value, form["Sparsity (N:M patterns use N/M)"].value, form["Samples"].value,
            form[PICKERS["ppl"]].value, form[PICKERS["jsd"]].value) == ("wanda", 0.3, 4, "(skip)", "demo")
    assert next(t for t in at.toggle if t.label.startswith("LLM judge")).value is False


def finished_as(store: Path, spec: RunSpec, state: str, message: str) -> str:
    """A run of the store whose job ended in `state` (claimed and ended as a worker does)."""
    db = Store(store)
    rid = service.submit(db, spec, start_worker=False)["run_id"]
    job = db.claim_next(os.getpid())
    assert db.finish(job["job_id"], state, message, worker_pid=os.getpid())
    return rid


def test_a_failed_run_says_what_to_change_and_only_a_stopped_one_offers_a_retry(monkeypatch, tmp_path, tiny_folder):
    store = tmp_path / "store"
    spec = RunSpec(method="wanda", sparsity=0.5, model=str(tiny_folder), calibration="demo-prose", nsamples=4,
                   seqlen=64, evaluation=EvalSettings(ppl="demo-prose", ppl_seqlen=64, jsd=None, tasks=None))
    failed = finished_as(store, spec, "failed", "ModelError: model needs 9 GiB but 2 GiB is free")
    at = page(monkeypatch, store, run=failed)
    errors = " ".join(e.value for e in at.error)
    assert "failed: ModelError: model needs 9 GiB but 2 GiB is free." in errors
    assert "change what the message names" in errors and "Submit the same settings again" not in errors
    stopped = finished_as(store, replace(spec, seed=1), "interrupted", "the worker stopped")
    at = page(monkeypatch, store, run=stopped)
    assert any("interrupted: the worker stopped. Submit the same settings again to retry." in e.value for e in at.error)


def test_each_early_check_refuses_on_submit_and_queues_nothing(monkeypatch, tmp_path, tiny_folder):
    store = tmp_path / "store"
    folder = data_folder(tmp_path, {"wikitext2": [{"text": "Too short to score."}],
                                    "c4": [{"text": "A short page."}, {"text": "Another short page."}],
                                    "alpaca": [{"text": "Plain text, not a record."}]})
    cases = [
        ({"Sequence length": 200}, None,
         "calibration seqlen 200 is beyond the model's context of 128 tokens: use at most 128"),
        ({"Perplexity length": 300}, None, "ppl-seqlen 300 is beyond the model's context of 128 tokens: use at most 128"),
        ({"... or a local calibration file (.jsonl/.json/.txt/.parquet/.pt)": str(tmp_path / "gone.jsonl")}, None,
         f"path {tmp_path / 'gone.jsonl'} does not exist"),
        ({PICKERS["calibration"]: "demo", "Samples": 64, "Sequence length": 100}, None,
         "calibration 'demo': its 66 records (6 more held out: the evaluation reads them) give"),
        ({PICKERS["calibration"]: "c4"}, None, "calibration: data source 'c4' is not available offline"),
        ({PICKERS["ppl"]: "wikitext2"}, folder, "ppl 'wikitext2' gives"),
        ({PICKERS["calibration"]: "c4"}, folder, "calibration 'c4': none of its 2 documents has more than seqlen 64"),
        ({PICKERS["jsd"]: "alpaca"}, folder, "holds texts, expected records"),
    ]
    for changes, data, expected in cases:
        at = page(monkeypatch, store)
        if data:
            widgets(at)["folder"].set_value(str(data))
            at.run()
        fill(at, str(tiny_folder), **changes)
        at = submit(at)
        assert not at.exception
        assert any(expected in e.value for e in at.error), (expected, [e.value for e in at.error])
        assert jobs(store) == 0 and "run" not in at.query_params


def test_with_a_cluster_configured_the_form_offers_it_and_refuses_one_that_does_not_answer(monkeypatch, tmp_path,
                                                                                         tiny_folder):
    """No cluster configured: no executor choice. PRUNESCOPE_RAY_ADDRESS set: the form offers this machine or the
    cluster; choosing a cluster that does not answer is refused on submit with nothing queued, and this machine
    queues the run."""
    store = tmp_path / "store"
    monkeypatch.setattr(service, "start", lambda *args, **kwargs: None)  # queue only: no worker for this test
    assert "Where its jobs run" not in widgets(page(monkeypatch, store))
    monkeypatch.setenv("PRUNESCOPE_RAY_ADDRESS", "127.0.0.1:1")
    at = page(monkeypatch, store)
    choice = widgets(at)["Where its jobs run"]
    assert choice.options == ["this machine", "the Ray cluster at 127.0.0.1:1"]
    fill(at, str(tiny_folder), **{"Where its jobs run": "ray"})
    at = submit(at)
    assert any("no Ray cluster answers at 127.0.0.1:1" in e.value for e in at.error), [e.value for e in at.error]
    assert jobs(store) == 0
    fill(at, str(tiny_folder), **{"Where its jobs run": "local"})
    at = submit(at)
    assert not at.error and jobs(store) == 1, [e.value for e in at.error]
