"""The ODE limits of theory/ode.py against scipy's solve_ivp and against the discrete runs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.linalg import expm

from gdscope.errors import InvalidArgumentError
from gdscope.theory.ode import (
    gradient_flow,
    gradient_flow_residuals,
    heavy_ball_gamma,
    heavy_ball_ode,
    heavy_ball_ode_rate,
    momentum_time,
    nesterov_ode,
)

S = np.linspace(0.0, 12.0, 61)


def _ivp(rhs, y0, s, s0=0.0):
    sol = solve_ivp(rhs, (s0, s[-1]), y0, t_eval=s, method="DOP853", rtol=1e-12, atol=1e-14)
    assert sol.success
    return sol.y[0]


@pytest.mark.parametrize(
    "lam, gamma",
    [
        (1.0, 5.0),  # overdamped
        (0.3, 0.5),  # underdamped
        (4.0, 4.0),  # critically damped: γ² = 4λ'
        (1.0, 2.0 + 1e-9),  # just overdamped (κ tiny: no cancellation)
        (2.5, 0.0),  # undamped
        (0.0, 1.0),  # flat mode
    ],
)
@pytest.mark.parametrize("e0, de0", [(1.0, 0.0), (-0.7, 2.0)])
def test_heavy_ball_ode_matches_solve_ivp(lam, gamma, e0, de0):
    ref = _ivp(lambda s, y: [y[1], -gamma * y[1] - lam * y[0]], [e0, de0], S)
    got = heavy_ball_ode(lam, gamma, S, e0, de0)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10 * (abs(e0) + abs(de0)))


def test_heavy_ball_ode_broadcasts_and_large_times_stay_finite():
    lam = np.array([0.01, 1.0, 100.0])
    table = heavy_ball_ode(lam[:, None], 3.0, S[None, :])
    assert table.shape == (3, S.size)
    for i, l_ in enumerate(lam):
        np.testing.assert_allclose(table[i], heavy_ball_ode(l_, 3.0, S), rtol=0, atol=0)
    far = heavy_ball_ode(1e-4, 50.0, np.array([1e5, 1e6]))  # κs ≫ 700: cosh alone overflows
    assert np.all(np.isfinite(far)) and np.all(far > 0)


def test_heavy_ball_ode_rate_is_the_decay_of_the_solution():
    for lam, gamma in [(1.0, 5.0), (0.3, 0.5), (1.0, 2.0)]:
        rate = float(heavy_ball_ode_rate(lam, gamma))
        s = np.array([40.0, 60.0])
        e = np.abs(heavy_ball_ode(lam, gamma, s, 1.0, 0.0))
        if gamma**2 >= 4 * lam:  # monotone: the log slope is the rate (up to the prefactor)
            slope = -np.log(e[1] / e[0]) / 20.0
            assert slope == pytest.approx(rate, rel=0.05)
        else:  # oscillating: the envelope exp(−γs/2)
            assert rate == pytest.approx(gamma / 2)
    # best friction γ = 2√λ'_min gives rate √λ'_min
    assert float(heavy_ball_ode_rate(0.25, 1.0)) == pytest.approx(0.5)


@pytest.mark.parametrize("r", [3.0, 5.0, 1.5])
@pytest.mark.parametrize("lam", [0.2, 1.0, 7.0])
def test_nesterov_ode_bessel_matches_solve_ivp(r, lam):
    # Start off the singular point with the Frobenius series derived from the ODE itself:
    # e = Σ c_m s^{2m}, c_m = −λ' c_{m−1}/(2m(2m + r − 1)).
    s0 = 1e-2
    c = [1.0]
    for m in range(1, 12):
        c.append(-lam * c[-1] / (2 * m * (2 * m + r - 1)))
    e_s0 = sum(cm * s0 ** (2 * m) for m, cm in enumerate(c))
    de_s0 = sum(2 * m * cm * s0 ** (2 * m - 1) for m, cm in enumerate(c) if m)
    s = np.linspace(s0, 15.0, 80)
    ref = _ivp(lambda t, y: [y[1], -(r / t) * y[1] - lam * y[0]], [e_s0, de_s0], s, s0)
    got = nesterov_ode(lam, s, r=r)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-10)


def test_nesterov_ode_small_s_limit_and_envelope():
    # s → 0: e → e0 continuously (series branch meets Bessel branch)
    x = np.array([0.0, 1e-8, 0.5e-2, 0.999e-2, 1.001e-2, 2e-2])
    for r in (3.0, 5.0):
        e = nesterov_ode(1.0, x, r=r, e0=2.0)
        assert e[0] == 2.0
        ref = 2.0 * (1 - x**2 / (2 * (r + 1)) + x**4 / (8 * (r + 1) * (r + 3)))
        np.testing.assert_allclose(e, ref, rtol=1e-12)
    # r = 3, ν = 1: e = Γ(2)(2/x) J_1(x) = 2 J_1(x)/x
    from scipy.special import j1

    xs = np.linspace(0.1, 30, 50)
    np.testing.assert_allclose(nesterov_ode(1.0, xs, r=3.0), 2 * j1(xs) / xs, rtol=1e-13)
    # envelope s^{−r/2}: peaks of |e| s^{r/2} stay bounded and non-vanishing for large s
    s = np.linspace(50, 400, 20001)
    for r in (3.0, 5.0):
        env = np.abs(nesterov_ode(1.0, s, r=r)) * s ** (r / 2)
        lo, hi = env[: s.size // 2].max(), env[s.size // 2 :].max()
        assert hi / lo == pytest.approx(1.0, rel=0.02)


def test_gradient_flow_matches_matrix_exponential():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((6, 4))
    K = A @ A.T  # rank 4 of 6
    r0 = rng.standard_normal(6)
    q = 0.3
    s = np.array([0.0, 0.5, 2.0])
    got = gradient_flow_residuals(K, r0, s, q=q)
    for i, si in enumerate(s):
        np.testing.assert_allclose(got[i], expm(-si * q * K) @ r0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gradient_flow(2.0, s, 3.0), 3.0 * np.exp(-2.0 * s))
    ref = _ivp(lambda t, y: [-1.3 * y[0]], [0.4], S)
    np.testing.assert_allclose(gradient_flow(1.3, S, 0.4), ref, rtol=1e-10, atol=1e-12)


def test_discrete_heavy_ball_tends_to_its_ode():
    """β = 1 − γ√η, s = t√η: the discrete heavy ball approaches the ODE as η → 0."""
    lam, gamma, s_end = 1.0, 0.8, 6.0
    errs = []
    for lr in (1e-2, 1e-3, 1e-4):
        beta = 1 - gamma * np.sqrt(lr)
        assert heavy_ball_gamma(beta, lr) == pytest.approx(gamma)
        steps = round(s_end / np.sqrt(lr))
        e_prev = e = 1.0
        for _ in range(steps):
            e, e_prev = e - lr * lam * e + beta * (e - e_prev), e
        s = float(momentum_time(steps, lr))
        errs.append(abs(e - float(heavy_ball_ode(lam, gamma, s))))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 5e-3


def test_ode_bad_arguments():
    with pytest.raises(InvalidArgumentError, match="r="):
        nesterov_ode(1.0, S, r=0)
    with pytest.raises(InvalidArgumentError, match="lam_prime"):
        heavy_ball_ode(-1.0, 1.0, S)
    with pytest.raises(InvalidArgumentError, match="s must be"):
        gradient_flow(1.0, -1.0)
    with pytest.raises(InvalidArgumentError, match="lr"):
        momentum_time(3, 0.0)
