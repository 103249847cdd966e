"""Lanczos for a few extreme eigenpairs of a symmetric operator, torch-native.

Block Lanczos with full reorthogonalization and thick restarts. The basis ``V`` and its image
``AV`` are both kept, so the Rayleigh–Ritz step ``H = Vᵀ(AV)`` and the *true* residuals
``‖A y − θ y‖ = ‖(AV)s − θ V s‖`` cost no extra products. A Ritz pair has converged when its
residual is at most ``tol · ‖A‖`` (``‖A‖`` estimated by the largest ``|θ|`` seen); by the
Bauer–Fike/Kato bounds its eigenvalue is then within that residual of a true eigenvalue.

Ritz values are always inside the spectrum: an unconverged largest value is a *lower* bound on
``λ_max`` and an unconverged smallest value an *upper* bound on ``λ_min``.

A single start vector sees one copy of a repeated eigenvalue; pass ``block_size`` at least the
multiplicity you need resolved (``block_size`` columns are applied per step through
``matmat``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from gdscope.errors import InvalidArgumentError
from gdscope.linalg.operator import LinearOperator

__all__ = ["EigResult", "lanczos", "lanczos_tridiag"]

WHICH = ("largest", "smallest", "both")
WARM_START_NOISE = 1e-3  # relative size of the random part mixed into a warm start
MIN_EXTRA = 2  # basis vectors beyond the wanted count before convergence may be declared


@dataclass(frozen=True)
class EigResult:
    """Eigenvalues with their trust and cost.

    ``values`` are sorted descending for ``"largest"``, ascending for ``"smallest"``, and
    ascending for ``"both"`` (the ``k`` smallest then the ``k`` largest). ``residuals[i]`` is
    ``‖A v_i − values[i] v_i‖``; ``converged[i]`` says whether it met the tolerance.
    """

    values: Tensor
    residuals: Tensor
    converged_mask: Tensor
    vectors: Tensor | None
    which: str
    tol: float
    matvecs: int
    seconds: float
    norm_estimate: float

    @property
    def converged(self) -> bool:
        """Whether every requested eigenpair met the tolerance."""
        return bool(self.converged_mask.all())

    def __repr__(self) -> str:
        vals = ", ".join(f"{v:.6g}" for v in self.values.tolist())
        flag = "converged" if self.converged else "NOT converged (values are bounds)"
        return (
            f"EigResult({self.which}: [{vals}], {flag}, max residual "
            f"{self.residuals.max().item():.2e}, {self.matvecs} matvecs, {self.seconds:.3g}s)"
        )


def _select(theta: Tensor, which: str, k: int) -> Tensor:
    """Indices (into ascending ``theta``) of the wanted Ritz values, in output order."""
    m = theta.shape[0]
    if which == "largest":
        return torch.arange(m - 1, m - 1 - min(k, m), -1)
    if which == "smallest":
        return torch.arange(min(k, m))
    lo = list(range(min(k, m)))
    hi = [i for i in range(max(m - k, 0), m) if i not in lo]
    return torch.tensor(lo + hi, dtype=torch.long)


def _orthonormalize(W: Tensor, V: Tensor, gen: torch.Generator, scale: float) -> Tensor:
    """Columns of ``W`` made orthonormal and orthogonal to ``V`` (twice Gram–Schmidt).

    Directions lost to rank deficiency (an invariant subspace) are replaced by random ones, so
    the search can continue into the rest of the space.
    """
    P, b = W.shape
    room = P - V.shape[1]
    if room <= 0:
        return W[:, :0]
    for _ in range(2):
        if V.shape[1]:
            W = W - V @ (V.T @ W)
    Q, R = torch.linalg.qr(W)
    diag = R.diagonal().abs()
    eps = torch.finfo(W.dtype).eps
    bad = diag <= 100 * eps * max(scale, diag.max().item(), 1e-300)
    if bad.any():
        basis = torch.cat([V, Q[:, ~bad]], dim=1)
        fresh = torch.randn(P, int(bad.sum()), generator=gen, dtype=torch.float64)
        fresh = fresh.to(W.device, W.dtype)
        for _ in range(2):
            fresh = fresh - basis @ (basis.T @ fresh)
        Qf, _ = torch.linalg.qr(fresh)
        Q = torch.cat([Q[:, ~bad], Qf], dim=1)
    return Q[:, : min(b, room)]


def lanczos(
    op: LinearOperator,
    k: int = 1,
    which: str = "largest",
    tol: float = 1e-6,
    *,
    v0: Tensor | None = None,
    block_size: int = 1,
    max_basis: int | None = None,
    max_matvecs: int | None = None,
    return_vectors: bool = False,
    seed: int = 0,
) -> EigResult:
    """``k`` extreme eigenpairs of the symmetric ``op`` (``k`` at each end for ``"both"``).

    Args:
        op: symmetric operator (see :class:`gdscope.linalg.LinearOperator`).
        k: number of eigenpairs (per end for ``"both"``).
        which: ``"largest"`` / ``"smallest"`` (algebraic) or ``"both"``.
        tol: relative residual tolerance, ``‖Av − θv‖ ≤ tol·‖A‖``.
        v0: warm start: a vector (or ``(P, j)`` block) to start from, e.g. the previous
            eigenvector.
        block_size: vectors per step; at least the multiplicity to resolve.
        max_basis: basis size before a thick restart (default ``max(2·wanted + 2·b + 20, 40)``).
        max_matvecs: budget (default ``max(500, 60·wanted)``); exceeding it returns an
            unconverged result, never an error.
        return_vectors: keep the Ritz vectors (``(P, wanted)``).
        seed: for the random start and breakdown restarts.
    """
    if which not in WHICH:
        raise InvalidArgumentError(f"which={which!r} is not supported: use one of {WHICH}.")
    P = op.shape[0]
    if not isinstance(k, int) or k < 1:
        raise InvalidArgumentError(f"k={k!r} must be a positive integer.")
    wanted = 2 * k if which == "both" else k
    if wanted > P:
        raise InvalidArgumentError(
            f"k={k} asks for {wanted} eigenvalues of an operator of size {P}: "
            f"use k <= {P // 2 if which == 'both' else P}."
        )
    if not tol > 0:
        raise InvalidArgumentError(f"tol={tol!r} must be positive.")
    if block_size < 1:
        raise InvalidArgumentError(f"block_size={block_size!r} must be >= 1.")
    b = min(block_size, P)
    m = min(P, max_basis or max(2 * wanted + 2 * b + 20, 40))
    if m < wanted + b and m < P:
        raise InvalidArgumentError(
            f"max_basis={max_basis} is too small for {wanted} eigenpairs with block size {b}: "
            f"use at least {wanted + b}."
        )
    if max_matvecs is not None and max_matvecs < 1:
        raise InvalidArgumentError(f"max_matvecs={max_matvecs!r} must be >= 1 (or None).")
    budget = max_matvecs if max_matvecs is not None else max(500, 60 * wanted)
    dtype, device = op.dtype, op.device
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    start_matvecs = op.matvecs

    V = torch.zeros(P, 0, dtype=dtype, device=device)
    AV = torch.zeros_like(V)
    start = torch.randn(P, b, generator=gen, dtype=torch.float64).to(device, dtype)
    if v0 is not None:
        # A warm start that is (nearly) an eigenvector of a non-wanted eigenvalue would be
        # accepted at once; a random admixture keeps every direction in the Krylov space.
        v0 = v0.reshape(P, -1).to(device, dtype)
        v0 = v0 / torch.linalg.vector_norm(v0, dim=0).clamp_min(torch.finfo(dtype).tiny)
        noise = start[:, : v0.shape[1]]
        noise = noise / torch.linalg.vector_norm(noise, dim=0)
        start = torch.cat([v0 + WARM_START_NOISE * noise, start], dim=1)
        start = start[:, : max(b, v0.shape[1])]
    X = _orthonormalize(start, V, gen, 1.0)
    anorm = 0.0
    done = False
    while not done:
        # expand the basis to m vectors (or until converged / out of budget / full space)
        while True:
            W = op.matmat(X)
            V = torch.cat([V, X], dim=1)
            AV = torch.cat([AV, W], dim=1)
            H = V.T @ AV
            H = 0.5 * (H + H.T)
            theta, S = torch.linalg.eigh(H)
            anorm = max(anorm, theta.abs().max().item())
            idx = _select(theta, which, k)
            Sw = S[:, idx]
            Y = V @ Sw
            R = AV @ Sw - Y * theta[idx]
            res = torch.linalg.vector_norm(R, dim=0)
            conv = res <= tol * max(anorm, torch.finfo(dtype).tiny)
            used = op.matvecs - start_matvecs
            full = V.shape[1] >= P
            enough = V.shape[1] >= wanted + MIN_EXTRA
            if (len(idx) >= wanted and ((enough and bool(conv.all())) or used >= budget)) or full:
                done = True
                break
            X = _orthonormalize(W, V, gen, anorm)
            if V.shape[1] + X.shape[1] > m or X.shape[1] == 0:
                break
        if done:
            break
        # thick restart: keep the wanted Ritz vectors plus a buffer on the wanted side(s)
        keep = min(m - b, max(wanted + b, (m + wanted) // 2))
        kidx = _select(theta, which, keep if which != "both" else (keep + 1) // 2)
        Sk = S[:, kidx]
        V, AV = V @ Sk, AV @ Sk
        if X.shape[1] == 0:
            X = _orthonormalize(
                torch.randn(P, b, generator=gen, dtype=torch.float64).to(device, dtype),
                V,
                gen,
                anorm,
            )
    order = idx  # already in output order for largest/smallest
    vals = theta[order]
    if which == "both":
        srt = torch.argsort(vals)
        vals, res, conv, Y = vals[srt], res[srt], conv[srt], Y[:, srt]
    return EigResult(
        values=vals.detach(),
        residuals=res.detach(),
        converged_mask=conv.detach(),
        vectors=Y.detach() if return_vectors else None,
        which=which,
        tol=tol,
        matvecs=op.matvecs - start_matvecs,
        seconds=time.perf_counter() - t0,
        norm_estimate=anorm,
    )


def lanczos_tridiag(op: LinearOperator, v0: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """``steps`` Lanczos steps from ``v0`` with full reorthogonalization.

    Returns the Ritz values ``θ_j`` of the tridiagonal ``T`` and the squared first components
    ``τ_j² = (e₁ᵀ s_j)²`` of its eigenvectors: the Gauss quadrature nodes and weights of the
    spectral measure of ``A`` seen from ``v0/‖v0‖`` (the weights sum to 1). Stops early at an
    invariant subspace.
    """
    P = op.shape[0]
    steps = min(steps, P)
    q = v0.reshape(-1).to(op.device, op.dtype)
    q = q / torch.linalg.vector_norm(q)
    Q = [q]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    scale = 0.0
    for j in range(steps):
        w = op.matvec(Q[j])
        alpha = torch.dot(Q[j], w)
        alphas.append(alpha)
        Qm = torch.stack(Q, dim=1)
        for _ in range(2):
            w = w - Qm @ (Qm.T @ w)
        beta = torch.linalg.vector_norm(w)
        scale = max(scale, abs(alpha.item()), beta.item())  # running ‖A‖: a relative test
        if j == steps - 1 or beta.item() <= 1e3 * torch.finfo(op.dtype).eps * scale:
            break
        betas.append(beta)
        Q.append(w / beta)
    a = torch.stack(alphas).double()
    T = torch.diag(a)
    if betas:
        bb = torch.stack(betas).double()
        T = T + torch.diag(bb, 1) + torch.diag(bb, -1)
    theta, S = torch.linalg.eigh(T)
    return theta.cpu(), (S[0] ** 2).cpu()
