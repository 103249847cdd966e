"""The ``disparity`` experiment: smoke run, claims that hold at any size, config validation."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

import gdscope as gs
from gdscope.errors import ConfigError
from gdscope.experiments import resolve, run_tasks
from gdscope.experiments.width import load_data, ntk_net

# n = 8 points, k = 10 outputs: nk = 80. One hidden layer, P = 74·m: m = 1 has P = 74 < nk
# (rank ≤ P: singular at every step); m = 64 has P = 4736 = 59·nk (over-parameterized).
SMOKE = ["widths=[1, 16, 64]", "data.n=8", "steps=30", "trials=2", "per_decade=3"]


@pytest.fixture(scope="module")
def smoke():
    exp, cfg = resolve("disparity", SMOKE)
    outputs = run_tasks(exp, cfg)
    results = [o.result for o in outputs]
    return exp, cfg, outputs, results, exp.judge(cfg, results)


def test_verdict_structure(smoke):
    _, _, outputs, results, judgement = smoke
    assert [(o.task["width"], o.task["seed"]) for o in outputs] == [
        (m, s) for m in (1, 16, 64) for s in (0, 1)
    ]
    json.dumps(results, allow_nan=False)
    claims = [v.claim for v in judgement.verdicts]
    assert len(claims) == 4
    assert "full-rank disparity" in claims[0] and "⇒ convergence" in claims[1]
    assert "bounded away" in claims[2] and "grows with width" in claims[3]
    for v in judgement.verdicts:
        assert v.holds in (True, False, None)
        assert v.predicted and v.measured
        assert v.theorem and v.reason and v.section == "1-kernel-certificates"
    assert [f.name for f in judgement.figures] == [
        "disparity_sigma_min",
        "disparity_rank",
        "disparity_singular_fraction",
    ]
    assert all(f.uri.startswith("data:image/png;base64,") for f in judgement.figures)


def test_claims_that_hold_at_smoke_size(smoke):
    _, cfg, _, results, judgement = smoke
    for r in results:
        assert not r["diverged"] and r["loss_final"] < r["loss0"]
        assert r["steps"][0] == 0 and r["steps"][-1] == cfg.steps  # θ_0 … θ_T
        assert len(r["steps"]) == len(r["sigma_min"]) == len(r["rank"])
        assert all(rank <= min(r["params"], r["nk"]) for rank in r["rank"])
    narrow = [r for r in results if r["width"] == 1]
    wide = [r for r in results if r["width"] == 64]
    # P < nk: the rank cannot be full, at initialization or ever
    assert all(r["singular_at_init"] and r["singular_event"] for r in narrow)
    assert all(r["sigma_min_min"] == 0.0 for r in narrow)
    # P = 59·nk: full rank at every measured step, σ_min well away from 0
    assert all(r["overparameterized"] and r["full_rank_throughout"] for r in wide)
    assert all(r["sigma_min_min"] > 0.5 * r["sigma0"] > 0 for r in wide)
    assert judgement.verdicts[0].holds is True
    assert judgement.verdicts[0].details["fraction"] == {1: 1.0, 16: 0.0, 64: 0.0}


def test_sigma_min_at_init_is_the_ntk_lambda_min():
    """σ_min(θ_0) recorded by the experiment is sqrt(λ_min) of the NTK Gram of the same net."""
    exp, cfg = resolve("disparity", ["widths=[32]", "data.n=6", "steps=20", "trials=1"])
    (r,) = [o.result for o in run_tasks(exp, cfg)]
    X, Y = load_data(cfg, torch.device("cpu"), torch.float64)
    net = ntk_net(cfg, X.shape[1], Y.shape[1], 32, r["seed"], torch.float64)
    K = gs.ntk(net, X)
    n, _, k, _ = K.shape
    lam = torch.linalg.eigvalsh(K.permute(0, 2, 1, 3).reshape(n * k, n * k))
    assert math.isclose(r["sigma0"], math.sqrt(float(lam[0])), rel_tol=1e-6)


def test_divergence_is_kept_and_reported():
    exp, cfg = resolve(
        "disparity",
        [
            "widths=[8, 64]",
            "data.n=6",
            "steps=20",
            "trials=1",
            "lr_scale=50",
            "depth=2",
            "activation=identity",
        ],
    )
    outputs = run_tasks(exp, cfg)
    results = [o.result for o in outputs]
    assert all(r["diverged"] for r in results)
    assert all(o.runs[0]["status"] == "diverged" for o in outputs)
    json.dumps(results, allow_nan=False)
    judgement = exp.judge(cfg, results)
    assert judgement.verdicts[1].holds is None and "diverged" in judgement.verdicts[1].measured


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ('widths=["a"]', "widths[0]"),
        ("widths=[4, -1]", "widths[1]"),
        ("trials=0", "trials"),
        ("per_decade=0", "per_decade"),
        ("overparam_factor=0.5", "overparam_factor"),
        ("loss_tol=2", "loss_tol"),
        ("depth=0", "depth"),
        ("data.n=1", "data.n"),
    ],
)
def test_config_errors_name_the_field(override, path):
    with pytest.raises(ConfigError, match=re.escape(path)):
        resolve("disparity", [override])


def test_paper_scale_is_a_valid_config():
    exp, _ = resolve("disparity")
    _, cfg = resolve("disparity", [f"{k}={json.dumps(v)}" for k, v in exp.paper_scale.items()])
    assert cfg.device == "cuda" and cfg.data.n == 128
