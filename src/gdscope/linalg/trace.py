"""Stochastic trace estimators with standard errors: Hutchinson and Hutch++.

Hutchinson: ``tr A ≈ (1/m) Σ zᵢᵀ A zᵢ`` with Rademacher ``zᵢ``; standard error = sample std/√m.

Hutch++ (Meyer, Musco, Musco & Woodruff 2021), ``m`` products split in thirds: ``Q = orth(A S)``
for ``S`` with ``m/3`` random columns, then
``tr A ≈ tr(Qᵀ A Q) + tr_Hutchinson((I − QQᵀ) A (I − QQᵀ))`` with the remaining ``m/3`` vectors.
The first term is exact given ``Q``, so the standard error is that of the deflated Hutchinson
term: its variance falls with the energy of the spectrum outside the top ``m/3`` directions.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from gdscope.errors import InvalidArgumentError
from gdscope.linalg.operator import LinearOperator

__all__ = ["Estimate", "hutchinson", "hutchpp", "rademacher"]


@dataclass(frozen=True)
class Estimate:
    """A stochastic estimate ``value ± stderr`` from ``samples`` probes and ``matvecs`` products."""

    value: float
    stderr: float
    samples: int
    matvecs: int
    seconds: float
    method: str

    def interval(self, z: float = 1.96) -> tuple[float, float]:
        """Normal-approximation confidence interval ``value ± z·stderr``."""
        return self.value - z * self.stderr, self.value + z * self.stderr

    def __repr__(self) -> str:
        return (
            f"Estimate({self.value:.6g} ± {self.stderr:.2g} ({self.method}, {self.samples} "
            f"samples, {self.matvecs} matvecs, {self.seconds:.3g}s))"
        )


def rademacher(P: int, m: int, op: LinearOperator, gen: torch.Generator) -> Tensor:
    """``(P, m)`` block of ±1 entries in the operator's dtype and device."""
    z = torch.randint(0, 2, (P, m), generator=gen, dtype=torch.int8)
    return (2 * z - 1).to(op.device, op.dtype)


def _mean_se(x: Tensor) -> tuple[float, float]:
    x = x.double()
    m = x.numel()
    se = x.std(unbiased=True).item() / math.sqrt(m) if m > 1 else math.inf
    return x.mean().item(), se


def _check(samples: int, minimum: int) -> None:
    if not isinstance(samples, int) or samples < minimum:
        raise InvalidArgumentError(
            f"samples={samples!r}: need an integer >= {minimum} for a standard error."
        )


def hutchinson(
    op: LinearOperator, samples: int = 64, *, seed: int = 0, block: int = 16
) -> Estimate:
    """Hutchinson's estimate of ``tr A`` from ``samples`` Rademacher probes."""
    _check(samples, 2)
    t0, mv0 = time.perf_counter(), op.matvecs
    gen = torch.Generator().manual_seed(seed)
    vals = []
    for start in range(0, samples, block):
        Z = rademacher(op.shape[0], min(block, samples - start), op, gen)
        vals.append((Z * op.matmat(Z)).sum(dim=0))
    value, se = _mean_se(torch.cat(vals))
    return Estimate(value, se, samples, op.matvecs - mv0, time.perf_counter() - t0, "hutchinson")


def hutchpp(op: LinearOperator, samples: int = 64, *, seed: int = 0) -> Estimate:
    """Hutch++ estimate of ``tr A`` with ``samples`` products in all (at least 6)."""
    _check(samples, 6)
    t0, mv0 = time.perf_counter(), op.matvecs
    gen = torch.Generator().manual_seed(seed)
    P = op.shape[0]
    s = min(samples // 3, P)
    g = samples - 2 * s
    S = rademacher(P, s, op, gen)
    Q, _ = torch.linalg.qr(op.matmat(S))
    exact = (Q * op.matmat(Q)).sum().item()
    G = rademacher(P, g, op, gen)
    G = G - Q @ (Q.T @ G)
    deflated = (G * op.matmat(G)).sum(dim=0)
    mean, se = _mean_se(deflated)
    return Estimate(
        exact + mean, se, samples, op.matvecs - mv0, time.perf_counter() - t0, "hutch++"
    )
