"""Models placed by accelerate (device_map="auto", some layers offloaded to CPU memory or disk) are pruned in place:
the same weights as the model pruned whole in memory, written back where accelerate loads them from, and the
model's own checkpoint is never written."""

from __future__ import annotations

import hashlib

import pytest
import torch

from compression.driver import prune_model
from compression.methods import create
from compression.residency import is_dispatched
from tests.conftest import random_windows, tiny_model


def sha256(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def dispatched(folder, offload_folder, budget: str):
    """The saved model loaded by accelerate with `budget` of CPU memory: what does not fit goes to disk."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": budget},
                                                offload_folder=str(offload_folder), dtype=torch.float32).eval()


@pytest.mark.parametrize("arch,method,order,budget", [("llama", "sparsegpt", "sequential", "600KiB"),
                                                      ("mixtral", "wanda", "reference", "750KiB"),
                                                      ("mixtral", "sparsegpt", "sequential", "400KiB")])
def test_a_model_partly_on_disk_is_pruned_as_the_whole_model_in_memory(tmp_path, arch, method, order, budget):
    """Budgets chosen so accelerate keeps the embeddings (and the first layers) in memory and the rest on disk,
    one decoder layer at a time or the whole list at once."""
    model = tiny_model(arch, layers=4)
    model.save_pretrained(tmp_path / "dense")
    before = sha256(tmp_path / "dense")
    windows = random_windows(4)
    whole = prune_model(model, windows, create(method, sparsity=0.5), order=order, batch_size=2)

    placed = dispatched(tmp_path / "dense", tmp_path / "offload", budget)
    devices = set(placed.hf_device_map.values())
    assert is_dispatched(placed) and "disk" in devices and "cpu" in devices, placed.hf_device_map
    report = prune_model(placed, windows, create(method, sparsity=0.5), order=order, batch_size=2)

    assert report.residency == "dispatched" and report.check["relative_difference"] < 1e-4
    assert [(r.name, r.sparsity) for r in report.layers] == [(r.name, r.sparsity) for r in whole.layers]
    assert report.model_sparsity == pytest.approx(whole.model_sparsity, abs=1e-9)
    assert sha256(tmp_path / "dense") == before, "the model's own checkpoint was written"
    placed.save_pretrained(tmp_path / "pruned")
    from transformers import AutoModelForCausalLM
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).state_dict()
    expected = model.state_dict()
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(saved[name] == 0, tensor == 0), name
        torch.testing.assert_close(saved[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_offload_is_refused_for_a_model_accelerate_placed(tmp_path):
    tiny_model("llama", layers=4).save_pretrained(tmp_path / "dense")
    placed = dispatched(tmp_path / "dense", tmp_path / "offload", "600KiB")
    with pytest.raises(ValueError, match="placed by accelerate .* offload does not apply"):
        prune_model(placed, random_windows(2), create("wanda", sparsity=0.5), offload=True)
