"""Confidence intervals by scipy's seeded bootstrap over a metric's natural unit (perplexity: windows; divergences:
samples; task scores: examples), for one model's metric and, paired over the same units, for a difference or a
ratio; and for any statistic of several independent sets of units (a rank correlation across runs)."""

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


def _run(data: tuple[np.ndarray, ...], statistic: Statistic, paired: bool, settings: Bootstrap):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stats.bootstrap(data, statistic, paired=paired, vectorized=True, confidence_level=settings.confidence,
                               n_resamples=settings.resamples, method=settings.method,
                               rng=np.random.default_rng(settings.seed))


def _percentiles(spread: np.ndarray, settings: Bootstrap) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bounds over the finite resamples, where BCa has none (a degenerate or discrete distribution)."""
    tails = [50 * (1 - settings.confidence), 50 * (1 + settings.confidence)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        low, high = np.nanpercentile(np.where(np.isfinite(spread), spread, np.nan), tails, axis=-1)
    return low, high


def _bounds(data: tuple[np.ndarray, ...], statistic: Statistic, paired: bool, settings: Bootstrap,
            point: float) -> tuple[float, float]:
    result = _run(data, statistic, paired, settings)
    low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    if np.isnan(low) or np.isnan(high):
        spread = result.bootstrap_distribution
        if np.ptp(spread) == 0:
            return point, point
        low, high = (float(v) for v in _percentiles(spread, settings))
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


def _paired(a: Sequence[float], b: Sequence[float], kind: str, settings: Bootstrap,
            combine: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> list[float] | None:
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"a paired interval needs the same units on both sides: {x.size} vs {y.size} values")
    if x.size < 2:
        return None
    base = STATISTICS[kind]

    def compared(u: np.ndarray, v: np.ndarray, axis: int = -1) -> np.ndarray:
        return combine(base(v, axis=axis), base(u, axis=axis))

    point = float(compared(x, y))
    if np.ptp(x) == 0 and np.ptp(y) == 0:
        return [point, point]
    return list(_bounds((x, y), compared, True, settings, point))


def paired_difference(a: Sequence[float], b: Sequence[float], kind: str = "mean",
                      settings: Bootstrap = Bootstrap()) -> list[float] | None:
    """[low, high] of statistic(b) - statistic(a) where a[i] and b[i] were measured on the same unit (the same
    window, sample or example), resampling the units together; None with under 2 units."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape == y.shape and x.size >= 2 and kind == "mean" and np.ptp(y - x) == 0:
        return [float(np.mean(y - x))] * 2
    return _paired(x, y, kind, settings, np.subtract)


def paired_ratio(a: Sequence[float], b: Sequence[float], kind: str = "exp_mean",
                 settings: Bootstrap = Bootstrap()) -> list[float] | None:
    """[low, high] of statistic(b) / statistic(a) over paired units (a perplexity ratio over the same windows)."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape == y.shape and x.size >= 2 and kind == "exp_mean" and np.ptp(y - x) == 0:
        return [float(np.exp(np.mean(y - x)))] * 2
    return _paired(x, y, kind, settings, np.divide)


def over_units(statistic: Statistic, sizes: Sequence[int],
               settings: Bootstrap = Bootstrap()) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A vector-valued statistic of several independent sets of units (say the windows, samples and examples every
    run of a study was measured on), each set resampled on its own and the same draw used for every run: scipy's
    bootstrap over the sets' index arrays. `statistic(*indices, axis=-1)` gets one integer index array per set
    (resamples batched along leading axes) and returns its k values first: shape [k, *batch]. Returns the point
    values and the low and high bounds, each of shape [k] (NaN where a value is undefined)."""
    if any(size < 2 for size in sizes):
        raise ValueError(f"every set of units needs at least 2 units to resample: got sizes {list(sizes)}")
    indices = tuple(np.arange(size) for size in sizes)
    point = np.asarray(statistic(*indices, axis=-1), dtype=float)
    result = _run(indices, statistic, False, settings)
    low = np.atleast_1d(np.asarray(result.confidence_interval.low, dtype=float))
    high = np.atleast_1d(np.asarray(result.confidence_interval.high, dtype=float))
    fallback_low, fallback_high = _percentiles(np.asarray(result.bootstrap_distribution).reshape(len(low), -1),
                                               settings)
    missing = np.isnan(low) | np.isnan(high)
    low, high = np.where(missing, fallback_low, low), np.where(missing, fallback_high, high)
    return point, low, high
