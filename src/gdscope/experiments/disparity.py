"""``disparity``: rank and ``σ_min`` of the disparity matrix along GD, across widths (theory §1).

The data-restricted disparity matrix is ``Jᵀ`` (``P × nk``): the canonical coordinates are the
outputs on the ``n`` training points, so GD can move every output in every direction iff ``Jᵀ``
has full rank ``nk``, i.e. ``λ_min(K) = σ_min(J)² > 0``, and then (with MSE, ``q = 2/(nk)``) the
PL inequality ``‖∇L‖²/(2L) ≥ q σ_min²`` holds: full rank along the run gives linear convergence
to zero loss. :func:`gdscope.disparity` takes the singular values from a float64 SVD of ``J``;
the rank counts those above ``max(nk, P)·eps·σ_max`` (``eps`` of the model's dtype).

The nets are those of the ``width`` experiment (:mod:`gdscope.experiments.width`):
NTK-parameterized MLPs ``d → m (× depth) → k`` trained by full-batch GD on MSE. The claims here
are about each run, not about the same dynamics across widths, so each run takes its step size
from its own kernel: ``η = lr_scale·2/(q σ_max(J_0)²)``, a fraction of GD's threshold at
initialization (``qλ_max(K_0)`` is the sharpness of the GGN there); narrow nets, whose kernel
fluctuates far from ``Θ∞``, would diverge at one step size fitted to the limit. One task per
(width, seed); the
:class:`~gdscope.probes.DisparityProbe` measures ``σ_min`` and the rank on the whole training set
at ``θ_0`` and at about ``per_decade`` log-spaced steps a decade, and at ``θ_T``.

A **singular event** is a measured step at which the rank is below ``nk``. A width is
**over-parameterized** when ``P ≥ overparam_factor·nk``; with ``P < nk`` the rank is at most ``P``
and every run is singular from the start (as it is when the readout cannot span ``k`` outputs).

Verdicts: (1) no over-parameterized run has a singular event; (2) every run with full rank
throughout reaches ``L_T ≤ loss_tol·L_0``. Full rank guarantees convergence, not its speed: the
PL inequality only promises a loss factor ``1 − ηqσ_min²`` per step, so a full-rank run short of
the tolerance whose loss still fell over the second half of the run leaves the claim
undetermined (more steps needed); one whose loss stopped falling refutes it; no full-rank run:
undetermined. (3) at the
over-parameterized widths ``σ_min`` stays bounded away from 0, ``min_t σ_min(t) ≥ σ_min(0)/√2``
(``λ_min(K_t) ≥ λ_min(K_0)/2``, as in Du et al.); (4) ``min_t σ_min`` grows with width (log-log
slope ``> 0`` with its interval), towards ``sqrt(λ_min(Θ∞))``, the infinite-width value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from gdscope.errors import ConfigError
from gdscope.experiments.base import (
    DataConfig,
    Experiment,
    Figure,
    Judgement,
    TaskContext,
    register,
)
from gdscope.experiments.width import (
    NTKSweepConfig,
    accuracy,
    group_by_width,
    infinite_width_eigenvalues,
    load_data,
    loglog_fit,
    ntk_net,
    schedule_steps,
)
from gdscope.kernels import disparity
from gdscope.probes import AccuracyProbe, At, DisparityProbe, LossProbe, ThresholdProbe
from gdscope.problem import Problem
from gdscope.tracker import Tracker
from gdscope.train import GD, fit
from gdscope.verdict import Verdict

__all__ = ["Disparity", "DisparityConfig"]


@dataclass(frozen=True)
class DisparityConfig(NTKSweepConfig):
    """The ``disparity`` experiment (defaults: under a minute on one CPU core).

    ``per_decade``: disparity measurements per decade of steps; ``overparam_factor``: a width is
    over-parameterized when ``P ≥ overparam_factor·nk``; ``loss_tol``: ``L_T ≤ loss_tol·L_0``
    counts as converged; ``level``: confidence level of the slope interval.
    """

    data: DataConfig = field(default_factory=lambda: DataConfig(n=32))
    widths: tuple[int, ...] = (4, 8, 16, 64, 256)
    trials: int = 3
    depth: int = 1
    steps: int = 2000
    per_decade: int = 4
    overparam_factor: float = 10.0
    loss_tol: float = 1e-3
    level: float = 0.95

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.per_decade < 1:
            raise ConfigError(f"per_decade={self.per_decade}: must be >= 1 (e.g. 5).")
        if not (math.isfinite(self.overparam_factor) and self.overparam_factor >= 1):
            raise ConfigError(
                f"overparam_factor={self.overparam_factor}: must be >= 1 (P ≥ factor·nk; "
                "below 1 the rank cannot be full)."
            )
        if not 0 < self.loss_tol < 1:
            raise ConfigError(f"loss_tol={self.loss_tol}: a fraction of L_0 in (0, 1).")
        if not 0 < self.level < 1:
            raise ConfigError(f"level={self.level}: a confidence level in (0, 1), e.g. 0.95.")


@register
class Disparity(Experiment):
    """Disparity-matrix rank and σ_min along GD across widths: singular events and convergence."""

    name = "disparity"
    summary = (
        "The disparity matrix Jᵀ keeps full rank along training on over-parameterized nets, "
        "σ_min stays away from 0 and grows with width, and full rank brings zero loss."
    )
    Config = DisparityConfig
    paper_scale: ClassVar[dict[str, Any]] = {
        "device": "cuda",
        "data.n": 128,
        "widths": [4, 8, 16, 32, 64, 256, 1024],
        "trials": 5,
        "steps": 5000,
    }

    def tasks(self, cfg: DisparityConfig) -> list[dict[str, Any]]:
        return [{"width": m, "seed": cfg.seed + s} for m in cfg.widths for s in range(cfg.trials)]

    def run_task(
        self, cfg: DisparityConfig, task: dict[str, Any], ctx: TaskContext
    ) -> dict[str, Any]:
        width, seed, T = int(task["width"]), int(task["seed"]), cfg.steps
        X, Y = load_data(cfg, ctx.device, ctx.dtype)
        n, k = Y.shape
        nk = n * k
        model = ntk_net(cfg, X.shape[1], k, width, seed, ctx.dtype).to(ctx.device)
        params = sum(p.numel() for p in model.parameters())
        prob = Problem(model, "mse", (X, Y))
        rep0 = disparity(model, X)
        lr = cfg.lr_scale * 2 / (prob.q * rep0.sigma_max**2)
        tracker = Tracker(
            prob,
            [
                LossProbe(),
                AccuracyProbe(),
                ThresholdProbe(),
                DisparityProbe(At(schedule_steps(T, cfg.per_decade)), samples=n),
            ],
            store=ctx.store,
            run_name=f"disparity-m{width}-seed{seed}",
            config={
                "experiment": self.name,
                "model": f"mlp {[X.shape[1], *[width] * cfg.depth, k]} {cfg.activation} (ntk)",
                "loss": "mse (mean)",
                "data": f"{cfg.data.name} n={n}",
                "width": width,
                "seed": seed,
                "lr": lr,
            },
        )
        ctx.log(f"width {width}, seed {seed}: training with the disparity probe")
        res = fit(prob, GD(model.parameters(), lr=lr), T, tracker, seed=seed, on_nonfinite="stop")
        if not res.diverged:
            tracker.close("completed")
        # the probe at tracker step t measures θ_{t+1}; θ_0 was measured above
        smin = dict(zip(*tracker.series("disparity_sigma_min"), strict=True))
        rank = dict(zip(*tracker.series("disparity_rank"), strict=True))
        steps = [0, *(t + 1 for t in sorted(smin))]
        sigma = [rep0.sigma_min, *(smin[t] for t in sorted(smin))]
        ranks = [rep0.rank, *(None if t not in rank else int(rank[t]) for t in sorted(smin))]
        known = [r for r in ranks if r is not None]
        losses = np.asarray(res.losses)
        out: dict[str, Any] = {
            "width": width,
            "seed": seed,
            "params": params,
            "nk": nk,
            "overparameterized": params >= cfg.overparam_factor * nk,
            "lr": lr,
            "sigma_inf": math.sqrt(max(float(infinite_width_eigenvalues(cfg, X)[0]), 0.0)),
            "steps": steps,
            "sigma_min": sigma,
            "rank": ranks,
            "rank_undetermined": len(known) < len(ranks),
            "singular_event": any(r < nk for r in known),
            "singular_at_init": rep0.rank is not None and rep0.rank < nk,
            "full_rank_throughout": len(known) == len(ranks) and all(r == nk for r in known),
            "sigma0": rep0.sigma_min,
            "sigma_min_min": min(sigma),
            "diverged": res.diverged,
            "loss0": float(losses[0]),
        }
        if res.diverged:
            out["diverged_at"] = res.diverged_at
            return out
        with torch.no_grad():
            FT = model(X)
        final = float(prob.loss())
        out.update(
            loss_final=final,
            accuracy_final=accuracy(FT, Y),
            converged=final <= cfg.loss_tol * out["loss0"],
            # over the second half of the run: still converging, or stalled?
            still_falling=final < float(losses[T // 2]),
            pl_factor=1 - lr * prob.q * out["sigma_min_min"] ** 2,
        )
        return out

    # ------------------------------------------------------------------ judge
    def judge(self, cfg: DisparityConfig, results: list[dict[str, Any]]) -> Judgement:
        verdicts = [
            _singular_verdict(cfg, results),
            _implication_verdict(cfg, results),
            _bounded_verdict(results),
            _growth_verdict(cfg, results),
        ]
        figures = [_sigma_figure(results), _rank_figure(results), _fraction_figure(cfg, results)]
        return Judgement(verdicts, figures)


_SECTION = "1-kernel-certificates"
_SINGULAR_THEOREM = (
    "Over-parameterization theory (Du et al.; Allen-Zhu, Li & Song; Liu, Zhu & Belkin): when the "
    "network has many more parameters than outputs to fit (P ≫ nk), the Jacobian J has full row "
    "rank nk at initialization and keeps it along GD, so the disparity matrix Jᵀ never loses "
    "rank. With P < nk full rank is impossible. The rule counts measured steps whose rank (by the "
    "float64 SVD of J and the shared rank rule) is below nk."
)
_IMPLICATION_THEOREM = (
    "With full rank along the run, σ_min(J) > 0 and for MSE the PL inequality "
    "‖∇L‖²/(2L) ≥ qσ_min² holds, so GD at a stable step size converges linearly to zero loss. "
    "The rule checks the conclusion on every full-rank run; a run still falling at the end needs "
    "more steps (undetermined), one whose loss stopped falling contradicts the claim."
)
_BOUNDED_THEOREM = (
    "Du et al.: for wide enough networks λ_min(K_t) ≥ λ_min(K_0)/2 along the whole run "
    "(equivalently σ_min(t) ≥ σ_min(0)/√2), which is what makes the linear rate hold globally."
)
_GROWTH_THEOREM = (
    "As the width grows the kernel along the run tends to the infinite-width kernel Θ∞, so "
    "min_t σ_min(t) tends to sqrt(λ_min(Θ∞)) > 0; narrow nets (P close to nk) sit near a rank "
    "drop. The rule tests that min_t σ_min rises with width (log-log slope above 0 with its "
    "interval)."
)


def _runs(results: list[dict[str, Any]]) -> str:
    return ", ".join(f"m={r['width']} seed {r['seed']}" for r in results)


def _singular_verdict(cfg: DisparityConfig, results: list[dict[str, Any]]) -> Verdict:
    claim = "over-parameterized nets keep a full-rank disparity matrix along training"
    common = {"theorem": _SINGULAR_THEOREM, "section": _SECTION}
    frac = {
        m: sum(v) / len(v)
        for m, v in group_by_width(results, lambda r: r["singular_event"]).items()
    }
    ratio = {m: v[0] for m, v in group_by_width(results, lambda r: r["params"] / r["nk"]).items()}
    over = [r for r in results if r["overparameterized"]]
    predicted = (
        f"no singular event (rank < nk at a measured step) at widths with P ≥ "
        f"{cfg.overparam_factor:g}·nk; every run singular where P < nk"
    )
    measured = "singular fraction " + ", ".join(
        f"{frac[m]:.2g} (m={m}, P/nk={ratio[m]:.3g})" for m in frac
    )
    details: dict[str, Any] = {
        "fraction": frac,
        "params_over_nk": ratio,
        "singular_at_init": {
            m: sum(v) for m, v in group_by_width(results, lambda r: r["singular_at_init"]).items()
        },
    }
    if not over:
        why = f"no width has P ≥ {cfg.overparam_factor:g}·nk"
        return Verdict(
            claim,
            predicted,
            measured + "; no over-parameterized width",
            None,
            details,
            reason=why,
            assumption=f"over-parameterization: {why}",
            **common,
        )
    bad = [r for r in over if r["singular_event"]]
    if bad:
        why = f"a rank drop at an over-parameterized width: {_runs(bad)}"
        return Verdict(
            claim,
            predicted,
            measured + f"; singular: {_runs(bad)}",
            False,
            details,
            reason=why,
            **common,
        )
    if any(r["rank_undetermined"] for r in over):
        why = "some ranks could not be resolved (J too large for the float64 SVD)"
        return Verdict(
            claim,
            predicted,
            measured + "; some ranks undetermined (J too large)",
            None,
            details,
            reason=why,
            **common,
        )
    why = "every measured step of every over-parameterized run has rank nk"
    return Verdict(claim, predicted, measured, True, details, reason=why, **common)


def _implication_verdict(cfg: DisparityConfig, results: list[dict[str, Any]]) -> Verdict:
    claim = "full rank along the run ⇒ convergence to zero loss (PL with μ = qσ_min²)"
    common = {"theorem": _IMPLICATION_THEOREM, "section": _SECTION}
    predicted = f"every run with full rank throughout reaches L_T ≤ {cfg.loss_tol:g}·L_0"
    full = [r for r in results if r["full_rank_throughout"] and not r["diverged"]]
    diverged = [r for r in results if r["diverged"]]
    details: dict[str, Any] = {
        "full_rank_runs": len(full),
        "converged": sum(r["converged"] for r in full),
        "diverged": [{"width": r["width"], "seed": r["seed"]} for r in diverged],
        "rank_deficient_converged": sum(
            r.get("converged", False) for r in results if not r["full_rank_throughout"]
        ),
    }
    note = f" ({len(diverged)} diverged runs left out: {_runs(diverged)})" if diverged else ""
    if not full:
        why = "no run kept full rank throughout, so the premise is never met"
        return Verdict(
            claim,
            predicted,
            "no run kept full rank throughout" + note,
            None,
            details,
            reason=why,
            assumption=why,
            **common,
        )
    short = [r for r in full if not r["converged"]]
    worst = max(r["loss_final"] / r["loss0"] for r in full)
    measured = (
        f"{len(full) - len(short)} of {len(full)} full-rank runs reached the tolerance "
        f"(largest L_T/L_0 = {worst:.2g})"
    )
    details["pl_factor_of_unconverged"] = {
        f"m={r['width']} seed {r['seed']}": r["pl_factor"] for r in short
    }
    stalled = [r for r in short if not r["still_falling"]]
    if stalled:
        return Verdict(
            claim,
            predicted,
            measured + f"; stalled: {_runs(stalled)}" + note,
            False,
            details,
            reason="a full-rank run's loss stopped falling short of zero",
            **common,
        )
    if short:
        return Verdict(
            claim,
            predicted,
            measured + f"; still falling at T (needs more steps): {_runs(short)}" + note,
            None,
            details,
            reason="full-rank runs still falling at the end: more steps decide",
            **common,
        )
    why = "every full-rank run reached the loss tolerance"
    return Verdict(claim, predicted, measured + note, True, details, reason=why, **common)


def _bounded_verdict(results: list[dict[str, Any]]) -> Verdict:
    claim = "σ_min of the disparity matrix stays bounded away from 0 on over-parameterized nets"
    predicted = "min_t σ_min(t) ≥ σ_min(0)/√2 (λ_min(K_t) ≥ λ_min(K_0)/2) in every such run"
    over = [r for r in results if r["overparameterized"]]
    common = {"theorem": _BOUNDED_THEOREM, "section": _SECTION}
    if not over:
        why = "no over-parameterized width"
        return Verdict(claim, predicted, why, None, reason=why, assumption=why, **common)
    ratios = {
        m: min(v)
        for m, v in group_by_width(
            over, lambda r: r["sigma_min_min"] / r["sigma0"] if r["sigma0"] > 0 else 0.0
        ).items()
    }
    holds = all(v >= 1 / math.sqrt(2) for v in ratios.values())
    measured = "smallest min_t σ_min(t)/σ_min(0): " + ", ".join(
        f"{v:.3g} (m={m})" for m, v in ratios.items()
    )
    return Verdict(
        claim,
        predicted,
        measured,
        holds,
        {"min_ratio": ratios},
        reason="σ_min stayed above σ_min(0)/√2 in every run"
        if holds
        else "σ_min fell below σ_min(0)/√2 in some over-parameterized run",
        **common,
    )


def _growth_verdict(cfg: DisparityConfig, results: list[dict[str, Any]]) -> Verdict:
    claim = "the smallest σ_min along training grows with width"
    full = [r for r in results if r["sigma_min_min"] > 0 and r["full_rank_throughout"]]
    inf = results[0]["sigma_inf"] if results else float("nan")
    predicted = (
        "log-log slope of min_t σ_min(t) against width > 0 (over runs with full rank "
        f"throughout), rising towards sqrt(λ_min(Θ∞)) = {inf:.4g}"
    )
    mean = {
        m: float(np.exp(np.mean(np.log(v))))
        for m, v in group_by_width(full, lambda r: r["sigma_min_min"]).items()
    }
    fit = loglog_fit([r["width"] for r in full], [r["sigma_min_min"] for r in full], cfg.level)
    details: dict[str, Any] = {"geometric_mean": mean, "sigma_inf": inf}
    common = {"theorem": _GROWTH_THEOREM, "section": _SECTION}
    if fit is None:
        why = f"too few full-rank runs to fit ({len(full)})"
        return Verdict(claim, predicted, why, None, details, reason=why, **common)
    details["fit"] = fit.to_dict()
    lo, hi = fit.ci
    holds = True if lo > 0 else False if hi <= 0 else None
    measured = (
        "min σ_min "
        + ", ".join(f"{v:.3g} (m={m})" for m, v in mean.items())
        + f"; {fit.describe()}"
    )
    reason = {
        True: "the slope's interval lies above 0",
        False: "the slope's interval lies at or below 0",
        None: "the slope's interval contains 0",
    }[holds]
    return Verdict(claim, predicted, measured, holds, details, reason=reason, **common)


# ---------------------------------------------------------------------------------- figures
def _colors(results: list[dict[str, Any]]) -> dict[int, Any]:
    from matplotlib import colormaps

    widths = sorted({r["width"] for r in results})
    cmap = colormaps["viridis"]
    return {m: cmap(i / max(len(widths) - 1, 1)) for i, m in enumerate(widths)}


def _sigma_figure(results: list[dict[str, Any]]) -> Figure:
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(6.4, 4.0))
    ax = fig.subplots()
    colors = _colors(results)
    seen: set[int] = set()
    for r in results:
        x = np.asarray(r["steps"], dtype=float) + 1
        y = np.asarray(r["sigma_min"], dtype=float)
        full = np.array([k == r["nk"] for k in r["rank"]])
        y[~full | (y <= 0)] = np.nan  # below the rank tolerance: σ_min is round-off
        label = None if r["width"] in seen else f"m = {r['width']}"
        seen.add(r["width"])
        ax.loglog(x, y, "-o", ms=2.5, color=colors[r["width"]], label=label, alpha=0.8)
    if results:
        ax.axhline(
            results[0]["sigma_inf"], color="k", ls="--", lw=0.8, label="√λ_min(Θ∞) (infinite width)"
        )
    ax.set_xlabel("step + 1")
    ax.set_ylabel("σ_min of the disparity matrix Jᵀ")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return Figure.of(
        fig,
        "disparity_sigma_min",
        "Smallest singular value of the disparity matrix (nk-th singular value of J on the "
        "training set) along training, one line per run, coloured by width; steps where the "
        "rank is below nk (σ_min at round-off) are not drawn.",
    )


def _rank_figure(results: list[dict[str, Any]]) -> Figure:
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(6.4, 3.6))
    ax = fig.subplots()
    colors = _colors(results)
    seen: set[int] = set()
    for r in results:
        pts = [(s + 1, k / r["nk"]) for s, k in zip(r["steps"], r["rank"], strict=True) if k]
        label = None if r["width"] in seen else f"m = {r['width']}"
        seen.add(r["width"])
        if pts:
            ax.semilogx(
                *zip(*pts, strict=True),
                "-o",
                ms=2.5,
                color=colors[r["width"]],
                label=label,
                alpha=0.8,
            )
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xlabel("step + 1")
    ax.set_ylabel("rank / nk")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return Figure.of(
        fig,
        "disparity_rank",
        "Numerical rank of the disparity matrix (singular values above max(nk, P)·eps·σ_max) "
        "divided by its full rank nk, along training.",
    )


def _fraction_figure(cfg: DisparityConfig, results: list[dict[str, Any]]) -> Figure:
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(6.0, 3.4))
    ax = fig.subplots()
    frac = group_by_width(results, lambda r: r["singular_event"])
    init = group_by_width(results, lambda r: r["singular_at_init"])
    ratio = group_by_width(results, lambda r: r["params"] / r["nk"])
    widths = list(frac)
    pos = np.arange(len(widths))
    at_init = np.array([sum(init[m]) / len(init[m]) for m in widths])
    total = np.array([sum(frac[m]) / len(frac[m]) for m in widths])
    ax.bar(pos, at_init, color="C7", label="singular at initialization")
    ax.bar(pos, total - at_init, bottom=at_init, color="C3", label="rank lost during training")
    ax.set_xticks(pos, [f"{m}\nP/nk={ratio[m][0]:.2g}" for m in widths], fontsize=7)
    over = [i for i, m in enumerate(widths) if ratio[m][0] >= cfg.overparam_factor]
    if over:
        ax.axvline(over[0] - 0.5, color="k", ls="--", lw=0.8, label="over-parameterized →")
    ax.legend(fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("width m")
    ax.set_ylabel("fraction of runs with a singular event")
    fig.tight_layout()
    return Figure.of(
        fig,
        "disparity_singular_fraction",
        "Fraction of runs in which the disparity matrix is below full rank at some measured "
        "step, per width: from initialization (grey) or lost during training (red). "
        f"Over-parameterized: P ≥ {cfg.overparam_factor:g}·nk.",
    )
