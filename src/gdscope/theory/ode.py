"""Continuous-time limits of GD, heavy ball and Nesterov in the kernel regime (THEORY §2).

Per eigenmode of ``qK`` with ``λ' = qλ_i``, for the residual's mode ``e`` (or its distance to
the fixed point):

* **Gradient flow** (GD, ``s = ηt``): ``ė = −λ' e``, ``e(s) = e(0) exp(−λ' s)``; in full,
  ``r(s) = exp(−s qK) r(0)`` (:func:`gradient_flow_residuals`).
* **Heavy-ball ODE** (``β = 1 − γ√η``, ``s = t√η``): ``ë + γė + λ'e = 0``. With
  ``κ = √(γ² − 4λ')/2`` (real: overdamped; 0: critical; imaginary ``iω``: underdamped)

      e(s) = exp(−γs/2) [e(0) cosh(κs) + (ė(0) + γe(0)/2) sinh(κs)/κ],

  evaluated without overflow or cancellation in each regime (``sinh(κs)/κ → s`` at
  ``κ = 0``). Decay rate ``(γ − Re√(γ² − 4λ'))/2`` (:func:`heavy_ball_ode_rate`).
* **Nesterov ODE** (Su, Boyd & Candès; ``s = t√η``): ``ë + (r/s)ė + λ'e = 0`` with the regular
  solution (``ė(0) = 0``)

      e(s) = e(0) Γ(ν+1) (2/x)^ν J_ν(x),    x = √λ' s,  ν = (r − 1)/2,

  whose power series is ``Σ_m (−x²/4)^m Γ(ν+1)/(m! Γ(m+ν+1))`` (used for small ``x``, so
  ``e → e(0)`` as ``s → 0``). Envelope ``∝ s^{−r/2}``: sublinear.

All functions broadcast their array arguments with NumPy rules: pass ``lam[:, None]`` and
``s[None, :]`` for a ``(modes, times)`` table. These are the limits as ``η → 0``; predict a
discrete run with :func:`gdscope.theory.dynamics.predict`.
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from scipy import special

from gdscope.errors import InvalidArgumentError, ShapeMismatchError

__all__ = [
    "gradient_flow",
    "gradient_flow_residuals",
    "heavy_ball_gamma",
    "heavy_ball_ode",
    "heavy_ball_ode_rate",
    "momentum_time",
    "nesterov_ode",
]


def _arr(x: Any, name: str, nonneg: bool = False) -> np.ndarray:
    if hasattr(x, "detach") and callable(x.detach):  # a tensor (maybe requiring grad)
        x = x.detach().cpu().double().numpy()
    if x is None or isinstance(x, (str, bytes, dict)):
        raise InvalidArgumentError(
            f"{name}={x!r} ({type(x).__name__}) must be a number or an array of numbers."
        )
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        text = repr(x)
        text = text if len(text) <= 60 else text[:57] + "..."
        raise InvalidArgumentError(
            f"{name}={text} ({type(x).__name__}) must be a number or an array of real numbers "
            f"({e})."
        ) from None
    if not np.all(np.isfinite(a)):
        raise InvalidArgumentError(f"{name} must be finite (it holds NaN or inf).")
    if nonneg and np.any(a < 0):
        raise InvalidArgumentError(f"{name} must be >= 0, got min {a.min()!r}.")
    return a


def momentum_time(t: Any, lr: float) -> np.ndarray:
    """ODE time ``s = t√η`` of step ``t`` for the momentum limits."""
    _positive(lr, "lr")
    return _arr(t, "t") * np.sqrt(lr)


def _positive(x: Any, name: str) -> float:
    if (
        isinstance(x, (bool, np.bool_))
        or not isinstance(x, (int, float, np.integer, np.floating))
        or not np.isfinite(x)
        or not x > 0
    ):
        raise InvalidArgumentError(
            f"{name}={x!r} ({type(x).__name__}) must be a finite number > 0, e.g. {name}=0.1."
        )
    return float(x)


def heavy_ball_gamma(beta: float, lr: float) -> float:
    """Friction ``γ = (1 − β)/√η`` of the heavy-ball ODE for momentum ``β`` and step ``η``."""
    if (
        isinstance(beta, (bool, np.bool_))
        or not isinstance(beta, (int, float, np.integer, np.floating))
        or not 0 <= beta < 1
    ):
        raise InvalidArgumentError(
            f"beta={beta!r} ({type(beta).__name__}) must be a number in [0, 1), e.g. beta=0.9."
        )
    lr = _positive(lr, "lr")
    return (1 - beta) / float(np.sqrt(lr))


def gradient_flow(lam_prime: Any, s: Any, e0: Any = 1.0) -> np.ndarray:
    """``e(s) = e0·exp(−λ' s)`` per mode (``s = ηt``, ``λ' = qλ``)."""
    lam = _arr(lam_prime, "lam_prime", nonneg=True)
    return _arr(e0, "e0") * np.exp(-lam * _arr(s, "s", nonneg=True))


def gradient_flow_residuals(kernel: Any, r0: Any, s: Any, *, q: float) -> np.ndarray:
    """``r(s) = exp(−s qK) r0`` for each time in ``s``: ``(len(s), nk)`` (eigh of ``K``).

    ``kernel`` is ``(nk, nk)`` (sample-major) or ``(n, n, k, k)``; ``r0`` the ``nk`` initial
    residuals; ``s = ηt``.
    """
    K = np.asarray(kernel, dtype=np.float64)
    if K.ndim == 4:
        n, n2, k, k2 = K.shape
        K = K.transpose(0, 2, 1, 3).reshape(n * k, n2 * k2)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ShapeMismatchError(f"kernel must be square (nk, nk), got {K.shape}.")
    r = np.asarray(r0, dtype=np.float64).reshape(-1)
    if r.size != K.shape[0]:
        raise ShapeMismatchError(f"r0 has {r.size} entries, the kernel {K.shape[0]} rows.")
    if not q > 0:
        raise InvalidArgumentError(f"q={q!r} must be > 0.")
    lam, V = np.linalg.eigh(0.5 * (K + K.T))
    lam = np.maximum(lam, 0.0)
    times = np.atleast_1d(_arr(s, "s", nonneg=True))
    coeff = V.T @ r
    return (np.exp(-np.outer(times, q * lam)) * coeff) @ V.T


def heavy_ball_ode(lam_prime: Any, gamma: Any, s: Any, e0: Any = 1.0, de0: Any = 0.0) -> np.ndarray:
    """Solution of ``ë + γė + λ'e = 0``, ``e(0) = e0``, ``ė(0) = de0`` (all regimes)."""
    lam = _arr(lam_prime, "lam_prime", nonneg=True)
    g = _arr(gamma, "gamma", nonneg=True)
    s = _arr(s, "s", nonneg=True)
    e0 = _arr(e0, "e0")
    de0 = _arr(de0, "de0")
    lam, g, s, e0, de0 = np.broadcast_arrays(lam, g, s, e0, de0)
    disc = g * g - 4 * lam  # (2κ)²
    c = de0 + 0.5 * g * e0  # coefficient of sinh(κs)/κ
    out = np.empty(lam.shape)
    over = disc > 0
    if np.any(over):
        k = 0.5 * np.sqrt(disc[over])
        ss, gg = s[over], g[over]
        slow = np.exp((k - 0.5 * gg) * ss)  # exp(−γs/2 + κs) ≤ 1
        ratio = np.exp(-2 * k * ss)  # exp(−2κs)
        # exp(−γs/2) cosh(κs) = slow (1 + ratio)/2 ; exp(−γs/2) sinh(κs)/κ = slow (1 − ratio)/(2κ)
        sinh_k = slow * (-np.expm1(-2 * k * ss)) / (2 * k)
        out[over] = e0[over] * slow * (1 + ratio) / 2 + c[over] * sinh_k
    under = ~over
    if np.any(under):
        w = 0.5 * np.sqrt(-disc[under])  # 0 at critical damping
        ss = s[under]
        damp = np.exp(-0.5 * g[under] * ss)
        # sin(ωs)/ω = s·sinc(ωs/π) → s at ω = 0 (critical damping)
        out[under] = damp * (e0[under] * np.cos(w * ss) + c[under] * ss * np.sinc(w * ss / np.pi))
    return out


def heavy_ball_ode_rate(lam_prime: Any, gamma: Any) -> np.ndarray:
    """Decay rate ``(γ − Re√(γ² − 4λ'))/2`` of the slowest solution of the heavy-ball ODE."""
    lam = _arr(lam_prime, "lam_prime", nonneg=True)
    g = _arr(gamma, "gamma", nonneg=True)
    root = np.sqrt((g * g - 4 * lam).astype(complex))
    return (g - root.real) / 2


def nesterov_ode(lam_prime: Any, s: Any, r: float = 3.0, e0: Any = 1.0) -> np.ndarray:
    """Regular solution of ``ë + (r/s)ė + λ'e = 0`` with ``e(0) = e0`` (Bessel form).

    ``e(s) = e0 Γ((r+1)/2) (2/(√λ' s))^{(r−1)/2} J_{(r−1)/2}(√λ' s)``; ``r > 0``.
    """
    if isinstance(r, bool) or not isinstance(r, numbers.Real) or not r > 0:
        raise InvalidArgumentError(f"r={r!r} must be a number > 0 (r = 3 classically).")
    lam = _arr(lam_prime, "lam_prime", nonneg=True)
    s = _arr(s, "s", nonneg=True)
    e0 = _arr(e0, "e0")
    lam, s, e0 = np.broadcast_arrays(lam, s, e0)
    nu = (r - 1) / 2
    x = np.sqrt(lam) * s
    out = np.empty(x.shape)
    small = x < 1e-2
    if np.any(small):  # series: Σ_m (−x²/4)^m Γ(ν+1)/(m! Γ(m+ν+1)), 6 terms: error < 1e-25
        z = -0.25 * x[small] ** 2
        term = np.ones_like(z)
        acc = np.ones_like(z)
        for m in range(1, 7):
            term = term * z / (m * (m + nu))
            acc = acc + term
        out[small] = acc
    big = ~small
    if np.any(big):
        xb = x[big]
        log_pref = special.gammaln(nu + 1) + nu * np.log(2 / xb)
        out[big] = np.exp(log_pref) * special.jv(nu, xb)
    return e0 * out
