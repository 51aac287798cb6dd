"""Integration on the embedded SmolLM2-135M: real weights, real C4 and WikiText-2 text."""

from __future__ import annotations

import pytest
import torch

from backend.sources.datasets import load_source
from backend.sources.models import load
from compression.calibration import windows_from_documents
from compression.driver import prune_model
from compression.methods import create
from metrics.perplexity import perplexity
from tests.conftest import SHARED_DATA, needs_shared

pytestmark = needs_shared


@pytest.fixture(scope="module")
def texts():
    return load_source("c4", SHARED_DATA).items, load_source("wikitext2", SHARED_DATA).items


def test_embedded_model_loads_as_a_llama_with_tied_embeddings(embedded_folder):
    lm = load("smollm2-135m")
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.dtype == torch.float32
    assert lm.model.get_output_embeddings().weight is lm.model.get_input_embeddings().weight
    assert len(lm.model.model.layers) == 30 and lm.tokenizer("Hello").input_ids[0] != lm.tokenizer.bos_token_id


def test_the_conversion_parses_the_gguf_once_and_keeps_its_weights(embedded_folder):
    """The conversion (gguf_parsed_once around transformers' loaders) hands every loader one parse of the file and
    gives gguf its own reader back after; the converted weights equal gguf's own dequantization of the file's."""
    import gguf
    from safetensors.torch import load_file

    from backend.sources.models import embedded_gguf, gguf_parsed_once
    path = embedded_gguf("smollm2-135m")
    original = gguf.GGUFReader
    with gguf_parsed_once():
        reader = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is reader
    assert gguf.GGUFReader is original
    tensors = {t.name: t for t in reader.tensors}
    weights = load_file(embedded_folder / "model.safetensors")
    for gguf_name, name in (("blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight"),
                            ("blk.29.attn_v.weight", "model.layers.29.self_attn.v_proj.weight"),
                            ("token_embd.weight", "model.embed_tokens.weight")):
        t = tensors[gguf_name]
        expected = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).copy()).reshape(weights[name].shape)
        assert torch.equal(weights[name], expected.float()), name


def test_calibrated_methods_keep_perplexity_where_magnitude_loses_it(texts):
    docs, wiki = texts
    ppl = {}
    for method in ["dense", "wanda", "sparsegpt", "magnitude"]:
        lm = load("smollm2-135m")
        if method != "dense":
            windows = windows_from_documents(docs, lm.tokenizer, 4, 128, seed=0)
            report = prune_model(lm.model, windows, create(method, sparsity=0.5))
            assert abs(report.overall_sparsity - 0.5) < 1e-3 and len(report.layers) == 210
        ppl[method] = perplexity(lm.model, lm.tokenizer, wiki, 256, windows=2).ppl
    assert ppl["dense"] < ppl["wanda"] < 4 * ppl["dense"], ppl
    assert ppl["dense"] < ppl["sparsegpt"] < 4 * ppl["dense"], ppl
    assert ppl["magnitude"] > 2 * max(ppl["wanda"], ppl["sparsegpt"]), ppl


def test_owl_on_the_embedded_model_keeps_the_mean_and_the_band(texts):
    from compression.targets import Targets, owl_sparsities

    lm = load("smollm2-135m")
    windows = windows_from_documents(texts[0], lm.tokenizer, 4, 128, seed=0)
    report = prune_model(lm.model, windows, create("wanda", sparsity=0.7), targets=Targets(allocation="owl"))
    allocation = report.allocation
    goals = owl_sparsities(allocation["outlier_ratios"], allocation["layer_parameters"], 0.7, 0.08)
    assert allocation["layer_targets"] == pytest.approx(goals) and max(goals) - min(goals) > 0.05
    assert abs(report.pruned_sparsity - 0.7) < 1e-3 and len(report.layers) == 210
    for layer in range(30):
        rows = [r for r in report.layers if r.layer == layer]
        reached = sum(r.sparsity * r.shape[0] * r.shape[1] for r in rows) / sum(r.shape[0] * r.shape[1] for r in rows)
        assert 0.7 - 0.08 - 1e-3 <= reached <= 0.7 + 0.08 and abs(reached - goals[layer]) < 1 / 576, layer
