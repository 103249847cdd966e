"""The tracker's fast path against recomputation, and the stored central flow prediction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import gdscope as gs
from gdscope.probes import (
    LossProbe,
)
from gdscope.report.summary import stored_prediction
from gdscope.store import Store
from gdscope.theory import predict
from gdscope.theory.central_flow import central_flow

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
