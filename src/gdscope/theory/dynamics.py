"""Predict a training run from the empirical NTK: linearized dynamics in function space.

For the model linearized at ``θ0`` (THEORY §2), ``F(θ) = f0 + J(θ − θ0)`` with ``J = ∂F/∂θ``
(``nk × P``, sample-major) and ``K = J Jᵀ``. Every optimizer :func:`predict` accepts updates the
parameters by an affine rule in the iterates and the gradients ``∇L(θ) + wθ = Jᵀg + wθ``
(``g = ∂L/∂F``, ``w`` the weight decay). Multiplying each rule by ``J`` gives the same rule on
``u = Jθ ∈ R^{nk}`` with the *function-space gradient*

    G(u) = J(Jᵀg + wθ) = K g(F) + w u,        F = f0 − Jθ0 + u,

so the run closes in function space and never needs ``J`` itself; weight decay needs
``Jθ0`` (``j_theta0``): it pulls ``θ`` towards 0, not towards ``θ0``. All rules are affine with
weights summing to one on the iterates, so they hold for ``u`` shifted by any constant.

**MSE, per eigenmode (exact).** With ``Q = q·I``, ``g = q r`` (``r = F − Y``) and
``K = V diag(λ) Vᵀ`` (``eigh`` in float64; ``V`` spans all of ``R^{nk}``), write
``d = Y − f0 + Jθ0`` so that ``u = r + d``. In mode ``i`` (coordinates ``Vᵀ·``)

    G_i = qλ_i r_i + w (r_i + d_i) = h_i (r_i − r*_i),   h_i = qλ_i + w,   r*_i = −w d_i / h_i,

so each mode runs the optimizer's scalar recursion on ``e_i = r_i − r*_i`` with gradient
``h_i e_i``, i.e. with ``a_i = η h_i``. ``r*`` is the ridge fixed point: ``r* = 0`` without
weight decay (modes with ``h_i = 0`` never move: ``r*_i = r_i(0)``). Modes outside
``range(K) = range(J)`` have ``λ_i = 0``: there ``d_i = −r_i(0)`` (``Jθ0 ∈ range(J)``), so
``r*_i = r_i(0)``: weight decay cannot move the outputs off ``range(J)``, and the loss has the
floor ``(q/2)·‖P_null r(0)‖²``. The scalar recursions (held iterates ``e_t``, step ``η``):

* GD, ``SGD(momentum=0)``: ``e_{t+1} = (1 − a) e_t``.
* ``SGD(momentum=μ, dampening=τ)``: ``v_0 = h e_0`` (undampened),
  ``v_t = μ v_{t−1} + (1−τ) h e_t``, ``e_{t+1} = e_t − η v_t``; with ``nesterov=True``
  (``τ = 0``), ``e_{t+1} = e_t − η(h e_t + μ v_t)``.
* :class:`~gdscope.HeavyBall`: ``e_{t+1} = e_t − a e_t + β(e_t − e_{t−1})``, ``e_{−1} = e_0``.
* :class:`~gdscope.Nesterov`: ``y_0 = x_0 = e_0``; ``x_t = (1 − a) y_{t−1}``,
  ``y_t = x_t + β_t (x_t − x_{t−1})``, ``β_t = β`` or ``(t−1)/(t+r−1)``; the held iterate is
  ``y_t`` (as for ``SGD(nesterov=True)``, whose held parameters are the look-ahead iterates).

The loss is ``L_t = (q/2)‖r* + e_t‖²``. Per-mode asymptotic factors ``|z|_max`` come from the
characteristic polynomials: GD ``z = 1 − a``; heavy ball and ``SGD`` momentum
``z² − (1+μ−a')z + μ`` with ``a' = a(1−τ)``; Nesterov and ``SGD(nesterov=True)``
``z² − (1−a)(1+β)z + (1−a)β``; scheduled Nesterov the limit ``β → 1``
(``√(1−a)`` for ``0 < a < 1``; the transient carries a ``t^{−r/2}`` factor, THEORY §2).

**Cross-entropy** (any loss whose ``g`` is not linear in ``F``): the same recursions run on the
whole output vector with ``G(F) = K g(F) + w(F − f0 + Jθ0)`` (one ``nk × nk`` matvec per step),
``g = (softmax(F) − Y)/n`` (mean) or ``softmax(F) − Y`` (sum).

**Test points** (Lee et al.): the outputs on ``x_test`` are ``u_test = J_test θ`` plus a
constant, and ``J_test(Jᵀg + wθ) = Θ(x_test, X) g + w u_test``: they ride along with the same
recursion (``Jtest θ0`` is needed only with weight decay).

Only constant step sizes are modelled: an optimizer with an attached learning-rate scheduler is
refused (one attached after :func:`predict` cannot be seen: do not attach one).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.special import expit
from torch import Tensor

from gdscope.errors import InvalidArgumentError, NonFiniteError, ShapeMismatchError
from gdscope.kernels.ntk import default_memory, ntk
from gdscope.problem import Problem
from gdscope.theory.optim import read_optimizer

__all__ = ["Prediction", "optimizer_spec", "predict"]

_MAX_RECORD = 200
_ENERGY_RTOL = 1e-12  # a mode's |e_0| below this times ‖e_0‖ counts as no initial energy


# ---------------------------------------------------------------------------------- result
@dataclass(frozen=True, eq=False)
class Prediction:
    """A predicted run of the linearized model (see the module docstring for the derivation).

    Attributes:
        loss: ``(steps+1,)`` float64; ``loss[t]`` is the loss at the parameters the optimizer
            *holds* after ``t`` steps (look-ahead iterates for Nesterov and
            ``SGD(nesterov=True)``), ``t = 0..steps``: ``FitResult.losses[t]`` for ``t < steps``.
        steps: number of optimizer steps predicted.
        record_steps: the steps at which ``outputs``/``residuals``/``test_outputs`` are stored
            (every step when ``steps ≤ 200``; else 0, ~200 log-spaced steps and ``steps``).
        outputs: ``(len(record_steps), n·k)`` predicted training outputs, sample-major.
        residuals: same shape; ``F − Y`` for MSE, ``softmax(F) − Y`` (the per-sample output
            gradient) for cross-entropy.
        test_outputs: ``(len(record_steps), n_test·k)`` on the test points, or ``None``.
        eigenvalues: ``(n·k,)`` eigenvalues of ``K`` ascending (round-off ones set to 0).
        rates: MSE: per eigenmode (aligned with ``eigenvalues``) the asymptotic contraction
            factor per step of the mode's distance to its fixed point (largest root modulus);
            ``None`` for cross-entropy.
        initial_energy: MSE: ``e_i(0)²`` per mode (the squared distance to the fixed point).
        asymptotic_rate: MSE: the largest ``rates[i]`` over modes with ``|e_i(0)| >
            1e-12·‖e(0)‖`` (0.0 if none); the loss (or, with weight decay, its distance to
            ``limit_loss``) decays like its square (like itself with weight decay). ``None``
            for cross-entropy.
        limit_loss: MSE: the loss at the fixed point ``(q/2)‖r*‖²`` when ``stable``, else
            ``None``.
        stable: MSE: no mode grows (every ``rates[i] ≤ 1``); cross-entropy: the predicted
            loss stayed finite.
        optimizer: what was modelled: class, kind, ``lr`` and the momentum settings.
        loss_name: ``"mse"``, ``"cross_entropy"`` or ``"bce_with_logits"``.
        q: the MSE output curvature (``None`` for cross-entropy).
        reduction: ``"mean"``, ``"sum"`` or ``None`` (MSE given by ``q`` directly).
        notes: caveats (clipped eigenvalues, the scheduled-Nesterov rates, ...).
    """

    loss: np.ndarray
    steps: int
    record_steps: np.ndarray
    outputs: np.ndarray
    residuals: np.ndarray
    test_outputs: np.ndarray | None
    eigenvalues: np.ndarray
    rates: np.ndarray | None
    initial_energy: np.ndarray | None
    asymptotic_rate: float | None
    limit_loss: float | None
    stable: bool
    optimizer: dict[str, Any]
    loss_name: str
    q: float | None
    reduction: str | None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def loss_rate(self) -> float | None:
        """Asymptotic per-step loss factor ``asymptotic_rate²`` (MSE, no weight decay)."""
        return None if self.asymptotic_rate is None else self.asymptotic_rate**2

    @property
    def final_outputs(self) -> np.ndarray:
        """Outputs after the last step, ``(n·k,)``."""
        return self.outputs[-1]

    def __repr__(self) -> str:
        rate = "n/a" if self.asymptotic_rate is None else f"{self.asymptotic_rate:.6g}"
        return (
            f"Prediction({self.optimizer.get('class')}, {self.loss_name}, steps={self.steps}, "
            f"loss {self.loss[0]:.4g} → {self.loss[-1]:.4g}, asymptotic_rate={rate}, "
            f"stable={self.stable})"
        )


# ---------------------------------------------------------------------------------- optimizer
@dataclass(frozen=True)
class _Spec:
    kind: str  # "sgd" | "heavyball" | "nesterov"
    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    beta: float | str = 0.0
    r: float = 3.0
    description: dict[str, Any] = field(default_factory=dict)


_GDSCOPE = {"GD", "HeavyBall", "Nesterov"}
_MAPPING_KEYS = {"GD": ("lr",), "HeavyBall": ("lr", "beta"), "Nesterov": ("lr", "beta", "r")}
_SGD_KEYS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")


def _number(value: Any, name: str, where: str) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgumentError(f"{where}: {name}={value!r} must be a finite number.")
    return float(value)


def optimizer_spec(optimizer: Any) -> dict[str, Any]:
    """What :func:`predict` reads from an optimizer: a validated, JSON-friendly dict.

    Accepted: an instance of :class:`gdscope.GD`, :class:`gdscope.HeavyBall`,
    :class:`gdscope.Nesterov` or ``torch.optim.SGD`` (exact classes; subclasses may change
    ``step``), or a mapping ``{"class": "GD" | "HeavyBall" | "Nesterov" | "SGD", ...}`` holding
    the hyperparameters either directly (``{"class": "SGD", "lr": 0.1, "momentum": 0.9}``) or as
    :func:`gdscope.train.describe_optimizer` writes them (``"param_groups": [{...}]``). Every
    param group must have the same settings; ``lr`` must be constant (no scheduler attached).
    """
    return dict(_parse_optimizer(optimizer).description)


def _parse_optimizer(optimizer: Any) -> _Spec:
    if isinstance(optimizer, torch.optim.Optimizer):
        cls = type(optimizer)
        name = cls.__name__
        # which optimizer this is: the adapters of gdscope.theory.optim (one place for that)
        setting = read_optimizer(optimizer)
        if setting.preconditioned:
            raise InvalidArgumentError(
                f"predict models gs.GD, gs.HeavyBall, gs.Nesterov and torch.optim.SGD only, got "
                f"{cls.__module__}.{cls.__qualname__} (an adaptive optimizer, family "
                f"{setting.family!r}): it preconditions the gradient with state that depends on "
                "the run, so its linearized dynamics are not a fixed linear recursion."
            )
        exact = (name in _GDSCOPE and cls.__module__.startswith("gdscope.")) or (
            cls is torch.optim.SGD
        )
        if setting.family == "none" and not exact:
            raise InvalidArgumentError(
                f"predict models gs.GD, gs.HeavyBall, gs.Nesterov and torch.optim.SGD only, got "
                f"{cls.__module__}.{cls.__qualname__}: no optimizer adapter knows its update "
                "(gdscope.theory.optim.read_optimizer), so there is no recursion to predict."
            )
        if not exact:
            raise InvalidArgumentError(
                f"predict models gs.GD, gs.HeavyBall, gs.Nesterov and torch.optim.SGD only "
                f"(exact classes), got {cls.__module__}.{cls.__qualname__}: a subclass may "
                "change step(), so its update is not known to be the recursion predicted."
            )
        if cls is torch.optim.SGD:
            name = "SGD"
        if optimizer.state and any(len(s) for s in optimizer.state.values()):
            raise InvalidArgumentError(
                f"the {name} optimizer has already taken steps (its state is not empty): "
                "predict starts from the first step; pass a freshly constructed optimizer."
            )
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    elif isinstance(optimizer, Mapping):
        name = optimizer.get("class")
        if name not in (*_GDSCOPE, "SGD"):
            raise InvalidArgumentError(
                f"optimizer mapping has class={name!r}: use 'GD', 'HeavyBall', 'Nesterov' or "
                "'SGD' (Adam and other adaptive optimizers are not linear recursions)."
            )
        if "param_groups" in optimizer:
            raw = optimizer["param_groups"]
            if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence):
                raise InvalidArgumentError(
                    f"optimizer['param_groups']={raw!r} must be a list of dicts of "
                    "hyperparameters, as gdscope.train.describe_optimizer writes it."
                )
            bad = [g for g in raw if not isinstance(g, Mapping)]
            if bad:
                raise InvalidArgumentError(
                    f"optimizer['param_groups'] holds {bad[0]!r} ({type(bad[0]).__name__}), not "
                    "a dict of hyperparameters such as {'lr': 0.1}."
                )
            groups = [dict(g) for g in raw]
        else:
            groups = [{k: v for k, v in optimizer.items() if k not in ("class", "kind")}]
        allowed = _MAPPING_KEYS.get(name)
        for g in groups:
            unknown = sorted(str(k) for k in set(g) - set(allowed or g) - {"initial_lr"})
            if unknown:
                raise InvalidArgumentError(
                    f"optimizer mapping for {name}: unknown setting(s) {unknown}; {name} takes "
                    f"{sorted(allowed or ())} (e.g. momentum is 'beta' for HeavyBall and "
                    "Nesterov)."
                )
            if name in ("HeavyBall", "Nesterov") and "beta" not in g:
                raise InvalidArgumentError(
                    f"optimizer mapping for {name} has no 'beta': pass the momentum, e.g. "
                    f"{{'class': {name!r}, 'lr': 0.1, 'beta': 0.9}}."
                )
    else:
        raise InvalidArgumentError(
            f"optimizer must be a torch.optim.Optimizer instance (gs.GD, gs.HeavyBall, "
            f"gs.Nesterov, torch.optim.SGD) or a mapping describing one, got "
            f"{type(optimizer).__name__}."
        )
    if not groups:
        raise InvalidArgumentError("the optimizer has no param groups.")
    if any("initial_lr" in g for g in groups):
        raise InvalidArgumentError(
            f"an lr scheduler is attached to the {name} optimizer (its param groups carry "
            "'initial_lr'): predict models a constant step size only. Predict with a fresh "
            "optimizer without a scheduler."
        )
    first = groups[0]
    for g in groups[1:]:
        diff = sorted(k for k in set(first) | set(g) if _differs(first.get(k), g.get(k)))
        if diff:
            raise InvalidArgumentError(
                f"the {name} optimizer's param groups differ in {diff}: per-group settings give "
                "each parameter block its own kernel; predict needs one setting for all groups."
            )
    where = f"predict({name})"
    lr = _number(first.get("lr"), "lr", where)
    if lr <= 0:
        raise InvalidArgumentError(f"{where}: lr={lr!r} must be > 0.")
    desc: dict[str, Any] = {"class": name, "lr": lr}
    if name == "GD":
        return _Spec("sgd", lr, description={**desc, "kind": "gd"})
    if name == "HeavyBall":
        beta = _momentum(first.get("beta", 0.0), "beta", where)
        return _Spec(
            "heavyball", lr, beta=beta, description={**desc, "kind": "heavyball", "beta": beta}
        )
    if name == "Nesterov":
        beta_raw = first.get("beta", 0.0)
        r = _number(first.get("r", 3.0), "r", where)
        if r <= 0:
            raise InvalidArgumentError(f"{where}: r={r!r} must be > 0.")
        if beta_raw == "scheduled":
            beta: float | str = "scheduled"
        else:
            beta = _momentum(beta_raw, "beta", where)
        d = {**desc, "kind": "nesterov", "beta": beta}
        if beta == "scheduled":
            d["r"] = r
        return _Spec("nesterov", lr, beta=beta, r=r, description=d)
    # torch.optim.SGD
    unknown = sorted(set(first) - {*_SGD_KEYS, "foreach", "differentiable", "fused"})
    if unknown and not isinstance(optimizer, torch.optim.Optimizer):
        raise InvalidArgumentError(f"{where}: unknown SGD settings {unknown}.")
    for flag in ("nesterov", "maximize"):
        if not isinstance(first.get(flag, False), (bool, np.bool_)):
            raise InvalidArgumentError(
                f"{where}: {flag}={first[flag]!r} ({type(first[flag]).__name__}) must be True "
                "or False."
            )
    if first.get("maximize", False):
        raise InvalidArgumentError(
            f"{where}: maximize=True ascends the loss; predict models minimization only."
        )
    mu = _momentum(first.get("momentum", 0.0), "momentum", where)
    tau = _number(first.get("dampening", 0.0), "dampening", where)
    if not 0 <= tau <= 1:
        raise InvalidArgumentError(f"{where}: dampening={tau!r} must be in [0, 1].")
    nest = bool(first.get("nesterov", False))
    if nest and (mu <= 0 or tau != 0):
        raise InvalidArgumentError(
            f"{where}: nesterov=True needs momentum > 0 and dampening = 0 (got momentum={mu}, "
            f"dampening={tau}), as PyTorch requires."
        )
    wd = _number(first.get("weight_decay", 0.0), "weight_decay", where)
    if wd < 0:
        raise InvalidArgumentError(f"{where}: weight_decay={wd!r} must be >= 0.")
    d = {
        **desc,
        "kind": "sgd",
        "momentum": mu,
        "dampening": tau,
        "nesterov": nest,
        "weight_decay": wd,
    }
    return _Spec(
        "sgd", lr, momentum=mu, dampening=tau, nesterov=nest, weight_decay=wd, description=d
    )


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor):
        a = a.tolist()
    if isinstance(b, Tensor):
        b = b.tolist()
    return a != b


def _momentum(value: Any, name: str, where: str) -> float:
    v = _number(value, name, where)
    if not 0 <= v < 1:
        raise InvalidArgumentError(
            f"{where}: {name}={value!r} must be in [0, 1): momentum ≥ 1 never converges."
        )
    return v


# ---------------------------------------------------------------------------------- recursions
def _iterate(
    spec: _Spec,
    x0: np.ndarray,
    grad: Callable[[np.ndarray], np.ndarray],
    steps: int,
    on_step: Callable[[int, np.ndarray], None],
) -> None:
    """Run the optimizer's recursion on a vector of held iterates; ``grad`` is G(held)."""
    x = x0.copy()
    on_step(0, x)
    lr = spec.lr
    if spec.kind == "sgd":
        mu, tau, nest = spec.momentum, spec.dampening, spec.nesterov
        v: np.ndarray | None = None
        for t in range(steps):
            g = grad(x)
            if mu != 0:
                v = g.copy() if v is None else mu * v + (1 - tau) * g
                step = g + mu * v if nest else v
            else:
                step = g
            x = x - lr * step
            on_step(t + 1, x)
    elif spec.kind == "heavyball":
        beta = float(spec.beta)
        prev = x.copy()  # θ_{−1} = θ_0: the first step is GD
        for t in range(steps):
            g = grad(x)
            x, prev = x - lr * g + beta * (x - prev), x
            on_step(t + 1, x)
    else:  # nesterov: x holds y_t, main holds x_t
        main = x.copy()  # x_0 = y_0
        for t in range(1, steps + 1):
            g = grad(x)
            new = x - lr * g
            b = (t - 1) / (t + spec.r - 1) if spec.beta == "scheduled" else float(spec.beta)
            x = new + b * (new - main) if b != 0 else new
            main = new
            on_step(t, x)


def _max_root(c1: np.ndarray, c0: np.ndarray) -> np.ndarray:
    """Largest root modulus of ``z² + c1 z + c0``."""
    disc = np.sqrt((c1 * c1 - 4 * c0).astype(complex))
    return np.maximum(np.abs((-c1 + disc) / 2), np.abs((-c1 - disc) / 2))


def _mode_rates(spec: _Spec, a: np.ndarray) -> np.ndarray:
    """Per-mode asymptotic factor of the held iterate for ``a = η h``."""
    if spec.kind == "sgd" and spec.momentum == 0:
        return np.abs(1 - a)
    if spec.kind == "sgd" and not spec.nesterov:
        mu = spec.momentum
        ap = a * (1 - spec.dampening)
        return _max_root(-(1 + mu - ap), np.full_like(a, mu))
    if spec.kind == "heavyball":
        beta = float(spec.beta)
        return _max_root(-(1 + beta - a), np.full_like(a, beta))
    beta = spec.momentum if spec.kind == "sgd" else spec.beta
    beta = 1.0 if beta == "scheduled" else float(beta)
    return _max_root(-(1 - a) * (1 + beta), (1 - a) * beta)


# ---------------------------------------------------------------------------------- inputs
def _as_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu()
        x = x.to(torch.float64) if x.is_floating_point() else x
        arr = x.numpy()
    else:
        try:
            arr = np.asarray(x)
        except Exception as e:  # pragma: no cover - exotic inputs
            raise InvalidArgumentError(f"{name} must be a tensor or an array: {e}") from e
    if arr.dtype.kind not in "biuf":
        raise InvalidArgumentError(f"{name} must be numeric, got dtype {arr.dtype}.")
    return arr


def _eps_of(x: Any) -> float:
    if isinstance(x, Tensor) and x.is_floating_point():
        return float(torch.finfo(x.dtype).eps)
    arr = np.asarray(x) if not isinstance(x, Tensor) else None
    if arr is not None and arr.dtype.kind == "f":
        return float(np.finfo(arr.dtype).eps)
    return float(np.finfo(np.float64).eps)


def _flat_kernel(K: Any, name: str, rows: int | None = None) -> np.ndarray:
    arr = _as_array(K, name).astype(np.float64)
    if arr.ndim == 4:
        a, b, k1, k2 = arr.shape
        if k1 != k2:
            raise ShapeMismatchError(
                f"{name} of shape {arr.shape}: the (n, n2, k, k) blocks must be square."
            )
        arr = arr.transpose(0, 2, 1, 3).reshape(a * k1, b * k2)
    elif arr.ndim != 2:
        raise ShapeMismatchError(
            f"{name} must be (n·k, n2·k) or (n, n2, k, k), got shape {arr.shape}."
        )
    if not np.all(np.isfinite(arr)):
        raise NonFiniteError(f"{name} holds NaN or infinite entries: recompute it.")
    return arr


def _check_kernel(K: np.ndarray, eps: float) -> np.ndarray:
    """Symmetrize; refuse a kernel that is not symmetric up to round-off."""
    if K.shape[0] != K.shape[1]:
        raise ShapeMismatchError(f"the kernel must be square, got shape {K.shape}.")
    scale = float(np.max(np.abs(K))) if K.size else 0.0
    asym = float(np.max(np.abs(K - K.T))) if K.size else 0.0
    if asym > max(1e-8, 1e3 * eps) * max(scale, 1e-300):
        raise InvalidArgumentError(
            f"the kernel is not symmetric (max |K − Kᵀ| = {asym:.3g}, max |K| = {scale:.3g}): "
            "pass the Gram matrix K = J Jᵀ of the training points."
        )
    return 0.5 * (K + K.T)


_EIGH_CACHE: dict[tuple[Any, ...], tuple[np.ndarray, np.ndarray | None]] = {}


def _eigh(K: np.ndarray, vectors: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """``eigh`` (or ``eigvalsh``) of ``K``, remembering the last kernel's (read-only) result.

    Predicting several optimizers or learning rates from one kernel pays for one ``O((nk)³)``
    decomposition; the key is a hash of ``K``'s bytes, so a changed kernel is never confused.
    """
    data = np.ascontiguousarray(K)
    key = (
        data.shape,
        data.dtype.str,
        hashlib.blake2b(data.view(np.uint8), digest_size=16).digest(),
    )
    hit = _EIGH_CACHE.get(key)
    if hit is not None and (hit[1] is not None or not vectors):
        return hit
    lam, V = np.linalg.eigh(data) if vectors else (np.linalg.eigvalsh(data), None)
    for a in (lam, V):
        if a is not None:
            a.setflags(write=False)
    _EIGH_CACHE.clear()
    _EIGH_CACHE[key] = (lam, V)
    return lam, V


def _spectrum(
    K: np.ndarray, eps: float, rtol: float | None, vectors: bool
) -> tuple[np.ndarray, np.ndarray | None, list[str], bool]:
    """Eigen-decomposition with round-off handling; also whether negatives were clipped.

    ``|λ| ≤ max(nk, 10)·eps·λ_scale`` (``eps`` of the kernel's dtype) is round-off: set to 0.
    Negative eigenvalues below that but above ``−rtol·λ_scale`` are clipped to 0 with a
    warning; more negative ones are refused (``K = JJᵀ`` is positive semi-definite).
    """
    nk = K.shape[0]
    lam, V = _eigh(K, vectors)
    notes: list[str] = []
    scale = float(np.max(np.abs(lam))) if nk else 0.0
    zero_tol = max(nk, 10) * eps * scale
    floor = max(nk, 10) * eps  # a tolerance below round-off would refuse exact kernels
    rtol = max(1e-10, 10 * floor) if rtol is None else max(float(rtol), floor)
    neg = lam < -zero_tol
    if np.any(lam < -rtol * scale):
        raise InvalidArgumentError(
            f"the kernel has eigenvalue {lam.min():.3g} < −{rtol:.1g}·{scale:.3g}: K = J Jᵀ is "
            "positive semi-definite, so this is not an NTK Gram matrix (or it was computed in too "
            "low a precision: compute it in float64)."
        )
    if np.any(neg):
        msg = (
            f"{int(neg.sum())} eigenvalue(s) of the kernel are negative beyond round-off (min "
            f"{lam.min():.3g}, λ_max {scale:.3g}); clipped to 0. Compute K in float64 if this "
            "matters."
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        notes.append(msg)
    small = np.abs(lam) <= zero_tol
    lam = np.where(small | neg, 0.0, lam)
    if np.any(small):
        notes.append(
            f"{int(small.sum())} eigenvalue(s) with |λ| ≤ {zero_tol:.2g} (round-off) set to 0."
        )
    return lam, V, notes, bool(np.any(neg))


def _vector(x: Any, name: str, size: int) -> np.ndarray:
    arr = _as_array(x, name).astype(np.float64).reshape(-1)
    if arr.size != size:
        raise ShapeMismatchError(
            f"{name} has {arr.size} entries but the kernel is {size} × {size}: pass n·k values "
            "(sample-major), one per kernel row."
        )
    if not np.all(np.isfinite(arr)):
        raise NonFiniteError(f"{name} holds NaN or infinite values.")
    return arr


_PREDICT_LOSSES = ("mse", "cross_entropy", "bce_with_logits")


def _parse_loss(loss: Any) -> tuple[str, str | None, float | None]:
    """``(name, reduction, q)`` from ``"mse"``, ``("mse", "sum")``, ``("mse", q)``, ..."""
    if loss is None:
        raise InvalidArgumentError(
            "with a kernel, pass loss='mse' (mean reduction), ('mse', 'sum'), ('mse', q) or "
            "'cross_entropy' / ('cross_entropy', 'sum')."
        )
    if isinstance(loss, str):
        name, red = loss, "mean"
    elif isinstance(loss, (tuple, list)) and len(loss) == 2 and isinstance(loss[0], str):
        name, red = loss
    else:
        raise InvalidArgumentError(
            f"loss={loss!r} is not understood: use 'mse', ('mse', 'mean'|'sum'), ('mse', q) "
            "or 'cross_entropy', ('cross_entropy', 'mean'|'sum')."
        )
    if name == "ce":
        name = "cross_entropy"
    if name == "bce":
        name = "bce_with_logits"
    if name not in _PREDICT_LOSSES:
        raise InvalidArgumentError(
            f"loss {name!r} is not supported: predict knows 'mse', 'cross_entropy' and "
            "'bce_with_logits'."
        )
    if isinstance(red, str):
        if red not in ("mean", "sum"):
            raise InvalidArgumentError(f"reduction {red!r}: use 'mean' or 'sum'.")
        return name, red, None
    if name != "mse":
        raise InvalidArgumentError(
            f"loss=({name!r}, {red!r}): a q value is meaningful for 'mse' only."
        )
    q = _number(red, "q", "predict(loss=('mse', q))")
    if q <= 0:
        raise InvalidArgumentError(f"predict(loss=('mse', q)): q={q!r} must be > 0.")
    return name, None, q


# ---------------------------------------------------------------------------------- problem
def _problem_inputs(prob: Problem, optimizer: Any, x_test: Tensor | None, need_jtheta: bool):
    if not isinstance(prob, Problem):  # pragma: no cover - caller checks
        raise InvalidArgumentError("expected a gdscope.Problem.")
    fb = prob.full_batch
    if fb is None and prob.adapter is None:
        raise InvalidArgumentError(
            "predict needs the problem's data as (X, Y) tensors to form the NTK Gram matrix; "
            "the problem holds a DataLoader: build Problem(model, loss, (X, Y)) from the full "
            "training set (the data a full-batch run sees)."
        )
    if prob.loss_name not in _PREDICT_LOSSES:
        raise InvalidArgumentError(
            f"predict supports the losses 'mse', 'cross_entropy' and 'bce_with_logits' (as "
            f"names, nn modules or torch.nn.functional losses); the problem's loss is "
            f"{prob.loss_name!r}."
        )
    if isinstance(optimizer, torch.optim.Optimizer):
        opt_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        missing = [
            n for n, p in prob.model.named_parameters() if p.requires_grad and id(p) not in opt_ids
        ]
        if missing:
            raise InvalidArgumentError(
                f"the optimizer does not update the model's trainable parameters {missing}: the "
                "prediction assumes every trainable parameter is updated; build the optimizer "
                "on prob.model.parameters() (freeze the others with requires_grad_(False))."
            )
    if prob.adapter is not None:
        return _adapter_inputs(prob, x_test, need_jtheta)
    X, Y = fb
    params = prob.params
    n = prob.n
    with torch.no_grad():
        out = prob.forward(params, X)
    f0 = out.reshape(n, -1)
    k = f0.shape[1]
    K = ntk(prob.model, X)
    eps = float(torch.finfo(K.dtype).eps)
    if prob.loss_name in ("mse", "bce_with_logits"):
        y = Y.reshape(n, -1)
        if y.shape != f0.shape:
            raise ShapeMismatchError(
                f"{prob.loss_name} targets of shape {tuple(Y.shape)} do not match outputs "
                f"{tuple(f0.shape)}."
            )
    else:
        if out.ndim != 2:
            raise InvalidArgumentError(
                f"cross-entropy prediction needs (n, classes) logits; the model's outputs have "
                f"shape {tuple(out.shape)}."
            )
        y = Y
    jt0 = jt0_test = None

    def jtheta(x: Tensor) -> Tensor:
        def f(p):
            return prob.forward(p, x).reshape(x.shape[0], -1)

        return torch.func.jvp(f, (params,), (params,))[1].detach()

    if need_jtheta:
        jt0 = jtheta(X)
    Kt = f0t = None
    if x_test is not None:
        if not isinstance(x_test, Tensor):
            raise InvalidArgumentError("x_test must be a tensor of inputs (n_test, ...).")
        xt = x_test.to(prob.device)
        if xt.is_floating_point():
            xt = xt.to(prob.dtype)
        with torch.no_grad():
            f0t = prob.forward(params, xt).reshape(xt.shape[0], -1)
        if f0t.shape[1] != k:
            raise ShapeMismatchError("x_test gives outputs of a different size than X.")
        Kt = ntk(prob.model, xt, X)
        if need_jtheta:
            jt0_test = jtheta(xt)
    return K, f0, y, eps, jt0, Kt, f0t, jt0_test, n, k


def _joined_batches(prob: Problem) -> tuple[dict[str, Tensor], Tensor]:
    """A DataLoader's dict batches joined along dimension 0 (the full batch ``L`` sums).

    Cross-entropy's mean over non-ignored labels of the whole data set is the mean over the
    joined rows, so the joined batch has the same loss as ``Σ w_b L_b``.
    """
    xs: list[Any] = []
    ys: list[Tensor] = []
    for x, y, _ in prob.batches():
        xs.append(x)
        ys.append(y)
    if not isinstance(xs[0], Mapping):
        raise InvalidArgumentError("predict with an adapter needs dict batches.")
    try:
        X = {k: torch.cat([x[k] for x in xs]) for k in xs[0]}
        return X, torch.cat(ys)
    except (RuntimeError, KeyError) as e:
        raise InvalidArgumentError(
            f"predict joins the problem's batches into one full batch, but they do not join "
            f"({e}): pad every sequence to one length, or build the Problem on one dict of "
            "tensors."
        ) from e


def _adapter_inputs(prob: Problem, x_test: Tensor | None, need_jtheta: bool):
    """:func:`_problem_inputs` for a problem with an adapter (dict batches, e.g. a causal LM).

    The "samples" of the prediction are the rows the loss compares: the adapter's
    :meth:`~gdscope.adapters.Adapter.loss_view` of the logits (shifted, ``(N·T', V)``), with
    their labels (``ignore_index`` rows are masked by the cross-entropy, as in PyTorch's mean
    over non-ignored labels). ``K = J Jᵀ`` with ``J`` the dense Jacobian of those rows
    (``torch.func.jacrev`` through :meth:`Problem.forward`, attention under math SDPA).
    """
    assert prob.adapter is not None
    if prob.loss_name != "cross_entropy":
        raise InvalidArgumentError(
            f"predict on a problem with an adapter supports cross-entropy only (the causal-LM "
            f"loss); the problem's loss is {prob.loss_name!r}: build Problem(model, loss, "
            "(X, Y)) with a module that maps X to the outputs."
        )
    if x_test is not None:
        raise InvalidArgumentError(
            "x_test is not supported on a problem with an adapter (dict inputs): predict the "
            "training rows only (x_test=None)."
        )
    adapter = prob.adapter
    X, Y = prob.full_batch or _joined_batches(prob)
    params = prob.params

    def rows(p: dict[str, Tensor]) -> Tensor:
        logits, _ = adapter.loss_view(prob.forward(p, X), Y)
        return logits.reshape(logits.shape[0], -1)

    with torch.no_grad():
        f0 = rows(params)
        _, y = adapter.loss_view(prob.forward(params, X), Y)
    if f0.ndim != 2 or y.ndim != 1 or y.shape[0] != f0.shape[0]:
        raise InvalidArgumentError(
            f"cross-entropy prediction needs (rows, classes) logits and (rows,) class labels "
            f"as the loss compares them; the adapter gives {tuple(f0.shape)} and "
            f"{tuple(y.shape)}."
        )
    n, k = f0.shape
    P = prob.num_params
    need = (n * k * P + (n * k) ** 2) * f0.element_size()
    budget = default_memory(prob.device)
    if need > budget:
        raise InvalidArgumentError(
            f"predict on an adapter problem forms the dense Jacobian of its {n}×{k} logit rows "
            f"by {P} parameters and their kernel ({need / 1e9:.3g} GB, over the "
            f"{budget / 1e9:.3g} GB budget): use fewer or shorter sequences."
        )
    jac = torch.func.jacrev(lambda p: rows(p).reshape(-1))(params)
    J = torch.cat([jac[name].reshape(n * k, -1) for name in prob.names], dim=1).detach()
    K = J @ J.T
    eps = float(torch.finfo(K.dtype).eps)
    jt0 = None
    if need_jtheta:
        jt0 = torch.func.jvp(lambda p: rows(p).reshape(-1), (params,), (params,))[1].detach()
    return K, f0, y, eps, jt0, None, None, None, n, k


# ---------------------------------------------------------------------------------- predict
def predict(
    problem_or_kernel: Problem | Tensor | np.ndarray,
    optimizer: Any,
    steps: int,
    *,
    f0: Any = None,
    y: Any = None,
    loss: Any = None,
    x_test: Tensor | None = None,
    j_theta0: Any = None,
    kernel_test: Any = None,
    f0_test: Any = None,
    j_theta0_test: Any = None,
    record: int | Sequence[int] | None = None,
    kernel_rtol: float | None = None,
    memory: float | None = None,
) -> Prediction:
    """Predict the loss curve and outputs of a run from the NTK of the linearized model.

    Args:
        problem_or_kernel: a :class:`gdscope.Problem` with ``(X, Y)`` tensor data and loss
            ``"mse"`` or ``"cross_entropy"`` (the kernel ``K = ntk(model, X)``, ``f0``, ``Y``,
            the loss and its reduction, and ``Jθ0`` are taken from it), **or** the kernel
            ``K`` itself, ``(n·k, n·k)`` sample-major or ``(n, n, k, k)``. A Problem with an
            adapter (a causal LM through ``Problem.from_hf``, cross-entropy) is predicted on
            the rows the loss compares: the shifted logits ``(N·(T−1), V)`` with their labels
            (ignored ones masked), ``K = J Jᵀ`` from the dense Jacobian of those rows; a
            DataLoader's dict batches are joined into one.
        optimizer: a fresh ``gs.GD``, ``gs.HeavyBall``, ``gs.Nesterov`` or ``torch.optim.SGD``
            (``lr``, ``momentum``, ``dampening``, ``nesterov``, ``weight_decay`` are read from
            its param groups), or a mapping (see :func:`optimizer_spec`). Constant ``lr`` only:
            attached schedulers, Adam & co., ``lr ≤ 0``, momentum outside ``[0, 1)`` and
            nesterov with dampening are refused. With a Problem the optimizer must cover
            exactly the model's trainable parameters.
        steps: optimizer steps to predict (``≥ 1``).
        f0: kernel form only: initial outputs ``(n, k)`` or ``(n·k,)`` sample-major.
        y: kernel form only: MSE targets like ``f0``; cross-entropy class indices ``(n,)`` or
            target probabilities ``(n, k)`` (then ``f0`` must be ``(n, k)``).
        loss: kernel form only: ``"mse"`` (PyTorch's mean reduction, ``q = 2/(nk)``),
            ``("mse", "sum")`` (``q = 2``), ``("mse", q)`` for ``L = (q/2)‖F − Y‖²`` with any
            ``q > 0``, ``"cross_entropy"`` or ``("cross_entropy", "sum")``.
        x_test: Problem form only: test inputs; ``Θ(x_test, X)`` and the initial test outputs
            are computed.
        j_theta0: kernel form only: ``J θ0`` ``(n·k,)``, needed iff ``weight_decay > 0``.
        kernel_test: kernel form only: ``Θ(x_test, X)``, ``(n_t·k, n·k)`` or ``(n_t, n, k, k)``.
        f0_test: kernel form only: initial test outputs (with ``kernel_test``).
        j_theta0_test: kernel form only: ``J_test θ0``, with ``kernel_test`` and weight decay.
        record: steps at which outputs are stored: ``None`` (every step if ``steps ≤ 200``,
            else 0, ~200 log-spaced steps and ``steps``), a count, or a sequence of steps.
        kernel_rtol: negative eigenvalues of ``K`` below ``−kernel_rtol·max|λ|`` are refused;
            ones between that and round-off are clipped to 0 with a warning. Default
            ``max(1e-10, 10·max(nk, 10)·eps)`` with ``eps`` of the kernel's dtype.
        memory: budget in bytes for the arrays the prediction allocates (the loss curve of
            ``steps + 1`` floats, the recorded outputs, the eigenvectors); default a quarter of
            the available RAM. A prediction larger than that is refused before anything is
            allocated: predict fewer steps (the asymptotic rate describes the tail) or record
            fewer steps.

    Returns:
        :class:`Prediction`.

    >>> import torch, gdscope as gs
    >>> K = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    >>> pred = predict(K, {"class": "GD", "lr": 0.25}, 3, f0=[1.0, 1.0], y=[0.0, 0.0],
    ...                loss=("mse", 2.0))
    >>> pred.loss.round(6).tolist()  # L = ‖r‖², r_i ← (1 − 0.25·2·λ_i) r_i
    [2.0, 0.25, 0.0625, 0.015625]
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise InvalidArgumentError(
            f"steps={steps!r} ({type(steps).__name__}) must be an integer >= 1: the number of "
            "optimizer steps to predict, e.g. steps=1000."
        )
    steps = int(steps)
    budget = _check_memory(memory)
    n_rec = _record_count(steps, record)
    _check_size(steps, n_rec, 1, 0, False, budget, memory is None)  # before any kernel work
    if kernel_rtol is not None and (
        isinstance(kernel_rtol, bool)
        or not isinstance(kernel_rtol, (int, float, np.floating))
        or not math.isfinite(kernel_rtol)
        or kernel_rtol <= 0
    ):
        raise InvalidArgumentError(
            f"kernel_rtol={kernel_rtol!r} ({type(kernel_rtol).__name__}) must be a finite number "
            "> 0, e.g. 1e-8, or None for the default."
        )
    spec = _parse_optimizer(optimizer)
    wd = spec.weight_decay
    notes: list[str] = []

    if isinstance(problem_or_kernel, Problem):
        given = {
            "f0": f0,
            "y": y,
            "loss": loss,
            "j_theta0": j_theta0,
            "kernel_test": kernel_test,
            "f0_test": f0_test,
            "j_theta0_test": j_theta0_test,
        }
        extra = [k for k, v in given.items() if v is not None]
        if extra:
            raise InvalidArgumentError(
                f"{extra} are taken from the Problem: pass them only with a kernel (pass "
                "x_test for test points)."
            )
        prob = problem_or_kernel
        notes.extend(prob.notes)  # e.g. attention through the math SDPA backend
        K_t, f0_t, y_t, eps, jt0, Kt_t, f0t_t, jt0t, n, k = _problem_inputs(
            prob, optimizer, x_test, wd > 0
        )
        name = prob.loss_name
        smoothing = prob.loss_spec.label_smoothing
        ignore_index = prob.loss_spec.ignore_index
        reduction: str | None = prob.reduction
        qval: float | None = prob.q if name == "mse" else None
        K = _flat_kernel(K_t, "kernel")
        f0v = _as_array(f0_t, "f0").astype(np.float64).reshape(-1)
        y_arr = _as_array(y_t, "y")
        Kt = None if Kt_t is None else _flat_kernel(Kt_t, "kernel_test")
        f0t = None if f0t_t is None else _as_array(f0t_t, "f0_test").astype(np.float64).ravel()
        p = None if jt0 is None else _as_array(jt0, "j_theta0").astype(np.float64).ravel()
        pt = None if jt0t is None else _as_array(jt0t, "j_theta0_test").astype(np.float64).ravel()
    else:
        if isinstance(problem_or_kernel, (Tensor, np.ndarray)):
            eps = _eps_of(problem_or_kernel)
        else:
            raise InvalidArgumentError(
                "problem_or_kernel must be a gdscope.Problem or the NTK Gram matrix as a tensor "
                f"or array, got {type(problem_or_kernel).__name__}."
            )
        if x_test is not None:
            raise InvalidArgumentError(
                "x_test needs a Problem (a model to evaluate); with a kernel pass kernel_test "
                "= Θ(x_test, X) and f0_test."
            )
        if f0 is None or y is None:
            raise InvalidArgumentError("with a kernel, pass f0 (initial outputs) and y (targets).")
        name, reduction, qval = _parse_loss(loss)
        smoothing, ignore_index = 0.0, None
        K = _flat_kernel(problem_or_kernel, "kernel")
        nk = K.shape[0]
        f0_arr = _as_array(f0, "f0")
        f0v = _vector(f0_arr, "f0", nk)
        y_arr = _as_array(y, "y")
        if name != "mse":
            if f0_arr.ndim == 2:
                n, k = f0_arr.shape
            elif y_arr.ndim == 2:
                n, k = y_arr.shape
            else:
                raise ShapeMismatchError(
                    "cross-entropy needs to know the number of classes: pass f0 as (n, k)."
                )
        else:
            n, k = f0_arr.shape if f0_arr.ndim == 2 else (nk, 1)
        if n * k != nk:
            raise ShapeMismatchError(f"f0 of shape {f0_arr.shape} does not match the kernel {nk}.")
        if name == "mse" and qval is None:
            qval = 2.0 / nk if reduction == "mean" else 2.0
        Kt = f0t = pt = None
        p = None if j_theta0 is None else _vector(j_theta0, "j_theta0", nk)
        if kernel_test is not None or f0_test is not None:
            if kernel_test is None or f0_test is None:
                raise InvalidArgumentError("pass kernel_test and f0_test together.")
            Kt = _flat_kernel(kernel_test, "kernel_test")
            if Kt.shape[1] != nk:
                raise ShapeMismatchError(
                    f"kernel_test has {Kt.shape[1]} columns but the kernel is {nk} × {nk}: pass "
                    "Θ(x_test, X) with the training points as columns."
                )
            f0t = _vector(f0_test, "f0_test", Kt.shape[0])
            if wd > 0:
                if j_theta0_test is None:
                    raise InvalidArgumentError(
                        "weight decay with test points needs j_theta0_test = J_test θ0 "
                        "(weight decay pulls θ to 0, which moves the test outputs by −w J_test θ)."
                    )
                pt = _vector(j_theta0_test, "j_theta0_test", Kt.shape[0])
        if wd > 0 and p is None:
            raise InvalidArgumentError(
                f"weight_decay={wd} acts on θ itself, so its effect on the outputs is −w·Jθ: pass "
                "j_theta0 = J θ0 (one torch.func.jvp of the outputs in direction θ0), or predict "
                "from a Problem, which computes it."
            )
    nk = K.shape[0]
    if f0v.size != nk:
        raise ShapeMismatchError(f"f0 has {f0v.size} entries but the kernel is {nk} × {nk}.")
    K = _check_kernel(K, eps)
    p = np.zeros(nk) if p is None else p
    if Kt is not None:
        pt = np.zeros(Kt.shape[0]) if pt is None else pt
    ntest = 0 if Kt is None else Kt.shape[0]
    _check_size(steps, n_rec, nk, ntest, name != "mse", budget, memory is None)
    rec = _record_steps(steps, record)
    rec_index = {int(s): i for i, s in enumerate(rec)}

    if name == "mse":
        yv = _vector(y_arr, "y", nk)
        assert qval is not None
        lam, V, snotes, _ = _spectrum(K, eps, kernel_rtol, vectors=True)
        assert V is not None
        notes += snotes
        r0 = V.T @ (f0v - yv)
        dd = -r0 + V.T @ p
        h = qval * lam + wd
        with np.errstate(divide="ignore", invalid="ignore"):
            rstar = np.where(h > 0, -wd * dd / np.where(h > 0, h, 1.0), r0)
        e0 = np.where(h > 0, r0 - rstar, 0.0)
        rates = _mode_rates(spec, spec.lr * h)
        energy = e0**2
        norm = float(np.sqrt(energy.sum()))
        active = np.abs(e0) > _ENERGY_RTOL * norm if norm > 0 else np.zeros(nk, bool)
        asym = float(rates[active].max()) if np.any(active) else 0.0
        if not np.any(active):
            notes.append("the residual starts at its fixed point: nothing to contract.")
        stable = bool(np.all(rates <= 1 + 1e-12))
        limit = float(0.5 * qval * np.sum(rstar**2)) if stable else None
        if spec.kind == "nesterov" and spec.beta == "scheduled":
            notes.append(
                "scheduled Nesterov: rates are those of the limit recursion β_t → 1 (√(1−a) for "
                "0 < a < 1); early on the envelope also carries a t^{−r/2} factor."
            )
        if wd > 0:
            notes.append(
                "weight decay: each mode converges to the ridge fixed point r*; the loss tends "
                "to limit_loss and its distance to it decays like asymptotic_rate, not its square."
            )
        hq = h  # gradient multiplier per mode
        ntest = 0 if Kt is None else Kt.shape[0]
        losses = np.empty(steps + 1)
        outs = np.empty((len(rec), nk))
        test_outs = None if Kt is None else np.empty((len(rec), ntest))
        q = qval

        if Kt is None:

            def grad(z: np.ndarray) -> np.ndarray:
                return hq * z

        else:
            KtV = Kt @ V
            shift_t = -f0t + pt  # u_test = F_test − f0_test + Jtest θ0

            def grad(z: np.ndarray) -> np.ndarray:
                e, ft = z[:nk], z[nk:]
                g = q * (rstar + e)  # eigen-coordinates of q·r
                return np.concatenate([hq * e, KtV @ g + wd * (ft + shift_t)])

        def on_step(t: int, z: np.ndarray) -> None:
            res = rstar + z[:nk]
            losses[t] = 0.5 * q * float(res @ res)
            i = rec_index.get(t)
            if i is not None:
                outs[i] = V @ res
                if test_outs is not None:
                    test_outs[i] = z[nk:]

        z0 = e0 if Kt is None else np.concatenate([e0, f0t])
        with np.errstate(over="ignore", invalid="ignore"):
            _iterate(spec, z0, grad, steps, on_step)
        residuals = outs
        outputs = outs + yv
        return Prediction(
            loss=losses,
            steps=steps,
            record_steps=rec,
            outputs=outputs,
            residuals=residuals,
            test_outputs=test_outs,
            eigenvalues=lam,
            rates=rates,
            initial_energy=energy,
            asymptotic_rate=asym,
            limit_loss=limit,
            stable=stable,
            optimizer=dict(spec.description),
            loss_name="mse",
            q=qval,
            reduction=reduction,
            notes=tuple(notes),
        )

    # ------------------------------------------------------ cross-entropy, BCE with logits
    assert reduction is not None
    if name == "cross_entropy":
        target, mask = _ce_targets(y_arr, n, k, ignore_index)
        if smoothing:  # PyTorch: (1 − ε)·target + ε/C, on every non-ignored row
            target = np.where(mask[:, None], (1.0 - smoothing) * target + smoothing / k, 0.0)
        units = int(mask.sum())
        if units == 0 and reduction == "mean":
            raise InvalidArgumentError("every target is ignored: the mean cross-entropy is 0/0.")
        scale = 1.0 / units if reduction == "mean" else 1.0
    else:
        target = y_arr.astype(np.float64).reshape(n, k)
        if not np.all(np.isfinite(target)):
            raise NonFiniteError("y holds NaN or infinite values.")
        mask = np.ones(n, bool)
        scale = 1.0 / (n * k) if reduction == "mean" else 1.0  # PyTorch: mean over all elements
    lam, _, snotes, clipped = _spectrum(K, eps, kernel_rtol, vectors=False)
    notes += snotes
    if clipped:  # iterate with the clipped (positive semi-definite) kernel the warning promised
        lam2, V2 = np.linalg.eigh(K)
        K = (V2 * np.maximum(lam2, 0.0)) @ V2.T
    shift = -f0v + p  # u = F − f0 + Jθ0
    ntest = 0 if Kt is None else Kt.shape[0]
    losses = np.empty(steps + 1)
    outs = np.empty((len(rec), nk))
    res_out = np.empty((len(rec), nk))
    test_outs = None if Kt is None else np.empty((len(rec), ntest))
    shift_t = None if Kt is None else -f0t + pt

    def ce_parts(F: np.ndarray) -> tuple[float, np.ndarray]:
        Z = F.reshape(n, k)
        if name == "bce_with_logits":  # ℓ = softplus(z) − y z, ∂ℓ/∂z = σ(z) − y
            val = float(np.sum(np.logaddexp(0.0, Z) - target * Z))
            return val * scale, (expit(Z) - target).reshape(-1)
        m = Z.max(axis=1, keepdims=True)
        ex = np.exp(Z - m)
        s = ex.sum(axis=1, keepdims=True)
        lse = (m + np.log(s))[:, 0]
        val = float(np.sum(target.sum(axis=1) * lse - np.sum(target * Z, axis=1)))
        res = np.where(mask[:, None], ex / s - target, 0.0)
        return val * scale, res.reshape(-1)

    def grad_ce(z: np.ndarray) -> np.ndarray:
        F = z[:nk]
        _, res = ce_parts(F)
        g = scale * res
        gtrain = K @ g + wd * (F + shift) if wd else K @ g
        if Kt is None:
            return gtrain
        ft = z[nk:]
        gtest = Kt @ g + wd * (ft + shift_t) if wd else Kt @ g
        return np.concatenate([gtrain, gtest])

    def on_step_ce(t: int, z: np.ndarray) -> None:
        val, res = ce_parts(z[:nk])
        losses[t] = val
        i = rec_index.get(t)
        if i is not None:
            outs[i] = z[:nk]
            res_out[i] = res
            if test_outs is not None:
                test_outs[i] = z[nk:]

    z0 = f0v if Kt is None else np.concatenate([f0v, f0t])
    with np.errstate(over="ignore", invalid="ignore"):
        _iterate(spec, z0, grad_ce, steps, on_step_ce)
    stable = bool(np.all(np.isfinite(losses)))
    what = "cross-entropy" if name == "cross_entropy" else "BCE with logits"
    notes.append(
        f"{what}: iterated in function space with the full kernel; no per-mode rates "
        "(Q depends on the outputs); stable means the predicted loss stayed finite."
    )
    if smoothing:
        notes.append(f"label smoothing ε={smoothing:g}: targets (1 − ε)·e_y + ε/{k}.")
    return Prediction(
        loss=losses,
        steps=steps,
        record_steps=rec,
        outputs=outs,
        residuals=res_out,
        test_outputs=test_outs,
        eigenvalues=lam,
        rates=None,
        initial_energy=None,
        asymptotic_rate=None,
        limit_loss=None,
        stable=stable,
        optimizer=dict(spec.description),
        loss_name=name,
        q=None,
        reduction=reduction,
        notes=tuple(notes),
    )


def _ce_targets(
    y: np.ndarray, n: int, k: int, ignore_index: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One-hot (or probability) targets ``(n, k)`` and the mask of non-ignored rows."""
    if y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1 and k != 1 and y.dtype.kind in "iub"):
        idx = y.reshape(-1)
        if idx.dtype.kind not in "iub":
            if not np.all(idx == np.round(idx)):
                raise InvalidArgumentError(
                    "cross-entropy targets of shape (n,) must be integer class indices."
                )
            idx = idx.astype(np.int64)
        if idx.size != n:
            raise ShapeMismatchError(f"y has {idx.size} labels but there are {n} samples.")
        mask = np.ones(n, bool) if ignore_index is None else idx != ignore_index
        if idx.size and mask.any() and (idx[mask].min() < 0 or idx[mask].max() >= k):
            raise InvalidArgumentError(f"class indices must lie in [0, {k}).")
        out = np.zeros((n, k))
        out[np.arange(n)[mask], idx[mask]] = 1.0
        return out, mask
    arr = y.astype(np.float64)
    if arr.shape != (n, k):
        raise ShapeMismatchError(
            f"cross-entropy targets of shape {arr.shape}: pass (n,) class indices or (n, k) "
            f"probabilities with (n, k) = {(n, k)}."
        )
    if not np.all(np.isfinite(arr)):
        raise NonFiniteError("y holds NaN or infinite values.")
    return arr, np.ones(n, bool)


def _record_arg(steps: int, record: Any) -> int | np.ndarray:
    """``record`` validated: a count ``>= 1`` or the sorted unique steps in ``[0, steps]``."""
    if record is None:
        return _MAX_RECORD
    if isinstance(record, (bool, np.bool_)):
        raise InvalidArgumentError(
            f"record={record!r} must be a count of steps, a list of steps or None, not a bool."
        )
    if isinstance(record, (int, np.integer)):
        if record < 1:
            raise InvalidArgumentError(
                f"record={record!r} must be >= 1 (a count of recorded steps), or None."
            )
        return int(record)
    if isinstance(record, (str, bytes, Mapping)) or not isinstance(record, Iterable):
        raise InvalidArgumentError(
            f"record={record!r} ({type(record).__name__}) must be a count, a list of steps or None."
        )
    items = list(record)
    bad = [
        r for r in items if isinstance(r, (bool, np.bool_)) or not isinstance(r, (int, np.integer))
    ]
    if bad:
        raise InvalidArgumentError(
            f"record steps must be integers, got {bad[0]!r} ({type(bad[0]).__name__}): pass "
            "e.g. record=[0, 10, 100]."
        )
    arr = np.unique(np.asarray(items, dtype=np.int64))
    if arr.size == 0 or arr.min() < 0 or arr.max() > steps:
        raise InvalidArgumentError(
            f"record steps must lie in [0, steps={steps}] and not be empty: pass e.g. "
            f"record=[0, {steps}]."
        )
    return arr


def _record_count(steps: int, record: Any) -> int:
    """How many steps :func:`_record_steps` will record (without building them)."""
    arg = _record_arg(steps, record)
    return min(steps + 1, arg + 2) if isinstance(arg, int) else int(arg.size)


def _record_steps(steps: int, record: int | Sequence[int] | None) -> np.ndarray:
    arg = _record_arg(steps, record)
    if not isinstance(arg, int):
        return arg
    count = arg
    if steps + 1 <= count + 1:
        return np.arange(steps + 1)
    inner = np.unique(np.round(np.geomspace(1, steps, count)).astype(np.int64))
    return np.unique(np.concatenate([[0], inner, [steps]]))


def _check_memory(memory: Any) -> int:
    if memory is None:
        return default_memory("cpu")
    if (
        isinstance(memory, bool)
        or not isinstance(memory, (int, float, np.integer, np.floating))
        or not math.isfinite(memory)
        or memory <= 0
    ):
        raise InvalidArgumentError(
            f"memory={memory!r} ({type(memory).__name__}) must be a positive number of bytes, "
            "or None for a quarter of the available RAM."
        )
    return int(memory)


def _check_size(
    steps: int, n_rec: int, nk: int, ntest: int, ce: bool, budget: int, default: bool
) -> None:
    """Refuse a prediction whose arrays (float64) would exceed ``budget`` bytes."""
    eigvecs = 0 if ce else nk * nk  # MSE: eigh's eigenvectors
    floats = (steps + 1) + 2 * n_rec * nk + n_rec * ntest + eigvecs + 4 * (nk + ntest)
    need = 8 * floats
    if need > budget:
        which = " (default: 1/4 of the available RAM)" if default else ""
        raise InvalidArgumentError(
            f"steps={steps} with n·k={nk}"
            + (f", {ntest} test outputs" if ntest else "")
            + f" and {n_rec} recorded steps needs about {need / 1e9:.3g} GB, more than "
            f"memory={budget / 1e9:.3g} GB{which}: predict fewer steps (the asymptotic rate "
            "describes the tail), record fewer steps (record=...), or raise memory=."
        )
