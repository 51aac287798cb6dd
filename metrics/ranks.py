"""Rank correlations along an axis, so one call scores every bootstrap resample of a set of runs at once."""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats


def spearman(x: np.ndarray, y: np.ndarray, axis: int = 0) -> np.ndarray:
    """Spearman's rho along `axis` (Pearson's r of the average ranks, as scipy.stats.spearmanr); NaN where either
    side is constant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(stats.pearsonr(stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis),
                                         axis=axis).statistic, dtype=float)


def kendall(x: np.ndarray, y: np.ndarray, axis: int = 0) -> np.ndarray:
    """Kendall's tau-b along `axis` (scipy.stats.kendalltau); NaN where either side is constant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(stats.kendalltau(x, y, axis=axis).statistic, dtype=float)


CORRELATIONS = {"spearman": spearman, "kendall": kendall}
