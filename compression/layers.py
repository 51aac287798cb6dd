"""Generic access to a causal LM's decoder layers and their Linear modules, with no per-architecture forward code."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers always ships it today
    Conv1D = ()


class StopForward(Exception):
    """Raised by a hook to end a forward pass early once it has what it needs."""


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks (Llama/Mistral/Qwen2/Gemma `model.layers`, GPT-2 `transformer.h`, OPT
    `model.decoder.layers`, ...): the longest ModuleList of identical blocks that contain Linear layers."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    expected = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1 or not linear_modules(module[0]):
            continue
        if expected and len(module) == expected:
            return name, module
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}: no list of blocks with Linear layers")
    return best


def is_linear(module: nn.Module) -> bool:
    """A dense projection whose weight can be pruned: nn.Linear or GPT-2's transposed Conv1D."""
    return isinstance(module, nn.Linear) or (bool(Conv1D) and isinstance(module, Conv1D))


def linear_modules(block: nn.Module) -> dict[str, nn.Module]:
    """Linear-like modules of a block by their name inside the block."""
    return {name: m for name, m in block.named_modules() if name and is_linear(m)}


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as an [out, in] view (Conv1D stores it transposed); writes go through to the module."""
    weight = module.weight.data
    return weight.t() if not isinstance(module, nn.Linear) else weight


def select(names: list[str], include: list[str] | None, exclude: list[str] | None) -> list[str]:
    """Names kept by fnmatch patterns: any include (default all), no exclude."""
    kept = [n for n in names if not include or any(fnmatch.fnmatch(n, p) for p in include)]
    return [n for n in kept if not exclude or not any(fnmatch.fnmatch(n, p) for p in exclude)]


@dataclass
class LayerInputs:
    """What the model passes its first decoder layer, one entry per mini-batch."""

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]


def capture_first_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor],
                               device: torch.device) -> LayerInputs:
    """Run the model on each batch until its first decoder layer and keep that layer's positional and keyword
    arguments (attention mask, position embeddings, ...) exactly as the model builds them."""
    captured = LayerInputs([], [], [])

    def grab(_module, args, kwargs):
        hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        captured.hidden.append(hidden)
        captured.args.append(rest)
        captured.kwargs.append({k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value",
                                                                                 "layer_past", "use_cache")})
        raise StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
    if len(captured.hidden) != len(batches):
        raise RuntimeError("the first decoder layer was never called: cannot capture its inputs")
    return captured


def call_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Run one decoder layer and return its hidden-state output, whatever container the architecture returns."""
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
