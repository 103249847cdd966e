"""Each experiment's decision rules on synthetic results: a case that must hold, one that must fail.

The judges are pure functions of the task results, so hand-built results test the rule itself:
that "fails" is said only where the measurement contradicts the claim, and "holds" where it
agrees (docs/theory.md §8). ``stability``'s rules have their own synthetic cases in
``tests/test_exp_stability.py``; the asymptotic-order rule in ``tests/test_asymptotics.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from gdscope.experiments import cross_entropy as ce
from gdscope.experiments import disparity as dp
from gdscope.experiments import optimizers as op
from gdscope.experiments import resolve
from gdscope.experiments import skips as sk
from gdscope.experiments import width as wd
from gdscope.theory import fit_rates


def _cfg(name: str):
    return resolve(name, [])[1]


# ---------------------------------------------------------------------------------- width
def _width_run(m: int, seed: int, **kw) -> dict:
    base = {
        "width": m,
        "seed": seed,
        "loss0": 1.0,
        "loss_final": 1e-4,
        "accuracy_final": 1.0,
        "rate_ratio": 1 - 0.5 / math.sqrt(m),
        "lambda_min": 0.1,
        "predicted_loss_rate": 0.99,
        "lin_vs_prediction": 1e-14,
        "diverged": False,
    }
    return {**base, **kw}


def test_width_convergence_rule():
    cfg = _cfg("width")
    good = [_width_run(m, s) for m in (64, 128) for s in (0, 1)]
    assert wd._convergence_verdict(cfg, good, []).holds is True
    stuck = [*good[:-1], _width_run(128, 1, loss_final=0.5)]
    v = wd._convergence_verdict(cfg, stuck, [])
    assert v.holds is False and v.reason


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [
        (lambda m: 1 - 2 / math.sqrt(m), True),  # |R − 1| shrinks with width
        (lambda m: 1 - 0.001 * m, False),  # |R − 1| grows with width, never agrees
    ],
)
def test_width_rate_rule(ratio, expected):
    cfg = _cfg("width")
    rng = np.random.default_rng(0)
    runs = [
        _width_run(m, s, rate_ratio=ratio(m) * (1 + 0.001 * rng.standard_normal()))
        for m in (64, 128, 256, 512)
        for s in (0, 1, 2)
    ]
    v = wd._rate_verdict(cfg, runs)
    assert v.holds is expected and v.theorem and v.section


@pytest.mark.parametrize(("slope", "expected"), [(-0.5, True), (0.2, False)])
def test_width_gap_rule(slope, expected):
    pts = [(m, 0.3 * m**slope * (1 + 0.01 * s)) for m in (64, 128, 256, 512) for s in (0, 1)]
    lf = wd.loglog_fit(*zip(*pts, strict=True))
    v = wd._gap_verdict(lf, pts, [])
    assert v.holds is expected


@pytest.mark.parametrize(("dev", "expected"), [(1e-13, True), (1e-3, False)])
def test_width_exact_rule(dev, expected):
    cfg = _cfg("width")
    assert wd._exact_verdict(cfg, [_width_run(64, 0, lin_vs_prediction=dev)]).holds is expected


# ---------------------------------------------------------------------------------- disparity
def _disp_run(m: int, seed: int, **kw) -> dict:
    base = {
        "width": m,
        "seed": seed,
        "params": 100 * m,
        "nk": 320,
        "overparameterized": m >= 16,
        "singular_event": m < 16,
        "singular_at_init": m < 16,
        "rank_undetermined": False,
        "full_rank_throughout": m >= 16,
        "diverged": False,
        "converged": True,
        "loss0": 1.0,
        "loss_final": 1e-6,
        "pl_factor": 0.99,
        "still_falling": True,
        "sigma0": 0.5,
        "sigma_min_min": 0.45 * (1 - 1 / m),
        "sigma_inf": 0.6,
    }
    return {**base, **kw}


def test_disparity_singular_rule():
    cfg = _cfg("disparity")
    runs = [_disp_run(m, 0) for m in (8, 16, 64)]
    assert dp._singular_verdict(cfg, runs).holds is True  # singular only where P < factor·nk
    runs[-1]["singular_event"] = True  # a rank drop at an over-parameterized width
    assert dp._singular_verdict(cfg, runs).holds is False
    none_over = [_disp_run(8, 0)]
    v = dp._singular_verdict(cfg, none_over)
    assert v.status == "outside"


def test_disparity_implication_rule():
    cfg = _cfg("disparity")
    runs = [_disp_run(m, 0) for m in (16, 64)]
    assert dp._implication_verdict(cfg, runs).holds is True
    runs[0].update(converged=False, loss_final=0.5, still_falling=False)  # stalled at full rank
    assert dp._implication_verdict(cfg, runs).holds is False
    runs[0].update(still_falling=True)  # still falling: more steps decide
    assert dp._implication_verdict(cfg, runs).status == "undetermined"


def test_disparity_bounded_and_growth_rules():
    cfg = _cfg("disparity")
    runs = [_disp_run(m, s) for m in (16, 64, 256) for s in (0, 1)]
    assert dp._bounded_verdict(runs).holds is True
    assert dp._growth_verdict(cfg, runs).holds is True
    runs[0]["sigma_min_min"] = 0.1 * runs[0]["sigma0"]  # σ_min collapses during training
    assert dp._bounded_verdict(runs).holds is False
    shrinking = [
        _disp_run(m, s, sigma_min_min=0.5 / m * (1 + 0.01 * s))
        for m in (16, 64, 256)
        for s in (0, 1)
    ]
    assert dp._growth_verdict(cfg, shrinking).holds is False


# ---------------------------------------------------------------------------------- skips
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"none": [2.3, 2.31, 2.29], "modified": [0.13, 0.14, 0.12]}, True),
        ({"none": [0.13, 0.14, 0.12], "modified": [2.3, 2.31, 2.29]}, False),
        ({"none": [1.0, 2.0, 3.0], "modified": [1.5, 2.5, 1.8]}, None),  # within the spread
    ],
)
def test_skips_ordering_rule(values, expected):
    v = sk._row("c", "p", "final-epoch training loss", values, [("none", "modified")], "theorem")
    assert v.holds is expected and v.reason


# ---------------------------------------------------------------------------------- optimizers
def _curve(rate: float, steps: int = 400) -> np.ndarray:
    return rate ** np.arange(steps + 1)


def test_optimizers_linear_rate_rule():
    run = {"diverged": False, "predicted_asymptotic_loss_rate": 0.98}
    run.update(
        {
            "hyperparameters": {"lr": 1.0, "lambda_lo": 1.0, "lambda_hi": 2.0, "kappa": 2.0},
            "lambda_min": 1.0,
            "lambda_max": 2.0,
            "q": 1.0,
            "a_min": 0.01,
            "lr": 1.0,
            "seed": 0,
            "optimizer": "gd",
        }
    )
    same = (fit_rates(_curve(0.98)), fit_rates(_curve(0.98)))
    slower = (fit_rates(_curve(0.995)), fit_rates(_curve(0.98)))
    for fits, expected in ((same, True), (slower, False)):
        v = op._linear_verdict("gd", [run], [fits], rtol=0.05)
        assert v.holds is expected


@pytest.mark.parametrize(("gap", "expected"), [(1e-4, True), (0.3, False)])
def test_optimizers_track_rule(gap, expected):
    m = _curve(0.98, 100)
    p = m * (1 + gap)
    runs = [
        {
            "optimizer": "gd",
            "seed": 0,
            "measured": m,
            "predicted": p,
            "diverged": False,
            "steps": 100,
        }
    ]
    assert op._track_verdict(runs, 0.05, 4096, "full batch").holds is expected


# ---------------------------------------------------------------------------------- cross_entropy
def _ce_run(losses, norms, margins) -> dict:
    t = np.arange(1, len(losses) + 1, dtype=float)
    gbar = np.asarray(margins) / np.asarray(norms)
    return {
        "lr": 1.0,
        "seed": 0,
        "diverged": False,
        "losses": list(losses),
        "record_steps": list(t),
        "param_norm": list(norms),
        "margin": list(margins),
        "normalized_margin": list(gbar),
        "accuracy": [1.0] * len(losses),
    }


def test_cross_entropy_rules():
    cfg = _cfg("cross_entropy")
    t = np.arange(1, 2001, dtype=float)
    good = _ce_run(1 / t, 1 + np.log(t), 0.5 * (1 + np.log(t)) * (1 - 1 / (1 + t / 50)))
    out = ce._assess(good, cfg)
    assert out["loss"][0] is True and out["norm"][0] is True and out["margin"][0] is True
    stalled = _ce_run(0.5 + 0.5 / t, np.full(t.size, 3.0), np.full(t.size, 0.1))
    bad = ce._assess(stalled, cfg)
    assert bad["loss"][0] is False  # the loss does not go to 0
    assert bad["norm"][0] is not True  # a constant norm does not grow
