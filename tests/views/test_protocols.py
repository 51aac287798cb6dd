"""Compare never puts runs measured with different protocols on one chart, table or correlation (AppTest over a real
store made by the real CLI: the filled store's four runs plus one measured on fewer perplexity windows)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from backend.runs.protocol import part_label, protocol_label
from backend.runs.store import Store
from tests.conftest import ROOT

RUN_ID = re.compile(r"\b[0-9a-f]{16}\b")


@pytest.fixture(autouse=True)
def clear_caches():
    """AppTest instances share one session id: start each test with empty caches."""
    st.cache_data.clear()
    st.cache_resource.clear()


@pytest.fixture(scope="module")
def two_protocols(two_protocols_store) -> tuple[Path, dict[str, set[str]], dict[str, dict]]:
    """The filled store plus one wanda run whose perplexity used 1 window instead of 2 (tests/conftest.py); returns
    the store, each protocol key's run ids and each key's protocol."""
    db = Store(two_protocols_store)
    by_key: dict[str, set[str]] = {}
    protocols: dict[str, dict] = {}
    for row in db.runs():
        assert row["state"] == "done"
        by_key.setdefault(row["protocol_key"], set()).add(row["run_id"])
        protocols[row["protocol_key"]] = row["protocol"]
    db.close()
    return two_protocols_store, by_key, protocols


def open_compare(monkeypatch, store: Path, **params: str) -> AppTest:
    monkeypatch.setenv("PRUNESCOPE_STORE", str(store))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.switch_page("views/compare.py")
    at.query_params.update(params)
    return at.run()


def runs_on_each_figure(at: AppTest, every: set[str]) -> list[set[str]]:
    """For each Plotly figure of the page, the store's run ids it carries anywhere (customdata, hover text)."""
    return [set(RUN_ID.findall(chart.proto.spec)) & every for chart in at.get("plotly_chart")]


def shown_protocol(at: AppTest) -> str:
    return next(m.value for m in at.markdown if m.value.startswith("**Measured with**"))


def test_compare_shows_one_protocol_at_a_time(monkeypatch, two_protocols):
    store, by_key, protocols = two_protocols
    every = set().union(*by_key.values())
    (big, big_runs), (small, small_runs) = sorted(by_key.items(), key=lambda kv: -len(kv[1]))
    assert (len(big_runs), len(small_runs)) == (4, 1)

    at = open_compare(monkeypatch, store)
    assert not at.exception, at.exception
    picker = at.selectbox(key="choice-protocol")  # the largest group first, and by default
    assert picker.value == big and picker.options == [f"{protocol_label(protocols[big])} · 4 run(s)",
                                                      f"{protocol_label(protocols[small])} · 1 run(s)"]
    assert "1 windows x 64 tokens" in picker.options[1] and "2 windows x 64 tokens" in picker.options[0]
    assert any(w.value.startswith("1 run(s) measured with 1 other protocol(s) are left out") for w in at.warning)
    assert f"protocol `{big}` (4 run(s))" in shown_protocol(at)
    figures = runs_on_each_figure(at, every)
    assert len(figures) >= 2 and all(ids <= big_runs for ids in figures) and figures[0] == big_runs
    relative = next(df.value for df in at.dataframe if "ppl_ratio" in df.value.columns)
    assert sorted(relative["run_id"]) == sorted(r[:8] for r in big_runs)
    predictors = next(df.value for df in at.dataframe if "spearman" in df.value.columns)
    assert set(predictors["n"]) <= {4}
    # every hover names the protocol its numbers come from, never the other one
    ppl = {key: part_label("ppl", {"source": "demo-prose", "windows": w, "windows_requested": w, "seqlen": 64})
           for key, w in ((big, 2), (small, 1))}
    specs = [chart.proto.spec for chart in at.get("plotly_chart")]
    assert all(ppl[big] in spec and ppl[small] not in spec for spec in specs)

    # the other protocol from the URL: only its run, the four others left out
    at = open_compare(monkeypatch, store, protocol=small)
    assert not at.exception, at.exception
    assert at.selectbox(key="choice-protocol").value == small and at.query_params["protocol"] == small
    assert any(w.value.startswith("4 run(s) measured with 1 other protocol(s)") for w in at.warning)
    assert f"protocol `{small}` (1 run(s))" in shown_protocol(at)
    figures = runs_on_each_figure(at, every)
    assert len(figures) == 2 and all(ids == small_runs for ids in figures)
    assert any("at least 3 runs measured with one protocol; 1 shown" in i.value for i in at.info)
    assert all(ppl[small] in chart.proto.spec and ppl[big] not in chart.proto.spec for chart in at.get("plotly_chart"))

    # picking on the page moves the URL with it
    at.selectbox(key="choice-protocol").set_value(big).run()
    assert not at.exception, at.exception
    assert at.query_params["protocol"] == big and all(ids <= big_runs for ids in runs_on_each_figure(at, every))


def test_a_filter_leaving_one_protocol_needs_no_picker(monkeypatch, two_protocols):
    store, by_key, _protocols = two_protocols
    at = open_compare(monkeypatch, store, method="magnitude", protocol="feedface00")
    assert not at.exception, at.exception
    assert not any(s.label.startswith("Protocol") for s in at.selectbox) and not at.warning
    big = max(by_key, key=lambda k: len(by_key[k]))
    assert f"protocol `{big}` (2 run(s))" in shown_protocol(at)
    every = set().union(*by_key.values())
    assert all(ids and ids <= by_key[big] for ids in runs_on_each_figure(at, every))
    config = json.loads(next(df for df in at.dataframe if "ppl_ratio" in df.value.columns).proto.columns)
    assert "2 windows x 64 tokens" in config["pruned_ppl"]["help"]
