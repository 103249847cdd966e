"""Stochastic Lanczos quadrature (SLQ) for spectral densities and spectral sums.

For a unit random vector ``v``, ``m`` Lanczos steps give Gauss quadrature nodes ``θ_j`` and weights
``τ_j²`` (summing to 1) with ``vᵀ f(A) v ≈ Σ_j τ_j² f(θ_j)``. Averaging over ``n_v`` vectors,
the spectral measure ``(1/P) Σ_i δ(λ − λ_i)`` is approximated by
``φ(λ) = (1/n_v) Σ_v Σ_j τ_{v,j}² δ(λ − θ_{v,j})`` (Ubaru, Chen & Saad 2017; Ghorbani et al.
2019) and ``tr f(A) = P · E[vᵀ f(A) v]``. Gaussian smoothing of width ``σ`` turns ``φ`` into a
density that still integrates to 1.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from gdscope.errors import InvalidArgumentError
from gdscope.linalg._validate import check_int, check_operator, check_seed, describe
from gdscope.linalg.lanczos import lanczos_tridiag
from gdscope.linalg.operator import LinearOperator
from gdscope.linalg.trace import Estimate, _mean_se

__all__ = ["Density", "slq", "spectral_sum"]


@dataclass(frozen=True)
class Density:
    """Quadrature nodes and weights of a spectral measure, one row per random vector."""

    nodes: list[Tensor]
    weights: list[Tensor]
    size: int
    matvecs: int
    seconds: float

    @property
    def support(self) -> tuple[float, float]:
        """Smallest and largest node (inside the spectrum, close to its ends)."""
        allnodes = torch.cat(self.nodes)
        return allnodes.min().item(), allnodes.max().item()

    def pdf(self, grid: Tensor, sigma: float | None = None) -> Tensor:
        """Gaussian-smoothed density on ``grid`` (default ``σ`` = 1% of the support width)."""
        if not isinstance(grid, Tensor):
            raise InvalidArgumentError(
                f"grid must be a 1-D tensor of eigenvalue positions, got {describe(grid)}: pass "
                "e.g. torch.linspace(lo, hi, 1001)."
            )
        if sigma is not None and (
            isinstance(sigma, bool)
            or not isinstance(sigma, numbers.Real)
            or not (math.isfinite(sigma) and sigma > 0)
        ):
            raise InvalidArgumentError(
                f"sigma must be a positive finite width (or None for 1% of the support), got "
                f"{describe(sigma)}."
            )
        lo, hi = self.support
        sigma = sigma or max(0.01 * (hi - lo), 1e-12)
        grid = grid.double()
        out = torch.zeros_like(grid)
        for th, w in zip(self.nodes, self.weights, strict=True):
            th, w = th.to(grid.device, torch.float64), w.to(grid.device, torch.float64)
            z = (grid[:, None] - th[None, :]) / sigma
            out += (w[None, :] * torch.exp(-0.5 * z**2)).sum(dim=1)
        return out / (len(self.nodes) * sigma * math.sqrt(2 * math.pi))

    def mass(self, lo: float, hi: float) -> float:
        """Fraction of eigenvalues the quadrature puts in ``[lo, hi]``: a point estimate without
        an error bar (its sampling error falls as ``1/√num_vectors``)."""
        for name, x in (("lo", lo), ("hi", hi)):
            if isinstance(x, bool) or not isinstance(x, numbers.Real) or math.isnan(x):
                raise InvalidArgumentError(f"{name} must be a real number, got {describe(x)}.")
        if lo > hi:
            raise InvalidArgumentError(f"lo={lo} > hi={hi}: pass lo <= hi.")
        tot = sum(
            w[(th >= lo) & (th <= hi)].sum().item()
            for th, w in zip(self.nodes, self.weights, strict=True)
        )
        return tot / len(self.nodes)


def slq(op: LinearOperator, num_vectors: int = 8, steps: int = 64, *, seed: int = 0) -> Density:
    """Spectral density of ``op`` by SLQ with ``num_vectors`` Rademacher vectors."""
    check_operator(op)
    num_vectors = check_int("num_vectors", num_vectors, 1)
    steps = check_int("steps", steps, 1)
    seed = check_seed(seed)
    t0, mv0 = time.perf_counter(), op.matvecs
    gen = torch.Generator().manual_seed(seed)
    nodes, weights = [], []
    for _ in range(num_vectors):
        v = (2 * torch.randint(0, 2, (op.shape[0],), generator=gen) - 1).to(op.dtype)
        th, w = lanczos_tridiag(op, v, steps)
        nodes.append(th)
        weights.append(w)
    return Density(nodes, weights, op.shape[0], op.matvecs - mv0, time.perf_counter() - t0)


def spectral_sum(density: Density, f: Callable[[Tensor], Tensor]) -> Estimate:
    """``tr f(A) = Σ_i f(λ_i)`` from SLQ quadrature, with a standard error over vectors.

    Each vector gives ``zᵀf(A)z ≈ P Σ_j τ_j² f(θ_j)`` (Hutchinson on ``f(A)``); the standard
    error is Hutchinson's conservative one (:mod:`gdscope.linalg.trace`), with
    ``‖f(A)z‖² ≈ P Σ_j τ_j² f(θ_j)²`` from the same quadrature, and ``num_vectors − 1`` degrees
    of freedom for :meth:`Estimate.interval`. It covers the sampling error only, not the
    quadrature error (small for smooth ``f`` and enough steps; large near a singularity of
    ``f`` inside the spectrum). One vector: infinite standard error.
    """
    if not isinstance(density, Density):
        raise InvalidArgumentError(
            f"density must be a Density (from slq or hessian_density), got {describe(density)}."
        )
    if not callable(f):
        raise InvalidArgumentError(
            f"f must be a function of a tensor of eigenvalues, got {describe(f)}: pass e.g. "
            "f=torch.log or f=lambda x: x."
        )
    forms, sq = [], []
    for th, w in zip(density.nodes, density.weights, strict=True):
        fx = f(th)
        if not isinstance(fx, Tensor) or fx.shape != th.shape:
            raise InvalidArgumentError(
                f"f must map a tensor of nodes to a tensor of the same shape {tuple(th.shape)}, "
                f"got {describe(fx)}: use torch functions elementwise."
            )
        fx = fx.double()
        forms.append((w * fx).sum() * density.size)
        sq.append((w * fx**2).sum() * density.size)
    value, se = _mean_se(torch.stack(forms), torch.stack(sq))
    nv = len(forms)
    return Estimate(value, se, nv, density.matvecs, density.seconds, "slq", nv - 1)
