"""Machinery for the linear stability of SGD at a minimum (THEORY §3): per-sample curvature,
the second-moment operator, its bounds, and Lyapunov exponents.

:func:`gdscope.theory.stability.stability` assembles these into a report; they are public so that
tests and experiments can check each piece on its own.

**The process.** At a minimum ``θ*`` the SGD error ``e_t = θ_t − θ*`` follows, to first order,
``e_{t+1} = A(H_{ξ_t}) e_t`` (with momentum, on the pair ``z_t = (e_t, d_{t−1})``), where the batch
``ξ_t`` of ``B`` indices is drawn afresh without replacement at every step and

    H_ξ = (1/B) Σ_{i∈ξ} H_i,        H = (1/n) Σ_i H_i.

``H_i`` is the per-sample Hessian *scaled so that its mean is the Hessian of the problem's loss*:
``∇²ℓ_i`` for reduction ``"mean"`` and ``n ∇²ℓ_i`` for ``"sum"`` (``ℓ_i`` the loss of sample ``i``
alone under that reduction). ``H_ξ`` is then the Hessian of the unbiased mini-batch estimate of
``L``: with ``"mean"`` exactly what ``prob.subset(ξ)`` computes, with ``"sum"`` that times ``n/B``
(a loop that sums the batch loss takes steps ``η·B/n`` in these units).

**Step matrices.** ``A(G)`` is affine in the curvature ``G``:

* plain SGD: ``A(G) = I − ηG``;
* heavy ball (PyTorch ``SGD(momentum=β)``) on ``z = (e_t, d_{t−1})``, ``d_t = e_{t+1} − e_t``:
  ``d_t = β d_{t−1} − ηG e_t``, ``e_{t+1} = e_t + d_t``, i.e.
  ``A(G) = [[I − ηG, βI], [−ηG, βI]]``;
* Nesterov (PyTorch ``nesterov=True``; ``e`` the look-ahead iterate PyTorch holds):
  ``d_t = β d_{t−1} − ηG e_t``, ``e_{t+1} = e_t − ηG e_t + β d_t``, i.e.
  ``A(G) = [[I − η(1+β)G, β²I], [−ηG, βI]]``.

With ``G`` replaced by an eigenvalue ``h`` the characteristic polynomials are THEORY §2's
(``z² − (1+β−a)z + β`` and ``z² − (1+β)(1−a)z + β(1−a)``, ``a = ηh``).

**Second moments.** Drawing ``B`` of ``n`` without replacement gives, for any bilinear ``b``,

    E[b(H_ξ, H_ξ)] = (1 − p) b(H, H) + (p/n) Σ_i b(H_i, H_i),     p = (n − B)/(B(n − 1))

(``P(i ∈ ξ) = B/n``, ``P(i, j ∈ ξ) = B(B−1)/(n(n−1))``; ``p = 0`` when ``B = n``). Because ``A``
is affine with ``A(H_ξ)`` averaging to ``A(H)``, the same weights give the second-moment map of
``E[z zᵀ]``:

    T(M) = E[A_ξ M A_ξᵀ] = (1 − p) A(H) M A(H)ᵀ + (p/n) Σ_i A(H_i) M A(H_i)ᵀ.

For plain SGD this is ``M − η(HM + MH) + η²[(1−p) HMH + (p/n) Σ H_i M H_i]``. ``T`` maps positive
semidefinite matrices to positive semidefinite ones, so ``ρ(T)`` is an eigenvalue with a PSD
eigenvector, and ``E‖z_t‖²`` stays bounded iff ``ρ(T) ≤ 1`` (mean-square stability). Without
momentum ``T`` is moreover self-adjoint in the Frobenius inner product, so ``ρ(T) = λ_max(T)``,
``λ_max(T(η))`` is convex in ``η`` and the stable step sizes form an interval ``[0, η*]`` with
(Mulayoff & Michaeli)

    η* = 2 / λ_max(C^{-1/2} D C^{-1/2}),   C(M) = ½(HM + MH),  D(M) = E[H_ξ M H_ξ]

(``T(η) − I = η(ηD − 2C)``). The restriction of ``T`` to all matrices has the same spectral
radius as its restriction to symmetric ones (for a positive map, ``‖T^t(uvᵀ)‖`` is bounded by
``√(‖T^t(uuᵀ)‖‖T^t(vvᵀ)‖)``), so the operators below act on all ``m × m`` matrices.

**The normal space.** Directions annihilated by every ``H_i`` are neutral: ``A`` acts on them as
the identity (with momentum, with eigenvalues 1 and ``β``), and ``ρ = 1`` there whatever ``η``.
They are projected out: every exact quantity is computed on the *normal space*
``R = span ∪_i range(H_i) = range(Σ_i H_i²)`` (equal to ``range(H)`` when every ``H_i`` is PSD, as
at an interpolating MSE minimum, where ``H_i = J_iᵀ Q_i J_i``), which every ``A(H_i)`` maps to
itself. A direction counts as neutral when its RMS per-sample curvature ``√(uᵀ(Σ H_i²/n)u)`` is
below ``flat_tol`` times the largest. The spectrum of ``T`` on all of parameter space is that on
``R`` together with 1 (neutral–neutral) and ``1 − ηh`` (neutral–normal).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor
from torch.func import grad, vjp, vmap
from torch.utils._pytree import tree_map

from gdscope.errors import InvalidArgumentError, ShapeMismatchError
from gdscope.linalg import CallableOperator, lanczos
from gdscope.problem import Params, Problem, _batch_size, _take

__all__ = [
    "LyapunovEstimate",
    "NormalSpace",
    "SampleCurvature",
    "lyapunov_estimate",
    "noise_factor",
    "second_moment_matrix",
    "step_matrix",
]

DENSE_T_LIMIT = 32  # build T densely (m² × m²) for state dimension m up to this
CHUNK_NUMBERS = 2 * 10**7  # numbers held per vmapped chunk of per-sample products
DENSE_SAMPLE_NUMBERS = 5 * 10**7  # n·P² numbers: dense per-sample Hessians below this


# ---------------------------------------------------------------------- closed forms
def noise_factor(n: int, batch_size: int) -> float:
    """``p = (n − B)/(B(n − 1))``: the weight of the per-sample term in ``E[H_ξ ⊗ H_ξ]``.

    ``0`` when ``B = n`` (the batch is the data set; also covers ``n = 1``), ``1`` when ``B = 1``.

    >>> noise_factor(24, 4), noise_factor(10, 10), noise_factor(10, 1)
    (0.21739130434782608, 0.0, 1.0)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgumentError(f"n={n!r} must be a positive number of samples.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise InvalidArgumentError(
            f"batch_size={batch_size!r} must be an integer with 1 <= batch_size <= n={n}."
        )
    if batch_size == n:
        return 0.0
    return (n - batch_size) / (batch_size * (n - 1))


def _momentum_coefficients(momentum: float, nesterov: bool) -> tuple[float, float]:
    """``(c, γ)`` of ``A(G) = [[I − ηcG, γI], [−ηG, βI]]`` (heavy ball or Nesterov)."""
    if nesterov:
        return 1.0 + momentum, momentum * momentum
    return 1.0, momentum


def step_matrix(
    curvature: Tensor, lr: float, momentum: float = 0.0, nesterov: bool = False
) -> Tensor:
    """The linearized SGD step ``A(G)`` for a curvature ``G`` (``(m, m)`` or ``(..., m, m)``).

    ``I − ηG`` without momentum; the ``2m × 2m`` pair map of the module docstring with it.
    """
    m = curvature.shape[-1]
    eye = torch.eye(m, dtype=curvature.dtype, device=curvature.device)
    if momentum == 0:
        return eye - lr * curvature
    c, gamma = _momentum_coefficients(momentum, nesterov)
    eye = eye.expand_as(curvature)
    top = torch.cat([eye - lr * c * curvature, gamma * eye], dim=-1)
    bottom = torch.cat([-lr * curvature, momentum * eye], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def second_moment_matrix(
    hessians: Tensor,
    lr: float,
    batch_size: int,
    momentum: float = 0.0,
    nesterov: bool = False,
) -> Tensor:
    """Dense ``T`` acting on row-major ``vec(M)``: ``(1−p) A⊗A + (p/n) Σ A_i⊗A_i`` (``m² × m²``).

    ``hessians`` is ``(n, P, P)``, the scaled per-sample Hessians (their mean is ``H``). Row-major
    ``vec(A M Bᵀ) = (A ⊗ B) vec(M)``, so this is the matrix of ``M ↦ E[A_ξ M A_ξᵀ]``. Meant for
    small ``m`` (tests, the reduced normal space): it holds ``m⁴`` numbers.
    """
    if hessians.ndim != 3 or hessians.shape[1] != hessians.shape[2]:
        raise ShapeMismatchError(
            f"hessians must be (n, P, P) per-sample Hessians, got {tuple(hessians.shape)}."
        )
    n = hessians.shape[0]
    p = noise_factor(n, batch_size)
    A = step_matrix(hessians.mean(0), lr, momentum, nesterov)
    As = step_matrix(hessians, lr, momentum, nesterov)
    m = A.shape[0]
    flat = As.reshape(n, m * m)
    # Σ_i kron(A_i, A_i)[(a,c),(b,d)] = Σ_i A_i[a,b] A_i[c,d]
    S = (flat.T @ flat).reshape(m, m, m, m).permute(0, 2, 1, 3).reshape(m * m, m * m)
    return (1 - p) * torch.kron(A, A) + (p / n) * S


# ---------------------------------------------------------------------- per-sample curvature
def _unsqueeze(x: Any, dim: int) -> Any:
    """``x.unsqueeze(dim)`` for a tensor or every tensor of a dict of inputs."""
    return tree_map(lambda t: t.unsqueeze(dim), x)


class SampleCurvature:
    """Per-sample and mini-batch Hessian products of a tensor-data :class:`Problem`.

    ``H_i`` (scaled: ``∇²ℓ_i`` for reduction "mean", ``n∇²ℓ_i`` for "sum") satisfies
    ``(1/n) Σ H_i = ∇²L`` exactly; ``H_ξ = (1/B) Σ_{i∈ξ} H_i`` is computed as the Hessian of the
    batch loss ``prob.batch_loss`` on ``ξ`` (the loss ``prob.subset(ξ)`` evaluates) times ``1``
    ("mean") or ``n/B`` ("sum"). Products are reverse-over-reverse (``vjp`` of ``grad``),
    ``vmap``-ed over samples (or chains) in chunks of about :data:`CHUNK_NUMBERS` numbers.
    ``hvps`` counts per-sample products (a mini-batch product counts once).
    """

    def __init__(self, prob: Problem, params: Params | None = None) -> None:
        data = prob.full_batch
        if data is None:
            raise InvalidArgumentError(
                "per-sample Hessians need the problem's data as (X, Y) tensors; build the "
                "Problem from tensors to analyse SGD."
            )
        self.prob = prob
        self.X, self.Y = data
        self.n = prob.n
        self.P = prob.num_params
        src = prob.params if params is None else params
        self.params = {k: src[k].detach().clone().to(prob.device, prob.dtype) for k in prob.names}
        self.theta = prob.flatten(self.params)
        self.dtype, self.device = prob.dtype, prob.device
        self.hvps = 0

    def batch_scale(self, b: int) -> float:
        """Factor turning the Hessian of ``batch_loss`` on ``b`` samples into ``H_ξ``."""
        return 1.0 if self.prob.reduction == "mean" else self.n / b

    def _hvp(self, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
        """``H_batch v`` for one batch ``(x, y)`` (with its leading batch dimension)."""
        prob = self.prob
        _, fn = vjp(grad(lambda p: prob.batch_loss(p, x, y)), self.params)
        (hv,) = fn(prob.unflatten(v))
        return self.batch_scale(_batch_size(x)) * prob.flatten(hv)

    def _chunk(self, per_item: int) -> int:
        return max(1, CHUNK_NUMBERS // max(1, per_item))

    def batch_matvec(self, idx: Tensor, V: Tensor) -> Tensor:
        """``H_{ξ_c} v_c`` for chains ``c``: ``idx`` is ``(C, B)``, ``V`` is ``(C, P)``."""
        x, y = _take(self.X, idx), self.Y[idx]
        f = vmap(self._hvp, chunk_size=self._chunk(self.P * idx.shape[1]))
        self.hvps += idx.shape[0]
        return f(x, y, V.to(self.device, self.dtype))

    def sample_matvec(self, v: Tensor, idx: Tensor | None = None) -> Tensor:
        """``H_i v`` for every sample (or those in ``idx``): ``(n, P)``."""
        x, y = (self.X, self.Y) if idx is None else (_take(self.X, idx), self.Y[idx])
        f = vmap(self._hvp, in_dims=(0, 0, None), chunk_size=self._chunk(self.P))
        self.hvps += _batch_size(x)
        return f(_unsqueeze(x, 1), y[:, None], v.to(self.device, self.dtype))

    def mean_matvec(self, v: Tensor) -> Tensor:
        """``(1/n) Σ H_i v`` (equals ``H v``: a consistency check), in chunks."""
        out = torch.zeros(self.P, dtype=self.dtype, device=self.device)
        for idx in self._sample_chunks(1):
            out += self.sample_matvec(v, idx).sum(0)
        return out / self.n

    def mean_square_matvec(self, v: Tensor) -> Tensor:
        """``(1/n) Σ H_i (H_i v)``: two per-sample passes, chunked."""
        v = v.to(self.device, self.dtype)
        f = vmap(self._hvp, chunk_size=None)
        out = torch.zeros(self.P, dtype=self.dtype, device=self.device)
        for idx in self._sample_chunks(2):
            u = self.sample_matvec(v, idx)
            out += f(_unsqueeze(_take(self.X, idx), 1), self.Y[idx][:, None], u).sum(0)
            self.hvps += idx.numel()
        return out / self.n

    def compress(self, U: Tensor) -> Tensor:
        """``Uᵀ H_i U`` for every sample: ``(n, k, k)`` from ``n·k`` per-sample products."""
        k = U.shape[1]
        U = U.to(self.device, self.dtype)
        inner = vmap(self._hvp, in_dims=(None, None, 1), out_dims=1)  # over U's columns
        f = vmap(inner, in_dims=(0, 0, None))  # over samples
        out = []
        for idx in self._sample_chunks(k):
            HU = f(_unsqueeze(_take(self.X, idx), 1), self.Y[idx][:, None], U)  # (c, P, k)
            self.hvps += idx.numel() * k
            out.append(torch.einsum("pa,cpb->cab", U, HU))
        return torch.cat(out)

    def dense(self) -> Tensor:
        """Dense per-sample Hessians ``(n, P, P)``: ``H_i e_j`` for every basis vector, by the
        same reverse-over-reverse products as :meth:`compress` (``vjp`` of ``grad``).

        Not ``torch.func.hessian`` (forward-over-reverse): through PyTorch's fused LayerNorm
        kernel it is wrong (an error of 0.6 measured on a small LayerNorm MLP, torch 2.13), while
        reverse-over-reverse agrees with finite differences. Symmetrized against round-off.
        """
        eye = torch.eye(self.P, dtype=self.dtype, device=self.device)
        out = self.compress(eye)
        return 0.5 * (out + out.transpose(1, 2))

    def _sample_chunks(self, per_sample_vectors: int):
        c = self._chunk(self.P * per_sample_vectors)
        for s in range(0, self.n, c):
            yield torch.arange(s, min(s + c, self.n), device=self.Y.device)


# ---------------------------------------------------------------------- the normal space
@dataclass(frozen=True)
class NormalSpace:
    """The per-sample Hessians compressed to the normal space ``R`` (float64).

    ``basis`` is ``P × r`` orthonormal and diagonalizes ``H`` on ``R``: ``basisᵀ H basis =
    diag(h)`` with ``h`` ascending; ``hessians[i] = basisᵀ H_i basis`` (``(n, r, r)``).
    ``consistency`` is ``‖(1/n) Σ H_i v − H v‖/‖H v‖`` for a random ``v`` (the per-sample
    decomposition checked against the full-batch operator); ``leak`` is the largest
    ``‖H_i z‖/‖z‖`` over probes ``z ⊥ R``, relative to the largest RMS curvature (0 when ``R``
    comes from ``Σ H_i²`` itself).
    """

    basis: Tensor
    h: Tensor
    hessians: Tensor
    rms_curvature: Tensor
    method: str
    consistency: float
    leak: float

    @property
    def dim(self) -> int:
        return int(self.h.numel())


def build_normal_space(
    curv: SampleCurvature,
    full_matvec: Callable[[Tensor], Tensor],
    flat_tol: float,
    *,
    dense_numbers: int = DENSE_SAMPLE_NUMBERS,
    max_numbers: int | None = None,
    seed: int = 0,
) -> NormalSpace | str:
    """Compress the per-sample Hessians to ``R`` (see the module docstring).

    With ``n·P² ≤ dense_numbers`` the per-sample Hessians are built densely and ``R`` is the
    range of ``Σ H_i²``. Otherwise ``R = range(H)`` from a dense ``H`` (``P`` full-batch
    products) and ``Uᵀ H_i U`` from ``n·r`` per-sample products; random probes orthogonal to
    ``R`` check that the ``H_i`` vanish there (else a string says why not, as when
    ``n·r² > max_numbers``).
    """
    n, P = curv.n, curv.P
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(P, generator=gen, dtype=torch.float64).to(curv.device, curv.dtype)
    hv = full_matvec(v)
    if n * P * P <= dense_numbers:
        Hs = curv.dense().double()
        mean_v = Hs.mean(0) @ v.double()
        # R = range(Σ H_i²) from the SVD of the stacked H_i, not from eigh(Σ H_i²): squaring
        # resolves singular values only down to √eps·max (a flat_tol below ~1e-7 then kept
        # round-off directions, and H was "not positive definite on R")
        _, s, Wt = torch.linalg.svd(Hs.reshape(n * P, P), full_matrices=False)
        s = s / math.sqrt(n)
        keep = s > flat_tol * s.max().clamp_min(torch.finfo(torch.float64).tiny)
        U = Wt.T[:, keep]
        Hr = torch.einsum("pa,ipq,qb->iab", U, Hs, U)
        method = f"dense per-sample Hessians ({n}×{P}²), R = range(Σ H_i²)"
        leak = 0.0
    else:
        eye = torch.eye(P, dtype=curv.dtype, device=curv.device)
        H = torch.stack([full_matvec(eye[:, j]) for j in range(P)], dim=1).double()
        h_all, W = torch.linalg.eigh(0.5 * (H + H.T))
        keep = h_all.abs() > flat_tol * h_all.abs().max().clamp_min(1e-300)
        U = W[:, keep]
        r = U.shape[1]
        if max_numbers is not None and n * r * r > max_numbers:
            return (
                f"the normal space has dimension {r}: {n}·{r}² reduced per-sample numbers "
                f"exceed the budget {max_numbers}"
            )
        Hr = curv.compress(U.to(curv.dtype)).double()
        mean_v = curv.mean_matvec(v).double()
        # probes orthogonal to R: the per-sample Hessians must vanish there
        Z = torch.randn(P, 2, generator=gen, dtype=torch.float64).to(U.device)
        Z = Z - U @ (U.T @ Z)
        Z = Z / torch.linalg.vector_norm(Z, dim=0).clamp_min(1e-300)
        scale = Hr.flatten(1).norm(dim=1).max().item() / max(1.0, math.sqrt(r))
        leak = 0.0
        if U.shape[1] < P:
            for j in range(Z.shape[1]):
                HZ = curv.sample_matvec(Z[:, j].to(curv.dtype))
                leak = max(leak, HZ.norm(dim=1).max().item() / max(scale, 1e-300))
        method = f"range(H) from a dense H ({P} products), Uᵀ H_i U from {n}·{r} per-sample HVPs"
    consistency = (torch.linalg.vector_norm(mean_v - hv.double()) / hv.double().norm()).item()
    Hr = 0.5 * (Hr + Hr.transpose(1, 2))
    Hbar = Hr.mean(0)
    h, V = torch.linalg.eigh(0.5 * (Hbar + Hbar.T))
    U = U @ V
    Hr = V.T @ Hr @ V
    rms = torch.einsum("iab,iba->a", Hr, Hr).div(n).clamp_min(0).sqrt()
    return NormalSpace(U, h, Hr, rms, method, consistency, leak)


# ---------------------------------------------------------------------- exact mean square
@dataclass(frozen=True)
class SpectralValue:
    """An extreme eigenvalue with its residual bound and how it was computed."""

    value: float
    residual: float
    converged: bool
    method: str
    matvecs: int


def _sym_top(mat: Tensor) -> SpectralValue:
    vals = torch.linalg.eigvalsh(0.5 * (mat + mat.T))
    err = 10 * mat.shape[0] * torch.finfo(mat.dtype).eps * vals.abs().max().item()
    return SpectralValue(vals[-1].item(), err, True, f"dense eigvalsh ({mat.shape[0]})", 0)


def _apply_T(A: Tensor, As: Tensor, p: float, M: Tensor) -> Tensor:
    """``(1−p) A M Aᵀ + (p/n) Σ A_i M A_iᵀ`` for a block ``M`` of shape ``(b, m, m)``."""
    n = As.shape[0]
    out = (1 - p) * (A @ M @ A.T)
    if p:
        acc = torch.zeros_like(M)
        step = max(1, CHUNK_NUMBERS // max(1, M.shape[0] * M.shape[1] ** 2))
        for s in range(0, n, step):
            Ai = As[s : s + step]
            acc += (Ai[:, None] @ M[None] @ Ai[:, None].transpose(-1, -2)).sum(0)
        out = out + (p / n) * acc
    return out


def _matrix_operator(fn: Callable[[Tensor], Tensor], m: int, dtype: torch.dtype, device):
    def block(V: Tensor) -> Tensor:
        M = V.T.reshape(-1, m, m)
        return fn(M).reshape(V.shape[1], m * m).T

    return CallableOperator(lambda v: block(v[:, None])[:, 0], m * m, dtype, device, block)


def mean_square_rho(
    space: NormalSpace,
    lr: float,
    batch_size: int,
    momentum: float = 0.0,
    nesterov: bool = False,
    tol: float = 1e-10,
    seed: int = 0,
) -> SpectralValue:
    """``ρ(T)`` on the normal space: dense for state dimension ``m ≤ DENSE_T_LIMIT``, else
    Lanczos (no momentum: ``T`` is self-adjoint, ``ρ = λ_max``) or ARPACK (momentum)."""
    n = space.hessians.shape[0]
    p = noise_factor(n, batch_size)
    Hbar = torch.diag(space.h)
    A = step_matrix(Hbar, lr, momentum, nesterov)
    As = step_matrix(space.hessians, lr, momentum, nesterov)
    m = A.shape[0]
    if m <= DENSE_T_LIMIT:
        T = second_moment_matrix(space.hessians, lr, batch_size, momentum, nesterov)
        if momentum == 0:
            out = _sym_top(T)
            return SpectralValue(out.value, out.residual, True, "dense T, eigvalsh", 0)
        ev = np.linalg.eigvals(T.cpu().numpy())
        k = int(np.argmax(np.abs(ev)))
        err = 10 * m * m * np.finfo(np.float64).eps * float(np.abs(ev).max())
        return SpectralValue(float(abs(ev[k])), err, True, "dense T, eigvals", 0)
    op = _matrix_operator(lambda M: _apply_T(A, As, p, M), m, A.dtype, A.device)
    if momentum == 0:
        res = lanczos(op, 1, "largest", tol, seed=seed, max_matvecs=2000)
        return SpectralValue(
            res.values[0].item(),
            res.residuals[0].item(),
            res.converged,
            "Lanczos on T over m×m matrices",
            res.matvecs,
        )
    import scipy.sparse.linalg as spla

    sop = spla.LinearOperator(
        (m * m, m * m),
        matvec=lambda x: op.matvec(torch.as_tensor(np.ascontiguousarray(x)).to(A)).cpu().numpy(),
        dtype=np.float64,
    )
    rng = np.random.default_rng(seed)
    v0 = np.eye(m).reshape(-1) + 1e-3 * rng.standard_normal(m * m)
    try:
        vals, vecs = spla.eigs(sop, k=1, which="LM", tol=tol, v0=v0, maxiter=5000)
    except spla.ArpackNoConvergence as e:
        if len(e.eigenvalues):
            lam = float(abs(e.eigenvalues[0]))
            return SpectralValue(lam, math.inf, False, "ARPACK on T (not converged)", op.matvecs)
        return SpectralValue(math.nan, math.inf, False, "ARPACK on T (not converged)", op.matvecs)
    x = vecs[:, 0]
    Tx = sop.matvec(x.real) + 1j * sop.matvec(x.imag)
    res = float(np.linalg.norm(Tx - vals[0] * x) / max(np.linalg.norm(x), 1e-300))
    return SpectralValue(
        float(abs(vals[0])), res, True, "ARPACK on T over m×m matrices", op.matvecs
    )


def mean_square_threshold(
    space: NormalSpace, batch_size: int, tol: float = 1e-10, seed: int = 0
) -> SpectralValue | None:
    """``η* = 2/λ_max(C^{-1/2} D C^{-1/2})`` (no momentum); ``None`` unless ``H > 0`` on ``R``.

    ``value`` is ``η*``; ``residual`` bounds ``|η* − value|`` (propagated from the eigenvalue's).
    In ``H``'s eigenbasis ``C`` is the elementwise factor ``(h_a + h_b)/2``.
    """
    h = space.h
    if h.numel() == 0 or h.min() <= 0:
        return None
    n, r = space.hessians.shape[0], h.numel()
    p = noise_factor(n, batch_size)
    isq = (0.5 * (h[:, None] + h[None, :])).rsqrt()
    Hd = torch.diag(h)

    def D(M: Tensor) -> Tensor:
        out = (1 - p) * (Hd @ M @ Hd)
        if p:
            Hs = space.hessians
            acc = torch.zeros_like(M)
            step = max(1, CHUNK_NUMBERS // max(1, M.shape[0] * r * r))
            for s in range(0, n, step):
                Hi = Hs[s : s + step]
                acc += (Hi[:, None] @ M[None] @ Hi[:, None]).sum(0)
            out = out + (p / n) * acc
        return out

    if r <= DENSE_T_LIMIT:
        eye = torch.eye(r * r, dtype=h.dtype, device=h.device).reshape(r * r, r, r)
        K = (isq * D(isq * eye)).reshape(r * r, r * r).T
        top = _sym_top(K)
    else:
        op = _matrix_operator(lambda M: isq * D(isq * M), r, h.dtype, h.device)
        res = lanczos(op, 1, "largest", tol, seed=seed, max_matvecs=2000)
        top = SpectralValue(
            res.values[0].item(), res.residuals[0].item(), res.converged, "Lanczos", res.matvecs
        )
    mu = top.value
    eta = 2.0 / mu
    err = 2.0 * top.residual / max(mu * (mu - top.residual), 1e-300) if top.converged else math.inf
    return SpectralValue(eta, err, top.converged, "2/λ_max(C^{-1/2} D C^{-1/2})", top.matvecs)


def wu_ma_e_reduced(
    space: NormalSpace, lr: float, batch_size: int
) -> tuple[float, float | None, float]:
    """Wu–Ma–E on ``R``: ``λ_max[(I − ηH)² + η² p Σ]``, its threshold ``2/λ_max(H^{-½} E[H_ξ²]
    H^{-½})`` (``None`` unless ``H > 0`` on ``R``) and ``λ_max(Σ)``, ``Σ = (1/n)Σ H_i² − H²``."""
    h, Hs = space.h, space.hessians
    n = Hs.shape[0]
    p = noise_factor(n, batch_size)
    S2 = torch.einsum("iab,ibc->ac", Hs, Hs) / n
    Sigma = S2 - torch.diag(h * h)
    second = (1 - p) * torch.diag(h * h) + p * S2  # E[H_ξ²]
    eye = torch.eye(h.numel(), dtype=h.dtype, device=h.device)
    W = eye - 2 * lr * torch.diag(h) + lr * lr * second
    value = _sym_top(W).value
    thr = None
    if h.numel() and h.min() > 0:
        isq = h.rsqrt()
        thr = 2.0 / _sym_top(isq[:, None] * second * isq[None, :]).value
    sig = _sym_top(Sigma).value if h.numel() else 0.0
    return value, thr, sig


# ---------------------------------------------------------------------- Lyapunov exponents
@dataclass(frozen=True)
class LyapunovEstimate:
    """Top Lyapunov exponent of the SGD product, per step, with a confidence interval.

    ``value`` is the mean over ``chains`` independent chains of each chain's average
    ``log‖A_{ξ_t} v_t‖`` (``v_t`` renormalized every step) over ``steps`` steps after
    ``burn_in`` discarded ones; ``ci`` the two-sided ``level`` t-interval across chains. The
    interval reflects the spread between chains, not the bias of a finite horizon (a chain that
    has not yet aligned with the top direction underestimates ``λ``). ``subspace`` names the
    directions: "normal" (generic start in the normal space) or "stiff" (the process compressed
    to the top Hessian eigenvectors with ``ηh > cutoff``; ``dim`` of them).
    """

    value: float
    ci: tuple[float, float]
    stderr: float
    chains: int
    steps: int
    burn_in: int
    per_chain: tuple[float, ...]
    subspace: str
    dim: int | None
    method: str
    level: float = 0.95

    @property
    def half_width(self) -> float:
        return 0.5 * (self.ci[1] - self.ci[0])

    @property
    def sign(self) -> int | None:
        """``-1`` or ``+1`` when the interval excludes 0, else ``None`` (undetermined)."""
        if self.ci[1] < 0:
            return -1
        if self.ci[0] > 0:
            return 1
        return None


def _summarize(
    per_chain: Tensor,
    steps: int,
    burn_in: int,
    subspace: str,
    dim: int | None,
    method: str,
    level: float = 0.95,
) -> LyapunovEstimate:
    x = per_chain.double().cpu().numpy()
    c = x.size
    mean = float(x.mean())
    sd = float(x.std(ddof=1)) if c > 1 else math.inf
    se = sd / math.sqrt(c)
    q = float(stats.t.ppf(0.5 + level / 2, c - 1)) if c > 1 else math.inf
    ci = (mean - q * se, mean + q * se) if math.isfinite(se) else (-math.inf, math.inf)
    return LyapunovEstimate(
        mean, ci, se, c, steps, burn_in, tuple(x.tolist()), subspace, dim, method, level
    )


def lyapunov_chains(
    step: Callable[[Tensor, Tensor], Tensor],
    v0: Tensor,
    n: int,
    batch_size: int,
    steps: int,
    burn_in: int,
    gen: torch.Generator,
    project: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Per-chain averages of ``log‖w_t‖`` with ``w_t = step(v_t, idx_t)`` and ``v_{t+1} = w_t /
    ‖w_t‖``, batches ``idx_t`` (``(C, B)``) drawn afresh without replacement each step."""
    v = project(v0) if project is not None else v0
    v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True)
    acc = torch.zeros(v.shape[0], dtype=torch.float64)
    tiny = torch.finfo(v.dtype).tiny
    for t in range(burn_in + steps):
        idx = torch.rand(v.shape[0], n, generator=gen).argsort(dim=1)[:, :batch_size]
        w = step(v, idx)
        if project is not None:
            w = project(w)
        nr = torch.linalg.vector_norm(w, dim=1)
        if t >= burn_in:
            acc += torch.log(nr.clamp_min(tiny)).double().cpu()
        v = w / nr.clamp_min(tiny)[:, None]
    return acc / steps


def lyapunov_estimate(
    step_matrices: Tensor,
    lr: float,
    batch_size: int,
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    coords: Tensor | None = None,
    chains: int = 8,
    steps: int = 400,
    burn_in: int = 100,
    seed: int = 0,
    subspace: str = "normal",
) -> LyapunovEstimate:
    """Lyapunov exponent of ``Π A(H_{ξ_t}) ⋯ A(H_{ξ_1})`` from dense per-sample curvatures.

    ``step_matrices`` is ``(n, r, r)`` per-sample Hessians (any basis); ``coords`` (optional) a
    subset of coordinates to compress to (the stiff subspace in ``H``'s eigenbasis; with
    momentum both halves of the pair are compressed).
    """
    n, r = step_matrices.shape[0], step_matrices.shape[1]
    Hs = step_matrices if coords is None else step_matrices[:, coords][:, :, coords]
    k = Hs.shape[1]
    As = step_matrix(Hs, lr, momentum, nesterov)
    m = As.shape[1]
    gen = torch.Generator().manual_seed(seed)
    v0 = torch.randn(chains, m, generator=gen, dtype=torch.float64).to(As)

    def step(v: Tensor, idx: Tensor) -> Tensor:
        A = As[idx.to(As.device)].mean(1)  # (C, m, m): A(H_ξ) = mean of A(H_i)
        return (A @ v[:, :, None])[:, :, 0]

    per = lyapunov_chains(step, v0, n, batch_size, steps, burn_in, gen)
    method = f"dense {k}×{k} per-sample curvature in the normal space"
    return _summarize(per, steps, burn_in, subspace, k if coords is not None else r, method)


def lyapunov_hvp(
    curv: SampleCurvature,
    lr: float,
    batch_size: int,
    starts: Tensor,
    *,
    momentum: float = 0.0,
    nesterov: bool = False,
    projectors: list[Tensor | None],
    labels: list[str],
    chains: int = 8,
    steps: int = 400,
    burn_in: int = 100,
    seed: int = 0,
) -> list[LyapunovEstimate]:
    """Lyapunov exponents from mini-batch HVPs (matrix-free), several subspaces at once.

    ``starts`` is ``(S, C, P)`` start vectors for ``S`` subspaces of ``C`` chains each;
    ``projectors[s]`` an orthonormal ``P × k`` basis to compress subspace ``s`` to (or ``None``).
    Every chain draws its own batches; all ``S·C`` products of a step are one ``vmap``-ed
    call. With momentum the state is the pair ``(e, d)``, started at ``d = 0``.
    """
    S, C, P = starts.shape
    gen = torch.Generator().manual_seed(seed)
    c_coef, gamma = _momentum_coefficients(momentum, nesterov)
    dt, dev = curv.dtype, curv.device

    def project(z: Tensor) -> Tensor:
        parts = list(z.view(S, C, -1, P).unbind(0))
        for s, U in enumerate(projectors):
            if U is not None:
                parts[s] = (parts[s] @ U) @ U.T
        return torch.stack(parts).view(S * C, -1)

    def step(z: Tensor, idx: Tensor) -> Tensor:
        e = z[:, :P]
        he = curv.batch_matvec(idx, e)
        if momentum == 0:
            return e - lr * he
        d = z[:, P:]
        e_new = e - lr * c_coef * he + gamma * d
        d_new = momentum * d - lr * he
        return torch.cat([e_new, d_new], dim=1)

    z0 = starts.to(dev, dt).reshape(S * C, P)
    if momentum:
        # d_{-1} = 0 keeps the pair in R × R (a random d would feed neutral directions of e)
        z0 = torch.cat([z0, torch.zeros_like(z0)], dim=1)
    needs = any(U is not None for U in projectors)
    per = lyapunov_chains(
        step, z0, curv.n, batch_size, steps, burn_in, gen, project if needs else None
    ).view(S, C)
    out = []
    for s in range(S):
        U = projectors[s]
        dim = None if U is None else int(U.shape[1])
        out.append(
            _summarize(per[s], steps, burn_in, labels[s], dim, "mini-batch HVPs (vmap over chains)")
        )
    return out
