"""The SGD parts of :func:`gdscope.stability`: exact mean-square stability on the normal space,
Wu–Ma–E and Rayleigh–Ritz bounds, Lyapunov exponents (the process and proofs live in
:mod:`gdscope.theory.sgd_stability`)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from gdscope.kernels.ntk import default_memory
from gdscope.linalg import CallableOperator, lanczos
from gdscope.problem import Params, Problem
from gdscope.theory.sgd_stability import (
    DENSE_SAMPLE_NUMBERS,
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
from gdscope.theory.stability_spectra import _Spectrum

RAYLEIGH_RITZ_K = 6  # top eigenvectors used for the necessary-condition lower bound on ρ(T)

__all__ = ["RAYLEIGH_RITZ_K"]


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
    xs: list[Any] = []
    ys: list[Tensor] = []
    used = 0
    for x, y, _ in prob.batches():
        parts = list(x.values()) if isinstance(x, Mapping) else [x]
        used += sum(t.numel() * t.element_size() for t in (*parts, y) if isinstance(t, Tensor))
        if used > budget:
            return prob, (
                f"the DataLoader's data exceed {budget / 1e9:.3g} GB (half the memory budget), "
                "so they are not gathered into tensors for per-sample Hessians: pass (X, Y) "
                "tensors of a subset to analyse SGD"
            )
        xs.append({k: v.detach() for k, v in x.items()} if isinstance(x, Mapping) else x.detach())
        ys.append(y.detach())
    try:
        Y = torch.cat(ys)
        if isinstance(xs[0], Mapping):
            assert prob.adapter is not None  # dict inputs come from an adapter's split
            data: Any = {k: torch.cat([x[k] for x in xs]) for k in xs[0]}
            data[prob.adapter.labels] = Y
        else:
            data = (torch.cat(xs), Y)
    except (RuntimeError, KeyError) as e:
        return prob, f"the DataLoader's batches cannot be joined into tensors ({e})"
    # the same model, loss (as the user gave it), reduction and adapter on the gathered tensors
    tensor_prob = prob.with_data(data)
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
