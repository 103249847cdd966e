"""The central flow of full-batch GD: what gradient descent does at the edge of stability, averaged.

Reference: Cohen, Damian, Talwalkar, Kolter & Lee, *Understanding Optimization in Deep Learning
with Central Flows* (ICLR 2025). Derived from the paper's equations; the discretization (stability
imposed on the next substep's linearized Hessian) follows the one the authors describe and
publish. No code was copied.

**Convention.** Time ``t`` counts GD steps (``t = 1`` is one step of size ``η``); the flow's
point ``w(t)`` is compared with the iterate ``w_t``. ``H = ∇²L``, eigenpairs ``H v_i = λ_i v_i``
with ``‖v_i‖ = 1``, ``λ_1 ≥ λ_2 ≥ …``; the threshold is ``2/η``.

**Below the edge** (``λ_1 < 2/η``) the central flow is gradient flow in step time,

    dw/dt = −η ∇L(w).

**At the edge**, GD oscillates along the top eigenvectors around a smooth path. Writing
``w_t = w(t) + δ_t`` with covariance ``E[δδᵀ] = Σ = V X Vᵀ`` (``V`` the ``m`` eigenvectors whose
eigenvalues reached ``2/η``, ``X ⪰ 0`` an ``m × m`` matrix), a second-order Taylor expansion of the
averaged gradient gives the implicit curvature penalty

    dw/dt = −η [∇L(w) + ½ ∇⟨Σ, ∇²L(w)⟩] = −η [∇L(w) + ½ Σ_ij X_ij G_ij(w)],
    G_ij = ∇_w (v_iᵀ ∇²L(w) v_j)     (third-derivative products, gdscope.curvature.third),

and ``X`` is fixed by *stability*: the restricted Hessian ``M = VᵀHV`` may not exceed ``2/η``,
``dM/dt ⪯ 0`` on the directions where it equals ``2/η``, and ``X`` lives only there. With
``dM_ij/dt = G_ijᵀ dw/dt`` this is a semidefinite complementarity problem (SDCP) in ``X``:

    X ⪰ 0,   A(X) ⪰ 0,   ⟨X, A(X)⟩ = 0,   A(X) = 2/η·I − M − dt·dM/dt   (linear in X),

i.e. the next substep's ``M`` stays at or below ``2/η`` to first order (this discretization
also pulls an eigenvalue that overshot back to ``2/η``). Because ``−dM/dt`` is affine in ``X``
with a positive semidefinite part (a Gram matrix of the ``G_ij``), the SDCP is the optimality
condition of the convex problem ``min_{X ⪰ 0} ½⟨X, B[X]⟩ + ⟨α, X⟩`` (scaled by ``η``:
``α = 2I − ηM + dt·η²·[G_ijᵀ∇L]``, ``B[X]_ij = (dt·η²/2) Σ_kl (G_ijᵀG_kl) X_kl``), solved here
by accelerated projected gradient (exact closed form ``X = max(0, −α/B)`` for one eigenvalue;
scipy's NNLS/LCP solvers do not take a PSD cone, and no new dependency is needed). For one
eigenvalue at the edge the flow is the projection of ``−η∇L`` onto ``{∇λ_1ᵀ dw ≤ 0}``:
``X = σ² = −2∇λ_1ᵀ∇L/‖∇λ_1‖²`` when positive.

**Predictions** (per step, on the flow):

* time-averaged loss ``L̄ = E[L(w + δ)] ≈ L(w) + ½⟨Σ, H⟩ = L(w) + ½⟨X, VᵀHV⟩`` (the linear
  term averages out; ``≈ L(w) + tr X/η`` at the edge),
* sharpness ``λ_1(w)`` (pinned at ``2/η`` once at the edge),
* oscillation magnitude ``E‖δ‖² = tr X = Σ_i σ_i²`` (``σ_i²`` the eigenvalues of ``X``).

**Discretization.** Euler steps of ``dt = 1/substeps``; the top ``m`` eigenpairs by
warm-started block Lanczos on the Hessian-vector product every ``eig_every`` substeps (default
every 10 steps) and by one block Rayleigh–Ritz step on ``span[V, HV − VM]`` in between; a
tracked pair whose residual exceeds ``track_tol·|λ_1|`` (read off the derivative pass's ``HV``)
triggers a fresh solve. Every tracked eigenvalue ``≥ edge_fraction·2/η`` enters the SDCP
(complementarity gives ``X = 0`` on those that are not at the edge), and only those get
third-derivative products; the tracked count ``m`` grows (up to ``max_edge``) while all tracked
eigenvalues are that close.

**Lagged curvature** (``curvature_every = k > 1``, the cheap, coarse flow): ``V``, ``M`` and the
``G_ij`` are refreshed every ``k`` substeps (all ``max_edge`` eigenvalues tracked from the start);
in between only ``∇L`` is computed and ``M`` moves to first order, ``dM_ij = G_ijᵀ dw`` (the
linearization the SDCP already makes), and a negative part of ``2I − ηM`` found at a refresh
(an overshoot) is pulled back over ``k`` substeps instead of one. Below the edge the
refresh computes ``G`` once an eigenvalue could reach the edge fraction before the next one (from
``λ_1``'s rate), and the recorded eigenvalues between refreshes are interpolated. Measured on the
``edge`` experiment (``k = 10``, 2 substeps): 6× less CPU, ``L̄`` within 0.6–1.8% of the fresh
flow (docs/performance.md).
Layer norms are evaluated as PyTorch operations (built-in kernel: wrong third derivatives,
:mod:`gdscope.curvature.third`).

**Measured** (float64, 64 digits, MSE, tanh MLP 64-16-16-10, ``η = 3.5``, 300 steps, 2 substeps;
``tests/test_central_flow.py`` asserts a 200-step version with margin): the flow reaches
``2/η`` at step 28 (GD: the same) and holds it to ``1e-6``; GD's mean loss over the run is
0.999× the predicted time-averaged loss (0.990× after the onset), the 10-step moving average of
GD's loss is within 5% of the prediction at the median step (9% mean, 65% at the onset's
catapult spike), and GD's median sharpness after the onset is 2.3% above ``2/η``. Width 32,
``η = 3``: mean ratio 0.999, moving-average error median 14% (20-step window: 9%), GD's
sharpness 4.7% above ``2/η``. Substeps 2 vs 4 change the predicted loss by 0.5% (median).

Full-batch GD (``gs.GD``, or ``torch.optim.SGD`` without momentum and weight decay) and
``torch.optim.RMSprop`` (no momentum, centering or weight decay; the preconditioned flow, with
the optimizer's second-moment state ``ν`` in the flow, is derived in
:mod:`gdscope.theory._central_flow_rmsprop`) are modelled. Adam's central flow (momentum as
well as preconditioning) is not implemented and is refused.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gdscope.curvature.products import check_params, check_problem, curvature_operator
from gdscope.curvature.third import edge_derivatives, third_derivative_warnings
from gdscope.errors import InvalidArgumentError, NonFiniteError
from gdscope.problem import Params, Problem
from gdscope.theory._central_flow_rmsprop import rmsprop_setting, run_rmsprop_flow
from gdscope.theory._edge_eigs import solve_sdcp, to_numpy, track
from gdscope.theory.dynamics import Prediction, optimizer_spec

__all__ = ["CentralFlowPrediction", "central_flow", "solve_sdcp"]

_MAX_RECORD = 200


@dataclass(frozen=True, eq=False)
class CentralFlowPrediction(Prediction):
    """A :class:`~gdscope.theory.Prediction` from the central flow (module docstring).

    Inherited fields, as set here: ``loss`` is the predicted *time-averaged* GD loss ``L̄(t)``,
    ``t = 0..steps``; ``outputs``/``residuals`` are the model's outputs (and ``F − Y`` for MSE,
    ``softmax(F) − Y`` for cross-entropy, ``sigmoid(F) − Y`` for BCE) at the flow's point
    ``w(t)`` at ``record_steps``; ``eigenvalues`` the tracked top Hessian eigenvalues at the end
    (ascending); ``rates``, ``initial_energy``, ``asymptotic_rate``, ``limit_loss`` and
    ``test_outputs`` are ``None``; ``stable`` says the flow stayed finite and every
    complementarity problem was solved.

    For RMSprop, ``sharpness``/``edge_eigenvalues`` are of the preconditioned Hessian
    ``D^{-1/2}HD^{-1/2}`` (``D = √ν + ε``), whose threshold is also ``2/η``.

    Attributes:
        sharpness: ``(steps+1,)`` ``λ_1(w(t))``.
        edge_eigenvalues: ``(steps+1, max_edge)`` tracked top eigenvalues, NaN where untracked.
        oscillation: ``(steps+1,)`` ``tr Σ = Σ σ_i²``, the predicted ``E‖w_t − w(t)‖²``.
        sigma2: ``(steps+1, max_edge)`` eigenvalues ``σ_i²`` of ``Σ`` (descending),
            NaN-padded.
        flow_loss: ``(steps+1,)`` ``L(w(t))`` (the loss at the flow's point, not averaged).
        edge_count: ``(steps+1,)`` eigenvalues in the complementarity problem.
        threshold: ``2/η``.
        onset_step: first step with ``X ≠ 0`` (the flow at the edge), or ``None``.
        final_params: the flow's parameters at ``t = steps`` (flat, float64, ``prob.names``
            order).
        substeps, eig_every: the discretization used.
        eig_solves, eig_products: full Lanczos solves, and Hessian-vector products spent on
            tracking the eigenspace (solves, refinements, and ``HV`` of the tracked vectors
            below the edge when others are at it; the derivative pass not counted).
        curvature_every: substeps between curvature refreshes (``central_flow``'s argument).
        curvature_passes: derivative passes (a gradient and ``HV`` of the tracked vectors, with
            ``n(n+1)/2`` third-derivative products for the ``n`` near the edge); GD flow only
            (0 for RMSprop).
        third_products: third-derivative products in those passes.
        gradient_passes: gradient-only passes between curvature refreshes.
    """

    sharpness: np.ndarray = field(default_factory=lambda: np.zeros(0))
    edge_eigenvalues: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    oscillation: np.ndarray = field(default_factory=lambda: np.zeros(0))
    sigma2: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    flow_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    edge_count: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    threshold: float = math.nan
    onset_step: int | None = None
    final_params: np.ndarray = field(default_factory=lambda: np.zeros(0))
    substeps: int = 0
    eig_every: int = 1
    eig_solves: int = 0
    eig_products: int = 0
    curvature_every: int = 1
    curvature_passes: int = 0
    third_products: int = 0
    gradient_passes: int = 0

    def __repr__(self) -> str:
        onset = "never" if self.onset_step is None else f"step {self.onset_step}"
        return (
            f"CentralFlowPrediction({self.optimizer.get('class')} lr={self.optimizer.get('lr')}, "
            f"{self.loss_name}, "
            f"steps={self.steps}, loss {self.loss[0]:.4g} → {self.loss[-1]:.4g}, sharpness "
            f"{self.sharpness[0]:.4g} → {self.sharpness[-1]:.4g} (2/η = {self.threshold:.4g}), "
            f"edge onset {onset})"
        )


# ---------------------------------------------------------------------------------- inputs
def _parse_gd(optimizer: Any) -> float:
    if isinstance(optimizer, torch.optim.Optimizer):
        cls = type(optimizer)
        if not (cls is torch.optim.SGD or cls.__name__ == "GD"):
            raise InvalidArgumentError(
                f"central_flow models full-batch gradient descent: pass gs.GD(params, lr) or "
                f"torch.optim.SGD(params, lr) without momentum, got {cls.__module__}."
                f"{cls.__qualname__} (torch.optim.RMSprop is modelled too; Adam's central flow "
                "is not implemented)."
            )
    elif not isinstance(optimizer, Mapping):
        raise InvalidArgumentError(
            f"optimizer must be gs.GD / torch.optim.SGD or a mapping such as "
            f"{{'class': 'GD', 'lr': 0.1}}, got {type(optimizer).__name__}."
        )
    try:
        spec = optimizer_spec(optimizer)
    except InvalidArgumentError as e:
        raise InvalidArgumentError(f"central_flow: {e}") from None
    extra = {
        k: spec.get(k)
        for k in ("momentum", "weight_decay", "nesterov")
        if spec.get(k) not in (None, 0, 0.0, False)
    }
    if spec.get("kind") not in ("gd", "sgd") or extra:
        raise InvalidArgumentError(
            f"central_flow models plain gradient descent; the optimizer has {extra or spec}: "
            "use gs.GD(params, lr) or torch.optim.SGD(params, lr) with momentum=0 and "
            "weight_decay=0."
        )
    return float(spec["lr"])


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise InvalidArgumentError(f"{name}={value!r} must be an integer >= {low}.")
    return int(value)


def _check_float(name: str, value: Any, low: float, high: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.floating, np.integer))
        or not low < float(value) < high
    ):
        raise InvalidArgumentError(f"{name}={value!r} must be a number in ({low}, {high}).")
    return float(value)


# ---------------------------------------------------------------------------------- the flow
def _residuals(prob: Problem, out: Tensor, Y: Tensor) -> Tensor:
    name = prob.loss_name
    if name == "mse":
        return (out - Y.reshape(out.shape).to(out.dtype)).reshape(-1)
    if name == "cross_entropy":
        p = torch.softmax(out, dim=-1)
        if Y.is_floating_point():
            return (p - Y.reshape(p.shape)).reshape(-1)
        hot = torch.nn.functional.one_hot(Y.long().reshape(p.shape[:-1]), p.shape[-1])
        return (p - hot.to(p.dtype)).reshape(-1)
    if name == "bce_with_logits":
        return (torch.sigmoid(out) - Y.reshape(out.shape).to(out.dtype)).reshape(-1)
    return torch.full((out.numel(),), math.nan, dtype=out.dtype)


@dataclass
class _Curvature:
    """The edge curvature at the last refresh (:func:`central_flow`, ``curvature_every``):
    ``M = VᵀHV`` (moved to first order since), the third-derivative products ``G`` (``None``
    below the edge), ``λ_1`` then, the substeps since, and ``G`` restricted to the eigenvalues
    at the edge with its Gram matrix."""

    M: Tensor
    G: Tensor | None
    top: float
    age: int = 0
    crit: list[int] | None = None
    Gc: Tensor | None = None
    gram: Tensor | None = None


def _interpolate_stale(stale: np.ndarray, sharp: np.ndarray, eigs: np.ndarray) -> None:
    """Replace the recorded eigenvalues at ``stale`` steps (below the edge, between lagged
    refreshes) by linear interpolation between the refreshes around them (in place; the last
    ones, after the final refresh, are held)."""
    fresh = np.flatnonzero(~stale)
    todo = np.flatnonzero(stale)
    if not todo.size or not fresh.size:
        return
    sharp[todo] = np.interp(todo, fresh, sharp[fresh])
    for j in range(eigs.shape[1]):
        col = eigs[: stale.size, j]
        ok = fresh[np.isfinite(col[fresh])]
        if ok.size:
            col[todo] = np.interp(todo, ok, col[ok])


def _loss_and_grad(prob: Problem, theta: Tensor) -> tuple[Tensor, Tensor]:
    """``L(θ)`` and the flat ``∇L(θ)`` by one backward pass."""
    leaves = {n: v.detach().requires_grad_(True) for n, v in prob.unflatten(theta).items()}
    with torch.enable_grad():
        value = prob.loss(leaves)
        grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    flat = {
        n: torch.zeros_like(v) if gr is None else gr
        for (n, v), gr in zip(leaves.items(), grads, strict=True)
    }
    return value.detach(), prob.flatten(flat).detach()


def central_flow(
    prob: Problem,
    optimizer: Any,
    steps: int,
    *,
    substeps: int = 4,
    max_edge: int = 6,
    edge_fraction: float = 0.95,
    eig_every: int | None = None,
    curvature_every: int = 1,
    stop_after_edge: int | None = None,
    eig_tol: float = 1e-7,
    track_tol: float = 1e-3,
    params: Params | None = None,
    seed: int = 0,
) -> CentralFlowPrediction:
    """Integrate the central flow of full-batch GD from the run's start (module docstring).

    Args:
        prob: the problem (full batch: every evaluation uses all of its data).
        optimizer: ``gs.GD``/``torch.optim.SGD`` (no momentum, no weight decay), a
            ``torch.optim.RMSprop`` (no momentum, centering, weight decay; its ``square_avg``
            state, if it has stepped, is the flow's ``ν(0)``, else ``∇L(w₀)²``), or a mapping
            ``{"class": "GD", "lr": η}`` / ``{"class": "RMSprop", "lr": η, "alpha": α,
            "eps": ε}``.
        steps: number of GD steps to predict (``t = 0..steps``).
        substeps: Euler substeps per step (``dt = 1/substeps``).
        max_edge: most eigenvalues tracked (and in the complementarity problem) at once.
        edge_fraction: eigenvalues ``≥ edge_fraction·2/η`` enter the complementarity problem.
        eig_every: substeps between full warm-started Lanczos solves (default: every 10
            steps); in between, one block Rayleigh–Ritz refinement of the tracked eigenspace.
        curvature_every: substeps between refreshes of the edge curvature (GD only): the
            tracked eigenvectors ``V``, ``M = VᵀHV`` and the third-derivative products ``G``.
            ``1`` (default) refreshes every substep; ``k > 1`` reuses ``G`` for ``k`` substeps,
            moving ``M`` to first order (``dM_ij = G_ijᵀ dw``, the linearization the
            complementarity problem already makes) and computing only ``∇L`` in between: about
            ``k``× fewer Hessian-vector and third-derivative products, the cheaper,
            coarser flow (docs/performance.md). Below the edge the refresh computes ``G`` only
            once an eigenvalue could reach the edge before the next refresh (from its rate).
        stop_after_edge: stop this many steps after the flow reaches the edge (GD only; the
            prediction then ends there, ``steps`` says where); ``None`` runs all ``steps``.
        track_tol: a refined pair whose residual ``‖Hv − λv‖`` exceeds ``track_tol·|λ_1|``
            (checked for free from the derivative pass) triggers a full solve next substep.
        eig_tol: Lanczos relative residual tolerance.
        params: starting point (default: the model's current parameters).
        seed: Lanczos seed.
    """
    check_problem(prob)
    rms = isinstance(optimizer, torch.optim.RMSprop) or (
        isinstance(optimizer, Mapping) and optimizer.get("class") == "RMSprop"
    )
    if rms:
        setting = rmsprop_setting(prob, optimizer)
        eta = setting["lr"]
        opt_desc = {
            "class": "RMSprop",
            "kind": "rmsprop",
            "lr": eta,
            "alpha": setting["alpha"],
            "eps": setting["eps"],
            "model": "central_flow",
        }
    else:
        eta = _parse_gd(optimizer)
        opt_desc = {"class": "GD", "kind": "gd", "lr": eta, "model": "central_flow"}
    steps = _check_int("steps", steps, 0)
    substeps = _check_int("substeps", substeps, 1)
    max_edge = _check_int("max_edge", max_edge, 1)
    eig_every = 10 * substeps if eig_every is None else _check_int("eig_every", eig_every, 1)
    curvature_every = _check_int("curvature_every", curvature_every, 1)
    if stop_after_edge is not None:
        stop_after_edge = _check_int("stop_after_edge", stop_after_edge, 0)
    if rms and stop_after_edge is not None:
        raise InvalidArgumentError(
            "stop_after_edge is implemented for gradient descent only: pass None for RMSprop."
        )
    if rms and curvature_every != 1:
        raise InvalidArgumentError(
            f"curvature_every={curvature_every} is implemented for gradient descent only; the "
            "RMSprop flow refreshes its curvature every substep: pass curvature_every=1."
        )
    track_tol = _check_float("track_tol", track_tol, 0.0, 1.0)
    edge_fraction = _check_float("edge_fraction", edge_fraction, 0.0, 1.0)
    eig_tol = _check_float("eig_tol", eig_tol, 0.0, 1.0)
    params = check_params(prob, params)
    prob.check()
    pure = bool(third_derivative_warnings(prob.model))
    P = prob.num_params
    max_edge = min(max_edge, P)
    src = prob.params if params is None else params
    theta = prob.flatten({n: src[n].detach() for n in prob.names}).clone().to(prob.dtype)
    thr = 2.0 / eta
    dt = 1.0 / substeps
    notes: list[str] = list(prob.notes)
    for line in third_derivative_warnings(prob.model):
        notes.append(line)
    if prob.dtype != torch.float64:
        notes.append(
            f"the problem is in {prob.dtype}: third-derivative products and the complementarity "
            "problem are sensitive to round-off; float64 is recommended."
        )

    n_rec = steps + 1
    loss_bar = np.full(n_rec, np.nan)
    flow_loss = np.full(n_rec, np.nan)
    sharp = np.full(n_rec, np.nan)
    eigs_rec = np.full((n_rec, max_edge), np.nan)
    sig_rec = np.full((n_rec, max_edge), np.nan)
    osc = np.zeros(n_rec)
    count = np.zeros(n_rec, dtype=int)
    if steps <= _MAX_RECORD:
        record_steps = np.arange(steps + 1)
    else:
        record_steps = np.unique(np.linspace(0, steps, _MAX_RECORD + 1).round().astype(int))
    rec_set = {int(s): i for i, s in enumerate(record_steps)}
    outs: list[np.ndarray] = [np.zeros(0)] * len(record_steps)
    resid: list[np.ndarray] = [np.zeros(0)] * len(record_steps)
    Yall = torch.cat([y.reshape(y.shape[0], -1) for _, y, _ in prob.batches()])

    # lagged curvature tracks all max_edge eigenvalues from the start: widening the space
    # later costs a fresh Lanczos solve each time, more than the extra HVPs at rare refreshes
    m = min(2, max_edge) if curvature_every == 1 else max_edge
    saturated = False
    V: Tensor | None = None
    lam: Tensor | None = None
    X_prev: np.ndarray | None = None
    worst_res = 0.0
    onset: int | None = None
    since, solves, matvecs, refresh = 0, 0, 0, False
    passes = thirds = grads = 0

    def record(
        t: int,
        lv: float,
        top: float,
        lams: np.ndarray,
        c: int,
        X: np.ndarray,
        Mc: np.ndarray,
        th: Tensor,
        gram: np.ndarray | None = None,
    ) -> None:
        nonlocal onset
        flow_loss[t], sharp[t], count[t], loss_bar[t] = lv, top, c, lv
        eigs_rec[t, : lams.size] = lams
        if t == 0 and top > thr:
            notes.append(
                f"the run starts above the edge (preconditioned sharpness {top:.4g} > 2/η = "
                f"{thr:.4g}): the optimizer's first steps are unstable, which the flow does not "
                "model: it projects back onto the threshold at once."
            )
        if c:
            Sx = X
            if gram is not None:  # Σ = UXUᵀ with non-orthonormal U: eig(X^½ UᵀU X^½)
                w_, Q_ = np.linalg.eigh(X)
                half = (Q_ * np.sqrt(np.maximum(w_, 0.0))) @ Q_.T
                Sx = half @ gram @ half
            sx = np.sort(np.linalg.eigvalsh(0.5 * (Sx + Sx.T)))[::-1]
            sig_rec[t, : sx.size] = sx
            osc[t] = float(np.trace(Sx))
            loss_bar[t] = lv + 0.5 * float(np.sum(X * Mc))
            if onset is None and osc[t] > 0:
                onset = t
        if t in rec_set:
            with torch.no_grad():
                out = prob.outputs(prob.unflatten(th))
            outs[rec_set[t]] = to_numpy(out.reshape(-1))
            resid[rec_set[t]] = to_numpy(_residuals(prob, out, Yall))

    if rms:
        state = run_rmsprop_flow(
            prob,
            setting,
            theta,
            steps,
            substeps,
            max_edge,
            edge_fraction,
            eig_every,
            eig_tol,
            track_tol,
            seed,
            pure,
            record,
        )
        theta, worst_res, solves = state["theta"], state["worst"], state["solves"]
        matvecs, saturated = state["matvecs"], state["saturated"]
        lam = torch.as_tensor(eigs_rec[-1][np.isfinite(eigs_rec[-1])])
        notes.append(
            "RMSprop: sharpness, edge_eigenvalues and threshold are of the preconditioned "
            "Hessian D^{-1/2} H D^{-1/2} (D = √ν + ε) against 2/η; ν(0) = "
            + ("the optimizer's square_avg." if setting["nu0"] is not None else "∇L(w₀)².")
        )
    else:
        curv: _Curvature | None = None
        done = False
        stale_rec = np.zeros(steps + 1, dtype=bool)
        lagless = curvature_every == 1
        for t in range(steps + 1):
            for s in range(substeps):
                # a poor tracked pair (refresh) asks for a fresh solve at the next refresh
                due = curv is None or curv.age >= curvature_every or (refresh and lagless)
                if due:
                    op = curvature_operator(
                        prob, "hessian", params=prob.unflatten(theta), check=False
                    )
                    stale = since >= eig_every or refresh
                    lam, V, mv, solved = track(op, V, m, stale, eig_tol, seed)
                    if solved:
                        since, solves = 0, solves + 1
                    matvecs += mv
                    top = float(lam.max())
                    ahead = 0.0
                    if curvature_every > 1 and curv is not None:
                        # lagged curvature: the third-derivative products are needed from the
                        # refresh before an eigenvalue can reach the edge fraction
                        rate = max(0.0, (top - curv.top) / max(curv.age * dt, 1e-300))
                        ahead = 2 * rate * curvature_every * dt
                    # third-derivative products only for the (leading) eigenvalues near the
                    # edge: the complementarity problem uses no others
                    n = int((lam + ahead >= edge_fraction * thr).sum())
                    U = V[:, :n] if n else V
                    D = edge_derivatives(
                        prob, U, params=prob.unflatten(theta), third=n > 0, pure_layernorm=pure
                    )
                    HU = D.HU
                    if 0 < n < m:
                        HU = torch.cat([HU, op.matmat(V[:, n:])], 1)
                        matvecs += m - n
                    passes += 1
                    thirds += n * (n + 1) // 2
                    M = V.T @ HU
                    M = 0.5 * (M + M.T)
                    # the tracked pairs' residuals come free with HU: a poor one asks for a
                    # fresh solve
                    resid_eig = torch.linalg.norm(HU - V @ M, dim=0)
                    scale = max(float(lam.abs().max()), 1e-300)
                    refresh = bool((resid_eig > track_tol * scale).any())
                    curv = _Curvature(M, D.G if n else None, top)
                    g, loss_t = D.grad, D.loss
                else:
                    assert curv is not None
                    loss_t, g = _loss_and_grad(prob, theta)
                    grads += 1
                M = curv.M
                diag = torch.diagonal(M)
                n_g = 0 if curv.G is None else curv.G.shape[0]
                crit = [i for i in range(n_g) if float(diag[i]) >= edge_fraction * thr]
                c = len(crit)
                X = np.zeros((0, 0))
                step_dir = -eta * g
                if c:
                    assert curv.G is not None
                    idx = torch.tensor(crit, device=g.device)
                    if curv.crit != crit:  # G is fixed until the next refresh: so is its Gram
                        curv.crit, curv.Gc = crit, curv.G[idx][:, idx]  # (c, c, P)
                        Gf = curv.Gc.reshape(c * c, -1)
                        curv.gram = Gf @ Gf.T
                    Gc = curv.Gc
                    Mc = M[idx][:, idx]
                    C = torch.einsum("ijp,p->ij", Gc, g)
                    eye = torch.eye(c, dtype=g.dtype, device=g.device)
                    gap = 2 * eye - eta * Mc
                    if curvature_every > 1:  # pull an overshoot back over a refresh interval
                        w_, Q_ = torch.linalg.eigh(gap)
                        gap = (Q_ * torch.where(w_ < 0, w_ / curvature_every, w_)) @ Q_.T
                    alpha = gap + dt * eta**2 * C
                    Bm = (dt * eta**2 / 2) * curv.gram
                    x0 = X_prev if X_prev is not None and X_prev.shape == (c, c) else None
                    X, res = solve_sdcp(to_numpy(alpha), to_numpy(Bm), x0=x0)
                    worst_res = max(worst_res, res)
                    Xt = torch.as_tensor(X, dtype=g.dtype, device=g.device)
                    step_dir = step_dir - (eta / 2) * torch.einsum("ij,ijp->p", Xt, Gc)
                X_prev = X if c else None
                saturated = saturated or (c == m == max_edge and max_edge < P)
                if s == 0:
                    lv = float(loss_t)
                    flow_loss[t] = lv
                    lams = np.sort(np.linalg.eigvalsh(to_numpy(M)))[::-1]
                    # below the edge between lagged refreshes M is stale: interpolated at the end
                    stale_rec[t] = curv.G is None and curv.age > 0
                    sharp[t] = float(lams[0])
                    if t == 0 and sharp[0] > thr:
                        notes.append(
                            f"the run starts above the edge (λ_1 = {sharp[0]:.4g} > 2/η = "
                            f"{thr:.4g}): GD's first steps are unstable (a catapult), which the "
                            "flow does not model: it projects back onto λ_1 = 2/η at once."
                        )
                    eigs_rec[t, :m] = lams[:m]
                    count[t] = c
                    loss_bar[t] = lv
                    if c:
                        sx = np.sort(np.linalg.eigvalsh(X))[::-1]
                        sig_rec[t, : sx.size] = sx
                        osc[t] = float(np.trace(X))
                        loss_bar[t] = lv + 0.5 * float(np.sum(X * to_numpy(Mc)))
                        if onset is None and osc[t] > 0:
                            onset = t
                    if t in rec_set:
                        with torch.no_grad():
                            out = prob.outputs(prob.unflatten(theta))
                        j = rec_set[t]
                        outs[j] = to_numpy(out.reshape(-1))
                        resid[j] = to_numpy(_residuals(prob, out, Yall))
                    if stop_after_edge is not None and onset is not None:
                        done = t >= onset + stop_after_edge
                    if t == steps or done:
                        break
                theta = theta + dt * step_dir
                since += 1
                curv.age += 1
                if curvature_every > 1 and curv.G is not None:
                    # between refreshes M follows the flow to first order: dM_ij = G_ijᵀ dw
                    # (the block with third-derivative products; the rest is below the edge)
                    dM = torch.einsum("ijp,p->ij", curv.G, dt * step_dir)
                    k = dM.shape[0]
                    curv.M = curv.M.clone()
                    curv.M[:k, :k] += 0.5 * (dM + dM.T)
                if not bool(torch.isfinite(theta).all()):
                    raise NonFiniteError(
                        f"the central flow left finite values at step {t} (substep {s}): "
                        "lower lr, raise substeps, or shorten steps."
                    )
                # grow the tracked space while every tracked eigenvalue is near the edge
                if due and c == m and m < max_edge:
                    m += 1
                    curv.age = curvature_every  # the next substep tracks the wider space
            if done:
                break
        _interpolate_stale(stale_rec[: t + 1], sharp, eigs_rec)
        if done and t < steps:
            notes.append(
                f"stopped at step {t}, {stop_after_edge} steps after the flow reached the edge "
                f"(step {onset}; stop_after_edge), before the {steps} steps asked for."
            )
            keep = record_steps <= t
            outs, resid = (
                [o for o, k in zip(outs, keep, strict=True) if k],
                [r for r, k in zip(resid, keep, strict=True) if k],
            )
            record_steps, steps = record_steps[keep], t
            loss_bar, flow_loss, sharp = loss_bar[: t + 1], flow_loss[: t + 1], sharp[: t + 1]
            eigs_rec, sig_rec = eigs_rec[: t + 1], sig_rec[: t + 1]
            osc, count = osc[: t + 1], count[: t + 1]
    if saturated:
        notes.append(
            f"all {max_edge} tracked eigenvalues reached the edge at some point: more may have; "
            f"raise max_edge (now {max_edge}) to track them."
        )
    stable = worst_res <= 1e-6 and bool(np.all(np.isfinite(loss_bar)))
    if worst_res > 1e-6:
        msg = (
            f"a complementarity problem was solved only to relative residual {worst_res:.2g}: "
            "an eigenvalue at the edge barely depends on the parameters (its third-derivative "
            "products vanish), so the flow cannot hold it at 2/η."
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        notes.append(msg)
    assert lam is not None
    final_eigs = np.sort(lam.cpu().double().numpy())
    return CentralFlowPrediction(
        loss=loss_bar,
        steps=steps,
        record_steps=record_steps,
        outputs=np.stack(outs),
        residuals=np.stack(resid),
        test_outputs=None,
        eigenvalues=final_eigs,
        rates=None,
        initial_energy=None,
        asymptotic_rate=None,
        limit_loss=None,
        stable=stable,
        optimizer=opt_desc,
        loss_name=prob.loss_name,
        q=prob.q if prob.loss_name == "mse" else None,
        reduction=prob.reduction,
        notes=tuple(notes),
        sharpness=sharp,
        edge_eigenvalues=eigs_rec,
        oscillation=osc,
        sigma2=sig_rec,
        flow_loss=flow_loss,
        edge_count=count,
        threshold=thr,
        onset_step=onset,
        final_params=theta.detach().cpu().double().numpy(),
        substeps=substeps,
        eig_every=eig_every,
        eig_solves=solves,
        eig_products=matvecs,
        curvature_every=curvature_every,
        curvature_passes=passes,
        third_products=thirds,
        gradient_passes=grads,
    )
