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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = [
    "KNOWN_METRICS",
    "Plot",
    "accuracy_figure",
    "distance_figure",
    "grad_norm_figure",
    "loss_figure",
    "other_figures",
    "other_metric_names",
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
        "hessian_trace",
        "hessian_trace_se",
    }
)
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
    handles, labels = ax.get_legend_handles_labels()
    if len(handles) + len(extra) > 0:
        ax.legend([*handles, *extra], [*labels, *(h.get_label() for h in extra)], fontsize="small")


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


def sharpness_figure(
    runs: Runs, colors: Colors, orbits: Mapping[str, tuple[int, int]] | None = None
) -> Plot | None:
    """Sharpness per run, with its stability threshold dashed in the same colour.

    ``orbits`` maps a run label to ``(period, onset step)`` of a detected cycle: a dotted
    vertical line in the run's colour marks the onset, labelled with the period.
    """
    have = [label for label, s in runs.items() if "sharpness" in s]
    if not have:
        return None
    fig, (ax,) = _figure()
    for label in have:
        _line(ax, runs[label]["sharpness"], colors[label], label)
        if "threshold" in runs[label]:
            x, thr = runs[label]["threshold"]
            ax.plot(x, _finite(thr), "--", color=colors[label], lw=1.1, drawstyle="steps-post")
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
    ax.set_title("sharpness λ_max(∇²L)")
    threshold = Line2D([], [], color="0.35", ls="--", label="threshold (2/η for GD)")
    _legend(ax, [threshold] if any("threshold" in runs[label] for label in have) else [])
    caption = (
        "Sharpness (largest Hessian eigenvalue); dashed: the optimizer's stability threshold, in "
        "the run's colour (it follows the learning-rate schedule). The edge of stability is "
        "where they meet."
    )
    return _render(fig, "sharpness", caption)


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
    titles = {"dist_init": "‖θ − θ₀‖", "dist_init_rel": "‖θ − θ₀‖ / ‖θ₀‖"}
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


FIGURES = (
    loss_figure,
    accuracy_figure,
    sharpness_figure,
    grad_norm_figure,
    distance_figure,
    trace_figure,
)


def standard_figures(
    runs: Runs, colors: Colors, orbits: Mapping[str, tuple[int, int]] | None = None
) -> list[Plot]:
    """The standard figures some run has metrics for, in report order (``orbits``: see
    :func:`sharpness_figure`)."""
    figures = (
        sharpness_figure(runs, colors, orbits) if f is sharpness_figure else f(runs, colors)
        for f in FIGURES
    )
    return [p for p in figures if p is not None]


def other_metric_names(runs: Runs) -> list[str]:
    """Metrics no standard figure draws, without timings (``step_time``, ``time/<probe>``)."""
    names = {n for s in runs.values() for n in s}
    return sorted(
        n for n in names - KNOWN_METRICS if n != "step_time" and not n.startswith("time/")
    )


def other_figures(runs: Runs, colors: Colors) -> list[Plot]:
    """One small figure per metric of :func:`other_metric_names`."""
    plots = []
    for metric in other_metric_names(runs):
        fig, (ax,) = _figure(small=True)
        values = []
        for label, s in runs.items():
            if metric in s:
                _line(ax, s[metric], colors[label], label)
                values.append(s[metric][1])
        finite = np.concatenate(values)
        finite = finite[np.isfinite(finite)]
        if (
            finite.size
            and (finite > 0).all()
            and np.log10(finite.max() / finite.min()) > LOG_SPAN_DECADES
        ):
            ax.set_yscale("log")
        ax.set_title(_text(metric), fontsize="medium")
        if len(runs) > 1:
            _legend(ax)
        plots.append(_render(fig, f"other:{metric}", metric))
    return plots
