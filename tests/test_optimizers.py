"""GD, heavy ball and Nesterov against PyTorch's SGD and hand-written recursions; thresholds."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from gdscope.errors import InvalidArgumentError
from gdscope.train import GD, HeavyBall, Nesterov, describe_optimizer, stability_threshold

DT = torch.float64


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).to(DT)


def _data(seed: int = 1, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _train(model, opt, X, Y, steps, sched=None):
    """A plain loop; returns the flat parameters after every step."""
    traj = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(X), Y).backward()
        opt.step()
        if sched is not None:
            sched.step()
        traj.append(_flat(model))
    return torch.stack(traj)


def _flat_grad(model: nn.Module, X, Y):
    """``θ ↦ ∇L(θ)`` on flat vectors, through functional_call (independent of any optimizer)."""
    shapes = [(n, p.shape, p.numel()) for n, p in model.named_parameters()]

    def loss(vec):
        params, i = {}, 0
        for n, s, m in shapes:
            params[n] = vec[i : i + m].reshape(s)
            i += m
        return nn.functional.mse_loss(functional_call(model, params, (X,)), Y)

    return torch.func.grad(loss)


# ---------------------------------------------------------------------- against torch.optim.SGD
def test_gd_equals_sgd():
    X, Y = _data()
    a, b = _mlp(), _mlp()
    ta = _train(a, GD(a.parameters(), lr=0.3), X, Y, 40)
    tb = _train(b, torch.optim.SGD(b.parameters(), lr=0.3), X, Y, 40)
    assert torch.equal(ta, tb)


def test_heavy_ball_equals_sgd_momentum_under_constant_lr():
    X, Y = _data()
    a, b = _mlp(), _mlp()
    ta = _train(a, HeavyBall(a.parameters(), lr=0.2, beta=0.8), X, Y, 60)
    tb = _train(b, torch.optim.SGD(b.parameters(), lr=0.2, momentum=0.8), X, Y, 60)
    torch.testing.assert_close(ta, tb, atol=1e-12, rtol=0)
    assert not torch.allclose(ta[1], ta[0])


def test_heavy_ball_follows_its_formula_when_lr_changes():
    X, Y = _data()
    model = _mlp()
    grad = _flat_grad(_mlp(), X, Y)
    opt = HeavyBall(model.parameters(), lr=0.2, beta=0.7)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.3)
    traj = _train(model, opt, X, Y, 20, sched)
    # θ_{t+1} = θ_t − η_t ∇L(θ_t) + β(θ_t − θ_{t−1}), θ_{−1} = θ_0, η_t = 0.2·0.3^⌊t/5⌋
    prev = theta = _flat(_mlp())
    for t in range(20):
        lr = 0.2 * 0.3 ** (t // 5)
        theta, prev = theta - lr * grad(theta) + 0.7 * (theta - prev), theta
        torch.testing.assert_close(traj[t], theta, atol=1e-12, rtol=0)
    # PyTorch's v-form is a different sequence once η changes: the test can tell them apart
    b = _mlp()
    opt_b = torch.optim.SGD(b.parameters(), lr=0.2, momentum=0.7)
    tb = _train(b, opt_b, X, Y, 20, torch.optim.lr_scheduler.StepLR(opt_b, 5, 0.3))
    assert (tb[-1] - traj[-1]).abs().max() > 1e-6


def test_nesterov_lookahead_equals_sgd_nesterov_under_constant_lr():
    """PyTorch's p_{t+1} = p_t − η(g_t + μv_t), v_t = μv_{t−1} + g_t is y_t exactly."""
    X, Y = _data()
    a, b = _mlp(), _mlp()
    ta = _train(a, Nesterov(a.parameters(), lr=0.2, beta=0.8), X, Y, 60)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.2, momentum=0.8, nesterov=True)
    tb = _train(b, opt_b, X, Y, 60)
    torch.testing.assert_close(ta, tb, atol=1e-12, rtol=0)


def _quadratic(seed: int = 3, d: int = 5):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    A = Q @ np.diag(np.linspace(0.05, 1.0, d)) @ Q.T  # eigenvalues 0.05 … 1
    return A, rng.standard_normal(d), rng.standard_normal(d)


def _run_quadratic(opt_factory, A, b, x0, steps):
    """``L = ½ θᵀAθ − bᵀθ`` on an nn.Parameter; returns held params and main iterates."""
    theta = nn.Parameter(torch.tensor(x0, dtype=DT))
    At, bt = torch.tensor(A), torch.tensor(b)
    opt = opt_factory([theta])
    held, main = [], []
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * theta @ At @ theta - bt @ theta).backward()
        opt.step()
        held.append(theta.detach().numpy().copy())
        main.append(opt.main_iterate()[0].numpy().copy())
    return np.array(held), np.array(main)


@pytest.mark.parametrize("beta", [0.0, 0.6, 0.95])
def test_nesterov_constant_main_iterate_matches_theory_recursion(beta):
    A, b, x0 = _quadratic()
    lr = 0.7
    held, main = _run_quadratic(lambda p: Nesterov(p, lr=lr, beta=beta), A, b, x0, 50)
    # THEORY §2: y_t = θ_t + β(θ_t − θ_{t−1}), θ_{t+1} = y_t − η∇L(y_t), θ_{−1} = θ_0
    prev = theta = x0.copy()
    for t in range(50):
        y = theta + beta * (theta - prev)
        theta, prev = y - lr * (A @ y - b), theta
        np.testing.assert_allclose(main[t], theta, atol=1e-12, rtol=0)
        np.testing.assert_allclose(held[t], theta + beta * (theta - prev), atol=1e-12, rtol=0)


@pytest.mark.parametrize("r", [3.0, 5.5])
def test_nesterov_scheduled_matches_su_boyd_candes(r):
    A, b, x0 = _quadratic()
    lr = 0.9
    opt_factory = lambda p: Nesterov(p, lr=lr, beta="scheduled", r=r)  # noqa: E731
    held, main = _run_quadratic(opt_factory, A, b, x0, 80)
    # y_0 = x_0; x_t = y_{t−1} − η∇L(y_{t−1}); y_t = x_t + (t−1)/(t+r−1)·(x_t − x_{t−1})
    x_prev, y = x0.copy(), x0.copy()
    for t in range(1, 81):
        x = y - lr * (A @ y - b)
        y = x + (t - 1) / (t + r - 1) * (x - x_prev)
        x_prev = x
        np.testing.assert_allclose(main[t - 1], x, atol=1e-12, rtol=0)
        np.testing.assert_allclose(held[t - 1], y, atol=1e-12, rtol=0)
    # β_1 = 0: after one step the look-ahead is the main iterate; β_2 = 1/(r+1) > 0 after
    np.testing.assert_array_equal(held[0], main[0])
    assert np.abs(held[1] - main[1]).max() > 1e-6


def test_nesterov_main_iterate_before_any_step_is_the_parameters():
    model = _mlp()
    opt = Nesterov(model.parameters(), lr=0.1, beta="scheduled")
    for x, p in zip(opt.main_iterate(), model.parameters(), strict=True):
        assert torch.equal(x, p.detach()) and x.data_ptr() != p.data_ptr()


# ---------------------------------------------------------------------- state_dict, groups
@pytest.mark.parametrize(
    "make",
    [
        lambda p: GD(p, lr=0.2),
        lambda p: HeavyBall(p, lr=0.2, beta=0.9),
        lambda p: Nesterov(p, lr=0.2, beta=0.9),
        lambda p: Nesterov(p, lr=0.2, beta="scheduled", r=4.0),
    ],
)
def test_state_dict_round_trip_resumes_identically(make):
    X, Y = _data()
    ref = _mlp()
    reference = _train(ref, make(ref.parameters()), X, Y, 30)
    first = _mlp()
    opt = make(first.parameters())
    _train(first, opt, X, Y, 12)
    saved_model = copy.deepcopy(first.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    _train(first, opt, X, Y, 5)  # moves on: the saved copies must not alias live state
    resumed = _mlp(seed=7)
    resumed.load_state_dict(saved_model)
    opt2 = make(resumed.parameters())
    opt2.load_state_dict(saved_opt)
    rest = _train(resumed, opt2, X, Y, 18)
    torch.testing.assert_close(rest, reference[12:], atol=0, rtol=0)


def test_param_groups_use_their_own_lr_and_beta():
    X, Y = _data()
    a, b = _mlp(), _mlp()
    groups = lambda m: [  # noqa: E731
        {"params": m[0].parameters(), "lr": 0.05},
        {"params": m[2].parameters(), "momentum": 0.5},
    ]
    opt_a = HeavyBall(
        [{"params": a[0].parameters(), "lr": 0.05}, {"params": a[2].parameters(), "beta": 0.5}],
        lr=0.2,
        beta=0.8,
    )
    opt_b = torch.optim.SGD(groups(b), lr=0.2, momentum=0.8)
    torch.testing.assert_close(
        _train(a, opt_a, X, Y, 30), _train(b, opt_b, X, Y, 30), atol=1e-12, rtol=0
    )
    assert stability_threshold(opt_a) == pytest.approx(min(2 * 1.8 / 0.05, 2 * 1.5 / 0.2))


def test_params_without_grad_are_skipped():
    model = _mlp()
    frozen = model[0].weight.detach().clone()
    for opt in (GD, HeavyBall, Nesterov):
        o = opt(model.parameters(), lr=0.1, **({} if opt is GD else {"beta": 0.5}))
        o.zero_grad()
        model[2](model[1](torch.ones(3, 6, dtype=DT))).sum().backward()
        o.step()
        o.step()
        assert model[0].weight.grad is None and torch.equal(model[0].weight, frozen)
        assert model[0].weight not in o.state


def test_closure_is_evaluated_with_grad():
    X, Y = _data()
    model = _mlp()
    opt = Nesterov(model.parameters(), lr=0.1, beta=0.5)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), Y)
        loss.backward()
        return loss

    before = _flat(model)
    loss = opt.step(closure)
    assert torch.is_tensor(loss) and not torch.equal(before, _flat(model))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: GD(p, lr=0.0), "lr=0.0"),
        (lambda p: GD(p, lr=-1), "lr=-1"),
        (lambda p: GD(p, lr=math.nan), "lr=nan"),
        (lambda p: GD(p, lr=math.inf), "lr=inf"),
        (lambda p: GD(p, lr="0.1"), "lr='0.1'"),
        (lambda p: HeavyBall(p, lr=0.1, beta=1.0), "beta=1.0"),
        (lambda p: HeavyBall(p, lr=0.1, beta=-0.1), "beta=-0.1"),
        (lambda p: HeavyBall(p, lr=0.1, beta="scheduled"), "beta='scheduled'"),
        (lambda p: Nesterov(p, lr=0.1, beta="constant"), "beta='constant'"),
        (lambda p: Nesterov(p, lr=0.1, beta=1.5), "beta=1.5"),
        (lambda p: Nesterov(p, lr=0.1, beta="scheduled", r=0), "r=0"),
        (lambda p: HeavyBall([{"params": p, "lr": -2}], lr=0.1, beta=0.5), "lr=-2"),
    ],
)
def test_bad_hyperparameters_raise(make, match):
    with pytest.raises(InvalidArgumentError, match=match):
        make(_mlp().parameters())


def test_describe_optimizer_is_json_friendly():
    model = _mlp()
    d = describe_optimizer(Nesterov(model.parameters(), lr=0.1, beta="scheduled"))
    assert d["class"] == "Nesterov"
    assert d["param_groups"] == [{"lr": 0.1, "beta": "scheduled", "r": 3.0}]
    adam = describe_optimizer(torch.optim.Adam(model.parameters(), lr=torch.tensor(0.01)))
    assert adam["param_groups"][0]["betas"] == [0.9, 0.999]
    assert adam["param_groups"][0]["lr"] == pytest.approx(0.01)
    json.dumps(adam)


# ---------------------------------------------------------------------- thresholds
def _final_abs(make, h: float, steps: int = 2000) -> float:
    """|θ_T| for ``L = h θ²/2`` from θ_0 = 1, with the real optimizer class."""
    theta = nn.Parameter(torch.ones(1, dtype=DT))
    opt = make([theta])
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * h * theta**2).sum().backward()
        opt.step()
        if not abs(theta.item()) < 1e12:  # blown up (or non-finite): no need to go on
            return math.inf
    return abs(theta.item())


LR = 0.1
THRESHOLD_CASES = {
    "GD": (lambda p: GD(p, lr=LR), 2 / LR),
    "HeavyBall": (lambda p: HeavyBall(p, lr=LR, beta=0.7), 2 * 1.7 / LR),
    "Nesterov": (lambda p: Nesterov(p, lr=LR, beta=0.7), 2 * 1.7 / (2.4 * LR)),
    "SGD": (lambda p: torch.optim.SGD(p, lr=LR), 2 / LR),
    "SGD-momentum": (lambda p: torch.optim.SGD(p, lr=LR, momentum=0.7), 2 * 1.7 / LR),
    "SGD-dampening": (
        lambda p: torch.optim.SGD(p, lr=LR, momentum=0.7, dampening=0.4),
        2 * 1.7 / (0.6 * LR),
    ),
    "SGD-nesterov": (
        lambda p: torch.optim.SGD(p, lr=LR, momentum=0.7, nesterov=True),
        2 * 1.7 / (2.4 * LR),
    ),
    "SGD-weight-decay": (lambda p: torch.optim.SGD(p, lr=LR, weight_decay=3.0), 2 / LR - 3.0),
    "SGD-momentum-weight-decay": (
        lambda p: torch.optim.SGD(p, lr=LR, momentum=0.7, weight_decay=3.0),
        2 * 1.7 / LR - 3.0,
    ),
    "SGD-nesterov-weight-decay": (
        lambda p: torch.optim.SGD(p, lr=LR, momentum=0.7, nesterov=True, weight_decay=3.0),
        2 * 1.7 / (2.4 * LR) - 3.0,
    ),
}


@pytest.mark.parametrize("name", list(THRESHOLD_CASES))
def test_threshold_separates_decay_from_blow_up(name):
    make, expected = THRESHOLD_CASES[name]
    thr = stability_threshold(make([nn.Parameter(torch.zeros(1, dtype=DT))]))
    assert thr == pytest.approx(expected, rel=1e-12)
    assert _final_abs(make, 0.99 * thr) < 1e-8
    assert _final_abs(make, 1.01 * thr) > 1e8


def test_scheduled_nesterov_threshold_follows_beta_t_and_tends_to_four_thirds():
    model = _mlp()
    X, Y = _data()
    opt = Nesterov(model.parameters(), lr=LR, beta="scheduled", r=3.0)
    assert stability_threshold(opt) == pytest.approx(2 / LR)  # next step has β_1 = 0
    _train(model, opt, X, Y, 7)
    beta = 7 / 10  # β_8 = (8−1)/(8+3−1)
    assert stability_threshold(opt) == pytest.approx(2 * (1 + beta) / ((1 + 2 * beta) * LR))
    # β_t → 1: a mode just above 4/(3η) blows up eventually, one just below decays
    make = lambda p: Nesterov(p, lr=LR, beta="scheduled")  # noqa: E731
    assert _final_abs(make, 0.99 * 4 / (3 * LR), 4000) < 1e-8
    assert _final_abs(make, 1.01 * 4 / (3 * LR), 4000) > 1e8


def test_threshold_moves_with_lr_scheduler():
    opt = HeavyBall([nn.Parameter(torch.zeros(1))], lr=0.1, beta=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert stability_threshold(opt) == pytest.approx(2 * 1.5 / 0.05)


def test_threshold_edge_cases():
    p = [nn.Parameter(torch.zeros(1))]
    assert stability_threshold(torch.optim.Adam(p, lr=0.1)) is None
    assert stability_threshold(torch.optim.AdamW(p, lr=0.1)) is None
    assert stability_threshold(torch.optim.RMSprop(p, lr=0.1)) is None
    assert stability_threshold(torch.optim.SGD(p, lr=0.1, maximize=True)) is None
    assert stability_threshold(torch.optim.SGD(p, lr=0.0)) == math.inf
    sgd = torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=1.0)
    assert stability_threshold(sgd) == math.inf
    # dampening is ignored without momentum (PyTorch uses the raw gradient then)
    assert stability_threshold(torch.optim.SGD(p, lr=0.1, dampening=0.5)) == pytest.approx(20)
