"""The GD map ``G_η(θ) = θ − η∇L(θ)`` and its Jacobian ``I − η∇²L(θ)`` (THEORY §3).

The Jacobian is singular exactly at the step sizes ``η = 1/h`` for the positive Hessian
eigenvalues ``h``, and ``sign det(I − η∇²L) = (−1)^{#{h > 1/η}}``. The count is exact from dense
inertia for small models, and from Lanczos otherwise, where each eigenvalue must be separated
from ``1/η`` by more than its residual: else the sign is *undetermined*. ``log|det|`` comes from
stochastic Lanczos quadrature as an estimate with a standard error (exact when dense).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
from dataclasses import dataclass

import torch

from gdscope.curvature.hessian import dense_hessian, hessian_density, hessian_eigs
from gdscope.curvature.products import check_params, check_problem
from gdscope.errors import InvalidArgumentError
from gdscope.linalg import Estimate, spectral_sum
from gdscope.linalg._validate import check_int, check_seed, check_tol, describe
from gdscope.problem import Params, Problem

__all__ = ["GDMapReport", "gd_map"]


@dataclass(frozen=True)
class GDMapReport:
    """What ``I − lr·∇²L`` looks like at one point.

    ``sign`` is ``+1``, ``-1`` or ``None`` (undetermined); ``count_above`` the number of Hessian
    eigenvalues above ``1/lr`` (``None`` when undetermined). ``singular_lr_below`` and
    ``singular_lr_above`` are the singular step sizes ``1/h`` nearest to ``lr`` on each side
    (``None`` where none was resolved). ``min_factor = min_i |1 − lr·h_i|`` over the eigenvalues
    resolved near ``1/lr``. ``notes`` are the problem's (e.g. attention through the math SDPA
    backend).
    """

    lr: float
    sign: int | None
    count_above: int | None
    singular_lr_below: float | None
    singular_lr_above: float | None
    min_factor: float | None
    logabsdet: Estimate
    method: str
    matvecs: int
    seconds: float
    note: str = ""
    notes: tuple[str, ...] = ()

    @property
    def determined(self) -> bool:
        return self.sign is not None


def gd_map(
    prob: Problem,
    lr: float,
    *,
    params: Params | None = None,
    dense_limit: int = 2000,
    tol: float = 1e-8,
    max_count: int = 64,
    slq_vectors: int = 16,
    slq_steps: int = 64,
    seed: int = 0,
) -> GDMapReport:
    """Singular step sizes near ``lr``, ``sign det(I − lr∇²L)`` and ``log|det|``.

    Models with at most ``dense_limit`` parameters use the dense Hessian (exact inertia).
    Larger ones count eigenvalues above ``1/lr`` with Lanczos (up to ``max_count`` of them,
    beyond which the sign is undetermined) and estimate ``log|det|`` by SLQ.
    """
    check_problem(prob)
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise InvalidArgumentError(
            f"lr must be a positive finite step size (a float), got {describe(lr)}: pass e.g. "
            "lr=0.1."
        )
    if not (math.isfinite(float(lr)) and lr > 0):
        raise InvalidArgumentError(
            f"lr={float(lr)!r} must be a positive finite step size: pass e.g. lr=0.1."
        )
    dense_limit = check_int("dense_limit", dense_limit, 0)
    tol = check_tol(tol)
    max_count = check_int("max_count", max_count, 1)
    slq_vectors = check_int("slq_vectors", slq_vectors, 1)
    slq_steps = check_int("slq_steps", slq_steps, 1)
    seed = check_seed(seed)
    params = check_params(prob, params)
    t0 = time.perf_counter()
    if prob.num_params <= dense_limit:
        rep = _dense(prob, float(lr), params, t0)
    else:
        rep = _lanczos(prob, float(lr), params, tol, max_count, slq_vectors, slq_steps, seed, t0)
    return dataclasses.replace(rep, notes=tuple(prob.notes))


def _nearest(h: torch.Tensor, lr: float) -> tuple[float | None, float | None]:
    above = h[h > 1 / lr]
    below = h[(h < 1 / lr) & (h > 0)]
    lr_below = 1 / above.min().item() if above.numel() else None
    lr_above = 1 / below.max().item() if below.numel() else None
    return lr_below, lr_above


def _dense(prob: Problem, lr: float, params: Params | None, t0: float) -> GDMapReport:
    H = dense_hessian(prob, params, max_params=prob.num_params).double()
    h = torch.linalg.eigvalsh(H)
    P = h.numel()
    sep = 10 * P * torch.finfo(prob.dtype).eps * h.abs().max().item()
    close = bool(((h - 1 / lr).abs() <= sep).any())
    count = None if close else int((h > 1 / lr).sum())
    sign = None if count is None else (-1) ** count
    factors = (1 - lr * h).abs()
    logdet = Estimate(torch.log(factors).sum().item(), 0.0, 1, P, 0.0, "dense")
    below, above = _nearest(h, lr)
    return GDMapReport(
        lr,
        sign,
        count,
        below,
        above,
        factors.min().item(),
        logdet,
        "dense",
        P,
        time.perf_counter() - t0,
        "an eigenvalue lies within round-off of 1/lr" if close else "",
    )


def _lanczos(
    prob: Problem,
    lr: float,
    params: Params | None,
    tol: float,
    max_count: int,
    slq_vectors: int,
    slq_steps: int,
    seed: int,
    t0: float,
) -> GDMapReport:
    thr = 1 / lr
    P = prob.num_params
    eps = torch.finfo(prob.dtype).eps
    tol = max(tol, 10 * math.sqrt(P) * eps)  # no tighter than the dtype can resolve
    k, matvecs = min(8, P), 0
    count = None
    note = ""
    while True:
        res = hessian_eigs(prob, k, "largest", tol, params=params, block_size=2, seed=seed)
        matvecs += res.matvecs
        vals = res.values
        # each eigenvalue must clear 1/lr by its residual, and by round-off at least
        margin = res.residuals.clamp_min(10 * P * eps * res.norm_estimate)
        if not res.converged:
            note = f"Lanczos did not converge to tol={tol:g} in {res.matvecs} products"
            break
        if not bool(((vals - thr).abs() > margin).all()):
            note = "an eigenvalue near 1/lr is not separated from it by more than its residual"
            break
        if vals[-1] < thr or k >= P:
            count = int((vals > thr).sum())
            break
        if k >= max_count:
            note = f"more than {k} eigenvalues exceed 1/lr; raise max_count to count them"
            break
        k = min(2 * k, max_count, prob.num_params)
    below, above = _nearest(vals, lr)
    density = hessian_density(prob, slq_vectors, slq_steps, params=params, seed=seed)
    logdet = spectral_sum(density, lambda th: torch.log((1 - lr * th).abs()))
    return GDMapReport(
        lr,
        None if count is None else (-1) ** count,
        count,
        below,
        above if count is not None and vals[-1] < thr else None,
        (1 - lr * vals).abs().min().item(),
        logdet,
        "lanczos",
        matvecs + density.matvecs,
        time.perf_counter() - t0,
        note,
    )
