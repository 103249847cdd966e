"""A run that fails stores why: status and ``summary["error"]``, shown by the report's stop reason.

Covers :func:`gdscope.fit` (an error inside the loop: a probe, the model's forward) and
:class:`gdscope.Tracker` used as a context manager (an error in the user's own loop).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gdscope as gs
from gdscope.errors import NonFiniteError
from gdscope.probes.base import Probe, ProbeState
from gdscope.probes.builtin import LossProbe
from gdscope.report.summary import stop_reason
from gdscope.store import Store

D = torch.float64


class _Boom(Probe):
    """Raises at step ``at`` (an error inside the tracked loop)."""

    name = "boom"
    iterate = "after"

    def __init__(self, at: int, exc: BaseException) -> None:
        super().__init__()
        self.at, self.exc = at, exc

    def compute(self, state: ProbeState) -> dict[str, float]:
        if state.step == self.at:
            raise self.exc
        return {"boom": 0.0}


def _problem(seed: int = 0) -> gs.Problem:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(D)
    X, Y = torch.randn(10, 3, dtype=D), torch.randn(10, 1, dtype=D)
    return gs.Problem(model, "mse", (X, Y))


def _only_run(store: Store):
    (info,) = store.runs()
    return info


def test_fit_probe_error_is_stored_and_shown():
    prob = _problem()
    store = Store(":memory:")
    tracker = gs.Tracker(prob, [LossProbe(), _Boom(2, RuntimeError("probe exploded"))], store)
    with pytest.raises(RuntimeError, match="probe exploded"):
        gs.fit(prob, gs.GD(prob.model.parameters(), lr=0.1), steps=5, tracker=tracker)
    info = _only_run(store)
    assert info.status == "failed" and info.complete
    assert info.summary == {"error": "RuntimeError: probe exploded"}
    assert info.last_step == 1  # steps 0 and 1 were committed, step 2 failed
    reason = stop_reason(store, info)
    assert reason == "failed with an error after step 1: RuntimeError: probe exploded"


class _FailingForward(nn.Module):
    """A model whose forward raises on its ``at``-th call."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 1).to(D)
        self.calls, self.at = 0, at

    def forward(self, x):
        self.calls += 1
        if self.calls == self.at:
            raise ValueError("bad batch in forward")
        return self.lin(x)


def test_fit_model_error_is_stored():
    model = _FailingForward(at=10**9)
    X, Y = torch.randn(6, 3, dtype=D), torch.randn(6, 1, dtype=D)
    prob = gs.Problem(model, "mse", (X, Y))
    model.calls, model.at = 0, 4  # the 4th training forward (step 3) raises
    store = Store(":memory:")
    tracker = gs.Tracker(prob, [LossProbe()], store)
    with pytest.raises(ValueError, match="bad batch"):
        gs.fit(prob, gs.GD(model.parameters(), lr=0.1), steps=6, tracker=tracker)
    info = _only_run(store)
    assert info.status == "failed"
    assert info.summary["error"] == "ValueError: bad batch in forward"
    assert "ValueError: bad batch in forward" in stop_reason(store, info)
    assert info.last_step == 2


def test_tracker_context_manager_user_loop_error():
    prob = _problem(1)
    store = Store(":memory:")
    opt = torch.optim.SGD(prob.model.parameters(), lr=0.05)
    X, Y = prob.full_batch
    with pytest.raises(KeyError), gs.Tracker(prob, [LossProbe()], store) as tracker:
        for t in range(5):
            opt.zero_grad()
            loss = nn.functional.mse_loss(prob.model(X), Y)
            loss.backward()
            opt.step()
            tracker.step(t, opt, loss=loss)
            if t == 3:
                raise KeyError("missing column")
    info = _only_run(store)
    assert info.status == "failed" and info.last_step == 3
    assert info.summary == {"error": "KeyError: 'missing column'"}
    assert stop_reason(store, info).endswith("after step 3: KeyError: 'missing column'")


def test_tracker_context_manager_nonfinite_is_diverged_with_error():
    prob = _problem(2)
    store = Store(":memory:")
    with pytest.raises(NonFiniteError), gs.Tracker(prob, [LossProbe()], store) as tracker:
        tracker.step(0, loss=1.0)
        tracker.step(1, loss=float("nan"))
    info = _only_run(store)
    assert info.status == "diverged"
    assert "NonFiniteError" in info.summary["error"] and "step 1" in info.summary["error"]
    assert stop_reason(store, info).startswith("diverged at step 1")


def test_error_after_a_completed_fit_keeps_the_outcome():
    """``with Tracker(...)`` around a fit that completed, then an error: the training outcome
    stays ``completed``; the error is recorded in the summary."""
    prob = _problem(3)
    store = Store(":memory:")
    with pytest.raises(RuntimeError), gs.Tracker(prob, [LossProbe()], store) as tracker:
        gs.fit(prob, gs.GD(prob.model.parameters(), lr=0.1), steps=3, tracker=tracker)
        raise RuntimeError("plotting failed")
    info = _only_run(store)
    assert info.status == "completed"
    assert info.summary == {"error": "RuntimeError: plotting failed"}


def test_completed_runs_store_no_error():
    prob = _problem(4)
    store = Store(":memory:")
    with gs.Tracker(prob, [LossProbe()], store) as tracker:
        gs.fit(prob, gs.GD(prob.model.parameters(), lr=0.1), steps=3, tracker=tracker)
    info = _only_run(store)
    assert info.status == "completed" and "error" not in info.summary
    assert stop_reason(store, info) == "completed 3 steps (steps 0–2)"


def test_fit_divergence_stores_the_reason():
    prob = _problem(5)
    store = Store(":memory:")
    tracker = gs.Tracker(prob, [LossProbe()], store)
    res = gs.fit(
        prob, gs.GD(prob.model.parameters(), lr=1e6), steps=50, tracker=tracker, on_nonfinite="stop"
    )
    assert res.diverged
    info = _only_run(store)
    assert info.status == "diverged"
    assert info.summary["error"].startswith(f"NonFiniteError: step {res.diverged_at}")
    assert stop_reason(store, info).startswith("diverged")
