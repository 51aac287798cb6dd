"""Generic access to a causal LM's decoder layers and their Linear modules, with no per-architecture forward code."""

from __future__ import annotations

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


CACHE_ARGUMENTS = ("past_key_values", "past_key_value", "layer_past", "cache", "use_cache")


@dataclass
class LayerInputs:
    """What the model passes its decoder layers: layer 0's hidden states per mini-batch, and every layer's other
    positional and keyword arguments per mini-batch (`args[i][b]`, `kwargs[i][b]`). Tensors the model shares
    between layers (one mask and one rotary table per layer type) are held once."""

    hidden: list[torch.Tensor]
    args: list[list[tuple]]
    kwargs: list[list[dict]]


class StandIn:
    """Stands in for every decoder layer during capture: records the arguments and hands the hidden states back
    in the container the real layer returns (learned from one real call of layer 0)."""

    def __init__(self, layers: nn.ModuleList) -> None:
        self.layers = layers
        self.inputs = LayerInputs([], [[] for _ in layers], [[] for _ in layers])
        self.template: object = None

    def __enter__(self) -> "StandIn":
        self.saved = [vars(layer).get("forward") for layer in self.layers]
        for i, layer in enumerate(self.layers):
            layer.forward = lambda *args, i=i, **kwargs: self.call(i, args, kwargs)
        return self

    def __exit__(self, *exc) -> None:
        for layer, saved in zip(self.layers, self.saved):
            if saved is None:
                del layer.forward
            else:
                layer.forward = saved

    def call(self, i: int, args: tuple, kwargs: dict):
        kwargs = dict(kwargs)
        hidden, rest = (args[0], args[1:]) if args else (kwargs.pop("hidden_states"), ())
        if i == 0:
            self.inputs.hidden.append(hidden)
        self.inputs.args[i].append(rest)
        self.inputs.kwargs[i].append({k: v for k, v in kwargs.items() if k not in CACHE_ARGUMENTS})
        if i == len(self.layers) - 1:
            raise StopForward
        if self.template is None:
            real = self.saved[0] or type(self.layers[0]).forward.__get__(self.layers[0])
            self.template = real(hidden, *rest, **kwargs)
        if isinstance(self.template, (tuple, list)):
            return (hidden, *([None] * (len(self.template) - 1)))
        return hidden


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, batches: list[torch.Tensor],
                         device: torch.device) -> LayerInputs:
    """Run the model once per mini-batch with stand-ins for its decoder layers and keep each layer's own arguments
    (attention mask, position embeddings, ...) exactly as the model builds them. Models whose layers differ
    (sliding-window and global attention, local and global RoPE) pass each layer its own; masks and positions do
    not depend on the hidden states, so the stand-ins cost nothing but the embeddings."""
    stand_in = StandIn(layers)
    with stand_in:
        for ids in batches:
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except StopForward:
                pass
    inputs = stand_in.inputs
    missing = [i for i, calls in enumerate(inputs.args) if len(calls) != len(batches)]
    if missing:
        raise RuntimeError(f"decoder layers {missing[:5]} were not called once per mini-batch: cannot capture their inputs")
    return inputs


def call_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Run one decoder layer and return its hidden-state output, whatever container the architecture returns."""
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
