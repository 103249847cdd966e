"""Kernel probes against an independent float64 Jacobian (``torch.func.jacrev``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import gdscope as gs
from gdscope.probes import (
    DisparityProbe,
    KernelAlignmentProbe,
    KernelDriftProbe,
    NTKSpectrumProbe,
    PLProbe,
)


def _setup(n: int = 30, samples: int = 12):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(n, 5, generator=g, dtype=torch.float64)
    Y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2)).double()
    prob = gs.Problem(model, "mse", (X, Y))
    probes = [
        NTKSpectrumProbe(1, samples=samples, seed=4),
        KernelDriftProbe(1, samples=samples, seed=4),
        KernelAlignmentProbe(1, samples=samples, seed=4),
        PLProbe(1, samples=samples, seed=4),
        DisparityProbe(1, samples=samples, seed=4),
    ]
    return prob, probes


def _jac(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    params = {n: p.detach() for n, p in model.named_parameters()}
    jac = jacrev(lambda p: functional_call(model, p, (x,)).reshape(-1))(params)
    return torch.cat([j.reshape(j.shape[0], -1) for j in jac.values()], dim=1)


def _step(prob: gs.Problem, lr: float = 0.5) -> None:
    with torch.no_grad():
        for p, g in zip(
            prob.model.parameters(), prob.unflatten(prob.gradient()).values(), strict=True
        ):
            p -= lr * g


def test_kernel_probes_match_independent_jacobian():
    prob, probes = _setup()
    tracker = gs.Tracker(prob, probes)
    sub = probes[0].sample(prob)
    x, y, _ = next(sub.batches())
    K0 = (lambda J: J @ J.T)(_jac(prob.model, x))
    for t in range(3):
        _step(prob)
        vals = tracker.step(t)
        J = _jac(prob.model, x)
        K = J @ J.T
        ev = torch.linalg.eigvalsh(K)
        assert vals["ntk_lambda_min"] == pytest.approx(ev[0].item(), rel=1e-8)
        assert vals["ntk_lambda_max"] == pytest.approx(ev[-1].item(), rel=1e-10)
        assert vals["ntk_condition"] == pytest.approx((ev[-1] / ev[0]).item(), rel=1e-7)
        drift = (torch.linalg.norm(K - K0) / torch.linalg.norm(K0)).item()
        assert vals["ntk_drift"] == pytest.approx(drift, rel=1e-8)
        yv = y.reshape(-1)
        align = (yv @ K @ yv / (torch.linalg.norm(K) * (yv @ yv))).item()
        assert vals["ntk_alignment"] == pytest.approx(align, rel=1e-10)
        # PL ratio on the sample and its kernel lower bound q·λ_min(K) (THEORY §1)
        r = (prob.model(x) - y).detach().reshape(-1)
        q = 2 / r.numel()
        g = J.T @ (q * r)
        loss = q / 2 * (r @ r)
        assert vals["pl_ratio"] == pytest.approx((g @ g / (2 * loss)).item(), rel=1e-8)
        assert vals["pl_bound"] == pytest.approx(q * ev[0].item(), rel=1e-8)
        assert vals["pl_ratio"] >= vals["pl_bound"]
        sv = torch.linalg.svdvals(J)
        assert vals["disparity_sigma_min"] == pytest.approx(sv[-1].item(), rel=1e-8)
        assert vals["disparity_rank"] == J.shape[0] and vals["disparity_full_rank"] == 1.0


def test_drift_is_zero_without_training_and_sample_is_fixed():
    prob, probes = _setup()
    tracker = gs.Tracker(prob, probes)
    first = probes[0].sample(prob)
    vals = tracker.step(0)
    assert vals["ntk_drift"] == 0.0
    assert probes[0].sample(prob) is first
    assert first.n == 12


def test_rank_deficient_sample_is_reported():
    # more outputs than parameters: K (nk × nk) is singular, J has rank ≤ P
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    Y = torch.randn(40, 2, generator=g, dtype=torch.float64)
    model = nn.Linear(3, 2).double()
    prob = gs.Problem(model, "mse", (X, Y))
    probes = [NTKSpectrumProbe(1, samples=40), DisparityProbe(1, samples=40)]
    vals = gs.Tracker(prob, probes).step(0)
    assert vals["disparity_rank"] == 8 and vals["disparity_full_rank"] == 0.0
    assert vals["ntk_lambda_min"] == pytest.approx(0.0, abs=1e-10)
    assert vals["ntk_condition"] > 1e10


def test_bad_sample_size():
    with pytest.raises(gs.GdscopeError):
        NTKSpectrumProbe(samples=0)
