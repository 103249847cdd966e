"""The stability experiment (edge of stability, SGD plateaus, stability of the end points)."""

from __future__ import annotations

import json

import pytest
import torch

from gdscope.errors import ConfigError
from gdscope.experiments import resolve, run_tasks
from gdscope.zoo import load_dataset, mlp

SMOKE = {
    "data": {"n": 32},
    "width": 8,
    "steps": 60,
    "lrs": [2.0, 40.0],
    "batch_sizes": [4, 16],
    "sharpness_every": 5,
    "gd_map_points": 3,
    "orbit_window": 16,
    "lyapunov_steps": 20,
    "exact_limit": 1,
}


@pytest.fixture(scope="module")
def smoke():
    exp, cfg = resolve({"experiment": "stability", **SMOKE})
    results = [o.result for o in run_tasks(exp, cfg)]
    return exp, cfg, results, exp.judge(cfg, results)


def _by_lr(results, lr, kind="gd"):
    return next(r for r in results if r["kind"] == kind and r["lr"] == lr)


def test_verdicts_and_figures_have_the_documented_structure(smoke):
    exp, cfg, results, judgement = smoke
    assert [t["kind"] for t in exp.tasks(cfg)] == ["gd", "gd", "sgd", "sgd"]
    claims = [v.claim for v in judgement.verdicts]
    assert len(claims) == 8
    assert claims[0].startswith("Edge of stability at η = 2")
    assert claims[1].startswith("Edge of stability at η = 40")
    assert any("plateaus below 2/η" in c for c in claims)
    assert any("smaller batches" in c for c in claims)
    assert any("period-2 orbit" in c for c in claims)
    assert any("singular" in c for c in claims)
    for v in judgement.verdicts:
        assert v.holds in (True, False, None)
        assert v.predicted and v.measured
        assert isinstance(v.details, dict)
    assert [f.name for f in judgement.figures] == [
        "stability-sharpness",
        "stability-sgd",
        "stability-verdicts",
    ]
    assert all(f.uri.startswith("data:image/png;base64,") for f in judgement.figures)
    json.dumps(results, allow_nan=False)  # JSON-ready, non-finite values as None


def test_sharpness_series_starts_at_the_initial_hessian(smoke, oracle):
    _, cfg, results, _ = smoke
    X, Y = load_dataset("digits", n=32, seed=cfg.seed, flatten=True, dtype=torch.float64)
    model = mlp([64, 8, 8, 10], "tanh", seed=cfg.seed, dtype=torch.float64)
    h = torch.linalg.eigvalsh(oracle.hessian(model, X, Y))
    for r in results:
        assert r["sharpness_steps"][0] == 0
        assert r["sharpness_init"] == pytest.approx(h[-1].item(), rel=1e-6)
        # the probe's steps: θ_0, then θ_{t+1} after every sharpness_every-th step
        assert r["sharpness_steps"][1:] == list(range(1, cfg.steps + 1, cfg.sharpness_every))
        assert r["threshold"] == pytest.approx(2 / r["lr"])
    # the GD map's count at θ_0 is the dense count of eigenvalues above 1/η
    gd = _by_lr(results, 2.0)["gd_map"]
    assert gd["steps"][0] == 0
    assert gd["count_above"][0] == int((h > 1 / 2.0).sum())


def test_a_learning_rate_far_above_threshold_is_reported_not_raised(smoke):
    _, _, results, judgement = smoke
    r = _by_lr(results, 40.0)
    assert r["sharpness_init"] > 10 * r["threshold"]
    assert r["outcome"] in ("diverged", "unstable")
    assert "stability" not in r  # no end point to analyse
    v = judgement.verdicts[1]
    assert v.holds is None
    assert r["outcome"] in v.measured
    # the run that stays below its threshold trains
    ok = _by_lr(results, 2.0)
    assert ok["outcome"] == "trained" and ok["loss_final"] < ok["loss_init"]


def test_sgd_runs_record_plateau_and_stability_report(smoke):
    _, _, results, judgement = smoke
    sgd = [r for r in results if r["kind"] == "sgd"]
    for r in sgd:
        assert r["outcome"] == "trained"
        assert r["plateau_q25"] <= r["plateau_ratio"] <= r["plateau_q75"]
        st = r["stability"]
        assert st["noise_factor"] == pytest.approx((32 - r["batch_size"]) / (r["batch_size"] * 31))
        for key in ("gd_stable", "sgd_mean_square_stable", "wu_ma_e_holds", "at_minimum"):
            assert st[key] in (True, False, None)
        assert st["sgd_lyapunov"]["ci"][0] <= st["sgd_lyapunov"]["value"]
    plateau = next(v for v in judgement.verdicts if "plateaus below" in v.claim)
    # at smoke size the small-batch plateaus sit well below 2/η
    assert plateau.holds is True
    assert all(q < 1 for q in plateau.details["plateau_q75"])


def test_orbit_and_gd_map_rows_only_use_runs_that_trained(smoke):
    _, _, results, judgement = smoke
    orbit = next(v for v in judgement.verdicts if "period-2" in v.claim)
    assert all(run["lr"] != 40.0 for run in orbit.details["runs"])
    gd = _by_lr(results, 2.0)
    assert len(gd["gd_map"]["steps"]) == 3
    assert 0 <= gd["orbit"]["params"]["top_alignment"] <= 1


@pytest.mark.parametrize(
    ("overrides", "path"),
    [
        (["data.n=many"], "data.n"),
        (["lrs=[-1.0]"], "lrs"),
        (["batch_sizes=[300]"], "batch_sizes"),
        (["eos_band=[1.1, 0.9]"], "eos_band"),
        (["widht=3"], "widht"),
    ],
)
def test_bad_config_fields_are_named(overrides, path):
    with pytest.raises(ConfigError, match=path):
        resolve("stability", overrides)


@pytest.mark.slow
def test_default_size_reaches_the_edge_of_stability():
    exp, cfg = resolve("stability")
    results = [o.result for o in run_tasks(exp, cfg)]
    judgement = exp.judge(cfg, results)
    eos = [v for v in judgement.verdicts if v.claim.startswith("Edge of stability")]
    assert sum(v.holds is True for v in eos) >= 2
    assert not any(v.holds is False for v in eos)
    plateau = next(v for v in judgement.verdicts if "plateaus below" in v.claim)
    trend = next(v for v in judgement.verdicts if "smaller batches" in v.claim)
    assert plateau.holds is True and trend.holds is True
