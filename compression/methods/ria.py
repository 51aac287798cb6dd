"""RIA, relative importance and activations (Zhang et al., ICLR 2024): Wanda's score with |W_ij| replaced by its
importance relative to its row and its column, |W_ij| / sum_k |W_ik| + |W_ij| / sum_k |W_kj|, times ||X_j||_2 ** a;
the lowest of every output row are removed (no channel permutation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compression.masks import nm_mask, per_row_mask
from compression.methods.base import Method
from compression.methods.wanda import FeatureNorms


def ria_score(w: torch.Tensor, sq: torch.Tensor, a: float) -> torch.Tensor:
    """RIA's score of an [out, in] weight, from the inputs' per-feature sums of squares."""
    magnitude = w.abs().float()
    relative = magnitude / magnitude.sum(1, keepdim=True) + magnitude / magnitude.sum(0, keepdim=True)
    return relative.nan_to_num(0.0) * sq.to(w.device).sqrt().pow(a)


@dataclass
class RIA(Method):
    name = "ria"
    a: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.a, bool) or not isinstance(self.a, (int, float)) or not self.a >= 0:
            raise ValueError(f"RIA's exponent a {self.a!r} is not allowed: use a non-negative number such as 0.5")

    def statistics(self, d_in: int, device: torch.device) -> FeatureNorms:
        return FeatureNorms(d_in, device)

    def prune(self, weights: list[torch.Tensor], stats: FeatureNorms) -> None:
        for w in weights:
            score = ria_score(w, stats.sq, self.a)
            mask = nm_mask(score, self.pattern) if self.pattern.structured else per_row_mask(score, self.sparsity)
            w.masked_fill_(mask, 0)
