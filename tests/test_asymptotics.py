"""Asymptotic orders judged as trends: local exponents, their intervals and trend, the verdict."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gdscope.experiments.asymptotics import local_exponents

WIDTHS = (64, 128, 256, 512, 1024, 2048)


def _points(exponent, noise=0.01, trials=3, seed=0):
    """``y = m^{e(m)}`` with multiplicative noise; ``exponent(log m)`` gives the local slope."""
    rng = np.random.default_rng(seed)
    pts = []
    for m in WIDTHS:
        log_y = exponent(math.log(m))
        pts += [(m, math.exp(log_y + noise * rng.standard_normal())) for _ in range(trials)]
    return pts


def test_pure_power_law_exact_slopes():
    pts = [(m, 3.0 * m**-0.75) for m in WIDTHS for _ in range(2)]
    le = local_exponents(pts, -0.5)
    assert le is not None
    assert np.allclose(le.slopes, -0.75)
    assert le.holds is True and "at or below" in le.reason


def test_steepening_toward_the_bound_holds():
    # local exponent -0.3 at m = 64, steepening by 0.05 per unit of log m: above -0.5 at first
    e0 = math.log(64)
    le = local_exponents(_points(lambda x: -0.3 * x - 0.025 * (x - e0) ** 2), -0.5)
    assert le is not None and le.trend is not None and le.trend_ci[1] < 0
    assert le.slopes[0] > -0.5  # above the bound at small width: a global fit would "fail"
    assert le.holds is True


def test_flat_exponent_above_the_bound_fails():
    le = local_exponents(_points(lambda x: -0.3 * x, noise=0.005), -0.5)
    assert le is not None
    assert le.cis[-1][0] > -0.5
    assert le.holds is False and "not approaching" in le.reason


def test_moving_away_fails():
    e0 = math.log(64)
    le = local_exponents(_points(lambda x: -0.45 * x + 0.02 * (x - e0) ** 2, noise=0.005), -0.5)
    assert le is not None and le.trend_ci[0] > 0
    assert le.holds is False


def test_exponent_at_the_bound_holds():
    le = local_exponents(_points(lambda x: -1.0 * x, noise=0.02), -1.0)
    assert le is not None
    lo, hi = le.cis[-1]
    assert lo <= -1.0 <= hi or hi <= -1.0
    assert le.holds is True


def test_noisy_above_is_undetermined():
    le = local_exponents(_points(lambda x: -0.45 * x, noise=0.4, trials=2), -0.5)
    assert le is not None
    assert le.holds is None


def test_interval_covers_true_local_exponent():
    hits = 0
    for seed in range(200):
        le = local_exponents(_points(lambda x: -0.6 * x, noise=0.05, seed=seed), -0.5)
        lo, hi = le.cis[-1]
        hits += lo <= -0.6 <= hi
    assert hits / 200 >= 0.9


@pytest.mark.parametrize(
    "pts",
    [
        [],
        [(64, 1.0), (64, 1.1)],  # one width
        [(64, 1.0), (128, 0.5)],  # no replicate: no variance
        [(64, -1.0), (128, 0.0), (128, math.nan)],  # nothing positive and finite
    ],
)
def test_too_little_data(pts):
    assert local_exponents(pts, -0.5) is None
