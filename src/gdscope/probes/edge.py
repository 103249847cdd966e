"""Self-stabilization probes (THEORY §3): α, β, the SGD sharpness gap and the catapult window.

**Self-stabilization** (Damian, Nichani & Lee, ICLR 2023). With the sharpness
``S(θ) = λ_max(∇²L(θ))`` and its unit eigenvector ``u``,

    ∇S(θ) = ∇³L(θ)[u, u, ·] = ∇_θ(uᵀ∇²L(θ)u)     (u held fixed: Hellmann–Feynman),
    α = −∇L(θ)·∇S(θ)     (the progressive-sharpening rate: dS/dt = α under gradient flow
                          in the loss's own time, dS/dt = ηα per GD step),
    β = ‖∇S(θ)‖²          (the self-stabilization strength).

GD at the edge oscillates along ``u`` with ``x = uᵀ(θ − θ*)``; the cubic term ``½x²∇S`` pulls
``S`` down at rate ``ηβx²/2`` per step, and ``S`` is held at ``2/η`` when the mean square
oscillation is ``x² = 2α/β`` (``α > 0``: progressive sharpening, else nothing to stabilize).

**SGD sharpness gap** (Liao, Kolomvaki & Kyrillidis 2026, "SGD at the Edge of Stability: the
Stochastic Sharpness Gap", arXiv 2604.21016): gradient noise adds variance ``σ_u²`` to the
oscillation along ``u`` and the full-batch sharpness settles below ``2/η`` by

    ΔS = η β σ_u² / (4 α),     S_SGD ≈ 2/η − ΔS,

with ``σ_u² = Var_B[uᵀ∇L_B(θ)]`` the variance of the mini-batch gradient projected on ``u``.
Here the batches are of ``batch_size`` samples drawn uniformly without replacement and the
loss is a mean over samples, so ``σ_u² = (s²/B)·(n − B)/(n − 1)`` with ``s²`` the population
variance over samples of ``c_i = uᵀ∇ℓ_i`` (``ℓ_i`` sample ``i``'s loss in the same
normalization, ``uᵀ∇L = mean_i c_i``). ``c_i`` is exact: the forward-mode product ``J_i u``
times ``n·∂L/∂o_i``. ``B = n`` gives ``σ_u² = 0`` and ``ΔS = 0`` (GD).

**Catapult window** (Lewkowycz, Bahri, Dyer, Sohl-Dickstein & Gur-Ari 2020, "The large learning
rate phase of deep learning: the catapult mechanism"): with ``λ₀`` the top eigenvalue of the
NTK at initialization in the loss's normalization (MSE: ``λ₀ = q·λ_max(K₀)``, the Gauss–Newton
sharpness), GD is in the lazy phase for ``η < 2/λ₀``, catapults (the loss grows, the curvature
drops, then it converges) for ``2/λ₀ < η < η_max`` and diverges above ``η_max``. Their
two-layer linear analysis gives ``η_max = 4/λ₀``; for ReLU networks they measured
``η_max ≈ 12/λ₀``. The probe reports ``2/λ₀`` and both bounds, and where the optimizer's
step size falls.

Costs per call: :class:`SelfStabilizationProbe`, one warm-started Lanczos solve (a few to 200
Hessian-vector products), one gradient + one HVP + one third-derivative backward pass
(:func:`gdscope.curvature.third.edge_derivatives`) and, with ``batch_size``, one forward-mode
Jacobian-vector product on the full data. :class:`CatapultProbe`, one NTK Gram of its sample at
the start, nothing afterwards.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gdscope.curvature.third import edge_derivatives, third_derivative_warnings
from gdscope.errors import InvalidArgumentError
from gdscope.kernels import ntk
from gdscope.probes.base import Iterate, ProbeState, Schedule
from gdscope.probes.builtin import _WarmTopEig
from gdscope.probes.kernel import KernelProbe
from gdscope.problem import Problem

__all__ = [
    "CatapultProbe",
    "SelfStabilizationProbe",
    "catapult_window",
    "projected_gradient_variance",
    "sgd_sharpness_gap",
]


def _optimizer_lr(optimizer: torch.optim.Optimizer | None) -> float | None:
    if optimizer is None:
        return None
    lrs = {float(g["lr"]) for g in optimizer.param_groups}
    return lrs.pop() if len(lrs) == 1 else None


def projected_gradient_variance(prob: Problem, u: Tensor, batch_size: int) -> float:
    """``σ_u² = Var_B[uᵀ∇L_B]`` for batches of ``batch_size`` drawn without replacement.

    ``= (s²/B)(n − B)/(n − 1)``, ``s²`` the population variance of ``c_i = uᵀ∇ℓ_i`` with
    ``uᵀ∇L = mean_i c_i`` (module docstring). Needs a problem without adapter whose loss is a
    sum over samples (every built-in loss).
    """
    if prob.adapter is not None:
        raise InvalidArgumentError(
            "projected_gradient_variance: the problem has an adapter (dict batches or output "
            "objects); pass a Problem on tensor inputs."
        )
    n = prob.n
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgumentError(
            f"batch_size={batch_size!r} must be an integer in [1, n] = [1, {n}]."
        )
    if batch_size > n:
        raise InvalidArgumentError(
            f"batch_size={batch_size} exceeds the {n} samples: pass at most n = {n}."
        )
    u = u.detach().to(prob.device, prob.dtype).reshape(-1)
    params = {k: v.detach() for k, v in prob.params.items()}
    tangent = prob.unflatten(u)
    cs: list[Tensor] = []
    for x, y, w in prob.batches():
        _, ju = torch.func.jvp(lambda p, x=x: prob.forward(p, x), (params,), (tangent,))
        out = prob.forward(params, x).detach().requires_grad_(True)
        with torch.enable_grad():
            lb = w * prob.loss_fn(out, y)
            (dl,) = torch.autograd.grad(lb, out)
        cs.append((dl * ju).reshape(out.shape[0], -1).sum(1))
    c = n * torch.cat(cs).double()  # uᵀ∇L = Σ_i ∂L/∂o_i·J_i u = mean_i c_i
    if n < 2 or batch_size == n:
        return 0.0
    s2 = float(c.var(unbiased=False))
    return s2 / batch_size * (n - batch_size) / (n - 1)


def sgd_sharpness_gap(lr: float, alpha: float, beta: float, sigma2: float) -> float:
    """``ΔS = η β σ_u²/(4α)`` (Liao et al. 2026); NaN unless ``α > 0`` (no sharpening: no gap)."""
    if not alpha > 0:
        return math.nan
    return lr * beta * sigma2 / (4.0 * alpha)


def catapult_window(lambda0: float) -> dict[str, float]:
    """``{"catapult_lr_low": 2/λ₀, "catapult_lr_high": 4/λ₀, "catapult_lr_high_relu":
    12/λ₀}`` (Lewkowycz et al. 2020; module docstring)."""
    if not lambda0 > 0:
        return {"catapult_lr_low": math.inf, "catapult_lr_high": math.inf}
    return {
        "catapult_lr_low": 2.0 / lambda0,
        "catapult_lr_high": 4.0 / lambda0,
        "catapult_lr_high_relu": 12.0 / lambda0,
    }


class SelfStabilizationProbe(_WarmTopEig):
    """``ss_sharpness`` ``S``, ``ss_alpha`` ``α = −∇L·∇S``, ``ss_beta`` ``β = ‖∇S‖²`` (module
    docstring), on the tracker's subset at the current parameters; with ``batch_size`` also
    ``ss_sigma2`` (``σ_u²``), ``sgd_gap`` ``ΔS = ηβσ_u²/(4α)`` and ``sgd_sharpness``
    ``2/η − ΔS`` (``η`` the optimizer's learning rate, or ``lr``).

    ``ss_grad_sharpness_norm`` is ``‖∇S‖``, ``ss_matvecs`` the Hessian-vector products of the
    call (Lanczos and the derivative pass), ``ss_converged`` 1/0 for the eigenvector's solve.
    The eigenvector is solved to relative residual ``tol`` (default ``1e-6``: ``∇S`` is only as
    good as ``u``); a near-degenerate top eigenvalue makes ``∇S`` ill-defined.
    """

    name = "self_stabilization"
    iterate: Iterate = "after"

    def __init__(
        self,
        schedule: Schedule | int | None = None,
        *,
        batch_size: int | None = None,
        lr: float | None = None,
        tol: float = 1e-6,
        max_matvecs: int = 300,
        warm_matvecs: int | None = 60,
    ) -> None:
        super().__init__(schedule, tol=tol, max_matvecs=max_matvecs, warm_matvecs=warm_matvecs)
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise InvalidArgumentError(
                f"SelfStabilizationProbe(batch_size={batch_size!r}): pass a positive integer "
                "(the SGD batch size) or None for no SGD gap."
            )
        if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
            raise InvalidArgumentError(
                f"SelfStabilizationProbe(lr={lr!r}): pass a positive step size or None to read "
                "it from the optimizer."
            )
        self.batch_size, self.lr = batch_size, lr

    def compute(self, state: ProbeState) -> dict[str, float]:
        prob = state.subset
        eig = self._solve(self._operator(prob))
        assert self._v is not None
        u = self._v / torch.linalg.norm(self._v)
        pure = bool(third_derivative_warnings(prob.model))
        D = edge_derivatives(prob, u[:, None], pure_layernorm=pure)
        gs = D.G[0, 0].double()
        g = D.grad.double()
        alpha = float(-(g @ gs))
        beta = float(gs @ gs)
        out = {
            "ss_sharpness": eig[self.name],
            "ss_alpha": alpha,
            "ss_beta": beta,
            "ss_grad_sharpness_norm": math.sqrt(beta),
            "ss_matvecs": eig[f"{self.name}_matvecs"] + 1.0,
            "ss_converged": eig[f"{self.name}_converged"],
        }
        if self.batch_size is not None:
            lr = self.lr if self.lr is not None else _optimizer_lr(state.optimizer)
            bs = min(self.batch_size, prob.n)
            sigma2 = projected_gradient_variance(prob, u, bs)
            out["ss_sigma2"] = sigma2
            if lr is not None:
                gap = sgd_sharpness_gap(lr, alpha, beta, sigma2)
                out["sgd_gap"] = gap
                out["sgd_sharpness"] = 2.0 / lr - gap
        return out


class CatapultProbe(KernelProbe):
    """The catapult window from the NTK at initialization (module docstring).

    At the tracker's start: ``λ₀`` = the top eigenvalue of the NTK Gram on the probe's sample
    in the loss's normalization (MSE: ``q·λ_max(K₀)`` with the sample's ``q``; other losses:
    ``λ_max`` of ``J₀ᵀ Q J₀`` with ``Q`` the loss's output Hessian, i.e. the Gauss–Newton
    sharpness). Reports ``catapult_lambda0``, ``catapult_lr_low`` (``2/λ₀``),
    ``catapult_lr_high`` (``4/λ₀``), ``catapult_lr_high_relu`` (``12/λ₀``) and, when the
    learning rate is known (``lr`` or the optimizer's), ``catapult_phase``: 0 lazy
    (``η < 2/λ₀``), 1 catapult (``2/λ₀ ≤ η < 4/λ₀``), 2 past the linear model's bound.
    """

    name = "catapult"

    def __init__(
        self,
        schedule: Schedule | int | None = None,
        samples: int = 256,
        seed: int = 0,
        lr: float | None = None,
    ) -> None:
        super().__init__(schedule, samples=samples, seed=seed)
        self.lr = lr
        self._lambda0: float | None = None

    def start(self, problem: Problem) -> None:
        self._lambda0 = self.initial_sharpness(problem)

    def initial_sharpness(self, prob: Problem) -> float:
        """``λ₀`` at the problem's current parameters (docstring)."""
        sub = self.sample(prob)
        x, y, _ = next(sub.batches())
        with prob.attention_context():
            K = ntk(sub.model, x)
        n, _, k, _ = K.shape
        Kf = K.permute(0, 2, 1, 3).reshape(n * k, n * k).double()
        if sub.loss_name == "mse":
            return sub.q * float(torch.linalg.eigvalsh(Kf)[-1])
        with torch.no_grad():
            out = sub.outputs()
        Q = sub.output_hessian(out, y).double()  # (n, k, k) per-sample output Hessians
        Qb = torch.block_diag(*Q.reshape(n, k, k))
        Qh = _psd_sqrt(Qb)
        return float(torch.linalg.eigvalsh(Qh @ Kf @ Qh)[-1])

    def compute(self, state: ProbeState) -> dict[str, float]:
        if self._lambda0 is None:
            self._lambda0 = self.initial_sharpness(state.problem)
        lam = self._lambda0
        out = {"catapult_lambda0": lam, **catapult_window(lam)}
        lr = self.lr if self.lr is not None else _optimizer_lr(state.optimizer)
        if lr is not None and lam > 0:
            out["catapult_phase"] = float(
                0 if lr < out["catapult_lr_low"] else 1 if lr < out["catapult_lr_high"] else 2
            )
        return out


def _psd_sqrt(A: Tensor) -> Tensor:
    w, Q = torch.linalg.eigh(0.5 * (A + A.T))
    return (Q * w.clamp_min(0).sqrt()) @ Q.T
