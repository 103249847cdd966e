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
from dataclasses import dataclass
from typing import Any

import numpy as np

from gdscope.experiments.base import Figure
from gdscope.verdict import Verdict

__all__ = [
    "OscillationPeriod",
    "edge_figure",
    "edge_onset",
    "linearized_verdict",
    "loss_verdict",
    "oscillation_period",
    "sharpness_verdict",
    "sliding_means",
    "window_means",
]

SECTION = "3-curvature-stability-of-minima-and-the-gd-map"
LOSS_THEOREM = (
    "Central flow (Cohen, Damian, Talwalkar, Kolter & Lee 2025): at the edge of stability GD's "
    "iterates oscillate around the central flow dw/dt = −η[∇L + ½∇⟨Σ, ∇²L⟩], Σ fixed by "
    "λ_max ≤ 2/η, and GD's time-averaged loss is L(w) + ½⟨Σ, ∇²L(w)⟩. Tested over the whole "
    "run: the period T of GD's slowest oscillation (the self-stabilization cycle of the "
    "sharpness and the loss, from the autocorrelation of its detrended log-loss after the onset; "
    "the period-2 flip when no cycle stands out of the noise) is measured on the run, both curves "
    "are averaged over a sliding window of a few (loss_periods) such periods, and every window "
    "from the first step to the last must be within the tolerance; the worst window is the "
    "verdict. The flow has no onset transient: GD's sharpness overshoots 2/η while its "
    "oscillation grows from a tiny seed, then catapults back, so the windows over the first "
    "cycle at the edge are the hardest."
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


def sliding_means(x: np.ndarray, window: int) -> np.ndarray:
    """Means of every ``window`` consecutive values: ``out[s] = mean(x[s : s + window])``,
    ``s = 0..len(x) − window``."""
    x = np.asarray(x, dtype=np.float64)
    if window < 1 or x.size < window:
        return np.zeros(0)
    c = np.concatenate([[0.0], np.cumsum(x)])
    return (c[window:] - c[:-window]) / window


@dataclass(frozen=True)
class OscillationPeriod:
    """GD's slowest oscillation after the onset, measured by :func:`oscillation_period`.

    Attributes:
        period: steps per cycle (``2`` when only the period-2 flip is seen).
        kind: ``"self-stabilization cycle"`` or ``"period-2 flip"``.
        acf_peak: the autocorrelation at ``period`` (NaN for the flip).
        noise: ``4/√n``, the noise band the peak must clear (:func:`oscillation_period`).
        samples: values used (steps after the onset).
    """

    period: int
    kind: str
    acf_peak: float
    noise: float
    samples: int


#: Degree of the polynomial in ``log(step)`` removed from GD's log-loss before the
#: autocorrelation (the trend of the loss: a power law bends in log-log).
DETREND_DEGREE = 3


def oscillation_period(loss: np.ndarray, onset: int) -> OscillationPeriod:
    """The period of GD's slowest oscillation in ``loss[onset:]`` (``loss[t] = L(θ_t)``).

    ``x_t = log L(θ_t)``; the period-2 flip is removed by pair means ``(x_t + x_{t+1})/2``, the
    trend by a least-squares polynomial of degree :data:`DETREND_DEGREE` in ``log(1 + t)``;
    the period is the lag of the largest autocorrelation between its first negative value and
    half the series. It counts only if that peak clears ``4/√n``: white noise's autocorrelation
    at one lag has standard deviation ``√(1.5/n)`` after pair means (Bartlett), and its largest
    of ``n/2`` lags reaches about ``√(2 ln(n/2))`` of those, ``3.5–3.8/√n`` for ``n = 100–1000``.
    Otherwise the only oscillation measured is GD's period-2 flip and the period is 2.
    """
    x = np.asarray(loss, dtype=np.float64)[onset:]
    flip = OscillationPeriod(2, "period-2 flip", math.nan, math.nan, int(x.size))
    if x.size < 16 or not np.all(np.isfinite(x) & (x > 0)):
        return flip
    lx = np.log(x)
    y = 0.5 * (lx[:-1] + lx[1:])
    t = np.log1p(onset + np.arange(y.size) + 0.5)
    z = y - np.polyval(np.polyfit(t, y, min(DETREND_DEGREE, y.size - 2)), t)
    z = z - z.mean()
    n = z.size
    c = np.correlate(z, z, mode="full")[n - 1 :]
    if not c[0] > 0:
        return flip
    acf = c / c[0]
    noise = 4.0 / math.sqrt(n)
    neg = np.flatnonzero(acf[: n // 2] < 0)
    if not neg.size:
        return OscillationPeriod(2, "period-2 flip", math.nan, noise, n)
    lag = int(neg[0] + np.argmax(acf[neg[0] : n // 2]))
    peak = float(acf[lag])
    if peak <= noise or lag < 3:
        return OscillationPeriod(2, "period-2 flip", peak, noise, n)
    return OscillationPeriod(lag, "self-stabilization cycle", peak, noise, n)


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


def loss_verdict(
    r: dict[str, Any], *, periods: float, tol: float, onset_fraction: float
) -> Verdict:
    """Central flow's time-averaged loss vs GD's over every window of ``periods`` measured
    oscillation periods (:data:`LOSS_THEOREM`, :func:`oscillation_period`).

    The window is ``W = max(2, round(periods·T))`` steps, ``T`` measured on GD's loss after its
    onset; the means of GD's loss and of the flow's ``L̄`` over ``[s, s + W)`` are compared for
    every ``s`` from 0 to ``steps − W``: holds when the largest relative difference
    ``|ḡ_s − f̄_s|/f̄_s`` is at most ``tol``, fails otherwise. The worst window's error with
    one period and with two (``errors_by_periods``) are reported beside it, not judged.
    """
    lr = r["lr"]
    claim = f"η = {lr:g}: the central flow predicts GD's time-averaged loss"
    predicted = (
        f"every sliding window of {periods:g} measured oscillation periods within {tol:.0%}, "
        "first step to last"
    )
    out = _premise(r, onset_fraction, claim, predicted, LOSS_THEOREM) or _flow_premise(
        r, claim, predicted, LOSS_THEOREM
    )
    if out is not None:
        return out
    common = {"theorem": LOSS_THEOREM, "section": SECTION}
    gd = np.asarray(r["gd_loss"], dtype=np.float64)
    cf = np.asarray(r["cf_loss"], dtype=np.float64)[: gd.size]
    on = edge_onset(r, onset_fraction)
    assert on is not None
    start = int(np.asarray(r["sharp_steps"], dtype=int)[on])
    osc = oscillation_period(gd, start)
    window = max(2, round(periods * osc.period))
    details: dict[str, Any] = {
        "lr": lr,
        "onset_step": start,
        "period": osc.period,
        "period_kind": osc.kind,
        "period_acf_peak": osc.acf_peak,
        "period_noise_band": osc.noise,
        "periods": periods,
        "window": window,
    }
    if gd.size < 2 * window:
        why = (
            f"the run has {gd.size} steps, fewer than two windows of {window} ({periods:g} × the "
            f"measured period {osc.period}): more steps decide"
        )
        return Verdict(claim, predicted, why, None, details, reason=why, **common)
    g, f = sliding_means(gd, window), sliding_means(cf, window)
    if cf.size < gd.size or not np.all(np.isfinite(f)) or not np.all(f > 0):
        why = "the flow's time-averaged loss is not finite and positive over the run"
        return Verdict(claim, predicted, why, None, details, reason=why, **common)
    rel = np.abs(g - f) / f
    worst = int(np.argmax(rel))
    by_periods = {}
    for k in (1, 2):
        w = max(2, round(k * osc.period))
        gk, fk = sliding_means(gd, w), sliding_means(cf, w)
        if gk.size:
            by_periods[str(k)] = float(np.max(np.abs(gk - fk) / fk))
    details |= {
        "max_error": float(rel[worst]),
        "max_error_window_start": worst,
        "median_error": float(np.median(rel)),
        "fraction_within": float(np.mean(rel <= tol)),
        "windows": int(rel.size),
        "errors_by_periods": by_periods,
        "run_mean_ratio": float(gd.mean() / cf.mean()),
        "errors": [float(v) for v in rel],
    }
    if osc.kind == "period-2 flip":
        seen = "no self-stabilization cycle above the noise: the period-2 flip, T = 2"
    else:
        seen = f"self-stabilization cycle T = {osc.period} steps (autocorr. {osc.acf_peak:.2f})"
    others = ", ".join(f"{k} period(s) {v:.1%}" for k, v in by_periods.items())
    end = worst + window - 1
    measured = (
        f"{seen}; worst {window}-step window {rel[worst]:.1%} (steps {worst}–{end}), "
        f"median {np.median(rel):.1%}, {np.mean(rel <= tol):.0%} of {rel.size} windows within "
        f"{tol:.0%}" + (f"; worst with {others} (not judged)" if others else "")
    )
    holds = bool(rel[worst] <= tol)
    cmp = "≤" if holds else ">"
    why = f"worst window error {rel[worst]:.1%} {cmp} {tol:.0%} (steps {worst}–{end})"
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


def edge_figure(
    results: list[dict[str, Any]], window: int, loss_windows: list[int | None] | None = None
) -> Figure:
    """Loss (GD, its window means, the flow, the linearized model) and sharpness per step size.

    ``loss_windows[j]``: the loss rule's window for ``results[j]`` (``None``: not judged); GD's
    and the flow's sliding means over it are drawn at the windows' centres, else GD's
    consecutive ``window``-step means."""
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
        lw = (loss_windows or [None] * k)[j]
        if lw is not None and gd.size >= lw and r.get("cf_loss"):
            tc = np.arange(gd.size - lw + 1) + (lw - 1) / 2
            cf = np.asarray(r["cf_loss"], dtype=np.float64)[: gd.size]
            ax.semilogy(tc, sliding_means(gd, lw), color="C0", label=f"GD, {lw}-step means")
            ax.semilogy(tc, sliding_means(cf, lw), color="C1", lw=1.0, label="flow, same")
        elif gd.size >= window:
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
        "means over the loss rule's sliding window (blue; a few measured oscillation periods, "
        "drawn at the window's centre; orange: the flow's means over the same windows) beside "
        "the central flow's time-averaged loss (red dashed) and the linearized model (green "
        "dotted); below, the measured sharpness against the flow's and 2/η.",
    )
