"""Disparity matrix (data-restricted and function-space) against independent references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import make_mlp, regression_data
from gdscope.errors import InvalidArgumentError
from gdscope.kernels.disparity import disparity, function_space_disparity
from gdscope.kernels.eigs import ntk_eigs, rank_tolerance

DT = torch.float64


# ------------------------------------------------------------------------------ data-restricted
def test_singular_values_match_svdvals_of_jacrev(oracle):
    model = make_mlp()
    X = regression_data(n=10)[0]
    J = oracle.jacobian(model, X)
    ref = torch.linalg.svdvals(J)
    rep = disparity(model, X)
    assert rep.method == "svd" and rep.shape == (J.shape[1], J.shape[0])
    assert rep.singular_values.dtype == DT
    assert float((rep.singular_values - ref).abs().max()) < 1e-12 * float(ref[0])
    assert rep.sigma_max == pytest.approx(float(ref[0]), rel=1e-12)
    assert rep.sigma_min == pytest.approx(float(ref[-1]), rel=1e-10)
    assert rep.rank == 30 and rep.full_rank
    eps = torch.finfo(DT).eps
    assert rep.tol == pytest.approx(max(J.shape) * eps * float(ref[0]))


def test_duplicated_inputs_drop_rank_by_k():
    model = make_mlp()  # k = 3 outputs
    X = regression_data(n=6)[0]
    base = disparity(model, X)
    assert base.rank == 18 and base.full_rank
    Xd = X.clone()
    Xd[4] = Xd[0]  # one duplicated sample: its k rows of J repeat
    rep = disparity(model, Xd)
    assert rep.rank == 18 - 3
    assert rep.full_rank is False
    assert rep.sigma_min < 1e-12 * rep.sigma_max
    assert "NOT full rank" in repr(rep)


def test_more_outputs_than_parameters_is_rank_deficient():
    model = make_mlp(sizes=(4, 2, 1))  # P = 13
    X = regression_data(n=20)[0]
    rep = disparity(model, X)
    assert rep.shape == (13, 20)
    assert rep.rank <= 13 and rep.full_rank is False and rep.sigma_min == 0.0
    assert rep.singular_values.shape == (13,)


@pytest.mark.parametrize("case", ["full", "duplicate", "tiny"])
def test_full_rank_iff_ntk_positive_definite(case):
    if case == "tiny":
        model, X = make_mlp(sizes=(4, 2, 1)), regression_data(n=20)[0]
    else:
        model, X = make_mlp(), regression_data(n=6)[0]
        if case == "duplicate":
            X = X.clone()
            X[2] = X[5]
    rep = disparity(model, X)
    eig = ntk_eigs(model, X, which="both")
    assert rep.full_rank == (not eig.singular)
    assert rep.full_rank == (case == "full")
    if rep.full_rank:  # σ_min² = λ_min(K)
        assert rep.sigma_min**2 == pytest.approx(eig.lambda_min, rel=1e-6)


def test_svd_keeps_digits_that_sqrt_eig_loses():
    """J with known singular values down to 1e-10·σ_max: SVD resolves them, sqrt(eig K) not."""
    g = torch.Generator().manual_seed(0)
    n, d = 6, 9
    s = torch.logspace(0, -10, n, dtype=DT)
    U, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    V, _ = torch.linalg.qr(torch.randn(d, n, generator=g, dtype=DT))
    X = U @ torch.diag(s) @ V.T  # the Jacobian of a bias-free linear model is X itself
    model = nn.Linear(d, 1, bias=False).to(DT)
    rep = disparity(model, X)
    svd_err = ((rep.singular_values - s) / s).abs()
    assert float(svd_err.max()) < 1e-4  # rounding of X itself: ~1e-16/1e-10
    lam = torch.linalg.eigvalsh(X @ X.T).flip(0)
    via_eig = lam.clamp_min(0).sqrt()
    eig_err = float(((via_eig[-1] - s[-1]) / s[-1]).abs())
    assert eig_err > 1e-2  # σ_min = 1e-10 < sqrt(eps): lost in K = J Jᵀ
    assert eig_err > 1e3 * float(svd_err[-1])
    assert rep.rank == n and rep.full_rank  # tol = 9·eps·σ_max ≈ 2e-15


def test_fallback_to_ntk_eigs_when_jacobian_does_not_fit():
    model = make_mlp()
    X = regression_data(n=6)[0]
    svd = disparity(model, X)
    rep = disparity(model, X, memory=1024)  # 18·165·8 bytes do not fit
    assert rep.method == "ntk_eigs" and rep.singular_values is None and rep.eig is not None
    assert rep.sigma_max == pytest.approx(svd.sigma_max, rel=1e-8)
    assert rep.sigma_min == pytest.approx(svd.sigma_min, rel=1e-4)
    assert rep.full_rank is True and rep.rank == 18
    assert rep.lambda_min_residual is not None
    # the same rank rule as the SVD path (and ntk_eigs): no tolerance raised to sqrt(tol_eig)
    assert rep.tol == pytest.approx(rank_tolerance(18, 165, DT, rep.sigma_max), rel=1e-12)
    assert abs(rep.sigma_min - svd.sigma_min) <= rep.sigma_min_error + svd.sigma_min_error
    assert "did not fit" in repr(rep)
    Xd = X.clone()
    Xd[1] = Xd[3]
    dup = disparity(model, Xd, memory=1024)
    assert dup.full_rank is False and dup.rank is None


def test_float32_model_uses_float32_eps():
    model = make_mlp().float()
    X = regression_data(n=6)[0].float()
    rep = disparity(model, X)
    eps32 = torch.finfo(torch.float32).eps
    assert rep.tol == pytest.approx(165 * eps32 * rep.sigma_max, rel=1e-9)
    assert "float32" in rep.tol_rule and rep.full_rank


def test_explicit_tolerance_and_bad_arguments():
    model = make_mlp()
    X = regression_data(n=4)[0]
    rep = disparity(model, X, tol=1e30)
    assert rep.rank == 0 and rep.tol_rule == "given"
    for bad in (-1.0, float("nan"), "1e-3"):
        with pytest.raises(InvalidArgumentError):
            disparity(model, X, tol=bad)
    with pytest.raises(InvalidArgumentError):
        disparity(model, X, memory=0)
    with pytest.raises(InvalidArgumentError, match="empty"):
        disparity(model, X[:0])


# ------------------------------------------------------------------------------ function space
class FourierModel(nn.Module):
    """``f_a(x) = Σ_j θ_j w_j ψ_j(x)``: linear in real Fourier features on a box.

    ``feats``: one ``(m, kind, output)`` per parameter, ``m`` an integer frequency vector,
    ``kind`` "cos" or "sin", ``ψ(x) = cos/sin(2π Σ_i m_i (x_i − lo_i)/L_i)``.
    """

    def __init__(self, feats, weights, box, k=1):
        super().__init__()
        self.feats, self.k = feats, k
        self.register_buffer("w", torch.as_tensor(weights, dtype=DT))
        self.register_buffer("lo", torch.tensor([a for a, _ in box], dtype=DT))
        self.register_buffer("L", torch.tensor([b - a for a, b in box], dtype=DT))
        self.theta = nn.Parameter(torch.randn(len(feats), dtype=DT))

    def forward(self, x):
        t = 2 * math.pi * (x - self.lo) / self.L
        outs = [torch.zeros(x.shape[0], dtype=x.dtype) for _ in range(self.k)]
        for j, (m, kind, a) in enumerate(self.feats):
            arg = t @ torch.tensor(m, dtype=DT)
            psi = torch.cos(arg) if kind == "cos" else torch.sin(arg)
            outs[a] = outs[a] + self.theta[j] * self.w[j] * psi
        return torch.stack(outs, dim=1)


def _norm(m, vol):
    """``‖ψ‖_{L²(B)}``: ``sqrt(vol)`` for the constant, ``sqrt(vol/2)`` otherwise."""
    return math.sqrt(vol) if not any(m) else math.sqrt(vol / 2)


def test_function_space_singular_values_1d_known():
    box = ((-1.0, 2.0),)
    feats = [
        ((0,), "cos", 0),
        ((1,), "cos", 0),
        ((1,), "sin", 0),
        ((2,), "cos", 0),
        ((3,), "sin", 0),
    ]
    w = [1.0, 2.0, 0.5, 3.0, 0.7]
    model = FourierModel(feats, w, box)
    rep = function_space_disparity(model, box, bandlimit=3)
    expect = sorted(
        (wi * _norm(m, 3.0) for (m, _, _), wi in zip(feats, w, strict=True)), reverse=True
    )
    got = rep.singular_values[: len(feats)]
    assert float((got - torch.tensor(expect, dtype=DT)).abs().max()) < 1e-10
    assert rep.singular_values.shape == (7,)
    assert rep.rank == 5 and rep.full_rank is False  # 7 modes, 5 features
    assert rep.band_limit_residual < 1e-12 and rep.faithful
    assert rep.frequencies.shape == (7, 1)


def test_function_space_full_rank_2d_and_two_outputs():
    box = ((0.0, 1.0), (-0.5, 1.5))
    vol = 2.0
    M = 1
    freqs = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)]
    # one real feature per complex mode: cos for the half-space m > 0 and the constant, sin for
    # m < 0 (ψ = sin(2π m'·x) with m' = -m), on both outputs: spans all 9 modes × 2 outputs
    feats, w = [], []
    for a in range(2):
        for i, m in enumerate(freqs):
            neg = m < (0, 0)
            kind = "sin" if neg else "cos"
            mm = tuple(-c for c in m) if neg else m
            feats.append((mm, kind, a))
            w.append(0.5 + 0.1 * i + a)
    model = FourierModel(feats, w, box, k=2)
    rep = function_space_disparity(model, box, bandlimit=M, quad_points=(4, 5))
    expect = sorted(
        (wi * _norm(m, vol) for (m, _, _), wi in zip(feats, w, strict=True)), reverse=True
    )
    assert rep.singular_values.shape == (18,)
    assert float((rep.singular_values - torch.tensor(expect, dtype=DT)).abs().max()) < 1e-10
    assert rep.rank == 18 and rep.full_rank
    assert rep.band_limit_residual < 1e-12


def test_band_limit_residual_large_for_high_frequencies():
    box = ((0.0, 1.0),)
    M = 2
    low = FourierModel([((1,), "cos", 0)], [1.0], box)
    high = FourierModel([((5,), "cos", 0), ((7,), "sin", 0)], [1.0, 1.0], box)
    half = FourierModel([((1,), "cos", 0), ((6,), "cos", 0)], [1.0, 1.0], box)
    q = 32  # resolves frequency 7 without aliasing
    assert function_space_disparity(low, box, M, q).band_limit_residual < 1e-12
    rep_high = function_space_disparity(high, box, M, q)
    assert rep_high.band_limit_residual > 0.99 and not rep_high.faithful
    assert "NOT faithful" in repr(rep_high)
    assert function_space_disparity(half, box, M, q).band_limit_residual == pytest.approx(
        0.5, abs=1e-10
    )


def test_band_limit_residual_of_a_relu_network_falls_with_bandlimit():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 16), nn.ReLU(), nn.Linear(16, 1)).to(DT)
    box = ((-1.0, 1.0),)
    res = [function_space_disparity(net, box, M, 64).band_limit_residual for M in (1, 4, 12)]
    assert res[0] > res[1] > res[2] > 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"domain": ((0.0, 1.0),) * 4},
        {"domain": ((1.0, 0.0),)},
        {"domain": 3.0},
        {"bandlimit": -1},
        {"quad_points": 4},  # < 2M+1 = 5
        {"quad_points": (8, 8)},  # one dimension only
        {"residual_threshold": 2.0},
    ],
)
def test_function_space_bad_arguments(kwargs):
    model = FourierModel([((1,), "cos", 0)], [1.0], ((0.0, 1.0),))
    args = {"domain": ((0.0, 1.0),), "bandlimit": 2, **kwargs}
    with pytest.raises(InvalidArgumentError):
        function_space_disparity(model, **args)
