"""``gdscope demo``: full-batch GD on scikit-learn's digits at several learning rates.

An MLP (64-128-128-10, tanh, MSE on one-hot labels, PyTorch's ``mse_loss`` convention) is trained
from one initialization at each learning rate while the tracker measures loss, accuracy,
gradient norm, distance from initialization, sharpness against ``2/η`` and the Hessian trace.
The low rate stays below its threshold; the high ones reach the edge of stability, where
sharpness rises to ``2/η`` and hovers there while the loss keeps falling.

Each run also carries its NTK certificate (THEORY §1): ``λ_min(K₀)`` of the empirical NTK at
initialization on the whole training set (``n·k × n·k``), the linear rate it guarantees in the
kernel regime, the loss curve the linearized model predicts (:func:`gdscope.predict`), and the
rate measured on the run; and, at its end, the stability of the point reached
(:func:`gdscope.stability`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gdscope.errors import InvalidArgumentError
from gdscope.kernels import ntk
from gdscope.probes import (
    AccuracyProbe,
    DistanceProbe,
    GradNormProbe,
    HessianTraceProbe,
    LossProbe,
    SharpnessProbe,
    ThresholdProbe,
)
from gdscope.problem import Problem
from gdscope.report import Verdict, summarize_run, write_report
from gdscope.store import Store, check_output
from gdscope.theory import Prediction, fit_rates, predict, stability
from gdscope.tracker import Tracker
from gdscope.train import GD, fit
from gdscope.zoo import digits, mlp

__all__ = ["DemoConfig", "DemoResult", "InitialKernel", "ntk_certificate", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains. The defaults finish in well under a minute on 2 CPU cores."""

    lrs: Sequence[float] = (0.25, 1.0, 2.0)
    steps: int = 2000
    samples: int = 256
    width: int = 128
    sharpness_every: int = 20
    trace_every: int = 250
    seed: int = 0
    stability: bool = True


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote its store and report, and each run's verdicts."""

    store_path: Path
    report_path: Path
    runs: dict[str, list[Verdict]]


def run_demo(
    out: str | Path,
    config: DemoConfig = DemoConfig(),
    progress: bool = False,
    on_run: Callable[[str], None] | None = None,
) -> DemoResult:
    """Train one run per learning rate, write ``runs.db`` and ``report.html`` under ``out``.

    ``out`` is a folder (created if needed). Before anything trains, ``out/report.html`` is
    checked: it may be new or a page gdscope wrote, never the store or another file.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InvalidArgumentError(
            f"out={str(out)!r} is a file, not a folder: pass a folder (new or existing) for "
            "runs.db and report.html, e.g. --out demo_out."
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgumentError(
            f"out={str(out)!r}: cannot create the folder ({e}); pass a writable path."
        ) from e
    store_path = out / "runs.db"
    check_output(out / "report.html", "html", protect=[store_path], arg="out")
    X, Y = digits(config.samples, seed=config.seed)
    sizes = [X.shape[1], config.width, config.width, Y.shape[1]]
    kernel = _initial_kernel(mlp(sizes, "tanh", seed=config.seed), X, Y)
    verdicts: dict[str, list[Verdict]] = {}
    run_ids: list[int] = []
    with Store(store_path) as store:
        for lr in config.lrs:
            name = f"demo-gd-lr{lr:g}"
            if on_run is not None:
                on_run(name)
            model = mlp(sizes, "tanh", seed=config.seed)
            prob = Problem(model, "mse", (X, Y))
            probes = [
                LossProbe(),
                AccuracyProbe(),
                GradNormProbe(),
                DistanceProbe(),
                ThresholdProbe(),
                SharpnessProbe(config.sharpness_every),
                HessianTraceProbe(config.trace_every),
            ]
            run_config = {
                "experiment": "demo",
                "model": f"mlp {sizes} tanh",
                "loss": "mse (mean)",
                "data": f"digits n={config.samples}",
                "lr": lr,
                "steps": config.steps,
            }
            tracker = Tracker(prob, probes, store=store, run_name=name, config=run_config)
            prediction = predict(
                kernel.K,
                {"class": "GD", "lr": lr},
                config.steps,
                f0=kernel.f0,
                y=kernel.y,
                loss="mse",
            )
            result = fit(
                prob,
                GD(model.parameters(), lr=lr),
                config.steps,
                tracker,
                on_nonfinite="stop",
                progress=progress,
                description=name,
            )
            tracker.record_prediction(prediction)
            if not result.diverged:
                summary: dict[str, Any] = {
                    "verdicts": [
                        v.to_dict() for v in ntk_certificate(prediction, lr, result.losses)
                    ]
                }
                if config.stability:
                    summary["stability"] = _stability_summary(prob, lr)
                tracker.close("completed", summary)
            assert tracker.run_id is not None
            run_ids.append(tracker.run_id)
            verdicts[name] = summarize_run(store, tracker.run_id)
        report_path = write_report(
            store, run_ids, out / "report.html", title="gdscope demo: full-batch GD on digits"
        )
    return DemoResult(store_path, Path(report_path), verdicts)


#: Points the rate fit needs in its window (the last half of the curve).
MIN_FIT_POINTS = 5


@dataclass(frozen=True)
class InitialKernel:
    """The empirical NTK at initialization, ``K`` ``(n·k, n·k)`` float64 sample-major, with the
    initial outputs ``f0`` and targets ``y`` (``(n, k)``)."""

    K: np.ndarray
    f0: np.ndarray
    y: np.ndarray


def _initial_kernel(model: nn.Module, X: Tensor, Y: Tensor) -> InitialKernel:
    model = model.double()
    Xd = X.double()
    K = ntk(model, Xd).permute(0, 2, 1, 3).reshape(Y.numel(), Y.numel()).numpy()
    with torch.no_grad():
        f0 = model(Xd).numpy()
    return InitialKernel(K, f0, Y.double().numpy())


def ntk_certificate(prediction: Prediction, lr: float, losses: Sequence[float]) -> list[Verdict]:
    """Verdicts of the NTK certificate for MSE (THEORY §1) on a measured loss curve.

    In the kernel regime the residual contracts by ``max_i |1 − ηqλ_i(K₀)|`` per step, which is
    ``1 − ηqλ_min`` while ``η ≤ 2/(q(λ_min + λ_max))``: the loss falls at least as fast as
    ``(1 − ηqλ_min)^{2t}``. The measured loss factor per step (fitted on the last half of the
    curve, with a 95% interval) should be at most that. The second verdict asks whether the
    linearized model's whole loss curve matches the run (within a factor 2 at every step).
    """
    q = prediction.q
    assert q is not None
    lam_min, lam_max = float(prediction.eigenvalues[0]), float(prediction.eigenvalues[-1])
    a_min, a_max = lr * q * lam_min, lr * q * lam_max
    predicted_rate = max(abs(1 - a_min), abs(1 - a_max)) ** 2
    claim = "NTK certificate: λ_min(K₀) > 0 gives linear convergence at rate ≥ its prediction"
    predicted = (
        f"λ_min(K₀) = {lam_min:.4g}, λ_max = {lam_max:.4g}, q = {q:.3g}: loss "
        f"factor per step ≤ max|1 − ηqλ|² = {predicted_rate:.7g}"
    )
    measured_curve = np.asarray(losses, dtype=np.float64)
    details: dict[str, Any] = {
        "lambda_min": lam_min,
        "lambda_max": lam_max,
        "q": q,
        "eta_q_lambda_max": a_max,
        "predicted_loss_factor": predicted_rate,
    }
    if a_max >= 2:
        verdicts = [
            Verdict(
                claim,
                f"ηqλ_max = {a_max:.3g} ≥ 2: the linearized model diverges",
                "no certificate at this step size",
                None,
                details,
            )
        ]
    elif np.count_nonzero(np.isfinite(measured_curve) & (measured_curve > 0)) < 2 * MIN_FIT_POINTS:
        verdicts = [
            Verdict(claim, predicted, f"only {measured_curve.size} loss values", None, details)
        ]
    else:
        fit = fit_rates(
            measured_curve[np.isfinite(measured_curve) & (measured_curve > 0)], tail=0.5
        )
        lo, hi = fit.exponential_rate_ci
        details |= {"measured_loss_factor": fit.exponential_rate, "ci": [lo, hi]}
        holds = True if hi <= predicted_rate else (False if lo > predicted_rate else None)
        verdicts = [
            Verdict(
                claim,
                predicted,
                f"loss factor {fit.exponential_rate:.7g}/step (95% CI {lo:.7g}–{hi:.7g}) over "
                f"steps {fit.window[0]:g}–{fit.window[1]:g}",
                holds,
                details,
            )
        ]
    steps = min(len(measured_curve), prediction.loss.size)
    ratio = measured_curve[:steps] / prediction.loss[:steps]
    finite = np.isfinite(ratio) & (ratio > 0)
    worst = float(np.max(np.abs(np.log(ratio[finite])))) if finite.any() else math.inf
    verdicts.append(
        Verdict(
            "the linearized (NTK) model predicts the loss curve (kernel regime)",
            f"L_T = {prediction.loss[steps - 1]:.4g} at step {steps - 1} (linearized model)",
            f"L_T = {measured_curve[steps - 1]:.4g}; measured/predicted within "
            f"[{math.exp(-worst):.3g}, {math.exp(worst):.3g}] over the run",
            bool(worst <= math.log(2)),
            "holds when measured and predicted losses agree within a factor 2 at every step; a "
            "run that trains faster than its linearization learns features (leaves the kernel "
            "regime)",
        )
    )
    return verdicts


def _stability_summary(prob: Problem, lr: float) -> dict[str, Any]:
    """:func:`gdscope.stability` at the end of a run (full batch), as plain data.

    The demo's runs end where training stopped, not at a minimum: the warning saying so goes
    into the summary's notes instead of the console.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = stability(prob, lr)
    notes = [*rep.notes, *(str(w.message) for w in caught)]
    return rep.to_dict() | {"notes": notes}
