"""The tracked top eigenspace and the complementarity problem at the edge (central flows).

:func:`top_eigs` (warm-started block Lanczos) and :func:`refine` (one block Rayleigh–Ritz step)
track the top eigenpairs of a symmetric operator along a flow; :func:`solve_sdcp` solves the
semidefinite complementarity problem that sets the oscillation covariance
(:mod:`gdscope.theory.central_flow`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from gdscope.linalg.lanczos import lanczos
from gdscope.linalg.operator import CallableOperator

__all__ = ["refine", "solve_sdcp", "to_numpy", "top_eigs", "track"]


def to_numpy(t: Tensor) -> np.ndarray:
    """Detached float64 NumPy copy."""
    return t.detach().cpu().double().numpy()


def top_eigs(
    op: CallableOperator, m: int, warm: Tensor | None, tol: float, seed: int
) -> tuple[Tensor, Tensor, int]:
    """Top ``m`` eigenpairs by block Lanczos, warm-started from the tracked vectors."""
    res = lanczos(
        op,
        m,
        "largest",
        tol,
        v0=warm,
        block_size=m,
        return_vectors=True,
        seed=seed,
        verify_multiplicity=False,
    )
    assert res.vectors is not None
    return res.values.to(op.dtype), res.vectors.to(op.dtype), res.matvecs


def track(
    op: CallableOperator, V: Tensor | None, m: int, stale: bool, tol: float, seed: int
) -> tuple[Tensor, Tensor, int, bool]:
    """The top ``m`` eigenpairs of ``op`` along a trajectory: a fresh :func:`top_eigs` solve
    (warm-started from ``V``) when ``V`` is missing, of another width, or ``stale``; else one
    :func:`refine` step. Returns ``(λ, V, products, solved)``."""
    if V is None or V.shape[1] != m or stale:
        warm = None if V is None else V[:, : min(m, V.shape[1])]
        lam, V, mv = top_eigs(op, m, warm, tol, seed)
        return lam, V, mv, True
    lam, V, mv = refine(op, V)
    return lam, V, mv, False


def refine(op: CallableOperator, V: Tensor) -> tuple[Tensor, Tensor, int]:
    """One block Rayleigh–Ritz step on ``span[V, R]`` with ``R = HV − V(VᵀHV)`` (a LOBPCG
    step without the previous direction): tracks a slowly moving top eigenspace with ``2m``
    products instead of a fresh solve."""
    m = V.shape[1]
    HV = op.matmat(V)
    R = HV - V @ (V.T @ HV)
    R = R - V @ (V.T @ R)
    floor = 1e-10 * max(float(torch.linalg.norm(HV)), 1e-300)
    norms = torch.linalg.norm(R, dim=0)
    R = R[:, norms > floor][:, : max(0, V.shape[0] - m)]
    if R.shape[1]:
        Q, tri = torch.linalg.qr(R)
        Q = Q[:, tri.diagonal().abs() > floor]
        Q = Q - V @ (V.T @ Q)
        Q = Q[:, torch.linalg.norm(Q, dim=0) > 0.5]  # drop what lay in span V
    if R.shape[1] == 0 or Q.shape[1] == 0:
        M = 0.5 * (V.T @ HV + HV.T @ V)
        w, S = torch.linalg.eigh(M)
        return w.flip(-1), V @ S.flip(-1), m
    Q, _ = torch.linalg.qr(Q)
    HQ = op.matmat(Q)
    Z = torch.cat([V, Q], 1)
    HZ = torch.cat([HV, HQ], 1)
    T = Z.T @ HZ
    w, S = torch.linalg.eigh(0.5 * (T + T.T))
    w, S = w.flip(-1)[:m], S.flip(-1)[:, :m]
    return w, Z @ S, m + Q.shape[1]


def _psd_project(X: np.ndarray) -> np.ndarray:
    w, Q = np.linalg.eigh(0.5 * (X + X.T))
    return (Q * np.maximum(w, 0.0)) @ Q.T


def solve_sdcp(
    alpha: np.ndarray,
    B: np.ndarray,
    *,
    x0: np.ndarray | None = None,
    tol: float = 1e-11,
    max_iter: int = 20000,
) -> tuple[np.ndarray, float]:
    """Solve ``X ⪰ 0, A = α + B[X] ⪰ 0, ⟨X, A⟩ = 0`` for symmetric ``α`` (``m × m``) and a
    positive semidefinite ``B`` (``m² × m²``, acting on ``vec(X)``, row-major).

    It is the optimality condition of ``min_{X ⪰ 0} ½ vec(X)ᵀ B vec(X) + ⟨α, X⟩``, solved by
    FISTA with adaptive restart and projection onto the PSD cone (exact for ``m = 1``:
    ``X = max(0, −α/B)``). Returns ``(X, residual)`` with ``residual`` the projected-gradient
    norm ``‖X − Π(X − A)‖_F`` relative to ``max(1, ‖α‖_F)``; a problem without solution (``α``
    negative along a direction ``B`` does not see) gives a large residual.
    """
    alpha = 0.5 * (np.asarray(alpha, dtype=np.float64) + np.asarray(alpha, dtype=np.float64).T)
    m = alpha.shape[0]
    B = np.asarray(B, dtype=np.float64).reshape(m * m, m * m)
    B = 0.5 * (B + B.T)
    scale = max(1.0, float(np.linalg.norm(alpha)))
    if m == 0 or float(np.linalg.eigvalsh(alpha).min()) >= 0:
        return np.zeros((m, m)), 0.0
    if m == 1:
        b = float(B[0, 0])
        if b <= 0:
            return np.zeros((1, 1)), abs(float(alpha[0, 0])) / scale
        return np.array([[max(0.0, -float(alpha[0, 0]) / b)]]), 0.0

    def grad(X: np.ndarray) -> np.ndarray:
        return alpha + (B @ X.reshape(-1)).reshape(m, m)

    def residual(X: np.ndarray) -> float:
        return float(np.linalg.norm(X - _psd_project(X - grad(X)))) / scale

    lip = float(np.linalg.eigvalsh(B).max())
    if lip <= 0:
        return np.zeros((m, m)), residual(np.zeros((m, m)))
    step = 1.0 / lip
    X = _psd_project(np.zeros((m, m)) if x0 is None else np.asarray(x0, dtype=np.float64))
    Y, t = X.copy(), 1.0
    res = residual(X)
    for it in range(max_iter):
        Xn = _psd_project(Y - step * grad(Y))
        if np.sum((Y - Xn) * (Xn - X)) > 0:  # adaptive restart (O'Donoghue & Candès)
            t, Y = 1.0, X.copy()
            continue
        tn = 0.5 * (1 + math.sqrt(1 + 4 * t * t))
        Y = Xn + ((t - 1) / tn) * (Xn - X)
        X, t = Xn, tn
        if it % 10 == 9:
            res = residual(X)
            if res <= tol:
                break
    return 0.5 * (X + X.T), residual(X)
