"""Verdicts on a stored run: what theory predicts, what was measured, and whether it holds.

Steps in verdicts are iterate indices (see :meth:`gdscope.store.Store.series`): the number of
optimizer updates applied to the parameters a value describes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from gdscope.errors import GdscopeError, InvalidArgumentError
from gdscope.store import RunInfo, Store
from gdscope.theory import RateFit, fit_rates
from gdscope.verdict import Verdict

__all__ = [
    "ProbeTiming",
    "RateRow",
    "Verdict",
    "probe_timings",
    "rate_row",
    "stop_reason",
    "stored_prediction",
    "summarize_run",
]

#: Training accuracy that counts as zero training error.
ZERO_ERROR_ACCURACY = 1.0
#: Final/initial loss ratio at or below which the loss counts as near zero.
NEAR_ZERO_LOSS_RATIO = 1e-2
#: Sharpness at this fraction of the stability threshold marks the edge-of-stability onset.
EOS_ONSET_FRACTION = 0.95

Series = tuple[np.ndarray, np.ndarray]

_SEC_KERNEL = "1-kernel-certificates"
_SEC_CURVATURE = "3-curvature-stability-of-minima-and-the-gd-map"
_ZERO_ERROR_THEOREM = (
    "Over-parameterized networks trained by gradient descent from a random initialization reach "
    "zero training error (global convergence in the kernel regime, §1). Tested on the last "
    "recorded training accuracy: it holds when that accuracy is 100%."
)
_DECREASE_THEOREM = (
    "Under a PL* condition ½‖∇L‖² ≥ μL with S-smoothness, GD at η = 1/S gives "
    "L_t ≤ (1 − μ/S)^t L_0: the loss decreases to zero (§1). Tested at finite length: it holds "
    f"when the last loss is at most {NEAR_ZERO_LOSS_RATIO:g} of the first."
)
_EOS_THEOREM = (
    "Edge of stability (Cohen et al. 2021, §3): under full-batch GD the sharpness rises to about "
    "the stability threshold 2/η and hovers there. Tested against the recorded threshold (it "
    f"follows the learning-rate schedule): it holds once sharpness/threshold ≥ "
    f"{EOS_ONSET_FRACTION:g}."
)
_FINITE_THEOREM = (
    "A run below the stability threshold of its optimizer (§3) keeps a finite loss. Tested on "
    "every recorded loss value and the run's stored status."
)


@dataclass(frozen=True)
class ProbeTiming:
    """Total wall time of one probe in a run; ``share`` is relative to the loop's ``step_time``."""

    probe: str
    seconds: float
    calls: int
    share: float | None


def summarize_run(store: Store, run_id: int) -> list[Verdict]:
    """The verdicts on zero training error, loss decrease, edge of stability and finiteness."""
    run = store.run(run_id)
    names = set(store.metric_names(run.id))
    series = {
        n: store.series(run.id, n)
        for n in ("accuracy", "loss", "sharpness", "threshold")
        if n in names
    }
    stored = [Verdict.from_dict(v) for v in run.summary.get("verdicts", [])]
    return [
        _zero_error(series.get("accuracy")),
        _loss_decrease(series.get("loss")),
        _edge_of_stability(series.get("sharpness"), series.get("threshold")),
        _finite_loss(series.get("loss"), run.status),
        *stored,
    ]


def stop_reason(store: Store, info: RunInfo) -> str:
    """Why the run stopped, in words, from its stored status, its last step and its loss.

    ``completed N steps``; ``diverged at step t (loss non-finite: inf)``; ``failed with an
    error after step t``; ``incomplete: …`` for a run never finished (its process was killed,
    or it is still running).
    """
    last = info.last_step
    after = "before any step was stored" if last is None else f"after step {last}"
    if not info.complete:
        return (
            f"incomplete: the run never finished; its process was killed (or is still running) "
            f"{after}"
        )
    if info.status == "completed":
        planned = info.config.get("steps") if isinstance(info.config, dict) else None
        if last is None:
            return "completed, with no step stored"
        done = last + 1
        if isinstance(planned, int) and not isinstance(planned, bool) and planned != done:
            return f"completed {planned} steps (the last one stored is step {last})"
        return f"completed {done} step{'s' if done != 1 else ''} (steps 0–{last})"
    if info.status == "diverged":
        loss = store.series(info.id, "loss") if "loss" in store.metric_names(info.id) else None
        if loss is not None:
            bad = np.flatnonzero(~np.isfinite(loss[1]))
            if bad.size:
                return f"diverged at step {loss[0][bad[0]]} (loss non-finite: {loss[1][bad[0]]})"
        return f"diverged {after} (the loss or the parameters became non-finite)"
    if info.status == "failed":
        error = info.summary.get("error") if isinstance(info.summary, dict) else None
        text = f": {error}" if isinstance(error, str) and error else ""
        return f"failed with an error {after}{text}"
    return f"{info.status} {after}"


def stored_prediction(store: Store, run_id: int) -> dict[str, Any] | None:
    """The prediction recorded with a run (:meth:`gdscope.Tracker.record_prediction`), if any."""
    try:
        return json.loads(store.artifact(run_id, "prediction"))
    except InvalidArgumentError:
        return None


@dataclass(frozen=True)
class RateRow:
    """A run's fitted loss rates (:func:`gdscope.theory.fit_rates` on the last half of its loss
    curve) beside the predicted asymptotic loss factor per step, when a prediction is stored."""

    fit: RateFit | None
    predicted_loss_rate: float | None
    note: str = ""


def rate_row(store: Store, run_id: int) -> RateRow:
    """Fit the measured loss curve of a run and set the stored prediction's rate beside it."""
    pred = stored_prediction(store, run_id)
    predicted = None if pred is None else pred.get("loss_rate")
    if "loss" not in store.metric_names(run_id):
        return RateRow(None, predicted, "no loss metric")
    x, v = store.series(run_id, "loss")
    keep = np.isfinite(v) & (v > 0)
    if not keep.all():  # fit up to the first non-finite or zero value
        first = int(np.flatnonzero(~keep)[0])
        x, v = x[:first], v[:first]
    try:
        return RateRow(fit_rates(v, x, tail=0.5), predicted)
    except GdscopeError as e:
        return RateRow(None, predicted, str(e))


def probe_timings(store: Store, run_id: int) -> list[ProbeTiming]:
    """Seconds spent in each probe (``time/<probe>`` metrics), most expensive first."""
    names = store.metric_names(run_id)
    loop = np.nansum(store.series(run_id, "step_time")[1]) if "step_time" in names else 0.0
    out = []
    for name in names:
        if name.startswith("time/"):
            values = store.series(run_id, name)[1]
            total = float(np.nansum(values))
            out.append(
                ProbeTiming(name[5:], total, values.size, total / loop if loop > 0 else None)
            )
    return sorted(out, key=lambda t: -t.seconds)


def _zero_error(acc: Series | None) -> Verdict:
    claim, predicted = "training reaches zero training error", "training accuracy reaches 100%"
    common = {"theorem": _ZERO_ERROR_THEOREM, "section": _SEC_KERNEL}
    if acc is None:
        return Verdict(
            claim,
            predicted,
            "no accuracy metric",
            None,
            "accuracy needs classification targets (AccuracyProbe)",
            reason="not measured: the run recorded no training accuracy",
            **common,
        )
    x, v = acc
    hits = x[v >= ZERO_ERROR_ACCURACY]
    first = f"first 100% at step {hits[0]}" if hits.size else "never 100%"
    holds = bool(v[-1] >= ZERO_ERROR_ACCURACY)
    return Verdict(
        claim,
        predicted,
        f"final accuracy {v[-1]:.4g}; {first}",
        holds,
        f"{v.size} measurements up to step {x[-1]}",
        reason=(
            "the last measured training accuracy is 100%"
            if holds
            else f"the last measured training accuracy is {100 * v[-1]:.3g}%, below 100%"
        ),
        **common,
    )


def _loss_decrease(loss: Series | None) -> Verdict:
    claim = "loss decreases to near zero"
    predicted = f"final/initial loss ≤ {NEAR_ZERO_LOSS_RATIO:g}"
    common = {"theorem": _DECREASE_THEOREM, "section": _SEC_KERNEL}
    if loss is None or loss[1].size < 2:
        return Verdict(
            claim,
            predicted,
            "fewer than two loss values",
            None,
            reason="not measured: a ratio needs a first and a last loss value",
            **common,
        )
    x, v = loss
    span = f"{v[0]:.4g} at step {x[0]} → {v[-1]:.4g} at step {x[-1]}"
    if not np.isfinite([v[0], v[-1]]).all():
        return Verdict(
            claim,
            predicted,
            f"non-finite loss ({span})",
            False,
            reason="the loss became non-finite: the run diverged instead of converging",
            **common,
        )
    if v[0] <= 0:
        return Verdict(
            claim,
            predicted,
            f"initial loss {v[0]:.4g} ≤ 0",
            None,
            "the ratio is undefined for a non-positive initial loss",
            reason="the final/initial ratio is undefined for a non-positive initial loss",
            **common,
        )
    ratio = v[-1] / v[0]
    holds = bool(ratio <= NEAR_ZERO_LOSS_RATIO)
    return Verdict(
        claim,
        predicted,
        f"final/initial = {ratio:.3g}",
        holds,
        span,
        reason=(
            f"the loss fell by a factor {1 / ratio:.3g}, at least {1 / NEAR_ZERO_LOSS_RATIO:g}"
            if holds
            else f"the loss fell only by a factor {1 / ratio:.3g} (< {1 / NEAR_ZERO_LOSS_RATIO:g})"
        ),
        **common,
    )


def _edge_of_stability(sharp: Series | None, thr: Series | None) -> Verdict:
    claim = "sharpness reaches the stability threshold (edge of stability)"
    predicted = "sharpness rises to threshold (2/η for GD)"
    common = {"theorem": _EOS_THEOREM, "section": _SEC_CURVATURE}
    if sharp is None:
        return Verdict(
            claim,
            predicted,
            "no sharpness metric",
            None,
            "record SharpnessProbe",
            reason="not measured: the run recorded no sharpness",
            **common,
        )
    if thr is None:
        return Verdict(
            claim,
            predicted,
            "no threshold metric",
            None,
            "the optimizer has no known stability threshold (or ThresholdProbe is off)",
            reason="no stability threshold was recorded to compare the sharpness with",
            **common,
        )
    x, ratio = sharp[0], sharp[1] / _hold(thr, sharp[0])
    keep = np.isfinite(ratio)
    x, ratio = x[keep], ratio[keep]
    if not ratio.size:
        return Verdict(
            claim,
            predicted,
            "no finite sharpness/threshold value",
            None,
            reason="every sharpness/threshold ratio is non-finite",
            **common,
        )
    lo, hi = np.nanmin(thr[1]), np.nanmax(thr[1])
    details = (f"threshold {lo:.4g}" if lo == hi else f"threshold from {lo:.4g} to {hi:.4g}") + (
        f"; sharpness measured at {ratio.size} steps"
    )
    measured = f"max sharpness/threshold {ratio.max():.3g}"
    hits = np.flatnonzero(ratio >= EOS_ONSET_FRACTION)
    if not hits.size:
        return Verdict(
            claim,
            predicted,
            f"{measured}; never ≥ {EOS_ONSET_FRACTION:g}·threshold",
            False,
            details,
            reason=(
                f"the sharpness peaked at {ratio.max():.3g}× the threshold, below the "
                f"{EOS_ONSET_FRACTION:g}× that marks the edge"
            ),
            **common,
        )
    onset = hits[0]
    measured += (
        f"; onset (≥ {EOS_ONSET_FRACTION:g}·threshold) at step {x[onset]}; "
        f"median after onset {np.median(ratio[onset:]):.3g}"
    )
    why = f"the sharpness reached {EOS_ONSET_FRACTION:g}× the threshold at step {x[onset]}"
    return Verdict(claim, predicted, measured, True, details, reason=why, **common)


def _hold(series: Series, x: np.ndarray) -> np.ndarray:
    """``series`` at ``x``, holding its last value (its first before it starts)."""
    sx, sv = series
    return sv[np.clip(np.searchsorted(sx, x, side="right") - 1, 0, None)]


def _finite_loss(loss: Series | None, status: str) -> Verdict:
    claim, predicted = "loss stays finite", "finite loss at every step"
    common = {"theorem": _FINITE_THEOREM, "section": _SEC_CURVATURE}
    if loss is not None:
        bad = np.flatnonzero(~np.isfinite(loss[1]))
        if bad.size:
            x, v = loss[0][bad[0]], loss[1][bad[0]]
            return Verdict(
                claim,
                predicted,
                f"loss {v} at step {x}",
                False,
                f"run status: {status}",
                reason=f"the loss was {v} at step {x}",
                **common,
            )
    if status == "diverged":
        return Verdict(
            claim,
            predicted,
            "the run diverged",
            False,
            "run status: diverged",
            reason="the run stopped as diverged (the loss or the parameters became non-finite)",
            **common,
        )
    if loss is None:
        return Verdict(
            claim,
            predicted,
            "no loss metric",
            None,
            reason="not measured: the run recorded no loss",
            **common,
        )
    return Verdict(
        claim,
        predicted,
        f"all {loss[1].size} values finite",
        True,
        f"max {loss[1].max():.4g}",
        reason=f"every one of the {loss[1].size} recorded loss values is finite",
        **common,
    )
