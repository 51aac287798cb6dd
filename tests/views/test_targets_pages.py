"""Targets in the dashboard (AppTest of the real app over real stores): the Run form sends OWL and explicit
targets (a bad one refused on submit, nothing queued) and shows a watched run's; Layers draws each layer's target
beside the sparsity reached with OWL's outlier ratios; Compare filters and labels runs by allocation."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from backend.runs import service
from backend.runs.spec import EvalSettings, RunSpec
from backend.runs.store import Store
from compression.targets import Targets
from tests.views.test_pages import figures, open_page, shape, title_of
from tests.views.test_run_form import clear_caches, fill, jobs, page, submit, widgets  # noqa: F401 (autouse)


def test_the_run_form_sends_owl_and_explicit_targets_and_refuses_bad_ones(monkeypatch, tmp_path, tiny_folder):
    store = tmp_path / "store"
    monkeypatch.setattr(service, "start", lambda *args, **kwargs: None)  # queue only: no worker for this test
    at = page(monkeypatch, store)
    fill(at, str(tiny_folder), **{"Allocation": "owl", "OWL lambda": 0.1, "Keep these dense (fnmatch patterns, "
                                  "space-separated)": "*.o_proj model.layers.0.mlp.*"})
    at = submit(at)
    assert not at.exception and not at.error, [e.value for e in at.error]
    spec = Store(store).spec(at.query_params["run"])
    assert spec.targets == Targets(exclude=("*.o_proj", "model.layers.0.mlp.*"), allocation="owl", owl_lambda=0.1)
    at.run()  # the form now shows the submitted run's settings, which the next edits start from

    fill(at, str(tiny_folder), **{"Allocation": "uniform", "Per-layer sparsities": "0.2,0.3,0.4"})
    at = submit(at)
    assert any("--layer-sparsity gives 3 sparsities but" in e.value and "has 2 decoder layers" in e.value
               for e in at.error)
    assert jobs(store) == 1
    fill(at, str(tiny_folder), **{"Allocation": "uniform", "Per-layer sparsities": '{"*.mlp.*": 0.3}',
                                  "Keep these dense (fnmatch patterns, space-separated)": ""})
    at = submit(at)
    assert not at.error and jobs(store) == 2
    spec = Store(store).spec(at.query_params["run"])
    assert spec.targets == Targets(patterns=(("*.mlp.*", 0.3),))
    at.run()
    assert widgets(at)["Per-layer sparsities"].value == json.dumps({"*.mlp.*": 0.3})


def test_a_watched_owl_run_fills_the_targets(monkeypatch, tmp_path, tiny_folder):
    store = tmp_path / "store"
    spec = RunSpec(method="ria", sparsity=0.6, model=str(tiny_folder), calibration="demo-prose", nsamples=4, seqlen=64,
                   evaluation=EvalSettings(ppl="demo-prose", ppl_seqlen=64, jsd=None, tasks=None),
                   targets=Targets(include=("model.layers.1.*",), allocation="owl", owl_m=7.0))
    rid = service.submit(Store(store), spec, start_worker=False)["run_id"]
    form = widgets(page(monkeypatch, store, run=rid))
    assert (form["Method"].value, form["Allocation"].value, form["OWL M"].value,
            form["Only these matrices (fnmatch patterns, space-separated)"].value) == ("ria", "owl", 7.0,
                                                                                      "model.layers.1.*")


def test_layers_shows_each_layers_target_beside_what_it_reached_and_owls_ratios(monkeypatch, owl_store):
    db = Store(owl_store)
    owl = next(r for r in db.runs() if r["allocation"].startswith("owl"))
    at = open_page(monkeypatch, owl_store, "views/layers.py", run=owl["run_id"])
    assert not at.exception
    chart = next(f for f in figures(at) if title_of(f).startswith("Sparsity per decoder layer"))
    traces = {t["name"]: t for t in chart["data"]}
    allocation = db.metrics(owl["run_id"])["prune"]["allocation"]
    assert traces["target"]["y"] == pytest.approx(allocation["layer_targets"])
    assert traces["outlier ratio (%)"]["y"] == pytest.approx([100 * r for r in allocation["outlier_ratios"]])
    reached = {}
    for row in db.layers(owl["run_id"]):
        zeros, numel = reached.get(row["layer"], (0.0, 0))
        reached[row["layer"]] = (zeros + row["sparsity"] * row["rows"] * row["cols"], numel + row["rows"] * row["cols"])
    assert traces["reached"]["y"] == pytest.approx([z / n for _, (z, n) in sorted(reached.items())])
    assert any("OWL gives each decoder layer a sparsity" in c.value for c in at.caption)
    at = open_page(monkeypatch, owl_store, "views/layers.py", run=owl["run_id"], value="target")
    heat = next(f for f in figures(at) if title_of(f).startswith("target sparsity"))["data"][0]
    z = heat["z"]
    if isinstance(z, dict):  # Plotly's typed-array encoding
        z = np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"]).reshape(shape(z)).tolist()
    assert [row[0] for row in z] == pytest.approx(allocation["layer_targets"])


def test_compare_filters_and_labels_by_allocation(monkeypatch, owl_store):
    at = open_page(monkeypatch, owl_store, "views/compare.py")
    assert not at.exception
    allocation = next(m for m in at.multiselect if m.label == "Allocation")
    assert sorted(allocation.options) == ["owl (M 5, lambda 0.08)", "uniform"]
    table = next(d for d in at.dataframe if "allocation" in d.value.columns)
    assert sorted(table.value["allocation"]) == ["owl (M 5, lambda 0.08)", "uniform"]
    names = {t["name"] for f in figures(at) if title_of(f).startswith("Perplexity vs divergence") for t in f["data"]}
    assert names == {"ria · demo-prose · uniform", "ria · demo-prose · owl (M 5, lambda 0.08)"}
    at = open_page(monkeypatch, owl_store, "views/compare.py", allocation="uniform")
    table = next(d for d in at.dataframe if "pruned_ppl" in d.value.columns)
    assert len(table.value) == 1
