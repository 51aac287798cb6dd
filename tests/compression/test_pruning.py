"""The layer-wise driver and the three methods on tiny random-init models of real architectures."""

from __future__ import annotations

import copy

import pytest
import torch

from compression.driver import prune_model
from compression.layers import decoder_layers, linear_modules, weight_matrix
from compression.methods import create
from compression.patterns import Pattern
from compression.targets import Targets
from tests.conftest import TINY, random_windows, tiny_model

METHODS = ["magnitude", "wanda", "sparsegpt", "ria"]


def pruned_weights(model) -> dict[str, torch.Tensor]:
    prefix, layers = decoder_layers(model)
    return {f"{prefix}.{i}.{n}": weight_matrix(m).clone() for i, layer in enumerate(layers)
            for n, m in linear_modules(layer).items()}


def capture_inputs(model, module_name: str, windows: torch.Tensor) -> torch.Tensor:
    """The [tokens, in] inputs a module sees when the model runs on the windows."""
    seen = []
    module = dict(model.named_modules())[module_name]
    handle = module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, args[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    return torch.cat(seen)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_exact_sparsity_for_every_pattern(method, pattern):
    model = tiny_model("llama")
    pat = Pattern() if pattern == "unstructured" else Pattern(*map(int, pattern.split(":")))
    report = prune_model(model, random_windows(), create(method, sparsity=0.5, pattern=pat))
    weights = pruned_weights(model)
    assert len(report.layers) == len(weights) == 14
    for name, w in weights.items():
        zeros = w == 0
        if pat.structured:
            assert (zeros.reshape(w.shape[0], -1, pat.m).sum(-1) == pat.n).all(), name
        elif method in ("wanda", "ria"):
            assert (zeros.sum(1) == w.shape[1] // 2).all(), name
        else:
            assert zeros.sum() == w.numel() // 2, name
    assert all(r.sparsity == 0.5 for r in report.layers)


def test_magnitude_per_matrix_and_per_row():
    model = tiny_model("llama")
    dense = pruned_weights(model)
    prune_model(model, random_windows(), create("magnitude", sparsity=0.3))
    for name, w in pruned_weights(model).items():
        expected = dense[name].abs().flatten().sort(stable=True).indices[: int(w.numel() * 0.3)]
        assert torch.equal((w.flatten() == 0).nonzero().flatten().sort().values, expected.sort().values), name
    model = tiny_model("llama")
    prune_model(model, random_windows(), create("magnitude", sparsity=0.3, per_row=True))
    for w in pruned_weights(model).values():
        assert ((w == 0).sum(1) == int(w.shape[1] * 0.3)).all()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_architectures_prune_end_to_end_and_leave_embeddings_alone(arch, method):
    model = tiny_model(arch)
    embeddings = model.get_input_embeddings().weight.clone()
    head = model.get_output_embeddings().weight.clone()
    windows = random_windows()
    with torch.no_grad():
        dense_logits = model(input_ids=windows).logits
    report = prune_model(model, windows, create(method, sparsity=0.5))
    assert report.layers and abs(report.overall_sparsity - 0.5) < 0.01
    assert torch.equal(model.get_input_embeddings().weight, embeddings)
    assert torch.equal(model.get_output_embeddings().weight, head)
    with torch.no_grad():
        logits = model(input_ids=windows).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, dense_logits)
    assert all(0 <= r.rel_error < 1.5 for r in report.layers)


def test_tied_embeddings_stay_tied():
    model = tiny_model("llama")
    prune_model(model, random_windows(), create("sparsegpt", sparsity=0.5))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("order", ["sequential", "reference"])
def test_wanda_mask_is_the_direct_ranking_of_captured_inputs(order):
    model = tiny_model("llama")
    windows = random_windows()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
    if order == "reference":
        names += ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    expected = {}
    for name in names:
        x = capture_inputs(model, name, windows)
        w = dict(model.named_modules())[name].weight
        score = w.abs() * x.square().sum(0).sqrt()
        k = int(w.shape[1] * 0.5)
        expected[name] = torch.zeros_like(w, dtype=torch.bool).scatter_(
            1, score.sort(dim=1, stable=True).indices[:, :k], True)
    prune_model(model, windows, create("wanda", sparsity=0.5), order=order)
    for name, mask in expected.items():
        assert torch.equal(dict(model.named_modules())[name].weight == 0, mask), name


def test_sparsegpt_reconstructs_better_than_wanda_and_magnitude():
    model = tiny_model("llama")
    windows = random_windows(16, 64)
    errors = {}
    for method in METHODS:
        layer = copy.deepcopy(model.model.layers[0].mlp.down_proj)
        x = capture_inputs(model, "model.layers.0.mlp.down_proj", windows)
        m = create(method, sparsity=0.5)
        stats = m.statistics(x.shape[1], x.device) if m.needs_calibration else None
        if stats is not None:
            stats.add(x)
        with torch.no_grad():
            dense = x @ layer.weight.t()
            m.prune([layer.weight.data], stats)
            errors[method] = float((dense - x @ layer.weight.t()).square().sum() / dense.square().sum())
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["magnitude"], errors


def test_sparsegpt_updates_the_remaining_weights():
    model = tiny_model("llama")
    before = model.model.layers[0].self_attn.q_proj.weight.clone()
    prune_model(model, random_windows(), create("sparsegpt", sparsity=0.5))
    after = model.model.layers[0].self_attn.q_proj.weight
    kept = after != 0
    assert not torch.allclose(after[kept], before[kept])


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_masks(method):
    masks = []
    for _ in range(2):
        model = tiny_model("llama")
        prune_model(model, random_windows(seed=5), create(method, sparsity=0.5))
        masks.append({k: v == 0 for k, v in pruned_weights(model).items()})
    assert all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_sequential_order_gives_the_same_result_in_one_pass_or_in_mini_batches(method):
    one, many = tiny_model("llama"), tiny_model("llama")
    windows = random_windows()
    prune_model(one, windows, create(method, sparsity=0.5), batch_size=8)
    report = prune_model(many, windows, create(method, sparsity=0.5), batch_size=3)
    assert report.batch_size == 3
    for (name, a), b in zip(pruned_weights(one).items(), pruned_weights(many).values()):
        # batch shapes change float rounding, which may flip a near-tie: allow a handful of entries
        assert ((a == 0) != (b == 0)).float().mean() < 0.01, name
        assert (a - b).norm() / a.norm() < 0.02, name


def test_reference_and_sequential_orders_differ_after_the_first_group():
    seq, ref = tiny_model("llama"), tiny_model("llama")
    windows = random_windows()
    prune_model(seq, windows, create("wanda", sparsity=0.5), order="sequential")
    prune_model(ref, windows, create("wanda", sparsity=0.5), order="reference", batch_size=2)
    a, b = pruned_weights(seq), pruned_weights(ref)
    assert torch.equal(a["model.layers.0.self_attn.q_proj"], b["model.layers.0.self_attn.q_proj"])
    assert not torch.equal(a["model.layers.0.self_attn.o_proj"] == 0, b["model.layers.0.self_attn.o_proj"] == 0)


def test_include_exclude_and_offload():
    model = tiny_model("llama")
    report = prune_model(model, random_windows(), create("wanda", sparsity=0.5),
                         targets=Targets(include=("mlp.*",), exclude=("mlp.down_proj",)), offload=True,
                         device=torch.device("cpu"))
    assert sorted({r.module for r in report.layers}) == ["mlp.gate_proj", "mlp.up_proj"]
    assert (model.model.layers[0].self_attn.q_proj.weight != 0).all()


def test_progress_reports_every_layer_and_module():
    events = []
    prune_model(tiny_model("llama"), random_windows(), create("wanda", sparsity=0.5), progress=events.append)
    layers = [e for e in events if e.stage == "layer"]
    assert [(e.layer, e.layers) for e in layers] == [(1, 2), (2, 2)]
    assert len([e for e in events if e.stage == "module"]) == 14


def test_report_has_stages_and_error_sample():
    report = prune_model(tiny_model("llama"), random_windows(), create("sparsegpt", sparsity=0.5), error_tokens=64)
    assert {"capture", "statistics", "pruning", "propagation"} <= set(report.stages)
    assert report.error_tokens == 64 and report.peak_rss_mb > 0
    assert all(r.tokens == 8 * 32 for r in report.layers)


def test_every_catalog_name_builds_the_method_of_that_name():
    from compression.methods import METHOD_NAMES, method_class
    assert METHOD_NAMES == tuple(METHODS)
    for name in METHOD_NAMES:
        assert method_class(name).name == name and create(name, sparsity=0.5).sparsity == 0.5


def test_bad_arguments():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="order 'fast'"):
        prune_model(model, random_windows(), create("wanda", sparsity=0.5), order="fast")
    with pytest.raises(ValueError, match="method 'obs' is not known"):
        create("obs")
    with pytest.raises(ValueError, match="calibration must be"):
        prune_model(model, torch.zeros(0, 4, dtype=torch.long), create("wanda", sparsity=0.5))


@pytest.mark.parametrize("arch,expected", [
    ("llama", [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
               ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]),
    ("gpt2", [["attn.c_attn"], ["attn.c_proj"], ["mlp.c_fc"], ["mlp.c_proj"]]),
])
def test_linears_reading_the_same_input_are_grouped_in_call_order(arch, expected):
    from compression.driver import input_groups
    from compression.layers import capture_layer_inputs
    model = tiny_model(arch)
    _, layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, layers, [random_windows(2)], torch.device("cpu"))
    for i, layer in enumerate(layers):
        groups = input_groups(layer, linear_modules(layer), inputs.hidden[0], inputs.args[i][0], inputs.kwargs[i][0])
        assert groups == expected


def textbook_sparsegpt(w: torch.Tensor, hinv: torch.Tensor, sparsity: float, pattern: Pattern, bs: int = 128):
    """The published one-level column loop in [out, in] layout, written plainly, as an oracle."""
    from compression.masks import lowest
    w = w.clone()
    for i1 in range(0, w.shape[1], bs):
        i2 = min(i1 + bs, w.shape[1])
        w1, h1, errs = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2], torch.zeros(w.shape[0], i2 - i1)
        score = w1 ** 2 / torch.diag(h1)[None] ** 2
        mask = torch.zeros_like(w1, dtype=torch.bool) if pattern.structured else \
            lowest(score.reshape(1, -1), int(score.numel() * sparsity)).reshape(score.shape)
        for i in range(i2 - i1):
            if pattern.structured and i % pattern.m == 0:
                mask[:, i:i + pattern.m] = lowest(w1[:, i:i + pattern.m] ** 2 / torch.diag(h1)[i:i + pattern.m][None] ** 2,
                                                  pattern.n)
            q = w1[:, i].clone()
            q[mask[:, i]] = 0
            err = (w1[:, i] - q) / h1[i, i]
            w1[:, i:] -= err[:, None] @ h1[i, i:][None]
            errs[:, i] = err
        w1[mask] = 0
        w[:, i1:i2] = w1
        w[:, i2:] -= errs @ hinv[i1:i2, i2:]
    return w


@pytest.mark.parametrize("pattern", [Pattern(), Pattern(2, 4), Pattern(4, 8)])
def test_sparsegpt_sweep_equals_the_textbook_loop(pattern):
    from compression.methods.sparsegpt import inverse_hessian_factor, sparsegpt_
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 320, generator=g)
    hinv = inverse_hessian_factor(2 / 1024 * x.t() @ x, 0.01)
    w = torch.randn(96, 320, generator=g)
    ours = w.t().contiguous()
    sparsegpt_(ours, hinv, [slice(0, 96)], 0.5, pattern, 128)
    expected = textbook_sparsegpt(w, hinv, 0.5, pattern)
    assert torch.equal(ours.t() == 0, expected == 0)
    assert torch.allclose(ours.t(), expected, atol=1e-4)


def test_the_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_damped_inverse_in_float64():
    from compression.methods.sparsegpt import inverse_hessian_factor
    g = torch.Generator().manual_seed(1)
    for width, tokens in ((320, 1024), (96, 64)):
        x = torch.randn(tokens, width, generator=g) * torch.linspace(0.01, 3, width)
        h = 2 / tokens * x.t() @ x
        h64 = h.double()
        damped = h64 + 0.01 * torch.diag(h64).mean() * torch.eye(width, dtype=torch.float64)
        expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
        ours = inverse_hessian_factor(h, 0.01)
        assert torch.equal(ours, ours.triu()) and bool((torch.diag(ours) > 0).all())
        assert torch.allclose(ours.double(), expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max()))


def test_sequential_order_refuses_what_cannot_fit():
    from compression.driver import check_sequential_fits
    model = tiny_model("llama")
    check_sequential_fits(model, 8, 32, torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match=r"--order sequential holds .* 1000000 x 4096 .* use --order reference"):
        check_sequential_fits(model, 1_000_000, 4096, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("order", ["sequential", "reference"])
def test_uneven_mini_batches_prune_every_matrix_in_both_orders(order):
    model = tiny_model("llama")
    report = prune_model(model, random_windows(10), create("wanda", sparsity=0.5), order=order, batch_size=4)
    assert report.batch_size == 4 and len(report.layers) == 14
    assert all(r.tokens == 10 * 32 and r.sparsity == 0.5 for r in report.layers)
    assert report.check["relative_difference"] < 1e-4


class RoutedMLP(torch.nn.Module):
    """A real MLP plus two Linear experts behind a norm, one per mini-batch chosen by the sign of the batch's mean
    first feature: a mini-batch that goes one way never calls the other expert. With `share`, the experts read
    the MLP's own input instead, so the probe groups one of them with gate_proj and up_proj."""

    def __init__(self, mlp: torch.nn.Module, hidden: int, share: bool = False) -> None:
        super().__init__()
        self.mlp, self.share, self.norm = mlp, share, torch.nn.LayerNorm(hidden)
        self.left, self.right = torch.nn.Linear(hidden, hidden, bias=False), torch.nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        h = x if self.share else self.norm(x)
        return self.mlp(x) + (self.left(h) if h[..., 0].mean() < 0 else self.right(h))


def test_sequential_prunes_a_linear_that_a_mini_batch_never_calls():
    model = tiny_model("llama")
    model.model.layers[1].mlp = RoutedMLP(model.model.layers[1].mlp, 64)
    report = prune_model(model, random_windows(6), create("wanda", sparsity=0.5), order="sequential", batch_size=1)
    rows = {r.module: r for r in report.layers if r.layer == 1}
    assert {"mlp.left", "mlp.right"} <= set(rows) and len(report.layers) == 16
    assert 0 < rows["mlp.left"].tokens < 6 * 32 and rows["mlp.left"].tokens + rows["mlp.right"].tokens == 6 * 32
    assert rows["mlp.left"].sparsity == rows["mlp.right"].sparsity == 0.5
    assert all("pruned after the pass" in rows[n].note for n in ("mlp.left", "mlp.right"))
    assert report.check["relative_difference"] < 1e-4


@pytest.mark.parametrize("order", ["sequential", "reference"])
def test_a_grouped_linear_called_by_other_mini_batches_than_its_group_fails_by_name(order):
    model = tiny_model("llama")
    model.model.layers[1].mlp = RoutedMLP(model.model.layers[1].mlp, 64, share=True)
    with pytest.raises(RuntimeError, match=r"decoder layer 1: mlp\.(left|right) reads the same input as mlp\.mlp"):
        prune_model(model, random_windows(6), create("wanda", sparsity=0.5), order=order, batch_size=1)


def test_the_final_check_catches_layers_replayed_with_layer_zero_arguments():
    """Gemma 3's sliding and global layers get different masks and RoPE; running them all with layer 0's arguments
    (the old capture) is caught by the comparison with the model's own forward."""
    from compression.driver import check_against_model
    from compression.layers import call_layer, capture_layer_inputs
    from compression.residency import Resident
    model = tiny_model("gemma3")
    windows = random_windows(2)
    _, layers = decoder_layers(model)
    inputs = capture_layer_inputs(model, layers, [windows], torch.device("cpu"))
    hidden, replayed = inputs.hidden[0], inputs.hidden[0]
    with torch.no_grad():
        for i, layer in enumerate(layers):
            hidden = call_layer(layer, hidden, inputs.args[i][0], inputs.kwargs[i][0])
            replayed = call_layer(layer, replayed, inputs.args[0][0], inputs.kwargs[0][0])
        assert check_against_model(model, layers, windows, hidden, Resident(model, torch.device("cpu")))["relative_difference"] < 1e-5
        with pytest.raises(RuntimeError, match="does not reproduce the pruned model's own forward"):
            check_against_model(model, layers, windows, replayed, Resident(model, torch.device("cpu")))


def test_nm_width_checked_before_any_work_with_the_matrix_named():
    from transformers import AutoConfig, AutoModelForCausalLM
    options = {k: v for k, v in TINY["llama"].items() if k != "model_type"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", vocab_size=512, **{**options,
                                                                                    "intermediate_size": 130}))
    for method in METHODS:
        with pytest.raises(ValueError, match=r"pattern 2:4 needs .* multiple of 4: model.layers.0.mlp.down_proj has 130"):
            prune_model(model, random_windows(), create(method, sparsity=0.5, pattern=Pattern(2, 4)))
    assert (model.model.layers[0].self_attn.q_proj.weight != 0).all()
    with pytest.raises(ValueError, match="multiple of 4, got 130"):
        create("sparsegpt", sparsity=0.5, pattern=Pattern(2, 4)).prune([torch.randn(8, 130)], None)


def test_a_matrix_of_unknown_kind_is_refused_by_name_or_kept_dense_when_excluded():
    model = tiny_model("llama")
    for layer in model.model.layers:
        layer.self_attn.mixer = torch.nn.Parameter(torch.ones(4, 4))
    with pytest.raises(ValueError, match=r"cannot prune 2 weight matrices .* model.layers.0.self_attn.mixer \(4, 4\)"):
        prune_model(model, random_windows(), create("wanda", sparsity=0.5))
    report = prune_model(model, random_windows(), create("wanda", sparsity=0.5),
                           targets=Targets(exclude=("self_attn.mixer",)))
    assert [k["name"] for k in report.kept] == ["model.layers.0.self_attn.mixer", "model.layers.1.self_attn.mixer"]
    assert all(k["reason"] == "kept dense by the include/exclude patterns" for k in report.kept)


def test_sparsity_over_the_whole_scope_and_the_whole_model():
    model = tiny_model("llama")
    report = prune_model(model, random_windows(), create("wanda", sparsity=0.5),
                           targets=Targets(exclude=("mlp.down_proj",)))
    kept = {k["name"]: k for k in report.kept}
    assert set(kept) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    params = {n: p for n, p in model.named_parameters()}
    in_scope = [p for n, p in params.items() if ".layers." in n and p.dim() == 2]
    assert report.overall_sparsity == pytest.approx(sum(int((p == 0).sum()) for p in in_scope) /
                                                    sum(p.numel() for p in in_scope))
    assert report.pruned_sparsity == 0.5 and report.overall_sparsity < 0.5
    everything = list(model.parameters())
    assert report.model_parameters == sum(p.numel() for p in everything)
    assert report.model_sparsity == pytest.approx(sum(int((p == 0).sum()) for p in everything) / report.model_parameters)


@pytest.mark.parametrize("order", ["sequential", "reference"])
@pytest.mark.parametrize("arch", ["gemma3", "mixtral"])
def test_offload_gives_the_masks_of_the_in_place_run_with_per_layer_arguments_and_experts(arch, order):
    windows = random_windows(6)
    masks = []
    for offload in (False, True):
        model = tiny_model(arch)
        report = prune_model(model, windows, create("wanda", sparsity=0.5), order=order, batch_size=4,
                             offload=offload, device=torch.device("cpu"))
        assert report.check["relative_difference"] < 1e-4
        masks.append({n: p == 0 for n, p in model.named_parameters() if ".layers." in n and p.dim() >= 2})
    assert masks[0].keys() == masks[1].keys() and all(torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_an_expert_no_calibration_token_reaches_is_pruned_by_magnitude_and_says_so():
    """Top-1 routing with router rows +v, -v, 0, 0: every token goes to expert 0 or 1, never to 2 or 3."""
    from transformers import AutoConfig, AutoModelForCausalLM
    options = {k: v for k, v in TINY["mixtral"].items() if k != "model_type"}
    config = AutoConfig.for_model("mixtral", vocab_size=512, **{**options, "num_experts_per_tok": 1})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            v = torch.randn(64)
            layer.mlp.gate.weight.copy_(torch.stack([v, -v, torch.zeros(64), torch.zeros(64)]))
    report = prune_model(model, random_windows(), create("wanda", sparsity=0.5), order="reference", batch_size=4)
    rows = {r.name: r for r in report.layers}
    for i, layer in enumerate(model.model.layers):
        for e in (2, 3):
            for projection in ("gate_up_proj", "down_proj"):
                row = rows[f"model.layers.{i}.mlp.experts.{e}.{projection}"]
                assert row.tokens == 0 and "no calibration token reached it: magnitude used" in row.note
                w = getattr(layer.mlp.experts, projection)[e]
                assert (w == 0).sum() == w.numel() // 2
        assert rows[f"model.layers.{i}.mlp.experts.0.down_proj"].tokens + \
            rows[f"model.layers.{i}.mlp.experts.1.down_proj"].tokens == 8 * 32


@pytest.mark.parametrize("order", ["sequential", "reference"])
def test_transposed_biased_experts_of_gpt_oss_are_pruned_per_expert_row(order):
    model = tiny_model("gpt_oss")
    routers = [layer.mlp.router.weight.clone() for layer in model.model.layers]
    report = prune_model(model, random_windows(), create("wanda", sparsity=0.5), order=order, batch_size=4)
    assert len(report.layers) == 2 * (4 + 4 * 2) and report.check["relative_difference"] < 1e-4
    for layer, router in zip(model.model.layers, routers):
        experts = layer.mlp.experts
        assert experts.is_transposed and experts.has_bias
        for projection in ("gate_up_proj", "down_proj"):
            for e in range(experts.num_experts):
                w = getattr(experts, projection)[e].t()
                assert ((w == 0).sum(1) == w.shape[1] // 2).all()
        assert torch.equal(layer.mlp.router.weight, router)
    assert [k["reason"] for k in report.kept] == ["router (kept dense)"] * 2


@pytest.mark.parametrize("order", ["sequential", "reference"])
def test_a_layer_whose_linears_share_inputs_otherwise_than_its_kind_is_grouped_on_its_own(order, monkeypatch):
    """Groups are probed once per layer class on a CPU; layer 1 here feeds up_proj another input than gate_proj's,
    so reusing layer 0's groups would pool its statistics with gate_proj's. It must come out as it does when every
    layer is probed."""
    import compression.driver as driver

    def flipped_up(mlp):
        return lambda x: mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x.flip(-1)))

    def pruned(probe_each: bool) -> tuple[torch.nn.Module, object]:
        model = tiny_model("llama", layers=3)
        mlp = decoder_layers(model)[1][1].mlp
        mlp.forward = flipped_up(mlp)
        if probe_each:
            monkeypatch.setattr(driver, "probed_groups", lambda _probed, *probe: (driver.input_groups(*probe), False))
        return model, prune_model(model, random_windows(4), create("wanda", sparsity=0.5), order=order, batch_size=2)

    (reused, report), (probed, expected) = pruned(False), pruned(True)
    assert [(r.name, r.sparsity) for r in report.layers] == [(r.name, r.sparsity) for r in expected.layers]
    assert len(report.layers) == 3 * 7
    for (name, a), b in zip(reused.named_parameters(), probed.parameters()):
        assert torch.equal(a, b), name
