"""Is a loss curve linear (exponential) or sublinear (power law)? Fits with confidence intervals.

On a tail window of the curve, two straight lines are fitted by ordinary least squares:

* **exponential** ``L_t ≈ C ρ^t``: ``log L_t = log C + t log ρ``; ``ρ`` is the per-step loss
  factor (the residual factor is ``√ρ``, THEORY §2);
* **power law** ``L_t ≈ C t^{−p}``: ``log L_t = log C − p log t`` (steps ``t ≤ 0`` are left out
  of both fits, so they compare the same points).

Each slope gets a two-sided confidence interval from the t distribution with ``m − 2`` degrees of
freedom on its standard error ``s/√Σ(x − x̄)²``, ``s² = RSS/(m − 2)``. The intervals assume
independent errors in ``log L``: a deterministic curve's misfit is smooth, not noise, so there
they are only a measure of misfit. Both models have two parameters, so their Gaussian AICs
differ by ``m·log(RSS_a/RSS_b)``: the model with the smaller residual sum is preferred, by
``ΔAIC`` (``> 10`` decisive) and the evidence ratio ``exp(ΔAIC/2)``. Over a short window a sum
of exponentials with spread-out rates can look like a power law: compare whole predicted curves
with measured ones first, and fit the tail.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats

from gdscope.errors import InvalidArgumentError, NonFiniteError, ShapeMismatchError

__all__ = ["LineFit", "RateFit", "fit_rates"]

_MIN_POINTS = 5


@dataclass(frozen=True)
class LineFit:
    """An OLS line ``y = intercept + slope·x`` with the slope's standard error and interval."""

    slope: float
    intercept: float
    slope_se: float
    slope_ci: tuple[float, float]
    r2: float
    rss: float
    aic: float
    points: int


@dataclass(frozen=True)
class RateFit:
    """Exponential and power-law fits of one loss curve's tail (see the module docstring).

    Attributes:
        exponential: the fit of ``log L`` against ``t``.
        power: the fit of ``log L`` against ``log t``.
        exponential_rate: per-step loss factor ``ρ = exp(slope)``.
        exponential_rate_ci: its interval at ``level``.
        power_exponent: ``p`` in ``L ∝ t^{−p}`` (``−slope``).
        power_exponent_ci: its interval at ``level``.
        preferred: ``"exponential"`` or ``"power"`` (smaller residual sum / AIC).
        delta_aic: AIC of the other model minus that of the preferred one (``≥ 0``).
        evidence_ratio: ``exp(ΔAIC/2)`` (``inf`` when it overflows).
        decisive: ``ΔAIC > 10``.
        window: first and last step of the fitted points.
        level: confidence level of the intervals.
        notes: caveats (points left out, ...).
    """

    exponential: LineFit
    power: LineFit
    exponential_rate: float
    exponential_rate_ci: tuple[float, float]
    power_exponent: float
    power_exponent_ci: tuple[float, float]
    preferred: str
    delta_aic: float
    evidence_ratio: float
    decisive: bool
    window: tuple[float, float]
    level: float
    notes: tuple[str, ...] = ()

    @property
    def residual_rate(self) -> float:
        """Per-step residual factor ``√ρ`` (MSE: the loss is the squared residual)."""
        return math.sqrt(self.exponential_rate)

    def summary(self) -> str:
        """One line: both fits with their intervals and which the data prefer."""
        lo, hi = self.exponential_rate_ci
        plo, phi = self.power_exponent_ci
        return (
            f"exponential ρ = {self.exponential_rate:.6g} [{lo:.6g}, {hi:.6g}] "
            f"(R² {self.exponential.r2:.4f}); power p = {self.power_exponent:.4g} "
            f"[{plo:.4g}, {phi:.4g}] (R² {self.power.r2:.4f}); prefer {self.preferred} "
            f"(ΔAIC {self.delta_aic:.3g}{', decisive' if self.decisive else ''}) over steps "
            f"{self.window[0]:g}–{self.window[1]:g}"
        )


def _ols(x: np.ndarray, y: np.ndarray, level: float) -> LineFit:
    m = x.size
    xm, ym = x.mean(), y.mean()
    sxx = float(np.sum((x - xm) ** 2))
    if sxx <= 0:
        raise InvalidArgumentError("the window's steps are all equal: nothing to fit against.")
    slope = float(np.sum((x - xm) * (y - ym)) / sxx)
    intercept = float(ym - slope * xm)
    resid = y - (intercept + slope * x)
    rss = float(resid @ resid)
    tss = float(np.sum((y - ym) ** 2))
    se = math.sqrt(rss / (m - 2) / sxx)
    tcrit = float(stats.t.ppf(0.5 + level / 2, m - 2))
    r2 = 1.0 - rss / tss if tss > 0 else (1.0 if rss == 0 else float("nan"))
    # residual sums at rounding level are floored so exact curves give a finite AIC
    floor = m * (4 * np.finfo(float).eps * max(1.0, float(np.max(np.abs(y))))) ** 2
    aic = m * math.log(max(rss, floor) / m) + 6.0  # slope, intercept, noise variance
    return LineFit(
        slope=slope,
        intercept=intercept,
        slope_se=se,
        slope_ci=(slope - tcrit * se, slope + tcrit * se),
        r2=r2,
        rss=rss,
        aic=aic,
        points=m,
    )


def _is_real(x: Any) -> bool:
    """A real number (Python or NumPy scalar), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _curve(values: Any, name: str) -> np.ndarray:
    """``values`` as a 1-D float64 array, or a clear error naming ``name``."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.is_complex():
            raise InvalidArgumentError(
                f"{name} is a complex tensor: pass the real loss values (a 1-D sequence)."
            )
        values = values.to(torch.float64).numpy()
    if values is None or isinstance(values, (str, bytes, dict)) or np.isscalar(values):
        raise InvalidArgumentError(
            f"{name}={values!r} ({type(values).__name__}) is not a curve: pass a 1-D sequence "
            "of numbers (a list, numpy array or tensor), one per step."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", np.exceptions.ComplexWarning)
            arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError, np.exceptions.ComplexWarning) as e:
        text = repr(values)
        text = text if len(text) <= 60 else text[:57] + "..."
        raise InvalidArgumentError(
            f"{name}={text} ({type(values).__name__}) must hold real numbers only ({e}): pass a "
            "1-D sequence of floats, one per step."
        ) from None
    if arr.ndim != 1:
        raise ShapeMismatchError(
            f"{name} must be a 1-D curve, got shape {arr.shape}: pass one value per step "
            "(flatten or select one curve)."
        )
    return arr


def fit_rates(
    losses: Any,
    steps: Any = None,
    *,
    tail: float | int = 0.5,
    level: float = 0.95,
) -> RateFit:
    """Fit ``L ≈ C ρ^t`` and ``L ≈ C t^{−p}`` to the tail of a loss curve; say which fits better.

    Args:
        losses: the loss curve, 1-D, every value finite and ``> 0``.
        steps: the step of each value (default ``0, 1, 2, …``), strictly increasing.
        tail: the window: a fraction in ``(0, 1]`` of the curve's points (the last ones), or an
            integer number of last points. At least 5 points with step ``> 0`` are needed.
        level: confidence level of the intervals, in ``(0, 1)``.

    Returns:
        :class:`RateFit`.

    >>> import numpy as np
    >>> fit = fit_rates(3.0 * 0.9 ** np.arange(100))
    >>> round(fit.exponential_rate, 12), fit.preferred
    (0.9, 'exponential')
    """
    y = _curve(losses, "losses")
    if y.size < _MIN_POINTS:
        raise InvalidArgumentError(
            f"losses has {y.size} value(s); at least {_MIN_POINTS} are needed to fit two lines "
            "with intervals: pass a longer loss curve."
        )
    bad = np.flatnonzero(~np.isfinite(y) | (y <= 0))
    if bad.size:
        i = int(bad[0])
        msg = (
            "rates are fitted to log L; cut the curve before it diverges or reaches 0 "
            f"(e.g. losses[:{i}])."
        )
        if not np.isfinite(y[i]):
            raise NonFiniteError(f"losses[{i}] = {float(y[i])!r} is not finite: {msg}")
        raise InvalidArgumentError(f"losses[{i}] = {float(y[i])!r} is not positive: {msg}")
    if steps is None:
        t = np.arange(y.size, dtype=np.float64)
    else:
        t = _curve(steps, "steps")
        if t.shape != y.shape:
            raise ShapeMismatchError(
                f"steps has shape {t.shape} but losses {y.shape}: one step per loss."
            )
        if not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
            raise InvalidArgumentError("steps must be finite and strictly increasing.")
    if not _is_real(level) or not 0 < level < 1:
        raise InvalidArgumentError(f"level={level!r} must be in (0, 1), e.g. 0.95.")
    if isinstance(tail, bool):
        raise InvalidArgumentError(f"tail={tail!r}: pass a fraction in (0, 1] or a count.")
    if isinstance(tail, (int, np.integer)):
        count = int(tail)
        if count < 1:
            raise InvalidArgumentError(f"tail={tail!r} must be >= 1 points.")
    elif _is_real(tail) and 0 < tail <= 1:
        count = math.ceil(tail * y.size)
    else:
        raise InvalidArgumentError(
            f"tail={tail!r} ({type(tail).__name__}): pass a fraction in (0, 1] or a count >= 1."
        )
    start = max(y.size - count, 0)
    tw, yw = t[start:], y[start:]
    notes: list[str] = []
    keep = tw > 0
    if not np.all(keep):
        notes.append(f"{int((~keep).sum())} point(s) with step ≤ 0 left out (log t undefined).")
        tw, yw = tw[keep], yw[keep]
    if tw.size < _MIN_POINTS:
        raise InvalidArgumentError(
            f"the fit window holds {tw.size} usable point(s) (curve of {y.size}, tail={tail!r}); "
            f"at least {_MIN_POINTS} are needed: pass a longer curve or a larger tail."
        )
    logy = np.log(yw)
    expo = _ols(tw, logy, level)
    power = _ols(np.log(tw), logy, level)
    if expo.aic <= power.aic:
        preferred, delta = "exponential", power.aic - expo.aic
    else:
        preferred, delta = "power", expo.aic - power.aic
    ratio = math.exp(delta / 2) if delta < 1400 else math.inf
    return RateFit(
        exponential=expo,
        power=power,
        exponential_rate=math.exp(expo.slope),
        exponential_rate_ci=(math.exp(expo.slope_ci[0]), math.exp(expo.slope_ci[1])),
        power_exponent=-power.slope,
        power_exponent_ci=(-power.slope_ci[1], -power.slope_ci[0]),
        preferred=preferred,
        delta_aic=delta,
        evidence_ratio=ratio,
        decisive=delta > 10,
        window=(float(tw[0]), float(tw[-1])),
        level=float(level),
        notes=tuple(notes),
    )
