"""The central flow of full-batch RMSProp (used by :func:`gdscope.theory.central_flow`).

RMSProp (``torch.optim.RMSprop`` without momentum, centering or weight decay):
``ν_{t+1} = αν_t + (1−α)g_t²``, ``w_{t+1} = w_t − η g_t/D_{t+1}``, ``D = √ν + ε``. Time ``t``
counts steps. Conventions as :mod:`gdscope.theory.optim`: the *preconditioned sharpness* is
``λ_1(D^{-1}H)`` (the top eigenvalue of ``D^{-1/2} H D^{-1/2}``) and its threshold is ``2/η``.

**Flow.** With generalized eigenvectors ``H u_i = λ_i D u_i``, ``uᵢᵀ D u_j = δ_ij``, the
oscillation covariance ``Σ = U X Uᵀ`` (``X ⪰ 0``), ``g = ∇L(w)`` and ``G_ij = ∇(u_iᵀ H u_j)``,
averaging the update and the squared gradient ``(g + Hδ + ½D³L[δ, δ])²`` over the oscillation
to second order in ``δ`` gives (``∇⟨Σ, H⟩ = Σ_ij X_ij G_ij``)

    dw/dt = −η D^{-1} [g + ½ ∇⟨Σ, H⟩],
    dν/dt = (1 − α) [g² + g ⊙ ∇⟨Σ, H⟩ + diag(H Σ H) − ν],
    diag(HΣH) = Σ_kl X_kl (Hu_k) ⊙ (Hu_l).

**Stability** (SDCP): ``η·Uᵀ(2/η·D − H)U`` at the next substep stays ``⪰ 0``, to first order
in ``dt``; it is ``α₀ + B[X]`` with (``W_ij = u_i ⊙ u_j``)

    α₀ = 2I − ηUᵀHU + dt·[η² G_ijᵀ D⁻¹ g + (1 − α) W_ijᵀ ((g² − ν)/√ν)],
    B[X]_ij = dt·Σ_kl [½η² G_ijᵀ D⁻¹ G_kl + (1 − α)(4/η²) W_ijᵀ (D²/√ν ⊙ W_kl)] X_kl,

where the second part of ``B`` uses ``Hu_k ≈ (2/η) D u_k`` (exact at the edge) and leaves out
the cross term ``g ⊙ ∇⟨Σ, H⟩`` of ``dν/dt``, so that ``B`` is a symmetric positive
semidefinite Gram operator and :func:`solve_sdcp` applies; ``dν/dt`` itself is exact (the
next substep's constraint corrects what the linearization left out). More oscillation raises
``ν`` (so ``D``) and lowers the curvature along ``U``: both terms stabilize. Time-averaged loss
``L + ½⟨X, UᵀHU⟩``; oscillation ``E‖δ‖² = tr Σ = tr(X UᵀU)``.

**Measured.** On the two-parameter edge model of ``tests/test_central_flow.py`` (``α = 0.9``)
the flow matches discrete RMSProp to 0.01% in ``y(60)``, 3.5% in ``E x²`` and 0.1% in the mean
loss. On 64 digits (tanh MLP 64-16-16-10, MSE, ``η = 0.01``, ``α = 0.99``, ν primed with
``g(0)²``, 200 steps): with ``ε = 10⁻³`` the run starts below the edge (preconditioned
sharpness 167 vs ``2/η = 200``), the flow reaches it at step 12 and holds it to 6e-4;
run-mean loss ratio RMSProp/flow 1.002, 10-step moving-average error median 6.7% (20 steps:
5.2%), RMSProp's measured preconditioned sharpness 7.7% above ``2/η`` (median after the
onset). With ``ε = 10⁻⁸`` the start is far above the edge (3988: coordinates with tiny
gradients), the flow's first 4 steps are a violent projection and the agreement is weaker
(mean ratio 0.95, moving-average error 11%, sharpness 14% above). Treat the RMSProp flow as
experimental.

**Start.** ``ν(0)`` is the optimizer's ``square_avg`` when it has taken steps, else ``g(0)²``
(a primed state: from ``ν = 0`` PyTorch's first step is ``η/√(1−α)`` per coordinate, a
transient the flow does not model; prime the optimizer the same way to compare).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gdscope.curvature.products import curvature_operator
from gdscope.curvature.third import edge_derivatives
from gdscope.errors import InvalidArgumentError, NonFiniteError
from gdscope.linalg.operator import CallableOperator
from gdscope.problem import Problem
from gdscope.theory._edge_eigs import solve_sdcp, track
from gdscope.theory._edge_eigs import to_numpy as _np

__all__ = ["rmsprop_setting", "run_rmsprop_flow"]


def rmsprop_setting(prob: Problem, optimizer: Any) -> dict[str, Any]:
    """``lr``, ``alpha``, ``eps`` and ``nu0`` (the state, or ``None``) of an RMSprop optimizer
    (a ``torch.optim.RMSprop`` or a mapping ``{"class": "RMSprop", "lr": …}``)."""
    if isinstance(optimizer, torch.optim.RMSprop):
        groups = optimizer.param_groups
        first = {k: v for k, v in groups[0].items() if k != "params"}
        for g in groups[1:]:
            other = {k: v for k, v in g.items() if k != "params"}
            if other != first:
                raise InvalidArgumentError(
                    "central_flow(RMSprop): the param groups' settings differ; use one setting."
                )
    else:
        first = {k: v for k, v in optimizer.items() if k != "class"}
    lr = float(first.get("lr", math.nan))
    alpha = float(first.get("alpha", 0.99))
    eps = float(first.get("eps", 1e-8))
    bad = {
        k: first.get(k)
        for k in ("momentum", "weight_decay", "centered", "maximize")
        if first.get(k) not in (None, 0, 0.0, False)
    }
    if bad:
        raise InvalidArgumentError(
            f"central_flow models RMSprop without momentum, weight decay, centering or "
            f"maximize; the optimizer has {bad}."
        )
    if not (math.isfinite(lr) and lr > 0) or not 0 < alpha < 1 or not eps >= 0:
        raise InvalidArgumentError(
            f"central_flow(RMSprop): lr={lr!r} must be > 0, alpha={alpha!r} in (0, 1), "
            f"eps={eps!r} >= 0."
        )
    nu0 = None
    if isinstance(optimizer, torch.optim.RMSprop) and optimizer.state:
        named = dict(prob.model.named_parameters())
        parts = []
        for n in prob.names:
            st = optimizer.state.get(named[n], {})
            if "square_avg" not in st:
                raise InvalidArgumentError(
                    f"the RMSprop optimizer has state for some parameters but not {n!r}: pass "
                    "a fresh optimizer or one that has stepped on all of prob's parameters."
                )
            parts.append(st["square_avg"].detach().reshape(-1))
        nu0 = torch.cat(parts).to(prob.device, prob.dtype)
    return {"lr": lr, "alpha": alpha, "eps": eps, "nu0": nu0}


class _Scaled:
    """``v ↦ s ⊙ H(s ⊙ v)`` (``s = D^{-1/2}``): the symmetric preconditioned Hessian."""

    def __init__(self, op: CallableOperator, s: Tensor) -> None:
        self.op, self.s = op, s

    def __call__(self, v: Tensor) -> Tensor:
        return self.s * self.op.matvec(self.s * v)


def run_rmsprop_flow(
    prob: Problem,
    setting: dict[str, Any],
    theta: Tensor,
    steps: int,
    substeps: int,
    max_edge: int,
    edge_fraction: float,
    eig_every: int,
    eig_tol: float,
    track_tol: float,
    seed: int,
    pure: bool,
    record: Any,
) -> dict[str, Any]:
    """Integrate the RMSProp central flow (module docstring); ``record(t, loss, sharp, lams,
    c, X, Mc, theta, gram)`` stores step ``t`` (``gram = UᵀU`` on the edge directions, for
    ``Σ = UXUᵀ``). Returns the final state and counters."""
    eta, alpha, eps = setting["lr"], setting["alpha"], setting["eps"]
    P = theta.numel()
    dt = 1.0 / substeps
    nu = setting["nu0"]
    if nu is None:
        nu = prob.gradient(prob.unflatten(theta)).detach() ** 2
    nu = nu.clone()
    thr = 2.0 / eta
    m = min(2, max_edge)
    S: Tensor | None = None  # tracked eigenvectors of D^{-1/2} H D^{-1/2}
    X_prev: np.ndarray | None = None
    worst, since, solves, matvecs, refresh = 0.0, 0, 0, 0, False
    saturated = False
    for t in range(steps + 1):
        for s in range(substeps):
            Dg = nu.sqrt() + eps
            if not bool((Dg > 0).all()):
                raise InvalidArgumentError(
                    "central_flow(RMSprop): a coordinate has ν = 0 and eps = 0, so the "
                    "preconditioner is singular; pass eps > 0."
                )
            sc = Dg.rsqrt()
            hop = curvature_operator(prob, "hessian", params=prob.unflatten(theta), check=False)
            op = CallableOperator(_Scaled(hop, sc), P, theta.dtype, theta.device)
            lam, S, mv, solved = track(op, S, m, since >= eig_every or refresh, eig_tol, seed)
            if solved:
                since, solves = 0, solves + 1
            matvecs += mv
            since += 1
            U = sc[:, None] * S  # Uᵀ D U = I
            near = bool((lam >= edge_fraction * thr).any())
            Dv = edge_derivatives(
                prob, U, params=prob.unflatten(theta), third=near, pure_layernorm=pure
            )
            M = U.T @ Dv.HU
            M = 0.5 * (M + M.T)
            resid = torch.linalg.norm(sc[:, None] * Dv.HU - S @ M, dim=0)
            refresh = bool((resid > track_tol * max(float(lam.abs().max()), 1e-300)).any())
            g = Dv.grad
            crit = [i for i in range(m) if float(lam[i]) >= edge_fraction * thr]
            c = len(crit)
            X = np.zeros((0, 0))
            force = g.clone()
            dnu = (1 - alpha) * (g * g - nu)
            Mc = M[:0, :0]
            gram = None
            if c:
                idx = torch.tensor(crit, device=g.device)
                Gc = Dv.G[idx][:, idx]
                Mc = M[idx][:, idx]
                Uc = U[:, idx]
                gram = _np(Uc.T @ Uc)
                HUc = Dv.HU[:, idx]
                Gf = Gc.reshape(c * c, -1)
                Wf = (Uc[:, :, None] * Uc[:, None, :]).permute(1, 2, 0).reshape(c * c, -1)
                dinv = 1.0 / Dg
                # 1/√ν (dD/dν = 1/(2√ν)); coordinates with ν = 0 (inputs that never vary, say)
                # take no part: their gradient and curvature rows vanish
                rs = torch.where(nu > 0, nu.clamp_min(1e-300).rsqrt(), torch.zeros_like(nu))
                eye = torch.eye(c, dtype=g.dtype, device=g.device)
                a0 = (
                    2 * eye
                    - eta * Mc
                    + dt * eta**2 * torch.einsum("ijp,p->ij", Gc, dinv * g)
                    + dt * (1 - alpha) * (Wf @ ((g * g - nu) * rs)).reshape(c, c)
                )
                B = dt * (
                    0.5 * eta**2 * (Gf * dinv) @ Gf.T
                    + (1 - alpha) * (4 / eta**2) * (Wf * (Dg * Dg * rs)) @ Wf.T
                )
                x0 = X_prev if X_prev is not None and X_prev.shape == (c, c) else None
                X, res = solve_sdcp(_np(a0), _np(B), x0=x0)
                worst = max(worst, res)
                Xt = torch.as_tensor(X, dtype=g.dtype, device=g.device)
                pen = torch.einsum("ij,ijp->p", Xt, Gc)  # ∇⟨Σ, H⟩
                force = force + 0.5 * pen
                dnu = dnu + (1 - alpha) * (torch.einsum("ij,pi,pj->p", Xt, HUc, HUc) + g * pen)
            X_prev = X if c else None
            saturated = saturated or (c == m == max_edge and max_edge < P)
            if s == 0:
                record(t, float(Dv.loss), float(lam[0]), _np(lam[:m]), c, X, _np(Mc), theta, gram)
                if t == steps:
                    break
            theta = theta - dt * eta * force / Dg
            nu = torch.clamp(nu + dt * dnu, min=0.0)
            if not bool(torch.isfinite(theta).all()):
                raise NonFiniteError(
                    f"the central flow left finite values at step {t} (substep {s}): "
                    "lower lr, raise substeps, or shorten steps."
                )
            if c == m and m < max_edge:
                m += 1
    return {
        "theta": theta,
        "nu": nu,
        "worst": worst,
        "solves": solves,
        "matvecs": matvecs,
        "saturated": saturated,
        "threshold": thr,
    }
