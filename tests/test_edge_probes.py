"""Self-stabilization probes vs dense float64 oracles on a tiny model (gdscope.probes.edge)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

import gdscope as gs
from gdscope.errors import InvalidArgumentError
from gdscope.probes import CatapultProbe, ProbeState, SelfStabilizationProbe
from gdscope.probes.edge import (
    catapult_window,
    projected_gradient_variance,
    sgd_sharpness_gap,
)

torch.set_num_threads(1)


def _problem(loss: str = "mse", n: int = 7, seed: int = 0) -> gs.Problem:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    if loss == "mse":
        Y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    else:
        Y = torch.randint(0, 2, (n,), generator=g)
    return gs.Problem(model, loss, (X, Y))


def _flat_loss(prob: gs.Problem, X: torch.Tensor, Y: torch.Tensor):  # type: ignore[no-untyped-def]
    def f(theta: torch.Tensor) -> torch.Tensor:
        return prob.batch_loss(prob.unflatten(theta), X, Y)

    return f


def _dense_top(prob: gs.Problem, theta: torch.Tensor) -> tuple[float, torch.Tensor]:
    (X, Y) = prob.full_batch  # type: ignore[misc]
    H = torch.autograd.functional.hessian(_flat_loss(prob, X, Y), theta)
    w, V = torch.linalg.eigh(0.5 * (H + H.T))
    return float(w[-1]), V[:, -1]


def _state(prob: gs.Problem, opt: torch.optim.Optimizer | None = None) -> ProbeState:
    return ProbeState(step=0, problem=prob, subset=prob, optimizer=opt, initial_params=prob.params)


def test_alpha_beta_match_finite_differences_of_the_dense_top_eigenvalue() -> None:
    prob = _problem()
    theta = prob.flatten(prob.params).detach().clone()
    lam, _ = _dense_top(prob, theta)
    h = 1e-5
    grad_S = torch.zeros_like(theta)
    for i in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[i] = h
        grad_S[i] = (_dense_top(prob, theta + e)[0] - _dense_top(prob, theta - e)[0]) / (2 * h)
    g = prob.gradient().double()
    out = SelfStabilizationProbe(tol=1e-10, max_matvecs=400).compute(_state(prob))
    assert out["ss_converged"] == 1.0
    assert out["ss_sharpness"] == pytest.approx(lam, rel=1e-8)
    assert out["ss_beta"] == pytest.approx(float(grad_S @ grad_S), rel=1e-5)
    assert out["ss_alpha"] == pytest.approx(float(-(g @ grad_S)), rel=1e-5, abs=1e-9)
    assert abs(out["ss_alpha"]) > 1e-6  # the check is not vacuous


def test_sigma2_matches_the_variance_over_every_minibatch() -> None:
    for loss in ("mse", "cross_entropy"):
        prob = _problem(loss, n=6)
        theta = prob.flatten(prob.params).detach()
        _, u = _dense_top(prob, theta)
        (X, Y) = prob.full_batch  # type: ignore[misc]
        for B in (1, 2, 4, 6):
            vals = []
            for idx in itertools.combinations(range(6), B):
                ix = torch.tensor(idx)
                gb = torch.func.grad(_flat_loss(prob, X[ix], Y[ix]))(theta)
                vals.append(float(u @ gb))
            v = torch.tensor(vals, dtype=torch.float64)
            oracle = float(v.var(unbiased=False))
            got = projected_gradient_variance(prob, u, B)
            assert got == pytest.approx(oracle, rel=1e-9, abs=1e-15), (loss, B)
            if B < 6:
                assert oracle > 1e-8


def test_sgd_gap_formula_and_probe_outputs() -> None:
    assert sgd_sharpness_gap(0.1, 2.0, 3.0, 0.5) == pytest.approx(0.1 * 3.0 * 0.5 / 8.0)
    assert math.isnan(sgd_sharpness_gap(0.1, -1.0, 3.0, 0.5))
    prob = _problem(n=8)
    opt = torch.optim.SGD(prob.model.parameters(), lr=0.05)
    out = SelfStabilizationProbe(batch_size=2, tol=1e-10).compute(_state(prob, opt))
    gap = sgd_sharpness_gap(0.05, out["ss_alpha"], out["ss_beta"], out["ss_sigma2"])
    if math.isnan(gap):
        assert math.isnan(out["sgd_gap"])
    else:
        assert out["sgd_gap"] == pytest.approx(gap)
        assert out["sgd_sharpness"] == pytest.approx(2 / 0.05 - gap)
    full = SelfStabilizationProbe(batch_size=8, lr=0.05, tol=1e-10).compute(_state(prob))
    assert full["ss_sigma2"] == 0.0


def _dense_gn_sharpness(prob: gs.Problem) -> float:
    (X, Y) = prob.full_batch  # type: ignore[misc]
    theta = prob.flatten(prob.params).detach()
    J = torch.autograd.functional.jacobian(
        lambda t: prob.forward(prob.unflatten(t), X).reshape(-1), theta
    )
    F = prob.outputs().detach().requires_grad_(True)
    Q = torch.autograd.functional.hessian(lambda o: prob.loss_fn(o, Y), F)
    Q = Q.reshape(F.numel(), F.numel())
    return float(torch.linalg.eigvalsh(J.T @ Q @ J)[-1])


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_catapult_window_from_the_dense_ntk(loss: str) -> None:
    prob = _problem(loss, n=6)
    lam = _dense_gn_sharpness(prob)
    probe = CatapultProbe(samples=64, lr=3.0 / lam)
    probe.start(prob)
    out = probe.compute(_state(prob))
    assert out["catapult_lambda0"] == pytest.approx(lam, rel=1e-9)
    assert out["catapult_lr_low"] == pytest.approx(2 / lam, rel=1e-9)
    assert out["catapult_lr_high"] == pytest.approx(4 / lam, rel=1e-9)
    assert out["catapult_phase"] == 1.0
    assert CatapultProbe(lr=1.0 / lam).compute(_state(prob))["catapult_phase"] == 0.0
    assert catapult_window(0.0)["catapult_lr_low"] == math.inf


def test_tracked_run_records_the_probes() -> None:
    prob = _problem(n=8)
    opt = gs.GD(prob.model.parameters(), lr=0.1)
    probes = [SelfStabilizationProbe(2, batch_size=4), CatapultProbe(5)]
    with gs.Tracker(prob, probes) as tr:
        gs.fit(prob, opt, 4, tr)
        _, a = tr.series("ss_alpha")
        _, lo = tr.series("catapult_lr_low")
    assert len(a) == 2 and len(lo) == 1


def test_bad_arguments_are_named() -> None:
    prob = _problem(n=5)
    u = torch.ones(prob.num_params, dtype=torch.float64)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        projected_gradient_variance(prob, u, 9)
    with pytest.raises(InvalidArgumentError, match="batch_size"):
        SelfStabilizationProbe(batch_size=0)
    with pytest.raises(InvalidArgumentError, match="lr"):
        SelfStabilizationProbe(lr=-1.0)
