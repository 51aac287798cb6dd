"""Fused Mixture-of-Experts weights as per-expert [out, in] matrices, and a forward that shows each expert its inputs.

transformers 5 keeps the experts of Mixtral, Qwen-MoE, DeepSeek, gpt-oss and the rest in one `experts` module with
3-D parameters (`gate_up_proj` or `up_proj`, and `down_proj`, [experts, out, in], or [experts, in, out] when
`is_transposed`) whose layout flags come from `use_experts_implementation`. The tapped forward below is built only
from that shared interface (the flags, `_apply_gate`, `act_fn`, biases, `post_expert_norm`), never from per-model
code, and it is checked against the module's own forward before it is trusted.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")

# Called before each projection with its name, every expert's input rows (empty for an expert with no token) and
# the indices of those rows among the module's flattened input tokens.
Observer = Callable[[str, list[torch.Tensor], list[torch.Tensor]], None]


def is_experts(module: nn.Module) -> bool:
    """A fused experts module of the shared transformers interface."""
    down = getattr(module, "down_proj", None)
    return (isinstance(down, torch.Tensor) and down.dim() == 3 and hasattr(module, "num_experts")
            and hasattr(module, "has_gate") and hasattr(module, "is_transposed"))


def projections(module: nn.Module) -> list[str]:
    """The module's projections in call order."""
    return ["gate_up_proj" if module.has_gate else "up_proj", "down_proj"]


def expert_matrix(module: nn.Module, projection: str, expert: int) -> torch.Tensor:
    """Expert `expert`'s weight of `projection` as an [out, in] view; writes go through to the 3-D parameter."""
    weight = getattr(module, projection).data[expert]
    return weight.t() if module.is_transposed else weight


def _project(module: nn.Module, projection: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    bias = getattr(module, f"{projection}_bias", None) if module.has_bias else None
    return F.linear(x, expert_matrix(module, projection, expert),
                    None if bias is None else bias[expert])


def tapped_forward(module: nn.Module, observe: Observer, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> torch.Tensor:
    """The experts' forward, one expert at a time; `observe` sees all experts' inputs of a projection before any of
    them is applied, so a caller may prune that projection in between."""
    first, down = projections(module)
    routes = [(top_k_index == e).nonzero() for e in range(module.num_experts)]
    tokens = [r[:, 0] for r in routes]
    xs = [hidden_states[t] for t in tokens]
    observe(first, xs, tokens)
    mids = []
    for e, x in enumerate(xs):
        out = _project(module, first, e, x)
        mids.append(module._apply_gate(out) if module.has_gate else module.act_fn(out))
    observe(down, mids, tokens)
    final = torch.zeros_like(hidden_states, dtype=torch.float32)
    for e, (mid, route) in enumerate(zip(mids, routes)):
        if not len(route):
            continue
        out = _project(module, down, e, mid)
        if getattr(module, "has_post_expert_norm", False):
            out = module.post_expert_norm(out)
        weights = top_k_weights[route[:, 0], route[:, 1]]
        final.index_add_(0, route[:, 0], (out * weights[:, None]).float())
    return final.to(hidden_states.dtype)


class ExpertsTap:
    """Replaces one experts module's forward by the tapped one while installed; the first call compares it with
    the module's own forward and refuses a module whose output it does not reproduce."""

    def __init__(self, module: nn.Module, name: str, observe: Observer) -> None:
        self.module, self.name, self.observe = module, name, observe
        self.verified = False

    def __enter__(self) -> "ExpertsTap":
        self.had_own = "forward" in vars(self.module)
        self.saved = vars(self.module).get("forward")
        self.module.forward = self.forward
        return self

    def __exit__(self, *exc) -> None:
        if self.had_own:
            self.module.forward = self.saved
        else:
            del self.module.forward

    def native(self, *args, **kwargs) -> torch.Tensor:
        return (self.saved or type(self.module).forward.__get__(self.module))(*args, **kwargs)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *rest, **extra) -> torch.Tensor:
        if rest or extra:
            raise ValueError(f"{self.name}: the experts module was called with more than (hidden_states, top_k_index, "
                             f"top_k_weights); PruneScope cannot see its experts' inputs")
        if not self.verified:
            self.verify(hidden_states, top_k_index, top_k_weights)
        return tapped_forward(self.module, self.observe, hidden_states, top_k_index, top_k_weights)

    def verify(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        own = self.native(hidden_states, top_k_index, top_k_weights).float()
        ours = tapped_forward(self.module, lambda *_: None, hidden_states, top_k_index, top_k_weights).float()
        tolerance = 1e-4 if hidden_states.dtype == torch.float32 else 2e-2
        diff = float((own - ours).norm() / own.norm().clamp_min(1e-30))
        if not diff <= tolerance:
            raise ValueError(f"{self.name} ({type(self.module).__name__}): its own forward and PruneScope's per-expert "
                             f"forward differ (relative {diff:.2e} > {tolerance:g}), so its experts cannot be pruned "
                             f"from their true inputs; exclude them with --exclude")
        self.verified = True
