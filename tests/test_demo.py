"""The demo: its verdicts against exact cases (a model linear in its parameters, synthetic
sharpness series) and the whole story at a small size."""

from __future__ import annotations

import json
import re
from importlib import resources

import numpy as np
import pytest
import torch
from torch import nn

import gdscope as gs
from gdscope.demo import (
    SUMMARY,
    DemoConfig,
    _control_verdict,
    _drift,
    _eos_verdict,
    _initial_kernel,
    linearization_verdict,
    ntk_certificate,
    run_demo,
)
from gdscope.errors import InvalidArgumentError
from gdscope.store import Store
from gdscope.zoo import digits


def _linear_run(lr: float, steps: int):
    X, Y = digits(40, seed=1, dtype=torch.float64)
    model = nn.Linear(64, 10).double()
    torch.manual_seed(0)
    kernel = _initial_kernel(model, X, Y)
    pred = gs.predict(
        kernel.K, {"class": "GD", "lr": lr}, steps, f0=kernel.f0, y=kernel.y, loss="mse"
    )
    prob = gs.Problem(model, "mse", (X, Y))
    result = gs.fit(prob, gs.GD(model.parameters(), lr=lr), steps)
    return pred, np.asarray(result.losses), _drift(model, kernel, X)


def test_linear_model_is_its_own_linearization():
    pred, losses, drift = _linear_run(lr=0.5, steps=200)
    assert drift < 1e-12  # the kernel of a linear model never moves
    # the curves agree to rounding: the linearization holds, the certificate bound holds
    np.testing.assert_allclose(losses, pred.loss[:200], rtol=1e-9)
    regime = linearization_verdict(pred, losses, drift, 0.1, what="linear model")
    assert regime.status == "holds" and "[1, 1]" in regime.measured
    assert regime.section == "2-optimizer-dynamics-in-the-kernel-regime" and regime.theorem
    rate = ntk_certificate(pred, 0.5, losses)
    assert rate.status in ("holds", "undetermined") and rate.section == "1-kernel-certificates"
    d = rate.details
    assert d["measured_loss_factor"] <= d["guaranteed_loss_factor"] + 1e-9
    assert d["linearized_loss_factor"] == pytest.approx(d["measured_loss_factor"], rel=1e-6)


def test_slow_curve_fails_both_claims_when_the_kernel_stays():
    pred, losses, drift = _linear_run(lr=0.5, steps=200)
    slow = losses[0] * (1 - 1e-7) ** np.arange(200)  # slower than the certified factor
    assert ntk_certificate(pred, 0.5, slow).status == "fails"
    assert linearization_verdict(pred, slow, drift, 0.0, what="m").status == "fails"


def test_moving_kernel_is_outside_not_a_failure():
    pred, losses, _ = _linear_run(lr=0.5, steps=200)
    slow = losses[0] * (1 - 1e-7) ** np.arange(200)
    v = linearization_verdict(pred, slow, 0.4, 0.3, what="standard net", drift_max=0.1)
    assert v.status == "outside" and v.holds is None
    assert "relative kernel drift 0.4" in v.assumption and "K_t ≈ K₀" in v.assumption


def test_certificate_outside_when_linear_model_diverges_and_undetermined_when_short():
    pred, losses, _ = _linear_run(lr=0.5, steps=200)
    big = 2.5 / (pred.q * pred.eigenvalues[-1])
    v = ntk_certificate(pred, big, losses)
    assert v.status == "outside" and "diverges" in v.assumption
    assert ntk_certificate(pred, 0.5, losses[:4]).status == "undetermined"


def _series(ratios, lr, every=10):
    x = np.arange(len(ratios)) * every
    return x, np.asarray(ratios, float) * 2.0 / lr


def test_edge_of_stability_rule_on_synthetic_series():
    cfg = DemoConfig()
    hover = [0.3, 0.6, 0.9, 0.97, 1.02, 1.01, 1.03, 1.0, 1.02]
    assert _eos_verdict(cfg, 1.0, _series(hover, 1.0), 0.3).status == "holds"
    high = [0.3, 0.6, 0.96, 1.3, 1.4, 1.3, 1.35, 1.3]
    assert _eos_verdict(cfg, 1.0, _series(high, 1.0), 0.3).status == "fails"
    never = [0.3, 0.5, 0.6, 0.7]
    v = _eos_verdict(cfg, 1.0, _series(never, 1.0), 0.3)
    assert v.status == "outside" and "reach the threshold" in v.assumption
    assert _eos_verdict(cfg, 1.0, _series([0.3, 0.97, 1.0], 1.0), 0.3).status == "undetermined"
    assert _eos_verdict(cfg, 1.0, _series([1.2, 1.0, 1.0], 1.0), 0.3).status == "outside"


def test_control_rule_on_synthetic_series():
    below = _control_verdict(0.25, _series([0.1, 0.2, 0.3], 0.25), 0.6)
    assert below.status == "holds" and below.section.startswith("3-")
    assert _control_verdict(0.25, _series([0.1, 0.5, 1.01], 0.25), 0.6).status == "fails"


def test_config_is_validated():
    with pytest.raises(InvalidArgumentError, match="lrs"):
        DemoConfig(lrs=(0.5,))
    with pytest.raises(InvalidArgumentError, match="samples"):
        DemoConfig(samples=4)
    full = DemoConfig.full()
    assert full.steps > DemoConfig().steps and full.kernel_steps > DemoConfig().kernel_steps


#: A small demo (a few seconds) that still tells the whole story.
SMALL = DemoConfig(
    samples=64,
    kernel_width=1024,
    kernel_steps=100,
    width=64,
    lrs=(0.25, 1.5, 2.5),
    steps=300,
    sharpness_every=10,
)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    phases: list[str] = []

    def phase(description):
        phases.append(description)
        from contextlib import nullcontext

        return nullcontext()

    return run_demo(out, SMALL, phase=phase), phases


def test_demo_tells_the_story(small_demo):
    result, phases = small_demo
    parts = list(result.verdicts)
    assert [p.split(" · ")[0] for p in parts] == ["1", "2", "3"]
    certificate, kernel = result.verdicts[parts[0]]
    assert certificate.status == "holds" and "bound" in certificate.claim
    assert "faster in log-rate" in certificate.measured  # how loose the bound is, said
    assert kernel.status == "holds" and "NTK-parameterized" in kernel.claim
    assert kernel.details["kernel_drift"] < SMALL.drift_max
    (contrast,) = result.verdicts[parts[1]]
    assert contrast.status == "outside" and "standard net" in contrast.claim
    assert "kernel drift" in contrast.assumption and contrast.details["kernel_drift"] > 0.1
    control, eos1, eos2, minima = result.verdicts[parts[2]]
    assert control.status == "holds" and "stays below 2/η" in control.claim
    assert eos1.status == "holds" and eos2.status == "holds"
    assert "η = 1.5" in eos1.claim and "η = 2.5" in eos2.claim
    assert minima.status == "outside" and "round-off floor" in minima.assumption
    statuses = [v.status for v in result.all_verdicts]
    assert "fails" not in statuses and "undetermined" not in statuses
    theory = resources.files("gdscope.report").joinpath("theory.md").read_text()
    anchors = {
        re.sub(r"[^\w\- ]", "", h.lower()).strip().replace(" ", "-")
        for h in re.findall(r"^## (.+)$", theory, flags=re.M)
    }
    for v in result.all_verdicts:
        assert v.theorem and v.reason and v.section in anchors, v.claim
    assert any("K₀" in p for p in phases) and any("report" in p for p in phases)


def test_demo_page_and_store(small_demo):
    result, _ = small_demo
    html = result.report_path.read_text()
    statuses = re.findall(r"data-status='(\w+)'", html)
    assert statuses and "fails" not in statuses and "undetermined" not in statuses
    assert statuses.count("outside") == 2
    assert "data-name='kernel-regime'" in html and html.count("data-name='sharpness'") == 1
    assert SUMMARY in html and "divided by each run&#x27;s own stability threshold" in html
    with Store(result.store_path, readonly=True) as store:
        (exp,) = store.experiments()
        assert exp.name == "demo" and len(exp.run_ids) == 4
        assert [v["status"] for v in exp.verdicts] == [v.status for v in result.all_verdicts]
        names = [store.run(r).name for r in exp.run_ids]
        assert names[0].startswith("demo-ntk-m") and names[1:] == [
            "demo-gd-lr0.25",
            "demo-gd-lr1.5",
            "demo-gd-lr2.5",
        ]
        for r in exp.run_ids:
            info = store.run(r)
            assert info.status == "completed"
            assert info.environment["thread_choice"] == result.threads.to_dict()
            assert info.summary["verdicts"]
        assert json.dumps(exp.results["threads"]) == json.dumps(result.threads.to_dict())
    assert result.threads.threads == 1 and torch.get_num_threads() >= 1


def test_demo_overlays_the_central_flow(small_demo):
    """The edge-of-stability runs carry the central flow (tracker.record_prediction: loss,
    sharpness, threshold, onset) and the page draws it; the control keeps the linearized
    model. The flow starts where GD starts, and reaches the edge."""
    result, _ = small_demo
    html = result.report_path.read_text()
    assert "data-name='central-flow'" in html and "recorded prediction (central flow)" in html
    with Store(result.store_path, readonly=True) as store:
        (exp,) = store.experiments()
        runs = {store.run(r).name: r for r in exp.run_ids}
        for lr in SMALL.lrs:
            name = f"demo-gd-lr{lr:g}"
            pred = json.loads(store.artifact(runs[name], "prediction"))
            if lr == SMALL.lrs[0]:
                assert pred["kind"] == "linearized"
                continue
            assert pred["kind"] == "central flow" and pred["label"] == "central flow"
            assert pred["threshold"] == pytest.approx(2 / lr)
            onset = pred["onset_step"]
            assert onset is not None and pred["steps"][-1] <= onset + SMALL.flow_edge_steps
            assert len(pred["sharpness"]) == len(pred["steps"]) == len(pred["loss"])
            pairs = zip(pred["steps"], pred["sharpness"], strict=True)
            at_edge = [s for t, s in pairs if t > onset + 30]
            assert at_edge and max(abs(s * lr / 2 - 1) for s in at_edge) < 0.1
            _, loss = store.series(runs[name], "loss")
            assert pred["loss"][0] == pytest.approx(float(loss[0]), rel=1e-4)
            summary = exp.results["runs"][name]["central_flow"]
            assert summary["steps"] == pred["steps"][-1] and summary["onset_step"] == onset
            assert summary["loss_status"] in ("holds", "fails", "undetermined", "outside")
            assert summary["third_products"] > 0 and summary["cpu_seconds"] > 0
