"""`python -m backend eval` on tiny real models: every metric, the JSON keys and the per-example records."""

from __future__ import annotations

import json
import math

import pytest

from backend.cli.parser import main
from tests.conftest import SHARED_DATA, needs_shared

pytestmark = needs_shared


@pytest.fixture(scope="module")
def pruned_folder(tiny_folder, tmp_path_factory):
    save = tmp_path_factory.mktemp("pruned") / "wanda"
    assert main(["prune", "--model", str(tiny_folder), "--method", "wanda", "--sparsity", "0.5", "--calibration",
                 "c4", "--nsamples", "2", "--seqlen", "64", "--data-dir", str(SHARED_DATA), "--save", str(save),
                 "--json"]) == 0
    return save


def test_eval_reports_every_metric_and_writes_records(tiny_folder, pruned_folder, tmp_path, capsys):
    capsys.readouterr()
    records = tmp_path / "records.jsonl"
    code = main(["eval", "--dense", str(tiny_folder), "--pruned", str(pruned_folder), "--ppl", "wikitext2",
                 "--ppl-seqlen", "64", "--ppl-windows", "2", "--jsd", "alpaca", "--tasks", "unnatural", "--limit", "3",
                 "--max-new-tokens", "4", "--template", "unnatural", "--data-dir", str(SHARED_DATA),
                 "--records", str(records), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    for side in ("dense", "pruned"):
        assert {"ppl", "em", "f1", "rouge1"} <= set(result[side])
    assert result["dense"]["ppl"] != result["pruned"]["ppl"]
    assert 0 < result["jsd"] <= math.log(2) and result["kl_dense_pruned"] > 0 and result["kl_pruned_dense"] > 0
    assert 0 <= result["flip_rate"] <= 1
    lines = [json.loads(line) for line in records.read_text().splitlines()]
    divergence = [r for r in lines if r["kind"] == "divergence"]
    tasks = [r for r in lines if r["kind"] == "task"]
    assert len(divergence) == 3 and len(tasks) == 3
    for r in divergence:
        assert len(r["input_ids"]) == len(r["scored"]) and sum(r["scored"]) == len(r["token_jsd"])
        assert r["jsd"] == pytest.approx(sum(r["token_jsd"]) / len(r["token_jsd"]), rel=1e-5)
    for r in tasks:
        assert {"id", "instruction", "input", "reference", "output_dense", "output_pruned"} <= set(r)
        assert {"em", "f1", "rouge1"} == set(r["dense"]) == set(r["pruned"])


def test_eval_rejects_bad_values(tiny_folder, pruned_folder, capsys):
    assert main(["eval", "--pruned", str(pruned_folder), "--limit", "0"]) == 2
    assert "limit 0 is not allowed" in capsys.readouterr().err
    assert main(["eval", "--pruned", str(pruned_folder), "--template", "vicuna"]) == 2
    assert "template 'vicuna' is not allowed" in capsys.readouterr().err
    assert main(["eval", "--dense", str(tiny_folder), "--pruned", str(pruned_folder), "--jsd", "wikitext2",
                 "--data-dir", str(SHARED_DATA)]) == 2
    assert "holds plain texts" in capsys.readouterr().err
