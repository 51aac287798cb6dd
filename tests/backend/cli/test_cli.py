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
    (["--sparsity", "0.5", "--device-map", "balanced"], "device_map 'balanced' is not allowed: use auto"),
    (["--sparsity", "0.5", "--offload", "--device-map", "auto"], "offload and device_map/max_memory are two ways to place the model"),
    (["--sparsity", "0.5", "--max-memory", "cpu=8GiB"], "max_memory caps accelerate's placement: give it with device_map='auto'"),
    (["--sparsity", "0.5", "--device-map", "auto", "--max-memory", "cpu=8 bytes-ish"], "--max-memory 'cpu=8 bytes-ish': '8 bytes-ish' is "
                                                                  "not a size"),
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
def test_prune_save_reload_and_ppl_through_the_real_entry_point(tmp_path, tiny_folder, capsys):
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

    code, out, _ = run_cli(cmd[3:-3] + ["--save", str(tmp_path / "again")], capsys)  # without --json: the table
    assert code == 0 and "sparsity 0.5000 over every matrix in the decoder layers" in out


def test_prune_with_layers_on_disk_saves_the_weights_of_the_prune_in_memory(tmp_path, tokenizer, monkeypatch, capsys):
    """--device-map auto with a CPU cap that sends most decoder layers to disk: the saved model equals the one
    pruned whole in memory; the output names the placement; accelerate's offload folder (PruneScope's) is gone
    after, and the dense folder is unchanged."""
    import hashlib

    from safetensors.torch import load_file

    from tests.conftest import tiny_model
    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache"))
    dense = tmp_path / "dense"
    tiny_model("llama", vocab=len(tokenizer), layers=4).save_pretrained(dense)
    tokenizer.save_pretrained(dense)
    digest = hashlib.sha256((dense / "model.safetensors").read_bytes()).hexdigest()
    common = ["prune", "--model", str(dense), "--method", "sparsegpt", "--sparsity", "0.5", "--calibration", "demo",
              "--nsamples", "4", "--seqlen", "64", "--json"]
    results = {}
    for name, extra in (("whole", []), ("placed", ["--device-map", "auto", "--max-memory", "cpu=13MB"])):
        code, out, err = run_cli(common + ["--save", str(tmp_path / name)] + extra, capsys)
        assert code == 0, err
        results[name] = json.loads(out)
    assert results["whole"]["placement"]["mode"] == "device"
    placed = results["placed"]["placement"]
    assert placed["mode"] == "device-map" and "within cpu=13MB" in placed["reason"] and "on disk" in placed["reason"]
    assert results["placed"]["check"]["relative_difference"] < 1e-5
    whole, saved = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "placed" /
                                                                                   "model.safetensors")
    assert whole.keys() == saved.keys()
    for key in whole:
        torch.testing.assert_close(saved[key], whole[key], rtol=1e-5, atol=1e-6, msg=key)
        assert torch.equal(saved[key] == 0, whole[key] == 0), key
    import gc
    gc.collect()  # the pruned model of the in-process CLI call is gone (a CLI process removes it at exit)
    assert list((tmp_path / "cache" / "offload").iterdir()) == []
    assert hashlib.sha256((dense / "model.safetensors").read_bytes()).hexdigest() == digest
