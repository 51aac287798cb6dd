"""Magnitude pruning: remove the smallest |W|, one threshold per matrix as the references do (per row optional)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compression.masks import nm_mask, per_matrix_mask, per_row_mask
from compression.methods.base import Method, Statistics


@dataclass
class Magnitude(Method):
    name = "magnitude"
    needs_calibration = False
    per_row: bool = False

    def prune(self, weights: list[torch.Tensor], stats: Statistics) -> None:
        for w in weights:
            score = w.abs()
            if self.pattern.structured:
                mask = nm_mask(score, self.pattern)
            elif self.per_row:
                mask = per_row_mask(score, self.sparsity)
            else:
                mask = per_matrix_mask(score, self.sparsity)
            w.masked_fill_(mask, 0)
