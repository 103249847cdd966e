"""Cross-entropy minima lie at infinity: loss → 0, ‖θ‖ → ∞ like log t, normalized margin rises.

THEORY §4. A bias-free ReLU MLP is positively homogeneous of degree ``D`` (the number of linear
layers: ``f(cθ) = c^D f(θ)`` for ``c > 0``). Trained with full-batch GD on cross-entropy on
separable data it has no finite minimizer: the loss tends to 0 only as the weights grow without
bound, roughly like ``log t`` (the loss falls like ``1/t``), while the direction of ``θ``
converges and the normalized margin ``γ̄ = min_i (f_{y_i}(x_i) − max_{j≠y_i} f_j(x_i))/‖θ‖^D``
rises (Lyu & Li 2020, once every sample is classified correctly).

Each task (one seed and learning rate) trains such a net on a data-set subset (digits by
default) and records, on a log-spaced plus linear grid of steps, ``‖θ‖``, the margin and
``γ̄`` (:class:`~gdscope.probes.certificates.MarginProbe`) and the training accuracy. Those
probes measure the iterate after the update: the record at step ``t`` is ``θ_{t+1}``, placed
at ``t + 1`` steps.

Claims (one verdict row each, holding when every task agrees):

* the loss tends to 0: ``L_T/L_0 ≤ loss_tol`` and ``L`` is non-increasing over the second half;
* ``‖θ‖`` grows like ``log t``: over the records after the first positive margin, ``‖θ‖``
  against ``log t`` has a slope whose interval is above 0, and fits better than ``‖θ‖``
  against ``t`` (both by :func:`gdscope.theory.fit_rates` applied to ``exp(‖θ‖ − ‖θ‖₀)``:
  its exponential fit is ``‖θ‖`` linear in ``t``, its power fit ``‖θ‖`` linear in ``log t``);
* ``γ̄`` rises: its slope against ``t`` over the second half of the run (records after the
  first positive margin) has an interval above 0 (fitted the same way), and its last value
  exceeds its first positive one;
* every training sample is classified correctly at the end (accuracy 1, margin > 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from gdscope.errors import ConfigError
from gdscope.experiments.base import (
    DataConfig,
    Experiment,
    ExperimentConfig,
    Figure,
    Judgement,
    TaskContext,
    register,
)
from gdscope.probes import AccuracyProbe, At, LossProbe
from gdscope.probes.certificates import MarginProbe, homogeneity_degree
from gdscope.problem import Problem
from gdscope.theory import RateFit, fit_rates
from gdscope.tracker import Tracker
from gdscope.train import GD, fit
from gdscope.verdict import Verdict
from gdscope.zoo import mlp

__all__ = ["CrossEntropyConfig", "CrossEntropyExperiment"]


@dataclass(frozen=True)
class CrossEntropyConfig(ExperimentConfig):
    """The cross-entropy experiment (defaults: about 5 s on one idle CPU core).

    Attributes:
        data: the classification data set (class labels).
        hidden: hidden widths of the bias-free ReLU MLP; degree ``D = len(hidden) + 1``.
        lrs: GD step sizes (one task each per trial).
        trials: initializations; trial ``i`` uses seed ``seed + i`` (the data use ``seed``).
        steps: GD steps per run.
        records: points of each of the two record grids (log-spaced and linear in ``t``).
        loss_tol: the loss must end below ``loss_tol·L_0``.
    """

    data: DataConfig = field(default_factory=lambda: DataConfig("digits", 256))
    hidden: tuple[int, ...] = (128,)
    lrs: tuple[float, ...] = (2.0,)
    trials: int = 1
    steps: int = 4000
    records: int = 100
    loss_tol: float = 1e-3

    def __post_init__(self) -> None:
        if not self.hidden or any(h < 1 for h in self.hidden):
            raise ConfigError(f"hidden={list(self.hidden)!r}: give one or more widths >= 1.")
        if not self.lrs or any(not (math.isfinite(lr) and lr > 0) for lr in self.lrs):
            raise ConfigError(f"lrs={list(self.lrs)!r}: give one or more step sizes > 0.")
        checks = [
            ("trials", self.trials >= 1, "an integer >= 1"),
            ("steps", self.steps >= 20, "an integer >= 20"),
            ("records", self.records >= 10, "an integer >= 10"),
            ("loss_tol", 0 < self.loss_tol < 1, "a number in (0, 1), e.g. 1e-3"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be {what}.")


def _record_steps(steps: int, records: int) -> list[int]:
    """``records`` log-spaced and ``records`` evenly spaced steps in ``[0, steps − 1]``."""
    log = np.geomspace(1, steps, records) - 1
    lin = np.linspace(0, steps - 1, records)
    return sorted({round(float(s)) for s in np.concatenate([log, lin])})


def _line_fit(values: np.ndarray, t: np.ndarray) -> RateFit:
    """:func:`fit_rates` of ``exp(v − v₀)``: ``.exponential`` is ``v`` against ``t``,
    ``.power`` is ``v`` against ``log t`` (slopes, intervals and AICs of both lines)."""
    return fit_rates(np.exp(values - values[0]), steps=t, tail=1.0)


@register
class CrossEntropyExperiment(Experiment):
    """GD with cross-entropy on separable data: loss → 0, ‖θ‖ → ∞, normalized margin rises."""

    name = "cross_entropy"
    summary = (
        "Cross-entropy minima lie at infinity: GD on a bias-free ReLU net drives the loss to 0 "
        "while ‖θ‖ grows like log t and the normalized margin rises."
    )
    Config = CrossEntropyConfig
    paper_scale: ClassVar[dict[str, Any]] = {
        "data.name": "mnist",
        "data.n": 1000,
        "data.root": "data/mnist",
        "hidden": [512],
        "lrs": [0.5, 2.0],
        "steps": 50000,
        "device": "cuda",
    }

    def tasks(self, cfg: CrossEntropyConfig) -> list[dict[str, Any]]:
        return [{"seed": cfg.seed + i, "lr": lr} for i in range(cfg.trials) for lr in cfg.lrs]

    def run_task(
        self, cfg: CrossEntropyConfig, task: dict[str, Any], ctx: TaskContext
    ) -> dict[str, Any]:
        seed, lr = int(task["seed"]), float(task["lr"])
        X, y = cfg.data.load(seed=cfg.seed, dtype=ctx.dtype, one_hot=False, flatten=True)
        if y.is_floating_point() or y.ndim != 1:
            raise ConfigError(
                f"data.name={cfg.data.name!r} has no class labels: cross-entropy needs a "
                "classification set (digits, mnist1d, mnist, cifar10)."
            )
        X, y = X.to(ctx.device), y.to(ctx.device)
        classes = max(int(y.max()) + 1, 2)
        sizes = [X.shape[1], *cfg.hidden, classes]
        model = mlp(sizes, "relu", bias=False, seed=seed, dtype=ctx.dtype).to(ctx.device)
        degree = homogeneity_degree(model)
        prob = Problem(model, "cross_entropy", (X, y))
        grid = At(_record_steps(cfg.steps, cfg.records))
        probes = [LossProbe(), AccuracyProbe(grid), MarginProbe(grid, depth=degree)]
        tracker = Tracker(
            prob,
            probes,
            store=ctx.store,
            run_name=f"cross_entropy/lr{lr:g}/seed{seed}",
            config={
                "experiment": self.name,
                "model": f"mlp {sizes} relu, no bias (degree {degree})",
                "data": f"{cfg.data.name} n={X.shape[0]}",
                "lr": lr,
            },
        )
        result = fit(prob, GD(model.parameters(), lr=lr), cfg.steps, tracker, on_nonfinite="stop")
        if not result.diverged:
            tracker.close("completed")
        steps, norms = tracker.series("param_norm")
        _, margins = tracker.series("margin")
        _, normalized = tracker.series("normalized_margin")
        acc_steps, acc = tracker.series("accuracy")
        return {
            "seed": seed,
            "lr": lr,
            "degree": degree,
            "sizes": sizes,
            "diverged": result.diverged,
            "diverged_at": result.diverged_at,
            "losses": [float(v) for v in result.losses],
            # MarginProbe measures θ_{t+1}: placed at t + 1 steps
            "record_steps": [s + 1 for s in steps],
            "param_norm": norms,
            "margin": margins,
            "normalized_margin": normalized,
            "accuracy_steps": acc_steps,
            "accuracy": acc,
        }

    # ------------------------------------------------------------------ judging
    def judge(self, cfg: CrossEntropyConfig, results: list[dict[str, Any]]) -> Judgement:
        rows = [_assess(r, cfg) for r in results]
        verdicts = [
            _row_verdict(
                "The training loss tends to 0",
                f"L_T/L_0 ≤ {cfg.loss_tol:g}, non-increasing over the second half (L ≈ 1/t)",
                rows,
                "loss",
            ),
            _row_verdict(
                "‖θ‖ grows without bound, roughly like log t",
                "slope of ‖θ‖ against log t > 0 (interval), and log t fits better than t",
                rows,
                "norm",
            ),
            _row_verdict(
                "The normalized margin min_i (f_{y_i} − max_{j≠y_i} f_j)/‖θ‖^D rises",
                "slope against t over the second half > 0 (interval); last value above the "
                "first positive one",
                rows,
                "margin",
            ),
            _row_verdict(
                "Every training sample is classified correctly (100% training accuracy)",
                "accuracy 1 and margin > 0 at the end",
                rows,
                "accuracy",
            ),
        ]
        return Judgement(verdicts, [_figure(results)])


# ---------------------------------------------------------------------- judging helpers
def _assess(r: dict[str, Any], cfg: CrossEntropyConfig) -> dict[str, Any]:
    """Per task: for each claim ``(holds, measured text, numbers)``."""
    tag = f"lr {r['lr']:g}, seed {r['seed']}"
    out: dict[str, Any] = {"tag": tag}
    if r["diverged"]:
        text = f"{tag}: diverged at step {r['diverged_at']}"
        for key in ("loss", "norm", "margin", "accuracy"):
            out[key] = (False, text, {})
        return out
    losses = np.asarray(r["losses"])
    t = np.asarray(r["record_steps"], dtype=np.float64)
    norms = np.asarray(r["param_norm"])
    margins = np.asarray(r["margin"])
    gbar = np.asarray(r["normalized_margin"])

    # loss → 0, monotone tail
    ratio = float(losses[-1] / losses[0])
    tail = losses[losses.size // 2 :]
    rises = int(np.sum(np.diff(tail) > 1e-12 * tail[:-1]))
    ok = ratio <= cfg.loss_tol and rises == 0
    numbers: dict[str, Any] = {
        "loss_ratio": ratio,
        "increases_second_half": rises,
        "final_loss": float(losses[-1]),
    }
    text = f"{tag}: L_T/L_0 = {ratio:.3g}, {rises} increase(s) over the second half"
    if np.all(losses > 0):  # decay law of the second half (≈ 1/t on separable data)
        tail_fit = fit_rates(losses, tail=0.5)
        numbers["tail_power_exponent"] = tail_fit.power_exponent
        numbers["tail_preferred"] = tail_fit.preferred
        text += f"; tail L ∝ t^(−{tail_fit.power_exponent:.3g}) ({tail_fit.preferred} preferred)"
    out["loss"] = (ok, text, numbers)

    # ‖θ‖ against log t and t, after the first positive margin
    positive = np.flatnonzero(margins > 0)
    start = int(positive[0]) if positive.size else None
    if start is None or t.size - start < 5:
        out["norm"] = (None, f"{tag}: too few records with all samples separated", {})
    else:
        fit = _line_fit(norms[start:], t[start:])
        slope, (lo, hi) = fit.power.slope, fit.power.slope_ci
        if lo > 0 and fit.preferred == "power":
            holds: bool | None = True
        elif hi <= 0 or (fit.preferred == "exponential" and fit.decisive):
            holds = False
        else:
            holds = None
        out["norm"] = (
            holds,
            f"{tag}: ‖θ‖ {norms[start]:.4g} → {norms[-1]:.4g}; d‖θ‖/d log t = {slope:.3g} "
            f"[{lo:.3g}, {hi:.3g}] (R² {fit.power.r2:.4f}) vs linear in t R² "
            f"{fit.exponential.r2:.4f}: {'log t' if fit.preferred == 'power' else 't'} "
            f"preferred (ΔAIC {fit.delta_aic:.3g})",
            {
                "window": [float(t[start]), float(t[-1])],
                "slope_per_log_t": slope,
                "slope_per_log_t_ci": [lo, hi],
                "r2_log_t": fit.power.r2,
                "slope_per_step": fit.exponential.slope,
                "r2_t": fit.exponential.r2,
                "preferred": "log t" if fit.preferred == "power" else "t",
                "delta_aic": fit.delta_aic,
            },
        )

    # normalized margin rises over the second half (its records after separation)
    after = t.size if start is None else start
    half = np.flatnonzero((t >= t[-1] / 2) & (np.arange(t.size) >= after))
    if start is None:
        out["margin"] = (None, f"{tag}: the margin never became positive (not separated)", {})
    elif half.size < 5:
        out["margin"] = (
            None,
            f"{tag}: too few records after separation in the second half (run longer)",
            {},
        )
    else:
        fit = _line_fit(gbar[half], t[half])
        slope, (lo, hi) = fit.exponential.slope, fit.exponential.slope_ci
        first, last = float(gbar[start]), float(gbar[-1])
        if lo > 0 and last > first:
            holds = True
        elif hi < 0 or last <= first:
            holds = False
        else:
            holds = None
        out["margin"] = (
            holds,
            f"{tag}: γ̄ {first:.4g} (first positive, step {t[start]:g}) → {last:.4g}; slope "
            f"{slope:.3g} [{lo:.3g}, {hi:.3g}] per step over steps {t[half[0]]:g}–{t[-1]:g}",
            {
                "first_positive": first,
                "first_positive_step": float(t[start]),
                "final": last,
                "slope_second_half": slope,
                "slope_ci": [lo, hi],
            },
        )

    # 100% accuracy
    acc = float(r["accuracy"][-1]) if r["accuracy"] else math.nan
    final_margin = float(margins[-1]) if margins.size else math.nan
    out["accuracy"] = (
        acc == 1.0 and final_margin > 0,
        f"{tag}: accuracy {acc:.4g}, margin {final_margin:.4g}",
        {"accuracy": acc, "final_margin": final_margin},
    )
    return out


_THEOREMS = {
    "loss": (
        "Soudry et al.; Lyu & Li: on linearly separable data (and, for homogeneous networks, once "
        "the data are classified correctly) GD on cross-entropy drives the loss to 0 like 1/t; "
        "no finite parameter attains it, so the global minimum lies at infinity."
    ),
    "norm": (
        "Since the infimum is approached only at infinity, ‖θ_t‖ → ∞; for exponentially tailed "
        "losses it grows like log t (Soudry et al.). The rule fits ‖θ‖ against log t and against "
        "t and asks for a positive slope in log t, preferred to t."
    ),
    "margin": (
        "Lyu & Li: for positively homogeneous networks of degree D trained by GD on "
        "cross-entropy, once the loss is below log 2 the normalized margin "
        "min_i (f_{y_i} − max_{j≠y_i} f_j)/‖θ‖^D increases (it converges to a KKT point of the "
        "max-margin problem). Tested on the second half of the run."
    ),
    "accuracy": (
        "The preceding statements presuppose separable data reached by the run: every training "
        "sample classified correctly, with a positive margin, at the end."
    ),
}
_REASONS = {
    True: "holds in every run",
    False: "contradicted in some run (see measured)",
    None: "undecided in some run (an interval contains the bound or a fit failed)",
}


def _row_verdict(claim: str, predicted: str, rows: list[dict[str, Any]], key: str) -> Verdict:
    holds = [row[key][0] for row in rows]
    if any(h is False for h in holds):
        combined: bool | None = False
    elif not holds or any(h is None for h in holds):
        combined = None
    else:
        combined = True
    return Verdict(
        claim=claim,
        predicted=predicted,
        measured="; ".join(row[key][1] for row in rows) or "no runs",
        holds=combined,
        details={"tasks": [{"task": row["tag"], **row[key][2]} for row in rows]},
        reason=_REASONS[combined],
        theorem=_THEOREMS[key],
        section="4-regularity-skip-connections-cross-entropy-at-infinity",
    )


def _figure(results: list[dict[str, Any]]) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for i, r in enumerate(results):
        label = f"lr {r['lr']:g}, seed {r['seed']}"
        losses = np.asarray(r["losses"])
        axes[0].plot(np.arange(1, losses.size + 1), losses, color=f"C{i}", label=label)
        axes[1].plot(r["record_steps"], r["param_norm"], ".-", ms=2, color=f"C{i}")
        axes[2].plot(r["record_steps"], r["normalized_margin"], ".-", ms=2, color=f"C{i}")
    axes[0].set(xscale="log", yscale="log", xlabel="step t + 1", ylabel="training loss")
    axes[1].set(xscale="log", xlabel="step t (log scale)", ylabel="‖θ‖")
    axes[2].set(xlabel="step t", ylabel="normalized margin γ̄ = margin/‖θ‖^D")
    axes[2].axhline(0, color="k", lw=0.5)
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return Figure.of(
        fig,
        "cross_entropy",
        "GD with cross-entropy on separable data: the loss (log-log), ‖θ‖ against log t (a "
        "line for logarithmic growth) and the normalized margin against t.",
    )
