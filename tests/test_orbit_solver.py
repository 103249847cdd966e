"""Newton's method for periodic orbits of GD, against closed forms and dense Floquet multipliers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gdscope as gs
from gdscope.errors import InvalidArgumentError
from gdscope.theory.orbit_solver import solve_orbit

DT = torch.float64


class Scalar(nn.Module):
    """One parameter ``x``; the output is ``x`` whatever the input."""

    def __init__(self, x0: float) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor([x0], dtype=DT))

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        return self.x.expand(inp.shape[0], 1)


def quartic(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``L(x) = (x² − 1)²/4``: minima at ±1 with ``L'' = 2``, GD threshold ``η = 1``."""
    return ((out**2 - 1) ** 2 / 4).mean()


def _quartic_problem() -> gs.Problem:
    return gs.Problem(Scalar(1.0), quartic, (torch.zeros(1, 1, dtype=DT), torch.zeros(1, 1)))


def _exact_two_cycles(eta: float) -> np.ndarray:
    """Real roots of ``G(G(x)) = x`` for ``G(x) = x − ηx(x² − 1)`` that are not fixed points."""
    P = np.polynomial.Polynomial
    g = P([0, 1 + eta, 0, -eta])
    roots = (g(g) - P([0, 1])).roots()
    real = roots[np.abs(roots.imag) < 1e-9].real
    return np.array([r for r in real if min(abs(r), abs(r - 1), abs(r + 1)) > 1e-6])


@pytest.mark.parametrize(("eta", "stable"), [(1.1, True), (1.2, True), (1.3, False)])
def test_quartic_two_cycle_matches_the_closed_form(eta, stable):
    # the cycle born at η = 1 around the minimum x = 1 (period doubling), not the symmetric ±a one
    exact = np.array([r for r in _exact_two_cycles(eta) if 0 < r < 1.5])
    assert exact.size == 2
    a0 = float(max(exact)) + 1e-2  # start 1e-2 off the cycle
    sol = solve_orbit(_quartic_problem(), eta, 2, start=torch.tensor([a0]))
    assert sol.converged and sol.kind == "cycle"
    pts = np.sort(sol.points.ravel())
    nearest = np.array([exact[np.argmin(np.abs(exact - p))] for p in pts])
    np.testing.assert_allclose(pts, nearest, atol=1e-12)
    a, b = pts
    mu = (1 - eta * (3 * a * a - 1)) * (1 - eta * (3 * b * b - 1))  # Floquet multiplier
    np.testing.assert_allclose(sol.multipliers.real, [mu], atol=1e-10)
    assert sol.stable is stable  # GD could never show the unstable one: Newton finds it anyway


def test_fixed_point_is_not_called_a_cycle():
    sol = solve_orbit(_quartic_problem(), 1.2, 2, start=torch.tensor([1.0 + 1e-9]))
    assert sol.converged and sol.kind == "fixed point"
    assert any("fixed point" in n for n in sol.notes)


class TwoParam(nn.Module):
    """``f(x) = v·tanh(w x)``: a two-parameter network."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.5], dtype=DT))
        self.v = nn.Parameter(torch.tensor([0.5], dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.v * torch.tanh(self.w * x)


def _dense_monodromy(points: np.ndarray, eta: float, X, Y) -> np.ndarray:
    """``∏ (I − ηH(θ_i))`` with Hessians from ``torch.autograd.functional.hessian``."""

    def loss(theta: torch.Tensor) -> torch.Tensor:
        w, v = theta[0], theta[1]
        return torch.mean((v * torch.tanh(w * X) - Y) ** 2)

    M = np.eye(2)
    for p in points:
        H = torch.autograd.functional.hessian(loss, torch.tensor(p, dtype=DT)).numpy()
        M = (np.eye(2) - eta * H) @ M
    return M


def test_two_parameter_network_orbit_and_dense_multipliers():
    X = torch.tensor([[1.0], [-0.5]], dtype=DT)
    Y = torch.tensor([[1.0], [-0.3]], dtype=DT)
    eta = 1.5
    model = TwoParam()
    prob = gs.Problem(model, "mse", (X, Y))
    theta = prob.flatten(prob.params).clone()
    for _ in range(400):  # GD settles near a 2-cycle (sharpness above 2/η)
        theta = theta - eta * prob.gradient(prob.unflatten(theta))
    sol = solve_orbit(prob, eta, 2, start=theta)
    assert sol.converged and sol.kind == "cycle" and sol.residual < 1e-10
    # the solved points are an exact 2-cycle of the GD map, checked independently
    p0, p1 = (torch.tensor(p, dtype=DT) for p in sol.points)
    g = lambda t: prob.gradient(prob.unflatten(t))  # noqa: E731
    assert torch.allclose(p0 - eta * g(p0), p1, atol=1e-10)
    assert torch.allclose(p1 - eta * g(p1), p0, atol=1e-10)
    dense = np.linalg.eigvals(_dense_monodromy(sol.points, eta, X, Y))
    np.testing.assert_allclose(np.sort_complex(sol.multipliers), np.sort_complex(dense), atol=1e-8)
    assert sol.stable is True and sol.spectral_radius < 1  # GD itself settled on it
    assert sol.hvps > 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"lr": "1"}, "lr"),
        ({"lr": 1.0, "period": 0}, "period"),
        ({"lr": 1.0, "period": 2.0}, "period"),
        ({"lr": 1.0, "tol": 1.0}, "tol"),
        ({"lr": 1.0, "max_iter": 0}, "max_iter"),
        ({"lr": 1.0, "start": torch.zeros(3)}, "start"),
        ({"lr": 1.0, "start": torch.tensor([float("nan")])}, "start"),
        ({"lr": 1.0, "lsmr_iter": 0}, "lsmr_iter"),
        ({"lr": 1.0, "max_hvps": 1.5}, "max_hvps"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(InvalidArgumentError, match=match):
        solve_orbit(_quartic_problem(), **kwargs)


def test_cost_caps_stop_newton_and_say_so():
    X = torch.tensor([[1.0], [-0.5]], dtype=DT)
    Y = torch.tensor([[1.0], [-0.3]], dtype=DT)
    prob = gs.Problem(TwoParam(), "mse", (X, Y))
    start = prob.flatten(prob.params).clone()  # far from any orbit: Newton needs many steps
    capped = solve_orbit(prob, 1.5, 2, start=start, max_hvps=1)
    assert not capped.converged and len(capped.history) == 2  # one Newton step, then the cap
    assert any("max_hvps" in n for n in capped.notes)
    assert capped.hvps <= 2 * 2 * 2 * 2 + 2  # one LSMR solve (P = 2: at most 8 iterations)
    short = solve_orbit(prob, 1.5, 2, start=start, max_iter=2, lsmr_iter=1)
    assert short.hvps <= 2 * (2 * 2 * 2 + 4)  # ≤ 2 Newton steps of 1 LSMR iteration (+ setup)
    assert len(short.history) <= 2
