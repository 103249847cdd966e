"""GD-map statistics: signs along a trajectory against dense ``slogdet``, and the law of
``min_i |1 − ηh_i|`` (no atom at zero, linear CDF near zero) with controls that must fail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gdscope as gs
from conftest import DT, make_mlp, regression_data
from gdscope.errors import InvalidArgumentError
from gdscope.theory.gd_map_stats import (
    min_factor_distribution,
    singular_step_sizes,
    tail_exponent,
)
from gdscope.theory.orbits import gd_trajectory


def test_signs_along_trajectory_match_dense_slogdet(oracle):
    """GD at η = 1 on the tanh MLP: the top eigenvalues rise through 2 and hover there
    (edge of stability), so at lr = 0.5 (1/lr = 2) the sign of det(I − lr∇²L) flips often."""
    X, Y = regression_data()
    prob = gs.Problem(make_mlp(), "mse", (X, Y))
    traj = gd_trajectory(prob, 1.0, 240)[::12]
    lr = 0.5
    rep = singular_step_sizes(prob, traj, lr, steps=range(0, 241, 12))
    assert rep.undetermined == 0 and set(rep.methods) == {"dense"}
    I = torch.eye(prob.num_params, dtype=DT)
    ref_signs, ref_counts = [], []
    for i, theta in enumerate(traj):
        H = oracle.hessian(prob.model, X, Y, theta=theta)
        sign, _ = torch.linalg.slogdet(I - lr * H)
        h = torch.linalg.eigvalsh(H)
        ref_signs.append(int(sign.item()))
        ref_counts.append(int((h > 1 / lr).sum()))
        assert rep.min_factor[i] == pytest.approx((1 - lr * h).abs().min().item(), rel=1e-7)
        above, below = h[h > 1 / lr], h[(h > 0) & (h < 1 / lr)]
        if above.numel():
            assert rep.singular_lr_below[i] == pytest.approx(1 / above.min().item(), rel=1e-8)
        else:
            assert np.isnan(rep.singular_lr_below[i])
        assert rep.singular_lr_above[i] == pytest.approx(1 / below.max().item(), rel=1e-8)
    assert rep.sign == ref_signs
    assert rep.count_above == ref_counts
    flips = [
        (12 * i, 12 * (i + 1))
        for i in range(len(ref_signs) - 1)
        if ref_signs[i] != ref_signs[i + 1]
    ]
    assert rep.sign_changes == flips
    assert len(flips) >= 2  # the test exercises sign changes
    assert [c[:2] for c in rep.crossings] == [
        (12 * i, 12 * (i + 1))
        for i in range(len(ref_counts) - 1)
        if ref_counts[i] != ref_counts[i + 1]
    ]


def test_callable_trajectory_and_dicts():
    X, Y = regression_data()
    prob = gs.Problem(make_mlp(), "mse", (X, Y))
    traj = gd_trajectory(prob, 0.5, 4)
    rep = singular_step_sizes(prob, lambda t: prob.unflatten(traj[t]), 0.4, steps=[0, 2, 4])
    ref = singular_step_sizes(prob, [traj[0], traj[2], traj[4]], 0.4, steps=[0, 2, 4])
    assert rep.sign == ref.sign and np.array_equal(rep.min_factor, ref.min_factor)
    assert list(rep.steps) == [0, 2, 4]
    with pytest.raises(InvalidArgumentError):
        singular_step_sizes(prob, lambda t: traj[t], 0.4)


# ---------------------------------------------------------------------- min-factor law
_G = torch.Generator().manual_seed(0)
_X = torch.randn(16, 3, generator=_G, dtype=DT)
_Y = torch.randn(16, 2, generator=_G, dtype=DT)


def _random_mlp(seed: int) -> gs.Problem:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(DT)
    return gs.Problem(model, "mse", (_X, _Y))


def _random_lrs(seed: int) -> np.ndarray:
    return np.random.default_rng(1000 + seed).uniform(0.5, 20.0, 100)


def test_min_factor_has_no_atom_and_linear_cdf(oracle):
    rep = min_factor_distribution(_random_mlp, _random_lrs, 40)
    assert rep.samples.size == 4000 and rep.num_params == 38
    assert rep.zero_fraction == 0.0 and rep.roundoff_fraction == 0.0
    assert rep.fit.contains(1.0), rep.fit
    assert 0.85 < rep.fit.slope < 1.15 and 0.8 < rep.fit.slope_ls < 1.2
    assert rep.linear
    # spot-check one sample against an independent dense Hessian
    prob = _random_mlp(3)
    h = torch.linalg.eigvalsh(oracle.hessian(prob.model, _X, _Y))
    eta = _random_lrs(3)[7]
    i = np.flatnonzero((rep.seeds == 3) & (rep.lrs == eta))[0]
    assert rep.samples[i] == pytest.approx((1 - eta * h).abs().min().item(), rel=1e-9)
    # the empirical CDF on the grid is increasing and ~linear: F(ε)/ε roughly constant
    assert np.all(np.diff(rep.cdf) >= 0)


def test_min_factor_detects_an_atom():
    """A linear model has a θ-independent Hessian: h = 2 (sum-MSE on x = 1), and lr = 0.5 is
    singular for every seed, so min |1 − ηh| = 0 exactly: an atom the check must reject."""

    def make(seed: int) -> gs.Problem:
        torch.manual_seed(seed)
        model = nn.Linear(1, 1, bias=False).to(DT)
        return gs.Problem(
            model, "mse", (torch.ones(1, 1, dtype=DT), torch.zeros(1, 1, dtype=DT)), reduction="sum"
        )

    lrs = lambda seed: np.concatenate([[0.5], _random_lrs(seed)[:99] / 10])  # noqa: E731
    rep = min_factor_distribution(make, lrs, 30)
    assert rep.zero_fraction == pytest.approx(0.01)
    assert not rep.linear


def test_tail_exponent_rejects_a_wrong_power():
    rng = np.random.default_rng(0)
    lin = tail_exponent(rng.uniform(size=4000))
    assert lin.contains(1.0) and lin.zeros == 0
    sq = tail_exponent(rng.uniform(size=4000) ** 2)  # P(u² < ε) = √ε
    assert not sq.contains(1.0) and sq.contains(0.5)
    quad = tail_exponent(np.sqrt(rng.uniform(size=4000)))  # P(√u < ε) = ε²
    assert not quad.contains(1.0) and quad.contains(2.0)
    with pytest.raises(InvalidArgumentError):
        tail_exponent(np.ones(10))  # a tail of 1 sample
