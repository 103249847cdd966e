"""The ``edge`` experiment: each decision rule on synthetic results, and a smoke run end to end."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import gdscope.experiments.edge  # noqa: F401  (registers "edge"; see /tmp/briefs/h8_requests.md)
from gdscope.errors import ConfigError
from gdscope.experiments import experiment_names, resolve, run_tasks
from gdscope.experiments._edge_parts import (
    edge_onset,
    linearized_verdict,
    loss_verdict,
    oscillation_period,
    sharpness_verdict,
    sliding_means,
    window_means,
)

torch.set_num_threads(1)

LR, T = 2.0, 200
THR = 2.0 / LR


def _result(**over: Any) -> dict[str, Any]:
    """A synthetic run at the edge: sharpness rises from 0.7·2/η to 2/η by step 50, GD's loss
    oscillates ±20% around the flow's time average, the linearized loss decays 10× below."""
    t = np.arange(T + 1)
    cf = 1.0 / (1 + 0.01 * t)
    wiggle = 1 + 0.2 * (-1.0) ** t
    sharp_steps = list(range(0, T, 5))
    sharp = [min(0.7 + 0.3 * s / 50, 1.0) * THR * (1.01 if s >= 50 else 1.0) for s in sharp_steps]
    r: dict[str, Any] = {
        "lr": LR,
        "threshold": THR,
        "gd_loss": list(cf[:T] * wiggle[:T]),
        "cf_loss": list(cf),
        "lin_loss": list(cf * np.exp(-0.02 * t)),
        "sharp_steps": sharp_steps,
        "sharp": sharp,
        "cf_sharp": [min(0.7 + 0.3 * s / 50, 1.0) * THR for s in range(T + 1)],
        "diverged": False,
        "diverged_at": None,
        "cf_error": None,
    }
    r.update(over)
    return r


RULES = {
    "loss": lambda r: loss_verdict(r, periods=3, tol=0.10, onset_fraction=0.95),
    "sharpness": lambda r: sharpness_verdict(r, tol=0.05, onset_fraction=0.95, min_post_onset=5),
    "linearized": lambda r: linearized_verdict(r, window=20, factor=2.0, onset_fraction=0.95),
}


def test_window_means_and_onset() -> None:
    assert np.allclose(window_means(np.arange(7.0), 3), [1.0, 4.0])
    assert edge_onset(_result(), 0.95) == 9  # step 45: 0.7 + 0.3·45/50 = 0.97·2/η
    assert edge_onset(_result(sharp=[0.5 * THR] * 40), 0.95) is None


def _cycled(period: float, amp: float = 0.3, decay: float = 0.0) -> np.ndarray:
    """GD's loss of :func:`_result` times a self-stabilization cycle of ``period`` steps after
    step 45 (relative amplitude ``amp``, envelope ``exp(−decay·(t − 45))``)."""
    t = np.arange(T)
    gd = np.asarray(_result()["gd_loss"])
    on = t >= 45
    env = amp * np.exp(-decay * (t - 45))
    return gd * np.where(on, 1 + env * np.sin(2 * np.pi * (t - 45) / period), 1.0)


def test_sliding_means() -> None:
    assert np.allclose(sliding_means(np.arange(5.0), 2), [0.5, 1.5, 2.5, 3.5])
    assert sliding_means(np.arange(3.0), 4).size == 0


@pytest.mark.parametrize("period", [12, 25, 37])
def test_oscillation_period_is_measured(period: int) -> None:
    """A cycle on top of the period-2 flip and a decaying trend: its period is recovered; the
    flip alone (no cycle) gives 2; white noise gives no cycle either."""
    osc = oscillation_period(_cycled(period), 45)
    assert osc.kind == "self-stabilization cycle" and abs(osc.period - period) <= 1, osc
    assert osc.acf_peak > osc.noise
    flip = oscillation_period(np.asarray(_result()["gd_loss"]), 45)
    assert flip.kind == "period-2 flip" and flip.period == 2
    rng = np.random.default_rng(0)
    noisy = np.asarray(_result()["gd_loss"]) * np.exp(0.05 * rng.standard_normal(T))
    assert oscillation_period(noisy, 45).period == 2


def test_loss_rule_tests_every_window_of_a_few_measured_periods() -> None:
    # the ±20% flip alone: T = 2, 6-step windows average it out exactly
    v = RULES["loss"](_result())
    assert v.status == "holds" and v.details["period"] == 2 and v.details["window"] == 6
    assert v.details["max_error"] < 0.01  # only the trend under the flip is left
    # a ±30% cycle of 25 steps: 75-step windows hold it to 30%/(3π)·(…) < 10%; one period not
    v = RULES["loss"](_result(gd_loss=list(_cycled(25))))
    assert v.status == "holds", v.measured
    assert v.details["period"] == 25 and v.details["window"] == 75
    assert v.details["max_error"] < 0.05 and v.details["errors_by_periods"]["1"] > 0.05
    assert v.details["windows"] == T - 75 + 1  # every window, first step to last
    # one catapult spike: a window over it fails, and is named; the windows before it hold
    gd = _cycled(25)
    gd[100:110] *= 2.5
    v = RULES["loss"](_result(gd_loss=list(gd)))
    assert v.status == "fails" and v.details["period"] == 25, v.measured
    start = v.details["max_error_window_start"]
    assert start <= 100 and start + 75 >= 110 and v.details["max_error"] > 0.15
    assert max(v.details["errors"][: 100 - 75 + 1]) < 0.05
    assert f"steps {start}–{start + 74}" in v.reason
    # a 30% bias everywhere fails
    v = RULES["loss"](_result(gd_loss=list(_cycled(25) * 1.3)))
    assert v.status == "fails" and v.details["median_error"] == pytest.approx(0.3, rel=0.05)
    # a run shorter than two windows: more steps decide
    v = loss_verdict(_result(gd_loss=list(_cycled(25))), periods=5, tol=0.1, onset_fraction=0.95)
    assert v.status == "undetermined" and "fewer than two windows" in v.measured


def test_sharpness_rule() -> None:
    assert RULES["sharpness"](_result()).status == "holds"
    r = _result()
    r["sharp"] = [s * (1.08 if s >= THR else 1.0) for s in r["sharp"]]
    v = RULES["sharpness"](r)
    assert v.status == "fails" and v.details["error"] == pytest.approx(0.0908, rel=0.01)
    short = _result(sharp_steps=[0, 5, 50, 55], sharp=[0.7 * THR, 0.8 * THR, THR, THR])
    assert RULES["sharpness"](short).status == "undetermined"


def test_linearized_rule() -> None:
    v = RULES["linearized"](_result())
    assert v.status == "holds" and v.details["factor"] > 2
    r = _result()
    r["lin_loss"] = list(np.asarray(r["cf_loss"]) * 1.2)
    v = RULES["linearized"](r)  # not separated yet: a contrast is never 'fails'
    assert v.status == "undetermined" and v.details["factor"] == pytest.approx(1.2, rel=0.02)
    assert "steps at the edge (onset step 45)" in v.reason
    r["lin_loss"] = [float("inf")] * (T + 1)  # the linearized model diverges: off by ∞
    assert RULES["linearized"](r).status == "holds"


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"sharp": [1.2 * THR] * 40}, "starts above"),
        ({"sharp": [0.5 * THR] * 40}, "never reached"),
        ({"diverged": True, "diverged_at": 12}, "diverged"),
        ({"cf_error": "the central flow left finite values"}, "could not be integrated"),
    ],
)
def test_unmet_premises_are_outside(over: dict[str, Any], needle: str) -> None:
    for rule in RULES.values():
        v = rule(_result(**over))
        assert v.status == "outside" and needle in v.assumption, (v.status, v.assumption)


def test_a_flow_at_its_tracking_limit_is_outside() -> None:
    """Every tracked eigenvalue at the edge: the flow's premise (it models all oscillating
    directions) is not met, so its rows are outside; below the limit they are judged."""
    full = _result(cf_edge_counts=[0] * 50 + [6] * 151, max_edge=6)
    for name in ("loss", "sharpness"):
        v = RULES[name](full)
        assert v.status == "outside" and "all 6 eigenvalues" in v.assumption
    assert RULES["linearized"](full).status == "holds"  # the contrast needs no flow
    below = _result(cf_edge_counts=[0] * 50 + [5] * 151, max_edge=6)
    assert RULES["sharpness"](below).status == "holds"


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="lrs"):
        resolve("edge", ["lrs=[-1.0]"])
    with pytest.raises(ConfigError, match="loss_window"):
        resolve("edge", ["steps=10", "loss_window=20"])
    with pytest.raises(ConfigError, match="loss_periods"):
        resolve("edge", ["loss_periods=0"])
    with pytest.raises(ConfigError, match="curvature_every"):
        resolve("edge", ["curvature_every=0"])


def test_edge_is_a_builtin() -> None:
    from gdscope.experiments.base import BUILTIN_MODULES

    assert "edge" in BUILTIN_MODULES


def test_smoke_end_to_end() -> None:
    """A tiny real run (seconds): the flow, the linearized model and the tracked GD run."""
    exp, cfg = resolve(
        "edge",
        [
            "data.n=32",
            "hidden=[8]",
            "lrs=[1.25]",
            "steps=30",
            "loss_window=10",
            "ss_every=10",
            "curvature_every=3",
        ],
    )
    assert "edge" in experiment_names()
    outs = run_tasks(exp, cfg)
    r = outs[0].result
    assert len(r["gd_loss"]) == 30 and len(r["cf_loss"]) == 31 and len(r["lin_loss"]) == 31
    assert r["sharp"][0] < r["threshold"]  # starts below the edge: L̄(0) = L(θ₀)
    assert r["cf_loss"][0] == pytest.approx(r["gd_loss"][0], rel=1e-9)
    assert r["lin_loss"][0] == pytest.approx(r["gd_loss"][0], rel=1e-9)
    assert r["sharp_steps"][0] == 0 and len(r["ss_alpha"]) == 3
    # the lagged flow: a curvature refresh every 3 substeps, a gradient alone in between
    assert r["cf_derivative_passes"] + r["cf_gradient_passes"] == 30 * 2 + 1
    assert r["cf_derivative_passes"] <= (30 * 2 + 1) // 3 + 2
    assert r["catapult_lambda0"] > 0
    assert len(outs[0].runs) == 1
    j = exp.judge(cfg, [r])
    assert len(j.verdicts) == 3 and len(j.figures) == 1
    assert {v.status for v in j.verdicts} <= {"holds", "fails", "outside", "undetermined"}


def test_sharpness_figure_overlays_a_recorded_predicted_sharpness(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from gdscope.report import plots

    x = np.arange(0, 50, 5.0)
    runs = {"gd": {"sharpness": (x, 0.9 + 0.002 * x), "threshold": (x, np.full_like(x, 1.0))}}
    colors = plots.run_colors(["gd"])
    pred = {"label": "central flow", "steps": [0, 10, 20, 49], "sharpness": [0.9, 0.95, 1.0, 1.0]}
    drawn: list[tuple[np.ndarray, np.ndarray]] = []
    real = plots._overlay_predicted_sharpness

    def spy(ax, *args):  # type: ignore[no-untyped-def]
        out = real(ax, *args)
        drawn.extend((ln.get_xdata(), ln.get_ydata()) for ln in ax.get_lines())
        return out

    monkeypatch.setattr(plots, "_overlay_predicted_sharpness", spy)
    fig = plots.sharpness_figure(runs, colors, predictions={"gd": pred})
    assert fig is not None and "Long dashes" in fig.caption and "central flow" in fig.caption
    assert any(list(xd) == pred["steps"] and list(yd) == pred["sharpness"] for xd, yd in drawn)
    plain = plots.sharpness_figure(runs, colors, predictions={"gd": {"label": "linearized model"}})
    assert plain is not None and "Long dashes" not in plain.caption
    assert "Long dashes" not in plots.sharpness_figure(runs, colors).caption  # type: ignore[union-attr]


def test_report_overlays_a_recorded_central_flow(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """End to end: a central flow recorded on a tracked run is drawn on the report's sharpness
    figure (the tracker's artifact carries ``sharpness`` at ``steps``)."""
    from torch import nn

    import gdscope as gs
    from gdscope.probes import LossProbe, SharpnessProbe, ThresholdProbe
    from gdscope.report.html import write_report
    from gdscope.store import Store

    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 3, generator=g, dtype=torch.float64)
    Y = torch.randn(12, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    prob = gs.Problem(net, "mse", (X, Y))
    flow = gs.central_flow(prob, {"class": "GD", "lr": 0.5}, 10, substeps=1)
    with Store(tmp_path / "runs.db") as store:
        tr = gs.Tracker(prob, [LossProbe(), ThresholdProbe(), SharpnessProbe(2)], store=store)
        gs.fit(prob, gs.GD(net.parameters(), lr=0.5), 10, tr)
        tr.record_prediction(flow, label="central flow")
        tr.close("completed")
        page = write_report(store, [tr.run_id], tmp_path / "report.html").read_text()
    assert "Long dashes: the sharpness predicted by the run&#x27;s recorded prediction" in page
    assert "recorded prediction (central flow)." in page
