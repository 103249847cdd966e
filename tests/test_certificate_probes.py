"""Certificate probes against independent float64 recomputation (no gdscope machinery)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import gdscope as gs
from gdscope.errors import InvalidArgumentError
from gdscope.probes.certificates import (
    BlockJacobianProbe,
    DataSeparationProbe,
    GradRatioProbe,
    LocalSmoothnessProbe,
    MarginProbe,
    ReluPatternProbe,
    SemiSmoothnessProbe,
    data_separation,
    homogeneity_degree,
)

DT = torch.float64
N, D, K = 24, 5, 3


def _data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, D, generator=g, dtype=DT)
    y = torch.arange(N) % K
    return X, y


def _relu_mlp(seed: int = 0, bias: bool = True) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = [nn.Linear(D, 8, bias=bias), nn.ReLU(), nn.Linear(8, 6, bias=bias), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(6, K, bias=bias)).to(DT)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _loss_at(model: nn.Module, X, y, theta: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy at flat ``theta``, built from functional_call (independent)."""
    params, i = {}, 0
    for n, p in model.named_parameters():
        params[n] = theta[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return nn.functional.cross_entropy(functional_call(model, params, (X,)), y)


def _grad_at(model, X, y, theta):
    return torch.func.grad(lambda th: _loss_at(model, X, y, th))(theta)


def _patterns(model: nn.Sequential, X) -> torch.Tensor:
    """ReLU on/off states from explicit matrix products (not hooks)."""
    W1, b1, W2, b2 = (model[0].weight, model[0].bias, model[2].weight, model[2].bias)
    with torch.no_grad():
        h1 = X @ W1.T + b1
        h2 = torch.relu(h1) @ W2.T + b2
    return torch.cat([(h1 > 0).reshape(-1), (h2 > 0).reshape(-1)]), h1.numel(), h2.numel()


def test_smoothness_semismoothness_gradratio_relu_along_gd():
    X, y = _data()
    model = _relu_mlp()
    prob = gs.Problem(model, "cross_entropy", (X, y))
    probes = [
        LocalSmoothnessProbe(),
        SemiSmoothnessProbe(),
        GradRatioProbe(),
        ReluPatternProbe(samples=N),  # the whole data set: the sample is X itself
    ]
    tracker = gs.Tracker(prob, probes)
    ref0, n1, _ = _patterns(model, X)
    # at θ₀ (no step taken): no pattern changed; smoothness needs a step
    vals = tracker.step(0)
    assert vals["relu_pattern_change"] == 0.0
    assert vals["relu_pattern_change/1"] == 0.0 and vals["relu_pattern_change/3"] == 0.0
    assert "local_smoothness" not in vals and "semi_smooth_ratio" not in vals
    assert vals["step_norm"] == 0.0 and vals["semi_smooth_residual"] == 0.0

    opt = gs.GD(model.parameters(), lr=2.0)
    changed_any = False
    for t in range(1, 9):
        theta_a = _flat(model)
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        vals = tracker.step(t, opt)
        theta_b = _flat(model)
        ga, gb = _grad_at(model, X, y, theta_a), _grad_at(model, X, y, theta_b)
        delta = theta_b - theta_a
        La, Lb = _loss_at(model, X, y, theta_a).item(), _loss_at(model, X, y, theta_b).item()
        # local smoothness ‖∇L(θ_b) − ∇L(θ_a)‖/‖θ_b − θ_a‖
        ref = (torch.linalg.norm(gb - ga) / torch.linalg.norm(delta)).item()
        assert vals["local_smoothness"] == pytest.approx(ref, rel=1e-10)
        # semi-smoothness residual L(θ+Δ) − L(θ) − ⟨∇L(θ), Δ⟩
        resid = Lb - La - (ga @ delta).item()
        assert vals["semi_smooth_residual"] == pytest.approx(resid, rel=1e-7, abs=1e-14)
        assert vals["step_norm"] == pytest.approx(torch.linalg.norm(delta).item(), rel=1e-12)
        assert vals["step_norm_sq"] == pytest.approx((delta @ delta).item(), rel=1e-12)
        assert vals["semi_smooth_ratio"] == pytest.approx(resid / (delta @ delta).item(), rel=1e-7)
        # per-layer ‖∇_{θ_l} L‖²/L (weight and bias of each Linear)
        sizes = [p.numel() for p in model.parameters()]
        parts = torch.split(gb, sizes)  # weight, bias of each Linear, in order
        for j, layer in enumerate(("0", "2", "4")):
            gw, gbias = parts[2 * j], parts[2 * j + 1]
            ref = ((gw @ gw + gbias @ gbias) / Lb).item()
            assert vals[f"grad_ratio/{layer}"] == pytest.approx(ref, rel=1e-10)
        assert vals["grad_ratio"] == pytest.approx((gb @ gb / Lb).item(), rel=1e-10)
        # ReLU patterns: recount from explicit pre-activations
        cur, _, _ = _patterns(model, X)
        diff = cur != ref0
        assert vals["relu_pattern_change"] == pytest.approx(diff.double().mean().item(), abs=0)
        assert vals["relu_pattern_change/1"] == diff[:n1].double().mean().item()
        assert vals["relu_pattern_change/3"] == diff[n1:].double().mean().item()
        changed_any |= vals["relu_pattern_change"] > 0
    assert changed_any  # the test exercises changed patterns


def test_sparse_schedule_uses_secant_since_previous_call():
    X, y = _data()
    model = _relu_mlp()
    prob = gs.Problem(model, "cross_entropy", (X, y))
    tracker = gs.Tracker(prob, [LocalSmoothnessProbe(gs.probes.At([2, 5]))])
    theta0 = _flat(model)
    opt = gs.GD(model.parameters(), lr=0.5)
    seen = {}
    for t in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        seen[t] = _flat(model)
        vals = tracker.step(t, opt)
        if t == 5:
            a, b = seen[2], seen[5]
            ref = torch.linalg.norm(_grad_at(model, X, y, b) - _grad_at(model, X, y, a))
            assert vals["local_smoothness"] == pytest.approx((ref / (b - a).norm()).item())
        if t == 2:
            a, b = theta0, seen[2]
            ref = torch.linalg.norm(_grad_at(model, X, y, b) - _grad_at(model, X, y, a))
            assert vals["local_smoothness"] == pytest.approx((ref / (b - a).norm()).item())


def test_data_separation_matches_brute_force():
    X, y = _data()
    X = X.clone()
    X[7] = 3.0 * X[2] + 1e-6 * torch.arange(D, dtype=DT)  # nearly the same direction
    X[11] = 0.0  # no direction: left out
    prob = gs.Problem(_relu_mlp(), "cross_entropy", (X, y))
    probe = DataSeparationProbe()
    tracker = gs.Tracker(prob, [probe])
    best = math.inf
    for i, j in itertools.combinations(range(N), 2):
        ni, nj = X[i].norm(), X[j].norm()
        if ni == 0 or nj == 0:
            continue
        best = min(best, (X[i] / ni - X[j] / nj).norm().item())
    vals = tracker.step(0)
    assert vals["data_separation"] == pytest.approx(best, rel=1e-8)
    assert best < 1e-5
    assert vals["data_zero_inputs"] == 1.0 and vals["data_separation_samples"] == N
    assert "data_separation" not in tracker.step(1)  # reported once
    # chunking does not change the answer; images are flattened
    assert data_separation(X, chunk=5)[0] == pytest.approx(best, rel=1e-8)
    assert data_separation(X.reshape(N, 1, D))[0] == pytest.approx(best, rel=1e-8)


def test_margin_matches_brute_force_and_is_scale_invariant_when_homogeneous():
    X, y = _data()
    model = _relu_mlp(bias=False)
    prob = gs.Problem(model, "cross_entropy", (X, y))
    probe = MarginProbe()
    tracker = gs.Tracker(prob, [probe])
    assert homogeneity_degree(model) == 3 and probe.degree == 3

    def brute():
        with torch.no_grad():
            out = model(X)
        m = math.inf
        for i in range(N):
            others = [out[i, j].item() for j in range(K) if j != y[i]]
            m = min(m, out[i, y[i]].item() - max(others))
        norm = math.sqrt(sum((p.detach() ** 2).sum().item() for p in model.parameters()))
        return m, norm

    vals = tracker.step(0)
    m, norm = brute()
    assert vals["margin"] == pytest.approx(m, rel=1e-12)
    assert vals["param_norm"] == pytest.approx(norm, rel=1e-12)
    assert vals["normalized_margin"] == pytest.approx(m / norm**3, rel=1e-12)
    with torch.no_grad():  # f(cθ) = c³ f(θ): the normalized margin does not move
        for p in model.parameters():
            p.mul_(2.0)
    vals2 = tracker.step(1)
    assert vals2["margin"] == pytest.approx(8 * m, rel=1e-12)
    assert vals2["normalized_margin"] == pytest.approx(vals["normalized_margin"], rel=1e-12)


def test_margin_with_explicit_depth_one_hot_targets_and_bias_warning(caplog):
    X, y = _data()
    Y = nn.functional.one_hot(y, K).to(DT)
    model = _relu_mlp(bias=True)
    prob = gs.Problem(model, "mse", (X, Y))
    with caplog.at_level("WARNING"):
        tracker = gs.Tracker(prob, [MarginProbe(depth=2)])
    assert "not a bias-free homogeneous" in caplog.text
    vals = tracker.step(0)
    with torch.no_grad():
        out = model(X)
    correct = out[torch.arange(N), y]
    masked = out.clone()
    masked[torch.arange(N), y] = -math.inf
    m = (correct - masked.max(dim=1).values).min().item()
    assert vals["margin"] == pytest.approx(m, rel=1e-12)
    assert vals["normalized_margin"] == pytest.approx(m / vals["param_norm"] ** 2, rel=1e-12)
    # regression targets: only the norm
    reg = gs.Problem(model, "mse", (X, torch.randn(N, K, dtype=DT)))
    assert set(gs.Tracker(reg, [MarginProbe()]).step(0)) == {"param_norm", "time/margin"}


def test_block_jacobian_singular_values_match_jacrev():
    X, y = _data()
    model = nn.Sequential(
        nn.Linear(D, 7), nn.Tanh(), nn.Sequential(nn.Linear(7, 6), nn.Tanh()), nn.Linear(6, K)
    ).to(DT)
    prob = gs.Problem(model, "cross_entropy", (X, y))
    probe = BlockJacobianProbe("1", samples=10, seed=3)
    tracker = gs.Tracker(prob, [probe])
    vals = tracker.step(4)
    idx = torch.randperm(N, generator=torch.Generator().manual_seed(3))[:10]
    head = model[2:]  # Linear, Tanh, Linear: a nonlinear tail after block "1"
    sv = []
    for i in idx:
        z = model[:2](X[i : i + 1]).detach()[0]
        sv.append(torch.linalg.svdvals(jacrev(head)(z)).detach())
    sv = torch.stack(sv)
    assert probe.history[4] == pytest.approx(sv, rel=1e-10)  # full set kept
    flat = sv.reshape(-1)
    q = torch.quantile(flat, torch.tensor([0.1, 0.5, 0.9], dtype=DT))
    assert vals["block_sv_min/1"] == pytest.approx(flat.min().item(), rel=1e-10)
    assert vals["block_sv_max/1"] == pytest.approx(flat.max().item(), rel=1e-10)
    assert vals["block_sv_q10/1"] == pytest.approx(q[0].item(), rel=1e-10)
    assert vals["block_sv_q50/1"] == pytest.approx(q[1].item(), rel=1e-10)
    assert vals["block_sv_q90/1"] == pytest.approx(q[2].item(), rel=1e-10)
    # a nonlinear tail: the Jacobian depends on the sample (not a single matrix)
    assert sv.std(dim=0).max() > 1e-6


def test_block_jacobian_of_a_conv_block():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(6, 1, 6, 6, generator=g, dtype=DT)
    y = torch.arange(6) % K
    torch.manual_seed(0)
    convs = [nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.Tanh()]
    model = nn.Sequential(*convs, nn.Flatten(), nn.Linear(8, K)).to(DT)
    prob = gs.Problem(model, "cross_entropy", (X, y))
    probe = BlockJacobianProbe("1", samples=6)
    tracker = gs.Tracker(prob, [probe])
    tracker.step(0)
    tail = model[2:]
    for i in range(6):
        z = model[:2](X[i : i + 1]).detach()[0]
        J = jacrev(lambda zz: tail(zz.unsqueeze(0))[0])(z).reshape(K, -1)
        assert probe.history[0][i] == pytest.approx(torch.linalg.svdvals(J.detach()), rel=1e-10)


def test_errors():
    X, y = _data()
    tanh = nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, K)).to(DT)
    prob = gs.Problem(tanh, "cross_entropy", (X, y))
    with pytest.raises(InvalidArgumentError, match=r"no nn\.ReLU"):
        gs.Tracker(prob, [ReluPatternProbe()])
    with pytest.raises(InvalidArgumentError, match="not a submodule"):
        gs.Tracker(prob, [BlockJacobianProbe("7")])
    relu = _relu_mlp()
    shared = nn.Sequential(relu[0], relu[1], relu[2], relu[1], relu[4])  # one ReLU used twice
    prob2 = gs.Problem(shared, "cross_entropy", (X, y))
    with pytest.raises(InvalidArgumentError, match="called 2 times"):
        gs.Tracker(prob2, [BlockJacobianProbe("1")]).step(0)
    # a shared ReLU contributes both calls
    vals = gs.Tracker(prob2, [ReluPatternProbe(samples=N)]).step(0)
    assert vals["relu_pattern_change"] == 0.0
    with pytest.raises(InvalidArgumentError):
        MarginProbe(depth=0)
    with pytest.raises(InvalidArgumentError):
        ReluPatternProbe(samples=0)
