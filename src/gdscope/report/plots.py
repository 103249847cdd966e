"""Report figures, rendered off-screen to ``data:`` URIs the HTML embeds.

Each figure function takes ``runs`` (run label -> metric name -> ``(x, values)`` as returned by
:meth:`gdscope.store.Store.series`) and ``colors`` (run label -> colour, see :func:`run_colors`)
and returns a :class:`Plot`, or ``None`` when no run has the figure's metrics. Figures are drawn
on :class:`matplotlib.figure.Figure` objects directly, so pyplot and the user's backend are never
touched.
"""

from __future__ import annotations

import base64
import io
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = [
    "BOOLEAN_METRICS",
    "KNOWN_METRICS",
    "Plot",
    "accuracy_figure",
    "is_boolean_metric",
    "layer_labels",
    "metric_title",
    "distance_figure",
    "grad_norm_figure",
    "loss_figure",
    "other_figures",
    "other_metric_names",
    "preconditioned_sharpness_figure",
    "prediction_figure",
    "run_colors",
    "sharpness_figure",
    "standard_figures",
    "trace_figure",
]

Series = tuple[np.ndarray, np.ndarray]
Runs = Mapping[str, Mapping[str, Series]]
Colors = Mapping[str, str]

#: Metrics drawn in the standard figures (everything else numeric goes to "Other metrics").
KNOWN_METRICS = frozenset(
    {
        "loss",
        "accuracy",
        "grad_norm",
        "dist_init",
        "dist_init_rel",
        "sharpness",
        "threshold",
        "preconditioned_sharpness",
        "preconditioned_threshold",
        "hessian_trace",
        "hessian_trace_se",
    }
)
#: Metrics that are 1/0 flags: drawn as shaded spans (1) and markers (0), never as lines.
BOOLEAN_METRICS = frozenset({"sharpness_converged", "disparity_full_rank"})
_BOOLEAN_SUFFIXES = ("_converged", "_full_rank", "_stable", "_ok")

#: Built-in metric names in words (see gdscope.probes); ``<family>/<module>`` names add the layer.
METRIC_WORDS = {
    "loss": "training loss",
    "accuracy": "training accuracy",
    "grad_norm": "gradient norm ‖∇L‖",
    "dist_init": "distance from initialization ‖θ − θ₀‖",
    "dist_init_rel": "relative distance from initialization ‖θ − θ₀‖/‖θ₀‖",
    "sharpness": "sharpness λ_max(∇²L)",
    "sharpness_residual": "sharpness: Lanczos residual ‖Hv − λv‖",
    "sharpness_converged": "sharpness: Lanczos converged",
    "sharpness_matvecs": "sharpness: Hessian-vector products per estimate",
    "threshold": "stability threshold (2/η for GD)",
    "preconditioned_sharpness": "preconditioned sharpness λ_max(P⁻¹∇²L) (Adam)",
    "preconditioned_threshold": "preconditioned stability threshold (Adam: (2 + 2β₁)/((1 − β₁)η))",
    "lr": "learning rate η",
    "hessian_trace": "Hessian trace",
    "hessian_trace_se": "Hessian trace: standard error",
    "ntk_lambda_min": "smallest NTK eigenvalue λ_min(K)",
    "ntk_lambda_max": "largest NTK eigenvalue λ_max(K)",
    "ntk_condition": "NTK condition number λ_max/λ_min",
    "ntk_drift": "relative kernel drift ‖K_t − K_0‖/‖K_0‖",
    "ntk_alignment": "kernel-target alignment",
    "pl_ratio": "PL ratio ‖∇L‖²/(2L)",
    "pl_bound": "PL lower bound q·λ_min(K)",
    "disparity_sigma_min": "smallest singular value of the disparity matrix",
    "disparity_rank": "rank of the disparity matrix",
    "disparity_full_rank": "disparity matrix has full rank",
    "local_smoothness": "local smoothness ‖Δ∇L‖/‖Δθ‖",
    "semi_smooth_residual": "semi-smoothness residual L(θ+Δ) − L(θ) − ⟨∇L, Δ⟩",
    "semi_smooth_ratio": "semi-smoothness residual / ‖Δ‖²",
    "step_norm": "step length ‖Δθ‖",
    "step_norm_sq": "squared step length ‖Δθ‖²",
    "grad_ratio": "gradient ratio ‖∇L‖²/L",
    "relu_pattern_change": "fraction of ReLU on/off patterns changed since initialization",
    "data_separation": "data separation δ of the normalized inputs",
    "data_separation_samples": "samples used for the data separation",
    "data_zero_inputs": "zero inputs in the data",
    "param_norm": "parameter norm ‖θ‖",
    "margin": "classification margin min_i (f_y − max_j f_j)",
    "normalized_margin": "normalized margin (margin/‖θ‖^D)",
    "step_time": "training loop time per step (s)",
}
#: Per-layer families ``<family>/<module>``: the words before the layer.
LAYER_WORDS = {
    "dist_init": "distance from initialization",
    "dist_init_rel": "relative distance from initialization",
    "grad_ratio": "gradient ratio ‖∇_l L‖²/L",
    "relu_pattern_change": "fraction of ReLU patterns changed",
    "block_sv_min": "block Jacobian singular values: minimum",
    "block_sv_q10": "block Jacobian singular values: 10th percentile",
    "block_sv_q50": "block Jacobian singular values: median",
    "block_sv_q90": "block Jacobian singular values: 90th percentile",
    "block_sv_max": "block Jacobian singular values: maximum",
}
#: Families whose ``<module>`` owns parameters (numbered as layers when all are numeric).
_PARAM_FAMILIES = ("dist_init", "dist_init_rel", "grad_ratio")


def _natural(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split("."))


def layer_labels(names: Sequence[str]) -> dict[str, str]:
    """Module name -> words for the per-layer metrics among ``names``.

    When every module with parameters is numbered (``nn.Sequential``: ``0``, ``2``, ``4.1``),
    they are layers counted from 1 in that order: ``layer 1 (module 0)``; otherwise
    ``module 'fc1'``.
    """
    modules = {n.split("/", 1)[1] for n in names if "/" in n and n.split("/", 1)[0] in LAYER_WORDS}
    params = sorted(
        {n.split("/", 1)[1] for n in names if "/" in n and n.split("/", 1)[0] in _PARAM_FAMILIES}
    )
    if params and all(re.fullmatch(r"\d+(?:\.\d+)*", m) for m in params):
        order = sorted(params, key=_natural)
        labels = {m: f"layer {i} (module {m})" for i, m in enumerate(order, 1)}
    else:
        labels = {}
    return {m: labels.get(m, f"module '{m}'") for m in modules}


def metric_title(name: str, layers: Mapping[str, str] | None = None) -> str:
    """A metric's name in words (built-in probes; ``layers`` from :func:`layer_labels`).

    ``dist_init/0`` → ``distance from initialization, layer 1 (module 0)``; ``time/<probe>``
    → ``time in probe <probe> (s)``; unknown names are returned as they are.
    """
    if name in METRIC_WORDS:
        return METRIC_WORDS[name]
    family, sep, module = name.partition("/")
    if sep and family == "time":
        return f"time in probe {module} (s)"
    if sep and family in LAYER_WORDS:
        where = (layers or {}).get(module) or layer_labels([name])[module]
        return f"{LAYER_WORDS[family]}, {where}"
    if sep and family == "block_jacobian":
        return f"block Jacobian, module '{module}'"
    return name


def is_boolean_metric(name: str, values: np.ndarray | None = None) -> bool:
    """Whether ``name`` is a 1/0 flag (a known flag, or a ``…_converged``-style name whose
    finite values are all 0 or 1)."""
    base = name.split("/", 1)[0]
    if base in BOOLEAN_METRICS:
        return True
    if not base.endswith(_BOOLEAN_SUFFIXES):
        return False
    if values is None:
        return True
    finite = values[np.isfinite(values)]
    return bool(np.isin(finite, (0.0, 1.0)).all())


#: Characters of legend text that fit across a full-width figure (small font).
LEGEND_CHARS = 110
#: Resolution of the PNG figures (dots per inch).
DPI = 110
SIZE, SMALL_SIZE = (7.0, 3.4), (4.2, 2.6)
#: Series with at most this many points get markers (sparse probes such as sharpness).
MARKER_MAX_POINTS = 80
#: "Other metrics" use a log axis when positive and spanning more decades than this.
LOG_SPAN_DECADES = 3.0


@dataclass(frozen=True)
class Plot:
    """One rendered figure: a stable ``name``, a ``caption`` and the PNG as a data URI."""

    name: str
    caption: str
    uri: str


def run_colors(labels: Sequence[str]) -> dict[str, str]:
    """A stable colour per run, in the order given (tab10, cycling)."""
    palette = colormaps["tab10"].colors  # type: ignore[attr-defined]
    return {label: to_hex(palette[i % len(palette)]) for i, label in enumerate(labels)}


# ---------------------------------------------------------------------- helpers
def _figure(panels: int = 1, small: bool = False) -> tuple[Figure, list[Axes]]:
    w, h = SMALL_SIZE if small else SIZE
    fig = Figure(figsize=(w if panels == 1 else w * 0.75 * panels, h), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("step")
    return fig, list(axes)


def _text(s: str) -> str:
    """A user string as literal matplotlib text (no mathtext between dollar signs)."""
    return s.replace("$", r"\$")


def _finite(v: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(v), v, np.nan)


def _line(ax: Axes, series: Series, color: str, label: str) -> None:
    x, v = series
    marker = "o" if x.size <= MARKER_MAX_POINTS else None
    ax.plot(x, _finite(v), color=color, marker=marker, ms=3, lw=1.3, label=_text(label))


def _render(fig: Figure, name: str, caption: str) -> Plot:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return Plot(name, caption, f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}")


def _legend(ax: Axes, extra: Sequence[Line2D] = ()) -> None:
    """One legend below the plotting area (never over the curves)."""
    handles, labels = ax.get_legend_handles_labels()
    labels = [*labels, *(h.get_label() for h in extra)]
    n = len(labels)
    if n > 0:
        # as many columns as fit the figure's width (long run names get fewer columns)
        longest = max(len(label) for label in labels)
        ncols = max(1, min(n, 4, LEGEND_CHARS // (longest + 6)))
        ax.figure.legend(
            [*handles, *extra],
            labels,
            loc="outside lower center",
            ncols=ncols,
            fontsize="small",
            frameon=False,
        )


def _single(
    runs: Runs, colors: Colors, metric: str, name: str, title: str, caption: str, log: bool = False
) -> Plot | None:
    have = {label: s[metric] for label, s in runs.items() if metric in s}
    if not have:
        return None
    fig, (ax,) = _figure()
    for label, series in have.items():
        _line(ax, series, colors[label], label)
    if log and any((_finite(v) > 0).any() for _, v in have.values()):
        ax.set_yscale("log")
    ax.set_title(title)
    _legend(ax)
    return _render(fig, name, caption)


# ---------------------------------------------------------------------- the figures
def loss_figure(runs: Runs, colors: Colors) -> Plot | None:
    """Training loss, log scale."""
    return _single(
        runs,
        colors,
        "loss",
        "loss",
        "training loss",
        "Training loss (log scale) against the step (updates applied).",
        log=True,
    )


def accuracy_figure(runs: Runs, colors: Colors) -> Plot | None:
    """Training accuracy."""
    return _single(
        runs,
        colors,
        "accuracy",
        "accuracy",
        "training accuracy",
        "Training accuracy; 1.0 is zero training error.",
    )


def grad_norm_figure(runs: Runs, colors: Colors) -> Plot | None:
    """Gradient norm, log scale."""
    return _single(
        runs,
        colors,
        "grad_norm",
        "grad_norm",
        "gradient norm ‖∇L‖",
        "Norm of the full gradient (log scale).",
        log=True,
    )


#: Thresholds of the runs on one figure that differ by more than this factor put every run's
#: sharpness on one relative axis (sharpness/threshold), so no threshold squashes another's band.
THRESHOLD_SPREAD = 3.0

#: The pairs drawn as sharpness figures: (figure name, sharpness metric, threshold metric, title,
#: the threshold in words).
SHARPNESS_PAIRS = (
    ("sharpness", "sharpness", "threshold", "sharpness λ_max(∇²L)", "2/η for GD"),
    (
        "preconditioned-sharpness",
        "preconditioned_sharpness",
        "preconditioned_threshold",
        "preconditioned sharpness λ_max(P⁻¹∇²L)",
        "(2 + 2β₁)/((1 − β₁)η) for Adam",
    ),
)


def sharpness_figure(
    runs: Runs,
    colors: Colors,
    orbits: Mapping[str, tuple[int, int]] | None = None,
    pair: int = 0,
    predictions: Mapping[str, Mapping[str, Any]] | None = None,
) -> Plot | None:
    """Sharpness per run, with its stability threshold dashed in the same colour.

    ``pair`` picks the metrics from :data:`SHARPNESS_PAIRS` (0: ``sharpness``/``threshold``,
    1: Adam's ``preconditioned_sharpness``/``preconditioned_threshold``). When the runs'
    thresholds differ by more than :data:`THRESHOLD_SPREAD` (e.g. 2/η at η = 0.25 and at 2),
    every run is drawn relative to its own threshold (``λ/threshold``, one line at 1).
    ``orbits`` maps a run label to ``(period, onset step)`` of a detected cycle: a dotted
    vertical line in the run's colour marks the onset, labelled with the period.
    ``predictions`` maps a run label to its recorded prediction (``Tracker.record_prediction``);
    one with a ``"sharpness"`` list at its ``"steps"`` (a central flow) is drawn dashed (long
    dashes) in the run's colour, relative to the run's threshold when the view is relative.
    """
    name, metric, thr_metric, title, thr_words = SHARPNESS_PAIRS[pair]
    have = [label for label, s in runs.items() if metric in s]
    if not have:
        return None
    view = {label: {"sharpness": runs[label][metric]} for label in have}
    for label in have:
        if thr_metric in runs[label]:
            view[label]["threshold"] = runs[label][thr_metric]
    relative = _relative_view(view)
    fig, (ax,) = _figure()
    if relative is not None:
        view = relative
        ax.axhline(1.0, color="0.35", ls="--", lw=1.1)
    for label in have:
        _line(ax, view[label]["sharpness"], colors[label], label)
        if relative is None and "threshold" in view[label]:
            x, thr = view[label]["threshold"]
            ax.plot(x, _finite(thr), "--", color=colors[label], lw=1.1, drawstyle="steps-post")
    overlaid = _overlay_predicted_sharpness(
        ax, predictions if pair == 0 else None, have, colors, runs, thr_metric, relative
    )
    for label, (period, onset) in (orbits or {}).items():
        if label in colors:
            ax.axvline(onset, color=colors[label], ls=":", lw=1.2)
            ax.annotate(
                f"period {period}",
                (onset, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -12),
                textcoords="offset points",
                color=colors[label],
                fontsize="small",
            )
    if relative is None:
        ax.set_title(title)
        threshold = Line2D([], [], color="0.35", ls="--", label=f"threshold ({thr_words})")
        _legend(ax, [threshold] if any("threshold" in view[label] for label in have) else [])
        caption = (
            f"{title[0].upper()}{title[1:]}; dashed: the optimizer's stability threshold "
            f"({thr_words}), in the run's colour (it follows the learning-rate schedule). The "
            "edge of stability is where they meet."
        )
    else:
        ax.set_title(f"{title} / threshold")
        _legend(ax, [Line2D([], [], color="0.35", ls="--", label="threshold (= 1)")])
        caption = (
            f"{title[0].upper()}{title[1:]} divided by each run's own stability threshold "
            f"({thr_words}, taken at each step): the thresholds differ by more than "
            f"{THRESHOLD_SPREAD:g}×, so on one absolute axis the largest would squash the others. "
            "The edge of stability is the dashed line at 1."
        )
    if overlaid:
        caption += (
            " Long dashes: the sharpness predicted by the run's recorded prediction ("
            + ", ".join(sorted(overlaid))
            + ")."
        )
    clipped = _band_of_interest(ax, view, have, colors)
    if clipped:
        caption += (
            f" The y axis is cut at {clipped[0]:.4g} to keep the band around the threshold "
            f"readable: {clipped[1]} value(s) above it (up to {clipped[2]:.4g}) are drawn as ▲ "
            "on the top edge."
        )
    return _render(fig, name, caption)


#: Dash pattern of a predicted sharpness (the threshold uses the default short dashes).
PREDICTED_DASHES = (0, (7, 3))


def _overlay_predicted_sharpness(
    ax: Any,
    predictions: Mapping[str, Mapping[str, Any]] | None,
    have: list[str],
    colors: Colors,
    runs: Runs,
    thr_metric: str,
    relative: Mapping[str, Any] | None,
) -> set[str]:
    """Draw each recorded prediction's ``"sharpness"`` (at its ``"steps"``) on ``ax``; returns
    the prediction labels drawn. Relative views divide by the run's threshold at those steps."""
    drawn: set[str] = set()
    for label in have:
        pred = (predictions or {}).get(label)
        if not pred or not pred.get("sharpness") or not pred.get("steps"):
            continue
        x = np.asarray(pred["steps"], dtype=np.float64)
        v = np.asarray([np.nan if s is None else s for s in pred["sharpness"]], dtype=np.float64)
        if x.shape != v.shape:
            continue
        if relative is not None:
            if thr_metric not in runs[label]:
                continue
            v = v / _threshold_at(runs[label][thr_metric], x)
        ax.plot(x, _finite(v), color=colors[label], ls=PREDICTED_DASHES, lw=1.6, alpha=0.8)
        drawn.add(str(pred.get("label", "prediction")))
    if drawn:
        ax.plot([], [], color="0.35", ls=PREDICTED_DASHES, lw=1.6, label="predicted sharpness")
    return drawn


def _threshold_at(threshold: Series, steps: np.ndarray) -> np.ndarray:
    """The threshold in force at each of ``steps`` (it holds until the next record; NaN before
    the first)."""
    x, thr = threshold
    idx = np.searchsorted(x, steps, side="right") - 1
    out = np.full(steps.shape, np.nan)
    ok = idx >= 0
    out[ok] = thr[idx[ok]]
    return out


def _relative_view(view: Runs) -> dict[str, dict[str, Series]] | None:
    """Each run's sharpness divided by its threshold, with threshold 1, when every run has a
    positive threshold and their medians differ by more than :data:`THRESHOLD_SPREAD`; else
    None."""
    if any("threshold" not in s for s in view.values()):
        return None
    medians = []
    for s in view.values():
        thr = s["threshold"][1]
        thr = thr[np.isfinite(thr)]
        if not thr.size or thr.min() <= 0:
            return None
        medians.append(float(np.median(thr)))
    if max(medians) <= THRESHOLD_SPREAD * min(medians):
        return None
    out: dict[str, dict[str, Series]] = {}
    for label, s in view.items():
        x, v = s["sharpness"]
        out[label] = {
            "sharpness": (x, v / _threshold_at(s["threshold"], x)),
            "threshold": (x, np.ones(x.shape)),
        }
    return out


#: The sharpness axis ends this far above the largest value it shows.
HEADROOM = 1.25
#: With a threshold, sharpness up to this multiple of it is shown; beyond is a blow-up.
BAND_MULTIPLE = 4.0
#: Without one, sharpness above this quantile may fall off the axis.
ROBUST_QUANTILE = 0.9


def _band_of_interest(
    ax: Axes, runs: Runs, have: Sequence[str], colors: Colors
) -> tuple[float, int, float] | None:
    """Set the sharpness axis so sharpness near the threshold is readable.

    A spike of a diverging run would otherwise squash the band. The top is ``HEADROOM`` × the
    largest sharpness within ``BAND_MULTIPLE`` × the highest threshold (at least the threshold
    itself); without a threshold, × the :data:`ROBUST_QUANTILE` quantile of the sharpness. The
    bottom is 0 for non-negative data. Values above the top are marked ▲ on the edge.
    Returns ``(top, count clipped, largest value)``, or None when nothing is cut.
    """
    sharp = np.concatenate([runs[label]["sharpness"][1] for label in have])
    sharp = sharp[np.isfinite(sharp)]
    thr = [runs[label]["threshold"][1] for label in have if "threshold" in runs[label]]
    thr_all = np.concatenate(thr) if thr else np.array([])
    thr_all = thr_all[np.isfinite(thr_all)]
    if not sharp.size:
        return None
    if thr_all.size and thr_all.max() > 0:
        band = sharp[sharp <= BAND_MULTIPLE * thr_all.max()]
        ref = max(float(thr_all.max()), float(band.max()) if band.size else -np.inf)
    else:
        ref = float(np.quantile(sharp, ROBUST_QUANTILE))
    low = min(float(sharp.min()), float(thr_all.min()) if thr_all.size else np.inf)
    top = HEADROOM * ref if ref > 0 else float(sharp.max())
    if sharp.max() <= top or top <= low:
        return None
    bottom = 0.0 if low >= 0 else low - 0.05 * (top - low)
    ax.set_ylim(bottom, top)
    count = 0
    for label in have:
        x, v = runs[label]["sharpness"]
        over = np.isfinite(v) & (v > top)
        count += int(over.sum())
        if over.any():
            ax.plot(
                x[over],
                np.full(int(over.sum()), top),
                "^",
                color=colors[label],
                ms=6,
                clip_on=False,
            )
    return top, count, float(sharp.max())


def prediction_figure(
    runs: Runs, predictions: Mapping[str, Mapping[str, Any]], colors: Colors
) -> Plot | None:
    """Measured loss (solid) against each run's recorded prediction (dashed), log scale."""
    have = [label for label in runs if label in predictions and "loss" in runs[label]]
    if not have:
        return None
    fig, (ax,) = _figure()
    for label in have:
        x, v = runs[label]["loss"]
        ax.plot(x, _finite(v), color=colors[label], lw=1.3, label=_text(label))
        pred = predictions[label]
        ax.plot(
            pred["steps"],
            _finite(np.asarray(pred["loss"], float)),
            "--",
            color=colors[label],
            lw=1.3,
        )
    ax.set_yscale("log")
    ax.set_title("loss: measured vs predicted")
    labels = sorted({str(predictions[label].get("label", "prediction")) for label in have})
    _legend(ax, [Line2D([], [], color="0.35", ls="--", label=f"predicted ({', '.join(labels)})")])
    caption = (
        "Training loss as measured (solid) and as predicted before training (dashed, same colour) "
        "by " + ", ".join(labels) + ", against the step (updates applied)."
    )
    return _render(fig, "prediction", caption)


def distance_figure(runs: Runs, colors: Colors) -> Plot | None:
    """Distance from initialization: absolute, and relative on a second panel."""
    metrics = [m for m in ("dist_init", "dist_init_rel") if any(m in s for s in runs.values())]
    if not metrics:
        return None
    fig, axes = _figure(len(metrics))
    titles = {
        "dist_init": "distance from init. ‖θ − θ₀‖",
        "dist_init_rel": "relative distance ‖θ − θ₀‖/‖θ₀‖",
    }
    for ax, metric in zip(axes, metrics, strict=True):
        for label, s in runs.items():
            if metric in s:
                _line(ax, s[metric], colors[label], label)
        ax.set_title(titles[metric])
    _legend(axes[0])
    return _render(
        fig,
        "dist_init",
        "Distance of the parameters from their initialization; "
        "a small relative distance is the kernel (lazy) regime.",
    )


def trace_figure(runs: Runs, colors: Colors) -> Plot | None:
    """Hessian trace with a ±2 standard-error band when the estimate's error is recorded."""
    have = [label for label, s in runs.items() if "hessian_trace" in s]
    if not have:
        return None
    fig, (ax,) = _figure()
    for label in have:
        x, tr = runs[label]["hessian_trace"]
        _line(ax, (x, tr), colors[label], label)
        se = runs[label].get("hessian_trace_se")
        if se is not None and np.array_equal(se[0], x):
            band = 2 * _finite(se[1])
            ax.fill_between(x, tr - band, tr + band, color=colors[label], alpha=0.2, lw=0)
    ax.set_title("Hessian trace")
    _legend(ax)
    return _render(
        fig,
        "hessian_trace",
        "Hessian trace (stochastic estimate); shaded: ±2 standard errors of the estimate.",
    )


def preconditioned_sharpness_figure(runs: Runs, colors: Colors) -> Plot | None:
    """Adam's preconditioned sharpness against its threshold (:func:`sharpness_figure`, pair 1)."""
    return sharpness_figure(runs, colors, pair=1)


FIGURES = (
    loss_figure,
    accuracy_figure,
    sharpness_figure,
    preconditioned_sharpness_figure,
    grad_norm_figure,
    distance_figure,
    trace_figure,
)


def standard_figures(
    runs: Runs,
    colors: Colors,
    orbits: Mapping[str, tuple[int, int]] | None = None,
    skip: Collection[str] = (),
    predictions: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Plot]:
    """The standard figures some run has metrics for, in report order, leaving out those named
    in ``skip`` (e.g. a figure an experiment page already draws its own way; ``orbits`` and
    ``predictions``: see :func:`sharpness_figure`)."""
    figures = (
        sharpness_figure(runs, colors, orbits, predictions=predictions)
        if f is sharpness_figure
        else f(runs, colors)
        for f in FIGURES
    )
    return [p for p in figures if p is not None and p.name not in skip]


def other_metric_names(runs: Runs) -> list[str]:
    """Metrics no standard figure draws, without timings (``step_time``, ``time/<probe>``)."""
    names = {n for s in runs.values() for n in s}
    return sorted(
        n for n in names - KNOWN_METRICS if n != "step_time" and not n.startswith("time/")
    )


def other_figures(runs: Runs, colors: Colors) -> list[Plot]:
    """One small figure per metric of :func:`other_metric_names`, titled in words
    (:func:`metric_title`); 1/0 flags (:func:`is_boolean_metric`) as shaded spans."""
    plots = []
    names = other_metric_names(runs)
    layers = layer_labels(sorted({n for s in runs.values() for n in s}))
    for metric in names:
        have = {label: s[metric] for label, s in runs.items() if metric in s}
        title = metric_title(metric, layers)
        caption = title if title == metric else f"{title} (metric {metric})"
        values = np.concatenate([v for _, v in have.values()])
        if is_boolean_metric(metric, values):
            plots.append(_flag_figure(metric, have, colors, title, caption))
            continue
        fig, (ax,) = _figure(small=True)
        for label, series in have.items():
            _line(ax, series, colors[label], label)
        finite = values[np.isfinite(values)]
        if (
            finite.size
            and (finite > 0).all()
            and np.log10(finite.max() / finite.min()) > LOG_SPAN_DECADES
        ):
            ax.set_yscale("log")
            caption += "; log scale"
        ax.set_title(_text(title), fontsize="medium", wrap=True)
        if len(runs) > 1:
            _legend(ax)
        plots.append(_render(fig, f"other:{metric}", caption))
    return plots


def _flag_figure(
    metric: str, have: Mapping[str, Series], colors: Colors, title: str, caption: str
) -> Plot:
    """A 1/0 metric: per run a row, shaded where the flag is 1 (until the next measurement),
    ✕ where it is 0; no line between the values."""
    fig, (ax,) = _figure(small=True)
    labels = list(have)
    for row, label in enumerate(labels):
        x, v = have[label]
        if not x.size:
            continue
        ends = np.append(x[1:], x[-1] + 1)
        on = v == 1
        spans = [(float(a), float(b - a)) for a, b, f in zip(x, ends, on, strict=True) if f]
        ax.broken_barh(spans, (row - 0.35, 0.7), color=colors[label], alpha=0.45, lw=0)
        off = v == 0
        ax.plot(x[off], np.full(int(off.sum()), row), "x", color=colors[label], ms=5, ls="none")
    ax.set_yticks(range(len(labels)), [_text(lb) for lb in labels], fontsize="small")
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.grid(False)
    ax.set_title(_text(title), fontsize="medium", wrap=True)
    return _render(
        fig, f"other:{metric}", f"{caption}: shaded where yes (1), ✕ where no (0), per run"
    )
