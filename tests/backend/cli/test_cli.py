"""The command line: bad input gets one clear line and a non-zero exit; good input prunes, saves and reloads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from backend.runs.export import read_sidecar
from tests.conftest import ROOT, SHARED_DATA, error_line, needs_shared, run_cli


@pytest.mark.parametrize("extra,expected", [
    (["--sparsity", "1.0"], "sparsity 1.0 is not allowed: use a fraction in [0, 1)"),
    (["--sparsity", "-0.2"], "sparsity -0.2 is not allowed"),
    (["--sparsity", "half"], "sparsity 'half' is not a number"),
    (["--sparsity", "0.5", "--pattern", "4:2"], "pattern '4:2' is not allowed: N:M needs 0 < N < M"),
    (["--sparsity", "0.5", "--pattern", "2:2"], "pattern '2:2' is not allowed"),
    (["--sparsity", "0.5", "--method", "obs"],
     "method 'obs' is not known: use one of magnitude, wanda, sparsegpt, ria"),
    (["--sparsity", "0.5", "--calibration", "c5"], "'c5'"),
    (["--sparsity", "0.5", "--order", "fast"], "order 'fast' is not allowed"),
])
def test_bad_prune_arguments_fail_before_any_model_loads(extra, expected, capsys, tmp_path):
    args = ["prune", "--method", "wanda", "--save", str(tmp_path / "out"), "--data-dir", str(tmp_path)]
    if "--method" in extra:
        args = ["prune", "--save", str(tmp_path / "out")]
    code, _, err = run_cli(args + extra, capsys)
    assert code == 2
    assert expected in error_line(err)


def test_source_missing_offline(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = run_cli(["prune", "--method", "wanda", "--sparsity", "0.5", "--calibration", "alpaca",
                            "--data-dir", str(tmp_path), "--save", str(tmp_path / "o")], capsys)
    assert code == 2 and "'alpaca' is not available offline" in error_line(err)


def test_empty_file(capsys, tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    code, _, err = run_cli(["prune", "--method", "wanda", "--sparsity", "0.5", "--calibration",
                            str(tmp_path / "empty.jsonl"), "--save", str(tmp_path / "o")], capsys)
    assert code == 2 and "empty" in error_line(err)


@needs_shared
def test_seqlen_beyond_context(capsys, tmp_path, tiny_folder):
    code, _, err = run_cli(["prune", "--model", str(tiny_folder), "--method", "wanda", "--sparsity", "0.5",
                            "--seqlen", "512", "--data-dir", str(SHARED_DATA), "--save", str(tmp_path / "o")], capsys)
    assert code == 2 and "seqlen 512 is beyond the model's context of 128" in error_line(err)
    code, _, err = run_cli(["ppl", "--model", str(tiny_folder), "--seqlen", "4096", "--data-dir", str(SHARED_DATA)],
                           capsys)
    assert code == 2 and "seqlen 4096 is beyond" in error_line(err)


def test_unknown_model_folder(capsys, tmp_path):
    (tmp_path / "text.txt").write_text("Some text to score.\n")
    code, _, err = run_cli(["ppl", "--model", str(tmp_path), "--data", str(tmp_path / "text.txt")], capsys)
    assert code == 2 and "has no config.json" in error_line(err)


@needs_shared
def test_prune_save_reload_and_ppl_through_the_real_entry_point(tmp_path, tiny_folder):
    save = tmp_path / "pruned"
    cmd = [sys.executable, "-m", "backend", "prune", "--model", str(tiny_folder), "--method", "sparsegpt",
           "--sparsity", "0.5", "--pattern", "2:4", "--calibration", "alpaca", "--nsamples", "4", "--seqlen", "64",
           "--data-dir", str(SHARED_DATA), "--save", str(save), "--json"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {"seconds", "peak_rss_mb", "save_path", "layers", "stages"} <= set(result)
    assert len(result["layers"]) == 14 and all(l["sparsity"] == 0.5 for l in result["layers"])
    assert set(result["layers"][0]) >= {"name", "sparsity", "rel_error", "seconds"}
    assert read_sidecar(save)["spec"]["method"] == "sparsegpt"
    origin = read_sidecar(save)["spec"]["provenance"]
    assert origin["device_type"] == "cpu" and origin["dtype"] == "float32" and origin["code"].startswith("0.")
    from transformers import AutoModelForCausalLM
    reloaded = AutoModelForCausalLM.from_pretrained(save)
    w = reloaded.model.layers[1].mlp.down_proj.weight
    assert ((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all()
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight

    ppl = subprocess.run([sys.executable, "-m", "backend", "ppl", "--model", str(save), "--data", "wikitext2",
                          "--seqlen", "64", "--windows", "3", "--data-dir", str(SHARED_DATA), "--json"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ppl.returncode == 0, ppl.stderr
    numbers = json.loads(ppl.stdout)
    assert numbers["windows"] == 3 and numbers["seqlen"] == 64 and numbers["scored_tokens"] == 3 * 63
    assert torch.isfinite(torch.tensor(numbers["ppl"]))

    table = subprocess.run(cmd[:-1] + ["--save", str(tmp_path / "again")], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert table.returncode == 0 and "sparsity 0.5000 over every matrix in the decoder layers" in table.stdout
