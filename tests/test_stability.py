"""Stability of minima under GD/momentum/Adam/SGD (THEORY §3) against independent oracles.

Oracles never go through gdscope's HVP machinery: dense Hessians come from
``torch.autograd.functional.hessian`` of a loss rebuilt with ``functional_call`` and
``F.mse_loss``; ``E[·]`` over batches is an enumeration of all ``C(n, B)`` batches; SGD is
simulated directly (vectorized least-squares gradients, or ``torch.optim.SGD`` itself).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import gdscope as gs
from gdscope.errors import InvalidArgumentError
from gdscope.theory.sgd_stability import (
    SampleCurvature,
    noise_factor,
    second_moment_matrix,
    step_matrix,
)
from gdscope.theory.stability import optimizer_threshold, stability

DT = torch.float64


# ---------------------------------------------------------------------- fixtures and oracles
def linreg(n: int = 24, d: int = 60, seed: int = 0, zero_target: bool = False):
    """Over-parameterized least squares at its min-norm interpolating minimum (mse, k = 1)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DT)
    y = torch.zeros(n, 1, dtype=DT) if zero_target else X @ torch.randn(d, 1, generator=g, dtype=DT)
    model = nn.Linear(d, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_((torch.linalg.pinv(X) @ y).T)
    return gs.Problem(model, "mse", (X, y)), X, y


def sample_hessians_linreg(X: torch.Tensor) -> torch.Tensor:
    """``H_i = ∇²(x_iᵀθ − y_i)² = 2 x_i x_iᵀ`` (mean reduction, one output)."""
    return 2 * torch.einsum("ia,ib->iab", X, X)


def oracle_hessians(model: nn.Module, X, Y, reduction: str = "mean"):
    """Full and per-sample Hessians by ``torch.autograd.functional.hessian``."""
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def unflat(t):
        out, i = {}, 0
        for k, s in zip(names, shapes, strict=True):
            m = math.prod(s)
            out[k] = t[i : i + m].reshape(s)
            i += m
        return out

    def loss(t, x, y):
        return F.mse_loss(functional_call(model, unflat(t), (x,)), y, reduction=reduction)

    H = torch.autograd.functional.hessian(lambda t: loss(t, X, Y), theta0)
    scale = 1.0 if reduction == "mean" else X.shape[0]
    Hs = torch.stack(
        [
            scale
            * torch.autograd.functional.hessian(
                lambda t, i=i: loss(t, X[i : i + 1], Y[i : i + 1]), theta0
            )
            for i in range(X.shape[0])
        ]
    )
    return H, Hs


def enumerate_moment(Hs: torch.Tensor, lr: float, B: int, momentum=0.0, nesterov=False):
    """``E[A_ξ ⊗ A_ξ]`` by enumerating every batch; ``A_ξ`` built from scratch."""
    n, P = Hs.shape[0], Hs.shape[1]
    total = 0
    batches = list(itertools.combinations(range(n), B))
    eye = torch.eye(P, dtype=DT)
    for b in batches:
        G = Hs[list(b)].mean(0)
        if momentum == 0:
            A = eye - lr * G
        else:
            c, gam = (1 + momentum, momentum**2) if nesterov else (1.0, momentum)
            A = torch.cat(
                [
                    torch.cat([eye - lr * c * G, gam * eye], 1),
                    torch.cat([-lr * G, momentum * eye], 1),
                ],
                0,
            )
        total = total + torch.kron(A, A)
    return total / len(batches)


def tiny_mlp_minimum(seed: int = 0, n: int = 6):
    """tanh MLP 3-8-1 (P = 41) trained to interpolation of n = 6 points in float64."""
    torch.manual_seed(seed)
    X = torch.randn(n, 3, dtype=DT)
    Y = torch.randn(n, 1, dtype=DT)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=500,
        tolerance_grad=1e-14,
        tolerance_change=0,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(X), Y)
        loss.backward()
        return loss

    for _ in range(5):
        opt.step(closure)
    assert F.mse_loss(model(X), Y).item() < 1e-20
    return model, X, Y


# ---------------------------------------------------------------------- closed forms
def test_noise_factor_and_moment_formula_match_enumeration():
    """``E[H_ξ⊗H_ξ] = (1−p) H⊗H + (p/n) Σ H_i⊗H_i`` for sampling without replacement."""
    g = torch.Generator().manual_seed(1)
    n, P = 6, 3
    R = torch.randn(n, P, P, generator=g, dtype=DT)
    Hs = R + R.transpose(1, 2)  # symmetric, indefinite: the formula is purely combinatorial
    H = Hs.mean(0)
    for B in (1, 2, 4, 6):
        p = noise_factor(n, B)
        assert p == pytest.approx((n - B) / (B * (n - 1)))
        batches = list(itertools.combinations(range(n), B))
        enum = sum(torch.kron(Hs[list(b)].mean(0), Hs[list(b)].mean(0)) for b in batches)
        enum = enum / len(batches)
        formula = (1 - p) * torch.kron(H, H) + (p / n) * sum(torch.kron(h, h) for h in Hs)
        assert torch.allclose(enum, formula, atol=1e-12)
        # and the affine step-matrix version, with and without momentum
        for mom, nest in ((0.0, False), (0.7, False), (0.7, True)):
            T = second_moment_matrix(Hs, 0.3, B, mom, nest)
            assert torch.allclose(T, enumerate_moment(Hs, 0.3, B, mom, nest), atol=1e-12)
    assert noise_factor(1, 1) == 0.0
    with pytest.raises(InvalidArgumentError):
        noise_factor(5, 6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_step_matrices_reproduce_torch_sgd_with_momentum(nesterov):
    """The pair recursion z = (e_t, d_{t−1}) is exactly PyTorch's SGD(momentum, nesterov)."""
    prob, X, y = linreg(10, 6, seed=2)
    model = prob.model
    theta_star = model.weight.detach().clone().reshape(-1)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.weight.add_(0.1 * torch.randn(model.weight.shape, generator=g, dtype=DT))
    lr, mom, B = 0.05, 0.8, 3
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=mom, nesterov=nesterov)
    Hs = sample_hessians_linreg(X)
    e = model.weight.detach().reshape(-1) - theta_star
    z = torch.cat([e, torch.zeros_like(e)])
    for _ in range(30):
        idx = torch.randperm(10, generator=g)[:B]
        opt.zero_grad()
        F.mse_loss(model(X[idx]), y[idx]).backward()
        opt.step()
        z = step_matrix(Hs[idx].mean(0), lr, mom, nesterov) @ z
        e_torch = model.weight.detach().reshape(-1) - theta_star
        assert torch.allclose(z[:6], e_torch, atol=1e-12, rtol=1e-10)


def test_optimizer_thresholds():
    assert optimizer_threshold(0.1) == pytest.approx(20)
    assert optimizer_threshold(0.1, 0.9) == pytest.approx(2 * 1.9 / 0.1)
    assert optimizer_threshold(0.1, 0.9, True) == pytest.approx(2 * 1.9 / (2.8 * 0.1))


# ---------------------------------------------------------------------- per-sample curvature
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample_hessians_are_scaled_to_average_to_H(reduction):
    torch.manual_seed(0)
    X, Y = torch.randn(7, 3, dtype=DT), torch.randn(7, 2, dtype=DT)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    prob = gs.Problem(model, "mse", (X, Y), reduction=reduction)
    H, Hs_oracle = oracle_hessians(model, X, Y, reduction)
    curv = SampleCurvature(prob)
    Hs = curv.dense()
    assert torch.allclose(Hs, Hs_oracle, atol=1e-12)
    assert torch.allclose(Hs.mean(0), H, atol=1e-12)  # H = (1/n) Σ H_i exactly
    scale = 1.0 if reduction == "mean" else 7
    for i in (0, 4):  # through prob.subset, as the brief asks
        assert torch.allclose(Hs[i], scale * gs.dense_hessian(prob.subset([i])), atol=1e-12)
    idx = torch.tensor([[0, 3, 5], [1, 2, 6]])
    V = torch.randn(2, prob.num_params, dtype=DT)
    HV = curv.batch_matvec(idx, V)
    for c in range(2):
        sub = gs.dense_hessian(prob.subset(idx[c])) * (1.0 if reduction == "mean" else 7 / 3)
        assert torch.allclose(HV[c], sub @ V[c], atol=1e-12)
        assert torch.allclose(HV[c], Hs[idx[c]].mean(0) @ V[c], atol=1e-12)
    v = V[0]
    assert torch.allclose(curv.mean_square_matvec(v), (Hs @ Hs).mean(0) @ v, atol=1e-12)


def test_sum_reduction_is_mean_with_scaled_lr():
    """``L_sum = n L_mean``: the same dynamics at ``η_sum = η_mean / n``."""
    prob, X, y = linreg(12, 20, seed=4)
    prob_sum = gs.Problem(prob.model, "mse", (X, y), reduction="sum")
    a = stability(prob, 0.05, batch_size=3)
    b = stability(prob_sum, 0.05 / 12, batch_size=3)
    assert b.mean_square_rho == pytest.approx(a.mean_square_rho, rel=1e-10)
    assert b.mean_square_threshold * 12 == pytest.approx(a.mean_square_threshold, rel=1e-8)
    assert b.sharpness == pytest.approx(12 * a.sharpness, rel=1e-10)


# ---------------------------------------------------------------------- GD at a minimum
def test_gd_spectrum_against_dense_hessian_at_mlp_minimum():
    model, X, Y = tiny_mlp_minimum()
    prob = gs.Problem(model, "mse", (X, Y))
    H, _ = oracle_hessians(model, X, Y)
    h = torch.linalg.eigvalsh(H).flip(0)
    hmax = h[0].item()
    assert h[-1].item() > -1e-9 * hmax  # a minimum (tangent directions at ~0)
    # 2/lr between the 3rd and 4th eigenvalue: three above threshold
    lr = 2 / (0.5 * (h[2] + h[3])).item()
    for dense_limit in (10_000, 0):  # dense eigh and the Lanczos count loop
        rep = stability(prob, lr, dense_limit=dense_limit, tol=1e-10)
        assert rep.sharpness == pytest.approx(hmax, rel=1e-8)
        assert rep.mu_top == pytest.approx(math.log(abs(1 - lr * hmax)), rel=1e-8)
        assert rep.count_above == 3
        assert rep.gd_stable is False
        assert rep.is_saddle is False
        assert rep.threshold == pytest.approx(2 / lr)
        stable = stability(prob, 1.9 / hmax, dense_limit=dense_limit, tol=1e-10)
        assert stable.gd_stable is True and stable.count_above == 0
        assert stable.mu_top == pytest.approx(math.log(0.9), rel=1e-6)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_thresholds_and_mode_rate(nesterov):
    model, X, Y = tiny_mlp_minimum()
    prob = gs.Problem(model, "mse", (X, Y))
    hmax = stability(prob, 0.1).sharpness
    beta = 0.6
    f = 2 * (1 + beta) / ((1 + 2 * beta) if nesterov else 1)
    below = stability(prob, 0.97 * f / hmax, momentum=beta, nesterov=nesterov)
    above = stability(prob, 1.03 * f / hmax, momentum=beta, nesterov=nesterov)
    assert below.gd_stable is True and above.gd_stable is False
    assert above.count_above == 1 and below.count_above == 0
    # mu_top: log spectral radius of the top mode's 2×2 recursion, from its companion matrix
    a = 0.97 * f
    if nesterov:
        c1, c0 = (1 + beta) * (1 - a), -beta * (1 - a)
    else:
        c1, c0 = 1 + beta - a, -beta
    rad = np.abs(np.linalg.eigvals(np.array([[c1, c0], [1.0, 0.0]]))).max()
    assert below.mu_top == pytest.approx(math.log(rad), rel=1e-9)


def test_saddle_and_gradient_warning():
    torch.manual_seed(0)
    X, Y = torch.randn(10, 3, dtype=DT), torch.randn(10, 1, dtype=DT)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)
    prob = gs.Problem(model, "mse", (X, Y))
    H, _ = oracle_hessians(model, X, Y)
    assert torch.linalg.eigvalsh(H)[0] < -1e-3  # at init: indefinite
    with pytest.warns(RuntimeWarning, match="large for a minimum"):
        rep = stability(prob, 0.1)
    assert rep.is_saddle is True and rep.gd_stable is False
    assert rep.smallest == pytest.approx(torch.linalg.eigvalsh(H)[0].item(), rel=1e-8)
    assert rep.gradient_ratio > 1e-3
    assert any("not a minimum" in n for n in rep.notes)


# ---------------------------------------------------------------------- exact mean square
def test_rho_against_dense_enumerated_operator_full_rank():
    """n > P, indefinite per-sample Hessians (MLP, not at a minimum): R is all of R^P."""
    torch.manual_seed(1)
    X, Y = torch.randn(7, 2, dtype=DT), torch.randn(7, 1, dtype=DT)
    model = nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Linear(2, 1)).to(DT)  # P = 9
    prob = gs.Problem(model, "mse", (X, Y))
    _, Hs = oracle_hessians(model, X, Y)
    for lr in (0.05, 0.6):
        T = enumerate_moment(Hs, lr, 3)
        rho = np.abs(np.linalg.eigvals(T.numpy())).max()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            rep = stability(prob, lr, batch_size=3, flat_tol=1e-12)
        assert rep.normal_dim == 9
        assert rep.mean_square_rho == pytest.approx(rho, rel=1e-10)


def test_rho_on_the_normal_space_with_neutral_directions():
    """n < P: the enumerated operator on all P² matrices has eigenvalue 1 on neutral
    directions; compressed to matrices supported on range(H) it matches the report."""
    prob, X, _ = linreg(6, 10, seed=5)
    Hs = sample_hessians_linreg(X)
    U = torch.linalg.svd(X, full_matrices=False).Vh.T  # range(H) = row space of X
    UU = torch.kron(U, U)
    hmax = torch.linalg.eigvalsh(Hs.mean(0))[-1].item()
    for lr in (0.3 / hmax, 0.9 / hmax, 1.6 / hmax):
        T = enumerate_moment(Hs, lr, 2)
        full = torch.linalg.eigvalsh(T)[-1].item()
        assert full >= 1 - 1e-12  # neutral directions
        rho_R = torch.linalg.eigvalsh(UU.T @ T @ UU)[-1].item()
        rep = stability(prob, lr, batch_size=2)
        assert rep.normal_dim == 6
        assert rep.mean_square_rho == pytest.approx(rho_R, rel=1e-10)
        assert rep.sgd_mean_square_stable is (rho_R < 1)


def test_threshold_is_where_rho_crosses_one_and_bounds_are_ordered():
    prob, _, _ = linreg()
    rep = stability(prob, 0.01, batch_size=4)
    eta = rep.mean_square_threshold
    at = stability(prob, eta, batch_size=4)
    assert at.mean_square_rho == pytest.approx(1.0, abs=1e-9)
    assert at.sgd_mean_square_stable is None  # on the boundary: undetermined
    assert stability(prob, 0.999 * eta, batch_size=4).sgd_mean_square_stable is True
    assert stability(prob, 1.001 * eta, batch_size=4).sgd_mean_square_stable is False
    # Wu–Ma–E is sufficient (its threshold is smaller), 2/h_max is necessary (larger)
    assert rep.wu_ma_e_threshold < eta < 2 / rep.sharpness
    w = stability(prob, rep.wu_ma_e_threshold, batch_size=4)
    assert w.wu_ma_e == pytest.approx(1.0, abs=1e-9)
    # B = n: SGD is GD
    gd = stability(prob, 0.01, batch_size=24)
    assert gd.noise_factor == 0
    assert gd.mean_square_threshold == pytest.approx(2 / gd.sharpness, rel=1e-9)


def test_mean_square_verdicts_against_simulation():
    """n = 24, d = 60, B = 4 (THEORY §3): many SGD chains from θ* + small perturbation."""
    prob, X, y = linreg()
    theta_star = prob.model.weight.detach().reshape(-1)
    eta_star = stability(prob, 0.01, batch_size=4).mean_square_threshold
    n, B, chains = 24, 4, 400
    g = torch.Generator().manual_seed(11)
    for factor, stable in ((0.85, True), (1.15, False)):
        lr = factor * eta_star
        rep = stability(prob, lr, batch_size=4)
        assert rep.sgd_mean_square_stable is stable
        theta = theta_star + 1e-3 * (torch.randn(chains, n, generator=g, dtype=DT) @ X)
        e0 = ((theta - theta_star) ** 2).sum(1).mean()
        for _ in range(300):
            idx = torch.rand(chains, n, generator=g).argsort(1)[:, :B]
            Xb, yb = X[idx], y[idx, 0]  # (C, B, d), (C, B)
            r = torch.einsum("cbd,cd->cb", Xb, theta) - yb
            theta = theta - lr * (2 / B) * torch.einsum("cbd,cb->cd", Xb, r)
        e = ((theta - theta_star) ** 2).sum(1).mean()
        if stable:
            assert e < 1e-3 * e0
        else:
            assert e > 1e3 * e0


def test_second_moment_prediction_matches_monte_carlo():
    """tr T^t(e₀e₀ᵀ), iterated independently of gdscope, against the mean of ‖e_t‖²."""
    prob, X, _ = linreg(zero_target=True)
    Hs = sample_hessians_linreg(X)
    n, B, lr, t_end, chains = (
        24,
        4,
        0.9 * stability(prob, 0.01, batch_size=4).mean_square_threshold,
        40,
        6000,
    )
    p = (n - B) / (B * (n - 1))
    g = torch.Generator().manual_seed(5)
    e0 = X.T @ torch.randn(n, generator=g, dtype=DT)
    e0 = e0 / e0.norm()
    M = torch.outer(e0, e0)
    I = torch.eye(60, dtype=DT)
    A, As = I - lr * Hs.mean(0), I - lr * Hs
    for _ in range(t_end):
        M = (1 - p) * A @ M @ A + (p / n) * (As @ M @ As).sum(0)
    E = e0.expand(chains, 60).clone()
    for _ in range(t_end):  # e ← e − η (2/B) Σ_{i∈ξ} x_i x_iᵀ e
        idx = torch.rand(chains, n, generator=g).argsort(1)[:, :B]
        Xb = X[idx]
        E = E - lr * (2 / B) * torch.einsum("cbd,cb->cd", Xb, torch.einsum("cbd,cd->cb", Xb, E))
    sq = (E**2).sum(1)
    se = sq.std() / math.sqrt(chains)
    assert abs(sq.mean() - M.trace()) < 4 * se


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_rho_against_enumeration(nesterov):
    """Exact ρ(T) of the pair (e, d): dense (state 2r ≤ 32) and ARPACK (2r = 34)."""
    for n, d in ((7, 5), (17, 30)):
        prob, X, _ = linreg(n, d, seed=6)
        Hs = sample_hessians_linreg(X)
        U = torch.linalg.svd(X, full_matrices=False).Vh.T
        Hr = U.T @ Hs @ U
        hmax = torch.linalg.eigvalsh(Hr.mean(0))[-1].item()
        for lr in (0.3 / hmax, 1.0 / hmax):
            if n == 7:
                T = enumerate_moment(Hr, lr, 3, 0.5, nesterov)
            else:  # the formula (checked against enumeration above), A_i built here
                p, r = (n - 3) / (3 * (n - 1)), n
                As = torch.stack([enumerate_moment(h[None], lr, 1, 0.5, nesterov) for h in Hr])
                A = enumerate_moment(Hr.mean(0)[None], lr, 1, 0.5, nesterov)
                T = (1 - p) * A + (p / n) * As.sum(0)
                assert T.shape == (4 * r * r, 4 * r * r)
            rho = np.abs(np.linalg.eigvals(T.numpy())).max()
            rep = stability(
                prob, lr, momentum=0.5, nesterov=nesterov, batch_size=3, chains=2, lyapunov_steps=10
            )
            assert ("ARPACK" in rep.method["mean_square"]) is (n == 17)
            assert rep.mean_square_rho == pytest.approx(rho, rel=1e-7)
            assert rep.sgd_mean_square_stable is bool(rho < 1)
            assert rep.mean_square_threshold is None and rep.wu_ma_e is None


# ---------------------------------------------------------------------- Lyapunov exponents
def test_lyapunov_commuting_hessians_is_expected_log():
    """Diagonal per-sample Hessians: λ = max_j E log|1 − ηh_{ξ,j}|, by enumeration."""
    n, d, B = 8, 4, 3
    g = torch.Generator().manual_seed(7)
    c = 0.5 + 1.5 * torch.rand(n, generator=g, dtype=DT)
    X = torch.zeros(n, d, dtype=DT)
    X[torch.arange(n), torch.arange(n) % d] = c  # x_i = c_i e_{i mod d}: H_i diagonal
    y = torch.zeros(n, 1, dtype=DT)
    model = nn.Linear(d, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.zero_()
    prob = gs.Problem(model, "mse", (X, y))
    h_i = 2 * c**2
    hs = torch.zeros(n, d, dtype=DT)
    hs[torch.arange(n), torch.arange(n) % d] = h_i
    batches = list(itertools.combinations(range(n), B))
    hmax = hs.mean(0).max().item()
    for lr in (0.8 / hmax, 1.9 / hmax):
        per_coord = torch.stack(
            [torch.log((1 - lr * hs[list(b)].mean(0)).abs()) for b in batches]
        ).mean(0)
        ms = torch.stack([(1 - lr * hs[list(b)].mean(0)) ** 2 for b in batches]).mean(0)
        rep = stability(prob, lr, batch_size=B, chains=16, lyapunov_steps=3000, stiff_cutoff=0.0)
        lam = per_coord.max().item()
        est = rep.sgd_lyapunov
        assert abs(est.value - lam) < max(3 * est.stderr, 2e-3)
        assert est.ci[0] - 2e-3 < lam < est.ci[1] + 2e-3
        # commuting: ρ(T) = max_j E(1 − ηh_j)², and Wu–Ma–E is exact
        assert rep.mean_square_rho == pytest.approx(ms.max().item(), rel=1e-10)
        assert rep.wu_ma_e == pytest.approx(ms.max().item(), rel=1e-10)
        assert rep.wu_ma_e_threshold == pytest.approx(rep.mean_square_threshold, rel=1e-9)
        # the stiff subspace (ηh_j above the cutoff) has the exponent of its coordinates
        cut = 1.0
        stiff = stability(prob, lr, batch_size=B, chains=16, lyapunov_steps=3000, stiff_cutoff=cut)
        sel = lr * hs.mean(0) > cut
        if sel.any():
            lam_s = per_coord[sel].max().item()
            assert abs(stiff.sgd_lyapunov_stiff.value - lam_s) < max(
                3 * stiff.sgd_lyapunov_stiff.stderr, 2e-3
            )
            assert stiff.sgd_lyapunov_stiff.dim == int(sel.sum())


def test_lyapunov_against_direct_simulation_and_jensen():
    """θ* = 0 (zero targets): per-run growth log‖θ_T‖/T of real SGD steps, from the row space."""
    prob, X, _ = linreg(zero_target=True)
    n, B, T, runs = 24, 4, 2000, 12
    eta_star = stability(prob, 0.01, batch_size=4).mean_square_threshold
    g = torch.Generator().manual_seed(9)
    for factor in (0.9, 1.2):
        lr = factor * eta_star
        rep = stability(prob, lr, batch_size=B, chains=12, lyapunov_steps=2000)
        est = rep.sgd_lyapunov
        theta = torch.randn(runs, n, generator=g, dtype=DT) @ X  # in range(H)
        # The exact dynamics stay in the row space of X; round-off does not (the null space is
        # neutral, so an eps-size leak outgrows the decaying normal part after ~1/|λ|·36 steps).
        row = torch.linalg.pinv(X) @ X
        acc = torch.zeros(runs, dtype=DT)
        for _ in range(T):
            idx = torch.rand(runs, n, generator=g).argsort(1)[:, :B]
            Xb = X[idx]
            r = torch.einsum("cbd,cd->cb", Xb, theta)
            theta = (theta - lr * (2 / B) * torch.einsum("cbd,cb->cd", Xb, r)) @ row
            nr = theta.norm(dim=1)
            acc += nr.log()
            theta = theta / nr[:, None]  # renormalize: the dynamics are linear
        sim = (acc / T).mean().item()
        sim_se = (acc / T).std().item() / math.sqrt(runs)
        assert abs(sim - est.value) < 3 * math.hypot(sim_se, est.stderr) + 2e-3
        # Jensen: λ ≤ ½ log ρ(T)
        assert est.ci[0] <= 0.5 * math.log(rep.mean_square_rho) + 1e-3


def test_theory_reproduction_ordering():
    """THEORY §3: the Wu–Ma–E switch < exact ρ(T) switch < Lyapunov switch (in units of
    2/h_max), and the exponent is negative at the mean-square threshold (Jensen)."""
    prob, _, _ = linreg()
    rep = stability(prob, 0.01, batch_size=4)
    unit = 2 / rep.sharpness
    wme, ms = rep.wu_ma_e_threshold / unit, rep.mean_square_threshold / unit
    assert 0.2 < wme < ms < 0.45
    at = stability(prob, rep.mean_square_threshold, batch_size=4, chains=8, lyapunov_steps=3000)
    assert at.sgd_lyapunov.ci[1] < 0
    assert at.sgd_lyapunov_stable is True


# ---------------------------------------------------------------------- bounds (large P)
def test_bounds_path_verdicts():
    prob, _, _ = linreg()
    ex = stability(prob, 0.01, batch_size=4)
    unit = 2 / ex.sharpness
    wme, ms = ex.wu_ma_e_threshold, ex.mean_square_threshold
    cases = {
        "below Wu–Ma–E": (0.9 * wme, True),
        "between": (0.5 * (wme + ms), None),
        "above 2/h_max": (1.05 * unit, False),
    }
    for name, (lr, verdict) in cases.items():
        b = stability(prob, lr, batch_size=4, exact_limit=10, chains=4, lyapunov_steps=200)
        e = stability(prob, lr, batch_size=4, chains=4, lyapunov_steps=50)
        assert b.sgd_mean_square_stable is verdict, name
        assert b.mean_square_rho is None and b.mean_square_threshold is None
        assert any("exact_limit" in n for n in b.notes)
        assert b.nonuniformity == pytest.approx(e.nonuniformity, rel=1e-4)
        assert b.mean_square_lower <= e.mean_square_rho + 1e-9  # Rayleigh–Ritz lower bound
        if e.wu_ma_e > 1:
            assert b.wu_ma_e == pytest.approx(e.wu_ma_e, rel=1e-6)
        else:  # tangent directions contribute exactly 1 on the whole space
            assert b.wu_ma_e == pytest.approx(1.0, abs=1e-6)
    # between the mean-square threshold and 2/h_max: never "stable"
    b = stability(
        prob, 0.5 * (ms + unit), batch_size=4, exact_limit=10, chains=4, lyapunov_steps=50
    )
    assert b.sgd_mean_square_stable in (False, None)


# ---------------------------------------------------------------------- Adam
def test_adam_preconditioned_sharpness():
    model, X, Y = tiny_mlp_minimum()
    prob = gs.Problem(model, "mse", (X, Y))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8)
    empty = stability(prob, None, optimizer=opt)
    assert empty.gd_stable is None and empty.preconditioned_sharpness is None
    assert any("state is empty" in n for n in empty.notes)
    snapshot = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):  # populate exp_avg_sq, then restore the minimum
        opt.zero_grad()
        F.mse_loss(model(X), Y + 0.1).backward()
        opt.step()
    with torch.no_grad():
        for p, s in zip(model.parameters(), snapshot, strict=True):
            p.copy_(s)
    H, _ = oracle_hessians(model, X, Y)
    t = 3
    Pdiag = torch.cat(
        [
            (1 - 0.9**t) * ((opt.state[p]["exp_avg_sq"] / (1 - 0.99**t)).sqrt() + 1e-8).reshape(-1)
            for p in model.parameters()
        ]
    )
    D = Pdiag.rsqrt()
    pre = torch.linalg.eigvalsh(D[:, None] * H * D[None, :])[-1].item()
    rep = stability(prob, None, optimizer=opt)
    assert rep.preconditioned_sharpness == pytest.approx(pre, rel=1e-6)
    assert rep.threshold == pytest.approx(2 * 1.9 / (0.1 * 1e-3))
    assert rep.gd_stable is (pre < rep.threshold)
    with pytest.raises(InvalidArgumentError, match="differs"):
        stability(prob, 0.5, optimizer=opt)


def test_optimizer_sgd_settings_are_read():
    model, X, Y = tiny_mlp_minimum()
    prob = gs.Problem(model, "mse", (X, Y))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    rep = stability(prob, None, optimizer=opt)
    direct = stability(prob, 0.01, momentum=0.9, nesterov=True)
    assert rep.threshold == pytest.approx(direct.threshold)
    assert rep.momentum == 0.9 and rep.nesterov is True
    with pytest.raises(InvalidArgumentError, match="not both"):
        stability(prob, None, momentum=0.5, optimizer=opt)


# ---------------------------------------------------------------------- bad input
def test_bad_input():
    prob, X, y = linreg(8, 10)
    for lr in (0, -1.0, float("nan"), float("inf"), True, None):
        with pytest.raises(InvalidArgumentError):
            stability(prob, lr)
    for mom in (1.0, -0.1, 1.5):
        with pytest.raises(InvalidArgumentError):
            stability(prob, 0.1, momentum=mom)
    for bs in (0, 9, 2.5, True):
        with pytest.raises(InvalidArgumentError):
            stability(prob, 0.1, batch_size=bs)
    with pytest.raises(InvalidArgumentError):
        stability(prob, 0.1, batch_size=2, chains=1)
    with pytest.raises(InvalidArgumentError):
        stability("not a problem", 0.1)
    rep = stability(prob, 0.1, nesterov=True)  # nesterov without momentum: plain GD
    assert rep.threshold == pytest.approx(20) and any("plain GD" in n for n in rep.notes)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=4)
    # a DataLoader's data are gathered into tensors for the SGD parts (they were left out)
    rep = stability(gs.Problem(prob.model, "mse", loader), 0.1, batch_size=2)
    ref = stability(prob, 0.1, batch_size=2)
    assert rep.sgd_mean_square_stable is not None and rep.gd_stable is not None
    assert rep.sgd_mean_square_stable == ref.sgd_mean_square_stable
    assert rep.mean_square_rho == pytest.approx(ref.mean_square_rho, rel=1e-10)
    assert any("DataLoader" in n for n in rep.notes)


# ---------------------------------------------------------------------- matrix-free exact paths
def test_lanczos_on_T_for_larger_normal_space():
    """r = 40 > DENSE_T_LIMIT: ρ(T) and η* by Lanczos over r×r matrices, against dense kron."""
    n, d, B = 40, 60, 5
    prob, X, _ = linreg(n, d, seed=8)
    Hs = sample_hessians_linreg(X)
    U = torch.linalg.svd(X, full_matrices=False).Vh.T
    Hr = U.T @ Hs @ U
    p = (n - B) / (B * (n - 1))
    Hbar = Hr.mean(0)
    I = torch.eye(n, dtype=DT)
    rep0 = stability(prob, 0.01, batch_size=B, tol=1e-10)
    assert rep0.normal_dim == 40 and "Lanczos" in rep0.method["mean_square"]
    for lr in (0.8 * rep0.mean_square_threshold, 1.1 * rep0.mean_square_threshold):
        A, As = I - lr * Hbar, I - lr * Hr
        T = (1 - p) * torch.kron(A, A) + (p / n) * sum(torch.kron(a, a) for a in As)
        rho = torch.linalg.eigvalsh(T)[-1].item()
        rep = stability(prob, lr, batch_size=B, tol=1e-10, chains=2, lyapunov_steps=10)
        assert rep.mean_square_rho == pytest.approx(rho, rel=1e-8)
    # η*: ρ(T(η*)) = 1 with T built densely here
    lr = rep0.mean_square_threshold
    A, As = I - lr * Hbar, I - lr * Hr
    T = (1 - p) * torch.kron(A, A) + (p / n) * sum(torch.kron(a, a) for a in As)
    assert torch.linalg.eigvalsh(T)[-1].item() == pytest.approx(1.0, abs=1e-8)


def test_normal_space_by_hvps_matches_dense_route(monkeypatch):
    """n·P² above the dense budget: range(H) from a dense H and Uᵀ H_i U from per-sample HVPs."""
    mod = sys.modules["gdscope.theory.stability_sgd"]  # where the SGD parts live

    prob, _, _ = linreg(12, 20, seed=3)
    dense = stability(prob, 0.05, batch_size=3, chains=2, lyapunov_steps=10)
    monkeypatch.setattr(mod, "DENSE_SAMPLE_NUMBERS", 0)
    hvp = stability(prob, 0.05, batch_size=3, chains=2, lyapunov_steps=10)
    assert "per-sample HVPs" in hvp.method["normal_space"]
    assert hvp.normal_dim == dense.normal_dim == 12
    assert hvp.mean_square_rho == pytest.approx(dense.mean_square_rho, rel=1e-10)
    assert hvp.mean_square_threshold == pytest.approx(dense.mean_square_threshold, rel=1e-9)
    assert hvp.nonuniformity == pytest.approx(dense.nonuniformity, rel=1e-9)


def test_indefinite_per_sample_hessians_normal_space_is_not_range_H(monkeypatch):
    """Two samples with opposite curvature along x cancel in H but not in the H_i: that
    direction is in R = range(Σ H_i²), carries zero mean curvature and noise, so no positive
    lr is mean-square stable (⟨uuᵀ, T(uuᵀ)⟩ = 1 + η²p Var(uᵀH_iu) > 1)."""
    mod = sys.modules["gdscope.theory.stability_sgd"]  # where the SGD parts live

    g = torch.Generator().manual_seed(2)
    X = torch.randn(6, 5, generator=g, dtype=DT)
    X[1] = X[0]
    sign = torch.tensor([[1.0], [-1.0], [1.0], [1.0], [1.0], [1.0]], dtype=DT)

    def loss(o, t):  # per-sample ℓ_i = t_i o_i², mean over samples
        return (t * o**2).mean()

    model = nn.Linear(5, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.zero_()
    prob = gs.Problem(model, loss, (X, sign))
    rep = stability(prob, 0.01, batch_size=2)
    assert rep.normal_dim == 5  # range(H) has dimension 4
    assert rep.mean_square_threshold is None
    assert rep.sgd_mean_square_stable is False and rep.mean_square_rho > 1
    assert any("not positive definite" in n for n in rep.notes)
    # through range(H), the per-sample Hessians leak: fall back to the bounds, say so
    monkeypatch.setattr(mod, "DENSE_SAMPLE_NUMBERS", 0)
    rep = stability(prob, 0.01, batch_size=2, chains=2, lyapunov_steps=10)
    assert rep.mean_square_rho is None
    assert any("outside range(H)" in n for n in rep.notes)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_lyapunov_by_minibatch_hvps_matches_dense_normal_space(momentum):
    """The matrix-free path (exact_limit below P) estimates the same exponents."""
    prob, _, _ = linreg(zero_target=True)
    lr = 0.25 * 2 / stability(prob, 0.01).sharpness
    kw = {"momentum": momentum, "batch_size": 4, "chains": 8, "lyapunov_steps": 600}
    dense = stability(prob, lr, **kw)
    hvp = stability(prob, lr, exact_limit=10, **kw)
    assert "mini-batch HVPs" in hvp.method["lyapunov"]
    assert hvp.matvecs["lyapunov_mini_batch"] == 2 * 8 * (600 + 150)
    for a, b in (
        (dense.sgd_lyapunov, hvp.sgd_lyapunov),
        (dense.sgd_lyapunov_stiff, hvp.sgd_lyapunov_stiff),
    ):
        assert a.dim == b.dim or b.dim is None
        assert abs(a.value - b.value) < 4 * math.hypot(a.stderr, b.stderr) + 2e-3


def test_report_to_dict_is_plain_json():
    import json

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model = model.double()
    X = torch.randn(12, 3, dtype=torch.float64)
    Y = torch.randn(12, 1, dtype=torch.float64)
    import gdscope as gs

    rep = gs.stability(gs.Problem(model, "mse", (X, Y)), 0.1)
    data = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert data["sharpness"] == pytest.approx(rep.sharpness)
    assert data["gd_stable"] == rep.gd_stable and data["lr"] == rep.lr
    assert set(data) == {f.name for f in dataclasses.fields(rep)}


@pytest.mark.parametrize("flat_tol", [1e-12, 1e-10, 1e-8, 1e-6])
def test_normal_space_is_not_inflated_by_round_off(flat_tol):
    """At an exact minimum the span of the per-sample Hessians of a linear model is k·n-dim.

    Built from eigh(Σ H_i²) it was resolved only to √eps: a flat_tol below ~1e-7 kept round-off
    directions, so H was "not positive definite" there and the mean-square threshold was lost.
    """
    g = torch.Generator().manual_seed(3)
    n, d, k = 12, 30, 2
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = torch.randn(n, k, generator=g, dtype=torch.float64)
    model = nn.Linear(d, k, bias=False).double()
    with torch.no_grad():  # the minimum-norm interpolant: an exact global minimum
        model.weight.copy_(torch.linalg.lstsq(X, Y).solution.T)
    rep = gs.stability(gs.Problem(model, "mse", (X, Y)), 0.1, batch_size=3, flat_tol=flat_tol)
    assert rep.normal_dim == n * k
    assert rep.mean_square_threshold is not None and rep.mean_square_threshold > 0
