"""Adversarial inputs to the training API, the tracker, the probes' schedules and the theory.

Each bad input must raise an exception from :mod:`gdscope.errors` whose message names the
argument; the end-to-end tests pin the fixed behaviours (the README's order of calls, fit ending
the tracked run, optimizers over another model, predict's size check, stability's SGD parts).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gdscope as gs
from gdscope.errors import GdscopeError, InvalidArgumentError, NonFiniteError
from gdscope.probes import At, Every, LogSpaced, LossProbe
from gdscope.store import Store
from gdscope.theory import fit_rates, predict
from gdscope.theory import ode as ode_mod
from gdscope.theory.gd_map_stats import tail_exponent

DT = torch.float64


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).to(DT)


def _data(n: int = 8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randn(n, 2, generator=g, dtype=DT)


def _prob(seed: int = 0) -> gs.Problem:
    return gs.Problem(_model(seed), "mse", _data())


def _params():
    return list(_model().parameters())


# ---------------------------------------------------------------------- optimizers
OPT_CLASSES = {
    "GD": lambda p, **kw: gs.GD(p, **{"lr": 0.1, **kw}),
    "HeavyBall": lambda p, **kw: gs.HeavyBall(p, **{"lr": 0.1, "beta": 0.5, **kw}),
    "Nesterov": lambda p, **kw: gs.Nesterov(p, **{"lr": 0.1, "beta": 0.5, **kw}),
}

BAD_PARAMS = {
    "empty-list": lambda: [],
    "empty-iterator": lambda: iter([]),
    "empty-group": lambda: [{"params": []}],
    "module": lambda: _model(),
    "single-tensor": lambda: torch.zeros(2, requires_grad=True),
    "int": lambda: 3,
    "str": lambda: "abc",
    "none": lambda: None,
    "list-of-int": lambda: [3],
    "group-without-params": lambda: [{"lr": 0.1}],
    "group-of-str": lambda: [{"params": ["x"]}],
}


@pytest.mark.parametrize("cls", list(OPT_CLASSES))
@pytest.mark.parametrize("bad", list(BAD_PARAMS))
def test_optimizer_refuses_bad_params(cls, bad):
    with pytest.raises(InvalidArgumentError, match=r"\bparams\b"):
        OPT_CLASSES[cls](BAD_PARAMS[bad]())


BAD_HYPER = [
    ("GD", "lr", 0),
    ("GD", "lr", -1.0),
    ("GD", "lr", math.nan),
    ("GD", "lr", math.inf),
    ("GD", "lr", "0.1"),
    ("GD", "lr", None),
    ("GD", "lr", True),
    ("GD", "lr", [0.1]),
    ("HeavyBall", "lr", 0.0),
    ("HeavyBall", "lr", "a"),
    ("Nesterov", "lr", math.nan),
    ("Nesterov", "lr", -0.5),
    ("HeavyBall", "beta", 1.0),
    ("HeavyBall", "beta", -0.1),
    ("HeavyBall", "beta", math.nan),
    ("HeavyBall", "beta", math.inf),
    ("HeavyBall", "beta", "0.9"),
    ("HeavyBall", "beta", None),
    ("HeavyBall", "beta", True),
    ("HeavyBall", "beta", "scheduled"),
    ("Nesterov", "beta", 1.5),
    ("Nesterov", "beta", "constant"),
    ("Nesterov", "beta", None),
    ("Nesterov", "beta", math.nan),
    ("Nesterov", "r", 0),
    ("Nesterov", "r", -1.0),
    ("Nesterov", "r", "3"),
    ("Nesterov", "r", math.nan),
]


@pytest.mark.parametrize(("cls", "name", "value"), BAD_HYPER)
def test_optimizer_refuses_bad_hyperparameters(cls, name, value):
    with pytest.raises(InvalidArgumentError, match=rf"\b{name}\b"):
        OPT_CLASSES[cls](_params(), **{name: value})


def test_optimizer_accepts_numpy_scalars():
    opt = gs.HeavyBall(_params(), lr=np.float32(0.1), beta=np.float64(0.5))
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


# ---------------------------------------------------------------------- fit_rates
GOOD = list(3.0 * 0.9 ** np.arange(12))

BAD_CURVES = {
    "str": "abc",
    "bytes": b"abc",
    "none": None,
    "scalar": 5.0,
    "dict": {"a": 1.0},
    "empty": [],
    "too-short": [1.0, 0.5, 0.25, 0.125],
    "2-d": [GOOD, GOOD],
    "strings": ["a"] * 6,
    "objects": [object()] * 6,
    "ragged": [[1.0], [1.0, 2.0]] * 3,
    "complex": [1 + 1j] * 6,
    "complex-tensor": torch.ones(6, dtype=torch.complex64),
    "nan": [*GOOD[:5], math.nan, *GOOD[6:]],
    "inf": [*GOOD[:5], math.inf, *GOOD[6:]],
    "zero": [*GOOD[:5], 0.0, *GOOD[6:]],
    "negative": [*GOOD[:5], -1.0, *GOOD[6:]],
}


@pytest.mark.parametrize("bad", list(BAD_CURVES))
def test_fit_rates_refuses_bad_losses(bad):
    with pytest.raises((InvalidArgumentError, NonFiniteError), match=r"\blosses\b"):
        fit_rates(BAD_CURVES[bad])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"steps": "abc"}, "steps"),
        ({"steps": [0] * 12}, "steps"),
        ({"steps": list(range(11))}, "steps"),
        ({"steps": [*range(11), math.nan]}, "steps"),
        ({"steps": [["a"]] * 12}, "steps"),
        ({"tail": 0}, "tail"),
        ({"tail": 1.5}, "tail"),
        ({"tail": -1}, "tail"),
        ({"tail": "half"}, "tail"),
        ({"tail": True}, "tail"),
        ({"tail": math.nan}, "tail"),
        ({"level": 0}, "level"),
        ({"level": 1}, "level"),
        ({"level": 1.5}, "level"),
        ({"level": "0.95"}, "level"),
        ({"level": True}, "level"),
        ({"level": math.nan}, "level"),
    ],
)
def test_fit_rates_refuses_bad_options(kwargs, name):
    with pytest.raises(InvalidArgumentError, match=rf"\b{name}\b"):
        fit_rates(GOOD, **kwargs)


def test_fit_rates_accepts_a_tensor():
    fit = fit_rates(torch.tensor(GOOD, requires_grad=True))
    assert fit.exponential_rate == pytest.approx(0.9, rel=1e-9)


# ---------------------------------------------------------------------- schedules and probes
@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: Every(0), "n"),
        (lambda: Every(-1), "n"),
        (lambda: Every(1.5), "n"),
        (lambda: Every("2"), "n"),
        (lambda: Every(True), "n"),
        (lambda: Every(1, start=-1), "start"),
        (lambda: Every(1, start=0.5), "start"),
        (lambda: Every(1, start="0"), "start"),
        (lambda: LogSpaced(0), "per_decade"),
        (lambda: LogSpaced("a"), "per_decade"),
        (lambda: LogSpaced(2.5), "per_decade"),
        (lambda: At("abc"), "steps"),
        (lambda: At(3), "steps"),
        (lambda: At([-1]), "steps"),
        (lambda: At([1.5]), "steps"),
        (lambda: At(["a"]), "steps"),
        (lambda: At([None]), "steps"),
        (lambda: LossProbe(schedule="every"), "schedule"),
        (lambda: LossProbe(schedule=2.5), "schedule"),
        (lambda: LossProbe(schedule=[1, 2]), "schedule"),
        (lambda: LossProbe(schedule=0), "n"),
        (lambda: LossProbe(schedule=-3), "n"),
    ],
)
def test_schedules_refuse_bad_arguments(make, name):
    with pytest.raises(InvalidArgumentError, match=rf"\b{name}\b"):
        make()


# ---------------------------------------------------------------------- Tracker construction
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"probes": [1]}, "probes"),
        ({"probes": ["loss"]}, "probes"),
        ({"probes": "loss"}, "probes"),
        ({"probes": LossProbe}, "probes"),
        ({"probes": [LossProbe]}, "probes"),
        ({"probes": LossProbe()}, "probes"),
        ({"probes": 5}, "probes"),
        ({"probes": [None]}, "probes"),
        ({"probes": {"loss": LossProbe()}}, "probes"),
        ({"probes": [LossProbe(), LossProbe()]}, "probes"),
        ({"store": 3}, "store"),
        ({"store": 3.5}, "store"),
        ({"store": ["runs.db"]}, "store"),
        ({"store": object()}, "store"),
        ({"run_name": 3}, "run_name"),
        ({"run_name": ""}, "run_name"),
        ({"run_name": "   "}, "run_name"),
        ({"run_name": b"x"}, "run_name"),
        ({"run_name": ["x"]}, "run_name"),
        ({"config": "abc"}, "config"),
        ({"config": [1, 2]}, "config"),
        ({"config": 3}, "config"),
        ({"seed": "a"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": None}, "seed"),
        ({"seed": True}, "seed"),
        ({"subset": True}, "subset"),
        ({"subset": 1.5}, "subset"),
        ({"subset": "abc"}, "subset"),
        ({"subset": []}, "subset"),
        ({"subset": [[0, 1]]}, "subset"),
        ({"subset": [0.5, 1.5]}, "subset"),
        ({"subset": [0, 0]}, "subset"),
        ({"subset": 0}, "subset"),
        ({"subset": 100}, "subset"),
        ({"subset": -1}, "subset"),
        ({"subset": [0, 99]}, "subset"),
        ({"commit_seconds": -1}, "commit_seconds"),
        ({"commit_seconds": math.nan}, "commit_seconds"),
        ({"commit_seconds": math.inf}, "commit_seconds"),
        ({"commit_seconds": "0.5"}, "commit_seconds"),
        ({"commit_seconds": True}, "commit_seconds"),
        ({"commit_seconds": None}, "commit_seconds"),
        ({"commit_steps": 0}, "commit_steps"),
        ({"commit_steps": -5}, "commit_steps"),
        ({"commit_steps": 1.5}, "commit_steps"),
        ({"commit_steps": True}, "commit_steps"),
        ({"commit_steps": "100"}, "commit_steps"),
        ({"background": "yes"}, "background"),
        ({"background": 1}, "background"),
        ({"background": None}, "background"),
        ({"guard": 5}, "guard"),
        ({"guard": "preserved"}, "guard"),
    ],
)
def test_tracker_refuses_bad_arguments(kwargs, name):
    with pytest.raises(InvalidArgumentError, match=rf"\b{name}\b"):
        gs.Tracker(_prob(), **kwargs)


# ---------------------------------------------------------------------- Tracker.step
@pytest.fixture
def tracker():
    return gs.Tracker(_prob(), [LossProbe()])


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"step": -1}, "step"),
        ({"step": -100}, "step"),
        ({"step": 1.5}, "step"),
        ({"step": 2.0}, "step"),
        ({"step": "0"}, "step"),
        ({"step": None}, "step"),
        ({"step": True}, "step"),
        ({"step": [0]}, "step"),
        ({"step": 0, "loss": "abc"}, "loss"),
        ({"step": 0, "loss": [1.0]}, "loss"),
        ({"step": 0, "loss": torch.ones(2)}, "loss"),
        ({"step": 0, "loss": object()}, "loss"),
        ({"step": 0, "loss": True}, "loss"),
        ({"step": 0, "loss": 1 + 2j}, "loss"),
        ({"step": 0, "loss": torch.tensor(True)}, "loss"),
        ({"step": 0, "outputs": "abc"}, "outputs"),
        ({"step": 0, "outputs": [1.0, 2.0]}, "outputs"),
        ({"step": 0, "targets": 5}, "targets"),
        ({"step": 0, "optimizer": "GD"}, "optimizer"),
        ({"step": 0, "optimizer": 3}, "optimizer"),
    ],
)
def test_tracker_step_refuses_bad_arguments(tracker, kwargs, name):
    with pytest.raises(InvalidArgumentError, match=rf"\b{name}\b"):
        tracker.step(**kwargs)
    assert tracker.history == {} and tracker.last_step is None  # nothing recorded


@pytest.mark.parametrize(("first", "then"), [(5, 3), (5, 5), (0, 0), (10, 9)])
def test_tracker_steps_must_increase(tracker, first, then):
    tracker.step(first, loss=1.0)
    with pytest.raises(InvalidArgumentError, match=r"\bstep\b"):
        tracker.step(then, loss=1.0)
    assert tracker.series("loss") == ([first], [1.0])
    tracker.step(first + 2, loss=0.5)  # gaps are fine
    assert tracker.series("loss") == ([first, first + 2], [1.0, 0.5])


def test_tracker_step_accepts_numbers_and_numpy_steps(tracker):
    assert tracker.step(np.int64(0), loss=2)["loss"] == 2.0
    assert tracker.step(1, loss=np.float32(0.5))["loss"] == 0.5
    assert tracker.step(2, loss=torch.tensor([0.25]))["loss"] == 0.25


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda t: t.close("done"), "status"),
        (lambda t: t.close(3), "status"),
        (lambda t: t.close("completed", summary="x"), "summary"),
        (lambda t: t.finish("ok"), "status"),
        (lambda t: t.record_config("abc"), "values"),
        (lambda t: t.record_config([("a", 1)]), "values"),
        (lambda t: t.record_prediction("pred"), "prediction"),
        (lambda t: t.record_prediction(None), "prediction"),
    ],
)
def test_tracker_lifecycle_refuses_bad_arguments(tracker, call, name):
    with pytest.raises(InvalidArgumentError, match=rf"\b{name}\b"):
        call(tracker)
    assert tracker.status is None


def _kernel_prediction(steps: int = 5):
    return predict(
        np.eye(2), {"class": "GD", "lr": 0.1}, steps, f0=[1.0, 1.0], y=[0.0, 0.0], loss="mse"
    )


def test_record_prediction_label_must_be_a_string(tmp_path):
    tr = gs.Tracker(_prob(), [LossProbe()], store=tmp_path / "r.db")
    with pytest.raises(InvalidArgumentError, match=r"\blabel\b"):
        tr.record_prediction(_kernel_prediction(), label=3)
    tr.close()


# ---------------------------------------------------------------------- fit and the tracker
def test_readme_order_prediction_then_fit_completes_the_run(tmp_path):
    """Tracker(...); tracker.record_prediction(pred); gs.fit(prob, opt, n, tracker)."""
    prob = _prob()
    path = tmp_path / "runs.db"
    tracker = gs.Tracker(prob, [LossProbe()], store=path, run_name="readme")
    opt = gs.GD(prob.model.parameters(), lr=0.1)
    pred = gs.predict(prob, opt, 6)
    tracker.record_prediction(pred)
    res = gs.fit(prob, opt, 6, tracker)
    assert res.steps == 6
    with Store(path) as s:
        run = s.run("readme")
        assert run.status == "completed" and run.complete  # complete when fit returns
        assert run.config["steps"] == 6 and run.config["optimizer"]["class"] == "GD"
        assert b"linearized model" in s.artifact(run.id, "prediction")
        assert list(s.series(run.id, "loss")[0]) == list(range(6))
    # the results can still be added, and a summary given at close
    tracker.close("completed", {"note": "done"})
    with Store(path) as s:
        assert s.run("readme").summary == {"note": "done"}


def test_prediction_after_fit_and_summary_still_work(tmp_path):
    prob = _prob()
    path = tmp_path / "runs.db"
    tracker = gs.Tracker(prob, [LossProbe()], store=path, run_name="after")
    gs.fit(prob, gs.GD(prob.model.parameters(), lr=0.1), 3, tracker)
    tracker.record_prediction(_kernel_prediction())
    tracker.close("completed", {"k": 1})
    with Store(path) as s:
        run = s.run("after")
        assert run.status == "completed" and run.summary == {"k": 1}
        assert s.artifact(run.id, "prediction")


def test_second_fit_on_the_same_tracker_is_refused_clearly():
    prob = _prob()
    tracker = gs.Tracker(prob, [LossProbe()])
    opt = gs.GD(prob.model.parameters(), lr=0.1)
    gs.fit(prob, opt, 3, tracker)
    assert tracker.finished == "completed"
    before = [p.detach().clone() for p in prob.model.parameters()]
    with pytest.raises(InvalidArgumentError, match=r"\btracker\b"):
        gs.fit(prob, opt, 3, tracker)
    assert all(torch.equal(a, b) for a, b in zip(before, prob.model.parameters(), strict=True))
    with pytest.raises(GdscopeError, match="finished"):
        tracker.step(10)


def test_fit_refuses_a_tracker_that_already_has_steps():
    prob = _prob()
    tracker = gs.Tracker(prob, [LossProbe()])
    tracker.step(0, loss=1.0)
    with pytest.raises(InvalidArgumentError, match=r"\btracker\b"):
        gs.fit(prob, gs.GD(prob.model.parameters(), lr=0.1), 3, tracker)


def test_fit_marks_the_run_failed_when_an_error_escapes(tmp_path):
    prob = _prob()
    path = tmp_path / "runs.db"

    class Boom(LossProbe):
        name = "boom"

        def compute(self, state):
            if state.step == 2:
                raise RuntimeError("probe failed")
            return {"boom": 1.0}

    tracker = gs.Tracker(prob, [Boom()], store=path, run_name="boom")
    with pytest.raises(RuntimeError, match="probe failed"):
        gs.fit(prob, gs.GD(prob.model.parameters(), lr=0.1), 5, tracker)
    with Store(path) as s:
        assert s.run("boom").status == "failed"


def _foreign_optimizer(prob):
    return gs.GD(_model(seed=5).parameters(), lr=0.1)


def _mixed_optimizer(prob):
    extra = nn.Parameter(torch.zeros(3, dtype=DT))
    return gs.GD([*prob.model.parameters(), extra], lr=0.1)


def _frozen_only_optimizer(prob):
    prob.model[0].weight.requires_grad_(False)
    return gs.GD([prob.model[0].weight], lr=0.1)


@pytest.mark.parametrize(
    "make", [_foreign_optimizer, _mixed_optimizer, _frozen_only_optimizer], ids=str
)
def test_fit_refuses_an_optimizer_over_other_parameters(make):
    prob = _prob()
    opt = make(prob)
    before = [p.detach().clone() for p in prob.model.parameters()]
    with pytest.raises(InvalidArgumentError, match=r"\boptimizer\b"):
        gs.fit(prob, opt, 3)
    assert all(torch.equal(a, b) for a, b in zip(before, prob.model.parameters(), strict=True))


def test_fit_accepts_an_optimizer_over_part_of_the_model():
    prob = _prob()
    first = prob.model[0].weight.detach().clone()
    res = gs.fit(prob, gs.GD(prob.model[2].parameters(), lr=0.1), 3)
    assert res.steps == 3 and torch.equal(first, prob.model[0].weight)


def _closed_tracker(prob):
    t = gs.Tracker(prob, [LossProbe()])
    t.close()
    return t


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"steps": "3"}, "steps"),
        ({"steps": None}, "steps"),
        ({"steps": True}, "steps"),
        ({"sampler": "x", "batch_size": 2}, "sampler"),
        ({"sampler": ["fresh"]}, "sampler"),
        ({"on_nonfinite": "ignore"}, "on_nonfinite"),
        ({"on_nonfinite": None}, "on_nonfinite"),
        ({"on_nonfinite": ["stop"]}, "on_nonfinite"),
        ({"seed": "a"}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"progress": "yes"}, "progress"),
        ({"description": 3}, "description"),
        ({"tracker": "abc"}, "tracker"),
        ({"tracker": object()}, "tracker"),
        ({"tracker": _closed_tracker}, "tracker"),
        ({"tracker": lambda p: gs.Tracker(_prob(seed=3), [LossProbe()])}, "tracker"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 100}, "batch_size"),
        ({"batch_size": 2.0}, "batch_size"),
    ],
)
def test_fit_refuses_bad_arguments(kwargs, name):
    prob = _prob()
    kw = {"steps": 3, **kwargs}
    if callable(kw.get("tracker")) and not hasattr(kw["tracker"], "step"):
        kw["tracker"] = kw["tracker"](prob)
    steps = kw.pop("steps")
    with pytest.raises(InvalidArgumentError, match=rf"\b{name}\b"):
        gs.fit(prob, gs.GD(prob.model.parameters(), lr=0.1), steps, **kw)


# ---------------------------------------------------------------------- predict
K2 = np.eye(2)
KW = {"f0": [1.0, 1.0], "y": [0.0, 0.0], "loss": "mse"}
GD_MAP = {"class": "GD", "lr": 0.1}


@pytest.mark.parametrize(
    ("args", "kwargs", "name"),
    [
        ((GD_MAP, 0), {}, "steps"),
        ((GD_MAP, -1), {}, "steps"),
        ((GD_MAP, 10.0), {}, "steps"),
        ((GD_MAP, "10"), {}, "steps"),
        ((GD_MAP, None), {}, "steps"),
        ((GD_MAP, True), {}, "steps"),
        ((GD_MAP, 10**12), {}, "steps"),
        ((GD_MAP, 10**10), {}, "steps"),
        ((GD_MAP, 1000), {"memory": 1000}, "steps"),
        ((GD_MAP, 10), {"memory": 0}, "memory"),
        ((GD_MAP, 10), {"memory": -5}, "memory"),
        ((GD_MAP, 10), {"memory": "big"}, "memory"),
        ((GD_MAP, 10), {"memory": True}, "memory"),
        ((GD_MAP, 10), {"memory": math.nan}, "memory"),
        ((GD_MAP, 10), {"record": 0}, "record"),
        ((GD_MAP, 10), {"record": True}, "record"),
        ((GD_MAP, 10), {"record": "abc"}, "record"),
        ((GD_MAP, 10), {"record": [1.5]}, "record"),
        ((GD_MAP, 10), {"record": [-1]}, "record"),
        ((GD_MAP, 10), {"record": []}, "record"),
        ((GD_MAP, 10), {"record": [11]}, "record"),
        ((GD_MAP, 10), {"kernel_rtol": "a"}, "kernel_rtol"),
        ((GD_MAP, 10), {"kernel_rtol": -1.0}, "kernel_rtol"),
        ((GD_MAP, 10), {"kernel_rtol": 0}, "kernel_rtol"),
        ((GD_MAP, 10), {"kernel_rtol": math.nan}, "kernel_rtol"),
        (("GD", 10), {}, "optimizer"),
        ((3, 10), {}, "optimizer"),
        ((None, 10), {}, "optimizer"),
        (({"class": "Adam", "lr": 0.1}, 10), {}, "class"),
        (({"class": "Nesterov", "lr": 0.1, "momentum": 0.9}, 10), {}, "momentum"),
        (({"class": "HeavyBall", "lr": 0.1}, 10), {}, "beta"),
        (({"class": "HeavyBall", "lr": 0.1, "beta": 1.0}, 10), {}, "beta"),
        (({"class": "Nesterov", "lr": 0.1, "beta": "sched"}, 10), {}, "beta"),
        (({"class": "Nesterov", "lr": 0.1, "beta": "scheduled", "r": 0}, 10), {}, r"r"),
        (({"class": "SGD", "lr": 0.1, "momentum": 0.9, "nesterov": "yes"}, 10), {}, "nesterov"),
        (({"class": "SGD", "lr": 0.1, "momentum": 0.0, "nesterov": True}, 10), {}, "nesterov"),
        (({"class": "SGD", "lr": 0.1, "momentum": 0.9, "dampening": 2}, 10), {}, "dampening"),
        (({"class": "SGD", "lr": 0.1, "maximize": "no"}, 10), {}, "maximize"),
        (({"class": "SGD", "lr": 0.1, "weight_decay": -1}, 10), {}, "weight_decay"),
        (({"class": "GD", "param_groups": 3}, 10), {}, "param_groups"),
        (({"class": "GD", "param_groups": ["x"]}, 10), {}, "param_groups"),
        (({"class": "GD", "param_groups": []}, 10), {}, "param groups"),
        (({"class": "GD", "lr": "a"}, 10), {}, "lr"),
        (({"class": "GD", "lr": 0}, 10), {}, "lr"),
        (({"class": "GD"}, 10), {}, "lr"),
    ],
)
def test_predict_refuses_bad_arguments(args, kwargs, name):
    with pytest.raises(InvalidArgumentError, match=rf"\b{name}\b"):
        predict(K2, *args, **KW, **kwargs)


def test_predict_refuses_adam_and_names_the_optimizer():
    opt = torch.optim.Adam(_params(), lr=0.1)
    with pytest.raises(InvalidArgumentError, match="Adam"):
        predict(K2, opt, 10, **KW)


def test_predict_size_check_comes_before_the_kernel():
    """With a Problem, a prediction too large is refused before the NTK is computed."""
    prob = _prob()
    calls = []
    import gdscope.theory.dynamics as dyn

    real = dyn.ntk
    try:
        dyn.ntk = lambda *a, **k: calls.append(1) or real(*a, **k)
        with pytest.raises(InvalidArgumentError, match=r"\bsteps\b.*GB"):
            predict(prob, gs.GD(prob.model.parameters(), lr=0.1), 10**13)
    finally:
        dyn.ntk = real
    assert calls == []


def test_predict_within_budget_still_works():
    pred = predict(K2, GD_MAP, 20, **KW, memory=10**6)
    assert pred.loss.shape == (21,)


# ---------------------------------------------------------------------- other theory helpers
@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: ode_mod.momentum_time([1, 2], "a"), "lr"),
        (lambda: ode_mod.momentum_time([1, 2], 0), "lr"),
        (lambda: ode_mod.momentum_time("abc", 0.1), "t"),
        (lambda: ode_mod.heavy_ball_gamma(1.0, 0.1), "beta"),
        (lambda: ode_mod.heavy_ball_gamma("0.5", 0.1), "beta"),
        (lambda: ode_mod.heavy_ball_gamma(0.5, 0), "lr"),
        (lambda: ode_mod.heavy_ball_gamma(0.5, math.nan), "lr"),
        (lambda: ode_mod.gradient_flow("abc", [1.0]), "lam_prime"),
        (lambda: ode_mod.gradient_flow([1.0], [["a"]]), "s"),
        (lambda: ode_mod.gradient_flow([1.0], [1.0], e0=None), "e0"),
        (lambda: tail_exponent("abc"), "samples"),
        (lambda: tail_exponent([object()] * 10), "samples"),
        (lambda: tail_exponent(np.ones(100), tail=2), "tail"),
        (lambda: tail_exponent(np.ones(100), level="x"), "level"),
        (lambda: gs.theory.detect_orbit(["a", "b", "c"]), "history"),
    ],
)
def test_theory_helpers_refuse_non_numeric_input(call, name):
    with pytest.raises(InvalidArgumentError, match=rf"\b{name}\b"):
        call()


# ---------------------------------------------------------------------- stability
def test_stability_with_train_mode_batchnorm_leaves_sgd_parts_undetermined():
    X, Y = _data(12)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    prob = gs.Problem(model, "mse", (X, Y), allow_stateful=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = gs.stability(prob, 0.1, batch_size=4, chains=2, lyapunov_steps=10)
    msgs = [str(w.message) for w in caught]
    assert any("batch_size=4" in m and "BatchNorm" in m and "model.eval()" in m for m in msgs)
    assert rep.sharpness > 0 and rep.threshold == pytest.approx(20)  # the GD part is measured
    assert rep.sgd_mean_square_stable is None and rep.noise_factor is None
    assert rep.sgd_lyapunov is None
    assert any("SGD parts undetermined" in n and "BatchNorm" in n for n in rep.notes)


def test_stability_with_a_dataloader_computes_the_sgd_parts():
    X, Y = _data(10)
    model = nn.Linear(3, 2).to(DT)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=3)
    kw = {"batch_size": 2, "chains": 2, "lyapunov_steps": 20}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # not at a minimum: fine here
        rep = gs.stability(gs.Problem(model, "mse", loader), 0.1, **kw)
        ref = gs.stability(gs.Problem(model, "mse", (X, Y)), 0.1, **kw)
    assert rep.noise_factor == ref.noise_factor and rep.noise_factor is not None
    assert rep.sgd_mean_square_stable == ref.sgd_mean_square_stable
    assert rep.mean_square_rho == pytest.approx(ref.mean_square_rho, rel=1e-10)
    assert any("DataLoader" in n for n in rep.notes)


@pytest.mark.parametrize("name", ["a\x1b[2Jb", "run\r", "x\udc80", "42", "  "])
def test_tracker_refuses_an_unprintable_run_name_at_construction(name):
    X, Y = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 1, dtype=torch.float64)
    prob = gs.Problem(torch.nn.Linear(2, 1).double(), "mse", (X, Y))
    with pytest.raises(InvalidArgumentError, match="run_name"):
        gs.Tracker(prob, store=None, run_name=name)


# ---------------------------------------------------------------------- trainer callbacks
CALLBACK_BAD = [
    ({"store": 3}, "store"),
    ({"store": ["runs.db"]}, "store"),
    ({"probes": 3}, "probes"),
    ({"probes": [3]}, "probes"),
    ({"probes": LossProbe()}, "probes"),
    ({"run_name": 5}, "run_name"),
    ({"run_name": ""}, "run_name"),
    ({"run_name": "123"}, "run_name"),
    ({"loss": 5}, "loss"),
    ({"loss": "msee"}, "loss"),
    ({"log_to_trainer": "no"}, "log_to_trainer"),
    ({"eval_samples": 0}, "eval_samples"),
    ({"eval_samples": 1.5}, "eval_samples"),
    ({"eval_batch_size": 0}, "eval_batch_size"),
    ({"seed": "a"}, "seed"),
    ({"curvature_every": 0}, "curvature_every"),
    ({"curvature_every": "10"}, "curvature_every"),
    ({"config": "abc"}, "config"),
    ({"sinks": [3]}, "sinks"),
    ({"on_error": "ignore"}, "on_error"),
]


@pytest.mark.parametrize("kind", ["lightning", "hf"])
@pytest.mark.parametrize(("kwargs", "name"), CALLBACK_BAD)
def test_trainer_callbacks_refuse_bad_arguments_when_made(kind, kwargs, name, tmp_path):
    """A bad argument to either callback fails on the line that adds it, naming the argument,
    not steps into training (where on_error='warn' would only turn tracking off)."""
    pytest.importorskip("lightning" if kind == "lightning" else "transformers")
    if kind == "lightning":
        from gdscope.integrations.lightning import GdscopeCallback
    else:
        from gdscope.integrations.hf import GdscopeCallback
    with pytest.raises(InvalidArgumentError, match=rf"\b{name}\b"):
        GdscopeCallback(**{"store": tmp_path / "runs.db", **kwargs})
    assert not (tmp_path / "runs.db").exists()  # nothing written
