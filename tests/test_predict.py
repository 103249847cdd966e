"""predict() against real training: exact for models linear in θ, converging with width otherwise.

The references are real runs: ``gs.fit`` or hand-written loops with the real optimizer classes
(``torch.optim.SGD``, ``gs.GD``, ``gs.HeavyBall``, ``gs.Nesterov``) on the real module.
``predict`` only sees the NTK, the initial outputs and the optimizer's settings.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

import gdscope as gs
from gdscope.errors import InvalidArgumentError, NonFiniteError, ShapeMismatchError
from gdscope.theory.dynamics import optimizer_spec, predict
from gdscope.theory.linearize import linearize
from gdscope.theory.ratefit import fit_rates

DT = torch.float64
STEPS = 200


# ---------------------------------------------------------------------------------- fixtures
class Offset(nn.Module):
    """Adds a fixed buffer: keeps the model affine in θ but makes ``Jθ0 ≠ f(θ0)``."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.register_buffer("c", torch.linspace(-1.0, 2.0, k, dtype=DT))

    def forward(self, x):
        return x + self.c


def linear_problem(regime: str, reduction: str, loss: str = "mse", n: int = 10, k: int = 2):
    """``nn.Linear`` (+ a fixed offset) on random inputs: affine in θ, the linearization is exact.

    ``under``: P = 5·2 < nk = 20 (K singular: modes outside range(J)); ``over``: P = 62 > nk.
    """
    d = 4 if regime == "under" else 30
    g = torch.Generator().manual_seed(7)
    X = torch.randn(n, d, generator=g, dtype=DT)
    if loss == "mse":
        Y = torch.randn(n, k, generator=g, dtype=DT)
    else:
        Y = torch.randint(0, k, (n,), generator=g)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(d, k), Offset(k)).to(DT)
    return gs.Problem(model, loss, (X, Y), reduction=reduction)


def flat_kernel(model: nn.Module, X: torch.Tensor, X2: torch.Tensor | None = None) -> torch.Tensor:
    K = gs.ntk(model, X, X2)
    n, n2, k, _ = K.shape
    return K.permute(0, 2, 1, 3).reshape(n * k, n2 * k)


def lam_max(prob: gs.Problem) -> float:
    return torch.linalg.eigvalsh(flat_kernel(prob.model, prob.full_batch[0]))[-1].item()


# name -> (factory(params, a) with a = 1/(q λ_max) the GD step of a_max = 1, lr scale)
OPTIMIZERS = {
    "GD": lambda p, a: gs.GD(p, lr=a),
    "HeavyBall": lambda p, a: gs.HeavyBall(p, lr=a, beta=0.8),
    "Nesterov": lambda p, a: gs.Nesterov(p, lr=0.8 * a, beta=0.8),
    "Nesterov-scheduled": lambda p, a: gs.Nesterov(p, lr=0.8 * a, beta="scheduled", r=3),
    "SGD-momentum": lambda p, a: torch.optim.SGD(p, lr=a, momentum=0.9),
    "SGD-dampening": lambda p, a: torch.optim.SGD(p, lr=a, momentum=0.9, dampening=0.3),
    "SGD-nesterov": lambda p, a: torch.optim.SGD(p, lr=a, momentum=0.9, nesterov=True),
    "SGD-wd": lambda p, a: torch.optim.SGD(p, lr=a, weight_decay=0.3 / a),
    "SGD-momentum-wd": lambda p, a: torch.optim.SGD(
        p, lr=a, momentum=0.5, dampening=0.2, weight_decay=0.1 / a
    ),
    "SGD-nesterov-wd": lambda p, a: torch.optim.SGD(
        p, lr=a, momentum=0.7, nesterov=True, weight_decay=0.1 / a
    ),
}


def real_losses(prob: gs.Problem, opt, steps: int) -> np.ndarray:
    """``L(p_t)`` for t = 0..steps from a real ``gs.fit`` run (loss before each update + last)."""
    res = gs.fit(prob, opt, steps)
    with torch.no_grad():
        last = prob.loss().item()
    return np.array([*res.losses, last])


def assert_curve(pred: np.ndarray, act: np.ndarray, rtol: float = 1e-10) -> None:
    """Relative agreement; a floor of 1e-14·L_0 for losses that fall below ~1e-4·L_0."""
    err = np.abs(pred - act)
    tol = rtol * np.abs(act) + 1e-14 * abs(act[0])
    bad = np.flatnonzero(err > tol)
    assert bad.size == 0, (
        f"first mismatch at step {bad[0]}: predicted {pred[bad[0]]!r}, actual {act[bad[0]]!r}"
    )


# ---------------------------------------------------------------------------------- the sharp test
@pytest.mark.parametrize("regime", ["under", "over"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_mse_prediction_equals_training_of_a_linear_model(name, reduction, regime):
    prob = linear_problem(regime, reduction)
    a = 1.0 / (prob.q * lam_max(prob))
    if regime == "over":
        a *= 0.05  # full-rank K: keep the loss above ~1e-10·L_0 over 200 steps
    opt = OPTIMIZERS[name](prob.model.parameters(), a)
    pred = predict(prob, opt, STEPS)
    act = real_losses(prob, opt, STEPS)
    assert pred.loss.shape == (STEPS + 1,)
    assert pred.stable
    assert_curve(pred.loss, act)
    with torch.no_grad():
        f_final_expected = prob.outputs().reshape(-1).numpy()
    np.testing.assert_allclose(pred.outputs[-1], f_final_expected, rtol=0, atol=1e-10)
    Y = prob.full_batch[1].reshape(-1).numpy()
    np.testing.assert_allclose(pred.residuals[-1], f_final_expected - Y, rtol=0, atol=1e-10)


def test_limit_loss_and_null_modes_with_weight_decay():
    """Under-parameterized: outputs never leave f0 + range(J); the ridge limit is reached."""
    prob = linear_problem("under", "mean")
    a = 1.0 / (prob.q * lam_max(prob))
    opt = torch.optim.SGD(prob.model.parameters(), lr=a, weight_decay=0.05 / a)
    pred = predict(prob, opt, 2000, record=5)
    # ridge solution in parameter space, independently: min L(θ) + (w/2)‖θ‖² (θ incl. bias;
    # the fixed offset c is not decayed)
    X, Y = prob.full_batch
    A = torch.cat([X, torch.ones(X.shape[0], 1, dtype=DT)], dim=1)  # (n, d+1)
    w = 0.05 / a
    n, k = Y.shape
    q = prob.q
    c = prob.model[1].c
    theta = torch.linalg.solve(q * A.T @ A + w * torch.eye(A.shape[1], dtype=DT), q * A.T @ (Y - c))
    L_ridge = ((A @ theta + c - Y) ** 2).mean().item()
    assert pred.limit_loss == pytest.approx(L_ridge, rel=1e-10)
    assert pred.loss[-1] == pytest.approx(L_ridge, rel=1e-9)
    assert int(np.sum(pred.eigenvalues == 0)) == n * k - 5 * k
    assert len(pred.record_steps) <= 7 and pred.record_steps[0] == 0
    assert pred.record_steps[-1] == 2000


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "name", ["GD", "HeavyBall", "Nesterov-scheduled", "SGD-nesterov", "SGD-momentum-wd"]
)
def test_cross_entropy_prediction_equals_training_of_a_linear_model(name, reduction):
    prob = linear_problem("over", reduction, loss="cross_entropy", k=3)
    # Q ≤ I/2 per sample (mean: /n): a step with ηλ_max·max Q ≈ 1
    scale = 0.5 / prob.n if reduction == "mean" else 0.5
    a = 1.0 / (scale * lam_max(prob))
    opt = OPTIMIZERS[name](prob.model.parameters(), a)
    pred = predict(prob, opt, STEPS)
    act = real_losses(prob, opt, STEPS)
    assert pred.loss_name == "cross_entropy" and pred.rates is None and pred.stable
    assert act[-1] < 0.5 * act[0]  # it trained
    assert_curve(pred.loss, act)
    with torch.no_grad():
        F = prob.outputs()
    np.testing.assert_allclose(pred.outputs[-1], F.reshape(-1).numpy(), atol=1e-10, rtol=0)
    onehot = nn.functional.one_hot(prob.full_batch[1], 3).to(DT)
    np.testing.assert_allclose(
        pred.residuals[-1], (torch.softmax(F, 1) - onehot).reshape(-1).numpy(), atol=1e-10
    )


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_test_point_outputs_follow_the_real_model(loss):
    """Lee et al.: outputs on x_test through Θ(x_test, X), with momentum and weight decay."""
    prob = linear_problem("over", "mean", loss=loss, k=3)
    X, Y = prob.full_batch
    x_test = torch.randn(7, X.shape[1], generator=torch.Generator().manual_seed(11), dtype=DT)
    a = 0.5 / (prob.q * lam_max(prob)) if loss == "mse" else 0.5 * prob.n / lam_max(prob)
    opt = torch.optim.SGD(prob.model.parameters(), lr=a, momentum=0.6, dampening=0.1,
                          weight_decay=0.02 / a)  # fmt: skip
    steps = 60
    pred = predict(prob, opt, steps, x_test=x_test)
    model = prob.model
    crit = nn.MSELoss() if loss == "mse" else nn.CrossEntropyLoss()
    seen = []
    for _ in range(steps + 1):
        with torch.no_grad():
            seen.append(model(x_test).reshape(-1).clone())
        opt.zero_grad()
        crit(model(X), Y).backward()
        opt.step()
    seen = torch.stack(seen).numpy()
    assert pred.test_outputs.shape == (steps + 1, 7 * 3)
    np.testing.assert_allclose(pred.test_outputs, seen, rtol=0, atol=1e-10)
    assert np.abs(seen[-1] - seen[0]).max() > 0.1  # the test outputs did move


def test_gdscope_optimizers_hold_the_iterates_the_prediction_reports():
    """Nesterov's held y_t vs main x_t: loss[t] is at y_t (what fit reports)."""
    prob = linear_problem("under", "sum")
    a = 0.5 / (prob.q * lam_max(prob))
    opt = gs.Nesterov(prob.model.parameters(), lr=a, beta=0.9)
    pred = predict(prob, opt, 5)
    gs.fit(prob, opt, 5)
    with torch.no_grad():
        y_loss = prob.loss().item()
        main = opt.main_iterate()
        x_loss = prob.loss(dict(zip(prob.names, main, strict=True))).item()
    assert pred.loss[-1] == pytest.approx(y_loss, rel=1e-12)
    assert pred.loss[-1] != pytest.approx(x_loss, rel=1e-6)


# ---------------------------------------------------------------------------------- kernel form
def test_kernel_form_equals_problem_form():
    prob = linear_problem("under", "mean")
    X, Y = prob.full_batch
    a = 1.0 / (prob.q * lam_max(prob))
    opt = torch.optim.SGD(prob.model.parameters(), lr=a, momentum=0.5, weight_decay=0.1 / a)
    ref = predict(prob, opt, 50)
    K4 = gs.ntk(prob.model, X)
    with torch.no_grad():
        f0 = prob.model(X)
    # W x + b is degree-1 homogeneous in θ = (W, b): J θ0 = f(θ0) − offset (Euler's identity)
    jt0 = f0 - prob.model[1].c
    for K in (K4, flat_kernel(prob.model, X).numpy()):
        got = predict(K, opt, 50, f0=f0, y=Y, loss="mse", j_theta0=jt0)
        np.testing.assert_allclose(got.loss, ref.loss, rtol=1e-12)
    got = predict(K4, optimizer_spec(opt), 50, f0=f0, y=Y, loss=("mse", prob.q), j_theta0=jt0)
    np.testing.assert_allclose(got.loss, ref.loss, rtol=1e-12)
    wrong = predict(K4, opt, 50, f0=f0, y=Y, loss="mse", j_theta0=f0)
    assert abs(wrong.loss[-1] - ref.loss[-1]) > 1e-3 * ref.loss[-1]
    summed = predict(K4, opt, 50, f0=f0, y=Y, loss=("mse", "sum"), j_theta0=jt0)
    np.testing.assert_allclose(summed.loss[0], ref.loss[0] * Y.numel(), rtol=1e-12)
    assert ref.optimizer["class"] == "SGD" and ref.optimizer["momentum"] == 0.5


def test_mapping_optimizer_and_doc_example():
    K = np.diag([2.0, 1.0])
    pred = predict(K, {"class": "GD", "lr": 0.25}, 3, f0=[1.0, 1.0], y=[0.0, 0.0],
                   loss=("mse", 2.0))  # fmt: skip
    np.testing.assert_allclose(pred.loss, [2.0, 0.25, 0.0625, 0.015625])
    np.testing.assert_allclose(pred.rates, [0.5, 0.0])  # eigenvalues ascending: 1, 2
    assert pred.asymptotic_rate == 0.5
    described = {"class": "HeavyBall", "param_groups": [{"lr": 0.1, "beta": 0.5}]}
    assert optimizer_spec(described)["beta"] == 0.5


# ---------------------------------------------------------------------------------- rates
def test_rates_are_the_observed_asymptotic_decay():
    prob = linear_problem("over", "mean")
    a = 0.05 / (prob.q * lam_max(prob))  # slow enough to stay far above round-off
    for make, tail in [(lambda p: gs.GD(p, lr=a), 200), (lambda p: gs.HeavyBall(p, a, 0.3), 200)]:
        prob = linear_problem("over", "mean")
        opt = make(prob.model.parameters())
        pred = predict(prob, opt, 600, record=2)
        act = real_losses(prob, opt, 600)
        fit = fit_rates(act, tail=tail)
        assert fit.exponential_rate == pytest.approx(pred.asymptotic_rate**2, rel=2e-3)
        assert pred.loss_rate == pytest.approx(pred.asymptotic_rate**2)
    # GD per mode: |1 − ηqλ_i|, independently from the eigenvalues
    pred = predict(prob, gs.GD(prob.model.parameters(), lr=a), 1)
    np.testing.assert_allclose(pred.rates, np.abs(1 - a * prob.q * pred.eigenvalues), atol=1e-12)


@pytest.mark.parametrize(
    "make, limit",
    [
        (lambda p, lr: gs.GD(p, lr=lr), 2.0),
        (lambda p, lr: gs.HeavyBall(p, lr=lr, beta=0.5), 3.0),  # 2(1+β)
        (lambda p, lr: gs.Nesterov(p, lr=lr, beta=0.5), 1.5),  # 2(1+β)/(1+2β)
        (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.5, dampening=0.5), 6.0),
        (lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.5, nesterov=True), 1.5),
    ],
)
def test_stability_boundary(make, limit):
    """Just below the threshold a = η q λ_max: stable; just above: diverges like real training."""
    prob = linear_problem("under", "mean")
    base = 1.0 / (prob.q * lam_max(prob))
    below = predict(prob, make(prob.model.parameters(), 0.98 * limit * base), 10)
    assert below.stable and below.asymptotic_rate < 1
    opt = make(prob.model.parameters(), 1.02 * limit * base)
    above = predict(prob, opt, 150)
    assert not above.stable and above.asymptotic_rate > 1 and above.limit_loss is None
    act = real_losses(prob, opt, 150)
    assert act[-1] > 10 * act[0]
    assert_curve(above.loss, act, rtol=1e-9)


def test_scheduled_nesterov_rates_note():
    prob = linear_problem("under", "mean")
    pred = predict(prob, gs.Nesterov(prob.model.parameters(), lr=0.1, beta="scheduled"), 3)
    assert any("scheduled" in n for n in pred.notes)
    lam = pred.eigenvalues[pred.eigenvalues > 0]
    aa = 0.1 * prob.q * lam
    np.testing.assert_allclose(pred.rates[pred.eigenvalues > 0], np.sqrt(1 - aa), rtol=1e-12)


def test_record_subset_is_bounded_and_exact():
    prob = linear_problem("under", "mean")
    opt = gs.GD(prob.model.parameters(), lr=0.5 / (prob.q * lam_max(prob)))
    sparse = predict(prob, opt, 1000)
    dense = predict(prob, opt, 1000, record=range(1001))
    assert len(sparse.record_steps) <= 202
    assert sparse.record_steps[0] == 0 and sparse.record_steps[-1] == 1000
    np.testing.assert_array_equal(sparse.outputs, dense.outputs[sparse.record_steps])
    np.testing.assert_array_equal(sparse.loss, dense.loss)


# ---------------------------------------------------------------------------------- wide nets
class NTKMLP(nn.Module):
    """``f(x) = W2 tanh(W1 x/√d)/√m``, standard normal weights (NTK parameterization)."""

    def __init__(self, d: int, m: int) -> None:
        super().__init__()
        self.l1 = nn.Linear(d, m, bias=False)
        self.l2 = nn.Linear(m, 1, bias=False)
        nn.init.normal_(self.l1.weight)
        nn.init.normal_(self.l2.weight)
        self.d, self.m = d, m

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x) / math.sqrt(self.d))) / math.sqrt(self.m)


def test_gap_to_real_training_shrinks_with_width():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 4, generator=g, dtype=DT)
    Y = torch.sin(X @ torch.randn(4, 1, generator=g, dtype=DT))
    gaps = {}
    for m in (16, 256, 1024):
        per_seed = []
        for seed in range(3):
            torch.manual_seed(seed)
            prob = gs.Problem(NTKMLP(4, m).to(DT), "mse", (X, Y))
            opt = gs.GD(prob.model.parameters(), lr=2.0)  # a_max = ηqλ_max ≈ 0.9–1.2
            pred = predict(prob, opt, 100)
            act = real_losses(prob, opt, 100)
            assert act[-1] < 0.1 * act[0]
            per_seed.append(np.max(np.abs(pred.loss - act) / act))
        gaps[m] = float(np.mean(per_seed))
    assert gaps[256] < 0.5 * gaps[16], gaps
    assert gaps[1024] < 0.5 * gaps[256], gaps
    assert gaps[1024] < 0.05, gaps


# ---------------------------------------------------------------------------------- linearize
def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 12), nn.Tanh(), nn.Linear(12, 2)).to(DT)


def _jac(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    J = torch.func.jacrev(lambda p: functional_call(model, p, (X,)))(params)
    return torch.cat([J[n].reshape(X.shape[0] * 2, -1) for n in names], dim=1)


def test_linearize_matches_model_value_and_jacobian_at_theta0():
    model = _mlp()
    X = torch.randn(9, 4, generator=torch.Generator().manual_seed(1), dtype=DT)
    lin = linearize(model)
    torch.testing.assert_close(lin(X), model(X), rtol=0, atol=1e-14)
    J = _jac(model, X)
    torch.testing.assert_close(_jac(lin, X), J, rtol=0, atol=1e-13)
    assert sum(p.numel() for p in lin.parameters() if p.requires_grad) == J.shape[1]
    # affine in θ: f_lin(θ0 + Δ) = f0 + J Δ, exactly
    delta = torch.randn(J.shape[1], generator=torch.Generator().manual_seed(2), dtype=DT)
    with torch.no_grad():
        i = 0
        for p in lin.theta:
            p.add_(delta[i : i + p.numel()].view_as(p))
            i += p.numel()
        expected = model(X).reshape(-1) + J @ delta
        torch.testing.assert_close(lin(X).reshape(-1), expected, rtol=0, atol=1e-12)
    # the original is untouched, and a custom expansion point works
    p1 = {n: p.detach() + 0.1 for n, p in model.named_parameters()}
    lin1 = linearize(model, p1)
    torch.testing.assert_close(lin1(X), functional_call(model, p1, (X,)), rtol=0, atol=1e-14)
    with pytest.raises(InvalidArgumentError, match="missing"):
        linearize(model, {"0.weight": p1["0.weight"]})


def test_linearize_holds_buffers_fixed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 1)).to(DT)
    X = torch.randn(8, 3, dtype=DT)
    lin = linearize(model)
    before = lin.base[1].running_mean.clone()
    lin(X)
    lin(X)
    torch.testing.assert_close(lin.base[1].running_mean, before, rtol=0, atol=0)
    assert torch.equal(model[1].running_mean, torch.zeros(5, dtype=DT))


@pytest.mark.parametrize(
    "make",
    [
        lambda p: gs.GD(p, lr=0.5),
        lambda p: gs.Nesterov(p, lr=0.3, beta=0.8),
        lambda p: torch.optim.SGD(p, lr=0.4, momentum=0.7, dampening=0.2, weight_decay=0.3),
        lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.8, nesterov=True, weight_decay=0.2),
    ],
)
def test_training_the_linearized_model_equals_predict(make):
    """A nonlinear net: predict(net) is exactly the run of linearize(net), weight decay included."""
    model = _mlp(4)
    g = torch.Generator().manual_seed(5)
    X, Y = torch.randn(12, 4, generator=g, dtype=DT), torch.randn(12, 2, generator=g, dtype=DT)
    pred = predict(gs.Problem(model, "mse", (X, Y)), make(model.parameters()), 80)
    lin_prob = gs.Problem(linearize(model), "mse", (X, Y))
    act = real_losses(lin_prob, make(lin_prob.model.parameters()), 80)
    assert_curve(pred.loss, act, rtol=1e-9)
    real = real_losses(gs.Problem(model, "mse", (X, Y)), make(model.parameters()), 80)
    assert np.max(np.abs(real - act) / act) > 1e-4  # the net itself is not linear


# ---------------------------------------------------------------------------------- bad input
def test_refuses_bad_optimizers():
    prob = linear_problem("under", "mean")
    ps = list(prob.model.parameters())
    with pytest.raises(InvalidArgumentError, match="Adam"):
        predict(prob, torch.optim.Adam(ps, lr=0.1), 5)
    with pytest.raises(InvalidArgumentError, match="lr"):
        predict(prob, torch.optim.SGD(ps, lr=0.0), 5)
    with pytest.raises(InvalidArgumentError, match="lr"):
        predict(prob, {"class": "GD", "lr": -0.1}, 5)
    with pytest.raises(InvalidArgumentError, match="momentum"):
        predict(prob, torch.optim.SGD(ps, lr=0.1, momentum=1.0), 5)
    with pytest.raises(InvalidArgumentError, match="momentum"):
        predict(prob, {"class": "SGD", "lr": 0.1, "momentum": -0.2}, 5)
    with pytest.raises(InvalidArgumentError, match="beta"):
        predict(prob, {"class": "HeavyBall", "lr": 0.1, "beta": 1.5}, 5)
    opt = torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True)
    opt.param_groups[0]["dampening"] = 0.1
    with pytest.raises(InvalidArgumentError, match="dampening"):
        predict(prob, opt, 5)
    with pytest.raises(InvalidArgumentError, match="maximize"):
        predict(prob, torch.optim.SGD(ps, lr=0.1, maximize=True), 5)
    opt = torch.optim.SGD(ps, lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, 10)
    with pytest.raises(InvalidArgumentError, match="scheduler"):
        predict(prob, opt, 5)
    opt = gs.GD(ps, lr=0.01)
    gs.fit(prob, opt, 1)
    opt2 = torch.optim.SGD(ps, lr=0.01, momentum=0.5)
    gs.fit(prob, opt2, 1)
    with pytest.raises(InvalidArgumentError, match="already taken steps"):
        predict(prob, opt2, 5)
    groups = [{"params": [ps[0]], "lr": 0.1}, {"params": [ps[1]], "lr": 0.2}]
    with pytest.raises(InvalidArgumentError, match="param groups differ"):
        predict(prob, torch.optim.SGD(groups, lr=0.1), 5)
    with pytest.raises(InvalidArgumentError, match="does not update"):
        predict(prob, gs.GD([ps[0]], lr=0.1), 5)
    with pytest.raises(InvalidArgumentError, match="steps"):
        predict(prob, gs.GD(ps, lr=0.1), -1)


def test_refuses_bad_kernels_and_sizes():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((6, 3))
    K = A @ A.T
    f0, y = rng.standard_normal(6), rng.standard_normal(6)
    gd = {"class": "GD", "lr": 0.1}
    lam, V = np.linalg.eigh(K)
    # a tiny negative eigenvalue beyond round-off but below 1e-10·λ_max: warned and clipped
    Ksmall = K - 1e-12 * lam[-1] * np.outer(V[:, 0], V[:, 0])
    with pytest.warns(RuntimeWarning, match="negative"):
        pred = predict(Ksmall, gd, 3, f0=f0, y=y, loss="mse")
    assert pred.eigenvalues.min() == 0.0
    with warnings.catch_warnings():  # round-off negatives are silent
        warnings.simplefilter("error")
        predict(K, gd, 3, f0=f0, y=y, loss="mse")
    Kneg = K - 1e-3 * lam[-1] * np.outer(V[:, 0], V[:, 0])
    with pytest.raises(InvalidArgumentError, match="positive semi-definite"):
        predict(Kneg, gd, 3, f0=f0, y=y, loss="mse")
    with pytest.raises(InvalidArgumentError, match="symmetric"):
        predict(K + np.triu(np.ones((6, 6)), 1), gd, 3, f0=f0, y=y, loss="mse")
    with pytest.raises(ShapeMismatchError, match="f0"):
        predict(K, gd, 3, f0=f0[:5], y=y, loss="mse")
    with pytest.raises(ShapeMismatchError, match="y"):
        predict(K, gd, 3, f0=f0, y=y[:4], loss="mse")
    with pytest.raises(ShapeMismatchError, match="columns"):
        predict(K, gd, 3, f0=f0, y=y, loss="mse", kernel_test=np.ones((2, 5)), f0_test=[0, 0])
    with pytest.raises(InvalidArgumentError, match="j_theta0"):
        predict(K, {"class": "SGD", "lr": 0.1, "weight_decay": 0.1}, 3, f0=f0, y=y, loss="mse")
    with pytest.raises(InvalidArgumentError, match="loss"):
        predict(K, gd, 3, f0=f0, y=y)
    with pytest.raises(InvalidArgumentError, match="not supported"):
        predict(K, gd, 3, f0=f0, y=y, loss="huber")
    with pytest.raises(NonFiniteError):
        predict(np.full((6, 6), np.nan), gd, 3, f0=f0, y=y, loss="mse")
    with pytest.raises(InvalidArgumentError, match="class indices"):
        predict(K, gd, 3, f0=f0.reshape(3, 2), y=[0, 1, 2], loss="cross_entropy")


def test_refuses_bad_problems():
    prob = linear_problem("under", "mean")
    opt = gs.GD(prob.model.parameters(), lr=0.1)
    with pytest.raises(InvalidArgumentError, match="taken from the Problem"):
        predict(prob, opt, 3, f0=np.zeros(20))
    X, Y = prob.full_batch
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=5)
    with pytest.raises(InvalidArgumentError, match="DataLoader"):
        predict(gs.Problem(prob.model, "mse", loader), opt, 3)
    with pytest.raises(InvalidArgumentError, match="x_test needs a Problem"):
        predict(np.eye(2), {"class": "GD", "lr": 0.1}, 1, f0=[0, 0], y=[1, 1], loss="mse",
                x_test=X)  # fmt: skip
