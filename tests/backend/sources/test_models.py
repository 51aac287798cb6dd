"""Model loading: device/dtype choice, memory refusal before loading, clear errors for bad names."""

from __future__ import annotations

import json

import pytest
import torch

from backend.sources.models import (
    ModelError,
    check_fits,
    pick_device,
    pick_dtype,
    resolve,
)
from compression.memory import dimensions
from tests.conftest import tiny_model


def write_config(folder, **overrides):
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192,
              "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
              "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 4096,
              "tie_word_embeddings": False, **overrides}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_parameter_estimate_matches_a_real_model(tiny_folder):
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(tiny_folder)
    real = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters() if p.dim() > 1)
    assert dimensions(config).parameters == pytest.approx(real, rel=0.01)


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_parameter_estimate_counts_every_expert(arch):
    model = tiny_model(arch)
    real = sum(p.numel() for p in model.parameters() if p.dim() > 1)
    assert dimensions(model.config).parameters == pytest.approx(real, rel=0.02)


def test_a_model_that_cannot_fit_is_refused_before_loading(tmp_path):
    folder = write_config(tmp_path)
    with pytest.raises(ModelError, match=r"needs about \d+\.\d GiB in float32 but only .* GiB is free on cpu"):
        check_fits(str(folder), torch.float32, torch.device("cpu"))


def test_defaults_on_this_machine():
    device = pick_device("auto")
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_bad_names_are_clear(tmp_path):
    with pytest.raises(ModelError, match="unknown dtype 'float8'"):
        pick_dtype("float8", torch.device("cpu"))
    with pytest.raises(ModelError, match="unknown device 'gpu0'"):
        pick_device("gpu0")
    with pytest.raises(ModelError, match="not found"):
        resolve(str(tmp_path / "missing"))
    assert resolve("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"
