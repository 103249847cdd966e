"""Spectra for the full-batch (GD) criteria of :func:`gdscope.stability`: the top of ``H`` (or of
``P^{-1/2} H P^{-1/2}``) dense or by Lanczos, with the count of eigenvalues above a threshold."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gdscope.linalg import CallableOperator, lanczos

DENSE_SPECTRUM_LIMIT = 1500  # dense Hessian eigendecomposition up to this many parameters

__all__ = ["DENSE_SPECTRUM_LIMIT"]


# ---------------------------------------------------------------------- spectra
@dataclass
class _Spectrum:
    values: Tensor  # descending
    residuals: Tensor
    vectors: Tensor | None
    converged: bool
    count: int | None
    method: str
    matvecs: int
    note: str = ""


def _dense_spectrum(op: CallableOperator, thr: float | None) -> tuple[_Spectrum, Tensor]:
    P = op.shape[0]
    H = op.matmat(torch.eye(P, dtype=op.dtype, device=op.device)).double()
    vals, vecs = torch.linalg.eigh(0.5 * (H + H.T))
    err = 10 * P * torch.finfo(op.dtype).eps * vals.abs().max().item()
    desc = vals.flip(0)
    res = torch.full_like(desc, err)
    count, note = None, ""
    if thr is not None:
        if bool(((desc - thr).abs() <= err).any()):
            note = "an eigenvalue lies within round-off of the threshold"
        else:
            count = int((desc > thr).sum())
    spec = _Spectrum(desc, res, vecs.flip(1), True, count, f"dense eigh ({P} HVPs)", P, note)
    return spec, vals


def _lanczos_spectrum(
    op: CallableOperator,
    thr: float | None,
    bar: float | None,
    tol: float,
    max_count: int,
    seed: int,
) -> _Spectrum:
    """Top eigenpairs by Lanczos, doubling ``k`` until one falls below ``min(thr, bar)``."""
    P = op.shape[0]
    eps = torch.finfo(op.dtype).eps
    k, matvecs, note = min(8, P), 0, ""
    low = min(x for x in (thr, bar) if x is not None) if (thr or bar) else None
    while True:
        res = lanczos(
            op,
            k,
            "largest",
            tol,
            block_size=min(2, P),
            return_vectors=True,
            seed=seed,  # default budget: max(500, 60k) for the solve, its own for the check
        )
        matvecs += res.matvecs
        vals = res.values
        if not res.converged:
            note = f"Lanczos did not converge to tol={tol:g} in {res.matvecs} products"
            break
        if low is None or vals[-1].item() < low or k >= P:
            break
        if k >= max_count:
            note = f"more than {k} eigenvalues exceed {low:.4g}; raise max_count to resolve them"
            break
        k = min(2 * k, max_count, P)
    count = None
    if thr is not None and res.converged:
        margin = res.residuals.clamp_min(10 * P * eps * res.norm_estimate)
        if not bool(((vals - thr).abs() > margin).all()):
            note = note or "an eigenvalue is not separated from the threshold by its residual"
        elif vals[-1].item() < thr or k >= P:
            count = int((vals > thr).sum())
    return _Spectrum(
        vals.double(),
        res.residuals.double(),
        res.vectors,
        res.converged,
        count,
        f"Lanczos (top {k}, tol {tol:g})",
        matvecs,
        note,
    )
