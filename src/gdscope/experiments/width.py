"""``width``: over-parameterization on a width sweep (docs/theory.md §1, §2; Lee et al. 2019).

Fully connected nets ``d → m → … → m → k`` (``depth`` hidden layers) in NTK parameterization
(:func:`gdscope.zoo.mlp` with ``parameterization="ntk"``: ``z = sqrt(σ_w²/fan_in) W h``,
``W ~ N(0, 1)``; biases only when ``bias_var > 0``) are trained by full-batch GD on MSE
(PyTorch's mean ``mse_loss``: ``q = 2/(nk)``) with one-hot targets, one task per (width, seed),
all on the same sample of the data. Per task:

* the final training loss ``L_T`` and accuracy (at ``θ_T``);
* per layer the relative weight change ``‖W_l(T) − W_l(0)‖_F/‖W_l(0)‖_F``
  (:class:`~gdscope.probes.DistanceProbe`; a layer's bias, when there is one, counts with it);
* the relative kernel drift ``‖K_T − K_0‖_F/‖K_0‖_F`` of the empirical NTK Gram
  (:func:`gdscope.ntk`, ``nk × nk`` sample-major) on the first ``kernel_samples`` training points;
* ``λ_min(K_0)``, ``λ_max(K_0)`` and the run of the linearized model predicted from ``K_0`` on the
  whole training set (:func:`gdscope.predict`): its loss curve and its worst-mode rate
  ``max_i |1 − ηqλ_i|`` (squared for the loss);
* the measured loss factor per step (:func:`gdscope.theory.fit_rates` on the tail of the curve)
  against the factor fitted to the predicted curve on the same window;
* the linearized model (:func:`gdscope.linearize`) trained by the same GD for the same steps:
  the relative output gap ``‖F_T − F^lin_T‖/‖F^lin_T − F_0‖`` (the share of the function-space
  motion the linearization misses) and the loss-curve gap ``max_t |L_t − L^lin_t|/L_0``; and how
  far its loss curve is from the prediction, which is exact for a model linear in ``θ``.

**Step size.** In NTK parameterization the kernel tends to ``Θ∞ ⊗ I_k`` as the width grows
(:func:`gdscope.infinite_ntk`), so GD's threshold ``2/(qλ_max(K))`` has a width-independent limit.
Every task uses ``η = lr_scale·2/(q λ_max(Θ∞))``: one step size for all widths and seeds, so the
sweep compares the same dynamics (as Lee et al. do); each task records ``ηqλ_max(K_0)/2``, its
ratio to its own finite-width threshold (a narrow net whose kernel fluctuates above
``λ_max(Θ∞)/lr_scale`` may diverge: that run is kept and reported as diverged).

**Verdicts.** (1) every run reaches 100% training accuracy and ``L_T ≤ loss_tol·L_0``;
(2) the theorems give asymptotic orders (docs/theory.md §1): input and readout layers and the
kernel drift ``O(m^{-1/2})``, hidden ``m × m`` layers ``O(m^{-1})``. They are judged as asymptotics
(:mod:`gdscope.experiments.asymptotics`): local exponents between successive widths with
``level`` intervals from the spread over seeds, their trend with width, and the exponent the trend
gives at the two largest widths; it holds when that exponent has reached the order or steepens
toward it, fails only when it sits above the order and has stopped approaching it;
(3) the measured loss rate approaches the predicted one: ``R = log ρ_meas/log ρ_pred``
(ratio of decay exponents) is within ``rate_tol`` of 1 at the largest width, or ``|R − 1|`` falls
with width (log-log slope ``< 0`` with its interval); (4) the linearization gap shrinks with width
(slope ``< 0`` with its interval); (5) the prediction reproduces the trained linearized model to
rounding (docs/theory.md §2, the sharp test).

**Cost.** Two NTK Grams per task (``K_0`` on the ``n`` training points, ``K_T`` on the drift
subset) and the training dominate; :func:`gdscope.ntk` contracts ``zoo.NTKLinear`` layers with
its structured rule. The defaults (``n = 128``, widths 64–1024, 6 trials) take about 3.5 minutes
on one CPU core; ``paper_scale`` is the GPU version.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from scipy import stats
from torch import Tensor, nn

from gdscope.errors import ConfigError, InvalidArgumentError
from gdscope.experiments.asymptotics import LocalExponents, local_exponents
from gdscope.experiments.base import (
    DataConfig,
    Experiment,
    ExperimentConfig,
    Figure,
    Judgement,
    TaskContext,
    register,
)
from gdscope.kernels import infinite_ntk, ntk
from gdscope.probes import (
    AccuracyProbe,
    At,
    DistanceProbe,
    LogSpaced,
    LossProbe,
    ThresholdProbe,
)
from gdscope.problem import Problem
from gdscope.theory import fit_rates, linearize, predict
from gdscope.tracker import Tracker
from gdscope.train import GD, fit
from gdscope.verdict import Verdict
from gdscope.zoo import mlp

__all__ = [
    "LogLogFit",
    "NTKSweepConfig",
    "Width",
    "WidthConfig",
    "accuracy",
    "curve_points",
    "finite_or_none",
    "group_by_width",
    "infinite_width_eigenvalues",
    "infinite_width_lr",
    "load_data",
    "loglog_fit",
    "ntk_net",
    "schedule_steps",
]

#: Activations that both :func:`gdscope.zoo.mlp` and :func:`gdscope.infinite_ntk` know.
Activation = Literal["relu", "erf", "identity", "tanh", "sigmoid", "softplus", "gelu"]


# ---------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class NTKSweepConfig(ExperimentConfig):
    """A width sweep of NTK-parameterized MLPs trained by full-batch GD (shared fields).

    ``trials`` initializations per width: trial ``i`` uses seed ``seed + i`` (the data sample is
    drawn once, with ``seed``); ``lr_scale``: the step size as a fraction of GD's stability
    threshold ``2/(qλ_max)`` (each experiment says of which kernel).
    """

    data: DataConfig = field(default_factory=DataConfig)
    widths: tuple[int, ...] = (64, 128, 256)
    trials: int = 2
    depth: int = 2
    activation: Activation = "relu"
    weight_var: float = 2.0
    bias_var: float = 0.0
    steps: int = 500
    lr_scale: float = 0.5

    def __post_init__(self) -> None:
        if not self.widths:
            raise ConfigError("widths: empty; list at least one width, e.g. widths=[64, 128].")
        for i, m in enumerate(self.widths):
            if m < 1:
                raise ConfigError(f"widths[{i}]={m}: a width must be >= 1.")
        if len(set(self.widths)) != len(self.widths):
            raise ConfigError(f"widths={list(self.widths)}: list each width once.")
        _at_least(self.trials, 1, "trials")
        _at_least(self.depth, 1, "depth")
        _at_least(self.steps, 20, "steps", "(the rate fits need a tail of at least 10 steps)")
        if self.data.n is not None:
            _at_least(self.data.n, 2, "data.n")
        if not (math.isfinite(self.lr_scale) and self.lr_scale > 0):
            raise ConfigError(
                f"lr_scale={self.lr_scale}: must be > 0 (a fraction of the stability threshold "
                "2/(qλ_max); below 1 is stable, e.g. 0.5)."
            )
        if self.weight_var <= 0:
            raise ConfigError(f"weight_var={self.weight_var}: must be > 0 (e.g. 2.0 for ReLU).")
        if self.bias_var < 0:
            raise ConfigError(f"bias_var={self.bias_var}: a variance, must be >= 0.")


def _at_least(value: int, low: int, name: str, why: str = "") -> None:
    if value < low:
        raise ConfigError(f"{name}={value}: must be >= {low}{' ' + why if why else ''}.")


@dataclass(frozen=True)
class WidthConfig(NTKSweepConfig):
    """The ``width`` experiment (defaults: about 3.5 minutes on one CPU core).

    ``kernel_samples``: training points of the kernel-drift subset; ``tail``: fraction of the loss
    curve the rates are fitted on; ``level``: confidence level of the slope intervals;
    ``loss_tol``: ``L_T ≤ loss_tol·L_0`` counts as reaching the global minimum; ``rate_tol``:
    ``|log ρ_meas/log ρ_pred − 1|`` that counts as agreement at the largest width.
    """

    data: DataConfig = field(default_factory=lambda: DataConfig(n=128))
    widths: tuple[int, ...] = (64, 128, 256, 512, 1024)
    trials: int = 6
    kernel_samples: int = 32
    tail: float = 0.5
    level: float = 0.95
    loss_tol: float = 1e-2
    rate_tol: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self.kernel_samples, 1, "kernel_samples")
        if not 0 < self.tail <= 1:
            raise ConfigError(f"tail={self.tail}: a fraction of the curve in (0, 1], e.g. 0.5.")
        if not 0 < self.level < 1:
            raise ConfigError(f"level={self.level}: a confidence level in (0, 1), e.g. 0.95.")
        if not 0 < self.loss_tol < 1:
            raise ConfigError(f"loss_tol={self.loss_tol}: a fraction of L_0 in (0, 1).")
        if self.rate_tol <= 0:
            raise ConfigError(f"rate_tol={self.rate_tol}: must be > 0, e.g. 0.1.")


# ---------------------------------------------------------------------------------- shared parts
def load_data(
    cfg: NTKSweepConfig, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """``(X, Y)`` of ``cfg.data`` drawn with ``cfg.seed``: ``X`` ``(n, features)``, ``Y`` ``(n, k)``
    (one-hot for labelled sets)."""
    X, Y = cfg.data.load(seed=cfg.seed, dtype=dtype, one_hot=True, flatten=True)
    if Y.ndim != 2:
        raise ConfigError(
            f"data.name={cfg.data.name!r} gives targets of shape {tuple(Y.shape)}: the sweep "
            "trains on MSE with (n, k) targets; pick a classification or vector-target set."
        )
    return X.to(device), Y.to(device)


def ntk_net(
    cfg: NTKSweepConfig, d: int, k: int, width: int, seed: int, dtype: torch.dtype
) -> nn.Sequential:
    """``zoo.mlp([d, width × depth, k], parameterization="ntk")`` (bias-free when
    ``bias_var = 0``: such biases would never move)."""
    return mlp(
        [d, *([width] * cfg.depth), k],
        cfg.activation,
        bias=cfg.bias_var > 0,
        seed=seed,
        dtype=dtype,
        parameterization="ntk",
        weight_var=cfg.weight_var,
        bias_var=cfg.bias_var,
    )


def infinite_width_eigenvalues(cfg: NTKSweepConfig, X: Tensor) -> Tensor:
    """Eigenvalues (ascending, float64, CPU) of the per-output infinite-width NTK ``Θ∞`` on ``X``.

    The full kernel ``Θ∞ ⊗ I_k`` of ``k`` outputs has the same spectrum (each eigenvalue ``k``
    times).
    """
    theta = infinite_ntk(
        X,
        depth=cfg.depth,
        activation=cfg.activation,
        weight_var=cfg.weight_var,
        bias_var=cfg.bias_var,
    )
    return torch.linalg.eigvalsh(theta.double()).cpu()


def infinite_width_lr(cfg: NTKSweepConfig, X: Tensor, k: int) -> float:
    """``η = lr_scale·2/(qλ_max(Θ∞))`` with ``q = 2/(nk)`` (PyTorch's mean ``mse_loss``)."""
    q = 2.0 / (X.shape[0] * k)
    return cfg.lr_scale * 2.0 / (q * float(infinite_width_eigenvalues(cfg, X)[-1]))


def accuracy(outputs: Tensor, Y: Tensor) -> float | None:
    """Argmax accuracy against one-hot rows of ``Y``; ``None`` if ``Y`` is not one-hot."""
    one_hot = Y.shape[1] > 1 and bool(((Y == 0) | (Y == 1)).all()) and bool((Y.sum(1) == 1).all())
    if not one_hot:
        return None
    return float((outputs.argmax(1) == Y.argmax(1)).double().mean())


def schedule_steps(steps: int, per_decade: int = 10) -> list[int]:
    """Tracker steps ``t < steps`` that :class:`LogSpaced` picks, and the last, ``steps − 1``."""
    chosen = LogSpaced(per_decade)
    return sorted({t for t in range(steps) if chosen(t)} | {steps - 1})


def curve_points(steps: int, count: int = 80) -> list[int]:
    """About ``count`` log-spaced indices into a curve of ``steps`` values (0 and the last)."""
    inner = np.round(np.geomspace(1, steps, count)).astype(int) - 1
    return sorted({0, steps - 1, *inner.tolist()})


def finite_or_none(x: float | None) -> float | None:
    """``x`` as a JSON-ready float (``None`` for ``None``, NaN or ±inf)."""
    return None if x is None or not math.isfinite(float(x)) else float(x)


@dataclass(frozen=True)
class LogLogFit:
    """OLS of ``log y`` on ``log x``: slope, its interval at ``level``, intercept, points."""

    slope: float
    intercept: float
    ci: tuple[float, float]
    se: float
    points: int
    level: float

    def describe(self) -> str:
        lo, hi = self.ci
        return (
            f"slope {self.slope:+.3f} ({self.level:.0%} CI [{lo:+.3f}, {hi:+.3f}], "
            f"{self.points} runs)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "slope": self.slope,
            "intercept": self.intercept,
            "ci": list(self.ci),
            "se": self.se,
            "points": self.points,
            "level": self.level,
        }


def loglog_fit(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> LogLogFit | None:
    """Fit ``log y = a + b log x`` by OLS; the slope's interval uses the t distribution with
    ``N − 2`` degrees of freedom. ``None`` with fewer than 3 positive points or 2 distinct ``x``.
    """
    pts = [(a, b) for a, b in zip(x, y, strict=True) if a > 0 and b is not None and b > 0]
    lx = np.log([a for a, _ in pts])
    ly = np.log([b for _, b in pts])
    if len(pts) < 3 or np.unique(lx).size < 2:
        return None
    res = stats.linregress(lx, ly)
    t = float(stats.t.ppf(0.5 + level / 2, len(pts) - 2))
    se = float(res.stderr)
    return LogLogFit(
        slope=float(res.slope),
        intercept=float(res.intercept),
        ci=(float(res.slope) - t * se, float(res.slope) + t * se),
        se=se,
        points=len(pts),
        level=level,
    )


# ---------------------------------------------------------------------------------- experiment
_ROLE_BOUND = {"input": -0.5, "hidden": -1.0, "readout": -0.5}
_DRIFT_BOUND = -0.5


def _layers(model: nn.Module) -> list[tuple[str, str, list[int]]]:
    """``(module name, role, weight shape)`` of each layer that owns parameters, in order."""
    names = [n for n, mod in model.named_children() if any(True for _ in mod.parameters())]
    out = []
    for i, name in enumerate(names):
        role = "input" if i == 0 else "readout" if i == len(names) - 1 else "hidden"
        weight = getattr(model, name).weight
        out.append((name, role, list(weight.shape)))
    return out


def _flat(K: Tensor) -> Tensor:
    """``(n, n2, k, k)`` → ``(nk, n2k)`` sample-major, float64 on the CPU."""
    n, n2, k, _ = K.shape
    return K.permute(0, 2, 1, 3).reshape(n * k, n2 * k).double().cpu()


@register
class Width(Experiment):
    """Width sweep in NTK parameterization: weight change, kernel drift, rates, linearization."""

    name = "width"
    summary = (
        "Over-parameterization: weight change, kernel drift and the gap to the linearized model "
        "fall with width, and GD converges at the rate λ_min(K₀) predicts."
    )
    Config = WidthConfig
    paper_scale: ClassVar[dict[str, Any]] = {
        "device": "cuda",
        "data.n": 256,
        "widths": [64, 128, 256, 512, 1024, 2048],
        "trials": 6,
        "steps": 1000,
        "kernel_samples": 64,
    }

    def tasks(self, cfg: WidthConfig) -> list[dict[str, Any]]:
        return [{"width": m, "seed": cfg.seed + s} for m in cfg.widths for s in range(cfg.trials)]

    def run_task(self, cfg: WidthConfig, task: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        width, seed, T = int(task["width"]), int(task["seed"]), cfg.steps
        X, Y = load_data(cfg, ctx.device, ctx.dtype)
        n, k = Y.shape
        lr = infinite_width_lr(cfg, X, k)
        model = ntk_net(cfg, X.shape[1], k, width, seed, ctx.dtype).to(ctx.device)
        layers = _layers(model)
        prob = Problem(model, "mse", (X, Y))
        q = prob.q
        with torch.no_grad():
            F0 = model(X)
        ctx.log(f"width {width}, seed {seed}: NTK at initialization ({n} points)")
        K0 = ntk(model, X)
        K0f = _flat(K0)
        pred = predict(
            K0f,
            {"class": "GD", "lr": lr},
            T,
            f0=F0.double().cpu().numpy(),
            y=Y.double().cpu().numpy(),
            loss="mse",
        )
        lam = pred.eigenvalues
        lin = linearize(model)
        run_config = {
            "experiment": self.name,
            "model": f"mlp {[X.shape[1], *[width] * cfg.depth, k]} {cfg.activation} (ntk)",
            "loss": "mse (mean)",
            "data": f"{cfg.data.name} n={n}",
            "width": width,
            "lr": lr,
        }
        tracker = Tracker(
            prob,
            [
                LossProbe(),
                AccuracyProbe(),
                ThresholdProbe(),
                DistanceProbe(At(schedule_steps(T))),
            ],
            store=ctx.store,
            run_name=f"width-m{width}-seed{seed}",
            config={**run_config, "seed": seed},
        )
        ctx.log(f"width {width}, seed {seed}: training the network")
        tracker.record_prediction(pred)
        res = fit(prob, GD(model.parameters(), lr=lr), T, tracker, seed=seed, on_nonfinite="stop")
        base: dict[str, Any] = {
            "width": width,
            "seed": seed,
            "params": sum(p.numel() for p in model.parameters()),
            "n": n,
            "k": k,
            "lr": lr,
            "q": q,
            "lambda_min": float(lam[0]),
            "lambda_max": float(lam[-1]),
            "lr_over_threshold": lr * q * float(lam[-1]) / 2,
            "predicted_loss_rate": finite_or_none(pred.loss_rate),
            "predicted_stable": pred.stable,
            "diverged": res.diverged,
        }
        if res.diverged:
            base["diverged_at"] = res.diverged_at
            return base
        tracker.close("completed")
        with torch.no_grad():
            FT = model(X)
        final = float(prob.loss())
        # per-layer relative change at θ_T: the DistanceProbe's value at the last step
        change = {name: tracker.history[f"dist_init_rel/{name}"][-1][1] for name, _, _ in layers}
        s = min(cfg.kernel_samples, n)
        KT = _flat(ntk(model, X[:s]))
        K0s = K0f[: s * k, : s * k]
        drift = finite_or_none(float(torch.linalg.norm(KT - K0s) / torch.linalg.norm(K0s)))

        ctx.log(f"width {width}, seed {seed}: training the linearized model")
        lin_prob = Problem(lin, "mse", (X, Y))
        lin_tracker = Tracker(
            lin_prob,
            [LossProbe()],
            store=ctx.store,
            run_name=f"width-m{width}-seed{seed}-linearized",
            config={**run_config, "seed": seed, "model": "linearized " + run_config["model"]},
        )
        lin_res = fit(
            lin_prob, GD(lin.parameters(), lr=lr), T, lin_tracker, seed=seed, on_nonfinite="stop"
        )
        if not lin_res.diverged:
            lin_tracker.close("completed")
        with torch.no_grad():
            FL = lin(X)
        net_curve = np.asarray(res.losses)
        pred_curve = pred.loss[:T]
        lin_curve = np.asarray(lin_res.losses)
        idx = curve_points(T)
        return {
            **base,
            "loss0": float(net_curve[0]),
            "loss_final": final,
            "accuracy_final": accuracy(FT, Y),
            "layers": [
                {"name": name, "role": role, "shape": shape, "rel_change": change[name]}
                for name, role, shape in layers
            ],
            "kernel_samples": s,
            "kernel_drift": drift,
            **_rates(net_curve, pred_curve, cfg.tail, cfg.dtype),
            "lin_diverged": lin_res.diverged,
            **_gaps(net_curve, lin_curve, pred_curve, FT - FL, FL - F0),
            "curve": {
                "steps": idx,
                "loss": [float(net_curve[i]) for i in idx],
                "predicted": [finite_or_none(float(pred_curve[i])) for i in idx],
                "linearized": [
                    finite_or_none(float(lin_curve[i])) if i < lin_curve.size else None for i in idx
                ],
            },
        }

    # ------------------------------------------------------------------ judge
    def judge(self, cfg: WidthConfig, results: list[dict[str, Any]]) -> Judgement:
        ok = [r for r in results if not r["diverged"]]
        diverged = [r for r in results if r["diverged"]]
        verdicts = [_convergence_verdict(cfg, results, diverged)]
        fits: dict[str, tuple[LogLogFit | None, float, list[tuple[int, float]]]] = {}
        roles = [(lay["name"], lay["role"], lay["shape"]) for lay in ok[0]["layers"]] if ok else []
        for name, role, shape in roles:
            pts = [(r["width"], _layer(r, name)) for r in ok]
            dims = {"input": f"m×{shape[1]}", "hidden": "m×m", "readout": f"{shape[0]}×m"}[role]
            fits[f"{role} layer {name} ({dims})"] = (
                loglog_fit(*zip(*pts, strict=True), level=cfg.level),
                _ROLE_BOUND[role],
                pts,
            )
        pts = [(r["width"], r["kernel_drift"]) for r in ok if r["kernel_drift"] is not None]
        fits["kernel drift"] = (
            loglog_fit(*zip(*pts, strict=True), level=cfg.level) if pts else None,
            _DRIFT_BOUND,
            pts,
        )
        for label, (lf, bound, pts) in fits.items():
            le = local_exponents(pts, bound, cfg.level)
            verdicts.append(_slope_verdict(label, le, lf, bound, pts, diverged))
        verdicts.append(_rate_verdict(cfg, ok))
        gap_pts = [(r["width"], r["output_gap"]) for r in ok if r["output_gap"] is not None]
        gap_fit = loglog_fit(*zip(*gap_pts, strict=True), level=cfg.level) if gap_pts else None
        verdicts.append(_gap_verdict(gap_fit, gap_pts, ok))
        verdicts.append(_exact_verdict(cfg, ok))
        figures = []
        if ok:
            figures = [
                _slope_figure(fits),
                _curves_figure(ok),
                _gap_figure(gap_fit, gap_pts, ok),
            ]
        return Judgement(verdicts, figures)


def _rates(net: np.ndarray, pred: np.ndarray, tail: float, dtype: str) -> dict[str, Any]:
    """Loss factors per step fitted on the same tail window of the measured and predicted curves.

    Only the steps before either curve falls to ``(1000·eps)²·L_0`` (round-off of the dtype) or
    stops being finite are used.
    """
    out: dict[str, Any] = {"rate_measured": None, "rate_predicted_fit": None, "rate_ratio": None}
    floor = (1e3 * torch.finfo(getattr(torch, dtype)).eps) ** 2 * net[0]
    with np.errstate(invalid="ignore"):
        low = np.flatnonzero(
            ~np.isfinite(net) | ~np.isfinite(pred) | (net <= floor) | (pred <= floor)
        )
    cut = int(low[0]) if low.size else net.size
    try:
        fm, fp = fit_rates(net[:cut], tail=tail), fit_rates(pred[:cut], tail=tail)
    except InvalidArgumentError as e:
        out["rate_note"] = f"no rate fit: {e}"
        return out
    out["rate_measured"] = fm.exponential_rate
    out["rate_measured_ci"] = list(fm.exponential_rate_ci)
    out["rate_predicted_fit"] = fp.exponential_rate
    out["rate_window"] = list(fm.window)
    lm, lp = math.log(fm.exponential_rate), math.log(fp.exponential_rate)
    out["rate_ratio"] = lm / lp if lp < 0 else None
    return out


def _gaps(
    net: np.ndarray, lin: np.ndarray, pred: np.ndarray, out_gap: Tensor, out_move: Tensor
) -> dict[str, float | None]:
    """Network vs linearized model, and linearized model vs prediction (see module docstring).

    ``out_gap = F_T − F^lin_T``, ``out_move = F^lin_T − F_0``; curves are compared on the steps
    where all are finite (``None`` where nothing is left, e.g. a diverged linearization).
    """
    m = min(net.size, lin.size, pred.size)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        ok = np.isfinite(net[:m]) & np.isfinite(lin[:m]) & np.isfinite(pred[:m]) & (pred[:m] > 0)
        loss_gap = np.max(np.abs(net[:m] - lin[:m])[ok]) / net[0] if ok.any() else None
        exact = np.max((np.abs(lin[:m] - pred[:m]) / pred[:m])[ok]) if ok.any() else None
    return {
        "output_gap": finite_or_none(
            float(torch.linalg.norm(out_gap) / torch.linalg.norm(out_move))
        ),
        "loss_gap": finite_or_none(loss_gap),
        "lin_vs_prediction": finite_or_none(exact),
    }


def _layer(r: dict[str, Any], name: str) -> float:
    return next(lay["rel_change"] for lay in r["layers"] if lay["name"] == name)


def group_by_width(
    runs: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], Any]
) -> dict[int, list[Any]]:
    """``{width: [key(run), …]}`` in increasing width, runs in their given order."""
    out: dict[int, list[Any]] = {}
    for r in runs:
        out.setdefault(r["width"], []).append(key(r))
    return dict(sorted(out.items()))


def _convergence_verdict(
    cfg: WidthConfig, results: list[dict[str, Any]], diverged: list[dict[str, Any]]
) -> Verdict:
    claim = "GD reaches a global minimum at every width (100% training accuracy, loss → 0)"
    predicted = f"accuracy 100% and L_T ≤ {cfg.loss_tol:g}·L_0 after {cfg.steps} steps, every run"
    common = {"theorem": _CONVERGENCE_THEOREM, "section": _SECTION_WIDTH}
    if diverged:
        which = ", ".join(f"m={r['width']} seed {r['seed']}" for r in diverged)
        return Verdict(
            claim,
            predicted,
            f"diverged: {which} (η = {diverged[0]['lr']:.4g}, ηqλ_max(K₀)/2 = "
            + ", ".join(f"{r['lr_over_threshold']:.3g}" for r in diverged)
            + ")",
            False,
            {"diverged": [{"width": r["width"], "seed": r["seed"]} for r in diverged]},
            reason="a run at a step size below its own kernel's threshold should not diverge",
            **common,
        )
    per: dict[int, dict[str, Any]] = {}
    good = True
    for m, rs in group_by_width(results, lambda r: r).items():
        ratio = max(r["loss_final"] / r["loss0"] for r in rs)
        accs = [r["accuracy_final"] for r in rs if r["accuracy_final"] is not None]
        acc = min(accs) if accs else None
        per[m] = {"max_loss_ratio": ratio, "min_accuracy": acc}
        good &= ratio <= cfg.loss_tol and (acc is None or acc == 1.0)
    measured = "; ".join(
        f"m={m}: L_T/L_0 ≤ {v['max_loss_ratio']:.2g}"
        + ("" if v["min_accuracy"] is None else f", acc ≥ {v['min_accuracy']:.1%}")
        for m, v in per.items()
    )
    reason = (
        f"every run fits the training set and ends below {cfg.loss_tol:g} of its initial loss"
        if good
        else "some run did not reach the global minimum within the steps run"
    )
    return Verdict(claim, predicted, measured, good, {"per_width": per}, reason=reason, **common)


_SLOPE_THEOREM = (
    "In NTK parameterization the change of the weights during GD is bounded as the width m grows "
    "(Jacot et al.; Lee et al. 2019; Allen-Zhu, Li & Song): relative to their initial size, input "
    "and readout layers move O(m^-1/2), hidden m×m layers O(m^-1) (their ‖W_0‖_F grows like m), "
    "and the relative NTK drift is O(m^-1/2). These are asymptotic orders: they bound no "
    "finite-width slope. The rule therefore looks at the local exponents between successive "
    "widths, with intervals from the spread over seeds, and at their trend: the statement holds "
    "when the exponent at the two largest widths has reached the order (its interval at or "
    "below it, or containing it) or steepens toward it, and fails only when it sits above the "
    "order and has stopped approaching it."
)
_SECTION_WIDTH = "1-kernel-certificates"
_CONVERGENCE_THEOREM = (
    "Over-parameterized networks trained by GD on a squared loss converge to a global minimum "
    "(zero training loss) at a linear rate when λ_min(K) stays bounded away from 0 along the run "
    "and η < 2/(qλ_max(K)) (Du et al.; Allen-Zhu, Li & Song; Liu, Zhu & Belkin). Every run here "
    "uses η at a fixed fraction of the infinite-width threshold, so the hypotheses hold; the "
    "rule checks the conclusion at the end of the run."
)
_RATE_THEOREM = (
    "In the kernel regime the residual follows r_{t+1} = (I − ηqK₀) r_t, so the loss decays at "
    "the rate the NTK at initialization predicts; the approximation error vanishes as m → ∞ "
    "(Lee et al. 2019). The rule compares decay exponents measured on the tail of the run with "
    "those of the predicted curve on the same window, and tests that their ratio tends to 1."
)
_GAP_THEOREM = (
    "Lee et al. 2019: a wide network trained by GD stays close to its linearization around "
    "initialization, with a gap that vanishes as the width grows (O(m^-1/2)). The rule tests "
    "that the gap falls with width (log-log slope below 0 with its interval)."
)
_EXACT_THEOREM = (
    "For a model linear in its parameters the linearized recursion is exact, so the prediction "
    "from K₀ must reproduce the linearized model's GD run to rounding error."
)


def _slope_verdict(
    label: str,
    le: LocalExponents | None,
    pooled: LogLogFit | None,
    bound: float,
    pts: list[tuple[int, float]],
    diverged: list[dict[str, Any]],
) -> Verdict:
    what = (
        f"relative weight change ‖ΔW‖_F/‖W_0‖_F of the {label}"
        if "layer" in label
        else "relative NTK drift ‖K_T − K_0‖_F/‖K_0‖_F"
    )
    claim = f"{what} is O(m^{bound:g}) as the width m grows"
    predicted = (
        f"local exponent d log y/d log m at the largest widths ≤ {bound:g}, or approaching it "
        "as width grows"
    )
    details: dict[str, Any] = {"bound": bound, "points": [list(p) for p in pts]}
    if pooled is not None:
        details["pooled_fit"] = pooled.to_dict()
    common = {"theorem": _SLOPE_THEOREM, "section": _SECTION_WIDTH}
    if le is None:
        why = f"too few runs to estimate local exponents ({len(pts)} runs; need 2 widths, 2 seeds)"
        return Verdict(claim, predicted, why, None, details, reason=why, **common)
    details["local"] = le.to_dict()
    extra = f" ({len(diverged)} diverged runs left out)" if diverged else ""
    return Verdict(
        claim, predicted, le.describe() + extra, le.holds, details, reason=le.reason, **common
    )


def _rate_verdict(cfg: WidthConfig, ok: list[dict[str, Any]]) -> Verdict:
    """Agreement of the measured and predicted decay exponents, and its trend with width.

    Holds when ``|R − 1|`` (mean over seeds) is within ``rate_tol`` at the largest width, or when
    it shrinks with width (log-log slope of the per-run ``|R − 1|``, whole interval ``< 0``);
    fails when it grows (whole interval ``> 0``) without agreeing at the largest width.
    """
    claim = "the measured linear rate approaches the kernel prediction as width grows"
    per = group_by_width(ok, lambda r: r["rate_ratio"])
    mean = {m: float(np.mean([x for x in v if x is not None])) for m, v in per.items() if any(v)}
    lam = group_by_width(ok, lambda r: r["lambda_min"])
    guaranteed = group_by_width(ok, lambda r: r["predicted_loss_rate"] or math.inf)
    predicted = (
        "R = log ρ_measured / log ρ_predicted → 1: |R − 1| shrinks with width or is ≤ "
        f"{cfg.rate_tol:g} at the largest width (ρ: loss factor per step fitted on the last "
        f"{cfg.tail:.0%} of both curves; the prediction is the linearized run from K₀ with "
        "λ_min(K₀) = "
        + ", ".join(f"{np.mean(v):.3g}" for v in lam.values())
        + " and worst-mode bound ρ ≤ max|1 − ηqλ|² = "
        + ", ".join(f"{max(v):.6g}" for v in guaranteed.values())
        + f" for m = {', '.join(map(str, lam))})"
    )
    details: dict[str, Any] = {"mean_ratio": mean, "ratios": per, "tol": cfg.rate_tol}
    common = {"theorem": _RATE_THEOREM, "section": "2-optimizer-dynamics-in-the-kernel-regime"}
    if not mean:
        why = "no rate could be fitted (every run reached round-off or diverged too early)"
        return Verdict(claim, predicted, why, None, details, reason=why, **common)
    widths = sorted(mean)
    big = abs(mean[widths[-1]] - 1)
    pts = [(r["width"], abs(r["rate_ratio"] - 1)) for r in ok if r["rate_ratio"] is not None]
    trend = loglog_fit(*zip(*pts, strict=True), level=cfg.level)
    measured = "R = " + ", ".join(f"{mean[m]:.3f} (m={m})" for m in widths)
    if trend is not None:
        details["trend"] = trend.to_dict()
        measured += f"; |R − 1| against width: {trend.describe()}"
    agrees = big <= cfg.rate_tol
    if agrees:
        holds: bool | None = True
        reason = f"the rates agree within {cfg.rate_tol:g} at the largest width"
    elif trend is not None and trend.ci[1] < 0:
        holds, reason = True, "the rate mismatch |R − 1| shrinks with width"
    elif trend is not None and trend.ci[0] > 0:
        holds, reason = False, "the rate mismatch |R − 1| grows with width"
    else:
        holds, reason = None, "no trend of the rate mismatch with width within its interval"
    if not agrees:
        measured += f"; |R − 1| = {big:.3f} > {cfg.rate_tol:g} at the largest width"
    return Verdict(claim, predicted, measured, holds, details, reason=reason, **common)


def _gap_verdict(
    lf: LogLogFit | None, pts: list[tuple[int, float]], ok: list[dict[str, Any]]
) -> Verdict:
    claim = "the network tracks its linearization ever closer as width grows (Lee et al.)"
    predicted = (
        "relative output gap ‖F_T − F^lin_T‖/‖F^lin_T − F_0‖ falls with width: log-log slope < 0 "
        "(≈ −1/2 expected)"
    )
    mean = {
        m: float(np.mean(v))
        for m, v in group_by_width([{"width": w, "g": g} for w, g in pts], lambda r: r["g"]).items()
    }
    details: dict[str, Any] = {"mean_gap": mean, "points": [list(p) for p in pts]}
    common = {"theorem": _GAP_THEOREM, "section": "2-optimizer-dynamics-in-the-kernel-regime"}
    if lf is None:
        why = f"too few runs to fit ({len(pts)})"
        return Verdict(claim, predicted, why, None, details, reason=why, **common)
    lo, hi = lf.ci
    holds = True if hi < 0 else False if lo >= 0 else None
    reason = {
        True: "the gap falls with width beyond the slope's interval",
        False: "the gap does not fall with width",
        None: "the slope's interval contains 0",
    }[holds]
    details["fit"] = lf.to_dict()
    gaps = ", ".join(f"{g:.3g} (m={m})" for m, g in mean.items())
    measured = f"gap {gaps}; {lf.describe()}"
    return Verdict(claim, predicted, measured, holds, details, reason=reason, **common)


def _exact_verdict(cfg: WidthConfig, ok: list[dict[str, Any]]) -> Verdict:
    tol = 1e-8 if cfg.dtype == "float64" else 1e-3
    claim = "the kernel prediction is exact for the linearized model (the sharp test)"
    predicted = f"max_t |L^lin_t − L^pred_t|/L^pred_t ≤ {tol:g} ({cfg.dtype})"
    devs = [r["lin_vs_prediction"] for r in ok if r["lin_vs_prediction"] is not None]
    common = {"theorem": _EXACT_THEOREM, "section": "2-optimizer-dynamics-in-the-kernel-regime"}
    if not devs:
        why = "no linearized run to compare"
        return Verdict(claim, predicted, why, None, reason=why, **common)
    worst = max(devs)
    return Verdict(
        claim,
        predicted,
        f"largest relative deviation {worst:.2e} over {len(devs)} runs",
        worst <= tol,
        {"deviations": devs, "tol": tol},
        reason=f"agreement to {worst:.1e}" if worst <= tol else f"off by {worst:.1e} > {tol:g}",
        **common,
    )


# ---------------------------------------------------------------------------------- figures
def _width_axis(ax: Any, widths: Iterable[float]) -> None:
    """Label a log-scaled x axis with the widths themselves."""
    from matplotlib.ticker import NullLocator

    ticks = sorted({int(w) for w in widths})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("width m")


def _slope_figure(
    fits: dict[str, tuple[LogLogFit | None, float, list[tuple[int, float]]]],
) -> Figure:
    from matplotlib.figure import Figure as MplFigure

    panels = len(fits)
    fig = MplFigure(figsize=(3.6 * panels, 3.3))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, (label, (lf, bound, pts)) in zip(axes, fits.items(), strict=True):
        if not pts:
            continue
        x = np.array([p[0] for p in pts], dtype=float)
        y = np.array([p[1] for p in pts], dtype=float)
        ax.loglog(x, y, "o", color="C0", alpha=0.7, label="runs")
        xs = np.geomspace(x.min(), x.max(), 50)
        if lf is not None:
            ax.loglog(
                xs,
                np.exp(lf.intercept) * xs**lf.slope,
                "-",
                color="C0",
                label=f"fit {lf.slope:+.2f} [{lf.ci[0]:+.2f}, {lf.ci[1]:+.2f}]",
            )
        # the bound, drawn through the geometric mean of the narrowest width's runs
        y0 = float(np.exp(np.mean(np.log(y[x == x.min()]))))
        ax.loglog(
            xs, y0 * (xs / x.min()) ** bound, "--", color="C3", label=f"bound $m^{{{bound:g}}}$"
        )
        ax.set_title(label)
        _width_axis(ax, x)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("relative change")
    fig.tight_layout()
    return Figure.of(
        fig,
        "width_slopes",
        "Relative weight change per layer and relative NTK drift against width (log-log), with "
        "OLS fits over all runs and the theorems' bounds (dashed).",
    )


def _curves_figure(ok: list[dict[str, Any]]) -> Figure:
    from matplotlib.figure import Figure as MplFigure

    first = {}
    for r in ok:
        first.setdefault(r["width"], r)
    widths = sorted(first)
    fig = MplFigure(figsize=(3.2 * len(widths), 3.0))
    axes = fig.subplots(1, len(widths), squeeze=False, sharey=True)[0]
    for ax, m in zip(axes, widths, strict=True):
        c = first[m]["curve"]
        ax.semilogy(c["steps"], c["loss"], "-", label="network")
        ax.semilogy(c["steps"], np.asarray(c["predicted"], dtype=float), "--", label="predicted")
        ax.set_title(f"m = {m} (seed {first[m]['seed']})")
        ax.set_xlabel("step")
    axes[0].set_ylabel("training loss")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return Figure.of(
        fig,
        "width_loss_curves",
        "Measured training loss against the loss the linearized model predicts from the NTK at "
        "initialization (gdscope.predict), one seed per width.",
    )


def _gap_figure(
    lf: LogLogFit | None, pts: list[tuple[int, float]], ok: list[dict[str, Any]]
) -> Figure:
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(8, 3.3))
    ax, ax2 = fig.subplots(1, 2)
    x = np.array([p[0] for p in pts], dtype=float)
    y = np.array([p[1] for p in pts], dtype=float)
    ax.loglog(x, y, "o", alpha=0.7, label="runs")
    if lf is not None:
        xs = np.geomspace(x.min(), x.max(), 50)
        ax.loglog(
            xs,
            np.exp(lf.intercept) * xs**lf.slope,
            "-",
            label=f"fit {lf.slope:+.2f} [{lf.ci[0]:+.2f}, {lf.ci[1]:+.2f}]",
        )
    _width_axis(ax, x)
    ax.set_ylabel("relative output gap")
    ax.set_title("gap to the linearized model")
    ax.legend(fontsize=7)
    rr = [(r["width"], r["rate_ratio"]) for r in ok if r["rate_ratio"] is not None]
    if rr:
        ax2.semilogx([a for a, _ in rr], [b for _, b in rr], "o", alpha=0.7)
    ax2.axhline(1.0, color="k", lw=0.8, ls="--")
    _width_axis(ax2, x)
    ax2.set_ylabel("log ρ_measured / log ρ_predicted")
    ax2.set_title("measured vs predicted loss rate")
    fig.tight_layout()
    return Figure.of(
        fig,
        "width_gap",
        "Left: relative output gap between the network and its linearization after the same GD "
        "run, against width (log-log, OLS fit). Right: ratio of the measured to the predicted "
        "loss decay exponent (1 = agreement).",
    )
