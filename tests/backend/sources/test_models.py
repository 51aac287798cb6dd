"""Model loading: device/dtype choice, memory refusal before loading, clear errors for bad names."""

from __future__ import annotations

import json

import pytest
import torch

from backend.sources.models import (
    ModelError,
    check_fits,
    load,
    parse_max_memory,
    pick_device,
    pick_dtype,
    plan_placement,
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


def test_a_model_that_cannot_fit_is_refused_before_loading_when_placed_whole(tmp_path):
    """A 70B config (~280 GiB in float32): asked on the device whole, it is refused with the numbers; left to the
    estimate, accelerate's device_map is chosen and the reason says why."""
    folder = write_config(tmp_path)
    with pytest.raises(ModelError, match=r"needs about \d+\.\d GiB in float32 but only .* GiB is free on cpu; .*"
                                         r"--device-map auto"):
        check_fits(str(folder), torch.float32, torch.device("cpu"), asked="device")
    plan = check_fits(str(folder), torch.float32, torch.device("cpu"))
    assert plan.mode == "device-map" and "it does not fit cpu" in plan.reason and "then disk" in plan.reason
    assert 290 * GIB < plan.need < 330 * GIB  # LLaMA-2-70B's 69B parameters x 4 bytes x 1.2 headroom


GIB = 1024 ** 3


@pytest.mark.parametrize("asked,need,device_free,cpu_free,mode,says", [
    ("auto", 14 * GIB, 70 * GIB, 100 * GIB, "device", "loaded whole on cuda:0"),
    ("auto", 140 * GIB, 70 * GIB, 100 * GIB, "device-map", "it does not fit cuda:0 (70.0 GiB free): accelerate's "
                                                           "device_map places its layers on cuda:0, then CPU memory"),
    ("auto", 280 * GIB, 70 * GIB, 100 * GIB, "device-map", "on cuda:0, then CPU memory, then disk"),
    ("offload", 28 * GIB, 20 * GIB, 100 * GIB, "offload", "each decoder layer visits cuda:0 while it is pruned"),
    ("device-map", 14 * GIB, 70 * GIB, 100 * GIB, "device-map", "asked for"),
])
def test_the_estimate_names_the_mode_and_why(asked, need, device_free, cpu_free, mode, says):
    plan = plan_placement(need, torch.device("cuda:0"), device_free, cpu_free, asked, "bfloat16", "model m")
    assert plan.mode == mode and says in plan.reason and plan.reason.startswith(f"model m needs about "
                                                                                 f"{need / GIB:.1f} GiB in bfloat16")


def test_explicit_placements_that_cannot_hold_the_model_are_refused():
    with pytest.raises(ModelError, match="only 20.0 GiB of CPU memory is free to hold it for --offload"):
        plan_placement(28 * GIB, torch.device("cuda:0"), 20 * GIB, 20 * GIB, "offload")
    with pytest.raises(ModelError, match="unknown placement 'gpu': use auto, device, offload, device-map"):
        plan_placement(GIB, torch.device("cpu"), GIB, GIB, "gpu")


def test_max_memory_is_read_as_accelerate_takes_it_and_bad_parts_are_named():
    assert parse_max_memory("cuda:0=20GiB, cpu=64GiB") == {0: "20GiB", "cpu": "64GiB"}
    assert parse_max_memory(None) is None
    with pytest.raises(ModelError, match="--max-memory 'gpu=2GiB': the device must be cpu or cuda:N"):
        parse_max_memory("gpu=2GiB")
    with pytest.raises(ModelError, match="--max-memory 'cpu=lots': 'lots' is not a size"):
        parse_max_memory("cpu=lots")


def test_a_capped_device_map_puts_layers_on_disk_in_a_folder_removed_with_the_model(tmp_path, monkeypatch, tokenizer):
    import gc
    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache"))
    tiny_model("llama", layers=4).save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    lm = load(str(tmp_path / "dense"), "cpu", "float32", max_memory={"cpu": "600KiB"})
    assert lm.placement.mode == "device-map" and set(lm.model.hf_device_map.values()) == {"cpu", "disk"}
    folders = list((tmp_path / "cache" / "offload").iterdir())
    assert len(folders) == 1
    del lm
    gc.collect()
    assert not folders[0].exists()


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


def test_a_model_mostly_on_disk_evaluates_as_the_same_model_in_memory(tmp_path, monkeypatch, tokenizer):
    """Perplexity, teacher-forced divergences and greedy answers of a model accelerate keeps mostly on disk equal
    those of the same model loaded whole: the metrics run through accelerate's hooks unchanged."""
    from backend.runs.evaluate import evaluate
    from backend.runs.spec import EvalSettings
    monkeypatch.setenv("PRUNESCOPE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    tiny_model("llama", vocab=len(tokenizer), layers=4, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    dense = load(str(folder), "cpu", "float32")
    settings = EvalSettings(ppl="demo-prose", ppl_seqlen=64, ppl_windows=2, jsd="demo", tasks="demo", limit=4,
                            max_new_tokens=4)
    whole, records = evaluate(dense, load(str(folder), "cpu", "float32"), settings)
    placed = load(str(folder), "cpu", "float32", max_memory={"cpu": "13MB"})
    assert "disk" in set(placed.model.hf_device_map.values())
    on_disk, placed_records = evaluate(dense, placed, settings)
    for side in ("dense", "pruned"):
        for metric in ("ppl", "em", "f1", "rouge1"):
            assert on_disk[side][metric] == pytest.approx(whole[side][metric], rel=1e-6), (side, metric)
    for metric in ("jsd", "kl_dense_pruned", "flip_rate", "answer_jsd"):
        assert on_disk[metric] == pytest.approx(whole[metric], abs=1e-9), metric
    answers = lambda rows: [r["pruned_tokens"] for r in rows if r["kind"] == "task"]
    assert answers(placed_records) == answers(records) and any(answers(records))
