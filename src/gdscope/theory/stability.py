"""Linear stability of a minimum under GD, heavy ball, Nesterov, Adam and SGD (THEORY §3).

:func:`stability` measures, at the current parameters of a :class:`~gdscope.problem.Problem`
(meant to be at or near a minimum ``θ*``):

* **the mean / full batch.** Sharpness ``h_max = λ_max(∇²L)`` against the optimizer's threshold
  (GD ``2/η``, heavy ball ``2(1+β)/η``, Nesterov ``2(1+β)/((1+2β)η)``, Adam/AdamW: preconditioned
  sharpness ``λ_max(P⁻¹H)`` against ``(2 + 2β₁)/((1 − β₁)η)``), the number of eigenvalues above the
  threshold (Lanczos count loop, each separated from it by more than its residual), the top
  mode's per-step log rate ``mu_top`` (``log|1 − ηh_max|`` for GD; the log spectral radius of the
  mode's recursion with momentum), and whether a negative eigenvalue beyond ``flat_tol·h_max``
  makes this a saddle. GD-stable iff every normal eigenvalue lies in ``(0, threshold)``;
  eigenvalues within ``flat_tol·h_max`` of 0 are tangent to the manifold of minima.
* **SGD** (``batch_size`` given), batches drawn afresh without replacement at every step
  (:mod:`gdscope.theory.sgd_stability` has the process, the step matrices and the proofs):

  - *exact mean-square stability* ``ρ(T) ≤ 1`` for ``T(M) = E[A_ξ M A_ξᵀ]`` on the normal space,
    while ``P ≤ exact_limit``; without momentum also the threshold ``η*`` where ``ρ(T) = 1``
    (``2/λ_max(C^{-1/2} D C^{-1/2})``), Wu–Ma–E's value and threshold, and the non-uniformity;
  - *bounds* otherwise (no momentum): Wu–Ma–E's sufficient condition
    ``λ_max[(I − ηH)² + η² p Σ] ≤ 1`` (matrix-free Lanczos), the necessary condition
    ``h_max ≤ 2/η`` and the sharper necessary condition ``λ_max(T_k) ≤ 1``, ``T_k`` the compression
    of ``T`` to symmetric matrices on the top-``k`` Hessian eigenvectors (a Rayleigh–Ritz lower
    bound on ``ρ(T)``). Between the sufficient and the necessary condition the verdict is
    ``None``;
  - *Lyapunov exponents* (almost-sure behaviour of one run) with t-confidence intervals over
    independent chains: from a generic start in the normal space, and compressed to the stiff
    subspace of Hessian eigenvectors with ``ηh > stiff_cutoff``.

**Conventions.** ``Σ = (1/n) Σ_i H_i² − H² = (1/n) Σ_i (H_i − H)²`` is the covariance of the
per-sample Hessians (PSD); ``nonuniformity = √λ_max(Σ)`` (Wu, Ma & E's ``s``). ``p = (n −
B)/(B(n − 1))``. Per-sample Hessians are scaled so that their mean is ``∇²L`` (``n∇²ℓ_i`` for
reduction "sum"), and ``H_ξ`` is the unbiased mini-batch Hessian (see
:class:`~gdscope.theory.sgd_stability.SampleCurvature`).

**Verdicts** are ``True``, ``False`` or ``None`` ("undetermined": a solver did not converge, an
eigenvalue is within its residual of the threshold, a confidence interval contains 0, the
sufficient and necessary conditions disagree, or the analysis does not apply); ``notes`` says
which. Nothing undetermined is reported as a plain verdict.

**Near, not at, a minimum.** The analysis linearizes at a critical point. ``gradient_ratio =
‖∇L‖/(h_max‖θ‖)`` estimates the relative distance to one along the stiff directions (``‖θ − θ*‖ ≳
‖∇L‖/h_max``); above ``grad_tol`` a ``RuntimeWarning`` is issued and a note added.

>>> import torch; from torch import nn; import gdscope as gs
>>> X = torch.randn(24, 60, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
>>> model = nn.Linear(60, 1, bias=False).double()       # interpolating min-norm minimum
>>> _ = model.weight.data.copy_((torch.linalg.pinv(X) @ X[:, :1]).T)
>>> rep = stability(gs.Problem(model, "mse", (X, X[:, :1])), lr=0.05, batch_size=4)
>>> rep.gd_stable, rep.normal_dim, rep.sgd_mean_square_stable
(True, 24, True)
>>> unit = 2 / rep.sharpness                              # thresholds in units of 2/h_max
>>> round(rep.wu_ma_e_threshold / unit, 3), round(rep.mean_square_threshold / unit, 3)
(0.281, 0.317)
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from gdscope.curvature import curvature_operator
from gdscope.errors import InvalidArgumentError
from gdscope.kernels.ntk import default_memory
from gdscope.linalg import CallableOperator, lanczos
from gdscope.problem import Params, Problem
from gdscope.theory.optim import OptimizerSetting, optimizer_threshold, read_optimizer
from gdscope.theory.sgd_stability import (
    DENSE_SAMPLE_NUMBERS,
    LyapunovEstimate,
    NormalSpace,
    SampleCurvature,
    build_normal_space,
    lyapunov_estimate,
    lyapunov_hvp,
    mean_square_rho,
    mean_square_threshold,
    noise_factor,
    second_moment_matrix,
    wu_ma_e_reduced,
)

__all__ = ["StabilityReport", "optimizer_threshold", "stability"]

DENSE_SPECTRUM_LIMIT = 1500  # dense Hessian eigendecomposition up to this many parameters
RAYLEIGH_RITZ_K = 6  # top eigenvectors used for the necessary-condition lower bound on ρ(T)


# ---------------------------------------------------------------------- the report
@dataclass(frozen=True)
class StabilityReport:
    """What :func:`stability` found. ``None`` everywhere means "undetermined / not computed".

    Full batch: ``sharpness`` (``λ_max(∇²L)``; a Lanczos lower bound when not converged) with
    ``sharpness_residual``; ``threshold`` (the optimizer's; ``None`` for an optimizer without
    one); ``gd_stable``; ``mu_top`` (per-step log rate of the top mode: ``log|1 − ηh_max|``
    without momentum); ``count_above`` (eigenvalues above ``threshold``; of ``P⁻¹H`` for Adam);
    ``smallest`` and ``is_saddle``; ``gradient_norm`` and ``gradient_ratio``;
    ``preconditioned_sharpness`` (Adam/AdamW).

    SGD: ``noise_factor`` ``p``; ``sgd_mean_square_stable``; ``mean_square_rho`` (exact ``ρ(T)`` on
    the normal space) and its residual; ``mean_square_threshold`` (the ``lr`` where ``ρ(T) = 1``;
    exact path without momentum); ``mean_square_lower`` (Rayleigh–Ritz lower bound on ``ρ(T)``,
    bounds path); ``wu_ma_e`` (``λ_max[(I − ηH)² + η²pΣ]``: on the normal space in the exact path,
    on all of parameter space in the bounds path, where tangent directions contribute exactly 1),
    ``wu_ma_e_holds`` (the sufficient condition ``≤ 1``; ``False`` only says it fails) and
    ``wu_ma_e_threshold`` (largest ``lr`` where it holds; exact path); ``nonuniformity``
    (``√λ_max(Σ)``); ``normal_dim``; ``sgd_lyapunov`` / ``sgd_lyapunov_stiff`` with
    ``sgd_lyapunov_stable`` (from the first's interval) and ``stiff_cutoff``.

    ``method``, ``matvecs`` and ``seconds`` are per part ("spectrum", "smallest", "gradient",
    "normal_space", "mean_square", "bounds", "lyapunov", ...); ``matvecs`` counts
    Hessian-vector products of the operator that part uses (full batch, per sample or mini
    batch): a key ``<part>`` counts full-batch products, ``<part>_per_sample`` per-sample ones
    and ``lyapunov_mini_batch`` mini-batch ones (dense normal-space work counts none).
    """

    lr: float
    momentum: float
    nesterov: bool
    batch_size: int | None
    optimizer: str
    n: int
    num_params: int
    sharpness: float
    sharpness_residual: float
    threshold: float | None
    gd_stable: bool | None
    mu_top: float | None
    count_above: int | None
    smallest: float | None
    smallest_residual: float | None
    is_saddle: bool | None
    gradient_norm: float
    gradient_ratio: float
    preconditioned_sharpness: float | None = None
    noise_factor: float | None = None
    sgd_mean_square_stable: bool | None = None
    mean_square_rho: float | None = None
    mean_square_rho_residual: float | None = None
    mean_square_threshold: float | None = None
    mean_square_lower: float | None = None
    wu_ma_e: float | None = None
    wu_ma_e_holds: bool | None = None
    wu_ma_e_threshold: float | None = None
    nonuniformity: float | None = None
    normal_dim: int | None = None
    sgd_lyapunov: LyapunovEstimate | None = None
    sgd_lyapunov_stiff: LyapunovEstimate | None = None
    sgd_lyapunov_stable: bool | None = None
    stiff_cutoff: float = 0.1
    method: Mapping[str, str] = field(default_factory=dict)
    matvecs: Mapping[str, int] = field(default_factory=dict)
    seconds: Mapping[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Every field as JSON-ready data (Lyapunov estimates as dicts, non-finite floats None)."""
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}

    @property
    def total_seconds(self) -> float:
        return float(sum(self.seconds.values()))

    def __str__(self) -> str:
        def v(x: Any) -> str:
            if x is None:
                return "undetermined"
            if isinstance(x, float):
                return f"{x:.6g}"
            return str(x)

        lines = [
            f"stability at lr={self.lr:g} ({self.optimizer}, momentum={self.momentum:g}"
            f"{', nesterov' if self.nesterov else ''}, batch_size={self.batch_size}), "
            f"n={self.n}, P={self.num_params}",
            f"  sharpness {v(self.sharpness)} ± {self.sharpness_residual:.2g}, threshold "
            f"{v(self.threshold)}, GD-stable {v(self.gd_stable)}, mu_top {v(self.mu_top)}, "
            f"above threshold {v(self.count_above)}, saddle {v(self.is_saddle)}",
        ]
        if self.batch_size is not None:
            lines.append(
                f"  SGD (p={v(self.noise_factor)}): mean-square stable "
                f"{v(self.sgd_mean_square_stable)}, rho(T) {v(self.mean_square_rho)}, "
                f"threshold lr {v(self.mean_square_threshold)}, Wu-Ma-E {v(self.wu_ma_e)} "
                f"(holds {v(self.wu_ma_e_holds)}), nonuniformity {v(self.nonuniformity)}"
            )
            for name, est in (("", self.sgd_lyapunov), (" stiff", self.sgd_lyapunov_stiff)):
                if est is not None:
                    lines.append(
                        f"  Lyapunov{name}: {est.value:.4g} "
                        f"[{est.ci[0]:.4g}, {est.ci[1]:.4g}] ({est.chains} chains × {est.steps})"
                    )
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def _check_number(name: str, x: Any, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    ok = not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)
    if ok:
        ok = (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    if not ok:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise InvalidArgumentError(f"{name}={x!r} must be a finite number in {lb}{lo}, {hi}{rb}.")
    return float(x)


def _resolve_optimizer(
    prob: Problem, optimizer: Optimizer, lr: float | None, momentum: float, nesterov: bool
) -> OptimizerSetting:
    """The optimizer adapter's reading (:func:`gdscope.theory.optim.read_optimizer`)."""
    if not isinstance(optimizer, Optimizer):
        raise InvalidArgumentError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )
    if momentum != 0 or nesterov:
        raise InvalidArgumentError(
            "pass either optimizer= or momentum/nesterov, not both: with an optimizer its own "
            "settings are analysed."
        )
    opt_lr = float(optimizer.param_groups[0]["lr"])
    if lr is not None and not math.isclose(float(lr), opt_lr, rel_tol=1e-12):
        raise InvalidArgumentError(
            f"lr={lr!r} differs from the optimizer's lr={opt_lr!r}: pass lr=None (or the "
            "optimizer's value) to analyse the optimizer."
        )
    named = dict(prob.model.named_parameters())
    st = read_optimizer(optimizer, [named[n] for n in prob.names], prob.names)
    if st.precond is not None:
        st.precond = st.precond.to(prob.device, prob.dtype)
    return st


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


# ---------------------------------------------------------------------- the entry point
def stability(
    prob: Problem,
    lr: float | None,
    momentum: float = 0.0,
    nesterov: bool = False,
    batch_size: int | None = None,
    *,
    tol: float = 1e-6,
    exact_limit: int = 10_000,
    chains: int = 8,
    lyapunov_steps: int = 400,
    burn_in: int | None = None,
    seed: int = 0,
    optimizer: Optimizer | None = None,
    params: Params | None = None,
    flat_tol: float | None = None,
    grad_tol: float = 1e-3,
    stiff_cutoff: float = 0.1,
    max_count: int = 64,
    dense_limit: int = DENSE_SPECTRUM_LIMIT,
) -> StabilityReport:
    """Linear stability of the minimum at ``params`` (default: the current parameters).

    Args:
        prob: the problem; SGD parts need ``(X, Y)`` tensor data.
        lr: step size ``η > 0`` (``None`` with ``optimizer``: the optimizer's).
        momentum, nesterov: heavy ball / Nesterov ``β ∈ [0, 1)`` (PyTorch's ``SGD`` convention;
            ``nesterov`` with ``momentum=0`` is plain GD).
        batch_size: ``B ∈ [1, n]`` to analyse SGD with fresh batches; ``None``: full batch only.
        tol: relative residual of every Lanczos solve (no tighter than the dtype allows).
        exact_limit: exact mean-square analysis while ``P ≤ exact_limit`` and the reduced
            per-sample Hessians (``n·r²`` numbers, ``r`` the normal dimension) fit in
            ``exact_limit²`` numbers; beyond, the bounds (with a note).
        chains, lyapunov_steps, burn_in: Lyapunov chains, averaged steps per chain and discarded
            initial steps (default ``lyapunov_steps // 4``).
        seed: Lanczos starts, Lyapunov batches and start vectors.
        optimizer: a ``torch.optim`` optimizer whose settings are analysed (Adam/AdamW: the
            preconditioned sharpness from its ``exp_avg_sq`` state; ``SGD``; gdscope's ``GD``,
            ``HeavyBall``, ``Nesterov``).
        flat_tol: eigenvalues (and RMS per-sample curvatures) below ``flat_tol·max`` are tangent
            or neutral (default ``max(1e-6, 1e3·eps, 4·tol)``, ``tol`` after its dtype floor
            ``10·√P·eps``: about 1.5e-3 for a float32 model with 10⁵ parameters).
        grad_tol: warn when ``‖∇L‖/(h_max‖θ‖)`` exceeds it.
        stiff_cutoff: the stiff subspace is spanned by Hessian eigenvectors with ``ηh >
            stiff_cutoff`` (at most ``max_count`` of them).
        max_count: most eigenvalues resolved by the Lanczos count loop.
        dense_limit: dense Hessian eigendecomposition up to this many parameters.

    Raises:
        InvalidArgumentError: ``lr <= 0``, ``momentum ∉ [0, 1)``, ``batch_size ∉ [1, n]``, bad
            tolerances or chain counts, an ``optimizer`` together with ``momentum``.
    """
    if not isinstance(prob, Problem):
        raise InvalidArgumentError(f"prob must be a gdscope Problem, got {type(prob).__name__}.")
    if optimizer is not None:
        st = _resolve_optimizer(prob, optimizer, lr, momentum, nesterov)
    else:
        if lr is None:
            raise InvalidArgumentError("lr is required (lr=None only with an optimizer).")
        lr_ = _check_number("lr", lr, 0.0, math.inf, True, True)
        mom = _check_number("momentum", momentum, 0.0, 1.0, False, True)
        if not isinstance(nesterov, bool):
            raise InvalidArgumentError(f"nesterov={nesterov!r} must be True or False.")
        kind = "gd" if mom == 0 else ("nesterov" if nesterov else "heavy_ball")
        nest_ = bool(nesterov and mom > 0)
        st = OptimizerSetting(kind, lr_, mom, nest_, (lr_, mom, nest_), sgd_ok=True)
        st.threshold = optimizer_threshold(lr_, mom, nest_)
        if nesterov and mom == 0:
            st.notes.append("nesterov=True with momentum=0 is plain GD")
    if not (math.isfinite(st.lr) and st.lr > 0):
        raise InvalidArgumentError(f"lr={st.lr!r} must be a positive finite step size.")
    n, P = prob.n, prob.num_params
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n
    ):
        raise InvalidArgumentError(
            f"batch_size={batch_size!r} must be an integer in [1, n={n}] (or None for full batch)."
        )
    _check_number("tol", tol, 0.0, 1.0, True, True)
    for name, val, lo in (
        ("chains", chains, 2),
        ("lyapunov_steps", lyapunov_steps, 1),
        ("exact_limit", exact_limit, 1),
        ("max_count", max_count, 1),
    ):
        if isinstance(val, bool) or not isinstance(val, int) or val < lo:
            raise InvalidArgumentError(f"{name}={val!r} must be an integer >= {lo}.")
    if burn_in is None:
        burn_in = lyapunov_steps // 4
    if isinstance(burn_in, bool) or not isinstance(burn_in, int) or burn_in < 0:
        raise InvalidArgumentError(f"burn_in={burn_in!r} must be a non-negative integer.")
    _check_number("grad_tol", grad_tol, 0.0, math.inf, True, True)
    _check_number("stiff_cutoff", stiff_cutoff, 0.0, math.inf, False, True)
    eps = torch.finfo(prob.dtype).eps
    tol = max(tol, 10 * math.sqrt(P) * eps)  # no tighter than the dtype can resolve
    if flat_tol is None:  # above the residuals the saddle test can reach
        flat_tol = max(1e-6, 1e3 * eps, 4 * tol)
    _check_number("flat_tol", flat_tol, 0.0, 1.0, True, True)

    notes = list(st.notes)
    method: dict[str, str] = {}
    matvecs: dict[str, int] = {}
    seconds: dict[str, float] = {}
    lr, mom, nest = st.lr, st.momentum, st.nesterov
    pre = st.preconditioned
    # the recursion's step (lr·(1−dampening) for damped heavy ball); lr for the SGD parts' cutoff
    eta = st.lr if pre else st.lr_step

    # ------------------------------------------------------------------ operator, gradient
    t0 = time.perf_counter()
    op = curvature_operator(prob, "hessian", params=params)
    snap = {k: (prob.params if params is None else params)[k].detach() for k in prob.names}
    g = prob.gradient(snap)
    grad_norm = torch.linalg.vector_norm(g).item()
    theta_norm = torch.linalg.vector_norm(prob.flatten(snap)).item()
    seconds["gradient"] = time.perf_counter() - t0
    method["gradient"] = "full-batch gradient"

    # thresholds
    thr = st.threshold
    thr_h = None if pre else thr  # threshold on λ(H) itself
    bar = stiff_cutoff / eta if batch_size is not None and stiff_cutoff > 0 else None

    # ------------------------------------------------------------------ spectrum of H
    t0 = time.perf_counter()
    start = op.matvecs
    dense_vals = None
    if dense_limit >= P:
        spec, dense_vals = _dense_spectrum(op, thr_h)
    else:
        spec = _lanczos_spectrum(op, thr_h, bar, tol, max_count, seed)
    if spec.note:
        notes.append(f"spectrum: {spec.note}")
    sharp = spec.values[0].item()
    sharp_res = spec.residuals[0].item() if spec.converged else math.inf
    matvecs["spectrum"] = op.matvecs - start
    method["spectrum"] = spec.method + " of the full-batch Hessian"
    seconds["spectrum"] = time.perf_counter() - t0

    # smallest eigenvalue: is this a saddle?
    t0 = time.perf_counter()
    start = op.matvecs
    if dense_vals is not None:
        smallest, small_res, small_conv = dense_vals[0].item(), spec.residuals[0].item(), True
        method["smallest"] = "dense eigh"
    else:
        tol_s = max(tol, flat_tol / 4)  # residual ≤ flat_tol/4·‖H‖: decisive for the saddle
        rs = lanczos(op, 1, "smallest", tol_s, seed=seed + 1, max_matvecs=1000)
        smallest, small_res, small_conv = (
            rs.values[0].item(),
            rs.residuals[0].item(),
            rs.converged,
        )
        method["smallest"] = f"Lanczos (smallest, tol {tol_s:g})"
    matvecs["smallest"] = op.matvecs - start
    seconds["smallest"] = time.perf_counter() - t0
    scale = max(abs(sharp), abs(smallest))
    neg_margin = flat_tol * scale
    if smallest < -neg_margin - (small_res if small_conv else 0.0):
        is_saddle: bool | None = True
        notes.append(
            f"not a minimum: the Hessian has the eigenvalue {smallest:.4g} < -{neg_margin:.2g} "
            "(flat_tol·scale); GD and SGD leave along it for every lr"
        )
    elif small_conv and smallest - small_res >= -neg_margin:
        is_saddle = False
    else:
        is_saddle = None
        notes.append("the smallest Hessian eigenvalue did not converge: saddle undetermined")

    # gradient check
    denom = abs(sharp) * theta_norm
    grad_ratio = grad_norm / denom if denom > 0 else (0.0 if grad_norm == 0 else math.inf)
    if grad_ratio > grad_tol:
        msg = (
            f"‖∇L‖ = {grad_norm:.3g} is large for a minimum: ‖∇L‖/(h_max‖θ‖) = {grad_ratio:.3g} > "
            f"grad_tol = {grad_tol:g}; the analysis linearizes at a critical point, so its "
            "verdicts describe the quadratic model here, not necessarily the dynamics"
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        notes.append(msg)

    # ------------------------------------------------------------------ GD verdict
    pre_sharp = None
    count = spec.count
    top, top_res, top_conv = sharp, sharp_res, spec.converged
    if pre and st.precond is not None:
        t0 = time.perf_counter()
        d_isq = st.precond.rsqrt()
        wd = st.weight_decay

        def pre_mv(v: Tensor) -> Tensor:
            u = d_isq * v
            return d_isq * (op.matvec(u) + wd * u)

        pop = CallableOperator(pre_mv, P, prob.dtype, prob.device)
        pspec = _lanczos_spectrum(pop, thr, None, tol, max_count, seed)
        pre_sharp = pspec.values[0].item()
        top = pre_sharp
        top_res = pspec.residuals[0].item() if pspec.converged else math.inf
        top_conv = pspec.converged
        count = pspec.count
        if pspec.note:
            notes.append(f"preconditioned spectrum: {pspec.note}")
        matvecs["preconditioned"] = pop.matvecs
        method["preconditioned"] = pspec.method + " of P^{-1/2} H P^{-1/2}"
        seconds["preconditioned"] = time.perf_counter() - t0
    elif pre or thr is None:
        count = None
    gd_stable: bool | None
    round_off = 10 * P * eps * max(abs(top), 1e-300)
    shift = 0.0 if pre else st.weight_decay
    if is_saddle:
        gd_stable = False
    elif thr is None or (pre and st.precond is None):
        gd_stable = None
    elif top > thr + round_off:  # a Ritz value is a lower bound on λ_max
        gd_stable = False
    elif top_conv and top + top_res < thr and is_saddle is False:
        gd_stable = True
    else:
        gd_stable = None
        if is_saddle is False:
            notes.append("sharpness is within its residual of the threshold: GD undetermined")
    if st.family == "none" or thr is None:
        mu_top = None
    elif pre:
        mu_top = st.mode_rate(top) if pre_sharp is not None else None
    else:
        mu_top = st.mode_rate(sharp + shift)

    report: dict[str, Any] = {
        "lr": lr,
        "momentum": mom,
        "nesterov": nest,
        "batch_size": batch_size,
        "optimizer": st.family if optimizer is None else type(optimizer).__name__,
        "n": n,
        "num_params": P,
        "sharpness": sharp,
        "sharpness_residual": sharp_res,
        "threshold": thr,
        "gd_stable": gd_stable,
        "mu_top": mu_top,
        "count_above": count,
        "smallest": smallest,
        "smallest_residual": small_res if small_conv else math.inf,
        "is_saddle": is_saddle,
        "gradient_norm": grad_norm,
        "gradient_ratio": grad_ratio,
        "preconditioned_sharpness": pre_sharp,
        "stiff_cutoff": stiff_cutoff,
    }

    # ------------------------------------------------------------------ SGD
    if batch_size is not None:
        why = None
        sgd_prob = prob
        coupled = _batch_coupled(prob)
        if pre:
            why = (
                f"the SGD analysis is for SGD; a mini-batch {st.family} analysis is not implemented"
            )
        elif not st.sgd_ok:
            why = "the SGD analysis does not cover this optimizer's settings (see notes)"
        elif coupled:
            why = (
                f"modules {coupled} are train-mode BatchNorm (allow_stateful=True): they couple "
                "the samples of a batch through batch statistics, so the loss is not a mean of "
                "per-sample losses and the SGD analysis (per-sample Hessians) does not apply. "
                "Call model.eval() to analyse the inference-mode network"
            )
        elif prob.full_batch is None:
            sgd_prob, why = _materialize(prob)
            if why is None:
                notes.append(
                    f"SGD parts: the DataLoader's {prob.n} samples were gathered into tensors "
                    "for the per-sample Hessians"
                )
        if why is not None:
            notes.append(f"SGD parts undetermined: {why}")
            warnings.warn(
                f"stability(batch_size={batch_size}): the SGD parts are not computed (None in "
                f"the report): {why}.",
                RuntimeWarning,
                stacklevel=2,
            )
        else:
            report.update(
                _sgd_parts(
                    sgd_prob,
                    op,
                    snap,
                    spec,
                    eta,
                    mom,
                    nest,
                    batch_size,
                    gd_stable,
                    is_saddle,
                    tol,
                    exact_limit,
                    chains,
                    lyapunov_steps,
                    burn_in,
                    seed,
                    flat_tol,
                    stiff_cutoff,
                    notes,
                    method,
                    matvecs,
                    seconds,
                )
            )
    return StabilityReport(
        **report, method=method, matvecs=matvecs, seconds=seconds, notes=tuple(notes)
    )


# ---------------------------------------------------------------------- SGD parts
def _batch_coupled(prob: Problem) -> list[str]:
    """Names of train-mode BatchNorm modules (they couple the samples of a batch)."""
    return [
        name or type(prob.model).__name__
        for name, m in prob.model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]


def _materialize(prob: Problem) -> tuple[Problem, str | None]:
    """A tensor-data copy of a DataLoader problem, or the reason it cannot be made cheaply.

    The batches are gathered (on the problem's device, in its dtype) while they fit in half of
    the default memory budget (:func:`gdscope.kernels.ntk.default_memory`).
    """
    budget = default_memory(prob.device) // 2
    xs: list[Tensor] = []
    ys: list[Tensor] = []
    used = 0
    for x, y, _ in prob.batches():
        used += x.numel() * x.element_size() + y.numel() * y.element_size()
        if used > budget:
            return prob, (
                f"the DataLoader's data exceed {budget / 1e9:.3g} GB (half the memory budget), "
                "so they are not gathered into tensors for per-sample Hessians: pass (X, Y) "
                "tensors of a subset to analyse SGD"
            )
        xs.append(x.detach())
        ys.append(y.detach())
    try:
        X, Y = torch.cat(xs), torch.cat(ys)
    except RuntimeError as e:
        return prob, f"the DataLoader's batches cannot be joined into tensors ({e})"
    tensor_prob = Problem(
        prob.model,
        prob._loss_arg,  # the loss exactly as the user gave it (Problem.subset does the same)
        (X, Y),
        reduction=prob.reduction,
        device=prob.device,
        dtype=prob.dtype,
        allow_stateful=prob.allow_stateful,
    )
    if tensor_prob.n != prob.n:
        return prob, (
            f"the DataLoader yielded {tensor_prob.n} samples now but {prob.n} before (is it "
            "random?)"
        )
    return tensor_prob, None


def _verdict_from_rho(rho: float, res: float, converged: bool, margin: float) -> bool | None:
    if rho > 1 + margin:  # a Ritz value is a lower bound: unstable even if not converged
        return False
    if converged and rho + res + margin < 1:
        return True
    return None


def _sgd_parts(
    prob: Problem,
    op: CallableOperator,
    params: Params,
    spec: _Spectrum,
    eta: float,
    mom: float,
    nest: bool,
    B: int,
    gd_stable: bool | None,
    is_saddle: bool | None,
    tol: float,
    exact_limit: int,
    chains: int,
    steps: int,
    burn_in: int,
    seed: int,
    flat_tol: float,
    cutoff: float,
    notes: list[str],
    method: dict[str, str],
    matvecs: dict[str, int],
    seconds: dict[str, float],
) -> dict[str, Any]:
    n, P = prob.n, prob.num_params
    eps = torch.finfo(prob.dtype).eps
    p = noise_factor(n, B)
    out: dict[str, Any] = {"noise_factor": p}
    curv = SampleCurvature(prob, params)

    # ------------------------------------------------------------------ exact path
    space: NormalSpace | None = None
    if exact_limit >= P:
        t0 = time.perf_counter()
        s_op, s_curv = op.matvecs, curv.hvps
        built = build_normal_space(
            curv,
            op.matvec,
            flat_tol,
            dense_numbers=DENSE_SAMPLE_NUMBERS,
            max_numbers=exact_limit**2,
            seed=seed,
        )
        seconds["normal_space"] = time.perf_counter() - t0
        matvecs["normal_space"] = op.matvecs - s_op
        matvecs["normal_space_per_sample"] = curv.hvps - s_curv
        cons_tol = max(1e-8, 1e4 * eps)
        leak_tol = max(10 * flat_tol, 1e3 * eps)
        if isinstance(built, str):
            notes.append(f"exact mean-square analysis skipped: {built}; bounds instead")
        elif built.consistency > cons_tol:
            notes.append(
                f"the per-sample Hessians do not average to ∇²L (relative error "
                f"{built.consistency:.2g}): is the loss a mean (or sum) of per-sample losses? "
                "SGD parts undetermined"
            )
            return out
        elif built.leak > leak_tol:
            notes.append(
                f"per-sample Hessians act outside range(H) (relative {built.leak:.2g} > "
                f"{leak_tol:.2g}): exact analysis on range(H) would be incomplete; bounds instead"
            )
        else:
            space = built
            method["normal_space"] = built.method
    else:
        notes.append(
            f"P = {P} > exact_limit = {exact_limit}: mean-square stability from the Wu–Ma–E "
            "(sufficient) and necessary conditions instead of the exact ρ(T)"
        )

    if space is not None:
        out.update(
            _exact_parts(space, eta, mom, nest, B, tol, seed, notes, method, matvecs, seconds)
        )
        if gd_stable is False and out.get("sgd_mean_square_stable") is True:
            notes.append("inconsistent: GD-unstable but mean-square stable (check tolerances)")
        # Lyapunov in the normal space, dense r×r per-sample curvature
        t0 = time.perf_counter()
        lyap = lyapunov_estimate(
            space.hessians,
            eta,
            B,
            momentum=mom,
            nesterov=nest,
            chains=chains,
            steps=steps,
            burn_in=burn_in,
            seed=seed,
        )
        coords = torch.nonzero(eta * space.h > cutoff).flatten()
        stiff = None
        if coords.numel():
            stiff = lyapunov_estimate(
                space.hessians,
                eta,
                B,
                momentum=mom,
                nesterov=nest,
                coords=coords,
                chains=chains,
                steps=steps,
                burn_in=burn_in,
                seed=seed + 1,
                subspace="stiff",
            )
        else:
            notes.append(f"no Hessian eigenvalue has ηh > stiff_cutoff = {cutoff:g}")
        seconds["lyapunov"] = time.perf_counter() - t0
        matvecs["lyapunov"] = 0
        method["lyapunov"] = lyap.method
    else:
        out.update(
            _bound_parts(
                prob,
                op,
                curv,
                spec,
                eta,
                mom,
                B,
                p,
                gd_stable,
                is_saddle,
                tol,
                seed,
                notes,
                method,
                matvecs,
                seconds,
            )
        )
        # Lyapunov by mini-batch HVPs
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(seed + 7)
        Z = torch.randn(P, chains, generator=gen, dtype=torch.float64).to(prob.device, prob.dtype)
        s_op = op.matvecs
        starts = [op.matmat(Z).T]  # H z: in range(H), generic there
        projectors: list[Tensor | None] = [None]
        labels = ["normal"]
        if spec.vectors is not None:
            sel = torch.nonzero(eta * spec.values > cutoff).flatten()
            if sel.numel():
                U = spec.vectors[:, sel.to(spec.vectors.device)].to(prob.device, prob.dtype)
                starts.append(torch.randn(chains, P, generator=gen, dtype=torch.float64).to(U))
                projectors.append(U)
                labels.append("stiff")
                if spec.values[-1].item() * eta > cutoff and sel.numel() < P:
                    notes.append(
                        f"stiff subspace truncated to the top {sel.numel()} eigenvectors (more "
                        f"have ηh > {cutoff:g}; raise max_count)"
                    )
            else:
                notes.append(f"no Hessian eigenvalue has ηh > stiff_cutoff = {cutoff:g}")
        s_curv = curv.hvps
        ests = lyapunov_hvp(
            curv,
            eta,
            B,
            torch.stack(starts),
            momentum=mom,
            nesterov=nest,
            projectors=projectors,
            labels=labels,
            chains=chains,
            steps=steps,
            burn_in=burn_in,
            seed=seed,
        )
        lyap = ests[0]
        stiff = ests[1] if len(ests) > 1 else None
        seconds["lyapunov"] = time.perf_counter() - t0
        matvecs["lyapunov_mini_batch"] = curv.hvps - s_curv
        matvecs["lyapunov"] = op.matvecs - s_op
        method["lyapunov"] = (
            f"{lyap.method}; normal start H·z; stiff = top eigenvectors with ηh > {cutoff:g}"
        )
        if prob.dtype != torch.float64:
            notes.append(
                "Lyapunov in float32: round-off feeds neutral directions, biasing the normal-"
                "space exponent toward 0 from below"
            )
    out["sgd_lyapunov"] = lyap
    out["sgd_lyapunov_stiff"] = stiff
    out["sgd_lyapunov_stable"] = {-1: True, 1: False}.get(lyap.sign)  # type: ignore[arg-type]
    if lyap.sign is None:
        notes.append(
            f"Lyapunov exponent {lyap.value:.3g}: its interval [{lyap.ci[0]:.3g}, "
            f"{lyap.ci[1]:.3g}] contains 0, almost-sure stability undetermined (more chains or "
            "steps)"
        )
    return out


def _exact_parts(
    space: NormalSpace,
    eta: float,
    mom: float,
    nest: bool,
    B: int,
    tol: float,
    seed: int,
    notes: list[str],
    method: dict[str, str],
    matvecs: dict[str, int],
    seconds: dict[str, float],
) -> dict[str, Any]:
    out: dict[str, Any] = {"normal_dim": space.dim}
    if space.dim == 0:
        notes.append("every per-sample Hessian vanishes (to flat_tol): all directions neutral")
        return out
    t0 = time.perf_counter()
    rho = mean_square_rho(space, eta, B, mom, nest, tol=min(tol, 1e-10), seed=seed)
    margin = 1e3 * torch.finfo(torch.float64).eps * space.dim**2
    out["mean_square_rho"] = rho.value
    out["mean_square_rho_residual"] = rho.residual
    out["sgd_mean_square_stable"] = _verdict_from_rho(
        rho.value, rho.residual, rho.converged, margin
    )
    if out["sgd_mean_square_stable"] is None:
        notes.append(
            f"ρ(T) = {rho.value:.10g} ± {rho.residual:.2g} is not separated from 1: "
            "mean-square stability undetermined"
        )
    applied = f" ({rho.matvecs} applications of T)" if rho.matvecs else ""
    method["mean_square"] = f"exact ρ(T) on the {space.dim}-dim normal space: {rho.method}{applied}"
    matvecs["mean_square"] = 0  # dense work on the reduced per-sample Hessians: no HVPs
    if mom == 0:
        thr = mean_square_threshold(space, B, tol=min(tol, 1e-10), seed=seed)
        if thr is None:
            notes.append(
                "H is not positive definite on the span of the per-sample Hessians: no "
                "mean-square threshold (noise along zero-mean-curvature directions)"
            )
        elif thr.converged:
            out["mean_square_threshold"] = thr.value
        value, wthr, sig = wu_ma_e_reduced(space, eta, B)
        out["wu_ma_e"] = value
        out["wu_ma_e_threshold"] = wthr
        out["nonuniformity"] = math.sqrt(max(sig, 0.0))
        out["wu_ma_e_holds"] = _verdict_from_rho(value, 0.0, True, margin)
        method["bounds"] = "dense on the normal space"
    else:
        notes.append(
            "with momentum: exact ρ(T) of the pair (e, d) only; no step-size threshold and no "
            "Wu–Ma–E bound (they are for plain SGD)"
        )
    seconds["mean_square"] = time.perf_counter() - t0
    return out


def _bound_parts(
    prob: Problem,
    op: CallableOperator,
    curv: SampleCurvature,
    spec: _Spectrum,
    eta: float,
    mom: float,
    B: int,
    p: float,
    gd_stable: bool | None,
    is_saddle: bool | None,
    tol: float,
    seed: int,
    notes: list[str],
    method: dict[str, str],
    matvecs: dict[str, int],
    seconds: dict[str, float],
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if mom != 0:
        notes.append(
            "SGD with momentum beyond the exact limit: mean-square stability undetermined "
            "(the pair (θ_t, θ_{t−1}) has no Wu–Ma–E bound); Lyapunov exponents still estimated"
        )
        return out
    P = prob.num_params
    t0 = time.perf_counter()
    s_op, s_curv = op.matvecs, curv.hvps

    # consistency of the per-sample decomposition
    gen = torch.Generator().manual_seed(seed + 3)
    v = torch.randn(P, generator=gen, dtype=torch.float64).to(prob.device, prob.dtype)
    hv = op.matvec(v)
    rel = (torch.linalg.vector_norm(curv.mean_matvec(v) - hv) / hv.norm()).item()
    if rel > max(1e-8, 1e4 * torch.finfo(prob.dtype).eps):
        notes.append(
            f"the per-sample Hessians do not average to ∇²L (relative error {rel:.2g}): SGD "
            "bounds undetermined"
        )
        return out

    def wme(v: Tensor) -> Tensor:  # (I − ηH)² + η²pΣ − I = −2ηH + η²[(1−p)H² + p S2]
        h1 = op.matvec(v)
        h2 = op.matvec(h1)
        s2 = curv.mean_square_matvec(v) if p else torch.zeros_like(v)
        return -2 * eta * h1 + eta * eta * ((1 - p) * h2 + p * s2)

    def sigma(v: Tensor) -> Tensor:
        return curv.mean_square_matvec(v) - op.matvec(op.matvec(v))

    budget = 300
    wop = CallableOperator(wme, P, prob.dtype, prob.device)
    rw = lanczos(wop, 1, "largest", tol, seed=seed, max_matvecs=budget)
    a_top = rw.values[0].item()
    a_tol = tol * rw.norm_estimate + 10 * P * torch.finfo(prob.dtype).eps * rw.norm_estimate
    out["wu_ma_e"] = 1.0 + a_top
    if a_top > a_tol:
        out["wu_ma_e_holds"] = False
    elif rw.converged:
        out["wu_ma_e_holds"] = True
    else:
        out["wu_ma_e_holds"] = None
        notes.append(f"Wu–Ma–E Lanczos did not converge in {budget} products: undetermined")
    sop = CallableOperator(sigma, P, prob.dtype, prob.device)
    rs = lanczos(sop, 1, "largest", max(tol, 1e-4), seed=seed, max_matvecs=budget)
    if rs.converged:
        out["nonuniformity"] = math.sqrt(max(rs.values[0].item(), 0.0))
    else:
        notes.append("non-uniformity Lanczos did not converge: value undetermined")

    # necessary condition: Rayleigh–Ritz lower bound on ρ(T) on the top eigenvectors
    lower = None
    if spec.vectors is not None:
        k = min(RAYLEIGH_RITZ_K, int((spec.values > 0).sum()))
        if k:
            U = spec.vectors[:, :k].to(prob.device, prob.dtype)
            U, _ = torch.linalg.qr(U)
            Hk = curv.compress(U).double()
            T = second_moment_matrix(0.5 * (Hk + Hk.transpose(1, 2)), eta, B)
            lower = torch.linalg.eigvalsh(0.5 * (T + T.T))[-1].item()
            out["mean_square_lower"] = lower
    seconds["bounds"] = time.perf_counter() - t0
    matvecs["bounds"] = op.matvecs - s_op
    matvecs["bounds_per_sample"] = curv.hvps - s_curv
    method["bounds"] = (
        f"Lanczos on (I − ηH)² + η²pΣ − I and on Σ (full-batch + per-sample HVPs, "
        f"≤ {budget} products each); Rayleigh–Ritz of T on the top-{RAYLEIGH_RITZ_K} "
        "eigenvectors"
    )
    margin = 1e3 * torch.finfo(torch.float64).eps
    if is_saddle or gd_stable is False:
        verdict: bool | None = False
        notes.append(
            "mean-square unstable: the necessary condition (GD stability of the mean) fails"
        )
    elif lower is not None and lower > 1 + margin:
        verdict = False
        notes.append(
            f"mean-square unstable: ρ(T) ≥ {lower:.6g} > 1 (Rayleigh–Ritz on the top eigenvectors)"
        )
    elif out.get("wu_ma_e_holds") is True and is_saddle is False:
        verdict = True
    else:
        verdict = None
        notes.append(
            "mean-square stability undetermined: between the sufficient (Wu–Ma–E) and the "
            "necessary conditions"
        )
    out["sgd_mean_square_stable"] = verdict
    return out
