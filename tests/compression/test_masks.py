"""Mask selection is exact, stable and equal to sorting; patterns and sparsities are validated."""

from __future__ import annotations

import pytest
import torch

from compression.masks import lowest, nm_mask, per_matrix_mask, per_row_mask
from compression.patterns import Pattern, check_sparsity, parse_pattern


def stable_sort_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(score, dim=-1, stable=True).indices[..., :k]
    return torch.zeros_like(score, dtype=torch.bool).scatter_(-1, order, True)


@pytest.mark.parametrize("k", [0, 1, 7, 16, 31, 32])
def test_lowest_equals_stable_sort_even_with_many_ties(k):
    g = torch.Generator().manual_seed(k)
    score = torch.randint(0, 4, (50, 32), generator=g).float()
    assert torch.equal(lowest(score, k), stable_sort_mask(score, k))
    assert (lowest(score, k).sum(-1) == k).all()


def test_lowest_without_ties_matches_sort():
    score = torch.rand(40, 100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(lowest(score, 37), stable_sort_mask(score, 37))


def test_per_row_and_per_matrix_counts_are_exact():
    score = torch.rand(12, 30, generator=torch.Generator().manual_seed(2)).round(decimals=1)
    assert (per_row_mask(score, 0.5).sum(1) == 15).all()
    assert per_matrix_mask(score, 0.3).sum() == int(360 * 0.3)


@pytest.mark.parametrize("text,n,m", [("2:4", 2, 4), ("4:8", 4, 8), ("1:3", 1, 3)])
def test_nm_mask_every_group_exact(text, n, m):
    pattern = parse_pattern(text)
    score = torch.rand(9, 4 * m, generator=torch.Generator().manual_seed(3))
    mask = nm_mask(score, pattern)
    assert (mask.reshape(9, 4, m).sum(-1) == n).all()
    kept = score.masked_fill(mask, float("inf")).reshape(9, 4, m).min(-1).values
    dropped = score.masked_fill(~mask, float("-inf")).reshape(9, 4, m).max(-1).values
    assert (dropped <= kept).all()


@pytest.mark.parametrize("text", ["2:2", "4:2", "0:4", "2-4", "dense", ""])
def test_bad_patterns_are_rejected_with_the_value(text):
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(text)


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_sparsity_outside_unit_interval_is_rejected(value):
    with pytest.raises(ValueError, match=f"sparsity {value}"):
        check_sparsity(value, Pattern())


def test_sparsity_must_match_nm_pattern():
    assert check_sparsity(0.5, Pattern(2, 4)) == 0.5
    with pytest.raises(ValueError, match="does not match pattern 2:4"):
        check_sparsity(0.6, Pattern(2, 4))


def test_nm_needs_divisible_width():
    with pytest.raises(ValueError, match="multiple of 4"):
        nm_mask(torch.rand(2, 6), Pattern(2, 4))


@pytest.mark.parametrize("k", [1, 1000, 150_000, 299_999, 300_000])
def test_kth_of_long_rows_is_exact(k):
    score = torch.rand(1, 300_000, generator=torch.Generator().manual_seed(k)).round(decimals=3)
    assert torch.equal(lowest(score, k), stable_sort_mask(score, k))
