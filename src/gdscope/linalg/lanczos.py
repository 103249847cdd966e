"""Lanczos for a few extreme eigenpairs of a symmetric operator, torch-native.

Block Lanczos with full reorthogonalization and thick restarts (Krylov–Schur form). The basis
``V`` (rows ``v_j``) and its image ``AV`` live in preallocated buffers. Each step applies ``A``
to the new block ``X`` and orthogonalizes ``W = AX`` against the basis (``W = CᵀV + F``;
classical Gram–Schmidt against the last two blocks, then once against all, again only when the
DGKS test asks). The coefficients ``C = VWᵀ`` are the new columns of the projected matrix
``H = VAVᵀ``, so ``H`` is grown, never recomputed; after a thick restart onto Ritz vectors,
``H = diag(θ_kept)``. At every step the Krylov–Schur relation

    A Vᵀ = Vᵀ H + Fᵀ E_lastᵀ        (E_last selects the newest block's rows)

holds up to rounding, so the residual of a Ritz pair ``(θ, y = Vᵀs)`` is ``‖A y − θ y‖ =
‖Fᵀ s_last‖ = ‖R s_last‖`` (``F = RᵀQ``, ``Q`` the next block): an ``O(b²k)`` *estimate* with
no work of length ``P``. Convergence is only ever decided, and residuals only ever reported, by
the *true* residuals ``‖(AV)ᵀs − θ Vᵀs‖`` (no extra products: ``AV`` is kept), computed when
the estimates say converged. A Ritz pair has converged when its true residual is at most
``tol · ‖A‖`` (``‖A‖`` estimated by the largest ``|θ|`` seen); by the Bauer–Fike/Kato bounds
its eigenvalue is then within that residual of a true eigenvalue.

Round-off floor. The true residual cannot fall below the rounding error of the products (a
float32 network Hessian: about ``3e-7·‖A‖``), while the estimate keeps falling. True residuals
are therefore also checked when the estimates reach ``FLOOR_EPS·eps·‖A‖``, or stop halving for
``PLATEAU_STEPS`` steps once below ``√eps·‖A‖`` (an operator noisier than its dtype). When
``STALL_CHECKS`` checks in a row find every failing residual dominated by round-off (at least
twice its estimate) and the worst one no better than ``STALL_PROGRESS`` × the best so far, the
solve stops: ``stop_reason="stagnated"``, ``converged`` False, the achieved residuals reported,
instead of spending the budget.

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
STALL_CHECKS = 3  # failed true-residual confirmations without progress before stopping
STALL_PROGRESS = 0.9  # progress: the worst true residual falls below this × the best so far
FLOOR_EPS = 10  # residual estimates below FLOOR_EPS·eps·‖A‖ always trigger a true-residual check
PLATEAU_STEPS = 10  # ... and so do estimates below √eps·‖A‖ that did not halve for this many steps
DGKS = 0.7071  # reorthogonalize again when a pass leaves less than this fraction of the norm


@dataclass(frozen=True)
class EigResult:
    """Eigenvalues with their trust and cost.

    ``values`` are sorted descending for ``"largest"``, ascending for ``"smallest"``, and
    ascending for ``"both"`` (the ``k`` smallest then the ``k`` largest). ``residuals[i]`` is
    the true ``‖A v_i − values[i] v_i‖``; ``converged[i]`` says whether it met the tolerance.
    ``residual_estimates`` (Lanczos only) are the Krylov–Schur estimates ``‖R s_last‖`` at the
    last step: equal to ``residuals`` up to rounding; a gap shows the round-off floor.
    ``stop_reason`` (Lanczos only): ``"converged"``, ``"max_matvecs"`` (budget spent) or
    ``"stagnated"`` (true residuals stuck above ``tol·‖A‖`` at the dtype's round-off floor).
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
    residual_estimates: Tensor | None = None
    stop_reason: str = ""

    @property
    def converged(self) -> bool:
        """Whether every requested eigenpair met the tolerance."""
        return bool(self.converged_mask.all())

    def __repr__(self) -> str:
        vals = ", ".join(f"{v:.6g}" for v in self.values.tolist())
        flag = "converged" if self.converged else "NOT converged (values are bounds)"
        if not self.converged and self.stop_reason:
            flag = f"NOT converged ({self.stop_reason}; values are bounds)"
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


def _project_out(W: Tensor, V: Tensor, lo: int) -> tuple[Tensor, Tensor]:
    """``W = CᵀV + F`` with the rows of ``F`` orthogonal to the (orthonormal) rows of ``V``.

    Classical Gram–Schmidt: first against the rows ``lo:`` where Lanczos puts the bulk of
    ``W`` (the last two blocks; after a restart, the whole basis), then against all
    rows, and once more only if that pass removed a large part (the DGKS criterion: the norm
    fell below ``1/√2``). ``C`` sums the coefficients of every pass.
    """
    C = torch.zeros(V.shape[0], W.shape[0], dtype=W.dtype, device=W.device)
    C[lo:] = V[lo:] @ W.T
    F = torch.addmm(W, C[lo:].T, V[lo:], alpha=-1.0)
    for _ in range(2):
        before = torch.linalg.vector_norm(F, dim=1)
        C2 = V @ F.T
        F = torch.addmm(F, C2.T, V, alpha=-1.0)
        C += C2
        if bool((torch.linalg.vector_norm(F, dim=1) >= DGKS * before).all()):
            break
    return F, C


def _orthonormal_rows(
    F: Tensor, V: Tensor, gen: torch.Generator, scale: float
) -> tuple[Tensor, Tensor]:
    """``(Q, R)``: orthonormal rows ``Q`` with ``F = RᵀQ`` (``F`` orthogonal to the rows of ``V``).

    Directions lost to rank deficiency (an invariant subspace) are replaced by random ones
    orthogonal to ``V``, so the search can continue into the rest of the space; ``R = QFᵀ``
    then drops ``F``'s round-off part along them. At most ``P − len(V)`` rows.
    """
    b, P = F.shape
    room = P - V.shape[0]
    if room <= 0:
        return F[:0], F.new_zeros(0, b)
    eps = torch.finfo(F.dtype).eps
    if b == 1:
        R = torch.linalg.vector_norm(F).reshape(1, 1)
        diag = R[0]
        Q = F / R.clamp_min(torch.finfo(F.dtype).tiny)
    else:
        Qt, R = torch.linalg.qr(F.T)
        diag = R.diagonal().abs()
        Q = Qt.T
    bad = diag <= 100 * eps * max(scale, diag.max().item(), 1e-300)
    if bad.any():
        good = Q[~bad]
        fresh = torch.randn(int(bad.sum()), P, generator=gen, dtype=torch.float64)
        fresh = fresh.to(F.device, F.dtype)
        basis = torch.cat([V, good])
        fresh, _ = _project_out(fresh, basis, basis.shape[0])
        Qf, _ = torch.linalg.qr(fresh.T)
        Q = torch.cat([good, Qf.T])
        R = Q @ F.T
    if Q.shape[0] > room:
        Q = Q[:room]
        R = Q @ F.T
    return Q, R


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
        tol: relative residual tolerance, ``‖Av − θv‖ ≤ tol·‖A‖``. Below the dtype's round-off
            floor (float32: about ``1e-6``) the solve stops as ``"stagnated"``, unconverged.
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
    eps = torch.finfo(dtype).eps
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    start_matvecs = op.matvecs

    # rows of V: orthonormal basis; rows of AV: their images; H = V A Vᵀ (float64, CPU). One
    # spare row: a "both" restart keeps (keep + 1) // 2 vectors per end, one more than m - b.
    V = torch.empty(m + 1, P, dtype=dtype, device=device)
    AV = torch.empty_like(V)
    H = torch.zeros(m + 1, m + 1, dtype=torch.float64)
    start = torch.randn(P, b, generator=gen, dtype=torch.float64).T.to(device, dtype)
    if v0 is not None:
        # A warm start that is (nearly) an eigenvector of a non-wanted eigenvalue would be
        # accepted at once; a random admixture keeps every direction in the Krylov space.
        v0 = v0.reshape(P, -1).T.to(device, dtype)
        v0 = v0 / torch.linalg.vector_norm(v0, dim=1, keepdim=True).clamp_min(
            torch.finfo(dtype).tiny
        )
        noise = start[: v0.shape[0]]
        noise = noise / torch.linalg.vector_norm(noise, dim=1, keepdim=True)
        start = torch.cat([v0 + WARM_START_NOISE * noise, start])[: max(b, v0.shape[0])]
    X, _ = _orthonormal_rows(start, V[:0], gen, 1.0)
    n = lo = 0  # basis size; first row of the previous block (Lanczos' local coupling)
    anorm = 0.0
    best, stalls, at_floor = float("inf"), 0, False  # true-residual checks
    est_best, flat = float("inf"), 0  # residual estimates: best so far, steps without halving
    while True:
        nb = X.shape[0]
        W = op.matmat(X.T)  # (P, nb)
        V[n : n + nb] = X
        AV[n : n + nb] = W.T
        n += nb
        F, C = _project_out(AV[n - nb : n], V[:n], lo)
        lo = n - nb
        Cd = C.to("cpu", torch.float64)
        H[:n, n - nb : n] = Cd
        H[n - nb : n, :n] = Cd.T
        H[n - nb : n, n - nb : n] = 0.5 * (Cd[n - nb :] + Cd[n - nb :].T)
        theta, S = torch.linalg.eigh(H[:n, :n])
        anorm = max(anorm, theta.abs().max().item())
        thr = tol * max(anorm, torch.finfo(dtype).tiny)
        idx = _select(theta, which, k)
        X, R = _orthonormal_rows(F, V[:n], gen, anorm)
        est = torch.linalg.vector_norm(R.to("cpu", torch.float64) @ S[n - nb : n, idx], dim=0)
        used = op.matvecs - start_matvecs
        full = n >= P
        have = len(idx) >= wanted
        # Confirm with true residuals when the estimates pass tol, or reach the dtype's floor
        # (below it they are no guide), or stopped falling for PLATEAU_STEPS steps below √eps
        # (an operator noisier than its dtype), or once a check found the residual at round-off.
        top = est.max().item()
        flat = 0 if top < 0.5 * est_best else flat + 1
        est_best = min(est_best, top)
        ready = have and n >= wanted + MIN_EXTRA
        floor = max(thr, FLOOR_EPS * eps * anorm)
        low = max(thr, eps**0.5 * anorm)
        if (
            (ready and (top <= floor or (flat >= PLATEAU_STEPS and top <= low) or at_floor))
            or (have and used >= budget)
            or full
        ):
            Sw = S[:n, idx].to(device, dtype)
            Y = Sw.T @ V[:n]
            theta_w = theta[idx].to(device, dtype)
            res = torch.linalg.vector_norm(Sw.T @ AV[:n] - theta_w[:, None] * Y, dim=1)
            conv = res <= thr
            if bool(conv.all()) or used >= budget or full:
                reason = "converged" if bool(conv.all()) else "max_matvecs"
                break
            # stagnation: every failing residual is round-off (at least twice its Krylov
            # estimate) and the worst residual stopped improving
            fail = ~conv.cpu()
            at_floor = bool((est[fail] <= 0.5 * res.cpu().double()[fail]).all())
            worst = res.max().item()
            if worst < STALL_PROGRESS * best:
                stalls = 0
            elif at_floor:
                stalls += 1
            best, flat = min(best, worst), 0
            if stalls >= STALL_CHECKS:
                reason = "stagnated"
                break
        if n + X.shape[0] > m:
            # thick restart: keep the wanted Ritz vectors plus a buffer on the wanted side(s)
            keep = min(m - b, max(wanted + b, (m + wanted) // 2))
            kidx = _select(theta, which, keep if which != "both" else (keep + 1) // 2)
            Sk = S[:n, kidx].to(device, dtype)
            kk = len(kidx)
            V[:kk] = Sk.T @ V[:n]
            AV[:kk] = Sk.T @ AV[:n]
            H[:kk, :kk] = torch.diag(theta[kidx])
            n, lo = kk, 0
    vals = theta_w
    est = est.to(device, dtype)
    if which == "both":
        srt = torch.argsort(vals)
        vals, res, conv, Y, est = vals[srt], res[srt], conv[srt], Y[srt], est[srt]
    return EigResult(
        values=vals.detach(),
        residuals=res.detach(),
        converged_mask=conv.detach(),
        vectors=Y.T.contiguous().detach() if return_vectors else None,
        which=which,
        tol=tol,
        matvecs=op.matvecs - start_matvecs,
        seconds=time.perf_counter() - t0,
        norm_estimate=anorm,
        residual_estimates=est.detach(),
        stop_reason=reason,
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
