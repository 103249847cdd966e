"""Adversarial arguments to :func:`gdscope.central_flow`: each refused before any work, with an
error from :mod:`gdscope.errors` that names the argument."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gdscope as gs
from gdscope.errors import InvalidArgumentError

DT = torch.float64


def _prob() -> gs.Problem:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    g = torch.Generator().manual_seed(1)
    return gs.Problem(
        model,
        "mse",
        (torch.randn(6, 3, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT)),
    )


def _gd(prob: gs.Problem, **kw) -> torch.optim.Optimizer:
    return torch.optim.SGD(prob.model.parameters(), **{"lr": 0.1, **kw})


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"steps": "10"}, "steps"),
        ({"steps": True}, "steps"),
        ({"substeps": 0}, "substeps"),
        ({"substeps": 1.5}, "substeps"),
        ({"max_edge": 0}, "max_edge"),
        ({"eig_every": 0}, "eig_every"),
        ({"curvature_every": 0}, "curvature_every"),
        ({"curvature_every": None}, "curvature_every"),
        ({"stop_after_edge": -1}, "stop_after_edge"),
        ({"stop_after_edge": 1.5}, "stop_after_edge"),
        ({"edge_fraction": 0.0}, "edge_fraction"),
        ({"edge_fraction": 1.0}, "edge_fraction"),
        ({"edge_fraction": math.nan}, "edge_fraction"),
        ({"edge_fraction": "0.9"}, "edge_fraction"),
        ({"track_tol": -1e-3}, "track_tol"),
        ({"track_tol": math.inf}, "track_tol"),
        ({"eig_tol": 0.0}, "eig_tol"),
        ({"eig_tol": True}, "eig_tol"),
    ],
)
def test_central_flow_refuses_bad_settings(kwargs, name):
    prob = _prob()
    kwargs = {"steps": 5, **kwargs}
    steps = kwargs.pop("steps")
    with pytest.raises(InvalidArgumentError, match=rf"\b{name}\b"):
        gs.central_flow(prob, _gd(prob), steps, **kwargs)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda p: _gd(p, momentum=0.9), "momentum"),
        (lambda p: _gd(p, weight_decay=1e-4), "weight_decay"),
        (lambda p: torch.optim.Adam(p.model.parameters(), lr=1e-3), "Adam"),
        (lambda p: "GD", "optimizer"),
        (lambda p: 0.1, "optimizer"),
        (lambda p: {"class": "GD"}, "lr"),
    ],
)
def test_central_flow_refuses_optimizers_it_does_not_model(make, match):
    prob = _prob()
    with pytest.raises(InvalidArgumentError, match=match):
        gs.central_flow(prob, make(prob), 5)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"curvature_every": 2}, "curvature_every"), ({"stop_after_edge": 3}, "stop_after_edge")],
)
def test_gd_only_options_are_refused_for_rmsprop(kwargs, name):
    prob = _prob()
    opt = torch.optim.RMSprop(prob.model.parameters(), lr=1e-3)
    with pytest.raises(InvalidArgumentError, match=rf"\b{name}\b.*gradient descent only"):
        gs.central_flow(prob, opt, 5, **kwargs)


def test_numpy_integers_are_accepted():
    prob = _prob()
    pred = gs.central_flow(prob, _gd(prob), np.int64(3), substeps=np.int32(2))
    assert pred.steps == 3 and np.isfinite(pred.loss).all()
