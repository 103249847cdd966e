"""The optimizers of THEORY §2 as ``torch.optim.Optimizer`` subclasses, and their thresholds.

* :class:`GD`: ``θ ← θ − η g``.
* :class:`HeavyBall`: ``θ_{t+1} = θ_t − η∇L(θ_t) + β(θ_t − θ_{t−1})``, ``θ_{−1} = θ_0``.
* :class:`Nesterov`: ``x_t = y_{t−1} − η∇L(y_{t−1})``, ``y_t = x_t + β_t(x_t − x_{t−1})``,
  ``y_0 = x_0``, with constant ``β_t ≡ β`` or Su–Boyd–Candès ``β_t = (t−1)/(t+r−1)``. The model
  holds the look-ahead iterates ``y_t``; :meth:`Nesterov.main_iterate` returns the ``x_t``.

All three keep ``lr`` (and ``beta``) in their param groups, so learning-rate schedulers,
per-group settings and ``state_dict`` round trips work as for any PyTorch optimizer. They have no
weight decay and always minimize.

:func:`stability_threshold` is the largest sharpness at which a minimum is linearly stable under
an optimizer's current settings (THEORY §3), :func:`adaptive_threshold` the same on the
preconditioned sharpness of Adam, RMSprop and Adagrad; both ask the optimizer adapters of
:mod:`gdscope.theory.optim`. :func:`describe_optimizer` is a JSON-friendly record of an
optimizer's class and hyperparameters.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from gdscope.errors import InvalidArgumentError
from gdscope.theory.optim import read_optimizer

__all__ = [
    "GD",
    "HeavyBall",
    "Nesterov",
    "adaptive_threshold",
    "describe_optimizer",
    "stability_threshold",
]

Closure = Callable[[], Any] | None
ParamsArg = Iterable[Tensor] | Iterable[dict[str, Any]]


def _check_params(params: Any, where: str) -> list[Any]:
    """Materialize ``params`` (tensors or param-group dicts); refuse what trains nothing."""
    fix = "pass model.parameters() (or a list of param-group dicts with a 'params' key)"
    if isinstance(params, nn.Module):
        raise InvalidArgumentError(
            f"{where}: params={type(params).__name__}(...) is a module, not its parameters: {fix}."
        )
    if isinstance(params, (Tensor, str, bytes, Mapping)) or not isinstance(params, Iterable):
        raise InvalidArgumentError(
            f"{where}: params={_short(params)} ({type(params).__name__}) must be an iterable of "
            f"tensors or param-group dicts: {fix}."
        )
    items = list(params)
    count = 0
    for i, item in enumerate(items):
        if isinstance(item, Tensor):
            count += 1
        elif isinstance(item, Mapping):
            if "params" not in item:
                raise InvalidArgumentError(
                    f"{where}: params[{i}] is a param group without a 'params' key: {fix}."
                )
            group = item["params"]
            group = [group] if isinstance(group, Tensor) else group
            if isinstance(group, (str, bytes, Mapping)) or not isinstance(group, Iterable):
                raise InvalidArgumentError(
                    f"{where}: params[{i}]['params']={_short(group)} must be tensors: {fix}."
                )
            group = list(group)
            bad = [type(g).__name__ for g in group if not isinstance(g, Tensor)]
            if bad:
                raise InvalidArgumentError(
                    f"{where}: params[{i}]['params'] holds {bad[0]}, not tensors: {fix}."
                )
            count += len(group)
            items[i] = {**item, "params": group}
        else:
            raise InvalidArgumentError(
                f"{where}: params[{i}]={_short(item)} ({type(item).__name__}) is neither a tensor "
                f"nor a param-group dict: {fix}."
            )
    if count == 0:
        raise InvalidArgumentError(
            f"{where}: params is empty (no tensors in {len(items)} item(s)), so the optimizer "
            f"would train nothing: {fix}; check that the model has trainable parameters."
        )
    return items


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_lr(lr: Any, where: str) -> float:
    if not _is_real(lr) or not math.isfinite(lr) or lr <= 0:
        raise InvalidArgumentError(
            f"{where}: lr={lr!r} ({type(lr).__name__}) must be a finite number > 0: pass a "
            "positive step size, e.g. lr=0.1."
        )
    return float(lr)


def _is_real(x: Any) -> bool:
    """A real number (Python or NumPy scalar), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _check_beta(beta: Any, where: str, scheduled_ok: bool) -> float | str:
    if scheduled_ok and isinstance(beta, str):
        if beta != "scheduled":
            raise InvalidArgumentError(
                f"{where}: beta={beta!r} is not understood: pass a number in [0, 1) for constant "
                "momentum or beta='scheduled' for β_t = (t−1)/(t+r−1)."
            )
        return beta
    if not _is_real(beta) or not 0 <= beta < 1:
        extra = " or 'scheduled'" if scheduled_ok else ""
        raise InvalidArgumentError(
            f"{where}: beta={beta!r} ({type(beta).__name__}) must be a number in [0, 1){extra}: "
            "momentum β ≥ 1 never converges; pass e.g. beta=0.9."
        )
    return float(beta)


def _check_r(r: Any, where: str) -> float:
    if not _is_real(r) or not math.isfinite(r) or r <= 0:
        raise InvalidArgumentError(
            f"{where}: r={r!r} ({type(r).__name__}) must be a finite number > 0 "
            "(β_t = (t−1)/(t+r−1)); r=3 is the classical choice."
        )
    return float(r)


def _closure_loss(closure: Closure) -> Any:
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class GD(Optimizer):
    """Gradient descent, ``θ ← θ − η g`` with ``g = p.grad`` (parameters without grad skipped).

    Args:
        params: parameters or param groups (a group may set its own ``lr``).
        lr: step size ``η > 0``.
    """

    def __init__(self, params: ParamsArg, lr: float) -> None:
        defaults = {"lr": _check_lr(lr, "GD")}
        super().__init__(_check_params(params, "GD"), defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["lr"] = _check_lr(group["lr"], "GD")

    @torch.no_grad()
    def step(self, closure: Closure = None) -> Any:  # type: ignore[override]
        """One update ``θ ← θ − η g``; returns the closure's loss if a closure is given."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["lr"])
        return loss


class HeavyBall(Optimizer):
    """Polyak's heavy ball: ``θ_{t+1} = θ_t − η∇L(θ_t) + β(θ_t − θ_{t−1})``, ``θ_{−1} = θ_0``.

    The first step is plain GD. The previous iterate ``θ_{t−1}`` is kept in ``state[p]
    ["previous"]``, so the formula holds exactly even when ``η`` changes between steps (PyTorch's
    ``SGD(momentum=β)`` stores ``v`` with ``p ← p − η v`` instead: the same sequence under a
    constant ``η``, a different one under a schedule).

    Args:
        params: parameters or param groups (a group may set its own ``lr`` and ``beta``).
        lr: step size ``η > 0``.
        beta: momentum ``β ∈ [0, 1)``.
    """

    def __init__(self, params: ParamsArg, lr: float, beta: float) -> None:
        defaults = {"lr": _check_lr(lr, "HeavyBall"), "beta": _check_beta(beta, "HeavyBall", False)}
        super().__init__(_check_params(params, "HeavyBall"), defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["lr"] = _check_lr(group["lr"], "HeavyBall")
        group["beta"] = _check_beta(group["beta"], "HeavyBall", False)

    @torch.no_grad()
    def step(self, closure: Closure = None) -> Any:  # type: ignore[override]
        """One update ``θ ← θ − η g + β(θ − θ_prev)``, then ``θ_prev ←`` the old ``θ``."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr, beta = group["lr"], group["beta"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                prev = state.get("previous")
                if prev is None:  # θ_{−1} = θ_0: the first step is GD
                    state["previous"] = p.detach().clone()
                    p.add_(p.grad, alpha=-lr)
                    continue
                delta = p - prev  # θ_t − θ_{t−1}
                prev.copy_(p)
                p.add_(p.grad, alpha=-lr).add_(delta, alpha=beta)
        return loss


class Nesterov(Optimizer):
    """Nesterov's accelerated gradient, constant or Su–Boyd–Candès scheduled momentum.

    With ``y_0 = x_0`` (the initial parameters), for ``t ≥ 1``::

        x_t = y_{t−1} − η ∇L(y_{t−1})
        y_t = x_t + β_t (x_t − x_{t−1}),    β_t = β  or  β_t = (t−1)/(t+r−1)  ("scheduled")

    so the scheduled ``β_1 = 0``. **The parameters the model holds are the look-ahead iterates
    ``y_t``** (gradients are taken there, as in PyTorch's ``SGD(nesterov=True)``, whose held
    parameters are the same ``y_t`` under a constant ``η``); the main iterates ``x_t`` live in
    ``state[p]["main"]`` and :meth:`main_iterate` returns them. With constant ``β`` this is
    THEORY §2's ``y_t = θ_t + β(θ_t − θ_{t−1})``, ``θ_{t+1} = y_t − η∇L(y_t)`` with ``θ = x``.

    Args:
        params: parameters or param groups (a group may set its own ``lr``, ``beta``, ``r``).
        lr: step size ``η > 0``.
        beta: constant momentum in ``[0, 1)`` or ``"scheduled"``.
        r: the schedule's ``r > 0`` (3 classically); ignored for constant ``beta``.
    """

    def __init__(self, params: ParamsArg, lr: float, beta: float | str, r: float = 3.0) -> None:
        defaults = {
            "lr": _check_lr(lr, "Nesterov"),
            "beta": _check_beta(beta, "Nesterov", True),
            "r": _check_r(r, "Nesterov"),
        }
        super().__init__(_check_params(params, "Nesterov"), defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["lr"] = _check_lr(group["lr"], "Nesterov")
        group["beta"] = _check_beta(group["beta"], "Nesterov", True)
        group["r"] = _check_r(group["r"], "Nesterov")

    @staticmethod
    def momentum_at(group: dict[str, Any], t: int) -> float:
        """``β_t`` of the step producing ``(x_t, y_t)``, ``t ≥ 1``."""
        if group["beta"] == "scheduled":
            return (t - 1) / (t + group["r"] - 1)
        return group["beta"]

    @torch.no_grad()
    def step(self, closure: Closure = None) -> Any:  # type: ignore[override]
        """One update: ``x_t = y − η g``, ``y ← x_t + β_t (x_t − x_{t−1})``."""
        loss = _closure_loss(closure)
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "main" not in state:  # x_0 = y_0
                    state["main"] = p.detach().clone()
                    state["step"] = 0
                t = state["step"] + 1
                beta = self.momentum_at(group, t)
                x_prev = state["main"]
                p.add_(p.grad, alpha=-lr)  # p = x_t
                delta = p - x_prev  # x_t − x_{t−1}
                x_prev.copy_(p)
                if beta != 0:
                    p.add_(delta, alpha=beta)  # p = y_t
                state["step"] = t
        return loss

    def main_iterate(self) -> list[Tensor]:
        """The main iterates ``x_t``, one (cloned) tensor per parameter in param-group order.

        A parameter that has not been stepped yet has ``x_0 = y_0``, its current value.
        """
        out = []
        for group in self.param_groups:
            for p in group["params"]:
                x = self.state[p].get("main")
                out.append((p if x is None else x).detach().clone())
        return out


def stability_threshold(optimizer: Optimizer) -> float | None:
    """Largest sharpness ``λ_max(∇²L)`` at which a minimum is linearly stable, or ``None``.

    Evaluated for the optimizer's *current* param-group settings (a scheduler moves it); with
    several groups, the smallest of their thresholds. For ``η``, momentum ``β``:

    ========================================  ===========================================
    ``GD``                                    ``2/η``
    ``HeavyBall``                             ``2(1+β)/η``
    ``Nesterov`` (constant ``β``)             ``2(1+β)/((1+2β)η)``
    ``Nesterov("scheduled")``                 same with the next step's ``β_{k+1} = k/(k+r)``
                                              after ``k`` steps (``2/η`` at ``k=0``, → ``4/(3η)``)
    ``SGD(μ, dampening τ, weight_decay w)``   ``2(1+μ)/(η(1−τ)) − w`` (``2/η − w`` if ``μ=0``;
                                              ``inf`` if ``τ=1``, ``μ>0``)
    ``SGD(μ, nesterov=True, weight_decay w)`` ``2(1+μ)/((1+2μ)η) − w``
    anything else (Adam, RMSprop, ...)        ``None`` (their threshold is on a preconditioned
                                              sharpness: :func:`adaptive_threshold`)
    ========================================  ===========================================

    Derivation (THEORY §2). Near a minimum, along a Hessian eigenvector with eigenvalue ``h``,
    each method is a linear recursion in the error ``e_t`` with ``a = ηh``:

    * heavy ball: ``e_{t+1} = (1+β−a) e_t − β e_{t−1}``, characteristic polynomial
      ``p(z) = z² − (1+β−a) z + β``;
    * Nesterov (on ``y`` or ``x``): ``e_{t+1} = (1−a)[(1+β) e_t − β e_{t−1}]``,
      ``p(z) = z² − (1−a)(1+β) z + (1−a)β``.

    ``z² + c₁z + c₀`` has both roots in the open unit disc iff (Jury) ``|c₀| < 1``,
    ``p(1) = 1 + c₁ + c₀ > 0`` and ``p(−1) = 1 − c₁ + c₀ > 0``. Heavy ball: ``p(1) = a > 0``,
    ``c₀ = β < 1`` and ``p(−1) = 2(1+β) − a > 0``, so ``a < 2(1+β)``. Nesterov: ``p(1) = a``,
    ``p(−1) = 1 + (1−a)(1+2β) > 0 ⇔ a < 2(1+β)/(1+2β)`` and ``|c₀| = |1−a|β < 1`` holds below
    that bound. In both the boundary is the root ``z = −1`` (period-2 oscillation). GD is
    ``β = 0``. PyTorch's ``SGD``: weight decay replaces ``h`` by ``h + w``; with momentum,
    ``p_{t+1} − p_t = −η v_t`` and ``v_t = μ v_{t−1} + (1−τ) g_t`` give
    ``p_{t+1} = p_t − η(1−τ) g_t + μ(p_t − p_{t−1})``: heavy ball with step ``η(1−τ)`` (the
    undampened first step does not affect stability), hence ``(h + w) η(1−τ) < 2(1+μ)``. With
    ``nesterov=True``, ``p_{t+1} = p_t − η(g_t + μ v_t)`` has (z-transform) the Nesterov
    polynomial above with ``β = μ``, hence ``(h + w) η < 2(1+μ)/(1+2μ)``. SGD with
    ``maximize=True`` gives ``None``; ``η = 0`` gives ``inf``; a large ``w`` can give a negative
    threshold (then no minimum is stable).
    """
    st = read_optimizer(optimizer)
    return None if st.preconditioned else st.threshold


def adaptive_threshold(optimizer: Optimizer) -> float | None:
    """Threshold on the *preconditioned* sharpness ``λ_max(P^{-1/2} H P^{-1/2})``, or ``None``.

    For Adam/AdamW ``(2+2β₁)/((1−β₁)η)``, RMSprop ``2/η`` (``2(1+μ)/η`` with momentum),
    Adagrad ``2/η_t`` (:mod:`gdscope.theory.optim` derives each); ``None`` for the SGD family
    (whose threshold, on ``λ_max(∇²L)``, is :func:`stability_threshold`) and unknown optimizers.
    Read from the current param groups, so a scheduler moves it.
    """
    st = read_optimizer(optimizer)
    return st.threshold if st.preconditioned else None


def describe_optimizer(optimizer: Optimizer) -> dict[str, Any]:
    """``{"class": name, "param_groups": [hyperparameters of each group, params left out]}``.

    Values are made JSON-friendly: tensors become numbers or lists, tuples become lists, other
    objects their ``repr``.
    """
    groups = [
        {k: _jsonable(v) for k, v in group.items() if k != "params"}
        for group in optimizer.param_groups
    ]
    return {"class": type(optimizer).__name__, "param_groups": groups}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)
