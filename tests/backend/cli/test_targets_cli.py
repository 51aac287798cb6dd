"""Targets through the command line and the store: OWL, explicit per-layer sparsities and full-name patterns reach
the worker, the run id and the stored report; what cannot work is refused in one line before anything is queued."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from backend.runs.spec import RunSpec, run_id
from backend.runs.store import Store
from compression.targets import Targets, owl_sparsities
from tests.conftest import backend_cli, error_line, run_cli


def test_owl_and_uniform_runs_differ_and_store_their_targets(owl_store):
    db = Store(owl_store)
    runs = {r["allocation"].split(" ")[0]: r for r in db.runs()}
    assert set(runs) == {"uniform", "owl"} and all(r["state"] == "done" for r in runs.values())
    owl, uniform = runs["owl"], runs["uniform"]
    assert db.spec(owl["run_id"]).targets == Targets(allocation="owl")
    assert db.spec(uniform["run_id"]).targets == Targets()
    prune = db.metrics(owl["run_id"])["prune"]
    allocation = prune["allocation"]
    expected = owl_sparsities(allocation["outlier_ratios"], allocation["layer_parameters"], 0.6, 0.08)
    assert allocation["layer_targets"] == pytest.approx(expected) and expected[0] != expected[1]
    assert "allocation pass" in prune["stages"]
    for row in db.layers(owl["run_id"]):
        assert row["target"] == pytest.approx(expected[row["layer"]])
        assert row["target"] - 1 / row["cols"] <= row["sparsity"] <= row["target"] + 1e-9
    assert {row["target"] for row in db.layers(uniform["run_id"])} == {0.6}
    # the saved model holds exactly the zeros the report says, per layer
    weights = load_file(str(db.run_folder(owl["run_id"]) / "model" / "model.safetensors"))
    for row in db.layers(owl["run_id"]):
        w = weights[f"{row['name']}.weight"]
        assert float((w == 0).float().mean()) == pytest.approx(row["sparsity"])
    shown = backend_cli(owl_store, "show", owl["run_id"][:8])
    assert shown["spec"]["targets"]["allocation"] == "owl"


def test_default_targets_leave_the_run_id_as_it_was():
    spec = RunSpec(method="wanda", sparsity=0.5).normalised()
    prints = {"model": "m", "data": {}, "provenance": {}}
    words = spec.to_dict()
    before = json.loads(json.dumps(words))
    del before["targets"]  # what a spec was before targets existed
    import hashlib
    old = hashlib.sha256(json.dumps({"spec": before, "fingerprints": prints}, sort_keys=True).encode()).hexdigest()[:16]
    assert run_id(spec, prints) == old
    owl = RunSpec(method="wanda", sparsity=0.5, targets=Targets(allocation="owl")).normalised()
    assert run_id(owl, prints) != old
    assert RunSpec.from_dict(json.loads(json.dumps(owl.to_dict()))) == owl


@pytest.mark.parametrize("extra,expected", [
    (["--allocation", "owl", "--pattern", "2:4"], "--allocation owl gives layers different sparsities, but an N:M"),
    (["--allocation", "best"], "allocation 'best' is not allowed: use one of uniform, owl"),
    (["--layer-sparsity", "0.5,0.5,0.5"], "--layer-sparsity gives 3 sparsities but"),
    (["--layer-sparsity", "0.5,x"], "--layer-sparsity '0.5,x' is neither"),
    (["--allocation", "owl", "--layer-sparsity", "0.5,0.5"], "give one of them"),
    (["--allocation", "owl", "--owl-lambda", "0"], "owl-lambda 0.0 is not allowed"),
])
def test_bad_targets_are_refused_before_anything_is_queued(extra, expected, capsys, tmp_path, tiny_folder):
    store = tmp_path / "store"
    code, _, err = run_cli(["run", "--model", str(tiny_folder), "--method", "wanda", "--sparsity", "0.5",
                            "--calibration", "demo-prose", "--nsamples", "2", "--seqlen", "32", "--ppl", "demo-prose",
                            "--ppl-seqlen", "64", "--store", str(store), *extra], capsys)
    assert code == 2 and expected in error_line(err)
    assert Store(store).runs() == []


def test_prune_cli_takes_full_name_targets_and_explicit_layers(capsys, tmp_path, tiny_folder):
    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps({"model.layers.1.*": 0.25}))
    code, out, err = run_cli(["prune", "--model", str(tiny_folder), "--method", "ria", "--sparsity", "0.5",
                              "--calibration", "demo-prose", "--nsamples", "2", "--seqlen", "32",
                              "--exclude", "*.self_attn.o_proj", "--layer-sparsity", str(targets),
                              "--save", str(tmp_path / "out"), "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    rows = {r["name"]: r for r in result["layers"]}
    assert not any(n.endswith("o_proj") for n in rows)
    assert {k["name"] for k in result["kept"]} == {"model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"}
    for name, row in rows.items():
        goal = 0.25 if name.startswith("model.layers.1.") else 0.5
        assert row["target"] == goal and row["sparsity"] == row["shape"][0] * int(row["shape"][1] * goal) / (
            row["shape"][0] * row["shape"][1]), name
    assert result["spec"]["targets"]["patterns"] == {"model.layers.1.*": 0.25}
