"""Bootstrap intervals equal scipy.stats.bootstrap on the same units and seed; degenerate and paired cases."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from metrics.intervals import Bootstrap, interval, paired_difference


def test_an_interval_is_scipy_s_bootstrap_on_the_same_units_and_seed():
    values = np.random.default_rng(3).normal(0.4, 0.2, size=30)
    expected = stats.bootstrap((values,), np.mean, n_resamples=2000, rng=np.random.default_rng(0)).confidence_interval
    assert interval(values) == pytest.approx([expected.low, expected.high], rel=1e-12)
    nll = np.random.default_rng(4).normal(3.0, 0.1, size=12)
    ppl = stats.bootstrap((nll,), lambda x, axis=-1: np.exp(np.mean(x, axis=axis)), n_resamples=2000,
                          rng=np.random.default_rng(0)).confidence_interval
    assert interval(nll, "exp_mean") == pytest.approx([ppl.low, ppl.high], rel=1e-12)


def test_equal_units_give_a_zero_width_interval_and_one_unit_none():
    assert interval([0.25] * 10) == [0.25, 0.25]
    assert paired_difference([1.0, 0.0, 1.0], [1.0, 0.0, 1.0]) == [0.0, 0.0]
    assert interval([0.5]) is None and paired_difference([1.0], [0.0]) is None


def test_a_paired_interval_is_narrower_than_the_unpaired_one_on_correlated_data():
    rng = np.random.default_rng(5)
    dense = rng.normal(0.5, 0.3, size=60)
    pruned = dense - 0.1 + rng.normal(0, 0.02, size=60)
    low, high = paired_difference(dense, pruned)
    unpaired = stats.bootstrap((dense, pruned), lambda a, b, axis=-1: np.mean(b, axis) - np.mean(a, axis),
                               n_resamples=2000, rng=np.random.default_rng(0)).confidence_interval
    assert low < -0.1 < high and high - low < (unpaired.high - unpaired.low) / 5
    with pytest.raises(ValueError, match="same units"):
        paired_difference([1.0, 2.0], [1.0])
    assert Bootstrap().to_dict() == {"confidence": 0.95, "resamples": 2000, "seed": 0, "method": "BCa"}
