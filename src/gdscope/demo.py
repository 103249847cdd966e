"""``gdscope demo``: the theory working on digits, then its edge, in about a minute on 2 CPUs.

Three parts, on ``samples`` digits (MSE on one-hot labels, PyTorch's ``mse_loss``):

1. **Kernel regime.** A wide one-hidden-layer net in NTK parameterization (``64-m-10``, tanh,
   :func:`gdscope.zoo.mlp` with ``parameterization="ntk"``). Its empirical NTK ``K₀`` at
   initialization (``n·k × n·k``, float64) has ``λ_min(K₀) > 0``; GD at ``η = 1/(qλ_max(K₀))``
   follows the loss curve the linearized model predicts (:func:`gdscope.predict`,
   docs/theory.md §2) while the kernel barely moves (relative drift ``‖K_T − K₀‖/‖K₀‖``).
   The NTK certificate (§1) is shown as what it is: a bound on the loss factor per step, with how
   loose it is against the measured factor.
2. **Feature learning, the contrast.** The same data on a standard-parameterization net
   (``64-128-128-10``, tanh, PyTorch's initialization) at the control step size: its kernel
   drifts by tens of percent, so the linearization's premise ``K_t ≈ K₀`` is not met and the
   prediction parts from the measurement. The verdict is *outside the theorem's assumptions*,
   with the measured drift: a contrast, not a failure.
3. **Edge of stability.** The standard net under full-batch GD at the step sizes ``lrs``: at the
   two larger ones the sharpness rises to ``2/η`` and hovers there (Cohen et al., §3, §5); at the
   control (the smallest) ``2/η`` is far above the sharpness and it stays below. None of the runs
   ends at a minimum (their gradient is far from the round-off floor), so statements about
   minima are reported as outside their assumptions with the measured gradient, not run. Beside
   the two edge-of-stability runs the page draws the central flow (:func:`gdscope.central_flow`,
   recorded on each run with ``Tracker.record_prediction``): its sharpness and time-averaged
   loss, integrated before training from the same initialization up to ``flow_edge_steps``
   steps past its onset with the cheap settings of :data:`FLOW_SETTINGS` (about 5 s CPU per
   run), and how close GD came by the ``edge`` experiment's rules (measured, not judged).

Everything is stored in ``out/runs.db`` as one experiment named ``demo`` (its verdicts, figures
and runs) and written to ``out/report.html`` (:func:`gdscope.report.write_experiment_report`).
Torch's thread count is chosen from the CPUs actually free (:mod:`gdscope.threads`; the demo's
models are small, so one thread) and recorded with every run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
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
    LossProbe,
    SharpnessProbe,
    ThresholdProbe,
)
from gdscope.problem import Problem
from gdscope.report import plots, write_experiment_report
from gdscope.store import Store, check_output
from gdscope.theory import CentralFlowPrediction, Prediction, central_flow, fit_rates, predict
from gdscope.threads import ThreadChoice, apply_threads, choose_threads, reset_threads
from gdscope.tracker import Tracker
from gdscope.train import GD, fit
from gdscope.verdict import Verdict, hover, hover_rule
from gdscope.zoo import digits, mlp

__all__ = [
    "DEMO_THREAD_CAP",
    "DemoConfig",
    "DemoResult",
    "FLOW_SETTINGS",
    "InitialKernel",
    "choose_demo_threads",
    "flow_agreement",
    "linearization_verdict",
    "ntk_certificate",
    "run_demo",
]

#: The most threads the demo's models gain from. bench/bench_demo.py --quick on 2 cores shared
#: with other jobs: 11 s with one thread against 27 s with two, and 23 s against 65 s with a
#: core kept busy (bench/results/demo_2026-12-03_quick.json).
DEMO_THREAD_CAP = 1

SEC_KERNEL = "1-kernel-certificates"
SEC_DYNAMICS = "2-optimizer-dynamics-in-the-kernel-regime"
SEC_CURVATURE = "3-curvature-stability-of-minima-and-the-gd-map"
SEC_REFERENCE = "5-reference-measurements"
SEC_VERDICT = "8-from-a-theorem-to-a-verdict"

_LINEARIZATION_THEOREM = (
    "Linearized GD (docs/theory.md §1, §2; Lee et al. 2019): while the empirical NTK stays at its "
    "initial value, K_t ≈ K₀, the network's outputs follow f_{t+1} = f_t − ηK₀∇_f L, so its "
    "loss curve is the one gs.predict computes from K₀ before training. At one finite width the "
    "premise is measured, not assumed: relative kernel drift ‖K_T − K₀‖_F/‖K₀‖_F at most "
    "drift_max; then the curves must agree within the stated factor at every step."
)
_CERTIFICATE_THEOREM = (
    "NTK certificate (§1): in the kernel regime each eigenmode of the residual shrinks by "
    "|1 − ηqλ_i(K₀)| per step, so λ_min(K₀) > 0 guarantees a linear rate: the loss factor per "
    "step is at most max_i |1 − ηqλ_i|². A bound is judged as a bound (§8): it holds when the "
    "upper end of the measured factor's 95% interval is at most the guaranteed one. How loose it "
    "is (the ratio of the measured to the guaranteed log-rate) is reported, not judged: the "
    "slowest mode carries little of the residual."
)
_EOS_THEOREM = (
    "Edge of stability (Cohen et al. 2021; §3, §5): under full-batch GD from a point below the "
    "threshold the sharpness rises to about 2/η and hovers there while the loss keeps falling. "
    "An empirical law, judged like gdscope run stability: the median sharpness after the first "
    "measurement at onset_fraction·2/η must lie in eos_band·2/η. A run that never reaches the "
    "threshold in the steps run, or starts above it, is outside the claim."
)
_CONTROL_THEOREM = (
    "GD's stability threshold (§3): GD with sharpness above 2/η is linearly unstable along the "
    "top eigenvector, so sharpness can only reach 2/η by rising to it (progressive sharpening) "
    "and then hovers there. At the control step size 2/η is many times the initial sharpness "
    "qλ_max(K₀), and the run is predicted to stay below it: holds when every sharpness "
    "measurement is below 2/η, fails when one reaches it."
)
_MINIMA_THEOREM = (
    "Linear stability of GD at a minimum (§3): GD can only converge to minima whose normal "
    "Hessian eigenvalues satisfy 0 < h < 2/η. A statement about minima is judged at a minimum "
    "(§8): the gradient at the round-off floor, ‖∇L‖/(h_max‖θ‖) ≤ 10·eps of the dtype."
)


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains. The defaults finish in about a minute on 2 CPU cores;
    :meth:`full` is the longer version.

    ``kernel_width``/``kernel_steps``: the NTK-parameterized net ``64-m-10`` and its GD steps
    (at ``η = 1/(qλ_max(K₀))``). ``width``/``lrs``/``steps``: the standard net
    ``64-w-w-10`` and its full-batch GD runs; ``lrs[0]`` is the control (predicted to stay below
    ``2/η``), the others are predicted to reach the edge of stability. ``agreement``: the factor
    within which the linearized and measured losses must agree at every step; ``drift_max``: the
    relative kernel drift up to which ``K_t ≈ K₀`` counts as met. ``flow_edge_steps``: the
    central flow of each edge-of-stability run is integrated from the start until this many
    steps after it reaches the edge (at most ``steps``; 0: none); ``flow_refresh``: GD steps
    between its curvature refreshes (:data:`FLOW_SETTINGS`).
    """

    samples: int = 256
    seed: int = 0
    kernel_width: int = 2048
    kernel_steps: int = 300
    width: int = 128
    lrs: Sequence[float] = (0.25, 1.0, 2.0)
    steps: int = 1000
    sharpness_every: int = 20
    agreement: float = 1.1
    drift_max: float = 0.1
    onset_fraction: float = 0.95
    eos_band: tuple[float, float] = (0.95, 1.15)
    min_post_onset: int = 5
    flow_edge_steps: int = 150
    flow_refresh: int = 20

    @classmethod
    def full(cls) -> DemoConfig:
        """The longer version: 2000 GD steps per step size, 1000 in the kernel regime."""
        return cls(steps=2000, kernel_steps=1000)

    def __post_init__(self) -> None:
        for name in ("samples", "kernel_width", "kernel_steps", "width", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidArgumentError(f"{name}={value!r} must be an integer >= 1.")
        if not 8 <= self.samples <= 1797:
            raise InvalidArgumentError(
                f"samples={self.samples} must lie in [8, 1797] (the digits data set)."
            )
        lrs = list(self.lrs)
        if len(lrs) < 2 or any(
            isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 for lr in lrs
        ):
            raise InvalidArgumentError(
                f"lrs={self.lrs!r} must list at least two positive step sizes: the control "
                "first, then those predicted to reach the edge of stability."
            )
        for name in ("flow_edge_steps", "flow_refresh"):
            value = getattr(self, name)
            low = 0 if name == "flow_edge_steps" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidArgumentError(f"{name}={value!r} must be an integer >= {low}.")
        if not self.agreement > 1 or not self.drift_max > 0:
            raise InvalidArgumentError(
                f"agreement={self.agreement!r} must be > 1 and drift_max={self.drift_max!r} > 0."
            )


@dataclass(frozen=True)
class DemoResult:
    """Where the demo wrote its store and page, the stored experiment's id, each part's
    verdicts (label → verdicts, in page order), the thread choice and the seconds taken."""

    store_path: Path
    report_path: Path
    experiment_id: int
    verdicts: dict[str, list[Verdict]]
    threads: ThreadChoice
    seconds: float

    @property
    def all_verdicts(self) -> list[Verdict]:
        return [v for vs in self.verdicts.values() for v in vs]


#: A phase of the demo that takes more than a second: ``phase(description)`` is a context
#: manager around it (the CLI shows a spinner with the elapsed time).
Phase = Callable[[str], AbstractContextManager[Any]]


#: The demo page's title and the one line under it.
TITLE = "gdscope demo: the kernel regime, feature learning and the edge of stability on digits"
SUMMARY = (
    "a wide NTK-parameterized net trains as its linearization predicts; a standard net learns "
    "features instead; full-batch GD drives the sharpness to 2/η and holds it there"
)


def choose_demo_threads() -> ThreadChoice:
    """The demo's thread choice: the CPUs free here, at most :data:`DEMO_THREAD_CAP`."""
    return choose_threads(cap=DEMO_THREAD_CAP)


def run_demo(
    out: str | Path,
    config: DemoConfig = DemoConfig(),
    *,
    progress: bool = False,
    phase: Phase | None = None,
    threads: ThreadChoice | None = None,
) -> DemoResult:
    """Run the demo (module docstring); write ``runs.db`` and ``report.html`` under ``out``.

    ``out`` is a folder (created if needed). Before anything trains, ``out/report.html`` is
    checked (it may be new or a page gdscope wrote, never the store or another file) and the
    store is opened. ``threads``: the thread choice to apply (default
    :func:`choose_demo_threads`); the previous thread count is restored on return.
    ``progress`` shows training progress bars; ``phase`` wraps every other step that takes
    more than a second.
    """
    t0 = time.perf_counter()
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
    step = phase or (lambda description: nullcontext())
    choice = apply_threads(threads if threads is not None else choose_demo_threads())
    try:
        with Store(store_path) as store:
            demo = _Demo(config, step, progress)
            verdicts = demo.run()
            with step("storing the runs and writing the report"):
                exp_id = demo.save(store, choice, time.perf_counter() - t0)
                report = write_experiment_report(
                    store,
                    exp_id,
                    out / "report.html",
                    title=TITLE,
                )
    finally:
        reset_threads()
    return DemoResult(store_path, Path(report), exp_id, verdicts, choice, time.perf_counter() - t0)


# ------------------------------------------------------------------------------ the runs
@dataclass
class _Run:
    """One tracked run: its name, step size, losses, prediction and measured figures."""

    name: str
    lr: float
    tracker: Tracker
    losses: np.ndarray
    prediction: Prediction | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def run_id(self) -> int:
        assert self.tracker.run_id is not None
        return self.tracker.run_id


class _Demo:
    def __init__(self, cfg: DemoConfig, phase: Phase, progress: bool) -> None:
        self.cfg, self.phase, self.progress = cfg, phase, progress
        self.mem = Store(":memory:")
        self.X, self.Y = digits(cfg.samples, seed=cfg.seed)
        self.nk = self.Y.numel()
        self.q = 2.0 / self.nk  # PyTorch's mse_loss, mean over n·k
        self.runs: list[_Run] = []

    # ------------------------------------------------------------------ the three parts
    def run(self) -> dict[str, list[Verdict]]:
        cfg = self.cfg
        m, w = cfg.kernel_width, cfg.width
        out: dict[str, list[Verdict]] = {}

        # 1. kernel regime: the wide NTK-parameterized net
        sizes = [self.X.shape[1], m, self.Y.shape[1]]
        net = mlp(sizes, "tanh", seed=cfg.seed, parameterization="ntk")
        with self.phase(f"NTK of the wide net at init: K₀ {self.nk}×{self.nk} (float64)"):
            k0 = _initial_kernel(net, self.X, self.Y)
        with self.phase("eigendecomposition of K₀ and the linearized prediction"):
            lam_max = float(_eigenvalues(k0)[-1])
            lr = float(f"{1.0 / (self.q * lam_max):.3g}")
            pred = predict(
                k0.K, {"class": "GD", "lr": lr}, cfg.kernel_steps, f0=k0.f0, y=k0.y, loss="mse"
            )
        label = f"demo-ntk-m{m}"
        run = self._train(
            label,
            net,
            lr,
            cfg.kernel_steps,
            pred,
            probes=[LossProbe(), GradNormProbe(), DistanceProbe(per_layer=False)],
            config={"model": f"mlp {sizes} tanh, NTK parameterization", "lr_rule": "1/(qλ_max)"},
        )
        with self.phase(f"NTK of the wide net after training: K_T {self.nk}×{self.nk}"):
            drift = _drift(net, k0, self.X)
        dist = self._last(run, "dist_init_rel")
        run.figures |= {"kernel_drift": drift, "distance_rel": dist}
        run.verdicts = ntk_rows = [
            ntk_certificate(pred, lr, run.losses),
            linearization_verdict(
                pred,
                run.losses,
                drift,
                dist,
                what=f"wide NTK-parameterized net 64-{m}-10 at η = {lr:g}",
                agreement=cfg.agreement,
                drift_max=cfg.drift_max,
            ),
        ]
        out[f"1 · kernel regime: {label}"] = ntk_rows

        # 2 and 3: the standard net at each step size
        sizes = [self.X.shape[1], w, w, self.Y.shape[1]]
        std0 = mlp(sizes, "tanh", seed=cfg.seed)
        with self.phase(f"NTK of the standard net at init: K₀ {self.nk}×{self.nk} (float64)"):
            ks = _initial_kernel(std0, self.X, self.Y)
        with self.phase("eigendecomposition of the standard net's K₀"):
            sharp0 = self.q * float(_eigenvalues(ks)[-1])
        control = cfg.lrs[0]
        std_runs = []
        for lr in cfg.lrs:
            model = mlp(sizes, "tanh", seed=cfg.seed)
            spred: Prediction | None = None
            flow_cpu = math.nan
            if lr != control and cfg.flow_edge_steps:
                with self.phase(
                    f"central flow of the standard net at η = {lr:g} (to {cfg.flow_edge_steps} "
                    "steps past the edge)"
                ):
                    spred, flow_cpu = _flow(std0, self.X, self.Y, lr, cfg)
            if lr == control:
                with self.phase(f"linearized prediction of the standard net at η = {lr:g}"):
                    spred = predict(
                        ks.K, {"class": "GD", "lr": lr}, cfg.steps, f0=ks.f0, y=ks.y, loss="mse"
                    )
            run = self._train(
                f"demo-gd-lr{lr:g}",
                model,
                lr,
                cfg.steps,
                spred,
                probes=[
                    LossProbe(),
                    AccuracyProbe(),
                    GradNormProbe(),
                    DistanceProbe(per_layer=False),
                    ThresholdProbe(),
                    SharpnessProbe(cfg.sharpness_every),
                ],
                config={"model": f"mlp {sizes} tanh, standard parameterization"},
                label="linearized model" if lr == control else "central flow",
            )
            run.figures |= _end_point(model, self.X, self.Y, self.mem, run.run_id)
            if isinstance(spred, CentralFlowPrediction):
                sharp = self.mem.series(run.run_id, "sharpness")
                run.figures["central_flow"] = flow_agreement(
                    spred, run.losses, sharp, cfg, flow_cpu
                )
            if spred is not None and lr == control:
                with self.phase(f"NTK of the standard net after training: K_T at η = {lr:g}"):
                    drift = _drift(model, ks, self.X)
                dist = self._last(run, "dist_init_rel")
                run.figures |= {"kernel_drift": drift, "distance_rel": dist}
                run.verdicts = out[f"2 · feature learning, the contrast: demo-gd-lr{lr:g}"] = [
                    linearization_verdict(
                        spred,
                        run.losses,
                        drift,
                        dist,
                        what=f"standard net 64-{w}-{w}-10 at η = {lr:g}",
                        agreement=cfg.agreement,
                        drift_max=cfg.drift_max,
                    )
                ]
            std_runs.append(run)
        eos_rows = []
        for run in std_runs:
            sharp = self.mem.series(run.run_id, "sharpness")
            if run.lr == control:
                v = _control_verdict(run.lr, sharp, sharp0)
            else:
                v = _eos_verdict(cfg, run.lr, sharp, sharp0)
            run.verdicts = [*run.verdicts, v]
            eos_rows.append(v)
        minima = _minima_verdict(std_runs)
        eos_rows.append(minima)
        out["3 · edge of stability: the standard net under full-batch GD"] = eos_rows
        for run in self.runs:  # each run's summary carries the verdicts about it
            mine = [*run.verdicts, *([minima] if run in std_runs else [])]
            run.tracker.close("completed", {"verdicts": [v.to_dict() for v in mine], **run.figures})
        self.verdicts = out
        return out

    def _last(self, run: _Run, metric: str) -> float:
        _, v = self.mem.series(run.run_id, metric)
        v = v[np.isfinite(v)]
        return float(v[-1]) if v.size else math.nan

    def _train(
        self,
        name: str,
        model: nn.Module,
        lr: float,
        steps: int,
        prediction: Prediction | None,
        probes: list[Any],
        config: dict[str, Any],
        label: str = "linearized model",
    ) -> _Run:
        prob = Problem(model, "mse", (self.X, self.Y))
        run_config = {
            "experiment": "demo",
            **config,
            "loss": "mse (mean)",
            "data": f"digits n={self.cfg.samples}",
            "lr": lr,
            "steps": steps,
        }
        tracker = Tracker(prob, probes, store=self.mem, run_name=name, config=run_config)
        result = fit(
            prob,
            GD(model.parameters(), lr=lr),
            steps,
            tracker,
            on_nonfinite="stop",
            progress=self.progress,
            description=f"{name} (η = {lr:g})",
        )
        if prediction is not None:
            tracker.record_prediction(prediction, label=label)
        run = _Run(name, lr, tracker, np.asarray(result.losses, np.float64), prediction)
        self.runs.append(run)
        return run

    # ------------------------------------------------------------------ storing
    def save(self, store: Store, choice: ThreadChoice, seconds: float) -> int:
        cfg = self.cfg
        config = {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in asdict(cfg).items()}
        flat = [v.to_dict() for vs in self.verdicts.values() for v in vs]
        figures = [{"name": f.name, "caption": f.caption, "uri": f.uri} for f in self._figures()]
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]
        payloads = [self.mem.export_run(r.run_id) for r in self.runs]
        exp_id = store.add_experiment(
            "demo",
            config,
            digest,
            status="completed",
            verdicts=flat,
            results={
                "threads": choice.to_dict(),
                "runs": {r.name: {"lr": r.lr, **r.figures} for r in self.runs},
            },
            figures=figures,
            runs=payloads,
            seconds=seconds,
        )
        assert exp_id is not None
        self.mem.close()
        return exp_id

    def _figures(self) -> list[Any]:
        series = {
            r.name: {n: self.mem.series(r.run_id, n) for n in self.mem.metric_names(r.run_id)}
            for r in self.runs
        }
        colors = plots.run_colors(list(series))
        predicted = {
            r.name: {
                "steps": list(range(r.prediction.loss.size)),
                "loss": r.prediction.loss.tolist(),
                "label": "the linearized model (gs.predict from K₀)",
            }
            for r in self.runs
            if r.prediction is not None and not isinstance(r.prediction, CentralFlowPrediction)
        }
        flows = {
            r.name: r.prediction
            for r in self.runs
            if isinstance(r.prediction, CentralFlowPrediction)
        }
        out = []
        fig = plots.prediction_figure(
            {k: v for k, v in series.items() if k in predicted}, predicted, colors
        )
        if fig is not None:
            out.append(
                plots.Plot(
                    "kernel-regime",
                    "Kernel regime vs feature learning: the measured loss (solid) and the loss "
                    "the linearized model predicts from K₀ before training (dashed), for the "
                    "wide NTK-parameterized net (they agree) and the standard net (they part: "
                    "its kernel moves).",
                    fig.uri,
                )
            )
        std = {k: v for k, v in series.items() if "sharpness" in v}
        overlay = {
            name: {
                "label": "central flow",
                "steps": list(range(f.sharpness.size)),
                "sharpness": f.sharpness.tolist(),
            }
            for name, f in flows.items()
        }
        fig = plots.sharpness_figure(std, colors, predictions=overlay)
        if fig is not None:
            out.append(
                plots.Plot(
                    fig.name,
                    "Edge of stability: the standard net under full-batch GD. "
                    + fig.caption
                    + " At the larger step sizes the sharpness rises to 2/η and hovers; at the "
                    "control it stays below." + (" " + _FLOW_SHARPNESS if flows else ""),
                    fig.uri,
                )
            )
        if flows:
            cf = {
                name: {
                    "steps": list(range(f.loss.size)),
                    "loss": f.loss.tolist(),
                    "label": "central flow",
                }
                for name, f in flows.items()
            }
            fig = plots.prediction_figure({k: series[k] for k in cf}, cf, colors)
            if fig is not None:
                runs = {r.name: r for r in self.runs}
                out.append(
                    plots.Plot("central-flow", _flow_caption(flows, runs, self.cfg), fig.uri)
                )
        return out


# --------------------------------------------------------------------------- central flow
#: How the demo integrates the central flow (:func:`gdscope.central_flow`): the cheap, coarse
#: flow that fits the demo's time (docs/performance.md, "The central flow"): two Euler substeps
#: per GD step, the edge curvature (eigenvectors, ``VᵀHV``, third-derivative products) refreshed
#: every ``DemoConfig.flow_refresh`` steps, up to six eigenvalues tracked, a fresh Lanczos solve
#: every 100 steps or when a tracked pair's residual passes 5% of λ_1, in the model's dtype.
FLOW_SETTINGS: dict[str, Any] = {
    "substeps": 2,
    "max_edge": 6,
    "eig_every": 200,
    "eig_tol": 1e-4,
    "track_tol": 0.05,
}
#: The loss rule of the ``edge`` experiment, applied to the steps the flow covers (reported on
#: the page, not judged): windows of this many measured oscillation periods, this tolerance.
FLOW_LOSS_PERIODS, FLOW_LOSS_TOL, FLOW_SHARP_TOL = 3.0, 0.10, 0.05

_FLOW_SHARPNESS = (
    "The central flow's sharpness λ_1(w(t)) covers the first part of the run at the "
    "edge-of-stability step sizes: the next figure says how far and how close."
)


def _flow(
    model: nn.Module, X: Tensor, Y: Tensor, lr: float, cfg: DemoConfig
) -> tuple[CentralFlowPrediction, float]:
    """The central flow of full-batch GD at ``lr`` from ``model``'s parameters (a copy), until
    ``cfg.flow_edge_steps`` steps after it reaches the edge (:data:`FLOW_SETTINGS`), and the
    CPU seconds it took."""
    prob = Problem(copy.deepcopy(model), "mse", (X, Y))
    t0 = time.process_time()
    with warnings.catch_warnings():  # a poorly solved step is in the prediction's notes
        warnings.simplefilter("ignore", RuntimeWarning)
        flow = central_flow(
            prob,
            {"class": "GD", "lr": lr},
            cfg.steps,
            curvature_every=FLOW_SETTINGS["substeps"] * cfg.flow_refresh,
            stop_after_edge=cfg.flow_edge_steps,
            **FLOW_SETTINGS,
        )
    return flow, time.process_time() - t0


def flow_agreement(
    flow: CentralFlowPrediction,
    losses: Sequence[float],
    sharp: tuple[np.ndarray, np.ndarray],
    cfg: DemoConfig,
    cpu_seconds: float = math.nan,
) -> dict[str, Any]:
    """The central flow beside a measured GD run over the steps it covers, by the ``edge``
    experiment's rules (:mod:`gdscope.experiments._edge_parts`): GD's loss against the flow's
    time-averaged loss over every window of :data:`FLOW_LOSS_PERIODS` measured oscillation
    periods, GD's post-onset median sharpness against the flow's; plus the flow's work."""
    from gdscope.experiments._edge_parts import loss_verdict, sharpness_verdict

    n = flow.steps
    x, v = sharp
    keep = np.isfinite(v) & (x <= n)
    lr = float(flow.optimizer["lr"])
    r = {
        "lr": lr,
        "threshold": flow.threshold,
        "gd_loss": [float(u) for u in np.asarray(losses, dtype=np.float64)[: n + 1]],
        "cf_loss": flow.loss.tolist(),
        "sharp_steps": [int(u) for u in x[keep]],
        "sharp": [float(u) for u in v[keep]],
        "cf_sharp": flow.sharpness.tolist(),
        "diverged": False,
        "diverged_at": None,
        "cf_error": None,
    }
    lv = loss_verdict(
        r, periods=FLOW_LOSS_PERIODS, tol=FLOW_LOSS_TOL, onset_fraction=cfg.onset_fraction
    )
    sv = sharpness_verdict(
        r, tol=FLOW_SHARP_TOL, onset_fraction=cfg.onset_fraction, min_post_onset=3
    )
    top = int(flow.edge_count.max()) if flow.edge_count.size else 0
    return {
        "steps": n,
        "onset_step": flow.onset_step,
        "loss_status": lv.status,
        "loss": {k: lv.details.get(k) for k in ("window", "period", "max_error", "median_error")},
        "loss_measured": lv.measured,
        "sharpness_status": sv.status,
        "sharpness": {k: sv.details.get(k) for k in ("measured_median", "predicted_median")},
        "sharpness_measured": sv.measured,
        "threshold": flow.threshold,
        "max_edge_count": top,
        "saturated": top >= FLOW_SETTINGS["max_edge"],
        "cpu_seconds": cpu_seconds,
        "curvature_passes": flow.curvature_passes,
        "gradient_passes": flow.gradient_passes,
        "third_products": flow.third_products,
        "eig_products": flow.eig_products,
    }


def _flow_caption(
    flows: dict[str, CentralFlowPrediction], runs: dict[str, _Run], cfg: DemoConfig
) -> str:
    """The central-flow figure's caption: what was integrated and how close it came."""
    parts = []
    for name, flow in flows.items():
        a = runs[name].figures.get("central_flow", {})
        lr = float(flow.optimizer["lr"])
        text = f"η = {lr:g}: the flow to step {flow.steps}"
        text += "" if flow.onset_step is None else f" (at the edge from step {flow.onset_step})"
        loss = a.get("loss", {})
        if loss.get("max_error") is not None:
            what = (
                "self-stabilization cycles"
                if loss.get("period", 2) > 2
                else "period-2 flips (no slower cycle stood out in these steps)"
            )
            text += (
                f"; GD's loss over every window of {FLOW_LOSS_PERIODS:g} measured {what}, "
                f"{loss['window']} steps, within {loss['max_error']:.1%} of the flow's L̄ "
                f"(median {loss['median_error']:.1%})"
            )
        else:
            text += f"; loss: {a.get('loss_measured', 'not compared')}"
        sh = a.get("sharpness", {})
        if sh.get("measured_median") is not None:
            gm, pm = sh["measured_median"] / a["threshold"], sh["predicted_median"] / a["threshold"]
            text += f"; GD's median sharpness after its onset {gm:.3f}·2/η, the flow's {pm:.3f}·2/η"
        if a.get("saturated"):
            text += (
                f"; all {FLOW_SETTINGS['max_edge']} tracked eigenvalues reached the edge, so more "
                "may oscillate than the flow models"
            )
        text += f" ({a.get('cpu_seconds', math.nan):.1f} s CPU)"
        parts.append(text)
    return (
        "The central flow (gs.central_flow) beside the measured run at the edge-of-stability "
        "step sizes: GD's loss (solid) and the flow's predicted time-averaged loss L̄ (dashed, "
        f"same colour), integrated before training from the same initialization up to "
        f"{cfg.flow_edge_steps} steps past the edge. The demo integrates a cheap, coarse flow "
        f"to keep its time: {FLOW_SETTINGS['substeps']} Euler substeps per step, the edge "
        f"curvature (eigenvectors, VᵀHV, third-derivative products) refreshed every "
        f"{cfg.flow_refresh} steps (in between VᵀHV moves to first order, so the predicted "
        f"sharpness saw-tooths a few percent above 2/η), at most {FLOW_SETTINGS['max_edge']} "
        "eigenvalues tracked, in the model's dtype (docs/performance.md, 'The central flow'). "
        "Below the edge the flow is gradient flow and the curves coincide; the flow has no "
        "catapult: GD's sharpness overshoots 2/η and its loss spikes before it settles. "
        "Measured, not judged, by the edge experiment's rules: " + "; ".join(parts) + "."
    )


# --------------------------------------------------------------------------- measurements
@dataclass(frozen=True)
class InitialKernel:
    """The empirical NTK at initialization, ``K`` ``(n·k, n·k)`` float64 sample-major, with the
    initial outputs ``f0`` and targets ``y`` (``(n, k)``)."""

    K: np.ndarray
    f0: np.ndarray
    y: np.ndarray


def _initial_kernel(model: nn.Module, X: Tensor, Y: Tensor) -> InitialKernel:
    """``K₀``, ``f0`` and ``y`` of ``model`` (a float64 copy; the model is left as it is)."""
    model = copy.deepcopy(model).double()
    Xd = X.double()
    K = ntk(model, Xd).permute(0, 2, 1, 3).reshape(Y.numel(), Y.numel()).numpy()
    with torch.no_grad():
        f0 = model(Xd).numpy()
    return InitialKernel(K, f0, Y.double().numpy())


def _eigenvalues(kernel: InitialKernel) -> np.ndarray:
    """Eigenvalues of ``K₀`` (ascending), from the decomposition :func:`gdscope.predict` caches
    (a one-step prediction; the real one reuses it)."""
    pred = predict(kernel.K, {"class": "GD", "lr": 1e-12}, 1, f0=kernel.f0, y=kernel.y, loss="mse")
    return pred.eigenvalues


def _drift(model: nn.Module, k0: InitialKernel, X: Tensor) -> float:
    """Relative kernel drift ``‖K_T − K₀‖_F/‖K₀‖_F`` (``K_T`` in the model's dtype: a norm
    ratio needs no float64)."""
    n, k = k0.y.shape
    KT = ntk(model, X).permute(0, 2, 1, 3).reshape(n * k, n * k).double().numpy()
    return float(np.linalg.norm(KT - k0.K) / np.linalg.norm(k0.K))


def _end_point(model: nn.Module, X: Tensor, Y: Tensor, mem: Store, run_id: int) -> dict[str, Any]:
    """The final gradient norm, ``‖θ‖`` and the last sharpness measurement of a run."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = nn.functional.mse_loss(model(X), Y)
    grads = torch.autograd.grad(loss, params)
    grad = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    theta = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in params))
    _, sharp = mem.series(run_id, "sharpness")
    h_max = float(sharp[np.isfinite(sharp)][-1]) if np.isfinite(sharp).any() else math.nan
    eps = torch.finfo(params[0].dtype).eps
    return {"grad_norm": grad, "theta_norm": theta, "h_max": h_max, "eps": eps}


# ------------------------------------------------------------------------------- verdicts
def ntk_certificate(prediction: Prediction, lr: float, losses: Sequence[float]) -> Verdict:
    """The NTK certificate for MSE (THEORY §1) as a bound, judged on a measured loss curve.

    In the kernel regime the residual contracts by ``max_i |1 − ηqλ_i(K₀)|`` per step (which is
    ``1 − ηqλ_min`` while ``η ≤ 2/(q(λ_min + λ_max))``): the loss factor per step is at most its
    square. The measured factor (fitted on the last half of the curve, 95% interval) must be at
    most that: holds when the interval's upper end is, fails when its lower end is above,
    undetermined otherwise. How loose the bound is, ``log(measured)/log(guaranteed)``, and the
    linearized model's own factor over the same window are reported with it.
    """
    q = prediction.q
    assert q is not None
    lam = prediction.eigenvalues
    lam_min, lam_max = float(lam[0]), float(lam[-1])
    a_min, a_max = lr * q * lam_min, lr * q * lam_max
    bound = max(abs(1 - a_min), abs(1 - a_max)) ** 2
    claim = f"NTK certificate (a bound) at η = {lr:g}: λ_min(K₀) > 0 guarantees a linear rate"
    predicted = (
        f"λ_min(K₀) = {lam_min:.4g} > 0 (λ_max = {lam_max:.4g}, q = {q:.3g}): loss factor per "
        f"step ≤ max|1 − ηqλ|² = {bound:.7g}"
    )
    details: dict[str, Any] = {
        "lambda_min": lam_min,
        "lambda_max": lam_max,
        "q": q,
        "eta_q_lambda_max": a_max,
        "guaranteed_loss_factor": bound,
    }
    curve = np.asarray(losses, dtype=np.float64)
    keep = np.isfinite(curve) & (curve > 0)
    common = {"theorem": _CERTIFICATE_THEOREM, "section": SEC_KERNEL}
    if a_max >= 2:
        why = f"ηqλ_max = {a_max:.3g} ≥ 2: the linearized model diverges at this step size"
        return Verdict(
            claim,
            "no certificate at this step size",
            why,
            None,
            details,
            assumption=why,
            reason=why,
            **common,
        )
    if lam_min <= 0:
        why = f"λ_min(K₀) = {lam_min:.3g}: K₀ is singular, the certificate guarantees no rate"
        return Verdict(claim, predicted, why, None, details, assumption=why, reason=why, **common)
    if np.count_nonzero(keep) < 2 * MIN_FIT_POINTS:
        why = f"only {np.count_nonzero(keep)} positive finite loss values: too few to fit a rate"
        return Verdict(claim, predicted, why, None, details, reason=why, **common)
    fit = fit_rates(curve[keep], tail=0.5)
    lo, hi = fit.exponential_rate_ci
    rate = fit.exponential_rate
    details |= {"measured_loss_factor": rate, "ci": [lo, hi], "window": list(fit.window)}
    lin = prediction.loss[: curve.size][keep]
    lin_rate = None
    if np.all(np.isfinite(lin) & (lin > 0)):
        lin_rate = fit_rates(lin, tail=0.5).exponential_rate
        details["linearized_loss_factor"] = lin_rate
    loose = math.log(rate) / math.log(bound) if 0 < rate < 1 and bound < 1 else math.nan
    details["looseness"] = loose
    holds = True if hi <= bound else (False if lo > bound else None)
    measured = (
        f"loss factor {rate:.5g}/step (95% CI {lo:.5g}–{hi:.5g}) vs bound {bound:.5g}"
        + (f": {loose:.3g}× faster in log-rate" if holds and math.isfinite(loose) else "")
        + ("" if lin_rate is None else f"; linearized model {lin_rate:.5g}")
    )
    reason = {
        True: "the measured factor's 95% interval lies below the guaranteed one",
        False: "the measured loss decays slower than the certificate guarantees",
        None: "the measured factor's 95% interval straddles the guaranteed one",
    }[holds]
    return Verdict(claim, predicted, measured, holds, details, reason=reason, **common)


def linearization_verdict(
    prediction: Prediction,
    losses: Sequence[float],
    drift: float,
    distance: float,
    *,
    what: str,
    agreement: float = 1.1,
    drift_max: float = 0.1,
) -> Verdict:
    """Whether the linearized model predicts the loss curve (THEORY §2) of one run.

    The premise is the kernel regime, ``K_t ≈ K₀``, measured by the relative kernel drift at
    the end of the run: above ``drift_max`` the claim is outside its assumptions (feature
    learning: a contrast, with the measured drift); otherwise it holds when measured and
    predicted losses agree within ``agreement`` (a factor) at every step, and fails when not.
    """
    curve = np.asarray(losses, dtype=np.float64)
    steps = min(curve.size, prediction.loss.size)
    ratio = curve[:steps] / prediction.loss[:steps]
    finite = np.isfinite(ratio) & (ratio > 0)
    worst = float(np.max(np.abs(np.log(ratio[finite])))) if finite.any() else math.inf
    lo, hi = (
        (float(ratio[finite].min()), float(ratio[finite].max())) if finite.any() else (0.0, 0.0)
    )
    moved = "" if not math.isfinite(distance) else f", ‖θ_T − θ₀‖/‖θ₀‖ = {distance:.3g}"
    details: dict[str, Any] = {
        "ratio_min": lo,
        "ratio_max": hi,
        "kernel_drift": drift,
        "distance_rel": distance,
        "agreement": agreement,
        "drift_max": drift_max,
    }
    claim = f"the linearized model predicts the loss curve of the {what}"
    predicted = (
        f"L_T = {prediction.loss[steps - 1]:.4g} at step {steps - 1} (gs.predict from K₀), "
        f"within ×{agreement:g} at every step"
    )
    measured = (
        f"measured/predicted loss in [{lo:.3g}, {hi:.3g}]; kernel drift ‖K_T − K₀‖/‖K₀‖ = "
        f"{drift:.3g}{moved}"
    )
    details["final_loss"] = float(curve[steps - 1])
    common = {"theorem": _LINEARIZATION_THEOREM, "section": SEC_DYNAMICS}
    if not drift <= drift_max:
        assumption = (
            f"kernel regime: relative kernel drift {drift:.2g} ≫ 0 (> {drift_max:g}; the "
            "theorem needs K_t ≈ K₀): the net learns features, so its linearization is not "
            "expected to hold"
        )
        return Verdict(
            claim,
            predicted,
            measured,
            None,
            details,
            reason=assumption,
            assumption=assumption,
            **common,
        )
    holds = worst <= math.log(agreement)
    reason = (
        f"the kernel stayed put (drift {drift:.2g} ≤ {drift_max:g}) and the curves agree within "
        f"×{agreement:g}"
        if holds
        else f"the kernel stayed put (drift {drift:.2g} ≤ {drift_max:g}) but the curves part "
        f"by ×{math.exp(worst):.3g} > ×{agreement:g}"
    )
    return Verdict(claim, predicted, measured, holds, details, reason=reason, **common)


def _series_ratio(sharp: tuple[np.ndarray, np.ndarray], lr: float) -> tuple[np.ndarray, ...]:
    x, v = sharp
    keep = np.isfinite(v)
    return x[keep], v[keep] * lr / 2.0


def _eos_verdict(
    cfg: DemoConfig, lr: float, sharp: tuple[np.ndarray, np.ndarray], sharp0: float
) -> Verdict:
    """Edge of stability at ``lr`` (:func:`gdscope.verdict.hover_rule`, as ``gdscope run
    stability``)."""
    thr = 2.0 / lr
    x, ratio = _series_ratio(sharp, lr)
    lo, hi = cfg.eos_band
    claim = f"edge of stability at η = {lr:g}: sharpness rises to 2/η = {thr:.3g} and hovers"
    predicted = f"post-onset median sharpness in [{lo:g}, {hi:g}]·2/η"
    details: dict[str, Any] = {"threshold": thr, "measurements": int(ratio.size)}
    common = {"theorem": _EOS_THEOREM, "section": SEC_REFERENCE}
    if not ratio.size:
        why = "no finite sharpness measurement"
        return Verdict(claim, predicted, why, None, details, reason=why, **common)
    h = hover(x, ratio, cfg.onset_fraction)
    holds, why, assumption = hover_rule(h, cfg.eos_band, cfg.min_post_onset)
    details["initial_ratio"] = h.start
    init = f"starts at {h.start:.2f}·2/η"
    if h.onset_step is None or h.median is None:
        measured = f"threshold not reached: max sharpness {h.max:.3f}·2/η ({init})"
    else:
        details |= {"onset_step": h.onset_step, "post_onset_median": h.median, "count": h.count}
        measured = (
            f"{init}; onset at step {h.onset_step}; median {h.median:.3f}·2/η after it (IQR "
            f"{h.q25:.2f}–{h.q75:.2f}, {h.count} values)"
        )
    return Verdict(
        claim, predicted, measured, holds, details, reason=why, assumption=assumption, **common
    )


def _control_verdict(lr: float, sharp: tuple[np.ndarray, np.ndarray], sharp0: float) -> Verdict:
    """The control step size: sharpness stays below ``2/η``."""
    thr = 2.0 / lr
    x, ratio = _series_ratio(sharp, lr)
    claim = f"control at η = {lr:g}: sharpness stays below 2/η = {thr:.3g}"
    predicted = (
        f"below 2/η throughout: 2/η is {thr / sharp0:.3g}× the initial sharpness "
        f"qλ_max(K₀) = {sharp0:.3g}"
    )
    details: dict[str, Any] = {"threshold": thr, "initial_sharpness_kernel": sharp0}
    common = {"theorem": _CONTROL_THEOREM, "section": SEC_CURVATURE}
    if not ratio.size:
        why = "no finite sharpness measurement"
        return Verdict(claim, predicted, why, None, details, reason=why, **common)
    top = int(np.argmax(ratio))
    details |= {"max_ratio": float(ratio[top]), "measurements": int(ratio.size)}
    holds = bool(ratio[top] < 1)
    measured = f"max {ratio[top]:.3f}·2/η (sharpness {ratio[top] * thr:.3g}, step {x[top]})"
    why = "every measurement below 2/η" if holds else f"reached 2/η at step {x[top]}"
    return Verdict(claim, predicted, measured, holds, details, reason=why, **common)


def _minima_verdict(runs: Sequence[_Run]) -> Verdict:
    """GD-stability of the end points: judged only at minima; the demo's runs end elsewhere."""
    claim = "GD converges only to minima that are GD-stable at its η (sharpness < 2/η)"
    predicted = "at a minimum reached by GD: every normal Hessian eigenvalue in (0, 2/η)"
    ratios = {}
    for r in runs:
        f = r.figures
        ratios[r.name] = f["grad_norm"] / (abs(f["h_max"]) * f["theta_norm"])
    floor = 10 * runs[0].figures["eps"]
    measured = (
        "‖∇L‖/(h_max‖θ‖) = "
        + ", ".join(f"{v:.2g}" for v in ratios.values())
        + f" at η = {', '.join(f'{r.lr:g}' for r in runs)}; round-off floor {floor:.2g}"
    )
    details_grad = {r.name: r.figures["grad_norm"] for r in runs}
    common = {"theorem": _MINIMA_THEOREM, "section": SEC_CURVATURE}
    details = {"gradient_norm": details_grad, "gradient_ratio": ratios, "round_off_floor": floor}
    at_min = [name for name, ratio in ratios.items() if ratio <= floor]
    if not at_min:
        why = (
            f"no run ended at a minimum: ‖∇L‖/(h_max‖θ‖) ≥ {min(ratios.values()):.2g} ≫ the "
            f"round-off floor {floor:.2g} (statements about minima are judged at minima, §8)"
        )
        return Verdict(
            claim, predicted, measured, None, details, reason=why, assumption=why, **common
        )
    why = (
        f"{', '.join(at_min)} reached the round-off floor: run gdscope run stability for the "
        "analysis of its minimum"
    )
    return Verdict(claim, predicted, measured, None, details, reason=why, **common)


#: Points the rate fit needs in its window (the last half of the curve).
MIN_FIT_POINTS = 5
