"""``gdscope demo``: full-batch GD on scikit-learn's digits at several learning rates.

An MLP (64-128-128-10, tanh, MSE on one-hot labels, PyTorch's ``mse_loss`` convention) is trained
from one initialization at each learning rate while the tracker measures loss, accuracy,
gradient norm, distance from initialization, sharpness against ``2/η`` and the Hessian trace.
The low rate stays below its threshold; the high ones reach the edge of stability, where
sharpness rises to ``2/η`` and hovers there while the loss keeps falling.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

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
from gdscope.store import Store
from gdscope.tracker import Tracker
from gdscope.train import GD, fit
from gdscope.zoo import digits, mlp

__all__ = ["DemoConfig", "DemoResult", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains. The defaults finish in well under a minute on 2 CPU cores."""

    lrs: Sequence[float] = (0.25, 1.0, 2.0)
    steps: int = 2000
    samples: int = 512
    width: int = 128
    sharpness_every: int = 20
    trace_every: int = 250
    seed: int = 0


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
    """Train one run per learning rate, write ``runs.db`` and ``report.html`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    X, Y = digits(config.samples, seed=config.seed)
    sizes = [X.shape[1], config.width, config.width, Y.shape[1]]
    store_path = out / "runs.db"
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
            result = fit(
                prob,
                GD(model.parameters(), lr=lr),
                config.steps,
                tracker,
                on_nonfinite="stop",
                progress=progress,
                description=name,
            )
            if not result.diverged:
                tracker.close("completed")
            assert tracker.run_id is not None
            run_ids.append(tracker.run_id)
            verdicts[name] = summarize_run(store, tracker.run_id)
        report_path = write_report(
            store, run_ids, out / "report.html", title="gdscope demo: full-batch GD on digits"
        )
    return DemoResult(store_path, Path(report_path), verdicts)
