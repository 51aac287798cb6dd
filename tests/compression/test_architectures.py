"""Wanda masks from the layer-wise engine against an independent oracle driven by each model's own full forward.

The oracle knows nothing of the engine: for decoder layer i = 0, 1, ... it runs the REAL model on every calibration
window at once, captures the inputs of layer i's Linear / Conv1D modules (forward pre-hooks) and of each expert's
slice of a fused 3-D experts parameter (the `F.linear(x, param[e])` calls of the eager experts loop, seen through a
TorchFunctionMode), ranks |W| * ||X_j||_2 per output row, zeros the lowest half and only then goes on to layer i+1.
Layer i+1 is thus calibrated on the outputs of pruned layers 0..i, which is what `order="reference"` promises.
Whatever the model does per layer (sliding-window or full masks, local or global RoPE, routing) comes from the
model itself, so a mask or rotary table replayed from the wrong layer shows up as a different mask.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from compression.driver import prune_model
from compression.methods import create
from tests.conftest import random_windows, tiny_model

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

ARCHS = ["llama", "mistral", "qwen2_window", "qwen3", "gemma2", "gemma3", "phi3", "gpt_neox", "opt", "gpt2",
         "mixtral", "qwen3_moe"]
MOE = ["mixtral", "qwen3_moe"]
NSAMPLES, SEQLEN, BATCH, SPARSITY = 6, 32, 4, 0.5   # 6 windows in mini-batches of 4: the last one is uneven
DECODER_LISTS = {"model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"}
# which layers attend through a sliding window (None: every layer full)
SLIDING = {"mistral": [True, True], "qwen2_window": [False, True, True], "gemma2": [True, False, True],
           "gemma3": [True, False, True]}


# ----------------------------------------------------------------------------------------------- model anatomy

def text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def decoder_blocks(model) -> tuple[str, nn.ModuleList]:
    n = text_config(model).num_hidden_layers
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    assert len(found) == 1 and found[0][0] in DECODER_LISTS, [name for name, _ in found]
    return found[0]


def num_experts(model) -> int | None:
    cfg = text_config(model)
    return getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)


def routers(layer: nn.Module, experts: int | None) -> dict[str, nn.Module]:
    """Router modules of a block: `gate`/`router` with a 2-D [num_experts, hidden] weight (a Linear or not)."""
    if not experts:
        return {}
    return {name: m for name, m in layer.named_modules()
            if name.split(".")[-1] in ("gate", "router") and isinstance(getattr(m, "weight", None), torch.Tensor)
            and m.weight.dim() == 2 and m.weight.shape[0] == experts}


def dense_linears(layer: nn.Module, experts: int | None) -> dict[str, nn.Module]:
    skip = set(routers(layer, experts))
    return {name: m for name, m in layer.named_modules()
            if name and name not in skip and (isinstance(m, nn.Linear) or (Conv1D and isinstance(m, Conv1D)))}


def expert_params(layer: nn.Module) -> dict[str, tuple[nn.Module, str, nn.Parameter]]:
    """Fused expert tensors of a block, by the name of the module that owns them: (module, param name, param)."""
    out = {}
    for mname, m in layer.named_modules():
        for pname, p in m.named_parameters(recurse=False):
            if p.dim() == 3:
                out[f"{mname}.{pname}"] = (m, pname, p)
    return out


def matrix(module: nn.Module) -> torch.Tensor:
    """[out, in] view of a Linear / Conv1D weight; writes go through."""
    return module.weight.data if isinstance(module, nn.Linear) else module.weight.data.t()


def expert_matrix(module: nn.Module, param: nn.Parameter, e: int) -> torch.Tensor:
    w = param.data[e]
    return w.t() if getattr(module, "is_transposed", False) else w


def in_scope(model) -> dict[str, torch.Tensor]:
    """Every matrix the engine must prune, by its report name, as [out, in] views of the live weights."""
    prefix, layers = decoder_blocks(model)
    experts = num_experts(model)
    out = {}
    for i, layer in enumerate(layers):
        for name, m in dense_linears(layer, experts).items():
            out[f"{prefix}.{i}.{name}"] = matrix(m)
        for full, (m, pname, p) in expert_params(layer).items():
            mname = full[: -len(pname) - 1]
            for e in range(p.shape[0]):
                out[f"{prefix}.{i}.{mname}.{e}.{pname}"] = expert_matrix(m, p, e)
    return out


def router_weights(model) -> dict[str, torch.Tensor]:
    prefix, layers = decoder_blocks(model)
    return {f"{prefix}.{i}.{name}": m.weight.detach().clone() for i, layer in enumerate(layers)
            for name, m in routers(layer, num_experts(model)).items()}


# ------------------------------------------------------------------------------------------------------- oracle

class ExpertInputs(TorchFunctionMode):
    """Records the input of every `F.linear` whose weight is one expert's slice of one of the watched 3-D params."""

    def __init__(self, params: dict[str, nn.Parameter]) -> None:
        super().__init__()
        self.params = params
        self.seen: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs["input"]
            w = args[1] if len(args) > 1 else kwargs["weight"]
            for name, p in self.params.items():
                if w.untyped_storage().data_ptr() == p.untyped_storage().data_ptr():
                    e, rest = divmod(w.storage_offset() - p.storage_offset(), p.stride(0))
                    assert rest == 0 and tuple(w.shape) == tuple(p.shape[1:]), (name, w.shape, w.storage_offset())
                    self.seen[(name, e)].append(x.detach().reshape(-1, x.shape[-1]).clone())
        return func(*args, **kwargs)


def wanda_mask(w: torch.Tensor, x: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row, the int(in * sparsity) lowest |W| * ||X_j||_2, ties to the lower index."""
    score = w.double().abs() * x.double().square().sum(0).sqrt()
    k = int(w.shape[1] * sparsity)
    idx = score.sort(dim=1, stable=True).indices[:, :k]
    return torch.zeros_like(w, dtype=torch.bool).scatter_(1, idx, True)


def oracle_wanda(model, windows: torch.Tensor, sparsity: float = SPARSITY):
    """Prune `model` in place layer by layer from its own full forward; returns (masks, inputs) by report name.
    Experts that no token reached are left out of both (the engine uses magnitude for them)."""
    if num_experts(model):
        model.config._experts_implementation = "eager"     # the plain per-expert F.linear loop
        text_config(model)._experts_implementation = "eager"
    prefix, layers = decoder_blocks(model)
    experts = num_experts(model)
    masks, inputs = {}, {}
    for i, layer in enumerate(layers):
        linears = dense_linears(layer, experts)
        fused = expert_params(layer)
        for m, _, _ in fused.values():
            assert not getattr(m, "is_transposed", False), "the F.linear capture assumes [E, out, in] experts"
        seen = defaultdict(list)
        handles = [m.register_forward_pre_hook(lambda _m, a, name=name: seen[name].append(
            a[0].detach().reshape(-1, a[0].shape[-1]).clone())) for name, m in linears.items()]
        tap = ExpertInputs({name: p for name, (_, _, p) in fused.items()})
        try:
            with torch.no_grad(), tap:
                model(input_ids=windows, use_cache=False)
        finally:
            for h in handles:
                h.remove()
        targets = {}
        for name, m in linears.items():
            assert seen[name], f"{prefix}.{i}.{name} was never called"
            targets[f"{prefix}.{i}.{name}"] = (matrix(m), torch.cat(seen[name]))
        for (full, e), xs in tap.seen.items():
            m, pname, p = fused[full]
            mname = full[: -len(pname) - 1]
            targets[f"{prefix}.{i}.{mname}.{e}.{pname}"] = (expert_matrix(m, p, e), torch.cat(xs))
        if fused:
            assert tap.seen, f"layer {i}: no expert F.linear call was seen: is the eager experts loop running?"
        for name, (w, x) in targets.items():
            assert x.shape[1] == w.shape[1], (name, x.shape, w.shape)
            masks[name] = wanda_mask(w, x, sparsity)
            inputs[name] = x
        with torch.no_grad():                              # prune layer i before layer i+1 is calibrated
            for name, (w, _) in targets.items():
                w.masked_fill_(masks[name], 0)
    return masks, inputs


# -------------------------------------------------------------------------------------------------------- tests

def layer_calls(model, windows):
    """Each decoder layer's (hidden, args, kwargs) as the model's own forward passes them."""
    _, layers = decoder_blocks(model)
    calls = {}
    handles = [layer.register_forward_pre_hook(
        lambda _m, a, k, i=i: calls.__setitem__(i, (a[0] if a else k["hidden_states"], a[1:],
                                                    {n: v for n, v in k.items() if n != "hidden_states"})),
        with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return calls


def run_layer(layer, hidden, args, kwargs):
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("arch", ARCHS)
def test_config_builds_and_its_layer_settings_are_active(arch):
    model = tiny_model(arch)
    cfg = text_config(model)
    prefix, layers = decoder_blocks(model)
    assert len(layers) == (3 if arch in ("qwen2_window", "gemma2", "gemma3") else 2)
    assert next(model.parameters()).dtype == torch.float32 and cfg.vocab_size == 512
    if arch in MOE:
        assert num_experts(model) == 4 and cfg.num_experts_per_tok == 2
        for layer in layers:                                # every layer is sparse (Qwen3-MoE: step 1, no mlp-only)
            assert len(routers(layer, 4)) == 1 and len(expert_params(layer)) == 2
    if arch not in SLIDING:
        return
    sliding = SLIDING[arch]
    assert cfg.sliding_window == 8
    if arch != "mistral":
        assert cfg.layer_types == ["sliding_attention" if s else "full_attention" for s in sliding]
    # Functionally: change token 0 only; a sliding layer's output at the last position must not move, a full one must
    windows = random_windows(2, SEQLEN)
    calls = layer_calls(model, windows)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            hidden, args, kwargs = calls[i]
            moved = hidden.clone()
            moved[:, 0] += torch.randn(moved[:, 0].shape, generator=g)
            a, b = run_layer(layer, hidden, args, kwargs), run_layer(layer, moved, args, kwargs)
            change = (a[:, -1] - b[:, -1]).abs().max()
            assert (change < 1e-6) if sliding[i] else (change > 1e-4), (i, float(change))
    if arch == "gemma3":                                    # local and global RoPE tables differ
        cos = [calls[i][2]["position_embeddings"][0] for i in range(3)]
        assert torch.equal(cos[0], cos[2]) and not torch.allclose(cos[0], cos[1])


@pytest.mark.parametrize("arch", MOE)
def test_oracle_captures_every_routed_token_of_every_expert(arch):
    model = tiny_model(arch)
    windows = random_windows(NSAMPLES, SEQLEN)
    top_k, experts, tokens = text_config(model).num_experts_per_tok, num_experts(model), NSAMPLES * SEQLEN
    probe = copy.deepcopy(model)
    probe.config._experts_implementation = "eager"
    oracle = copy.deepcopy(probe)                           # before the hooks: deepcopy would copy them too
    prefix, layers = decoder_blocks(probe)
    routed, moe_in = {}, {}
    handles = []
    for i, layer in enumerate(layers):
        (rname, router), = routers(layer, experts).items()
        handles.append(router.register_forward_hook(lambda _m, _a, out, i=i: routed.__setitem__(i, out[-1])))
        exp_mod = dict(layer.named_modules())[rname.rsplit(".", 1)[0] + ".experts"]
        handles.append(exp_mod.register_forward_pre_hook(lambda _m, a, i=i: moe_in.__setitem__(i, a[0].clone())))
    # dense pass: layer 0 sees exactly what the oracle's first pass sees
    with torch.no_grad():
        probe(input_ids=windows, use_cache=False)
    masks, inputs = oracle_wanda(oracle, windows)
    for h in handles:
        h.remove()
    layer0 = f"{prefix}.0.mlp.experts"
    index = routed[0]
    assert index.shape == (tokens, top_k)
    for e in range(experts):
        _, chosen = torch.where(index.t() == e)             # the eager loop's token order: by choice rank, then token
        assert len(chosen) > 0, f"expert {e} got no token: the comparison would skip it"
        for pname in ("gate_up_proj", "down_proj"):
            assert inputs[f"{layer0}.{e}.{pname}"].shape[0] == len(chosen)
        assert torch.equal(inputs[f"{layer0}.{e}.gate_up_proj"], moe_in[0][chosen])
    for i in range(len(layers)):
        rows = sum(inputs[f"{prefix}.{i}.mlp.experts.{e}.gate_up_proj"].shape[0] for e in range(experts)
                   if f"{prefix}.{i}.mlp.experts.{e}.gate_up_proj" in inputs)
        assert rows == tokens * top_k, (i, rows)
    scope = in_scope(oracle)
    assert set(masks) == set(scope)                         # every expert slice of every layer was reached
    for name, mask in masks.items():
        assert (mask.sum(1) == int(mask.shape[1] * SPARSITY)).all(), name
        assert torch.equal(scope[name] == 0, mask), name    # the oracle zeroed exactly its mask
    assert all(torch.equal(a, b) for a, b in zip(router_weights(oracle).values(), router_weights(model).values()))


def kept_router_names(report) -> set[str]:
    return {d["name"] for d in report.kept if d["reason"].startswith("router")}


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_wanda_masks_equal_the_oracle_and_sequential_hits_the_row_target(arch):
    base = tiny_model(arch)
    windows = random_windows(NSAMPLES, SEQLEN)
    dense_routers = router_weights(base)

    oracle = copy.deepcopy(base)
    expected, seen = oracle_wanda(oracle, windows)

    model = copy.deepcopy(base)
    report = prune_model(model, windows, create("wanda", sparsity=SPARSITY), order="reference", batch_size=BATCH)
    scope = in_scope(model)
    wrong = [name for name, mask in expected.items() if not torch.equal(scope[name] == 0, mask)]
    assert not wrong, f"{len(wrong)}/{len(expected)} masks differ from the oracle, first: {wrong[:6]}"
    names = [r.name for r in report.layers]
    assert len(names) == len(set(names)) and set(names) == set(scope), \
        (sorted(set(scope) - set(names))[:6], sorted(set(names) - set(scope))[:6])
    rows = {r.name: r for r in report.layers}
    for name, w in scope.items():
        assert rows[name].sparsity == pytest.approx(float((w == 0).float().mean())), name
    for name, x in seen.items():                            # an expert's tokens are the ones routed to it
        assert rows[name].tokens == x.shape[0], (name, rows[name].tokens, x.shape[0])
    for name, w in router_weights(model).items():
        assert torch.equal(w, dense_routers[name]), f"router {name} was changed"

    model = copy.deepcopy(base)
    report = prune_model(model, windows, create("wanda", sparsity=SPARSITY), order="sequential", batch_size=BATCH)
    scope = in_scope(model)
    assert {r.name for r in report.layers} == set(scope)
    for name, w in scope.items():
        assert ((w == 0).sum(1) == w.shape[1] // 2).all(), name
    for name, w in router_weights(model).items():
        assert torch.equal(w, dense_routers[name]), f"router {name} was changed"
    if dense_routers:                                       # routers stay dense and are said to be left out
        assert all(name in kept_router_names(report) or f"{name}.weight" in kept_router_names(report)
                   for name in dense_routers), (sorted(dense_routers), sorted(kept_router_names(report)))
