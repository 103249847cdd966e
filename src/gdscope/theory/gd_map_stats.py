"""The GD map, empirically (THEORY §3): singular step sizes along a run, and how rare they are.

``G_η(θ) = θ − η∇L(θ)`` has Jacobian ``I − η∇²L(θ)``, singular exactly when ``η = 1/h`` for a
Hessian eigenvalue ``h > 0``, with ``sign det(I − η∇²L) = (−1)^{#{h > 1/η}}``.

* :func:`singular_step_sizes` evaluates :func:`gdscope.gd_map` at every point of a trajectory:
  the singular step sizes nearest ``lr`` on each side, ``min_i |1 − lr·h_i|`` and the sign,
  and lists where the sign flips (an eigenvalue crossed ``1/lr`` between two points).
* :func:`min_factor_distribution` checks the prediction of the piecewise-analytic
  non-singularity result: over random ``θ`` and ``η`` the smallest factor
  ``m = min_i |1 − ηh_i|`` has **no atom at zero** and ``P(m < ε)`` is **linear** in ``ε`` for
  small ``ε``. Near a simple zero ``η₀ = 1/h_i`` the factor is ``h_i |η − η₀|``, so a bounded
  density of ``(θ, η)`` gives ``P(m < ε) ≈ c·ε``.

**The slope.** :func:`tail_exponent` fits ``P(m < ε) = c·ε^α`` on the lower tail by maximum
likelihood (the Hill estimator): with the ``k`` smallest samples ``m_(1..k)`` below the threshold
``u = m_(k+1)``, the ratios ``m_(i)/u`` are uniform-to-the-``α`` on ``(0, 1)``, so
``Σ log(u/m_(i)) ~ Gamma(k, α)``; ``α̂ = k / Σ log(u/m_(i))`` and the interval from
``2α Σ log(u/m_(i)) ~ χ²_{2k}`` is exact under the power law. A least-squares slope of
``log F̂(ε)`` against ``log ε`` on the same tail is reported alongside (no interval: the
empirical CDF's points are correlated). The prediction holds when no sample is exactly zero and
the interval contains 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from gdscope.curvature import dense_hessian, gd_map
from gdscope.errors import InvalidArgumentError
from gdscope.problem import Params, Problem

__all__ = [
    "MinFactorReport",
    "SingularStepTrace",
    "TailFit",
    "min_factor_distribution",
    "singular_step_sizes",
    "tail_exponent",
]


# ---------------------------------------------------------------------- along a trajectory
@dataclass(frozen=True)
class SingularStepTrace:
    """:func:`gdscope.gd_map` along a trajectory at a fixed ``lr``.

    Arrays are aligned with ``steps``. ``sign`` and ``count_above`` hold ``None`` where the
    sign is undetermined (an eigenvalue within round-off of ``1/lr``); ``singular_lr_below``
    and ``singular_lr_above`` are ``nan`` where no singular step size lies on that side.
    ``sign_changes`` lists ``(step_a, step_b)`` for consecutive *determined* points whose signs
    differ (an odd number of eigenvalues crossed ``1/lr`` in between); ``crossings`` lists
    ``(step_a, step_b, Δcount)`` wherever ``count_above`` changed (an even change keeps the
    sign).
    """

    lr: float
    steps: np.ndarray
    sign: list[int | None]
    count_above: list[int | None]
    singular_lr_below: np.ndarray
    singular_lr_above: np.ndarray
    min_factor: np.ndarray
    sign_changes: list[tuple[int, int]]
    crossings: list[tuple[int, int, int]]
    undetermined: int
    methods: list[str]
    seconds: float


def _as_params(prob: Problem, point: Any) -> Params:
    if isinstance(point, Mapping):
        return {
            n: torch.as_tensor(point[n]).detach().to(prob.device, prob.dtype) for n in prob.names
        }
    vec = torch.as_tensor(point).detach().reshape(-1).to(prob.device, prob.dtype)
    return prob.unflatten(vec)


def singular_step_sizes(
    prob: Problem,
    trajectory: Sequence[Any] | Tensor | np.ndarray | Callable[[int], Any],
    lr: float,
    *,
    steps: Sequence[int] | None = None,
    **gd_map_kwargs: Any,
) -> SingularStepTrace:
    """Singular step sizes nearest ``lr`` and ``sign det(I − lr∇²L)`` at each trajectory point.

    Args:
        prob: the problem (its data and loss define ``L``).
        trajectory: parameter dicts or flat vectors (a ``(T, P)`` array, e.g. from
            :func:`gdscope.theory.orbits.gd_trajectory`), or a callable ``step -> params``
            evaluated at ``steps``.
        lr: the step size whose GD map is examined.
        steps: step labels (required with a callable; default ``0 .. T−1``).
        **gd_map_kwargs: passed to :func:`gdscope.gd_map` (``dense_limit``, ``tol``, ...).
    """
    if callable(trajectory) and not isinstance(trajectory, (Tensor, np.ndarray)):
        if steps is None:
            raise InvalidArgumentError(
                "a callable trajectory needs steps=...: the steps at which to evaluate it."
            )
        labels = [int(s) for s in steps]
        points = [trajectory(s) for s in labels]
    else:
        points = list(trajectory)
        labels = list(range(len(points))) if steps is None else [int(s) for s in steps]
        if len(labels) != len(points):
            raise InvalidArgumentError(
                f"steps has {len(labels)} labels for {len(points)} trajectory points."
            )
    if not points:
        raise InvalidArgumentError("the trajectory is empty: pass at least one point.")
    reps = [gd_map(prob, lr, params=_as_params(prob, p), **gd_map_kwargs) for p in points]
    signs = [r.sign for r in reps]
    counts = [r.count_above for r in reps]
    changes: list[tuple[int, int]] = []
    crossings: list[tuple[int, int, int]] = []
    prev: tuple[int, int, int] | None = None  # (label, sign, count) of the last determined point
    for lab, s, c in zip(labels, signs, counts, strict=True):
        if s is None or c is None:
            continue
        if prev is not None:
            if s != prev[1]:
                changes.append((prev[0], lab))
            if c != prev[2]:
                crossings.append((prev[0], lab, c - prev[2]))
        prev = (lab, s, c)

    def arr(vals: list[float | None]) -> np.ndarray:
        return np.array([math.nan if v is None else v for v in vals], dtype=np.float64)

    return SingularStepTrace(
        lr=float(lr),
        steps=np.array(labels, dtype=np.int64),
        sign=signs,
        count_above=counts,
        singular_lr_below=arr([r.singular_lr_below for r in reps]),
        singular_lr_above=arr([r.singular_lr_above for r in reps]),
        min_factor=arr([r.min_factor for r in reps]),
        sign_changes=changes,
        crossings=crossings,
        undetermined=sum(s is None for s in signs),
        methods=[r.method for r in reps],
        seconds=sum(r.seconds for r in reps),
    )


# ---------------------------------------------------------------------- tail of min factor
@dataclass(frozen=True)
class TailFit:
    """``P(m < ε) ≈ c·ε^slope`` on the lower tail (see the module docstring).

    ``slope`` is the Hill maximum-likelihood exponent with its ``level`` interval ``slope_ci``;
    ``slope_ls`` the least-squares slope of ``log F̂`` on ``log ε`` over the tail; ``k`` the
    number of tail samples and ``threshold`` the tail's upper end ``u``. ``zeros`` counts
    samples exactly 0 (excluded from the fit: an atom).
    """

    slope: float
    slope_ci: tuple[float, float]
    slope_ls: float
    k: int
    threshold: float
    zeros: int
    n: int
    level: float

    def contains(self, value: float) -> bool:
        return self.slope_ci[0] <= value <= self.slope_ci[1]


def tail_exponent(samples: Any, *, tail: float = 0.1, level: float = 0.95) -> TailFit:
    """Fit ``P(m < ε) = c·ε^α`` to the smallest ``tail`` fraction of nonnegative ``samples``."""
    if samples is None or isinstance(samples, (str, bytes, dict)):
        raise InvalidArgumentError(
            f"samples={samples!r} ({type(samples).__name__}) must be numbers >= 0 (an array)."
        )
    if isinstance(samples, torch.Tensor):
        samples = samples.detach().cpu().double().numpy()
    try:
        m = np.sort(np.asarray(samples, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(
            f"samples ({type(samples).__name__}) must hold real numbers >= 0 ({e})."
        ) from None
    if m.size == 0 or not np.all(np.isfinite(m)) or m[0] < 0:
        raise InvalidArgumentError(
            f"samples must be a non-empty set of finite numbers >= 0, got {m.size} value(s)"
            + (f" with min {m[0]!r}" if m.size else "")
            + "."
        )
    for name, value in (("tail", tail), ("level", level)):
        if (
            isinstance(value, (bool, np.bool_))
            or not isinstance(value, (int, float, np.integer, np.floating))
            or not 0 < value < 1
        ):
            raise InvalidArgumentError(
                f"{name}={value!r} ({type(value).__name__}) must lie in (0, 1), e.g. "
                f"{name}={0.1 if name == 'tail' else 0.95}."
            )
    zeros = int(np.sum(m == 0))
    pos = m[m > 0]
    n = m.size
    k = math.floor(tail * n) - zeros
    if k < 5 or k + 1 > pos.size:
        raise InvalidArgumentError(
            f"the tail holds {k} positive samples: take more samples or a larger tail "
            "(at least 5 are needed)."
        )
    u = pos[k]
    logs = np.log(u / pos[:k])
    s = float(logs.sum())
    alpha = k / s
    a = 1 - level
    ci = (stats.chi2.ppf(a / 2, 2 * k) / (2 * s), stats.chi2.ppf(1 - a / 2, 2 * k) / (2 * s))
    # least squares on the empirical CDF F(m_(i)) = (zeros + i)/n over the tail
    F = (zeros + np.arange(1, k + 1)) / n
    slope_ls = float(np.polyfit(np.log(pos[:k]), np.log(F), 1)[0]) if k >= 2 else math.nan
    return TailFit(alpha, (float(ci[0]), float(ci[1])), slope_ls, k, float(u), zeros, n, level)


@dataclass(frozen=True)
class MinFactorReport:
    """Samples of ``min_i |1 − ηh_i|`` over initializations and step sizes, and the check.

    ``samples``, ``lrs`` and ``seeds`` are aligned (one entry per ``(seed, lr)`` pair).
    ``zero_fraction`` is the fraction of samples exactly 0 and ``roundoff_fraction`` the
    fraction below ``10·P·eps·η·max|h|`` (indistinguishable from 0 in the dtype). ``eps`` and
    ``cdf`` are the empirical ``P(m < ε)`` on a log grid over the tail. ``linear`` is True when
    no sample is exactly zero and ``fit.slope_ci`` contains 1.
    """

    samples: np.ndarray
    lrs: np.ndarray
    seeds: np.ndarray
    fit: TailFit
    zero_fraction: float
    roundoff_fraction: float
    eps: np.ndarray
    cdf: np.ndarray
    linear: bool
    num_params: int


def min_factor_distribution(
    make_problem: Callable[[int], Problem],
    lrs: Sequence[float] | Callable[[int], Sequence[float]],
    seeds: int | Sequence[int],
    *,
    tail: float = 0.1,
    level: float = 0.95,
    max_params: int = 2000,
) -> MinFactorReport:
    """``min_i |1 − ηh_i|`` over random initializations (``seeds``) and step sizes (``lrs``).

    Args:
        make_problem: ``seed -> Problem`` at a random initialization drawn from ``seed``. The
            dense Hessian at the model's parameters is diagonalized once per seed (float64
            eigenvalues), so keep ``P`` small.
        lrs: step sizes used with every seed, or ``seed -> step sizes`` (e.g. drawn uniformly
            at random: a fixed grid works too, the randomness of ``θ`` smooths it).
        seeds: a count (``range(seeds)``) or the seeds themselves.
        tail, level: the tail fraction and confidence level of :func:`tail_exponent`.
        max_params: refuse models with more parameters (a dense Hessian is ``P²``).
    """
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise InvalidArgumentError("seeds is empty: pass a positive count or a list of seeds.")
    out_m, out_lr, out_seed = [], [], []
    roundoff = 0
    P = 0
    for seed in seed_list:
        prob = make_problem(seed)
        if not isinstance(prob, Problem):
            raise InvalidArgumentError(
                f"make_problem({seed}) returned {type(prob).__name__}, not a gdscope.Problem."
            )
        P = prob.num_params
        H = dense_hessian(prob, max_params=max_params).double()
        h = torch.linalg.eigvalsh(H).cpu()
        etas = np.asarray(lrs(seed) if callable(lrs) else lrs, dtype=np.float64).reshape(-1)
        if etas.size == 0 or not np.all(np.isfinite(etas)) or np.any(etas <= 0):
            raise InvalidArgumentError("lrs must be positive finite step sizes (at least one).")
        eta_t = torch.as_tensor(etas, dtype=torch.float64)
        factors = (1 - eta_t[:, None] * h[None, :]).abs().min(dim=1).values.numpy()
        band = 10 * P * torch.finfo(prob.dtype).eps * etas * float(h.abs().max())
        roundoff += int(np.sum(factors <= band))
        out_m.append(factors)
        out_lr.append(etas)
        out_seed.append(np.full(etas.size, seed, dtype=np.int64))
    m = np.concatenate(out_m)
    fit = tail_exponent(m, tail=tail, level=level)
    lo = np.sort(m[m > 0])[min(4, int(np.sum(m > 0)) - 1)]
    grid = np.geomspace(lo, fit.threshold, 20)
    cdf = np.array([np.mean(m < e) for e in grid])
    zero_fraction = fit.zeros / m.size
    return MinFactorReport(
        samples=m,
        lrs=np.concatenate(out_lr),
        seeds=np.concatenate(out_seed),
        fit=fit,
        zero_fraction=zero_fraction,
        roundoff_fraction=roundoff / m.size,
        eps=grid,
        cdf=cdf,
        linear=fit.zeros == 0 and fit.contains(1.0),
        num_params=P,
    )
