"""The demo's NTK certificate against exact cases: a model linear in its parameters."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import gdscope as gs
from gdscope.demo import _initial_kernel, ntk_certificate
from gdscope.store import Store
from gdscope.zoo import digits


def _linear_run(lr: float, steps: int):
    X, Y = digits(40, seed=1, dtype=torch.float64)
    model = nn.Linear(64, 10).double()
    torch.manual_seed(0)
    kernel = _initial_kernel(model, X, Y)
    pred = gs.predict(
        kernel.K, {"class": "GD", "lr": lr}, steps, f0=kernel.f0, y=kernel.y, loss="mse"
    )
    prob = gs.Problem(model, "mse", (X, Y))
    result = gs.fit(prob, gs.GD(model.parameters(), lr=lr), steps)
    return pred, np.asarray(result.losses)


def test_linear_model_certificate_is_exact():
    pred, losses = _linear_run(lr=0.5, steps=200)
    # a model linear in its parameters is its own linearization: the curves agree to rounding
    np.testing.assert_allclose(losses, pred.loss[:200], rtol=1e-9)
    rate, regime = ntk_certificate(pred, 0.5, losses)
    assert regime.holds is True and "[1, 1]" in regime.measured
    # the loss decays at least as fast as the worst mode allows: never "fails"
    assert rate.holds is not False
    assert rate.details["measured_loss_factor"] <= rate.details["predicted_loss_factor"] + 1e-9


def test_certificate_fails_on_a_curve_slower_than_guaranteed():
    pred, losses = _linear_run(lr=0.5, steps=200)
    slow = losses[0] * (1 - 1e-7) ** np.arange(200)  # slower than the certified factor
    rate, regime = ntk_certificate(pred, 0.5, slow)
    assert rate.holds is False and regime.holds is False


def test_certificate_undetermined_when_linear_model_diverges_or_curve_short():
    pred, losses = _linear_run(lr=0.5, steps=200)
    lam_max, q = pred.eigenvalues[-1], pred.q
    big = 2.5 / (q * lam_max)
    rate, _ = ntk_certificate(pred, big, losses)
    assert rate.holds is None and "diverges" in rate.predicted
    rate, _ = ntk_certificate(pred, 0.5, losses[:4])
    assert rate.holds is None


def test_recorded_prediction_feeds_report_rate_table(tmp_path):
    from gdscope.report.summary import rate_row, stored_prediction, summarize_run

    X, Y = digits(30, seed=2, dtype=torch.float64)
    model = nn.Linear(64, 10).double()
    prob = gs.Problem(model, "mse", (X, Y))
    with Store(tmp_path / "r.db") as store:
        tracker = gs.Tracker(prob, store=store, run_name="lin")
        pred = gs.predict(prob, gs.GD(model.parameters(), lr=0.5), 60)
        gs.fit(prob, gs.GD(model.parameters(), lr=0.5), 60, tracker)
        tracker.record_prediction(pred)
        verdict = {"claim": "c", "predicted": "p", "measured": "m", "holds": None, "details": {}}
        tracker.close("completed", {"verdicts": [verdict]})
        stored = stored_prediction(store, tracker.run_id)
        assert stored is not None and stored["steps"][0] == 0
        np.testing.assert_allclose(stored["loss"], pred.loss[stored["steps"]], rtol=1e-12)
        row = rate_row(store, tracker.run_id)
        assert row.fit is not None
        assert row.predicted_loss_rate == pytest.approx(pred.loss_rate)
        assert summarize_run(store, tracker.run_id)[-1].claim == "c"
        assert json.loads(store.artifact(tracker.run_id, "prediction"))["label"]


def test_report_shows_prediction_rates_and_stability(tmp_path):
    from gdscope.demo import DemoConfig, run_demo

    result = run_demo(tmp_path, DemoConfig(lrs=(0.5,), steps=40, samples=24, width=16))
    html = result.report_path.read_text()
    assert "id='prediction'" in html and "data-name='prediction'" in html
    assert "loss factor per step" in html and "Stability and orbits" in html
    assert "GD-stable" in html and "NTK certificate" in html
