"""The trainer ``fit`` and the samplers, against hand-written loops and recomputation."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

import gdscope as gs
from gdscope.errors import InvalidArgumentError, NonFiniteError
from gdscope.train import (
    GD,
    EpochSampler,
    FitResult,
    FreshBatchSampler,
    Nesterov,
    fit,
)

DT = torch.float64
N = 20


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _data(seed: int = 1, n: int = N):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randn(n, 3, generator=g, dtype=DT)


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def _loss_at(model: nn.Module, vec: torch.Tensor, X, Y) -> torch.Tensor:
    """MSE at flat parameters ``vec``, through functional_call (independent of fit)."""
    params, i = {}, 0
    for n, p in model.named_parameters():
        params[n] = vec[i : i + p.numel()].reshape(p.shape)
        i += p.numel()
    return nn.functional.mse_loss(functional_call(model, params, (X,)), Y)


class RecordingTracker:
    """Duck-typed tracker: records every call and the parameters the model holds then."""

    def __init__(self, model: nn.Module, raise_at: int | None = None) -> None:
        self.model = model
        self.raise_at = raise_at
        self.calls: list[dict] = []
        self.configs: list[dict] = []
        self.closed: list[str] = []

    def record_config(self, d: dict) -> None:
        self.configs.append(d)

    def step(self, t, optimizer=None, loss=None, outputs=None, targets=None):
        if t == self.raise_at:
            raise NonFiniteError(f"step {t}, probe 'fake': boom")
        self.calls.append(
            {
                "t": t,
                "optimizer": optimizer,
                "loss": loss,
                "outputs": outputs,
                "targets": targets,
                "params_after": _flat(self.model),
            }
        )

    def close(self, status: str = "completed") -> None:
        self.closed.append(status)


# ---------------------------------------------------------------------- samplers
def test_fresh_sampler_no_repeats_uniform_and_reproducible():
    n, B, draws = 10, 3, 3000
    s = FreshBatchSampler(n, B, torch.Generator().manual_seed(0))
    counts = torch.zeros(n)
    for _ in range(draws):
        idx = s()
        assert idx.shape == (B,) and idx.dtype == torch.long
        assert len(set(idx.tolist())) == B and idx.min() >= 0 and idx.max() < n
        counts += torch.bincount(idx, minlength=n)
    expected = draws * B / n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 40  # 9 degrees of freedom: P(χ² > 40) ≈ 1e-5
    a = FreshBatchSampler(n, B, torch.Generator().manual_seed(5))
    b = FreshBatchSampler(n, B, torch.Generator().manual_seed(5))
    c = FreshBatchSampler(n, B, torch.Generator().manual_seed(6))
    sa = [a().tolist() for _ in range(20)]
    assert sa == [b().tolist() for _ in range(20)]
    assert sa != [c().tolist() for _ in range(20)]
    # fresh draws are not epochs: within n/B consecutive batches indices repeat
    pairs = [sa[i] + sa[i + 1] + sa[i + 2] for i in range(0, 18, 3)]
    assert any(len(set(p)) < 9 for p in pairs)


@pytest.mark.parametrize(("drop_last", "sizes"), [(False, [3, 3, 3, 1]), (True, [3, 3, 3])])
def test_epoch_sampler_covers_each_index_once_per_epoch(drop_last, sizes):
    n, B = 10, 3
    s = EpochSampler(n, B, torch.Generator().manual_seed(0), drop_last=drop_last)
    assert s.batches_per_epoch == len(sizes)
    epochs = []
    for _ in range(4):
        batches = [s() for _ in sizes]
        assert [len(b) for b in batches] == sizes
        seen = torch.cat(batches).tolist()
        assert len(set(seen)) == len(seen) == sum(sizes)
        epochs.append(seen)
    assert s.epoch == 4
    if not drop_last:
        assert all(sorted(e) == list(range(n)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled each epoch


@pytest.mark.parametrize("cls", [FreshBatchSampler, EpochSampler])
@pytest.mark.parametrize(("n", "B"), [(10, 0), (10, 11), (0, 1), (10, 2.0)])
def test_samplers_validate(cls, n, B):
    with pytest.raises(InvalidArgumentError, match=r"batch_size|n="):
        cls(n, B, torch.Generator())


# ---------------------------------------------------------------------- full batch
def test_full_batch_gd_matches_hand_recursion():
    X, Y = _data()
    model = _mlp()
    prob = gs.Problem(model, "mse", (X, Y))
    shadow = _mlp()
    grad = torch.func.grad(lambda v: _loss_at(shadow, v, X, Y))
    theta = _flat(shadow)
    res = fit(prob, GD(model.parameters(), lr=0.4), 25)
    for t in range(25):
        assert res.losses[t] == pytest.approx(_loss_at(shadow, theta, X, Y).item(), rel=1e-12)
        theta = theta - 0.4 * grad(theta)
    torch.testing.assert_close(_flat(model), theta, atol=1e-12, rtol=0)
    assert res == FitResult(res.losses, 25, res.seconds, 0, False, None, None, "full")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_full_batch_tensor_and_dataloader_give_the_same_trajectory(reduction):
    X, Y = _data()
    a, b = _mlp(), _mlp()
    lr = 0.3 if reduction == "mean" else 0.3 / (N * 3)
    loader = DataLoader(
        TensorDataset(X, Y), batch_size=7, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    prob_a = gs.Problem(a, "mse", (X, Y), reduction=reduction)
    prob_b = gs.Problem(b, "mse", loader, reduction=reduction)
    ta, tb = RecordingTracker(a), RecordingTracker(b)
    ra = fit(prob_a, torch.optim.SGD(a.parameters(), lr=lr, momentum=0.9), 30, ta)
    rb = fit(prob_b, torch.optim.SGD(b.parameters(), lr=lr, momentum=0.9), 30, tb)
    assert ra.losses == pytest.approx(rb.losses, rel=1e-12)
    for ca, cb in zip(ta.calls, tb.calls, strict=True):
        torch.testing.assert_close(ca["params_after"], cb["params_after"], atol=1e-12, rtol=0)
        assert cb["outputs"].shape == (N, 3) and cb["targets"].shape == (N, 3)
        # loader batches are shuffled: same rows, another order
        order_a = torch.argsort(ca["targets"][:, 0])
        order_b = torch.argsort(cb["targets"][:, 0])
        torch.testing.assert_close(
            ca["outputs"][order_a], cb["outputs"][order_b], atol=1e-12, rtol=0
        )
    assert ra.losses[-1] < 0.5 * ra.losses[0]


def test_tracker_receives_each_step_with_the_pre_update_loss():
    X, Y = _data()
    model = _mlp()
    prob = gs.Problem(model, "mse", (X, Y))
    shadow = _mlp()
    opt = Nesterov(model.parameters(), lr=0.2, beta="scheduled")
    tracker = RecordingTracker(model)
    res = fit(prob, opt, 12, tracker, seed=4)
    assert [c["t"] for c in tracker.calls] == list(range(12))
    before = _flat(_mlp())
    for t, call in enumerate(tracker.calls):
        assert call["optimizer"] is opt
        assert call["loss"].item() == pytest.approx(
            _loss_at(shadow, before, X, Y).item(), rel=1e-12
        )
        assert call["loss"].item() == res.losses[t] and not call["loss"].requires_grad
        params, i = {}, 0
        for n, p in shadow.named_parameters():
            params[n] = before[i : i + p.numel()].reshape(p.shape)
            i += p.numel()
        torch.testing.assert_close(call["outputs"], functional_call(shadow, params, (X,)))
        assert torch.equal(call["targets"], Y)
        before = call["params_after"]
    # success: fit ends the run (a duck-typed tracker without finish() is closed "completed")
    assert tracker.closed == ["completed"]
    assert tracker.configs == [
        {
            "seed": 4,
            "steps": 12,
            "batch_size": None,
            "sampler": "full",
            "optimizer": {
                "class": "Nesterov",
                "param_groups": [{"lr": 0.2, "beta": "scheduled", "r": 3.0}],
            },
        }
    ]
    json.dumps(tracker.configs[0])


def test_fit_with_the_real_tracker():
    tracker_mod = pytest.importorskip("gdscope.tracker", reason="the Tracker's store is needed")
    from gdscope.probes import LossProbe, ThresholdProbe

    X, Y = _data()
    model = _mlp()
    prob = gs.Problem(model, "mse", (X, Y))
    with tracker_mod.Tracker(prob, [LossProbe(), ThresholdProbe()]) as tracker:
        res = fit(prob, GD(model.parameters(), lr=0.2), 5, tracker)
    steps, losses = tracker.series("loss")
    assert steps == list(range(5)) and losses == res.losses
    assert tracker.series("threshold")[1] == pytest.approx([10.0] * 5)
    assert tracker.config["optimizer"]["class"] == "GD"


# ---------------------------------------------------------------------- mini-batch
def _manual_minibatch(sampler: str, seed: int, B: int, steps: int, lr: float):
    """SGD with the same index draws, written out: randperm per batch or per epoch."""
    X, Y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    losses, perm, pos = [], None, N
    for _ in range(steps):
        if sampler == "fresh":
            idx = torch.randperm(N, generator=g)[:B]
        else:
            if pos >= N:
                perm, pos = torch.randperm(N, generator=g), 0
            idx, pos = perm[pos : pos + B], pos + B
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X[idx]), Y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, _flat(model)


@pytest.mark.parametrize("sampler", ["fresh", "epoch"])
def test_minibatch_matches_manual_loop_and_is_reproducible(sampler):
    X, Y = _data()
    runs = []
    for seed in (3, 3, 4):
        model = _mlp()
        prob = gs.Problem(model, "mse", (X, Y))
        res = fit(
            prob,
            torch.optim.SGD(model.parameters(), lr=0.1),
            17,
            batch_size=6,
            sampler=sampler,
            seed=seed,
        )
        runs.append((res, _flat(model)))
    (r1, p1), (r2, p2), (r3, _) = runs
    assert r1.losses == r2.losses and torch.equal(p1, p2)
    assert r1.losses != r3.losses
    assert (r1.batch_size, r1.sampler, r1.seed, r1.steps) == (6, sampler, 3, 17)
    losses, params = _manual_minibatch(sampler, 3, 6, 17, 0.1)
    assert r1.losses == pytest.approx(losses, rel=1e-12)
    torch.testing.assert_close(p1, params, atol=1e-12, rtol=0)


def test_minibatch_tracker_gets_the_batch():
    X, Y = _data()
    model = _mlp()
    prob = gs.Problem(model, "mse", (X, Y))
    tracker = RecordingTracker(model)
    fit(prob, GD(model.parameters(), lr=0.1), 3, tracker, batch_size=5, seed=1)
    g = torch.Generator().manual_seed(1)
    first = torch.randperm(N, generator=g)[:5]
    assert torch.equal(tracker.calls[0]["targets"], Y[first])
    assert tracker.calls[0]["outputs"].shape == (5, 3)
    assert tracker.configs[0]["batch_size"] == 5 and tracker.configs[0]["sampler"] == "fresh"


# ---------------------------------------------------------------------- divergence
def _diverging(scale: float = 1.0):
    X, Y = _data()
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(DT)
    return model, gs.Problem(model, "mse", (X, scale * Y))


def _first_nonfinite_loss(model: nn.Module, X, Y, lr: float) -> int:
    model = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for t in range(10_000):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(X), Y)
        if not math.isfinite(loss.item()):
            return t
        loss.backward()
        opt.step()
    raise AssertionError("did not diverge")


def test_nonfinite_loss_raises_and_closes_tracker():
    model, prob = _diverging()
    lr = 50.0
    X, Y = prob.full_batch
    t_bad = _first_nonfinite_loss(model, X, Y, lr)
    assert t_bad > 3
    tracker = RecordingTracker(model)
    with pytest.raises(NonFiniteError, match=rf"step {t_bad}: the training loss is (inf|nan)"):
        fit(prob, GD(model.parameters(), lr=lr), t_bad + 10, tracker)
    assert tracker.closed == ["diverged"]
    assert [c["t"] for c in tracker.calls] == list(range(t_bad))


def test_nonfinite_loss_stop_returns_partial_result():
    model, prob = _diverging()
    lr = 50.0
    X, Y = prob.full_batch
    t_bad = _first_nonfinite_loss(model, X, Y, lr)
    tracker = RecordingTracker(model)
    res = fit(prob, GD(model.parameters(), lr=lr), t_bad + 10, tracker, on_nonfinite="stop")
    assert res.diverged and res.diverged_at == t_bad and res.steps == t_bad
    assert len(res.losses) == t_bad + 1 and not math.isfinite(res.losses[-1])
    assert all(math.isfinite(v) for v in res.losses[:-1])
    assert tracker.closed == ["diverged"]


def test_nonfinite_parameters_after_the_step():
    model, prob = _diverging(scale=1e3)  # |∇L| ≫ 1: one step of η = 1e308 overflows
    tracker = RecordingTracker(model)
    with pytest.raises(NonFiniteError, match=r"step 0: parameter '(weight|bias)' is not finite"):
        fit(prob, GD(model.parameters(), lr=1e308), 5, tracker)
    assert tracker.closed == ["diverged"] and tracker.calls == []
    model, prob = _diverging(scale=1e3)  # |∇L| ≫ 1: one step of η = 1e308 overflows
    res = fit(prob, GD(model.parameters(), lr=1e308), 5, on_nonfinite="stop")
    assert (res.diverged, res.diverged_at, res.steps) == (True, 0, 1)
    assert len(res.losses) == 1 and math.isfinite(res.losses[0])


def test_nonfinite_from_the_tracker_is_a_divergence():
    X, Y = _data()
    model = _mlp()
    prob = gs.Problem(model, "mse", (X, Y))
    tracker = RecordingTracker(model, raise_at=2)
    res = fit(prob, GD(model.parameters(), lr=0.1), 6, tracker, on_nonfinite="stop")
    assert (res.diverged, res.diverged_at, res.steps) == (True, 2, 3)
    assert tracker.closed == ["diverged"]
    tracker = RecordingTracker(model, raise_at=1)
    with pytest.raises(NonFiniteError, match="probe 'fake'"):
        fit(prob, GD(model.parameters(), lr=0.1), 6, tracker)
    assert tracker.closed == ["diverged"]


# ---------------------------------------------------------------------- arguments, extras
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"steps": -1}, "steps=-1"),
        ({"steps": 2.5}, "steps=2.5"),
        ({"steps": True}, "steps=True"),
        ({"sampler": "bogus", "batch_size": 4}, "sampler='bogus'"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite='ignore'"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": N + 1}, f"batch_size={N + 1}"),
        ({"batch_size": 4.0}, "batch_size=4.0"),
        ({"seed": "a"}, "seed='a'"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    X, Y = _data()
    model = _mlp()
    prob = gs.Problem(model, "mse", (X, Y))
    kwargs = {"steps": 3, **kwargs}
    steps = kwargs.pop("steps")
    with pytest.raises(InvalidArgumentError, match=match):
        fit(prob, GD(model.parameters(), lr=0.1), steps, **kwargs)


def test_bad_objects_raise():
    X, Y = _data()
    model = _mlp()
    prob = gs.Problem(model, "mse", (X, Y))
    with pytest.raises(InvalidArgumentError, match=r"torch\.optim\.Optimizer"):
        fit(prob, "sgd", 3)
    with pytest.raises(InvalidArgumentError, match=r"gdscope\.Problem"):
        fit(model, GD(model.parameters(), lr=0.1), 3)
    loader = DataLoader(TensorDataset(X, Y), batch_size=5)
    prob_loader = gs.Problem(model, "mse", loader)
    with pytest.raises(InvalidArgumentError, match=r"DataLoader.*own batches"):
        fit(prob_loader, GD(model.parameters(), lr=0.1), 3, batch_size=5)
    converted = gs.Problem(model, "mse", (X, Y), dtype=torch.float32)
    with pytest.raises(InvalidArgumentError, match="move it first"):
        fit(converted, GD(model.parameters(), lr=0.1), 3)


def test_zero_steps_and_progress_bar():
    X, Y = _data()
    model = _mlp()
    prob = gs.Problem(model, "mse", (X, Y))
    before = _flat(model)
    tracker = RecordingTracker(model)
    res = fit(prob, GD(model.parameters(), lr=0.1), 0, tracker)
    assert (res.losses, res.steps, res.diverged) == ([], 0, False)
    assert torch.equal(before, _flat(model)) and len(tracker.configs) == 1
    res = fit(prob, GD(model.parameters(), lr=0.1), 4, progress=True, description="bar")
    assert res.steps == 4 and len(res.losses) == 4


def test_fit_trains_under_no_grad_context():
    X, Y = _data()
    model = _mlp()
    prob = gs.Problem(model, "mse", (X, Y))
    with torch.no_grad():
        res = fit(prob, GD(model.parameters(), lr=0.3), 5)
    assert res.losses[-1] < res.losses[0]
