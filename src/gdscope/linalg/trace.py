"""Stochastic trace estimators with honest intervals: Hutchinson and Hutch++.

Hutchinson: ``tr A ≈ (1/m) Σ zᵢᵀ A zᵢ`` with Rademacher ``zᵢ``.

Hutch++ (Meyer, Musco, Musco & Woodruff 2021), ``m`` products split in thirds: ``Q = orth(A S)``
for ``S`` with ``s = m/3`` random columns, then
``tr A ≈ tr(Qᵀ A Q) + tr_Hutchinson((I − QQᵀ) A (I − QQᵀ))`` with the remaining ``g = m − 2s``
vectors. The first term is exact given ``Q``, so the error is that of the deflated Hutchinson
term.

Standard error and interval. For Rademacher ``z`` and symmetric ``B``,
``Var(zᵀBz) = 2(‖B‖_F² − Σ_j B_jj²)``. The sample variance of a few quadratic forms is a poor
guide when the spectrum has outliers (the forms are then nearly scaled ``χ²₁`` variables, and a
sample that missed the outlier has both a low mean and a low variance: normal ``±1.96·s/√m``
intervals covered the trace in 68–80% of seeds at 2–6 samples, Student-t ones in 79–93%). So
the variance used is the larger of the sample variance and ``2(F − D)``, with
``F = mean ‖Bzᵢ‖²`` (unbiased for ``‖B‖_F²``) and ``D`` the mean of ``⟨zₐ∘Bzₐ, z_b∘Bz_b⟩``
over pairs ``a ≠ b`` (unbiased for ``Σ_j B_jj²``): both from the products already computed
(for Hutch++, ``B = (I − QQᵀ)A(I − QQᵀ)``, ``Bz = (I − QQᵀ)A g``). Then
``stderr = √(var/m)`` (``m`` → ``g`` for Hutch++) and the interval is
``value ± t_{dof, (1+level)/2}·stderr`` with ``dof = m − 1`` (``g − 1``). In the worst case, a
dense rank-one ``B``, the forms are scaled ``χ²₁`` and this covers at least 95% for every
``m ≥ 2`` (a direct computation); on 400 seeds of Hessian-like spectra (outliers, negative
eigenvalues, small-MLP Hessians) coverage was at least 93% for 2–30 samples (the tests). A
diagonal ``B`` gives exactly zero. Hutchinson needs ``m ≥ 2`` and Hutch++ ``m ≥ 6`` (two
deflated probes) for a variance at all.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from scipy import stats
from torch import Tensor

from gdscope.errors import InvalidArgumentError
from gdscope.linalg._validate import check_int, check_level, check_operator, check_seed
from gdscope.linalg.operator import LinearOperator

__all__ = ["Estimate", "hutchinson", "hutchpp", "rademacher"]


@dataclass(frozen=True)
class Estimate:
    """A stochastic estimate ``value ± stderr`` from ``samples`` probes and ``matvecs`` products.

    ``dof``: degrees of freedom of ``stderr`` (an estimated scale: Student-t quantiles); ``None``
    when ``stderr`` is known exactly (``0`` for exact values).
    """

    value: float
    stderr: float
    samples: int
    matvecs: int
    seconds: float
    method: str
    dof: int | None = None

    def interval(self, level: float = 0.95, *, z: float | None = None) -> tuple[float, float]:
        """Confidence interval ``value ± q·stderr`` at ``level``.

        ``q`` is the Student-t quantile with ``dof`` degrees of freedom (normal when ``dof`` is
        ``None``); ``z`` overrides it with an explicit multiplier. An infinite ``stderr`` (one
        probe: no variance estimate) gives ``(-inf, inf)``.
        """
        if z is not None:
            if isinstance(z, bool) or not isinstance(z, (int, float)) or not z >= 0:
                raise InvalidArgumentError(
                    f"z={z!r} must be a non-negative multiplier of stderr: pass e.g. z=1.96, or "
                    "level=0.95 instead."
                )
            q = float(z)
        else:
            level = check_level(level)
            p = 0.5 + level / 2
            q = float(stats.norm.ppf(p) if self.dof is None else stats.t.ppf(p, self.dof))
        if not math.isfinite(self.stderr) or not math.isfinite(self.value):
            return -math.inf, math.inf
        half = q * self.stderr
        return self.value - half, self.value + half

    def __repr__(self) -> str:
        return (
            f"Estimate({self.value:.6g} ± {self.stderr:.2g} ({self.method}, {self.samples} "
            f"samples, {self.matvecs} matvecs, {self.seconds:.3g}s))"
        )


def rademacher(P: int, m: int, op: LinearOperator, gen: torch.Generator) -> Tensor:
    """``(P, m)`` block of ±1 entries in the operator's dtype and device."""
    z = torch.randint(0, 2, (P, m), generator=gen, dtype=torch.int8)
    return (2 * z - 1).to(op.device, op.dtype)


def _mean_se(forms: Tensor, sq_norms: Tensor, diag_sq: float = 0.0) -> tuple[float, float]:
    """Mean of the quadratic forms ``zᵢᵀBzᵢ`` and its standard error (module docstring), from
    the forms, ``‖Bzᵢ‖²`` and an unbiased estimate ``diag_sq`` of ``Σ B_jj²`` (0: the bound)."""
    x = forms.double()
    m = x.numel()
    if m < 2:
        return x.mean().item(), math.inf
    bound = max(0.0, 2 * (sq_norms.double().mean().item() - diag_sq))
    var = max(x.var(unbiased=True).item(), bound)
    return x.mean().item(), math.sqrt(var / m)


def _diag_sq(Z: Tensor, BZ: Tensor) -> float:
    """Unbiased ``Σ_j B_jj²`` from Rademacher columns ``Z``: each ``z ∘ Bz`` is an unbiased
    diagonal, so the mean inner product over pairs of different columns is unbiased."""
    D = (Z * BZ).double()
    m = D.shape[1]
    if m < 2:
        return 0.0
    s = D.sum(dim=1)
    return ((s * s).sum() - (D * D).sum()).item() / (m * (m - 1))


def _samples(samples: object, minimum: int, method: str) -> int:
    if isinstance(samples, int) and not isinstance(samples, bool) and samples < minimum:
        raise InvalidArgumentError(
            f"samples={samples} is too few for {method}: a standard error needs at least "
            f"{minimum} products; pass samples={minimum} or more."
        )
    return check_int("samples", samples, minimum)


def hutchinson(
    op: LinearOperator, samples: int = 64, *, seed: int = 0, block: int = 16
) -> Estimate:
    """Hutchinson's estimate of ``tr A`` from ``samples >= 2`` Rademacher probes (``block`` per
    product call), with the conservative standard error of the module docstring."""
    check_operator(op)
    samples = _samples(samples, 2, "hutchinson")
    seed = check_seed(seed)
    block = check_int("block", block, 1)
    t0, mv0 = time.perf_counter(), op.matvecs
    gen = torch.Generator().manual_seed(seed)
    forms, norms, dsum, dsq = [], [], 0.0, 0.0
    for start in range(0, samples, block):
        Z = rademacher(op.shape[0], min(block, samples - start), op, gen)
        AZ = op.matmat(Z)
        forms.append((Z * AZ).sum(dim=0))
        norms.append((AZ * AZ).sum(dim=0))
        D = (Z * AZ).double()  # per-probe unbiased diagonals, for Σ A_jj²
        dsum = dsum + D.sum(dim=1)
        dsq += (D * D).sum().item()
    diag_sq = ((dsum * dsum).sum().item() - dsq) / (samples * (samples - 1))
    value, se = _mean_se(torch.cat(forms), torch.cat(norms), diag_sq)
    return Estimate(
        value,
        se,
        samples,
        op.matvecs - mv0,
        time.perf_counter() - t0,
        "hutchinson",
        samples - 1,
    )


def hutchpp(op: LinearOperator, samples: int = 64, *, seed: int = 0) -> Estimate:
    """Hutch++ estimate of ``tr A`` with ``samples >= 6`` products in all; the interval is that
    of the deflated Hutchinson term (``g − 1`` degrees of freedom, module docstring)."""
    check_operator(op)
    samples = _samples(samples, 6, "hutch++")
    seed = check_seed(seed)
    t0, mv0 = time.perf_counter(), op.matvecs
    gen = torch.Generator().manual_seed(seed)
    P = op.shape[0]
    s = min(samples // 3, P)
    g = samples - 2 * s
    S = rademacher(P, s, op, gen)
    Q, _ = torch.linalg.qr(op.matmat(S))
    exact = (Q * op.matmat(Q)).sum().item()
    Z = rademacher(P, g, op, gen)
    G = Z - Q @ (Q.T @ Z)
    AG = op.matmat(G)
    deflated = (G * AG).sum(dim=0)
    BZ = AG - Q @ (Q.T @ AG)  # B z with B = (I − QQᵀ) A (I − QQᵀ)
    mean, se = _mean_se(deflated, (BZ * BZ).sum(dim=0), _diag_sq(Z, BZ))
    return Estimate(
        exact + mean,
        se,
        samples,
        op.matvecs - mv0,
        time.perf_counter() - t0,
        "hutch++",
        g - 1,
    )
