"""The contract every pruning method implements: the statistics it gathers and how it prunes with them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch

from compression.patterns import Pattern


class Statistics:
    """Per-input-feature calibration statistics shared by the Linears that read the same input."""

    def __init__(self, d_in: int, device: torch.device) -> None:
        self.d_in = d_in
        self.device = device
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a [tokens, d_in] block of inputs."""
        self.tokens += x.shape[0]


@dataclass
class Method:
    """A pruning method: which statistics it needs and how it turns weights + statistics into sparse weights."""

    name: ClassVar[str]
    needs_calibration: ClassVar[bool] = True
    pattern: Pattern = field(default_factory=Pattern)
    sparsity: float = 0.5

    def statistics(self, d_in: int, device: torch.device) -> Statistics:
        return Statistics(d_in, device)

    def prune(self, weights: list[torch.Tensor], stats: Statistics) -> None:
        """Prune, in place, [out, in] weight views that all read the same input."""
        raise NotImplementedError


def chunked(x: torch.Tensor, fn: Callable[[torch.Tensor], None], rows: int = 8192) -> None:
    """Apply fn to fp32 row blocks of x so that an fp32 copy of a huge activation never exists at once."""
    for start in range(0, x.shape[0], rows):
        fn(x[start:start + rows].float())
