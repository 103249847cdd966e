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
    sharpness_verdict,
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
    "loss": lambda r: loss_verdict(r, window=20, tol=0.10, onset_fraction=0.95),
    "sharpness": lambda r: sharpness_verdict(r, tol=0.05, onset_fraction=0.95, min_post_onset=5),
    "linearized": lambda r: linearized_verdict(r, window=20, factor=2.0, onset_fraction=0.95),
}


def test_window_means_and_onset() -> None:
    assert np.allclose(window_means(np.arange(7.0), 3), [1.0, 4.0])
    assert edge_onset(_result(), 0.95) == 9  # step 45: 0.7 + 0.3·45/50 = 0.97·2/η
    assert edge_onset(_result(sharp=[0.5 * THR] * 40), 0.95) is None


def test_loss_rule_holds_fails_and_reports_the_worst_window() -> None:
    v = RULES["loss"](_result())
    assert v.status == "holds", v.measured
    assert v.details["median_error"] < 0.01  # the ±20% wiggle averages out over 20 steps
    gd = np.asarray(_result()["gd_loss"])
    gd[100:110] *= 3.0  # one catapult spike: the median stays, the max reports it
    v = RULES["loss"](_result(gd_loss=list(gd)))
    assert v.status == "holds" and v.details["max_error"] > 0.5
    assert v.details["max_error_window_start"] == 100
    v = RULES["loss"](_result(gd_loss=list(gd * 1.3)))
    assert v.status == "fails" and v.details["median_error"] == pytest.approx(0.3, rel=0.05)


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


def test_edge_is_a_builtin() -> None:
    from gdscope.experiments.base import BUILTIN_MODULES

    assert "edge" in BUILTIN_MODULES


def test_smoke_end_to_end() -> None:
    """A tiny real run (seconds): the flow, the linearized model and the tracked GD run."""
    exp, cfg = resolve(
        "edge",
        ["data.n=32", "hidden=[8]", "lrs=[1.25]", "steps=30", "loss_window=10", "ss_every=10"],
    )
    assert "edge" in experiment_names()
    outs = run_tasks(exp, cfg)
    r = outs[0].result
    assert len(r["gd_loss"]) == 30 and len(r["cf_loss"]) == 31 and len(r["lin_loss"]) == 31
    assert r["sharp"][0] < r["threshold"]  # starts below the edge: L̄(0) = L(θ₀)
    assert r["cf_loss"][0] == pytest.approx(r["gd_loss"][0], rel=1e-9)
    assert r["lin_loss"][0] == pytest.approx(r["gd_loss"][0], rel=1e-9)
    assert r["sharp_steps"][0] == 0 and len(r["ss_alpha"]) == 3
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
