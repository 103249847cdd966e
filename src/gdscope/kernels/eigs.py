"""Extreme eigenvalues of the empirical NTK Gram: ``λ_min``, ``λ_max`` and the condition number.

Two paths, one result type:

- ``"dense"`` (``n·k <= dense_limit``): the Gram ``K`` is formed by
  :func:`~gdscope.kernels.ntk.ntk` (in the model's dtype) and every eigenvalue comes from
  ``torch.linalg.eigh`` in float64.
- ``"lanczos"``: Lanczos (:func:`gdscope.linalg.lanczos`) over the matrix-free
  :func:`~gdscope.kernels.operator.ntk_operator`, in the model's dtype. Ritz values lie inside the
  spectrum, so an *unconverged* ``λ_min`` is an **upper bound** (it overestimates ``λ_min``) and an
  unconverged ``λ_max`` a **lower bound**; either makes the reported condition number
  ``λ_max/λ_min`` a **lower bound** (it is under-reported, never over-reported). The flags say so.
  A Krylov space that has not yet seen ``λ_min``'s eigenvector converges to a neighbour with a
  small residual, so the smallest end is always solved with one *guard* eigenvalue beyond the
  ``k`` wanted, which turns on Lanczos' verification by a deflated restart (a missed eigenvalue
  below the ones found is then caught). Like Lanczos itself this is probabilistic; the dense path
  has no such caveat.

**One rank rule** (shared with :func:`gdscope.disparity`, THEORY §1). ``K = J Jᵀ`` is singular
iff the disparity matrix ``Jᵀ`` is rank deficient, and both functions decide it the same way
(:func:`rank_tolerance`, :func:`rank_verdict`):

- ``σ_i`` counts as zero when ``σ_i ≤ τ_σ = max(nk, P)·eps(dtype)·σ_max`` (the LAPACK/NumPy
  ``matrix_rank`` rule applied to ``J``, with ``eps`` of the *model's* dtype, in which ``J`` is
  computed); equivalently ``λ_i(K) ≤ τ_λ = τ_σ²``.
- An eigenvalue of ``K`` computed in the model's dtype is only known to within
  ``δ = size·eps(dtype)·λ_max`` (:func:`kernel_resolution`: rounding ``K``, or each product
  ``Kv``, perturbs it by a matrix of norm at most about that, and by Weyl every eigenvalue by as
  much), plus the Lanczos residual on the matrix-free path. ``λ_min`` is reported **singular**
  only when ``λ_min + δ ≤ τ_λ``, **not singular** only when ``λ_min − δ > τ_λ``, and otherwise
  **unresolved** (``singular=None``, a note: "below the float32 resolution floor δ; recompute in
  float64"), never ``0`` and never a confident wrong number. Measured: the float32 Gram of the
  zoo's MLPs, CNNs, ResNets and attention models has eigenvalue errors ``1e-8``–``7e-8·λ_max``,
  well inside ``δ``.
- Since ``δ ≫ τ_λ`` (``τ_λ`` is of order ``eps²``), a Gram alone can confirm "full rank" but
  never "singular": where the dense path finds ``λ_min`` unresolved and the Jacobian fits in
  ``memory``, it decides by the float64 SVD of ``J`` exactly as :func:`gdscope.disparity` does
  (``λ_min = σ_min²``, ``lambda_min_source="svd"``).
- Exact structure needs no tolerance: more outputs than parameters (``nk > P``, rank at most
  ``P``) or two identical inputs (identical rows of ``J``) make ``K`` singular.

A singular ``λ_min`` is reported as ``0`` (condition number ``inf``); the computed value stays in
``values``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gdscope.errors import InvalidArgumentError
from gdscope.kernels._ntk_plan import _check_model, _record
from gdscope.kernels.functional import (
    ModelFunction,
    check_finite,
    check_finite_params,
    jacobian,
)
from gdscope.kernels.ntk import ntk
from gdscope.kernels.operator import _prepare_inputs, ntk_operator
from gdscope.linalg.lanczos import WHICH, EigResult, lanczos

__all__ = [
    "NTKEigResult",
    "kernel_resolution",
    "ntk_eigs",
    "rank_tolerance",
    "rank_verdict",
]

logger = logging.getLogger(__name__)

DEFAULT_MEMORY = 2**30  # bytes allowed for a float64 Jacobian (ntk_eigs' SVD check, disparity)


# ---------------------------------------------------------------------------------------------
# the rank rule (one place: ntk_eigs and disparity both decide with these)


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def rank_tolerance(rows: int, cols: int, dtype: torch.dtype, sigma_max: float) -> float:
    """``τ_σ = max(rows, cols)·eps(dtype)·σ_max``: singular values of ``J`` at or below it are zero.

    The LAPACK/NumPy ``matrix_rank`` rule for the ``rows × cols`` Jacobian (``nk × P``; ``n × kP``
    for the trace kernel), with ``eps`` of the dtype ``J`` was computed in (the model's): its
    entries carry relative errors of that order, so smaller singular values cannot be told from
    zero. On the kernel the same rule reads ``λ ≤ τ_σ²``.

    >>> rank_tolerance(20, 100, torch.float64, 2.0) == 100 * 2.0**-52 * 2.0
    True
    """
    return max(rows, cols) * _eps(dtype) * max(float(sigma_max), 0.0)


def kernel_resolution(size: int, dtype: torch.dtype, lam_max: float) -> float:
    """``δ = size·eps(dtype)·λ_max``: how well eigenvalues of ``K`` computed in ``dtype`` are known.

    Rounding ``K`` (or each product ``Kv``) perturbs it by a matrix of norm at most about
    ``size·eps·‖K‖``, and by Weyl's inequality each eigenvalue by as much (NumPy's
    ``matrix_rank(hermitian=True)`` tolerance). Eigenvalues below ``δ`` are not resolved.
    """
    return size * _eps(dtype) * max(float(lam_max), 0.0)


def rank_verdict(lam_min: float, error: float, tau_lambda: float) -> bool | None:
    """Is ``K`` singular? ``True`` iff ``λ_min + error ≤ τ_λ``; ``False`` iff
    ``λ_min − error > τ_λ``; ``None`` (unresolved) when the interval straddles ``τ_λ``.

    >>> rank_verdict(1.0, 0.1, 1e-20), rank_verdict(1e-12, 1e-9, 1e-20), rank_verdict(0.0, 0.0, 0.0)
    (False, None, True)
    """
    if lam_min + error <= tau_lambda:
        return True
    if lam_min - error > tau_lambda:
        return False
    return None


def structural_deficiency(
    x: Tensor, n: int, k: int, num_params: int, trace_outputs: bool
) -> str | None:
    """Why ``K`` is singular in exact arithmetic, or ``None``: no tolerance is needed for these.

    More rows than the Jacobian has columns (``nk > P``; ``n > kP`` for the trace kernel), or two
    identical inputs (a deterministic model gives them identical rows of ``J``).
    """
    rows, cols = (n, k * num_params) if trace_outputs else (n * k, num_params)
    if rows > cols:
        return f"{rows} kernel rows but the Jacobian has only {cols} columns: rank ≤ {cols}"
    if n > 1:
        flat = x.reshape(n, -1)
        if torch.unique(flat, dim=0).shape[0] < n:
            return "two inputs are identical: their rows of J coincide"
    return None


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NTKEigResult:
    """Extreme eigenvalues of an empirical NTK Gram with how far to trust them.

    Attributes:
        lambda_min: smallest eigenvalue (``0.0`` when ``singular``; the computed value, unclipped,
            when unresolved); ``None`` when not computed (Lanczos with ``which="largest"``).
        lambda_max: largest eigenvalue; ``None`` when not computed (Lanczos, ``"smallest"``).
        condition_number: ``λ_max/λ_min`` (``inf`` when singular; when ``λ_min`` is unresolved,
            the lower bound ``λ_max/(max(λ_min, 0) + δ)``), ``None`` unless both ends are known.
        eig: the :class:`~gdscope.linalg.EigResult` the numbers came from (raw values, residuals,
            convergence, cost). Dense results have exact-arithmetic residuals ``‖Kv − λv‖``.
        method: ``"dense"`` or ``"lanczos"``.
        lambda_min_is_upper_bound: ``λ_min`` is an unconverged Ritz value: the true ``λ_min`` is
            at most this (plus ``lambda_min_error``) and at least 0.
        lambda_max_is_lower_bound: ``λ_max`` is an unconverged Ritz value: the true one is larger.
        condition_number_is_lower_bound: the true condition number is at least the reported one.
        singular: ``True``: ``λ_min`` is zero by the shared rank rule (``λ_min + error ≤ τ_λ``, or
            exact structure); ``False``: certainly above ``τ_λ``; ``None``: not computed or
            unresolved (``note`` says why).
        lambda_min_residual: ``‖K v − λ_min v‖`` of the smallest Ritz pair (``None`` if unknown).
        lambda_max_residual: the same for the largest.
        tol: the relative Lanczos tolerance used (raised to ``10·eps(dtype)``).
        size: the kernel's side, ``n·k`` (``n`` with ``trace_outputs``).
        trace_outputs: whether the trace kernel (sum over outputs) was used.
        lambda_min_error: absolute error bound of ``λ_min``: the resolution ``δ`` of ``K`` in the
            model's dtype (plus the Lanczos residual); for ``lambda_min_source="svd"``,
            ``2σ_min e + e²`` with ``e = eps(dtype)·‖J‖_F``.
        rank_tol: ``τ_λ = τ_σ²`` of the shared rank rule (:func:`rank_tolerance`).
        resolution: ``δ`` (:func:`kernel_resolution`), the floor below which eigenvalues of this
            ``K`` are not resolved.
        lambda_min_source: ``"eigh"``, ``"lanczos"``, ``"svd"`` (float64 SVD of ``J``, because
            ``K`` could not resolve ``λ_min``) or ``"structure"`` (exactly singular).
        note: in words, why ``λ_min`` is unresolved / how the verdict was reached (``""`` if
            nothing to say).
    """

    lambda_min: float | None
    lambda_max: float | None
    condition_number: float | None
    eig: EigResult
    method: str
    lambda_min_is_upper_bound: bool
    lambda_max_is_lower_bound: bool
    condition_number_is_lower_bound: bool
    singular: bool | None
    lambda_min_residual: float | None
    lambda_max_residual: float | None
    tol: float
    size: int
    trace_outputs: bool
    lambda_min_error: float | None = None
    rank_tol: float | None = None
    resolution: float | None = None
    lambda_min_source: str | None = None
    note: str = ""

    @property
    def values(self) -> Tensor:
        """The eigenvalues as computed (unclipped), ordered as in :class:`EigResult`."""
        return self.eig.values

    @property
    def converged(self) -> bool:
        """Whether every requested eigenvalue is exact to ``tol`` (no bounds)."""
        return self.eig.converged

    @property
    def resolved(self) -> bool:
        """Whether the rank verdict is decided (``singular`` is ``True`` or ``False``)."""
        return self.singular is not None

    def __repr__(self) -> str:
        kernel = "trace kernel" if self.trace_outputs else "NTK Gram"
        parts = [f"{self.method}, {self.size}×{self.size} {kernel}"]
        if self.lambda_min is not None:
            err = self.lambda_min_error or 0.0
            if self.singular:
                parts.append(
                    f"λ_min = 0 (singular: {self.note or f'λ_min ≤ τ_λ = {self.rank_tol:.2e}'})"
                )
            elif self.lambda_min_is_upper_bound:
                # the Ritz value θ bounds λ_min of the computed K above; K's own λ_min is in
                # [0, θ + δ] (θ alone can be below 0 at round-off)
                parts.append(
                    f"λ_min ≤ {max(self.lambda_min + err, 0.0):.6g} (upper bound: Lanczos not "
                    f"converged; Ritz value {self.lambda_min:.6g}, residual "
                    f"{self.lambda_min_residual:.2e})"
                )
            elif self.singular is None:
                parts.append(
                    f"λ_min unresolved: computed {self.lambda_min:.6g}, true value in "
                    f"[0, {max(self.lambda_min, 0.0) + err:.3g}] ({self.note})"
                )
            else:
                src = self.lambda_min_source
                src = "" if src in ("eigh", "lanczos") else f", from {src}"
                parts.append(f"λ_min = {self.lambda_min:.6g} ± {err:.2g}{src}")
        if self.lambda_max is not None:
            if self.lambda_max_is_lower_bound:
                parts.append(
                    f"λ_max ≥ {self.lambda_max:.6g} (lower bound: Lanczos not converged, "
                    f"residual {self.lambda_max_residual:.2e})"
                )
            else:
                parts.append(f"λ_max = {self.lambda_max:.6g}")
        if self.condition_number is not None:
            if self.condition_number_is_lower_bound:
                parts.append(f"condition number ≥ {self.condition_number:.6g} (lower bound)")
            else:
                parts.append(f"condition number = {self.condition_number:.6g}")
        parts.append(f"{self.eig.matvecs} matvecs, {self.eig.seconds:.3g}s")
        return "NTKEigResult(" + "; ".join(parts) + ")"


def _model_inputs(model: nn.Module | ModelFunction, x: Tensor) -> tuple[ModelFunction, Tensor, int]:
    """Validated ``(fn, x, k)``: finite parameters and inputs, ``x`` on the model's device and
    dtype, ``k`` outputs per sample (the model is run on one sample: shape errors surface here).
    """
    if isinstance(model, ModelFunction):
        fn = model
        _check_model(model.model)  # train-mode BatchNorm / dropout
    elif isinstance(model, nn.Module):
        fn = _check_model(model)
    else:
        raise InvalidArgumentError(
            f"model must be a torch.nn.Module (or a ModelFunction), got {type(model).__name__}: "
            "pass the network itself."
        )
    check_finite_params(fn.model, fn.names)
    if isinstance(x, Tensor) and x.is_complex():
        raise InvalidArgumentError(f"x is complex ({x.dtype}); pass real inputs.")
    if isinstance(x, Tensor) and x.ndim > 0:
        check_finite(x, "x")
    xp = _prepare_inputs(fn, x)
    if xp.dtype != x.dtype:
        check_finite(xp, f"x (cast to the model's {fn.dtype})")
    _, k = _record(fn.model, fn, xp[:1])
    return fn, xp, k


def _dense_gram(model: nn.Module | ModelFunction, x: Tensor, trace_outputs: bool) -> Tensor:
    """The Gram by :func:`~gdscope.kernels.ntk.ntk`, as a float64 matrix.

    ``nk × nk`` sample-major (entry ``(i·k + a, j·k + b)``), or the ``n × n`` trace kernel.
    """
    net = model.model if isinstance(model, ModelFunction) else model
    K = ntk(net, x, trace_outputs=trace_outputs).to(torch.float64)
    if trace_outputs:
        return K
    n, n2, k, _ = K.shape
    return K.permute(0, 2, 1, 3).reshape(n * k, n2 * k)


def _dense_eig(K: Tensor, k: int, which: str, tol: float) -> tuple[EigResult, Tensor, Tensor]:
    """Dense ``eigh``; returns the result, all eigenvalues, and the residuals of both ends."""
    t0 = time.perf_counter()
    K = 0.5 * (K + K.T)
    evals, evecs = torch.linalg.eigh(K)
    size = K.shape[0]
    if which == "smallest":
        order = list(range(k))
    elif which == "largest":
        order = list(range(size - 1, size - 1 - k, -1))
    else:
        order = list(range(k)) + [i for i in range(size - k, size) if i >= k]
    idx = torch.tensor(order, device=K.device)
    vals, vecs = evals[idx], evecs[:, idx]
    res = torch.linalg.vector_norm(K @ vecs - vecs * vals, dim=0)
    ends = evecs[:, [0, size - 1]]
    res_ends = torch.linalg.vector_norm(K @ ends - ends * evals[[0, size - 1]], dim=0).cpu()
    eig = EigResult(
        values=vals,
        residuals=res,
        converged_mask=torch.ones(len(order), dtype=torch.bool, device=K.device),
        vectors=None,
        which=which,
        tol=tol,
        matvecs=0,
        seconds=time.perf_counter() - t0,
        norm_estimate=float(evals.abs().max()),
    )
    return eig, evals, res_ends


def jacobian_svdvals(fn: ModelFunction, x: Tensor, k: int, trace_outputs: bool = False) -> Tensor:
    """Singular values (descending, float64, on CPU) of ``J`` (``nk × P``), or of the trace
    kernel's factor ``[J_1 … J_k]`` (``n × kP``), from a float64 SVD of ``J`` computed in the
    model's dtype."""
    J = jacobian(fn, x).to(torch.float64)
    if trace_outputs:
        n = x.shape[0]
        J = J.reshape(n, k, -1).reshape(n, -1)
    return torch.linalg.svdvals(J).cpu()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def ntk_eigs(
    model: nn.Module | ModelFunction,
    x: Tensor,
    k: int = 1,
    which: str = "smallest",
    trace_outputs: bool = False,
    tol: float = 1e-8,
    dense_limit: int = 2000,
    max_matvecs: int | None = None,
    *,
    memory: int | None = None,
) -> NTKEigResult:
    """Extreme eigenvalues of the empirical NTK Gram ``K = J Jᵀ`` on ``x`` (THEORY §0–§1).

    Args:
        model: the network (trainable parameters, buffers fixed) or a :class:`ModelFunction`.
        x: inputs ``(n, ...)``.
        k: eigenvalues wanted (at each end for ``"both"``).
        which: ``"smallest"``, ``"largest"`` or ``"both"``.
        trace_outputs: use the ``n × n`` trace kernel ``Σ_a J_a J_aᵀ`` (sum over outputs).
        tol: relative Lanczos tolerance, residual ``‖Kv − θv‖ ≤ tol·λ_max``; raised to
            ``10·eps`` of the model's dtype. It does not decide singularity: that is the shared
            rank rule of the module docstring (``λ_min ± δ`` against ``τ_λ = τ_σ²`` with
            ``τ_σ = max(nk, P)·eps(dtype)·σ_max``, the rule :func:`gdscope.disparity` uses).
        dense_limit: form ``K`` and use float64 ``eigh`` when ``n·k <= dense_limit``
            (``0`` forces Lanczos).
        max_matvecs: Lanczos budget; if it runs out the result is flagged as bounds, never an
            error.
        memory: bytes allowed for the float64 Jacobian (``n·k·P·8``) with which the dense path
            decides a ``λ_min`` that ``K`` cannot resolve (default 1 GiB, as for
            :func:`gdscope.disparity`; ``0`` never forms ``J``).

    Returns:
        :class:`NTKEigResult`. The dense path always reports both ends (they come for free);
        Lanczos reports the ends it was asked for. ``singular`` is ``True``/``False`` only when
        decided, ``None`` when ``λ_min`` lies below the resolution of the computation (then
        ``note`` says so and what to do).

    For MSE, ``q·λ(K)`` are the nonzero eigenvalues of the Gauss–Newton matrix ``q JᵀJ``
    (THEORY §0), and ``q·λ_min(K)`` lower-bounds the PL ratio (§1).
    """
    if not isinstance(which, str) or which not in WHICH:
        raise InvalidArgumentError(f"which={which!r} is not supported: use one of {WHICH}.")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InvalidArgumentError(
            f"k={k!r} ({type(k).__name__}) must be a positive integer: pass k=1 or more."
        )
    if not isinstance(trace_outputs, bool):
        raise InvalidArgumentError(f"trace_outputs must be True or False, got {trace_outputs!r}.")
    if not (
        isinstance(tol, (int, float))
        and not isinstance(tol, bool)
        and math.isfinite(tol)
        and 0 < tol < 1
    ):
        raise InvalidArgumentError(f"tol={tol!r} must be a number in (0, 1), e.g. 1e-8.")
    if isinstance(dense_limit, bool) or not isinstance(dense_limit, int) or dense_limit < 0:
        raise InvalidArgumentError(
            f"dense_limit={dense_limit!r} must be a non-negative integer (0 forces Lanczos)."
        )
    if max_matvecs is not None and (
        isinstance(max_matvecs, bool) or not isinstance(max_matvecs, int) or max_matvecs < 1
    ):
        raise InvalidArgumentError(
            f"max_matvecs={max_matvecs!r} must be a positive integer (or None for the default)."
        )
    budget = DEFAULT_MEMORY if memory is None else memory
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise InvalidArgumentError(
            f"memory={memory!r} must be a non-negative integer number of bytes (or None for the "
            "default 1 GiB)."
        )
    fn, x, k_out = _model_inputs(model, x)
    n = x.shape[0]
    size = n if trace_outputs else n * k_out
    wanted = 2 * k if which == "both" else k
    if wanted > size:
        raise InvalidArgumentError(
            f"k={k} asks for {wanted} eigenvalues of a {size}×{size} kernel: "
            f"use k <= {size // 2 if which == 'both' else size}."
        )

    dtype, P = fn.dtype, fn.num_params
    rows, cols = (n, k_out * P) if trace_outputs else (n * k_out, P)
    tol = max(tol, 10 * _eps(dtype))
    if n * k_out <= dense_limit:
        method = "dense"
        eig, evals, res_ends = _dense_eig(_dense_gram(fn, x, trace_outputs), k, which, tol)
        lam_min, lam_max = float(evals[0]), float(evals[-1])
        res_min, res_max = float(res_ends[0]), float(res_ends[1])
        min_bound = max_bound = False
    else:
        method = "lanczos"
        op = ntk_operator(fn, x, trace_outputs=trace_outputs)
        # one guard eigenvalue at the smallest end (module docstring): k >= 2 makes Lanczos
        # verify by a deflated restart that no eigenvalue below the ones found was missed
        guard = which != "largest" and (2 * (k + 1) if which == "both" else k + 1) <= size
        kk = k + 1 if guard else k
        eig = lanczos(op, k=kk, which=which, tol=tol, max_matvecs=max_matvecs)
        if guard:
            eig = _drop_guard(eig, k, which)
        vals, res, conv = eig.values, eig.residuals, eig.converged_mask
        lam_min = lam_max = res_min = res_max = None
        min_bound = max_bound = False
        if which in ("smallest", "both"):
            # an unverified guard (budget spent) leaves λ_min only an upper bound
            unverified = guard and eig.multiplicity_resolved is False
            lam_min, res_min = float(vals[0]), float(res[0])
            min_bound = not bool(conv[0]) or unverified
        if which == "largest":
            lam_max, res_max, max_bound = float(vals[0]), float(res[0]), not bool(conv[0])
        elif which == "both":
            lam_max, res_max, max_bound = float(vals[-1]), float(res[-1]), not bool(conv[-1])

    # λ_max for the tolerances: computed, else Lanczos' norm estimate (≤ λ_max, so both
    # tolerances err small: towards "resolved" and "not singular")
    scale = max(lam_max if lam_max is not None else eig.norm_estimate, 0.0)
    tau = rank_tolerance(rows, cols, dtype, math.sqrt(scale)) ** 2
    delta = kernel_resolution(size, dtype, scale)
    singular: bool | None = None
    err: float | None = None
    source: str | None = None
    note = ""
    if lam_min is not None:
        source = "eigh" if method == "dense" else "lanczos"
        # an unconverged Ritz value bounds λ_min above only: [0, θ + δ]
        err = delta + (res_min if method == "lanczos" and not min_bound else 0.0)
        why = structural_deficiency(x, n, k_out, P, trace_outputs)
        if why is not None:
            singular, source, note = True, "structure", why
        elif min_bound:
            # only an upper bound: the true λ_min is in [0, θ + δ]
            singular = True if lam_min + delta <= tau else None
            if singular is None:
                note = "Lanczos did not converge: λ_min is only bounded above"
        else:
            singular = rank_verdict(lam_min, err, tau)
        if singular is None and method == "dense" and rows * cols * 8 <= budget:
            sv = jacobian_svdvals(fn, x, k_out, trace_outputs)
            smax = float(sv[0])
            tau_s = rank_tolerance(rows, cols, dtype, smax)
            smin = float(sv[rows - 1]) if rows <= cols else 0.0
            e = _eps(dtype) * float(torch.linalg.vector_norm(sv))  # eps·‖J‖_F
            lam_min, err, source = smin**2, 2 * smin * e + e * e, "svd"
            singular = smin <= tau_s
            note = (
                f"K in {_dtype_name(dtype)} resolves eigenvalues only to δ = {delta:.2e}; "
                f"decided by the float64 SVD of J: σ_min = {smin:.3e} "
                f"{'≤' if singular else '>'} τ_σ = {tau_s:.2e}"
            )
        elif singular is None and not note:
            floor = err
            what = (
                f"the {_dtype_name(dtype)} resolution floor {floor:.2e}"
                if method == "dense"
                else f"the {_dtype_name(dtype)} resolution {floor:.2e} of the matrix-free route "
                f"(δ = {delta:.2e} plus the Lanczos residual {res_min:.2e})"
            )
            fix = (
                "recompute in float64"
                if dtype != torch.float64
                else "lower tol, or use the dense route / gdscope.disparity (SVD of J)"
            )
            note = f"λ_min below {what}; {fix}"
        if singular:
            lam_min, min_bound = 0.0, False
        if singular is None and note:
            logger.info("ntk_eigs: %s", note)
    cond = None
    cond_bound = False
    if lam_min is not None and lam_max is not None:
        if singular:
            cond = math.inf
        elif singular is None:
            cond = lam_max / (max(lam_min, 0.0) + (err or 0.0)) if lam_max > 0 else math.inf
            cond_bound = math.isfinite(cond)
        else:
            cond = lam_max / lam_min
            cond_bound = min_bound or max_bound
    return NTKEigResult(
        lambda_min=lam_min,
        lambda_max=lam_max,
        condition_number=cond,
        eig=eig,
        method=method,
        lambda_min_is_upper_bound=min_bound,
        lambda_max_is_lower_bound=max_bound,
        condition_number_is_lower_bound=cond_bound,
        singular=singular,
        lambda_min_residual=res_min,
        lambda_max_residual=res_max,
        tol=float(tol),
        size=size,
        trace_outputs=trace_outputs,
        lambda_min_error=err,
        rank_tol=tau,
        resolution=delta,
        lambda_min_source=source,
        note=note,
    )


def _drop_guard(eig: EigResult, k: int, which: str) -> EigResult:
    """The Lanczos result without the guard eigenvalue (the ``k+1``-th smallest)."""
    m = eig.values.shape[0]
    keep = list(range(k)) if which == "smallest" else list(range(k)) + list(range(m - k, m))
    idx = torch.tensor(keep, device=eig.values.device)

    def pick(t: Tensor | None, dim: int = 0) -> Tensor | None:
        return None if t is None else t.index_select(dim, idx.to(t.device))

    return dataclasses.replace(
        eig,
        values=pick(eig.values),
        residuals=pick(eig.residuals),
        converged_mask=pick(eig.converged_mask),
        vectors=pick(eig.vectors, 1),
        residual_estimates=pick(eig.residual_estimates),
    )
