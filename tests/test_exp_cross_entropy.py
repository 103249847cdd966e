"""The cross_entropy experiment: verdict structure, growth at infinity, config errors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gdscope.errors import ConfigError
from gdscope.experiments import resolve, run_tasks

SMOKE = ["data.n=32", "hidden=[32]", "steps=300"]
CLAIMS = (
    "The training loss tends to 0",
    "‖θ‖ grows without bound",
    "The normalized margin",
    "Every training sample is classified correctly",
)


@pytest.fixture(scope="module")
def smoke():
    exp, cfg = resolve("cross_entropy", SMOKE)
    outputs = run_tasks(exp, cfg)
    results = [o.result for o in outputs]
    return exp, cfg, outputs, results, exp.judge(cfg, results)


def test_tasks_one_per_trial_and_lr():
    exp, cfg = resolve("cross_entropy", ["trials=2", "lrs=[0.5, 2]"])
    assert exp.tasks(cfg) == [
        {"seed": 0, "lr": 0.5},
        {"seed": 0, "lr": 2.0},
        {"seed": 1, "lr": 0.5},
        {"seed": 1, "lr": 2.0},
    ]


def test_verdict_structure(smoke):
    _, _, outputs, results, judgement = smoke
    assert len(judgement.verdicts) == len(CLAIMS)
    for verdict, claim in zip(judgement.verdicts, CLAIMS, strict=True):
        assert verdict.claim.startswith(claim)
        assert verdict.holds in (True, False, None)
        assert verdict.predicted and verdict.measured
        assert len(verdict.details["tasks"]) == 1
    assert [f.name for f in judgement.figures] == ["cross_entropy"]
    assert judgement.figures[0].uri.startswith("data:image/png;base64,")
    assert len(outputs[0].runs) == 1
    r = results[0]
    assert r["degree"] == 2  # two bias-free linear layers
    assert len(r["losses"]) == 300
    assert len(r["record_steps"]) == len(r["param_norm"]) == len(r["normalized_margin"])


def test_loss_falls_and_weights_grow(smoke):
    _, _, _, results, judgement = smoke
    r = results[0]
    losses, norms = np.asarray(r["losses"]), np.asarray(r["param_norm"])
    assert losses[-1] < 1e-3 * losses[0]
    assert np.all(np.diff(losses[150:]) <= 0)
    assert np.all(np.diff(norms[len(norms) // 2 :]) > 0)  # ‖θ‖ keeps growing
    gbar = np.asarray(r["normalized_margin"])
    assert gbar[-1] > gbar[np.flatnonzero(gbar > 0)[0]]
    assert [v.holds for v in judgement.verdicts] == [True] * len(CLAIMS)
    norm_fit = judgement.verdicts[1].details["tasks"][0]
    assert norm_fit["preferred"] == "log t" and norm_fit["slope_per_log_t_ci"][0] > 0


def test_diverged_run_fails_every_claim(smoke):
    exp, cfg, _, results, _ = smoke
    broken = {**results[0], "diverged": True, "diverged_at": 7}
    broken["losses"] = [*results[0]["losses"][:7], math.nan]
    judgement = exp.judge(cfg, [broken])
    assert [v.holds for v in judgement.verdicts] == [False] * len(CLAIMS)
    assert all("diverged at step 7" in v.measured for v in judgement.verdicts)


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("data.n=many", "data.n"),
        ("hidden=[0]", "hidden"),
        ('lrs=["fast"]', r"lrs\[0\]"),
        ("loss_tol=2", "loss_tol"),
        ("stpes=10", "stpes"),
    ],
)
def test_config_errors_name_the_field(override, path):
    # type errors come from the config builder, range errors from __post_init__ ("config: ...")
    with pytest.raises(ConfigError, match=rf"^(config: )?{path}[:=]"):
        resolve("cross_entropy", [override])


def test_unlabelled_data_is_refused():
    exp, cfg = resolve("cross_entropy", ["data.name=nope", "data.n=8"])
    with pytest.raises(ConfigError, match="data"):
        run_tasks(exp, cfg)


@pytest.mark.slow
def test_default_size_verdicts_hold():
    exp, cfg = resolve("cross_entropy")
    judgement = exp.judge(cfg, [o.result for o in run_tasks(exp, cfg)])
    assert [v.holds for v in judgement.verdicts] == [True] * len(CLAIMS)
