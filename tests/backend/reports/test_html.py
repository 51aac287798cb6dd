"""The HTML report keeps runs measured with different protocols apart: one section per protocol, largest first,
each with its own table, charts and correlations, and a table saying which run went where."""

from __future__ import annotations

import re
from html import escape
from pathlib import Path

import pytest

from backend.reports.html import build_html, protocol_groups
from backend.runs.protocol import protocol_key, protocol_label
from backend.runs.store import Store
from tests.conftest import backend_cli


def protocol(windows: int) -> dict:
    return {"ppl": {"source": "wikitext2", "data": "abc", "seqlen": 512, "windows": windows,
                    "windows_requested": windows, "scored_tokens": 511 * windows},
            "divergence": {"source": "alpaca", "data": "def", "records": 40, "template": "alpaca",
                           "positions": "response", "unit": "nats", "scored_tokens": 900}}


def row(run_id: str, method: str, sparsity: float, windows: int, state: str = "done") -> dict:
    measured = protocol(windows) if state == "done" else {}
    return {"run_id": run_id, "model": "smol", "method": method, "sparsity": sparsity, "pattern": "unstructured",
            "calibration": "c4", "nsamples": 32, "seqlen": 256, "seed": 0, "state": state, "stage": None,
            "done": None, "total": None, "message": None if state == "done" else "worker stopped",
            "overall_sparsity": sparsity, "dense_ppl": 29.0, "pruned_ppl": 30 + 100 * sparsity ** 2,
            "jsd": sparsity / 3, "kl_dense_pruned": sparsity, "kl_pruned_dense": sparsity * 1.4,
            "flip_rate": sparsity / 2, "dense_f1": 0.15, "pruned_f1": 0.15 - sparsity / 10,
            "protocol": measured, "protocol_key": protocol_key(measured)}


def sections(page: str) -> list[str]:
    """The protocol sections of a report page, in order."""
    return re.findall(r'<section class="protocol">(.*?)</section>\n</section>', page, re.S)


def test_two_protocols_get_two_sections_largest_first():
    rows = [row("ten-a", "wanda", 0.3, 10), row("forty-a", "wanda", 0.5, 40), row("ten-b", "magnitude", 0.5, 10),
            row("ten-c", "sparsegpt", 0.6, 10), row("unfinished-z9", "wanda", 0.7, 10, state="interrupted")]
    page = build_html(rows)
    found = sections(page)
    assert len(found) == 2
    ten, forty = protocol_label(protocol(10)), protocol_label(protocol(40))
    assert f"Protocol 1 of 2: {ten} · 3 run(s)" in found[0] and f"Protocol 2 of 2: {forty} · 1 run(s)" in found[1]
    assert all(rid in found[0] for rid in ("ten-a", "ten-b", "ten-c")) and "forty-a" not in found[0]
    assert "forty-a" in found[1] and not any(rid in found[1] for rid in ("ten-a", "ten-b", "ten-c"))
    assert "unfinished-z9" not in found[0] + found[1] and "Runs not finished" in page and "worker stopped" in page
    # each section has its own runs table, scatter, three sparsity charts and correlations
    for section in found:
        assert section.count("Plotly.newPlot") == 5 and section.count('<table class="dataframe runs">') == 2
    assert page.count("<h3>Which metric predicts the F1 drop?</h3>") == 2
    # the groups table says which run went where
    assert protocol_groups(rows) == [
        {"protocol_key": protocol_key(protocol(10)), "protocol": ten, "runs": ["ten-a", "ten-b", "ten-c"]},
        {"protocol_key": protocol_key(protocol(40)), "protocol": forty, "runs": ["forty-a"]}]
    assert "ten-a, ten-b, ten-c" in page and "measured with 2 protocol(s)" in page


def test_one_protocol_is_one_section():
    page = build_html([row("a", "wanda", 0.3, 10), row("b", "wanda", 0.5, 10)])
    found = sections(page)
    assert len(found) == 1 and "Protocol 1 of 1: " in found[0] and "· 2 run(s)" in found[0]


@pytest.fixture(scope="module")
def two_protocols(two_protocols_store) -> Path:
    """The filled store's four runs plus one more measured on fewer perplexity windows (tests/conftest.py)."""
    return two_protocols_store


def test_the_cli_report_groups_a_real_store_by_protocol(two_protocols, tmp_path):
    db = Store(two_protocols)
    rows = db.runs()
    db.close()
    assert len(rows) == 5 and len({r["protocol_key"] for r in rows}) == 2
    result = backend_cli(two_protocols, "report", "--out", str(tmp_path / "report.html"))
    page = Path(result["out"]).read_text(encoding="utf-8")
    big, small = result["groups"]
    assert len(big["runs"]) == 4 and len(small["runs"]) == 1
    one = next(r for r in rows if r["protocol_key"] == small["protocol_key"])
    assert small["runs"] == [one["run_id"]] and one["protocol"]["ppl"]["windows"] == 1
    assert small["protocol"] == protocol_label(one["protocol"]) and "1 windows" in small["protocol"]
    assert {r["run_id"] for r in rows} == set(big["runs"]) | set(small["runs"])
    found = sections(page)
    assert len(found) == 2
    assert f"{escape(big['protocol'])} · 4 run(s)" in found[0] and f"{escape(small['protocol'])} · 1 run(s)" in found[1]
    assert one["run_id"] not in found[0] and all(rid not in found[1] for rid in big["runs"])
    assert result["done"] == 5 and result["runs"] == 5
