"""Decision rules and the figure of the ``edge`` experiment (pure functions of task results).

A task result (:mod:`gdscope.experiments.edge`) holds, for one step size ``lr``: ``gd_loss``
(``L(θ_t)``, ``t = 0..steps−1``), ``cf_loss`` (the central flow's time-averaged loss ``L̄(t)``,
``t = 0..steps``), ``lin_loss`` (the linearized model's loss, same steps), ``sharp_steps`` /
``sharp`` (GD's measured ``λ_max`` at iterates ``θ_t``), ``cf_sharp`` (the flow's ``λ_1(w(t))``),
``threshold`` ``2/η``, ``diverged`` and ``cf_error`` (why the flow could not be integrated, or
``None``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from gdscope.experiments.base import Figure
from gdscope.verdict import Verdict

__all__ = [
    "edge_figure",
    "edge_onset",
    "linearized_verdict",
    "loss_verdict",
    "sharpness_verdict",
    "window_means",
]

SECTION = "3-curvature-stability-of-minima-and-the-gd-map"
LOSS_THEOREM = (
    "Central flow (Cohen, Damian, Talwalkar, Kolter & Lee 2025): at the edge of stability GD's "
    "iterates oscillate around the central flow dw/dt = −η[∇L + ½∇⟨Σ, ∇²L⟩], Σ fixed by "
    "λ_max ≤ 2/η, and GD's time-averaged loss is L(w) + ½⟨Σ, ∇²L(w)⟩. Tested at finite size: "
    "both curves are averaged over consecutive windows of a few self-stabilization cycles and "
    "the median relative difference over the run must be within the tolerance (isolated "
    "catapult spikes are transients the flow averages out; the largest window error is reported)."
)
SHARP_THEOREM = (
    "Central flow: once at the edge, λ_max(∇²L) stays at 2/η (the flow holds it there exactly; "
    "GD oscillates around it). Tested: GD's median measured sharpness after its onset is within "
    "the tolerance of the flow's predicted post-onset median."
)
LIN_THEOREM = (
    "Past the progressive-sharpening point the network leaves the kernel regime: the "
    "linearized model f(θ₀) + J₀(θ − θ₀) (its NTK frozen at initialization, gs.predict) no "
    "longer describes the run. This is the contrast the central flow is set against, not a "
    "theorem with a bound: it holds when the linearized loss in the last window is more than the "
    "factor away from GD's (either way); when the two have not yet separated that far the row is "
    "undetermined (more steps at the edge decide), never 'fails'."
)


def window_means(x: np.ndarray, window: int) -> np.ndarray:
    """Means over consecutive windows of ``window`` values (a last partial window dropped)."""
    x = np.asarray(x, dtype=np.float64)
    k = x.size // window
    return x[: k * window].reshape(k, window).mean(axis=1)


def edge_onset(r: dict[str, Any], onset_fraction: float) -> int | None:
    """Index into ``r["sharp"]`` of GD's first measured sharpness ``≥ onset_fraction·2/η``."""
    s = np.asarray(r["sharp"], dtype=np.float64)
    hits = np.flatnonzero(np.isfinite(s) & (s >= onset_fraction * r["threshold"]))
    return int(hits[0]) if hits.size else None


def _premise(r: dict[str, Any], onset_fraction: float, claim: str, predicted: str, theorem: str):
    """An ``outside`` verdict when the run is not one the claim is about, else ``None``."""
    common = {"theorem": theorem, "section": SECTION}
    thr = r["threshold"]
    details = {"lr": r["lr"], "threshold": thr}
    if r.get("diverged"):
        why = f"GD diverged (step {r.get('diverged_at')}): there is no run to average"
        return Verdict(claim, predicted, why, None, details, reason=why, assumption=why, **common)
    sharp = np.asarray(r["sharp"], dtype=np.float64)
    if not sharp.size or not np.isfinite(sharp[0]):
        why = "no finite sharpness measurement at initialization"
        return Verdict(claim, predicted, why, None, details, reason=why, assumption=why, **common)
    if sharp[0] >= thr:
        why = (
            f"the run starts above 2/η (λ_max(θ₀) = {sharp[0] / thr:.3f}·2/η): a catapult, "
            "which the flow does not model; lower lr"
        )
        return Verdict(claim, predicted, why, None, details, reason=why, assumption=why, **common)
    if edge_onset(r, onset_fraction) is None:
        why = (
            f"GD's sharpness never reached {onset_fraction:g}·2/η (max "
            f"{np.nanmax(sharp) / thr:.3f}·2/η): the run is not at the edge of stability; raise "
            "lr or steps"
        )
        return Verdict(claim, predicted, why, None, details, reason=why, assumption=why, **common)
    if r.get("cf_error"):
        why = f"the central flow could not be integrated: {r['cf_error']}"
        return Verdict(claim, predicted, why, None, details, reason=why, assumption=why, **common)
    return None


def _flow_premise(r: dict[str, Any], claim: str, predicted: str, theorem: str):
    """``outside`` when the flow held its maximum number of eigenvalues at the edge: more may
    oscillate than it models (its constraint covers only the tracked ones), else ``None``."""
    counts = r.get("cf_edge_counts") or []
    cap = r.get("max_edge")
    if cap is None or not counts or max(counts) < cap:
        return None
    full = sum(c >= cap for c in counts)
    why = (
        f"the flow held all {cap} eigenvalues it tracks at the edge ({full} of {len(counts)} "
        "steps): more may oscillate than it models, so its prediction is not the central flow's; "
        "raise max_edge"
    )
    details = {"lr": r["lr"], "max_edge": cap, "max_edge_count": max(counts)}
    return Verdict(
        claim,
        predicted,
        why,
        None,
        details,
        reason=why,
        assumption=why,
        theorem=theorem,
        section=SECTION,
    )


def loss_verdict(r: dict[str, Any], *, window: int, tol: float, onset_fraction: float) -> Verdict:
    """Central flow's time-averaged loss vs GD's, window by window (:data:`LOSS_THEOREM`)."""
    lr = r["lr"]
    claim = f"η = {lr:g}: the central flow predicts GD's time-averaged loss"
    predicted = f"window ({window} steps) means within {tol:.0%} (median over the run)"
    out = _premise(r, onset_fraction, claim, predicted, LOSS_THEOREM) or _flow_premise(
        r, claim, predicted, LOSS_THEOREM
    )
    if out is not None:
        return out
    gd = np.asarray(r["gd_loss"], dtype=np.float64)
    cf = np.asarray(r["cf_loss"], dtype=np.float64)[: gd.size]
    g, f = window_means(gd, window), window_means(cf, window)
    common = {"theorem": LOSS_THEOREM, "section": SECTION}
    details: dict[str, Any] = {"lr": lr, "window": window, "windows": int(g.size)}
    if not g.size or not np.all(np.isfinite(f)) or not np.all(f > 0):
        why = f"fewer than one {window}-step window of finite losses"
        return Verdict(claim, predicted, why, None, details, reason=why, **common)
    rel = np.abs(g - f) / f
    med, worst = float(np.median(rel)), int(np.argmax(rel))
    details |= {
        "median_error": med,
        "max_error": float(rel[worst]),
        "max_error_window_start": worst * window,
        "fraction_within": float(np.mean(rel <= tol)),
        "run_mean_ratio": float(gd.mean() / cf.mean()),
        "errors": [float(v) for v in rel],
    }
    measured = (
        f"median window error {med:.1%}, largest {rel[worst]:.1%} (steps {worst * window}–"
        f"{(worst + 1) * window - 1}); {np.mean(rel <= tol):.0%} of {rel.size} windows within "
        f"{tol:.0%}; run-mean ratio GD/flow {gd.mean() / cf.mean():.3f}"
    )
    holds = bool(med <= tol)
    why = f"median window error {med:.1%} {'≤' if holds else '>'} {tol:.0%}"
    return Verdict(claim, predicted, measured, holds, details, reason=why, **common)


def sharpness_verdict(
    r: dict[str, Any], *, tol: float, onset_fraction: float, min_post_onset: int
) -> Verdict:
    """GD's post-onset median sharpness vs the flow's (:data:`SHARP_THEOREM`)."""
    lr, thr = r["lr"], r["threshold"]
    claim = f"η = {lr:g}: the central flow predicts the sharpness at the edge"
    predicted = f"GD's post-onset median λ_max within {tol:.0%} of the flow's"
    out = _premise(r, onset_fraction, claim, predicted, SHARP_THEOREM) or _flow_premise(
        r, claim, predicted, SHARP_THEOREM
    )
    if out is not None:
        return out
    common = {"theorem": SHARP_THEOREM, "section": SECTION}
    on = edge_onset(r, onset_fraction)
    assert on is not None
    steps = np.asarray(r["sharp_steps"], dtype=int)
    sharp = np.asarray(r["sharp"], dtype=np.float64)
    after = sharp[on:][np.isfinite(sharp[on:])]
    cf = np.asarray(r["cf_sharp"], dtype=np.float64)
    start = int(steps[on])
    cf_after = cf[start:][np.isfinite(cf[start:])]
    details: dict[str, Any] = {"lr": lr, "threshold": thr, "onset_step": start}
    if after.size < min_post_onset or not cf_after.size:
        why = f"only {after.size} measurements after the onset (step {start}): more steps decide"
        return Verdict(claim, predicted, why, None, details, reason=why, **common)
    gm, pm = float(np.median(after)), float(np.median(cf_after))
    err = abs(gm / pm - 1)
    details |= {"measured_median": gm, "predicted_median": pm, "error": err, "count": after.size}
    measured = (
        f"GD {gm:.4g} ({gm / thr:.3f}·2/η) vs flow {pm:.4g} ({pm / thr:.3f}·2/η) after step "
        f"{start}: {err:.1%} apart ({after.size} values)"
    )
    holds = bool(err <= tol)
    why = f"{err:.1%} {'≤' if holds else '>'} {tol:.0%}"
    return Verdict(claim, predicted, measured, holds, details, reason=why, **common)


def linearized_verdict(
    r: dict[str, Any], *, window: int, factor: float, onset_fraction: float
) -> Verdict:
    """The linearized model's loss vs GD's in the last window (:data:`LIN_THEOREM`)."""
    lr = r["lr"]
    claim = f"η = {lr:g}: the linearized (kernel) prediction fails past the edge"
    predicted = f"linearized loss more than {factor:g}× from GD's in the last window"
    out = _premise(r, onset_fraction, claim, predicted, LIN_THEOREM)
    if out is not None:
        return out
    common = {"theorem": LIN_THEOREM, "section": SECTION}
    gd = np.asarray(r["gd_loss"], dtype=np.float64)
    lin = np.asarray(r["lin_loss"], dtype=np.float64)[: gd.size]
    g, f = window_means(gd, window), window_means(lin, window)
    details: dict[str, Any] = {"lr": lr, "window": window}
    if not g.size or not g[-1] > 0:
        why = f"fewer than one {window}-step window of positive losses"
        return Verdict(claim, predicted, why, None, details, reason=why, **common)
    ratio = float(f[-1] / g[-1]) if np.isfinite(f[-1]) else math.inf
    off = max(ratio, 1 / ratio) if ratio > 0 else math.inf
    details |= {"ratio_linearized_to_gd": ratio, "factor": off, "cf_ratio": r.get("cf_last_ratio")}
    measured = f"linearized/GD loss {ratio:.3g} in the last window ({off:.3g}× apart)"
    if off > factor:
        return Verdict(
            claim, predicted, measured, True, details, reason=f"{off:.3g}× > {factor:g}×", **common
        )
    on = edge_onset(r, onset_fraction)
    start = int(np.asarray(r["sharp_steps"], dtype=int)[on]) if on is not None else 0
    why = (
        f"only {off:.3g}× apart after {gd.size - start} steps at the edge (onset step {start}): "
        "not yet separated; more steps decide"
    )
    return Verdict(claim, predicted, measured, None, details, reason=why, **common)


def edge_figure(results: list[dict[str, Any]], window: int) -> Figure:
    """Loss (GD, its window means, the flow, the linearized model) and sharpness per step size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(results)
    fig, axes = plt.subplots(2, k, figsize=(4.2 * k, 6.4), squeeze=False)
    for j, r in enumerate(results):
        ax, bx = axes[0, j], axes[1, j]
        gd = np.asarray(r["gd_loss"], dtype=np.float64)
        t = np.arange(gd.size)
        ax.semilogy(t, gd, color="0.75", lw=0.7, label="GD")
        if gd.size >= window:
            gm = window_means(gd, window)
            tc = window * (np.arange(gm.size) + 0.5)
            ax.semilogy(tc, gm, "o-", color="C0", ms=3, label=f"GD, {window}-step means")
        if r.get("cf_loss"):
            cf = np.asarray(r["cf_loss"], dtype=np.float64)
            ax.semilogy(np.arange(cf.size), cf, "--", color="C3", label="central flow L̄")
        if r.get("lin_loss"):
            lin = np.asarray(r["lin_loss"], dtype=np.float64)
            lin = np.where(np.isfinite(lin) & (lin < 1e6 * max(gd.max(), 1e-300)), lin, np.nan)
            ax.semilogy(np.arange(lin.size), lin, ":", color="C2", label="linearized")
        ax.set_title(f"η = {r['lr']:g}")
        ax.set_xlabel("step")
        if j == 0:
            ax.set_ylabel("loss")
            ax.legend(fontsize=7)
        thr = r["threshold"]
        bx.plot(r["sharp_steps"], r["sharp"], ".", color="C0", ms=3, label="GD λ_max")
        if r.get("cf_sharp"):
            bx.plot(np.asarray(r["cf_sharp"]), "--", color="C3", label="central flow")
        bx.axhline(thr, color="k", lw=0.7, label="2/η")
        bx.set_xlabel("step")
        if j == 0:
            bx.set_ylabel("sharpness")
            bx.legend(fontsize=7)
    fig.tight_layout()
    return Figure.of(
        fig,
        "edge",
        "Full-batch GD past the progressive-sharpening point: the measured loss (grey) and its "
        f"{window}-step means (blue) beside the central flow's time-averaged loss (red dashed) "
        "and the linearized model (green dotted); below, the measured sharpness against the "
        "flow's and 2/η.",
    )
