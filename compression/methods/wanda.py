"""Wanda: score |W_ij| * ||X_j||_2 over the calibration tokens and remove the lowest of every output row."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compression.masks import nm_mask, per_row_mask
from compression.methods.base import Method, Statistics, chunked


class FeatureNorms(Statistics):
    """Sum over tokens of each input feature's square (Wanda's ||X_j||^2, up to a scale the ranking ignores)."""

    def __init__(self, d_in: int, device: torch.device) -> None:
        super().__init__(d_in, device)
        self.sq = torch.zeros(d_in, dtype=torch.float32, device=device)

    def add(self, x: torch.Tensor) -> None:
        super().add(x)
        chunked(x, lambda block: self.sq.add_(block.square().sum(0)))


@dataclass
class Wanda(Method):
    name = "wanda"

    def statistics(self, d_in: int, device: torch.device) -> FeatureNorms:
        return FeatureNorms(d_in, device)

    def prune(self, weights: list[torch.Tensor], stats: FeatureNorms) -> None:
        norms = stats.sq.sqrt()
        for w in weights:
            score = w.abs().float() * norms.to(w.device)
            mask = nm_mask(score, self.pattern) if self.pattern.structured else per_row_mask(score, self.sparsity)
            w.masked_fill_(mask, 0)
