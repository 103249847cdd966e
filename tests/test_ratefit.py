"""fit_rates: exact and noisy exponentials and power laws, interval coverage, bad curves."""

from __future__ import annotations

import numpy as np
import pytest

from gdscope.errors import InvalidArgumentError, NonFiniteError, ShapeMismatchError
from gdscope.theory.ratefit import fit_rates


def test_exact_exponential_recovered_and_preferred():
    t = np.arange(300)
    fit = fit_rates(2.5 * 0.97**t)
    assert fit.exponential_rate == pytest.approx(0.97, rel=1e-12)
    lo, hi = fit.exponential_rate_ci
    assert lo <= 0.97 <= hi and hi - lo < 1e-10
    assert fit.preferred == "exponential" and fit.decisive
    assert fit.residual_rate == pytest.approx(np.sqrt(0.97))
    assert fit.window == (150.0, 299.0)
    assert fit.exponential.r2 == pytest.approx(1.0)
    assert fit.power.r2 < 0.999


def test_exact_power_law_recovered_and_preferred():
    t = np.arange(1, 2001)
    fit = fit_rates(7.0 * t**-1.5, steps=t, tail=0.9)
    assert fit.power_exponent == pytest.approx(1.5, rel=1e-12)
    lo, hi = fit.power_exponent_ci
    assert lo <= 1.5 <= hi
    assert fit.preferred == "power" and fit.decisive
    assert "power" in fit.summary() and "exponential" in fit.summary()


def test_step_zero_is_left_out_of_the_power_fit():
    t = np.arange(0, 50)
    fit = fit_rates(np.exp(-0.1 * t), tail=1.0)
    assert fit.window[0] == 1.0
    assert fit.exponential.points == fit.power.points == 49
    assert any("step ≤ 0" in n for n in fit.notes)


@pytest.mark.parametrize("model", ["exponential", "power"])
def test_intervals_cover_the_truth_in_noisy_replicates(model):
    """Multiplicative log-normal noise: OLS intervals should cover ~95% of 200 replicates."""
    rng = np.random.default_rng(123)
    t = np.arange(1, 401)
    rho, p = 0.99, 0.8
    clean = 3.0 * rho**t if model == "exponential" else 3.0 * t**-p
    covered = right = 0
    reps = 200
    for _ in range(reps):
        noisy = clean * np.exp(0.05 * rng.standard_normal(t.size))
        fit = fit_rates(noisy, steps=t, tail=0.75, level=0.95)
        if model == "exponential":
            lo, hi = fit.exponential_rate_ci
            covered += lo <= rho <= hi
        else:
            lo, hi = fit.power_exponent_ci
            covered += lo <= p <= hi
        right += fit.preferred == model
    assert covered >= 0.85 * reps
    assert covered <= reps  # sanity
    assert right >= 0.95 * reps


def test_interval_level_is_honoured():
    rng = np.random.default_rng(0)
    t = np.arange(100)
    y = np.exp(-0.05 * t + 0.1 * rng.standard_normal(100))
    wide = fit_rates(y, level=0.99).exponential_rate_ci
    narrow = fit_rates(y, level=0.5).exponential_rate_ci
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_tail_as_count():
    y = 0.9 ** np.arange(40)
    fit = fit_rates(y, tail=10)
    assert fit.exponential.points == 10 and fit.window == (30.0, 39.0)


def test_bad_curves():
    with pytest.raises(InvalidArgumentError, match="at least 5"):
        fit_rates([1.0, 0.5, 0.25, 0.125, 0.06, 0.03], tail=0.5)
    with pytest.raises(InvalidArgumentError, match=r"losses\[3\] = 0.0 is not positive"):
        fit_rates([1.0, 0.5, 0.25, 0.0, 0.1, 0.1, 0.1])
    with pytest.raises(InvalidArgumentError, match=r"losses\[1\]"):
        fit_rates([1.0, -0.5, 0.25, 0.1, 0.1, 0.1])
    with pytest.raises(NonFiniteError, match=r"losses\[2\] = nan"):
        fit_rates([1.0, 0.5, float("nan"), float("inf"), 0.1, 0.1])
    with pytest.raises(ShapeMismatchError):
        fit_rates(np.ones((3, 3)))
    with pytest.raises(ShapeMismatchError):
        fit_rates(np.ones(10), steps=np.arange(9))
    with pytest.raises(InvalidArgumentError, match="increasing"):
        fit_rates(np.ones(10), steps=np.r_[np.arange(9), 3])
    with pytest.raises(InvalidArgumentError, match="level"):
        fit_rates(np.ones(10), level=1.5)
    with pytest.raises(InvalidArgumentError, match="tail"):
        fit_rates(np.ones(10), tail=0.0)
