"""The demo's choice of data: the paper's sets when a data folder has all four, else the shipped texts; never `self`."""

from __future__ import annotations

from backend.runs.demo import REAL_SETS, demo
from backend.runs.service import source_status
from backend.sources.datasets import load_source
from tests.conftest import ROOT, needs_shared


def test_offline_without_data_the_demo_runs_on_the_shipped_texts_never_on_the_models_own():
    chosen = demo(source_status(None))
    spec = chosen.spec
    assert spec.calibration == "demo-calibration" and spec.calibration != spec.evaluation.ppl
    assert all(load_source(s).items for s in (spec.calibration, *spec.evaluation.sources()))
    assert "ship with PruneScope" in chosen.reason and all(name in chosen.reason for name in REAL_SETS)


def test_one_missing_set_keeps_the_shipped_texts_and_names_it():
    status = {name: "offline" for name in REAL_SETS} | {"alpaca": "unavailable"}
    chosen = demo(status)
    assert chosen.spec.calibration == "demo-calibration" and "(alpaca not found offline)" in chosen.reason


@needs_shared
def test_a_data_folder_with_the_paper_s_sets_is_used_and_said():
    chosen = demo(source_status(str(ROOT.parent / "shared" / "data")))
    ev = chosen.spec.evaluation
    assert (chosen.spec.calibration, ev.ppl, ev.jsd, ev.tasks) == ("c4", "wikitext2", "alpaca", "unnatural")
    assert "calibrates on C4" in chosen.reason
