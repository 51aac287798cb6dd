"""Confidence intervals by scipy's seeded bootstrap over a metric's natural unit (perplexity: windows; divergences:
samples; task scores: examples), for one model's metric and, paired over the same units, for a difference."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats

Statistic = Callable[..., np.ndarray]


def mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(x, axis=axis)


def exp_mean(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Perplexity from per-window mean NLLs (every window scores the same number of tokens)."""
    return np.exp(np.mean(x, axis=axis))


STATISTICS: dict[str, Statistic] = {"mean": mean, "exp_mean": exp_mean}


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: the confidence level, resamples, seed and scipy's method."""

    confidence: float = 0.95
    resamples: int = 2000
    seed: int = 0
    method: str = "BCa"

    def to_dict(self) -> dict:
        return {"confidence": self.confidence, "resamples": self.resamples, "seed": self.seed, "method": self.method}


def _bounds(data: tuple[np.ndarray, ...], statistic: Statistic, paired: bool, settings: Bootstrap,
            point: float) -> tuple[float, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = stats.bootstrap(data, statistic, paired=paired, vectorized=True, confidence_level=settings.confidence,
                                 n_resamples=settings.resamples, method=settings.method,
                                 rng=np.random.default_rng(settings.seed))
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if np.isnan(low) or np.isnan(high):
        spread = result.bootstrap_distribution
        if np.ptp(spread) == 0:
            return point, point
        low, high = (float(v) for v in np.percentile(spread, [50 * (1 - settings.confidence),
                                                              50 * (1 + settings.confidence)]))
    return low, high


def interval(values: Sequence[float], kind: str = "mean", settings: Bootstrap = Bootstrap()) -> list[float] | None:
    """[low, high] of a statistic ('mean', or 'exp_mean' for perplexity) over its units; None with under 2 units;
    zero width when every unit is equal."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return None
    statistic = STATISTICS[kind]
    point = float(statistic(x))
    if np.ptp(x) == 0:
        return [point, point]
    return list(_bounds((x,), statistic, False, settings, point))


def paired_difference(a: Sequence[float], b: Sequence[float], kind: str = "mean",
                      settings: Bootstrap = Bootstrap()) -> list[float] | None:
    """[low, high] of statistic(b) - statistic(a) where a[i] and b[i] were measured on the same unit (the same
    window, sample or example), resampling the units together; None with under 2 units."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"a paired interval needs the same units on both sides: {x.size} vs {y.size} values")
    if x.size < 2:
        return None
    base = STATISTICS[kind]

    def difference(u: np.ndarray, v: np.ndarray, axis: int = -1) -> np.ndarray:
        return base(v, axis=axis) - base(u, axis=axis)

    point = float(difference(x, y))
    if np.ptp(x) == 0 and np.ptp(y) == 0 or (kind == "mean" and np.ptp(y - x) == 0):
        return [point, point]
    return list(_bounds((x, y), difference, True, settings, point))
