"""Home and Run pages under AppTest, against real stores filled by the real CLI and worker."""

from __future__ import annotations

import time

import pytest
from streamlit.testing.v1 import AppTest

from backend.runs.store import Store
from backend.runs.worker import stop_worker
from tests.conftest import ROOT


def app(monkeypatch, store) -> AppTest:
    monkeypatch.setenv("PRUNESCOPE_STORE", str(store))
    monkeypatch.delenv("PRUNESCOPE_DATA_DIR", raising=False)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    return at


def test_home_on_an_empty_store_offers_the_demo(monkeypatch, tmp_path):
    at = app(monkeypatch, tmp_path)
    assert not at.exception
    assert "PruneScope" in at.title[0].value
    assert [m.value for m in at.metric][:2] == ["0", "0"]
    assert any("Start the demo" in b.label for b in at.button)
    text = " ".join(m.value for m in [*at.markdown, *at.caption])
    assert "demo-calibration" in text and "demo-prose" in text and "ship with PruneScope" in text
    assert "self" not in text.split()


def test_home_s_demo_uses_a_data_folder_with_the_paper_s_sets_and_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("PRUNESCOPE_STORE", str(tmp_path))
    monkeypatch.setenv("PRUNESCOPE_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60).run()
    assert not at.exception
    text = " ".join(m.value for m in [*at.markdown, *at.caption])
    assert "calibrates on C4" in text and "wikitext2" in text and "unnatural" in text and "demo-prose" not in text


def test_home_names_the_closest_and_furthest_runs(monkeypatch, filled_store):
    at = app(monkeypatch, filled_store)
    assert not at.exception
    assert at.metric[0].value == "4" and at.metric[1].value == "4"
    text = " ".join(m.value for m in at.markdown)
    assert "Closest to dense" in text and "Furthest from dense" in text


def fill_form(at: AppTest, model: str, seed: int, calibration: str = "demo-prose") -> None:
    """The Run page's form set to the tiny model and the settings of the filled store's runs."""
    form = {w.label: w for w in [*at.text_input, *at.number_input]}
    form["Model"].set_value(model)
    form["Samples"].set_value(4)
    form["Sequence length"].set_value(64)
    form["Seed"].set_value(seed)
    form["Examples"].set_value(6)
    form["Perplexity windows"].set_value(2)
    form["Perplexity length"].set_value(64)
    form["Max new tokens"].set_value(4)
    selects = {s.label: s for s in at.selectbox}
    selects["Method"].set_value("wanda")
    selects["Calibration data"].set_value(calibration)
    selects["Perplexity data"].set_value("demo-prose")
    selects["JS divergence data (teacher forcing)"].set_value("demo")
    selects["Task data (generated answers)"].set_value("demo")


def submit(at: AppTest) -> AppTest:
    next(b for b in at.button if b.label == "Prune and evaluate").click()
    return at.run()


def test_the_run_page_serves_a_finished_spec_from_the_store_at_once(monkeypatch, filled_store, tiny_folder):
    at = app(monkeypatch, filled_store)
    at.switch_page("views/run.py").run()
    fill_form(at, str(tiny_folder), seed=0)
    jobs = Store(filled_store).db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    at = submit(at)
    assert not at.exception
    assert any("served from the store" in s.value for s in at.success)
    assert at.query_params["run"] in {r["run_id"] for r in Store(filled_store).runs()}
    assert Store(filled_store).db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == jobs
    assert {"Perplexity", "JS divergence", "F1"} <= {m.label for m in at.metric}


def test_the_run_page_reports_a_bad_spec_naming_the_value(monkeypatch, tmp_path, tiny_folder):
    at = app(monkeypatch, tmp_path)
    at.switch_page("views/run.py").run()
    fill_form(at, str(tiny_folder / "no-such-model"), seed=0)
    at = submit(at)
    assert not at.exception
    assert any("no-such-model" in e.value for e in at.error)
    assert Store(tmp_path).runs() == []


def test_the_server_key_is_never_sent_to_an_endpoint_typed_in_the_form(monkeypatch, tmp_path, tiny_folder):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-server-key")
    monkeypatch.setenv("OPENAI_BASE_URL", "https://judge.example.org/v1")
    at = app(monkeypatch, tmp_path)
    at.switch_page("views/run.py").run()
    fill_form(at, str(tiny_folder), seed=0)
    at.toggle[0].set_value(True)
    next(w for w in at.text_input if w.label.startswith("Judge endpoint")).set_value("https://elsewhere.example.com/v1")
    at = submit(at)
    assert not at.exception
    assert any("only ever sent to its configured judge endpoint (https://judge.example.org/v1)" in e.value
               and "elsewhere.example.com" in e.value for e in at.error)
    assert Store(tmp_path).runs() == []


def test_another_endpoint_with_its_own_key_typed_in_the_form_is_queued(monkeypatch, tmp_path, tiny_folder):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-server-key")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    at = app(monkeypatch, tmp_path)
    at.switch_page("views/run.py").run()
    fill_form(at, str(tiny_folder), seed=0)
    at.toggle[0].set_value(True)
    next(w for w in at.text_input if w.label.startswith("Judge endpoint")).set_value("http://127.0.0.1:9/v1")
    next(w for w in at.text_input if w.label.startswith("Its API key")).set_value("sk-typed-key")
    try:
        at = submit(at)
        assert not at.exception and not at.error
        rows = Store(tmp_path).runs()
        assert len(rows) == 1 and rows[0]["run_id"] == at.query_params["run"]
        assert Store(tmp_path).spec(rows[0]["run_id"]).evaluation.judge_base_url == "http://127.0.0.1:9/v1"
    finally:
        stop_worker(tmp_path)
        from backend.runs import keys
        keys.withdraw(tmp_path, at.query_params.get("run", ""))
    assert b"sk-typed-key" not in b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())


def test_a_new_run_from_the_page_is_queued_polled_and_finishes(monkeypatch, tmp_path, tiny_folder):
    at = app(monkeypatch, tmp_path)
    at.switch_page("views/run.py").run()
    fill_form(at, str(tiny_folder), seed=3)
    try:
        at = submit(at)
        assert not at.exception
        rid = at.query_params["run"]
        deadline = time.monotonic() + 180
        while not at.success and time.monotonic() < deadline:
            assert not at.error, [e.value for e in at.error]
            time.sleep(1.0)
            at.run()
        assert any(s.value.startswith("Done") for s in at.success)
        assert Store(tmp_path).metrics(rid)["summary"]["pruned"]["ppl"] > 0
    finally:
        stop_worker(tmp_path)


@pytest.mark.parametrize("page", ["views/home.py", "views/run.py"])
def test_pages_render_with_a_run_in_the_url_that_is_not_in_the_store(monkeypatch, tmp_path, page):
    at = app(monkeypatch, tmp_path)
    at.query_params["run"] = "feedfacefeedface"
    at.switch_page(page).run()
    assert not at.exception
