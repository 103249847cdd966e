"""Periodic orbits of gradient descent solved by Newton's method (docs/theory.md §6).

A period-``p`` orbit of the GD map ``G(θ) = θ − η∇L(θ)`` is a zero of ``F(θ) = G^p(θ) − θ``.
Newton's step solves ``(M(θ) − I) δ = −F(θ)`` with the monodromy

    ``M(θ) = ∂G^p/∂θ = (I − ηH(θ_{p−1})) ⋯ (I − ηH(θ_0))``,  ``θ_{i+1} = G(θ_i)``, ``θ_0 = θ``,

applied matrix-free: one Hessian-vector product per factor (:func:`gdscope.curvature.products.
curvature_operator`). ``M − I`` is singular along directions in which the orbit can move (a
continuum of orbits, as over-parameterized networks have), so the step is the minimum-norm
least-squares solution (LSMR; ``Mᵀ`` applies the symmetric factors in reverse order), followed by
a backtracking line search on ``‖F‖``.

The orbit's **Floquet multipliers** are the eigenvalues ``μ`` of ``M`` at a point of the orbit (the
same at every point). Multipliers within ``tangent_tol`` of 1 belong to directions along a
continuum of orbits (tangent); the orbit is linearly stable iff every other ``|μ| < 1``. They are
computed densely for ``P ≤ dense_limit`` and otherwise the ``multipliers`` largest in modulus by
Arnoldi iteration (ARPACK).

Newton's method also converges to fixed points (period 1 solves ``G^p(θ) = θ`` too):
``kind`` says ``"cycle"`` only when the solved orbit's points are distinct (diameter above the
tolerance), else ``"fixed point"``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigs, lsmr
from torch import Tensor

from gdscope.curvature.products import curvature_operator
from gdscope.errors import InvalidArgumentError
from gdscope.problem import Problem

__all__ = ["OrbitSolution", "gd_orbit_points", "solve_orbit"]


@dataclass(frozen=True)
class OrbitSolution:
    """A solved periodic orbit of GD, with its Floquet multipliers.

    ``points`` are ``θ_0 … θ_{p−1}`` (``(p, P)``, float64, CPU); ``residual`` is
    ``‖G^p(θ_0) − θ_0‖ / max(diameter, ‖θ_0‖·eps)``; ``diameter`` the largest distance between two
    points of the orbit; ``amplitude`` half of it. ``multipliers`` are sorted by decreasing
    modulus (complex); ``tangent`` counts those within ``tangent_tol`` of 1; ``stable`` is ``None``
    when Newton did not converge or the multipliers could not be computed.
    """

    period: int
    lr: float
    kind: str
    converged: bool
    points: np.ndarray
    residual: float
    diameter: float
    iterations: int
    multipliers: np.ndarray
    tangent: int
    stable: bool | None
    hvps: int
    seconds: float
    history: tuple[float, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def amplitude(self) -> float:
        return self.diameter / 2

    @property
    def spectral_radius(self) -> float:
        """Largest ``|μ|`` over the non-tangent multipliers (``nan`` if none)."""
        normal = _normal(self.multipliers, self.tangent)
        return float(np.max(np.abs(normal))) if normal.size else math.nan


def _normal(mu: np.ndarray, tangent: int) -> np.ndarray:
    """Multipliers without the ``tangent`` ones closest to 1."""
    if tangent == 0:
        return mu
    order = np.argsort(np.abs(mu - 1.0))
    return mu[np.sort(order[tangent:])]


class _Map:
    """GD map, its iterates and its monodromy on flat float64 vectors (NumPy in, NumPy out)."""

    def __init__(self, prob: Problem, lr: float) -> None:
        self.prob, self.lr, self.hvps = prob, lr, 0

    def _tensor(self, theta: np.ndarray) -> Tensor:
        return torch.as_tensor(theta, dtype=self.prob.dtype, device=self.prob.device)

    def step(self, theta: np.ndarray) -> np.ndarray:
        g = self.prob.gradient(self.prob.unflatten(self._tensor(theta)))
        return theta - self.lr * g.detach().double().cpu().numpy()

    def iterates(self, theta: np.ndarray, p: int) -> list[np.ndarray]:
        """``[θ_0, …, θ_p]``."""
        out = [theta]
        for _ in range(p):
            out.append(self.step(out[-1]))
        return out

    def monodromy(self, points: list[np.ndarray]) -> LinearOperator:
        """``M − I`` as a SciPy operator, through the Hessians at ``points`` (``θ_0 … θ_{p−1}``)."""
        ops = [
            curvature_operator(self.prob, params=self.prob.unflatten(self._tensor(t)), check=False)
            for t in points
        ]

        def factor(op, v: np.ndarray) -> np.ndarray:  # (I − ηH) v
            self.hvps += 1
            hv = op.matvec(self._tensor(v)).detach().double().cpu().numpy()
            return v - self.lr * hv

        def apply(v: np.ndarray, order: list) -> np.ndarray:
            v = np.asarray(v, dtype=np.float64).reshape(-1)
            for op in order:
                v = factor(op, v)
            return v

        size = points[0].size
        return LinearOperator(
            (size, size),
            matvec=lambda v: apply(v, ops) - np.asarray(v).reshape(-1),
            rmatvec=lambda v: apply(v, ops[::-1]) - np.asarray(v).reshape(-1),
            dtype=np.float64,
        )


def gd_orbit_points(prob: Problem, lr: float, start: Tensor, period: int) -> np.ndarray:
    """``θ_0 … θ_{period−1}`` of GD from ``start`` (flat), as a ``(period, P)`` float64 array."""
    return np.stack(_Map(prob, lr).iterates(_flat_start(prob, start), period - 1))


def _flat_start(prob: Problem, start: Tensor | np.ndarray | None) -> np.ndarray:
    if start is None:
        start = prob.flatten(prob.params)
    theta = torch.as_tensor(start).detach().double().cpu().reshape(-1).numpy().copy()
    if theta.size != prob.num_params:
        raise InvalidArgumentError(
            f"start has {theta.size} entries but the model has {prob.num_params} trainable "
            "parameters: pass a flat parameter vector (prob.flatten(...))."
        )
    if not np.all(np.isfinite(theta)):
        raise InvalidArgumentError("start has NaN or inf entries: pass a finite parameter vector.")
    return theta


def solve_orbit(
    prob: Problem,
    lr: float,
    period: int = 2,
    *,
    start: Tensor | np.ndarray | None = None,
    tol: float = 1e-10,
    max_iter: int = 30,
    multipliers: int = 6,
    tangent_tol: float = 1e-6,
    dense_limit: int = 600,
    lsmr_iter: int | None = None,
    max_hvps: int | None = None,
) -> OrbitSolution:
    """Solve ``G^period(θ) = θ`` for GD at ``lr`` by Newton's method from ``start``.

    ``start`` (flat, default: the model's current parameters) should lie near the orbit, e.g. an
    iterate of a run that :func:`gdscope.theory.detect_orbit` found nearly periodic. Converged
    when ``‖F(θ)‖ ≤ tol·max(diameter, ‖θ‖)``; see the module docstring for the multipliers.

    Cost controls for large models: ``lsmr_iter`` caps the LSMR iterations of one Newton step
    (each costs ``2·period`` Hessian-vector products; default ``4·P``), ``max_hvps`` stops Newton
    once that many products have been spent (with a note; the multipliers of a converged orbit
    are computed regardless). ``history`` holds ``‖F‖/scale`` before every Newton step.
    """
    if not (isinstance(lr, int | float) and math.isfinite(lr) and lr > 0):
        raise InvalidArgumentError(f"lr={lr!r}: the step size must be a finite number > 0.")
    if not isinstance(period, int) or isinstance(period, bool) or period < 1:
        raise InvalidArgumentError(f"period={period!r}: must be an int >= 1, e.g. 2.")
    if not (0 < tol < 1):
        raise InvalidArgumentError(f"tol={tol!r}: a relative tolerance in (0, 1), e.g. 1e-10.")
    if not isinstance(max_iter, int) or max_iter < 1:
        raise InvalidArgumentError(f"max_iter={max_iter!r}: must be an int >= 1.")
    for name, value in (("lsmr_iter", lsmr_iter), ("max_hvps", max_hvps)):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise InvalidArgumentError(f"{name}={value!r}: must be None or an int >= 1.")
    t0 = time.perf_counter()
    gd = _Map(prob, float(lr))
    theta = _flat_start(prob, start)
    history: list[float] = []
    notes: list[str] = []

    def residual(pts: list[np.ndarray]) -> tuple[float, float]:
        diam = max(np.linalg.norm(a - b) for a in pts[:-1] for b in pts[:-1]) if period > 1 else 0
        return float(np.linalg.norm(pts[-1] - pts[0])), float(diam)

    pts = gd.iterates(theta, period)
    f_norm, diam = residual(pts)
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        scale = max(diam, np.linalg.norm(theta) * 1e-3, 1e-300)
        history.append(f_norm / scale)
        if f_norm <= tol * scale:
            converged = True
            it -= 1
            break
        if max_hvps is not None and gd.hvps >= max_hvps:
            notes.append(f"stopped at iteration {it}: {gd.hvps} HVPs spent (max_hvps={max_hvps})")
            break
        A = gd.monodromy(pts[:-1])
        inner = 4 * theta.size if lsmr_iter is None else lsmr_iter
        delta = lsmr(A, -(pts[-1] - pts[0]), atol=1e-14, btol=1e-14, maxiter=inner)[0]
        step = 1.0
        while step > 1e-6:
            cand = theta + step * delta
            cpts = gd.iterates(cand, period)
            c_norm, c_diam = residual(cpts)
            if np.isfinite(c_norm) and c_norm < f_norm:
                theta, pts, f_norm, diam = cand, cpts, c_norm, c_diam
                break
            step /= 2
        else:
            notes.append(f"line search stalled at iteration {it}: ‖F‖ = {f_norm:.3g}")
            break
    scale = max(diam, np.linalg.norm(theta) * 1e-3, 1e-300)
    if not converged and f_norm <= tol * scale:
        converged = True
    distinct = period > 1 and diam > math.sqrt(tol) * max(float(np.linalg.norm(theta)), 1.0)
    kind = "cycle" if distinct else "fixed point"
    if kind == "fixed point" and period > 1:
        notes.append(
            f"Newton converged to a fixed point (orbit diameter {diam:.3g}): no period-{period} "
            "orbit near the start"
        )
    mu = _multipliers(gd, pts[:-1], multipliers, dense_limit) if converged else np.array([])
    tangent = int(np.sum(np.abs(mu - 1.0) <= tangent_tol)) if mu.size else 0
    stable: bool | None = None
    if mu.size:
        normal = _normal(mu, tangent)
        stable = bool(np.all(np.abs(normal) < 1.0))
        if mu.size < prob.num_params and stable is not False:
            notes.append(
                f"stability from the {mu.size} largest multipliers (|μ| ≥ {np.abs(mu[-1]):.3g})"
            )
    if not converged:
        notes.append(f"not converged after {it} Newton steps: ‖F‖/scale = {f_norm / scale:.3g}")
    return OrbitSolution(
        period=period,
        lr=float(lr),
        kind=kind,
        converged=converged,
        points=np.stack(pts[:-1]),
        residual=f_norm / scale,
        diameter=diam,
        iterations=it,
        multipliers=mu,
        tangent=tangent,
        stable=stable,
        hvps=gd.hvps,
        seconds=time.perf_counter() - t0,
        history=tuple(history),
        notes=tuple(notes),
    )


def _multipliers(gd: _Map, points: list[np.ndarray], k: int, dense_limit: int) -> np.ndarray:
    """Eigenvalues of ``M`` at ``points[0]``, by decreasing modulus (all, or the ``k`` largest)."""
    A = gd.monodromy(points)
    size = points[0].size

    def m(v: np.ndarray) -> np.ndarray:
        return A.matvec(v) + v

    if size <= dense_limit:
        M = np.column_stack([m(e) for e in np.eye(size)])
        mu = np.linalg.eigvals(M)
    else:
        op = LinearOperator((size, size), matvec=m, dtype=np.float64)
        mu = eigs(op, k=min(k, size - 2), which="LM", return_eigenvectors=False, tol=1e-10)
    return mu[np.argsort(-np.abs(mu), kind="stable")]
