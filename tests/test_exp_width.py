"""The ``width`` experiment: smoke run, claims that hold at any size, config validation."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from gdscope.errors import ConfigError
from gdscope.experiments import resolve, run_tasks
from gdscope.experiments.width import (
    WidthConfig,
    infinite_width_eigenvalues,
    infinite_width_lr,
    load_data,
    loglog_fit,
)

SMOKE = [
    "widths=[16, 32, 64]",
    "data.n=12",
    "steps=40",
    "trials=2",
    "kernel_samples=6",
]


@pytest.fixture(scope="module")
def smoke():
    exp, cfg = resolve("width", SMOKE)
    outputs = run_tasks(exp, cfg)
    results = [o.result for o in outputs]
    return exp, cfg, outputs, results, exp.judge(cfg, results)


def test_tasks_one_per_width_and_seed(smoke):
    _, _, outputs, results, _ = smoke
    assert [(o.task["width"], o.task["seed"]) for o in outputs] == [
        (m, s) for m in (16, 32, 64) for s in (0, 1)
    ]
    # every task records the network's run and its linearization's run
    names = [run["name"] for o in outputs for run in o.runs]
    assert "width-m16-seed0" in names and "width-m16-seed0-linearized" in names
    json.dumps(results, allow_nan=False)  # JSON-ready, no NaN


def test_verdict_structure(smoke):
    *_, judgement = smoke
    claims = [v.claim for v in judgement.verdicts]
    assert len(claims) == 8  # convergence, 3 layers, drift, rate, gap, exactness
    assert "global minimum" in claims[0]
    assert "input layer" in claims[1] and "hidden layer" in claims[2]
    assert "readout layer" in claims[3] and "NTK drift" in claims[4]
    for v in judgement.verdicts:
        assert v.holds in (True, False, None)
        assert v.predicted and v.measured
    for v in judgement.verdicts[1:5]:
        local = v.details["local"]
        assert local["widths"] == [16, 32, 64] and local["pairs"] == [[16, 32], [32, 64]]
        assert all(lo <= s <= hi for s, (lo, hi) in zip(local["slopes"], local["cis"], strict=True))
        assert v.reason == local["reason"] and v.theorem and v.section
        assert v.details["pooled_fit"]["points"] == 6
    assert [f.name for f in judgement.figures] == [
        "width_slopes",
        "width_loss_curves",
        "width_gap",
    ]
    assert all(f.uri.startswith("data:image/png;base64,") for f in judgement.figures)


def test_claims_that_hold_at_smoke_size(smoke):
    *_, results, judgement = smoke
    for r in results:
        assert not r["diverged"]
        assert r["loss_final"] < 0.5 * r["loss0"]  # GD at half the threshold descends
        # η is half the infinite-width threshold: the wide nets' kernels are close enough to
        # Θ∞ for it to be below their own threshold too
        assert r["lr_over_threshold"] < 1 or r["width"] < 64
        assert len(r["layers"]) == 3 and all(lay["rel_change"] > 0 for lay in r["layers"])
    # a 4x wider net moves each layer less (hidden: ~16x less in theory)
    for i in range(3):
        narrow = np.mean([r["layers"][i]["rel_change"] for r in results if r["width"] == 16])
        wide = np.mean([r["layers"][i]["rel_change"] for r in results if r["width"] == 64])
        assert wide < narrow
    # the sharp test: the prediction from K₀ is the linearized model's GD run, to rounding
    exact = judgement.verdicts[-1]
    assert exact.holds is True
    assert max(exact.details["deviations"]) < 1e-10


def test_step_size_is_the_infinite_width_threshold_fraction():
    cfg = WidthConfig(widths=(8,), lr_scale=0.5)
    X, Y = load_data(cfg, torch.device("cpu"), torch.float64)
    lr = infinite_width_lr(cfg, X, Y.shape[1])
    ev = infinite_width_eigenvalues(cfg, X)
    q = 2 / Y.numel()
    assert math.isclose(lr * q * float(ev[-1]), 2 * 0.5)


def test_loglog_fit():
    m = np.array([8, 16, 32, 64, 128] * 2, dtype=float)
    noise = np.exp(0.01 * np.sin(np.arange(m.size)))
    fit = loglog_fit(m, 3.0 * m**-0.75 * noise)
    assert fit is not None and abs(fit.slope + 0.75) < 0.02
    assert fit.ci[0] < fit.slope < fit.ci[1]
    assert loglog_fit([8, 8, 8], [1.0, 2.0, 3.0]) is None  # one width: no slope
    assert loglog_fit([8, 16], [1.0, 2.0]) is None


def test_divergence_is_kept_and_reported():
    # a deep linear net at 50x the threshold overflows within a few steps
    exp, cfg = resolve(
        "width",
        ["widths=[8]", "data.n=8", "steps=20", "trials=1", "lr_scale=50", "activation=identity"],
    )
    outputs = run_tasks(exp, cfg)
    (r,) = [o.result for o in outputs]
    assert r["diverged"] and r["lr_over_threshold"] > 1
    assert outputs[0].runs[0]["status"] == "diverged"
    judgement = exp.judge(cfg, [r])
    first = judgement.verdicts[0]
    assert first.holds is False and "diverged" in first.measured
    assert all(v.holds is None for v in judgement.verdicts[1:])


def test_unstable_narrow_net_is_judged_without_crashing():
    # ReLU at 50x the threshold: the linearized prediction overflows, the net's units die
    exp, cfg = resolve(
        "width", ["widths=[8, 16, 32]", "data.n=8", "steps=20", "trials=1", "lr_scale=50"]
    )
    results = [o.result for o in run_tasks(exp, cfg)]
    json.dumps(results, allow_nan=False)
    judgement = exp.judge(cfg, results)
    assert judgement.verdicts[0].holds is False  # no global minimum reached
    assert len(judgement.figures) == 3


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ('widths=["a"]', "widths[0]"),
        ("widths=[16, 0]", "widths[1]"),
        ("widths=[]", "widths"),
        ("trials=0", "trials"),
        ("steps=5", "steps"),
        ("lr_scale=-1", "lr_scale"),
        ("tail=1.5", "tail"),
        ("data.n=many", "data.n"),
        ("activation=swish", "activation"),
        ("widht=3", "widht"),
    ],
)
def test_config_errors_name_the_field(override, path):
    with pytest.raises(ConfigError, match=re.escape(path)):
        resolve("width", [override])


def test_paper_scale_is_a_valid_config():
    exp, _ = resolve("width")
    _, cfg = resolve("width", [f"{k}={json.dumps(v)}" for k, v in exp.paper_scale.items()])
    assert max(cfg.widths) == 2048 and cfg.device == "cuda"
