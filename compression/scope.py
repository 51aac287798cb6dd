"""Which weight matrices of a decoder layer are pruned, which are kept dense and why, so nothing is skipped silently.

Every parameter with two or more dimensions inside a decoder layer is a matrix in scope: nn.Linear and GPT-2's
Conv1D weights, and each expert's slice of a fused experts module. Routers stay dense; a user's include/exclude
patterns keep others dense; any other matrix is refused with its name rather than left dense unseen.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from compression.experts import PROJECTIONS, expert_matrix, is_experts, projections
from compression.layers import is_linear, weight_matrix
from compression.patterns import Pattern
from compression.targets import matches

USER = "kept dense by the include/exclude patterns"
ROUTER = "router (kept dense)"


def select(names: list[str], include: tuple[str, ...] | list[str] | None, exclude: tuple[str, ...] | list[str] | None,
           prefix: str = "") -> list[str]:
    """Names inside a layer kept by fnmatch patterns on the full name (`prefix.name`) or the name inside the layer:
    any include (default all), no exclude."""
    full = lambda n: f"{prefix}.{n}" if prefix else n
    kept = [n for n in names if not include or matches(full(n), n, include)]
    return [n for n in kept if not exclude or not matches(full(n), n, exclude)]


@dataclass
class Kept:
    """A matrix in scope left dense, with the reason."""

    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    reason: str


@dataclass
class LayerScope:
    """One decoder layer's matrices: the Linears and expert slices to prune (name inside the layer -> [out, in]
    view), the experts modules that hold the slices, and what stays dense."""

    linears: dict[str, nn.Module] = field(default_factory=dict)
    experts: dict[str, nn.Module] = field(default_factory=dict)
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    kept: list[Kept] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)

    def expert_name(self, path: str, expert: int, projection: str) -> str:
        return f"{path}.{expert}.{projection}"


def _kept(name: str, w: torch.Tensor, reason: str) -> Kept:
    """A matrix kept dense; its zeros are -1 while its weights are not loaded (an offloaded layer's, on meta)."""
    return Kept(name, tuple(w.shape), w.numel(), -1 if w.is_meta else int((w == 0).sum()), reason)


def layer_scope(layer: nn.Module, include: tuple[str, ...] | list[str] | None = None,
                exclude: tuple[str, ...] | list[str] | None = None, prefix: str = "") -> LayerScope:
    """Sort every matrix of `layer` (whose full module name is `prefix`) into pruned, kept dense (with the reason)
    or unsupported."""
    scope = LayerScope()
    modules = dict(layer.named_modules())
    experts = {name: m for name, m in modules.items() if name and is_experts(m)}
    routers = set()
    for path, m in experts.items():
        parent = modules[path.rpartition(".")[0]]
        for name, p in parent.named_parameters():
            own = name.startswith(path.rpartition(".")[2] + ".")
            if not own and name.count(".") <= 1 and p.dim() == 2 and p.shape[0] == m.num_experts:
                routers.add(id(p))
    accounted = set()
    candidates: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        if name and is_linear(m):
            accounted.add(id(m.weight))
            if id(m.weight) in routers:
                scope.kept.append(_kept(name, weight_matrix(m), ROUTER))
            else:
                candidates[name] = weight_matrix(m)
                scope.linears[name] = m
    for path, m in experts.items():
        for projection in PROJECTIONS:
            for attr in (projection, f"{projection}_bias"):
                p = getattr(m, attr, None)
                if isinstance(p, torch.Tensor):
                    accounted.add(id(p))
        for projection in projections(m):
            for e in range(m.num_experts):
                candidates[scope.expert_name(path, e, projection)] = expert_matrix(m, projection, e)
        scope.experts[path] = m
    for name, p in layer.named_parameters():
        if p.dim() < 2 or id(p) in accounted:
            continue
        short = name.removesuffix(".weight")
        if id(p) in routers:
            scope.kept.append(_kept(short, p.data, ROUTER))
        elif select([short], include, exclude, prefix):
            scope.unsupported.append(f"{short} {tuple(p.shape)}")
        else:
            scope.kept.append(_kept(short, p.data, USER))
    chosen = set(select(list(candidates), include, exclude, prefix))
    for name, w in candidates.items():
        if name in chosen:
            scope.targets[name] = w
        else:
            scope.kept.append(_kept(name, w, USER))
    scope.linears = {n: m for n, m in scope.linears.items() if n in chosen}
    return scope


def check_scope(prefix: str, scopes: list[LayerScope], pattern: Pattern) -> None:
    """Refuse, before any work, matrices PruneScope cannot prune and N:M patterns a matrix's width does not allow."""
    unsupported = [f"{prefix}.{i}.{u}" for i, s in enumerate(scopes) for u in s.unsupported]
    if unsupported:
        raise ValueError(f"cannot prune {len(unsupported)} weight matrices that are neither Linear, Conv1D nor fused "
                         f"experts: {', '.join(unsupported[:4])}{' ...' if len(unsupported) > 4 else ''}; keep them "
                         f"dense with --exclude (patterns match full names such as 'model.layers.0.mlp.gate' or "
                         f"names inside a layer)")
    if pattern.structured:
        bad = [(f"{prefix}.{i}.{n}", w.shape[1]) for i, s in enumerate(scopes) for n, w in s.targets.items()
               if w.shape[1] % pattern.m]
        if bad:
            raise ValueError(f"pattern {pattern} needs each pruned matrix's input width to be a multiple of "
                             f"{pattern.m}: {bad[0][0]} has {bad[0][1]}"
                             f"{f' (and {len(bad) - 1} more)' if len(bad) > 1 else ''}; exclude it with --exclude")
