"""The disparity matrix: how fully the parameters control the canonical coordinates of ``f``.

**Data-restricted** (THEORY §1). Take the outputs on the training points, ``F ∈ R^{nk}``, as the
canonical coordinates; the disparity matrix is then ``Jᵀ`` (``P × nk``) and it has full rank
``nk`` iff ``K = J Jᵀ`` is positive definite. :func:`disparity` reports the singular values of
``J`` from an SVD of ``J`` itself, in float64.

*Why not* ``sqrt(eig K)``: a backward-stable eigensolver returns the eigenvalues of ``K`` with
absolute errors of about ``eps·‖K‖ = eps·σ_max²`` (and forming ``K = J Jᵀ`` rounds at that level
too), so ``σ_i = sqrt(λ_i)`` carries a relative error of about ``eps·(σ_max/σ_i)²/2``: singular
values below ``sqrt(eps)·σ_max ≈ 1.5e-8·σ_max`` are lost entirely (they may come out as ``sqrt`` of
a negative number). An SVD of ``J`` perturbs each ``σ_i`` by about ``eps·σ_max`` only, relative
error ``eps·σ_max/σ_i``: squaring the matrix squares its condition number, i.e. it loses half of
the significant digits.

**Function space** (inputs of dimension ``d ≤ 3``): :func:`function_space_disparity` takes the
Fourier coefficients of ``f`` on a box as the canonical coordinates (see its docstring for the
normalization) and needs only the NTK at the quadrature points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gdscope.errors import InvalidArgumentError
from gdscope.kernels.eigs import (
    DEFAULT_MEMORY,
    NTKEigResult,
    _dense_gram,
    _dtype_name,
    _model_inputs,
    jacobian_svdvals,
    ntk_eigs,
    rank_tolerance,
    rank_verdict,
    structural_deficiency,
)
from gdscope.kernels.functional import ModelFunction, check_finite_params
from gdscope.kernels.operator import _prepare_inputs

__all__ = [
    "DisparityReport",
    "FunctionSpaceDisparityReport",
    "disparity",
    "function_space_disparity",
]


@dataclass(frozen=True)
class DisparityReport:
    """Singular values and numerical rank of the data-restricted disparity matrix ``Jᵀ``.

    Attributes:
        singular_values: the ``min(nk, P)`` singular values of ``J``, descending, float64
            (``None`` when ``method="ntk_eigs"``).
        sigma_min: the ``nk``-th singular value (0 when ``nk > P``): the smallest gain from a
            change of parameters to a change of the outputs on the data.
        sigma_max: the largest singular value.
        rank: numerical rank (singular values above ``tol``); ``None`` when undetermined
            (``ntk_eigs`` fallback short of full rank).
        full_rank: ``rank == nk`` (equivalently ``λ_min(K) > tol²``); ``None`` when undetermined
            (the ``ntk_eigs`` fallback could not resolve ``λ_min``: ``note`` says so).
        tol: the rank tolerance on singular values: by default the rule shared with
            :func:`~gdscope.kernels.eigs.ntk_eigs`, :func:`~gdscope.kernels.eigs.rank_tolerance`.
        tol_rule: how ``tol`` was chosen, in words.
        method: ``"svd"`` (float64 SVD of ``J``) or ``"ntk_eigs"`` (``J`` did not fit: ``σ`` from
            ``sqrt`` of the NTK's extreme eigenvalues, with their bounds and residuals).
        shape: ``(P, nk)``, the shape of the disparity matrix ``Jᵀ``.
        sigma_min_is_upper_bound: ``σ_min`` comes from an unconverged ``λ_min`` (Ritz value).
        lambda_min_residual: ``‖K v − λ_min v‖`` of the fallback (``None`` for ``"svd"``).
        eig: the :class:`~gdscope.kernels.eigs.NTKEigResult` of the fallback.
        dtype: the model's dtype (its ``eps`` enters the default tolerance).
        sigma_min_error: absolute error bound of ``σ_min``: ``eps(dtype)·‖J‖_F`` for the SVD (the
            rounding of ``J`` in the model's dtype); from the fallback's ``λ_min ± δ``.
        note: why the rank is undetermined / how it was decided (``""`` if nothing to say).
    """

    singular_values: Tensor | None
    sigma_min: float
    sigma_max: float
    rank: int | None
    full_rank: bool | None
    tol: float
    tol_rule: str
    method: str
    shape: tuple[int, int]
    sigma_min_is_upper_bound: bool
    lambda_min_residual: float | None
    eig: NTKEigResult | None
    dtype: torch.dtype
    sigma_min_error: float | None = None
    note: str = ""

    def __repr__(self) -> str:
        P, nk = self.shape
        head = f"DisparityReport({self.method}, Jᵀ of shape {P}×{nk}"
        smin = (
            f"σ_min ≤ {self.sigma_min:.6g} (upper bound: λ_min not converged, residual "
            f"{self.lambda_min_residual:.2e})"
            if self.sigma_min_is_upper_bound
            else f"σ_min = {self.sigma_min:.6g}"
        )
        rank = "undetermined" if self.rank is None else str(self.rank)
        full = {True: "full rank", False: "NOT full rank", None: "full rank undetermined"}[
            self.full_rank
        ]
        note = f"; {self.note}" if self.note else ""
        if self.method == "ntk_eigs":
            note += (
                "; J did not fit in memory: σ = sqrt(eig K), which resolves only "
                "σ ≳ sqrt(δ) (half the digits of an SVD)"
            )
        return (
            f"{head}: {smin}, σ_max = {self.sigma_max:.6g}, rank {rank} of {nk} at tol "
            f"{self.tol:.3g} ({self.tol_rule}), {full}{note})"
        )


def _check_tol(tol: float | None) -> None:
    if tol is not None and not (
        isinstance(tol, (int, float))
        and not isinstance(tol, bool)
        and math.isfinite(tol)
        and tol >= 0
    ):
        raise InvalidArgumentError(
            f"tol={tol!r} must be a non-negative number (an absolute threshold on singular "
            "values), or None for the default rule."
        )


def disparity(
    model: nn.Module | ModelFunction,
    x: Tensor,
    tol: float | None = None,
    *,
    memory: int | None = None,
) -> DisparityReport:
    """Singular values and numerical rank of the data-restricted disparity matrix ``Jᵀ``.

    Args:
        model: the network (trainable parameters, buffers fixed) or a :class:`ModelFunction`.
        x: the data inputs ``(n, ...)``.
        tol: absolute threshold on singular values for the rank. Default
            ``max(nk, P)·eps·σ_max`` (the LAPACK/NumPy ``matrix_rank`` rule) with ``eps`` the
            machine epsilon **of the model's dtype**: the SVD itself runs in float64, but ``J`` is
            computed in the model's precision, so its entries carry relative errors of order
            ``eps(dtype)`` and singular values below ``~eps(dtype)·σ_max`` are indistinguishable
            from zero; for a float64 model this is ``eps_float64``, for float32 ``eps_float32``.
            This is the one rank rule :func:`~gdscope.kernels.eigs.ntk_eigs` uses too
            (:func:`~gdscope.kernels.eigs.rank_tolerance`; on the kernel ``λ ≤ tol²``), so the
            two never contradict each other.
        memory: bytes allowed for the float64 ``J`` (``n·k·P·8``; the SVD needs about as much
            again). Default 1 GiB. Above it the report falls back to :func:`ntk_eigs`.

    Returns:
        :class:`DisparityReport`. With ``method="svd"`` the singular values are as accurate as
        ``J``; with the ``"ntk_eigs"`` fallback ``σ_min = sqrt(λ_min(K))`` is only resolved down
        to ``sqrt(δ)`` with ``δ`` the resolution of ``K`` in the model's dtype: below it the
        rank is **undetermined** (``full_rank=None``, ``note`` says so, exactly as
        :func:`ntk_eigs` says ``singular=None``), never "rank deficient"; ``σ_min`` is an upper
        bound when ``λ_min`` did not converge.

    >>> import torch
    >>> lin = torch.nn.Linear(4, 1, bias=False).double()
    >>> X = torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 4.0, 0, 0]], dtype=torch.float64)
    >>> rep = disparity(lin, X)   # J = X: the last two rows are parallel
    >>> rep.rank, rep.full_rank
    (2, False)
    """
    _check_tol(tol)
    budget = DEFAULT_MEMORY if memory is None else memory
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise InvalidArgumentError(
            f"memory={memory!r} must be a positive integer number of bytes (or None for the "
            "default 1 GiB): pass e.g. memory=2**30."
        )
    fn, x, k = _model_inputs(model, x)
    n, P = x.shape[0], fn.num_params
    nk = n * k
    eps = torch.finfo(fn.dtype).eps
    rule_default = f"max(nk, P)·eps·σ_max with eps = eps({_dtype_name(fn.dtype)}) = {eps:.3g}"

    if nk * P * 8 <= budget:
        sv = jacobian_svdvals(fn, x, k)
        smax = float(sv[0])
        thr = rank_tolerance(nk, P, fn.dtype, smax) if tol is None else float(tol)
        rank = int((sv > thr).sum())
        smin = float(sv[nk - 1]) if nk <= P else 0.0
        return DisparityReport(
            singular_values=sv,
            sigma_min=smin,
            sigma_max=smax,
            rank=rank,
            full_rank=rank == nk,
            tol=thr,
            tol_rule=rule_default if tol is None else "given",
            method="svd",
            shape=(P, nk),
            sigma_min_is_upper_bound=False,
            lambda_min_residual=None,
            eig=None,
            dtype=fn.dtype,
            sigma_min_error=eps * float(torch.linalg.vector_norm(sv)),  # eps·‖J‖_F
        )

    eig = ntk_eigs(fn, x, which="both", memory=budget)  # J does not fit: K's eigenvalues
    lam_max = max(float(eig.lambda_max or 0.0), 0.0)
    raw = float(eig.values[0])  # as computed (eig.lambda_min is 0 when singular)
    delta = float(eig.lambda_min_error or 0.0)
    smax = math.sqrt(lam_max)
    thr = rank_tolerance(nk, P, fn.dtype, smax) if tol is None else float(tol)
    why = structural_deficiency(x, n, k, P, False)
    note = eig.note
    if why is not None:
        full_rank: bool | None = False
    elif tol is None:
        full_rank = None if eig.singular is None else not eig.singular
    elif eig.lambda_min_is_upper_bound:
        full_rank = False if raw + eig.resolution <= thr**2 else None
    else:
        verdict = rank_verdict(raw, delta, thr**2)
        full_rank = None if verdict is None else not verdict
        note = "" if verdict is not None else f"λ_min = {raw:.3e} ± {delta:.2e} straddles tol²"
    smin = 0.0 if why is not None else math.sqrt(max(raw, 0.0))
    hi = math.sqrt(max(raw, 0.0) + delta)
    lo = math.sqrt(max(raw - delta, 0.0))
    return DisparityReport(
        singular_values=None,
        sigma_min=smin,
        sigma_max=smax,
        rank=nk if full_rank else None,
        full_rank=full_rank,
        tol=thr,
        tol_rule=rule_default if tol is None else "given",
        method="ntk_eigs",
        shape=(P, nk),
        sigma_min_is_upper_bound=eig.lambda_min_is_upper_bound,
        lambda_min_residual=eig.lambda_min_residual,
        eig=eig,
        dtype=fn.dtype,
        sigma_min_error=0.0 if why is not None else max(hi - smin, smin - lo),
        note=note,
    )


# ---------------------------------------------------------------------------------------------
# function space


@dataclass(frozen=True)
class FunctionSpaceDisparityReport:
    """Singular values of the Fourier-space disparity matrix ``H`` of ``f`` on a box.

    Attributes:
        singular_values: of ``H`` (``(2M+1)^d·k`` of them, descending; float64).
        sigma_min, sigma_max: the smallest and largest.
        rank: singular values above ``tol``; ``full_rank``: ``rank == (2M+1)^d·k``.
        tol: the rank tolerance; ``tol_rule`` says how it was chosen.
        band_limit_residual: fraction of the kernel's energy ``trace K_q`` outside the retained
            frequencies (``0``: ``f``'s parameter derivatives are band-limited to ``|m_j| ≤ M``).
        faithful: ``band_limit_residual <= residual_threshold``.
        frequencies: ``((2M+1)^d, d)`` integer frequencies, in the order of ``H``'s columns
            (frequency outer, output inner).
        domain, bandlimit, quad_points: the box, ``M`` and the grid (points per dimension).
        num_params: ``P``.
    """

    singular_values: Tensor
    sigma_min: float
    sigma_max: float
    rank: int
    full_rank: bool
    tol: float
    tol_rule: str
    band_limit_residual: float
    residual_threshold: float
    faithful: bool
    frequencies: Tensor
    domain: tuple[tuple[float, float], ...]
    bandlimit: int
    quad_points: tuple[int, ...]
    num_params: int

    def __repr__(self) -> str:
        m = self.singular_values.shape[0]
        verdict = (
            "faithful"
            if self.faithful
            else "NOT faithful: the retained frequencies miss more than "
            f"{self.residual_threshold:.0%} of the kernel's energy; raise bandlimit (and "
            "quad_points)"
        )
        return (
            f"FunctionSpaceDisparityReport(box {self.domain}, |m_j| ≤ {self.bandlimit}, grid "
            f"{self.quad_points}: σ_min = {self.sigma_min:.6g}, σ_max = {self.sigma_max:.6g}, "
            f"rank {self.rank} of {m} at tol {self.tol:.3g} ({self.tol_rule}), "
            f"{'full rank' if self.full_rank else 'NOT full rank'}; band-limit residual "
            f"{self.band_limit_residual:.3g}: {verdict})"
        )


def _check_domain(domain: object) -> tuple[tuple[float, float], ...]:
    try:
        box = tuple((float(lo), float(hi)) for lo, hi in domain)  # type: ignore[union-attr]
    except (TypeError, ValueError) as err:
        raise InvalidArgumentError(
            f"domain={domain!r} must be a sequence of (lo, hi) pairs, one per input dimension, "
            "e.g. ((-1.0, 1.0),) * d."
        ) from err
    if not 1 <= len(box) <= 3:
        raise InvalidArgumentError(
            f"domain has {len(box)} dimensions: the function-space disparity is for inputs of "
            "dimension 1, 2 or 3 (the quadrature grid grows like quad_points^d); use disparity() "
            "for the data-restricted version."
        )
    for j, (lo, hi) in enumerate(box):
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise InvalidArgumentError(f"domain[{j}] = {(lo, hi)} must be finite with hi > lo.")
    return box


def function_space_disparity(
    model: nn.Module | ModelFunction,
    domain: tuple[tuple[float, float], ...],
    bandlimit: int,
    quad_points: int | tuple[int, ...] | None = None,
    *,
    tol: float | None = None,
    residual_threshold: float = 0.05,
) -> FunctionSpaceDisparityReport:
    """Disparity matrix with Fourier coefficients of ``f`` on a box as canonical coordinates.

    **Normalization.** Let ``B = Π_j [lo_j, hi_j]``, ``L_j = hi_j − lo_j``, ``vol = Π_j L_j`` and

        ``e_m(x) = vol^{-1/2} exp(2πi Σ_j m_j (x_j − lo_j)/L_j)``,   ``m ∈ {−M, …, M}^d``,

    orthonormal in ``L²(B, dx)``. The canonical coordinates of output ``a`` are
    ``c_{m,a} = ∫_B f_a(x) ē_m(x) dx`` and the disparity matrix is their parameter derivative
    ``H_{p,(m,a)} = ∫_B ∂_p f_a(x) ē_m(x) dx`` (``P × (2M+1)^d k``). On the tensor grid of
    midpoints ``x_q`` (``n_j`` per dimension, ``N_q = Π n_j``) the rule
    ``∫_B g ≈ (vol/N_q) Σ_q g(x_q)`` gives

        ``H ≈ (vol/N_q) J_qᵀ Φ̄``,   ``Φ_{q,m} = e_m(x_q)``,   so
        ``HᴴH = (vol/N_q)² Φᵀ K_q Φ̄ = (vol/N_q) Ψᵀ K_q Ψ̄``,   ``Ψ = sqrt(vol/N_q) Φ``,

    with ``J_q``, ``K_q = J_q J_qᵀ`` the Jacobian and NTK Gram on the grid (sample-major; ``Φ``
    acts as ``Φ ⊗ I_k`` on the outputs). ``Ψ``'s entries are ``exp(…)/sqrt(N_q)`` and its columns
    are exactly orthonormal when ``n_j ≥ 2M+1``. ``HᴴH`` is (the complex conjugate of) the matrix
    of the NTK integral operator ``(T g)(x) = ∫_B Θ(x, x') g(x') dx'`` in the basis ``e_m``:
    its eigenvalues ``σ²`` are the rates at which gradient flow on ``∫_B ‖f − y‖² dx/2`` moves the
    retained Fourier modes. Only ``K_q`` is needed, never ``J_q``. For a model linear in
    orthogonal features ``ψ_p`` inside the band, ``σ_p = ‖∂_p f‖_{L²(B)}``.

    **Band-limit residual.** By Parseval, ``Σ_{all m} |H_{p,m}|² = ∫_B |∂_p f|² dx``; on the grid
    the total is ``(vol/N_q) trace K_q`` and the retained part ``‖H‖_F² = trace HᴴH``, so

        ``residual = 1 − trace(Ψᵀ K_q Ψ̄) / trace(K_q) ∈ [0, 1]``.

    A large residual means most of what the parameters can do to ``f`` lies outside the retained
    band: the singular values then describe a small corner of function space and are **not**
    a faithful picture of the map. Frequencies above the grid's Nyquist limit alias into the
    band and are not seen: use ``quad_points`` well above ``2M+1`` for non-smooth models.

    **Accuracy.** The singular values come from ``eigvalsh`` of ``HᴴH`` (float64), so they are
    resolved only down to about ``sqrt(c·eps_float64)·σ_max`` with ``c = N_q·k`` (the squaring
    loses half the digits, see the module docstring); ``J_q`` in the model's precision limits
    them to ``c·eps(dtype)·σ_max``. The default rank tolerance is the larger of the two.

    Args:
        model: network with inputs of shape ``(n, d)``, ``d = len(domain) ≤ 3``.
        domain: ``((lo_1, hi_1), …, (lo_d, hi_d))``.
        bandlimit: ``M``: frequencies with ``|m_j| ≤ M`` in every dimension are retained.
        quad_points: grid points per dimension (an int, or one per dimension), each at least
            ``2M+1``; default ``2(2M+1)``.
        tol: absolute rank threshold on singular values (default: see Accuracy).
        residual_threshold: largest band-limit residual still called faithful.
    """
    box = _check_domain(domain)
    d = len(box)
    if isinstance(bandlimit, bool) or not isinstance(bandlimit, int) or bandlimit < 0:
        raise InvalidArgumentError(
            f"bandlimit={bandlimit!r} must be a non-negative integer M (frequencies |m_j| ≤ M)."
        )
    M = bandlimit
    if quad_points is None:
        quad_points = 2 * (2 * M + 1)
    pts = (quad_points,) * d if isinstance(quad_points, int) else tuple(quad_points)
    if len(pts) != d or any(
        isinstance(q, bool) or not isinstance(q, int) or q < 2 * M + 1 for q in pts
    ):
        raise InvalidArgumentError(
            f"quad_points={quad_points!r} must be an int or {d} ints, each at least 2M+1 = "
            f"{2 * M + 1} (fewer points alias retained frequencies onto each other)."
        )
    _check_tol(tol)
    if not (isinstance(residual_threshold, (int, float)) and 0 <= residual_threshold <= 1):
        raise InvalidArgumentError(f"residual_threshold={residual_threshold!r} must be in [0, 1].")
    fn = model if isinstance(model, ModelFunction) else ModelFunction(model)
    check_finite_params(fn.model, fn.names)

    # midpoint tensor grid, flattened with the last dimension fastest
    axes = [
        lo + (hi - lo) * (torch.arange(nq, dtype=torch.float64) + 0.5) / nq
        for (lo, hi), nq in zip(box, pts, strict=True)
    ]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, d)
    Nq = grid.shape[0]
    vol = math.prod(hi - lo for lo, hi in box)

    one_d = torch.arange(-M, M + 1)
    freqs = torch.stack(torch.meshgrid(*([one_d] * d), indexing="ij"), dim=-1).reshape(-1, d)
    lows = torch.tensor([lo for lo, _ in box], dtype=torch.float64)
    lengths = torch.tensor([hi - lo for lo, hi in box], dtype=torch.float64)
    phase = 2 * math.pi * ((grid - lows) / lengths) @ freqs.to(torch.float64).T  # (Nq, Mf)
    Psi = torch.exp(1j * phase) / math.sqrt(Nq)  # complex128, orthonormal columns

    x = _prepare_inputs(fn, grid)
    K = _dense_gram(fn, x, False).cpu()  # (Nq·k, Nq·k) float64
    k = K.shape[0] // Nq
    K4 = K.reshape(Nq, k, Nq, k).to(torch.complex128)
    T = torch.einsum("qm,qapb->mapb", Psi, K4)
    G = (vol / Nq) * torch.einsum("mapb,pn->manb", T, Psi.conj())
    Mf = freqs.shape[0]
    G = G.reshape(Mf * k, Mf * k)
    G = 0.5 * (G + G.mH)
    lam = torch.linalg.eigvalsh(G).flip(0)
    sv = lam.clamp_min(0.0).sqrt()
    smax = float(sv[0])

    total = float(K.diagonal().sum())
    captured = float(G.diagonal().real.sum()) * Nq / vol
    residual = 0.0 if total <= 0 else min(max(1.0 - captured / total, 0.0), 1.0)

    c = Nq * k
    eps_model = torch.finfo(fn.dtype).eps
    eps64 = torch.finfo(torch.float64).eps
    if tol is None:
        thr = max(math.sqrt(c * eps64), c * eps_model) * smax
        rule = (
            f"max(sqrt(c·eps_float64), c·eps({fn.dtype}))·σ_max with c = N_q·k = {c}: σ from "
            "eig(HᴴH) resolves only down to sqrt(eps)"
        )
    else:
        thr, rule = float(tol), "given"
    rank = int((sv > thr).sum())
    return FunctionSpaceDisparityReport(
        singular_values=sv,
        sigma_min=float(sv[-1]),
        sigma_max=smax,
        rank=rank,
        full_rank=rank == Mf * k,
        tol=thr,
        tol_rule=rule,
        band_limit_residual=residual,
        residual_threshold=float(residual_threshold),
        faithful=residual <= residual_threshold,
        frequencies=freqs,
        domain=box,
        bandlimit=M,
        quad_points=pts,
        num_params=fn.num_params,
    )
