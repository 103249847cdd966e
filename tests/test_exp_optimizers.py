"""The optimizers experiment: verdict structure, the exact linear case, config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gdscope.errors import ConfigError
from gdscope.experiments import resolve, run_tasks
from gdscope.experiments.optimizers import design

SMOKE = ["data.n=32", "width=256", "steps=300"]
CLAIMS = (
    "GD converges linearly",
    "heavy ball converges linearly",
    "Nesterov (constant β) converges linearly",
    "Nesterov with scheduled β_t decays as a power law",
    "Heavy ball's rate beats GD's",
    "Measured loss curves track",
)


@pytest.fixture(scope="module")
def smoke():
    exp, cfg = resolve("optimizers", SMOKE)
    outputs = run_tasks(exp, cfg)
    results = [o.result for o in outputs]
    return exp, cfg, outputs, results, exp.judge(cfg, results)


def test_tasks_one_per_optimizer_and_trial():
    exp, cfg = resolve("optimizers", ["trials=2", 'optimizers=["gd", "heavy_ball"]'])
    assert exp.tasks(cfg) == [
        {"optimizer": "gd", "seed": 0},
        {"optimizer": "heavy_ball", "seed": 0},
        {"optimizer": "gd", "seed": 1},
        {"optimizer": "heavy_ball", "seed": 1},
    ]


def test_verdict_structure(smoke):
    _, _, outputs, results, judgement = smoke
    assert [r["optimizer"] for r in results] == [
        "gd",
        "heavy_ball",
        "nesterov",
        "nesterov_scheduled",
    ]
    assert len(judgement.verdicts) == len(CLAIMS)
    for verdict, claim in zip(judgement.verdicts, CLAIMS, strict=True):
        assert verdict.claim.startswith(claim)
        assert verdict.holds in (True, False, None)
        assert verdict.predicted and verdict.measured
        assert isinstance(verdict.details, dict)
    assert "rate_fits" in judgement.verdicts[0].details
    assert [f.name for f in judgement.figures] == ["loss_curves"]
    assert judgement.figures[0].uri.startswith("data:image/png;base64,")
    # each task recorded its run in the store, with the loss at every step
    for out in outputs:
        assert len(out.runs) == 1


def test_smoke_claims(smoke):
    _, _, _, results, judgement = smoke
    for r in results:
        assert not r["diverged"]
        m = r["measured"]
        assert len(m) == len(r["predicted"]) == r["steps"]
        assert m[-1] < 1e-6 * m[0]  # every optimizer converges
    verdicts = {v.claim.split(" converges")[0]: v for v in judgement.verdicts}
    assert verdicts["heavy ball"].holds is True
    # heavy ball, tuned from the spectrum, is faster than GD: its rate fit is smaller
    hb = verdicts["heavy ball"].details["rate_fits"][0]["measured_rate"]
    gd = verdicts["GD"].details["rate_fits"][0]["measured_rate"]
    assert hb < gd
    assert judgement.verdicts[-1].holds is True  # curves track at width 256


def test_readout_only_prediction_is_exact():
    """Training only the readout makes the model linear in θ: prediction = measurement."""
    exp, cfg = resolve("optimizers", ["data.n=24", "width=64", "train=readout", "steps=120"])
    results = [o.result for o in run_tasks(exp, cfg)]
    for r in results:
        m, p = np.asarray(r["measured"]), np.asarray(r["predicted"])
        assert np.max(np.abs(m - p)) <= 1e-10 * m[0], r["optimizer"]
    track = exp.judge(cfg, results).verdicts[-1]
    assert track.holds is True
    assert max(g["max_gap_over_L0"] for g in track.details["gaps"]) < 1e-10


def test_diverged_run_is_judged_not_crashed(smoke):
    exp, cfg, _, results, _ = smoke
    broken = dict(results[1])  # heavy ball
    broken.update(
        diverged=True,
        diverged_at=5,
        steps=5,
        measured=[*broken["measured"][:5], math.inf],
        predicted=broken["predicted"][:6],
    )
    judgement = exp.judge(cfg, [results[0], broken, *results[2:]])
    by_claim = {v.claim: v for v in judgement.verdicts}
    hb = by_claim["heavy ball converges linearly at the predicted rate"]
    assert hb.holds is False and "diverged" in hb.measured
    assert judgement.verdicts[-1].holds is False


def test_design_heavy_ball_is_polyaks_pair():
    hp = design("heavy_ball", q=1.0, lambda_min=1.0, lambda_max=100.0, margin=0.0)
    assert hp["kappa"] == pytest.approx(100.0)
    assert hp["beta"] == pytest.approx((9 / 11) ** 2)
    assert hp["lr"] == pytest.approx(4 / 121)
    gd = design("gd", q=2.0, lambda_min=1.0, lambda_max=100.0, margin=0.25)
    assert gd["lr"] == pytest.approx(2 / (2.0 * (1 / 1.25 + 125.0)))


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("data.n=many", "data.n"),
        ('optimizers=["adam"]', r"optimizers\[0\]"),
        ("margin=-1", "margin"),
        ("train=everything", "train"),
        ("wdith=10", "wdith"),
    ],
)
def test_config_errors_name_the_field(override, path):
    # type errors come from the config builder, range errors from __post_init__ ("config: ...")
    with pytest.raises(ConfigError, match=rf"^(config: )?{path}[:=]"):
        resolve("optimizers", [override])


@pytest.mark.slow
def test_default_size_verdicts_hold():
    exp, cfg = resolve("optimizers")
    judgement = exp.judge(cfg, [o.result for o in run_tasks(exp, cfg)])
    assert [v.holds for v in judgement.verdicts] == [True] * len(CLAIMS)
