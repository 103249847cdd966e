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

Repeated eigenvalues. A single start vector sees one copy of a repeated eigenvalue: for a top
eigenvalue of multiplicity 3 and ``k = 3`` the Krylov space offers ``[2, 2, 1.5]`` with small
residuals where the answer is ``[2, 2, 2]``. So when more than one eigenvalue per end is wanted,
a converged solve is *verified* (``verify_multiplicity``): Lanczos runs again on the operator
deflated against every vector found so far (``(I − ZᵀZ) A (I − ZᵀZ)`` on the complement of
``Z``, from a fresh random start orthogonal to ``Z``) for its extreme eigenvalue. If that value
lies beyond the ``k``-th value by more than their two residuals, its vector joins ``Z``,
Rayleigh–Ritz on ``span Z`` (no products: ``AZ`` is kept) gives the new values, and the check
repeats; otherwise the wanted multiset is right to within residuals and is confirmed
(``multiplicity_resolved=True``). A result whose multiplicities could not be confirmed (budget
spent, or the check switched off) says so: ``multiplicity_resolved=False`` and ``converged`` is
False. ``block_size`` at least the multiplicity finds the copies in the first solve, so the check
then only confirms. Like Lanczos itself the check is probabilistic (a random start has a
component along every eigenvector with probability one).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from gdscope.errors import InvalidArgumentError
from gdscope.linalg._validate import (
    check_bool,
    check_choice,
    check_int,
    check_operator,
    check_optional_int,
    check_seed,
    check_tol,
    check_vector,
)
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
    the true ``‖A v_i − values[i] v_i‖``; ``converged_mask[i]`` says whether it met the
    tolerance. ``residual_estimates`` (Lanczos only) are the Krylov–Schur estimates
    ``‖R s_last‖`` at the last step: equal to ``residuals`` up to rounding; a gap shows the
    round-off floor (``None`` when the values come from Rayleigh–Ritz over several solves, after
    the multiplicity check found a missed copy).
    ``stop_reason`` (Lanczos only): ``"converged"``, ``"max_matvecs"`` (budget spent) or
    ``"stagnated"`` (true residuals stuck above ``tol·‖A‖`` at the dtype's round-off floor).
    ``multiplicity_resolved``: ``True`` when the multiset of values was confirmed (a deflated
    restart found no further copy, or the basis spanned the whole space), ``False`` when it could
    not be (then ``converged`` is False: a missed copy of a repeated eigenvalue may hide behind
    small residuals), ``None`` when one value per end was asked for (multiplicity cannot change
    it). ``note`` says what was not verified, if anything. ``notes`` says how the operator was
    evaluated when that differs from a plain forward (the problem's notes, e.g. attention through
    the math SDPA backend; empty for a bare operator).
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
    multiplicity_resolved: bool | None = None
    note: str = ""
    notes: tuple[str, ...] = ()

    @property
    def converged(self) -> bool:
        """Whether every requested eigenpair met the tolerance and, when more than one value
        per end was asked for, their multiplicities were confirmed."""
        return bool(self.converged_mask.all()) and self.multiplicity_resolved is not False

    def __repr__(self) -> str:
        vals = ", ".join(f"{v:.6g}" for v in self.values.tolist())
        flag = "converged" if self.converged else "NOT converged (values are bounds)"
        if not self.converged:
            if bool(self.converged_mask.all()):
                why = "multiplicity not verified"
            else:
                why = self.stop_reason
            if why:
                flag = f"NOT converged ({why}; values are bounds)"
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
    F: Tensor, V: Tensor, gen: torch.Generator, scale: float, locked: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(Q, R)``: orthonormal rows ``Q`` with ``F = RᵀQ`` (``F`` orthogonal to the rows of ``V``).

    Directions lost to rank deficiency (an invariant subspace) are replaced by random ones
    orthogonal to ``V`` (and to ``locked``, the deflated vectors), so the search can continue
    into the rest of the space; ``R = QFᵀ`` then drops ``F``'s round-off part along them. At most
    ``P − len(V) − len(locked)`` rows.
    """
    b, P = F.shape
    nlocked = 0 if locked is None else locked.shape[0]
    room = P - V.shape[0] - nlocked
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
        parts = [V, good] if locked is None else [locked, V, good]
        basis = torch.cat(parts)
        fresh, _ = _project_out(fresh, basis, basis.shape[0])
        Qf, _ = torch.linalg.qr(fresh.T)
        Q = torch.cat([good, Qf.T])
        R = Q @ F.T
    if Q.shape[0] > room:
        Q = Q[:room]
        R = Q @ F.T
    return Q, R


@dataclass
class _Solve:
    """One Krylov–Schur solve: wanted Ritz pairs (rows), their images ``A y`` and trust."""

    values: Tensor
    vectors: Tensor
    images: Tensor
    residuals: Tensor
    conv: Tensor
    est: Tensor
    reason: str
    anorm: float
    spanned: bool
    matvecs: int


def _deflate(X: Tensor, L: Tensor | None) -> Tensor:
    """``X (I − LᵀL)`` twice (rows of ``L`` orthonormal): rows orthogonal to ``L``."""
    if L is None or L.shape[0] == 0:
        return X
    for _ in range(2):
        X = torch.addmm(X, X @ L.T, L, alpha=-1.0)
    return X


def _solve(
    op: LinearOperator,
    k: int,
    which: str,
    tol: float,
    start: Tensor,
    *,
    b: int,
    m: int,
    budget: int,
    gen: torch.Generator,
    locked: Tensor | None = None,
    anorm: float = 0.0,
) -> _Solve:
    """Block thick-restart Lanczos for ``k`` extreme eigenpairs (per end for ``"both"``).

    With ``locked`` (orthonormal rows ``L``) the operator is ``(I − LᵀL) A (I − LᵀL)`` on the
    complement of ``L``: every block is kept orthogonal to ``L``, and residuals are those of
    the deflated operator. ``start``: rows of the first block (any norm).
    """
    P = op.shape[0]
    dtype, device = op.dtype, op.device
    nlocked = 0 if locked is None else locked.shape[0]
    dim = P - nlocked  # dimension of the space searched
    wanted = 2 * k if which == "both" else k
    eps = torch.finfo(dtype).eps
    start_matvecs = op.matvecs
    # rows of V: orthonormal basis; rows of AV: their images; H = V A Vᵀ (float64, CPU). One
    # spare row: a "both" restart keeps (keep + 1) // 2 vectors per end, one more than m - b.
    V = torch.empty(m + 1, P, dtype=dtype, device=device)
    AV = torch.empty_like(V)
    H = torch.zeros(m + 1, m + 1, dtype=torch.float64)
    X, _ = _orthonormal_rows(_deflate(start, locked), V[:0], gen, 1.0, locked)
    n = lo = 0  # basis size; first row of the previous block (Lanczos' local coupling)
    best, stalls, at_floor = float("inf"), 0, False  # true-residual checks
    est_best, flat = float("inf"), 0  # residual estimates: best so far, steps without halving
    while True:
        nb = X.shape[0]
        W = op.matmat(X.T)  # (P, nb)
        V[n : n + nb] = X
        AV[n : n + nb] = W.T
        n += nb
        F, C = _project_out(AV[n - nb : n], V[:n], lo)
        F = _deflate(F, locked)
        lo = n - nb
        Cd = C.to("cpu", torch.float64)
        H[:n, n - nb : n] = Cd
        H[n - nb : n, :n] = Cd.T
        H[n - nb : n, n - nb : n] = 0.5 * (Cd[n - nb :] + Cd[n - nb :].T)
        theta, S = torch.linalg.eigh(H[:n, :n])
        anorm = max(anorm, theta.abs().max().item())
        thr = tol * max(anorm, torch.finfo(dtype).tiny)
        idx = _select(theta, which, k)
        X, R = _orthonormal_rows(F, V[:n], gen, anorm, locked)
        est = torch.linalg.vector_norm(R.to("cpu", torch.float64) @ S[n - nb : n, idx], dim=0)
        used = op.matvecs - start_matvecs
        full = n >= dim
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
            AY = Sw.T @ AV[:n]
            theta_w = theta[idx].to(device, dtype)
            res = torch.linalg.vector_norm(_deflate(AY - theta_w[:, None] * Y, locked), dim=1)
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
    return _Solve(
        theta_w,
        Y,
        AY,
        res,
        conv,
        est.to(device, dtype),
        reason,
        anorm,
        full and n >= P,
        op.matvecs - start_matvecs,
    )


def _rayleigh_ritz(Z: Tensor, AZ: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Ritz values (ascending), vectors and images of ``A`` on the row space of ``Z``."""
    G = (Z @ AZ.T).to("cpu", torch.float64)
    theta, U = torch.linalg.eigh(0.5 * (G + G.T))
    U = U.to(Z.device, Z.dtype)
    return theta.to(Z.device, Z.dtype), U.T @ Z, U.T @ AZ


def _append(Z: Tensor, AZ: Tensor, y: Tensor, ay: Tensor) -> tuple[Tensor, Tensor]:
    """``Z`` and ``AZ`` with ``y`` (made orthogonal to ``Z``, unit) and its image appended."""
    for _ in range(2):
        c = Z @ y
        y, ay = y - c @ Z, ay - c @ AZ
    nrm = torch.linalg.vector_norm(y).clamp_min(torch.finfo(y.dtype).tiny)
    return torch.cat([Z, (y / nrm)[None]]), torch.cat([AZ, (ay / nrm)[None]])


@dataclass
class _Verified:
    """Outcome of the multiplicity check: the (possibly enlarged) Ritz set, ascending."""

    theta: Tensor
    Z: Tensor
    AZ: Tensor
    merged: bool
    resolved: bool
    reason: str
    matvecs: int
    anorm: float
    note: str


def _verify_multiplicity(
    op: LinearOperator,
    first: _Solve,
    k: int,
    which: str,
    tol: float,
    *,
    b: int,
    budget: int,
    gen: torch.Generator,
) -> _Verified:
    """Deflated restarts until no missed copy would enter the wanted set (module docstring)."""
    P = op.shape[0]
    dtype, device = op.dtype, op.device
    order = torch.argsort(first.values)
    theta, Z, AZ = first.values[order], first.vectors[order], first.images[order]
    anorm, used, merged = first.anorm, 0, False
    pending = {"largest", "smallest"} if which == "both" else {which}
    reason, note = "converged", ""
    while pending and Z.shape[0] < P:
        room = P - Z.shape[0]
        if used >= budget:
            reason = "max_matvecs"
            note = (
                f"multiplicity not verified: the budget of {budget} products for the check was "
                "spent; raise max_matvecs"
            )
            break
        end = "both" if len(pending) == 2 and room >= 2 else min(pending)
        ends = ["smallest", "largest"] if end == "both" else [end]
        bb = min(b, room)
        m = min(room, max(2 * len(ends) + 2 * bb + 20, 40))
        start = torch.randn(P, bb, generator=gen, dtype=torch.float64).T.to(device, dtype)
        d = _solve(
            op, 1, end, tol, start, b=bb, m=m, budget=budget - used, gen=gen, locked=Z, anorm=anorm
        )
        used += d.matvecs
        anorm = max(anorm, d.anorm)
        if not bool(d.conv.all()) and d.reason != "stagnated":
            reason = d.reason
            note = (
                f"multiplicity not verified: the budget ran out in the deflated restart after "
                f"{d.matvecs} products; raise max_matvecs"
            )
            break
        resZ = torch.linalg.vector_norm(AZ - theta[:, None] * Z, dim=1)
        slack = FLOOR_EPS * torch.finfo(dtype).eps * anorm
        add: list[int] = []
        for i, e in enumerate(ends):
            if e not in pending:
                continue
            mu = d.values[i].item()
            r_mu = torch.linalg.vector_norm(d.images[i] - d.values[i] * d.vectors[i]).item()
            j = Z.shape[0] - k if e == "largest" else k - 1  # the k-th value from that end
            # beyond the k-th value by more than both residuals: a missed eigenvalue that
            # belongs in the wanted set (a copy of the k-th value sits within them)
            beyond = mu - theta[j].item() if e == "largest" else theta[j].item() - mu
            if beyond > r_mu + resZ[j].item() + slack:
                add.append(i)
            else:
                pending.discard(e)
        if not add:
            break
        for i in add:
            Z, AZ = _append(Z, AZ, d.vectors[i], d.images[i])
        theta, Z, AZ = _rayleigh_ritz(Z, AZ)
        merged = True
    resolved = not pending or Z.shape[0] >= P
    if resolved:
        reason, note = "converged", ""
    return _Verified(theta, Z, AZ, merged, resolved, reason, used, anorm, note)


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
    verify_multiplicity: bool = True,
) -> EigResult:
    """``k`` extreme eigenpairs of the symmetric ``op`` (``k`` at each end for ``"both"``).

    Args:
        op: symmetric operator (see :class:`gdscope.linalg.LinearOperator`).
        k: number of eigenpairs (per end for ``"both"``).
        which: ``"largest"`` / ``"smallest"`` (algebraic) or ``"both"``.
        tol: relative residual tolerance in ``(0, 1)``, ``‖Av − θv‖ ≤ tol·‖A‖``. Below the
            dtype's round-off floor (float32: about ``1e-6``) the solve stops as
            ``"stagnated"``, unconverged.
        v0: warm start: a vector (or ``(P, j)`` block) to start from, e.g. the previous
            eigenvector.
        block_size: vectors per step; at least the multiplicity to resolve in one solve.
        max_basis: basis size before a thick restart (default ``max(2·wanted + 2·b + 20, 40)``).
        max_matvecs: budget for the whole call, the multiplicity check included (default
            ``max(500, 60·wanted)`` for the solve and as much again for the check); exceeding
            it returns an unconverged result, never an error.
        return_vectors: keep the Ritz vectors (``(P, wanted)``).
        seed: for the random start, breakdown restarts and the deflated restarts.
        verify_multiplicity: with ``k >= 2``, confirm by deflated restarts that no copy of a
            repeated eigenvalue was missed (module docstring). ``False`` skips the check; the
            result then says ``multiplicity_resolved=False`` and is not ``converged``.
    """
    check_operator(op)
    which = check_choice("which", which, WHICH)
    P = op.shape[0]
    k = check_int("k", k, 1)
    wanted = 2 * k if which == "both" else k
    if wanted > P:
        raise InvalidArgumentError(
            f"k={k} asks for {wanted} eigenvalues of an operator of size {P}: "
            f"use k <= {P // 2 if which == 'both' else P}."
        )
    tol = check_tol(tol)
    block_size = check_int("block_size", block_size, 1)
    max_basis = check_optional_int("max_basis", max_basis, 1)
    max_matvecs = check_optional_int("max_matvecs", max_matvecs, 1)
    return_vectors = check_bool("return_vectors", return_vectors)
    verify_multiplicity = check_bool("verify_multiplicity", verify_multiplicity)
    seed = check_seed(seed)
    if v0 is not None:
        v0 = check_vector("v0", v0, P, block=True)
    b = min(block_size, P)
    m = min(P, max_basis or max(2 * wanted + 2 * b + 20, 40))
    if m < wanted + b and m < P:
        raise InvalidArgumentError(
            f"max_basis={max_basis} is too small for {wanted} eigenpairs with block size {b}: "
            f"use at least {wanted + b}."
        )
    budget = max_matvecs if max_matvecs is not None else max(500, 60 * wanted)
    dtype, device = op.dtype, op.device
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    start_matvecs = op.matvecs

    start = torch.randn(P, b, generator=gen, dtype=torch.float64).T.to(device, dtype)
    if v0 is not None:
        # A warm start that is (nearly) an eigenvector of a non-wanted eigenvalue would be
        # accepted at once; a random admixture keeps every direction in the Krylov space.
        v0 = v0.T.to(device, dtype)
        v0 = v0 / torch.linalg.vector_norm(v0, dim=1, keepdim=True).clamp_min(
            torch.finfo(dtype).tiny
        )
        noise = start[: v0.shape[0]]
        noise = noise / torch.linalg.vector_norm(noise, dim=1, keepdim=True)
        start = torch.cat([v0 + WARM_START_NOISE * noise, start])[: max(b, v0.shape[0])]
    first = _solve(op, k, which, tol, start, b=b, m=m, budget=budget, gen=gen)
    vals, Y, res, conv, est = first.values, first.vectors, first.residuals, first.conv, first.est
    reason, anorm, note = first.reason, first.anorm, ""
    resolved: bool | None = None
    if k >= 2:
        if first.spanned:
            resolved = True  # Rayleigh–Ritz on the whole space: every multiplicity is exact
        elif not bool(conv.all()):
            resolved = False
            note = "multiplicity not verified: the solve did not converge"
        elif not verify_multiplicity:
            resolved = False
            note = "multiplicity not verified (verify_multiplicity=False)"
        else:
            check_budget = (
                max_matvecs - first.matvecs if max_matvecs is not None else max(500, 60 * wanted)
            )
            ver = _verify_multiplicity(op, first, k, which, tol, b=b, budget=check_budget, gen=gen)
            resolved, note, anorm = ver.resolved, ver.note, ver.anorm
            if not resolved:
                reason = ver.reason
            if ver.merged:
                idx = _select(ver.theta, which, k).to(ver.theta.device)
                vals, Y = ver.theta[idx], ver.Z[idx]
                res = torch.linalg.vector_norm(ver.AZ[idx] - vals[:, None] * Y, dim=1)
                est = None
            conv = res <= tol * anorm
            if not bool(conv.all()) and resolved:
                reason = "stagnated"  # a merged copy carries a residual at the round-off floor
    if which == "both":
        srt = torch.argsort(vals)
        vals, res, conv, Y = vals[srt], res[srt], conv[srt], Y[srt]
        est = None if est is None else est[srt]
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
        residual_estimates=None if est is None else est.detach(),
        stop_reason=reason,
        multiplicity_resolved=resolved,
        note=note,
    )


def lanczos_tridiag(op: LinearOperator, v0: Tensor, steps: int) -> tuple[Tensor, Tensor]:
    """``steps`` Lanczos steps from ``v0`` with full reorthogonalization.

    Returns the Ritz values ``θ_j`` of the tridiagonal ``T`` and the squared first components
    ``τ_j² = (e₁ᵀ s_j)²`` of its eigenvectors: the Gauss quadrature nodes and weights of the
    spectral measure of ``A`` seen from ``v0/‖v0‖`` (the weights sum to 1). Stops early at an
    invariant subspace.
    """
    check_operator(op)
    P = op.shape[0]
    v0 = check_vector("v0", v0, P)[:, 0]
    steps = min(check_int("steps", steps, 1), P)
    q = v0.to(op.device, op.dtype)
    q = q / torch.linalg.vector_norm(q)
    Q = [q]
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    scale = 0.0
    for j in range(steps):
        w = op.matvec(Q[j])
        alpha = torch.dot(Q[j], w)
        alphas.append(alpha)
        Qm = torch.stack(Q).T  # (P, j) as a view of rows: see CallableOperator._apply
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
