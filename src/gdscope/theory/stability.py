"""Linear stability of a minimum under GD, heavy ball, Nesterov, Adam and SGD (THEORY §3).

:func:`stability` measures, at the current parameters of a :class:`~gdscope.problem.Problem`
(meant to be at or near a minimum ``θ*``):

* **the mean / full batch.** Sharpness ``h_max = λ_max(∇²L)`` against the optimizer's threshold (GD
  ``2/η``, heavy ball ``2(1+β)/η``, Nesterov ``2(1+β)/((1+2β)η)``; Adam/AdamW, RMSprop, Adagrad:
  preconditioned sharpness ``λ_max(P^{-1/2}HP^{-1/2})`` against ``(2 + 2β₁)/((1 − β₁)η)``, ``2/η``
  (``2(1+μ)/η``), ``2/η_t``: :mod:`gdscope.theory.optim`), the number of eigenvalues above the
  threshold (Lanczos count loop, each separated from it by more than its residual), the top mode's
  per-step log rate ``mu_top`` (``log|1 − ηh_max|`` for GD; the log spectral radius of the mode's
  recursion with momentum), and whether a negative eigenvalue beyond ``flat_tol·h_max`` makes this
  a saddle. GD-stable iff every normal eigenvalue lies in ``(0, threshold)``; eigenvalues within
  ``flat_tol·h_max`` of 0 are tangent to the manifold of minima.
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
which, after the problem's own notes (e.g. attention evaluated through the math SDPA backend).
Nothing undetermined is reported as a plain verdict. The SGD parts need the loss to be a uniform
mean of per-sample losses: cross-entropy's mean over non-ignored labels (``ignore_index``) with
samples holding different numbers of them is refused (undetermined, with the reason).

**Near, not at, a minimum.** The analysis linearizes at a critical point. ``gradient_ratio =
‖∇L‖/(h_max‖θ‖)`` estimates the relative distance to one along the stiff directions (``‖θ − θ*‖ ≳
‖∇L‖/h_max``); above ``grad_tol`` a ``RuntimeWarning`` is issued and a note added.

**Layout** (one job per module; every name stays importable from here):
:mod:`gdscope.theory.optim` reads optimizers (thresholds, preconditioners, linearized updates),
:mod:`~gdscope.theory.stability_spectra` the full-batch spectra (GD criteria),
:mod:`~gdscope.theory.stability_sgd` the SGD parts (mean square, bounds, Lyapunov),
:mod:`~gdscope.theory.stability_report` the report; this module assembles them.

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
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from gdscope.curvature import curvature_operator
from gdscope.errors import InvalidArgumentError
from gdscope.linalg import CallableOperator, lanczos
from gdscope.problem import Params, Problem
from gdscope.theory.optim import OptimizerSetting, optimizer_threshold, read_optimizer
from gdscope.theory.stability_report import StabilityReport
from gdscope.theory.stability_sgd import _batch_coupled, _materialize, _sgd_parts
from gdscope.theory.stability_spectra import (
    DENSE_SPECTRUM_LIMIT,
    _dense_spectrum,
    _lanczos_spectrum,
)

__all__ = ["StabilityReport", "optimizer_threshold", "stability"]


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


def _uneven_label_counts(prob: Problem) -> str | None:
    """Why the SGD analysis does not apply to a cross-entropy mean over non-ignored labels
    whose samples hold different numbers of them (``None`` when they hold the same number).

    Under ``reduction="mean"`` with ``ignore_index`` the loss weighs sample ``i`` by its share
    ``m_i/m`` of the non-ignored labels; the SGD analysis draws samples uniformly and takes
    ``L`` as the mean of per-sample losses, which holds only when every ``m_i`` is the same.
    """
    ignore = prob.loss_spec.ignore_index
    if ignore is None or prob.reduction != "mean":
        return None
    counts: set[int] = set()
    for _, y, _ in prob.batches():
        if y.is_floating_point():
            return None
        if prob.adapter is not None and prob.adapter.shift and y.ndim >= 2:
            y = y[:, 1:]
        counts.update((y != ignore).reshape(y.shape[0], -1).sum(1).tolist())
        if len(counts) > 1:
            return (
                f"the loss is a mean over the labels not equal to ignore_index={ignore}, and "
                f"samples hold different numbers of them (e.g. {sorted(counts)[:2]}): L weighs "
                "each sample by its label count, not uniformly as the SGD analysis "
                "(per-sample Hessians, uniform sampling) assumes. Pass reduction='sum' or data "
                "without ignored labels to analyse SGD"
            )
    return None


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
        optimizer: a ``torch.optim`` optimizer whose settings are analysed through its adapter
            (:func:`gdscope.theory.optim.read_optimizer`): Adam/AdamW, RMSprop, Adagrad (the
            preconditioned sharpness from their second-moment state); ``SGD``; gdscope's
            ``GD``, ``HeavyBall``, ``Nesterov``.
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

    notes = [*prob.notes, *st.notes]  # the problem's: e.g. attention via math SDPA
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
        elif (uneven := _uneven_label_counts(prob)) is not None:
            why = uneven
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
