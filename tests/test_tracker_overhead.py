"""The tracker's fast path against recomputation, and the stored central flow prediction."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import gdscope as gs
from gdscope.probes import (
    AccuracyProbe,
    DistanceProbe,
    GradNormProbe,
    LossProbe,
    ProbeState,
    ThresholdProbe,
)
from gdscope.report.summary import stored_prediction
from gdscope.store import Store
from gdscope.theory import predict
from gdscope.theory.central_flow import central_flow
from gdscope.tracker import _floats

D = torch.float64


class _Edge(nn.Module):
    """``L(x, y) = ½(1 + y)x² + (κ/4)x⁴ − c·y``: the sharpness ``1 + y`` rises to ``2/η``
    (as in tests/test_central_flow.py)."""

    def __init__(self, x0: float, y0: float, c: float, kappa: float) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor(x0, dtype=D))
        self.y = nn.Parameter(torch.tensor(y0, dtype=D))
        self.c, self.kappa = c, kappa

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        x, y = self.x, self.y
        val = 0.5 * (1 + y) * x**2 + self.kappa / 4 * x**4 - self.c * y
        return val.expand(inp.shape[0], 1)


def _mean_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return out.mean()


def test_central_flow_prediction_stores_sharpness_oscillation_threshold_onset(tmp_path):
    eta = 0.1
    zero = torch.zeros(2, 1, dtype=D)
    prob = gs.Problem(_Edge(0.05, 18.95, 0.02, -1.0), _mean_loss, (zero, zero))
    pred = central_flow(prob, {"class": "GD", "lr": eta}, 60, substeps=2)
    assert pred.onset_step is not None
    tracker = gs.Tracker(prob, [LossProbe()], store=tmp_path / "cf.db", run_name="cf")
    tracker.record_prediction(pred, label="my flow")
    tracker.step(0, loss=1.0)
    tracker.close()
    with Store(tmp_path / "cf.db") as s:
        rec = stored_prediction(s, s.run("cf").id)
    assert rec is not None
    assert rec["label"] == "my flow" and rec["kind"] == "central flow"
    steps = rec["steps"]
    assert steps[0] == 0 and steps[-1] == 60 and steps == sorted(set(steps))
    assert len(rec["sharpness"]) == len(rec["oscillation"]) == len(rec["loss"]) == len(steps)
    np.testing.assert_array_equal(rec["sharpness"], pred.sharpness[steps])
    np.testing.assert_array_equal(rec["oscillation"], pred.oscillation[steps])
    np.testing.assert_array_equal(rec["loss"], pred.loss[steps])
    assert rec["threshold"] == pytest.approx(2 / eta) and rec["onset_step"] == pred.onset_step

    # below the edge: onset_step is None -> null
    prob2 = gs.Problem(_Edge(0.05, 5.0, 0.0, -1.0), _mean_loss, (zero, zero))
    pred2 = central_flow(prob2, {"class": "GD", "lr": eta}, 20, substeps=2)
    assert pred2.onset_step is None
    tr2 = gs.Tracker(prob2, [LossProbe()], store=tmp_path / "cf.db", run_name="below")
    tr2.record_prediction(pred2)
    tr2.step(0, loss=1.0)
    tr2.close()
    with Store(tmp_path / "cf.db") as s:
        raw = s.artifact(s.run("below").id, "prediction")
    assert json.loads(raw)["onset_step"] is None and b'"onset_step": null' in raw


def test_linearized_prediction_has_kind_and_no_flow_curves(tmp_path):
    K = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=D)
    pred = predict(
        K, {"class": "GD", "lr": 0.1}, 50, f0=torch.zeros(2), y=torch.ones(2), loss="mse"
    )
    zero = torch.zeros(2, 1, dtype=D)
    prob = gs.Problem(_Edge(0.05, 1.0, 0.0, 0.0), _mean_loss, (zero, zero))
    tracker = gs.Tracker(prob, [LossProbe()], store=tmp_path / "lin.db", run_name="lin")
    tracker.record_prediction(pred)
    tracker.step(0, loss=1.0)
    tracker.close()
    with Store(tmp_path / "lin.db") as s:
        rec = stored_prediction(s, s.run("lin").id)
    assert rec is not None and rec["kind"] == "linearized" and rec["label"] == "linearized model"
    assert not {"sharpness", "oscillation", "threshold", "onset_step"} & set(rec)


# ------------------------------------------------------------------ the fast path's values
def _mlp32(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(40, 5, generator=g)
    Y = torch.nn.functional.one_hot(torch.arange(40) % 4, 4).float()
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    )
    return model, X, Y


def _dense_layers(model: nn.Module, ref: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per-module (‖θ − θ₀‖², ‖θ₀‖²) in float64 over flattened entries (the old computation)."""
    out: dict[str, list[float]] = {}
    for n, p in model.named_parameters():
        layer = n.rsplit(".", 1)[0]
        d = (p.detach().double() - ref[n].double()).reshape(-1)
        acc = out.setdefault(layer, [0.0, 0.0])
        acc[0] += float(d @ d)
        acc[1] += float(ref[n].double().reshape(-1) @ ref[n].double().reshape(-1))
    return {k: (v[0], v[1]) for k, v in out.items()}


def test_float32_fast_path_equals_float64_recomputation():
    model, X, Y = _mlp32()
    prob = gs.Problem(model, "mse", (X, Y))
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = gs.GD(model.parameters(), lr=0.5)
    probes = [LossProbe(), AccuracyProbe(), GradNormProbe(), DistanceProbe(), ThresholdProbe()]
    tracker = gs.Tracker(prob, probes, store=":memory:")
    for t in range(6):
        opt.zero_grad()
        out = model(X)
        loss = torch.nn.functional.mse_loss(out, Y)
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])
        acc = float((out.argmax(1) == Y.argmax(1)).double().mean())
        loss_value = loss.item()
        opt.step()
        vals = tracker.step(t, opt, loss=loss, outputs=out, targets=Y)
        assert all(type(v) is float for v in vals.values())
        assert vals["loss"] == loss_value  # exactly the float32 loss
        assert vals["accuracy"] == acc
        assert vals["grad_norm"] == pytest.approx(float(grads.norm()), rel=1e-6)
        assert vals["lr"] == 0.5 and vals["threshold"] == pytest.approx(4.0)
        layers = _dense_layers(model, theta0)
        tot = sum(d for d, _ in layers.values())
        tot0 = sum(b for _, b in layers.values())
        assert vals["dist_init"] == pytest.approx(math.sqrt(tot), rel=1e-12)
        assert vals["dist_init_rel"] == pytest.approx(math.sqrt(tot / tot0), rel=1e-12)
        for layer, (d, b) in layers.items():
            assert vals[f"dist_init/{layer}"] == pytest.approx(math.sqrt(d), rel=1e-12)
            assert vals[f"dist_init_rel/{layer}"] == pytest.approx(math.sqrt(d / b), rel=1e-12)
    # the stored values are the returned ones
    stored = {(s, n): v for s, n, v, _, _ in tracker.store.metrics(tracker.run_id)}
    assert stored[(5, "dist_init/2")] == vals["dist_init/2"]
    assert stored[(5, "grad_norm")] == vals["grad_norm"]
    tracker.close()


def test_replaced_parameter_and_changed_targets_are_seen():
    model, X, Y = _mlp32(1)
    prob = gs.Problem(model, "mse", (X, Y))
    opt = gs.GD(model.parameters(), lr=0.1)
    tracker = gs.Tracker(prob, [AccuracyProbe(), GradNormProbe(), DistanceProbe()])

    def step(t: int, targets: torch.Tensor) -> dict[str, float]:
        opt.zero_grad()
        out = model(X)
        loss = torch.nn.functional.mse_loss(out, targets)
        loss.backward()
        opt.step()
        return tracker.step(t, opt, loss=loss, outputs=out, targets=targets)

    step(0, Y)
    # a parameter replaced by a new tensor (same name): distances and gradients follow it
    new = nn.Parameter(model[4].weight.detach() + 1.0)
    model[4].weight = new
    opt.param_groups[0]["params"][4] = new
    vals = step(1, Y)
    w0 = tracker.initial_params["4.weight"].double()
    d_expected = float((new.detach().double() - w0).pow(2).sum())
    b_expected = float(
        model[4].bias.detach().double().sub(tracker.initial_params["4.bias"].double()).pow(2).sum()
    )
    assert vals["dist_init/4"] == pytest.approx(math.sqrt(d_expected + b_expected), rel=1e-12)
    grads = torch.cat([p.grad.reshape(-1).double() for p in model.parameters()])
    assert vals["grad_norm"] == pytest.approx(float(grads.norm()), rel=1e-6)
    # targets changed in place: the cached labels are not reused
    with torch.no_grad():
        Y.copy_(Y.roll(1, dims=1))
    out = model(X).detach()
    vals = step(2, Y)
    stale = float((out.argmax(1) == Y.roll(-1, dims=1).argmax(1)).double().mean())
    fresh = float((out.argmax(1) == Y.argmax(1)).double().mean())
    assert vals["accuracy"] == fresh != stale
    acc_direct = AccuracyProbe()
    state_out = model(X).detach()
    st = ProbeState(3, prob, prob, None, tracker.initial_params, None, state_out, Y)
    assert float(acc_direct.compute(st)["accuracy"]) == float(
        (state_out.argmax(1) == Y.argmax(1)).double().mean()
    )
    Y2 = torch.arange(40) % 4  # class indices, a new tensor
    st2 = ProbeState(3, prob, prob, None, tracker.initial_params, None, state_out, Y2)
    assert float(acc_direct.compute(st2)["accuracy"]) == float(
        (state_out.argmax(1) == Y2).double().mean()
    )


def test_floats_reads_tensors_and_numbers_and_refuses_non_numbers():
    vals = _floats([1, torch.tensor(0.25), torch.tensor(2.5, dtype=torch.float64), 3.0])
    assert vals == [1.0, 0.25, 2.5, 3.0] and all(type(v) is float for v in vals)
    with pytest.raises(TypeError):
        _floats([None])
    with pytest.raises((RuntimeError, ValueError)):
        _floats([torch.ones(2)])


def test_threshold_cache_follows_settings_and_stateful_optimizers():
    from gdscope.theory.optim import read_optimizer

    model, X, Y = _mlp32(2)
    prob = gs.Problem(model, "mse", (X, Y))
    probe = ThresholdProbe()

    def check(opt: torch.optim.Optimizer) -> dict[str, float]:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), Y).backward()
        opt.step()
        st = ProbeState(0, prob, prob, opt, {})
        out = probe.compute(st)
        fresh = read_optimizer(opt)
        key = "preconditioned_threshold" if fresh.preconditioned else "threshold"
        assert out[key] == pytest.approx(fresh.threshold, rel=1e-15)
        assert out["lr"] == opt.param_groups[0]["lr"]
        return out

    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    assert check(sgd)["threshold"] == pytest.approx(20.0)
    assert check(sgd)["threshold"] == pytest.approx(20.0)  # cached, same settings
    sgd.param_groups[0]["momentum"] = 0.9  # changed in place: a new key
    assert check(sgd)["threshold"] == pytest.approx(2 * 1.9 / 0.1)
    sgd.param_groups[0]["lr"] = 0.05
    assert check(sgd)["threshold"] == pytest.approx(2 * 1.9 / 0.05)
    # Adagrad's threshold moves with its state (η_t) at fixed settings: never cached
    ada = torch.optim.Adagrad(model.parameters(), lr=0.1, lr_decay=0.5)
    values = [check(ada)["preconditioned_threshold"] for _ in range(3)]
    assert len(set(values)) == 3


def test_distance_with_a_converting_problem_equals_recomputation():
    # the problem evaluates a float32 model in float64: parameters are converted, not live
    model, X, Y = _mlp32(3)
    prob = gs.Problem(model, "mse", (X.double(), Y.double()), dtype=torch.float64)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    tracker = gs.Tracker(prob, [DistanceProbe()])
    opt = gs.GD(model.parameters(), lr=0.5)
    for t in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(X), Y).backward()
        opt.step()
        vals = tracker.step(t)
        layers = _dense_layers(model, theta0)
        tot = sum(d for d, _ in layers.values())
        assert vals["dist_init"] == pytest.approx(math.sqrt(tot), rel=1e-12)
        for layer, (d, b) in layers.items():
            assert vals[f"dist_init_rel/{layer}"] == pytest.approx(math.sqrt(d / b), rel=1e-12)
