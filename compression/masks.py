"""Sparsity patterns and exact, deterministic selection of the weights to remove."""

from __future__ import annotations

import torch

from compression.patterns import Pattern


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th smallest (1-based) of a long 1-D tensor. A fixed sample brackets the answer so the exact
    selection runs on a small slice; a quickselect over millions of values is single-threaded and slow."""
    n = values.numel()
    if n <= 1 << 16:
        return values.kthvalue(k).values
    picks = torch.randint(n, (8192,), generator=torch.Generator().manual_seed(0)).to(values.device)
    sample = values[picks].sort().values
    q = k / n
    lo = sample[max(int((q - 0.01) * 8192), 0)]
    hi = sample[min(int((q + 0.01) * 8192), 8191)]
    below = int((values < lo).sum())
    inside = values[(values >= lo) & (values <= hi)]
    if below < k <= below + inside.numel():
        return inside.kthvalue(k - below).values
    return values.kthvalue(k).values


def lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k lowest entries of each row of `score` (last dim), ties broken by position, so the
    result equals taking the first k indices of a stable ascending sort, in O(n)."""
    if k <= 0:
        return torch.zeros_like(score, dtype=torch.bool)
    if k >= score.shape[-1]:
        return torch.ones_like(score, dtype=torch.bool)
    if score.shape[-1] > 1 << 16 and score[..., 0].numel() <= 8:
        flat = score.reshape(-1, score.shape[-1])
        kth = torch.stack([kth_smallest(row, k) for row in flat]).reshape(*score.shape[:-1], 1)
    else:
        kth = score.kthvalue(k, dim=-1, keepdim=True).values
    mask = score <= kth
    excess = mask.sum(-1) > k
    if excess.any():
        rows, kth_rows = score[excess], kth[excess]
        ties = rows == kth_rows
        need = k - (rows < kth_rows).sum(-1, keepdim=True)
        mask[excess] = (rows < kth_rows) | (ties & (ties.cumsum(-1) <= need))
    return mask


def nm_mask(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Remove the n lowest scores in every group of m consecutive columns of each row."""
    rows, cols = score.shape
    if cols % pattern.m:
        raise ValueError(f"pattern {pattern} needs the input width to be a multiple of {pattern.m}, got {cols}")
    return lowest(score.reshape(rows, cols // pattern.m, pattern.m), pattern.n).reshape(rows, cols)


def per_row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove int(cols * sparsity) lowest scores of every row."""
    return lowest(score, int(score.shape[1] * sparsity))


def per_matrix_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Remove int(numel * sparsity) lowest scores of the whole matrix."""
    return lowest(score.reshape(1, -1), int(score.numel() * sparsity)).reshape(score.shape)
