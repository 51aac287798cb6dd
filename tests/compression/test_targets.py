"""Non-uniform sparsity: OWL's allocation, full-name include/exclude, explicit per-layer sparsities and RIA,
checked against direct computations on the dense model's own forward pass."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from compression.driver import outlier_ratio, prune_model
from compression.layers import decoder_layers, linear_modules, weight_matrix
from compression.methods import create
from compression.methods.ria import ria_score
from compression.patterns import Pattern
from compression.targets import Targets, owl_sparsities, parse_layer_sparsity
from tests.compression.test_pruning import capture_inputs, pruned_weights
from tests.conftest import random_windows, tiny_model


def deep_llama(layers: int = 6):
    """A tiny Llama with enough decoder layers for an allocation to have a shape."""
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # layers of different character, so their outlier ratios differ
        for i, layer in enumerate(model.model.layers):
            for m in linear_modules(layer).values():
                m.weight.mul_(torch.empty_like(m.weight).exponential_(1.0 + i) ** (i % 3))
    return model


def layer_sparsity(model) -> list[float]:
    _, layers = decoder_layers(model)
    out = []
    for layer in layers:
        ws = [weight_matrix(m) for m in linear_modules(layer).values()]
        out.append(sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws))
    return out


def test_outlier_ratio_counts_scores_above_m_times_the_mean_over_every_matrix():
    scores = [torch.tensor([[1.0, 1.0], [1.0, 13.0]]), torch.tensor([[1.0, 1.0, 6.0, 0.0]])]
    # mean = 24 / 8 = 3; above 2 x 3 = 6: only the 13 (6 itself is not above)
    assert outlier_ratio(scores, 2.0) == 1 / 8
    assert outlier_ratio(scores, 1.0) == 2 / 8


def test_owl_allocation_is_the_formula_with_the_mean_and_the_band_kept():
    ratios, sizes = [0.01, 0.03, 0.02, 0.05, 0.015], [10, 10, 20, 5, 15]
    s, lam = 0.7, 0.08
    got = owl_sparsities(ratios, sizes, s, lam)
    mean = sum(r * n for r, n in zip(ratios, sizes)) / sum(sizes)
    spread = max(abs(r - mean) for r in ratios)
    assert got == pytest.approx([s - lam * (r - mean) / spread for r in ratios], abs=1e-12)
    assert sum(g * n for g, n in zip(got, sizes)) / sum(sizes) == pytest.approx(s, abs=1e-12)
    assert all(s - lam - 1e-12 <= g <= s + lam + 1e-12 for g in got)
    assert max(abs(g - s) for g in got) == pytest.approx(lam)
    assert got[3] == min(got) and got[0] == max(got)  # most outliers, least pruned
    # symmetric ratios, equal sizes: OWL's own min-max to [0, 2 lambda] then mean shift, exactly
    sym = [0.01, 0.02, 0.03, 0.04]
    normalised = [(r - min(sym)) / (max(sym) - min(sym)) * 2 * lam for r in sym]
    density = [d - sum(normalised) / 4 + (1 - s) for d in normalised]
    assert owl_sparsities(sym, [1] * 4, s, lam) == pytest.approx([1 - d for d in density], abs=1e-12)
    assert owl_sparsities([0.02] * 3, [1, 2, 3], s, lam) == [s] * 3


def dense_outlier_ratios(model, windows, m: float) -> list[float]:
    """Oracle: each layer's ratio from the inputs its Linears see in the dense model's own forward pass."""
    prefix, layers = decoder_layers(model)
    ratios = []
    for i, layer in enumerate(layers):
        scores = []
        for name, module in linear_modules(layer).items():
            x = capture_inputs(model, f"{prefix}.{i}.{name}", windows)
            scores.append(module.weight.detach().abs() * x.square().sum(0).sqrt())
        ratios.append(outlier_ratio(scores, m))
    return ratios


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_owl_prunes_each_layer_to_its_allocation_from_the_dense_models_outliers(method):
    model, windows, s, lam = deep_llama(), random_windows(), 0.6, 0.08
    expected_ratios = dense_outlier_ratios(model, windows, 5.0)
    report = prune_model(model, windows, create(method, sparsity=s), targets=Targets(allocation="owl"))
    assert report.allocation["outlier_ratios"] == pytest.approx(expected_ratios, rel=1e-5)
    sizes = report.allocation["layer_parameters"]
    targets = owl_sparsities(expected_ratios, sizes, s, lam)
    assert report.allocation["layer_targets"] == pytest.approx(targets, abs=1e-6)
    assert len(set(round(t, 6) for t in targets)) > 2
    assert sum(t * n for t, n in zip(targets, sizes)) / sum(sizes) == pytest.approx(s, abs=1e-9)
    assert all(s - lam - 1e-9 <= t <= s + lam + 1e-9 for t in targets)
    # each row (Wanda) or matrix (SparseGPT, magnitude) rounds its count of zeros down, by less than 1 / 64 here
    achieved = layer_sparsity(model)
    assert all(t - 1 / 64 <= a <= t + 1e-9 for a, t in zip(achieved, targets)), (achieved, targets)
    assert all(r.target == pytest.approx(targets[r.layer]) for r in report.layers)
    assert "allocation pass" in report.stages


def test_owl_on_experts_counts_every_experts_slice():
    model = tiny_model("mixtral")
    report = prune_model(model, random_windows(), create("wanda", sparsity=0.5), targets=Targets(allocation="owl"))
    assert len(report.allocation["outlier_ratios"]) == 2
    assert sum(report.allocation["layer_parameters"]) == sum(r.shape[0] * r.shape[1] for r in report.layers)


def test_full_name_include_exclude_prune_exactly_the_named_matrices():
    model = deep_llama(4)
    dense = pruned_weights(model)
    targets = Targets(include=("model.layers.[0-1].*", "*.mlp.down_proj"), exclude=("model.layers.1.self_attn.*",))
    report = prune_model(model, random_windows(), create("wanda", sparsity=0.5), targets=targets)
    pruned = {n for n, w in pruned_weights(model).items() if not torch.equal(w, dense[n])}
    expected = ({f"model.layers.0.{n}" for n in linear_modules(model.model.layers[0])}
                | {"model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj",
                   "model.layers.2.mlp.down_proj", "model.layers.3.mlp.down_proj"})
    assert pruned == expected == {r.name for r in report.layers}
    assert {k["name"] for k in report.kept} == set(dense) - expected
    # the names inside a layer still work as before
    model = deep_llama(4)
    report = prune_model(model, random_windows(), create("wanda", sparsity=0.5), targets=Targets(include=("mlp.*",)))
    assert {r.module for r in report.layers} == {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "ria", "magnitude"])
def test_explicit_per_layer_sparsities_are_pruned_exactly(method):
    model = deep_llama(4)
    goals = (0.2, 0.0, 0.55, 0.7)
    report = prune_model(model, random_windows(), create(method, sparsity=0.5), targets=Targets(layers=goals))
    for name, w in pruned_weights(model).items():
        goal = goals[int(name.split(".")[2])]
        zeros = int((w == 0).sum())
        if method in ("wanda", "ria"):
            assert zeros == w.shape[0] * int(w.shape[1] * goal), name
        else:
            assert zeros == int(w.numel() * goal) or (method == "sparsegpt" and goal and
                                                      abs(zeros - w.numel() * goal) <= w.shape[0]), name
    assert [r.target for r in report.layers if r.layer == 2] == [0.55] * 7
    assert report.allocation["layer_targets"] == pytest.approx(list(goals))


def test_a_json_file_of_patterns_sets_per_matrix_sparsities(tmp_path):
    path = tmp_path / "targets.json"
    path.write_text(json.dumps({"*.mlp.down_proj": 0.3, "model.layers.0.self_attn.*": 0.6}))
    layers, patterns = parse_layer_sparsity(str(path))
    assert layers == () and patterns == (("*.mlp.down_proj", 0.3), ("model.layers.0.self_attn.*", 0.6))
    model = deep_llama(2)
    prune_model(model, random_windows(), create("wanda", sparsity=0.5), targets=Targets(patterns=patterns))
    for name, w in pruned_weights(model).items():
        goal = 0.3 if name.endswith("down_proj") else 0.6 if name.startswith("model.layers.0.self_attn") else 0.5
        assert int((w == 0).sum()) == w.shape[0] * int(w.shape[1] * goal), name


def test_contradictory_or_bad_targets_are_refused_by_name(tmp_path):
    model = deep_llama(2)
    wanda = create("wanda", sparsity=0.5)
    with pytest.raises(ValueError, match="gives 3 sparsities but the model has 2 decoder layers"):
        prune_model(model, random_windows(), wanda, targets=Targets(layers=(0.5, 0.5, 0.5)))
    clash = Targets(patterns=(("*.mlp.*", 0.3), ("*.down_proj", 0.4)))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj is named by several"):
        prune_model(model, random_windows(), wanda, targets=clash)
    with pytest.raises(ValueError, match=r"pattern\(s\) \*\.mlp\.dwn_proj name no pruned matrix"):
        prune_model(model, random_windows(), wanda, targets=Targets(patterns=(("*.mlp.dwn_proj", 0.3),)))
    two_four = create("wanda", sparsity=0.5, pattern=Pattern(2, 4))
    with pytest.raises(ValueError, match="N:M pattern fixes every matrix"):
        prune_model(model, random_windows(), two_four, targets=Targets(allocation="owl"))
    with pytest.raises(ValueError, match="allocation 'ow' is not allowed: use one of uniform, owl"):
        Targets(allocation="ow").check(0.5, False)
    with pytest.raises(ValueError, match="give one of them"):
        Targets(allocation="owl", layers=(0.5, 0.5)).check(0.5, False)
    with pytest.raises(ValueError, match="owl-lambda 0.3 with sparsity 0.8"):
        Targets(allocation="owl", owl_lambda=0.3).check(0.8, False)
    with pytest.raises(ValueError, match="layer-sparsity of decoder layer 1 1.2 is not allowed"):
        parse_layer_sparsity("0.5,1.2")
    with pytest.raises(ValueError, match="neither a comma-separated list"):
        parse_layer_sparsity("0.5;0.6")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        parse_layer_sparsity(str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        parse_layer_sparsity(str(tmp_path / "missing.json"))
    assert all(torch.count_nonzero(w) == w.numel() for w in pruned_weights(model).values())


@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4)])
@pytest.mark.parametrize("order", ["sequential", "reference"])
def test_ria_mask_is_the_direct_computation_of_its_score(pattern, order):
    model = tiny_model("llama")
    windows = random_windows()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    if order == "reference":  # sequential: the MLP sees the pruned attention's outputs, not the dense model's
        names += ["model.layers.0.mlp.gate_proj"]
    expected = {}
    for name in names:
        x = capture_inputs(model, name, windows).double()
        w = dict(model.named_modules())[name].weight.detach().double()
        a = w.abs()
        score = (a / a.sum(1, keepdim=True) + a / a.sum(0, keepdim=True)) * x.square().sum(0).sqrt() ** 0.5
        if pattern.structured:
            groups = score.reshape(score.shape[0], -1, 4).sort(dim=-1, stable=True).indices[..., :2]
            mask = torch.zeros_like(score.reshape(score.shape[0], -1, 4), dtype=torch.bool).scatter_(-1, groups, True)
            expected[name] = mask.reshape(score.shape)
        else:
            k = int(w.shape[1] * 0.5)
            expected[name] = torch.zeros_like(w, dtype=torch.bool).scatter_(
                1, score.sort(dim=1, stable=True).indices[:, :k], True)
    prune_model(model, windows, create("ria", sparsity=0.5, pattern=pattern), order=order)
    for name, mask in expected.items():
        assert torch.equal(dict(model.named_modules())[name].weight == 0, mask), name


def test_ria_score_and_its_exponent():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.0]])
    sq = torch.tensor([4.0, 16.0])
    expected = torch.tensor([[1 / 3 + 1 / 4, 2 / 3 + 2 / 2], [3 / 3 + 3 / 4, 0.0]]) * torch.tensor([2.0, 4.0]) ** 0.5
    assert torch.allclose(ria_score(w, sq, 0.5), expected)
    with pytest.raises(ValueError, match="exponent a -1"):
        create("ria", sparsity=0.5, a=-1)


def test_owl_allocation_is_the_same_in_both_orders_and_with_offload():
    """It depends on the dense model alone: neither the pruning order nor offloading may change it."""
    model, windows = deep_llama(), random_windows()
    found = []
    for order, offload in (("sequential", False), ("reference", False), ("sequential", True)):
        report = prune_model(copy.deepcopy(model), windows, create("wanda", sparsity=0.6), order=order, offload=offload,
                             device=torch.device("cpu"), targets=Targets(allocation="owl"))
        found.append((report.allocation["outlier_ratios"], report.allocation["layer_targets"]))
    assert found[0] == found[1] == found[2]
