"""Asymptotic orders judged as trends (docs/theory.md §8).

A theorem that says ``y(m) = O(m^b)`` bounds no finite-width slope: the measured exponent may sit
above ``b`` at small widths and steepen toward it. The statement is tested on the *local*
exponents between successive widths,

    ``s_j = (ȳ_{j+1} − ȳ_j)/(log m_{j+1} − log m_j)``,  ``ȳ_j`` = mean of ``log y`` over the runs
    at width ``m_j``,

with intervals from the pooled between-run variance of ``log y`` (Student t, ``N − W`` degrees of
freedom for ``N`` runs at ``W`` widths), and on their trend: the generalized-least-squares line
``s(x) = e + τ (x − x_end)`` through the local exponents against ``x = log`` of each pair's
geometric-mean width, weighted by the local exponents' covariance (neighbours share a width).
``e`` is the exponent at the two largest widths as the whole sweep estimates it (with three or
more widths; the raw last local exponent otherwise), ``τ`` the trend. The rule, on ``e`` with its
interval ``[lo, hi]`` and ``τ`` with its interval:

* **holds** if ``hi ≤ b`` (the order is reached); or if ``τ``'s interval lies below 0 (the
  exponent steepens toward ``b``: an order approached from above is what an asymptotic bound
  allows); or if ``[lo, hi]`` contains ``b`` and ends within 10% of it (``hi ≤ b + 0.1|b|``, an
  equivalence margin) while the exponents do not flatten: the order is reached within the
  measurement's precision;
* **fails** if ``lo > b`` and the exponent has stopped approaching ``b``: even the steepest trend
  inside ``τ``'s interval would not bring ``lo`` down to ``b`` within one more decade of width
  (this includes exponents that move away from ``b``);
* **undetermined** otherwise: above ``b`` with a trend too uncertain to tell, or containing ``b``
  with an interval too wide or while flattening (more trials or wider networks decide).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

__all__ = ["LocalExponents", "local_exponents"]

_DECADE = math.log(10.0)
#: An interval containing the order counts as reaching it when it ends within this fraction of it.
_MARGIN = 0.1


@dataclass(frozen=True)
class LocalExponents:
    """Local exponents between successive widths, their trend, and the verdict against ``bound``.

    ``slopes[j]``/``cis[j]`` belong to the width pair ``pairs[j]``; ``end``/``end_ci`` is the
    exponent at the largest pair that the verdict uses (the trend line's value there); ``trend`` is
    ``d s/d log m`` with its interval ``trend_ci`` (``None`` with fewer than 3 widths).
    """

    bound: float
    widths: tuple[int, ...]
    pairs: tuple[tuple[int, int], ...]
    slopes: tuple[float, ...]
    cis: tuple[tuple[float, float], ...]
    end: float
    end_ci: tuple[float, float]
    trend: float | None
    trend_ci: tuple[float, float] | None
    level: float
    holds: bool | None
    reason: str

    def describe(self) -> str:
        """One line: each local exponent with its interval, and the trend."""
        parts = [
            f"{a}→{b}: {s:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            for (a, b), s, (lo, hi) in zip(self.pairs, self.slopes, self.cis, strict=True)
        ]
        out = "local exponents " + "; ".join(parts)
        if self.trend is not None and self.trend_ci is not None:
            lo, hi = self.trend_ci
            out += f"; trend d(exponent)/d(log m) {self.trend:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            lo, hi = self.end_ci
            out += f"; exponent at the largest widths {self.end:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "bound": self.bound,
            "widths": list(self.widths),
            "pairs": [list(p) for p in self.pairs],
            "slopes": list(self.slopes),
            "cis": [list(c) for c in self.cis],
            "end": self.end,
            "end_ci": list(self.end_ci),
            "trend": self.trend,
            "trend_ci": None if self.trend_ci is None else list(self.trend_ci),
            "level": self.level,
            "reason": self.reason,
        }


def local_exponents(
    points: Sequence[tuple[float, float]], bound: float, level: float = 0.95
) -> LocalExponents | None:
    """Judge ``y = O(m^bound)`` from ``(width, y)`` points (several runs per width).

    ``None`` when fewer than two widths have positive values or no width has two runs (no
    variance to pool).
    """
    groups: dict[int, list[float]] = {}
    for m, y in points:
        if m > 0 and y is not None and math.isfinite(y) and y > 0:
            groups.setdefault(int(m), []).append(math.log(y))
    widths = tuple(sorted(groups))
    n = np.array([len(groups[m]) for m in widths], dtype=float)
    dof = int(n.sum()) - len(widths)
    if len(widths) < 2 or dof < 1:
        return None
    mean = np.array([np.mean(groups[m]) for m in widths])
    ss = sum(
        float(np.sum((np.asarray(groups[m]) - mu) ** 2)) for m, mu in zip(widths, mean, strict=True)
    )
    var = max(ss / dof, 1e-300) / n  # variance of each width's mean log y
    t = float(stats.t.ppf(0.5 + level / 2, dof))
    lm = np.log(np.asarray(widths, dtype=float))
    dx = np.diff(lm)
    D = (np.eye(len(widths), k=1) - np.eye(len(widths)))[:-1] / dx[:, None]
    s = D @ mean
    C = D @ np.diag(var) @ D.T
    se = np.sqrt(np.diag(C))
    cis = tuple((float(a - t * e), float(a + t * e)) for a, e in zip(s, se, strict=True))
    trend = trend_ci = None
    end, end_ci = float(s[-1]), cis[-1]
    if len(s) >= 2:
        mid = (lm[:-1] + lm[1:]) / 2
        X = np.column_stack([np.ones_like(s), mid - mid[-1]])  # intercept: the fit at the end
        Ci = np.linalg.inv(C)
        cov = np.linalg.inv(X.T @ Ci @ X)
        beta = cov @ X.T @ Ci @ s
        trend = float(beta[1])
        half = t * math.sqrt(cov[1, 1])
        trend_ci = (trend - half, trend + half)
        end = float(beta[0])
        half = t * math.sqrt(cov[0, 0])
        end_ci = (end - half, end + half)
    holds, reason = _decide(bound, end, end_ci, trend_ci, (widths[-2], widths[-1]))
    return LocalExponents(
        bound=bound,
        widths=widths,
        pairs=tuple(itertools.pairwise(widths)),
        slopes=tuple(float(x) for x in s),
        cis=cis,
        end=end,
        end_ci=end_ci,
        trend=trend,
        trend_ci=trend_ci,
        level=level,
        holds=holds,
        reason=reason,
    )


def _decide(
    bound: float,
    last: float,
    ci: tuple[float, float],
    trend_ci: tuple[float, float] | None,
    pair: tuple[int, int],
) -> tuple[bool | None, str]:
    lo, hi = ci
    at = f"between widths {pair[0]} and {pair[1]}"
    if hi <= bound:
        return True, f"{at} the local exponent {last:+.3f} is at or below {bound:g}: order reached"
    if trend_ci is not None and trend_ci[1] < 0:
        return True, (
            f"{at} the local exponent {last:+.3f} is "
            + ("above" if lo > bound else "within the interval of")
            + f" {bound:g} and steepens toward it as width grows, as an asymptotic order allows"
        )
    if lo > bound:
        if trend_ci is not None and lo + min(trend_ci[0], 0.0) * _DECADE > bound:
            return False, (
                f"{at} the local exponent {last:+.3f} is above {bound:g} and not approaching it: "
                "even the steepest trend in its interval would not reach it within ten times "
                "the largest width"
            )
        return None, (
            f"{at} the local exponent {last:+.3f} is above {bound:g} and the trend is too "
            "uncertain to tell whether it approaches: wider networks or more trials decide"
        )
    if trend_ci is not None and trend_ci[0] > 0:
        return None, (
            f"{at} the local exponent's interval [{lo:+.3f}, {hi:+.3f}] contains {bound:g} but "
            "the exponents flatten as width grows: wider networks decide"
        )
    if hi <= bound + _MARGIN * abs(bound):
        return True, (
            f"{at} the local exponent {last:+.3f} [{lo:+.3f}, {hi:+.3f}] equals {bound:g} within "
            f"its interval, which ends within {_MARGIN:.0%} of the order: the order is reached"
        )
    return None, (
        f"{at} the local exponent's interval [{lo:+.3f}, {hi:+.3f}] contains {bound:g} but is too "
        "wide to tell: more trials or wider networks decide"
    )
