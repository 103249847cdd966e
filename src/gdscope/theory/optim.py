"""Optimizer adapters: what a live ``torch.optim.Optimizer`` means for linear stability (THEORY §3).

One small adapter per optimizer family reads the optimizer's *current* param groups and state
(so a learning-rate scheduler moves every value) and says

* its **linearized update** near a minimum: with a frozen diagonal preconditioner ``P`` (``I``
  for the SGD family) and curvature ``A = P^{-1/2}(H + wI)P^{-1/2}`` (``w`` a coupled L2 weight
  decay), every eigenvalue ``λ`` of ``A`` is a mode following the heavy-ball or Nesterov
  recursion with ``a = step·λ`` and momentum ``β`` (:attr:`OptimizerSetting.recursion`):

  - heavy ball ``e_{t+1} = (1+β−a) e_t − β e_{t−1}``, stable iff ``0 < a < 2(1+β)``;
  - Nesterov ``e_{t+1} = (1−a)[(1+β) e_t − β e_{t−1}]``, stable iff ``0 < a < 2(1+β)/(1+2β)``;

* its **stability threshold**: the largest sharpness ``λ_max(A)`` with every mode stable (the
  root ``z = −1``: period-2 oscillation); :func:`optimizer_threshold` is the formula;
* its **preconditioner** ``P`` (flat, in the order of the parameters asked for), or ``None``
  when the threshold is on ``λ_max(∇²L)`` itself.

==========================  ===========================  =====================================
family (classes)            P (diagonal)                 threshold on λ_max(A)
==========================  ===========================  =====================================
SGD (gdscope ``GD``,        ``I``                        GD ``2/η``; heavy ball ``2(1+β)/η``;
``HeavyBall``,                                           Nesterov ``2(1+β)/((1+2β)η)``; torch
``Nesterov``; torch                                      ``SGD``: step ``η(1−τ)`` with momentum
``SGD``)                                                 ``μ`` and dampening ``τ``, minus ``w``
Adam, AdamW                 ``(1−β₁ᵗ)(√v̂ + ε)``,         ``(2+2β₁)/((1−β₁)η)`` (38/η at
                            ``v̂ = v/(1−β₂ᵗ)``            ``β₁ = 0.9``; Cohen et al. 2022)
RMSprop                     ``√v + ε`` (centered:        ``2/η``; with momentum ``μ``:
                            ``√(v − ḡ²) + ε``)           ``2(1+μ)/η``
Adagrad                     ``√s + ε`` (``s`` = sum)     ``2/η_t``, ``η_t = η/(1+t·decay)``
==========================  ===========================  =====================================

Derivations. *Adam*: ``m ← β₁m + (1−β₁)g``, ``θ ← θ − η m/((1−β₁ᵗ)(√v̂+ε)) = θ − η P⁻¹m``. With
``P`` frozen, in an eigenbasis of ``A`` (``u = P^{1/2}e``): ``m'_{t+1} = β₁m'_t + (1−β₁)λu_t``,
``u_{t+1} = u_t − ηm'_{t+1}``, which is heavy ball with step ``η(1−β₁)`` and momentum ``β₁``:
stable iff ``η(1−β₁)λ < 2(1+β₁)``. Adam's L2 ``weight_decay`` adds ``wθ`` to ``g`` (``H → H +
wI``, then preconditioned); AdamW's decoupled decay multiplies ``θ`` by ``1−ηw`` outside the
preconditioner and is left out (noted). *RMSprop*: ``θ ← θ − η g/(√v+ε)`` is GD on ``A`` (step
``η``); with momentum ``b ← μb + g/(√v+ε)``, ``θ ← θ − ηb`` is heavy ball (step ``η``, ``β =
μ``). *Adagrad*: ``θ ← θ − η_t g/(√s+ε)`` is GD on ``A`` with the step of the *next* update,
``η_t = η/(1 + t·lr_decay)`` after ``t`` steps. ``s`` only grows, so Adagrad's preconditioned
sharpness only falls: it reaches its threshold only through a growing ``H``. ``v`` and ``s``
change every step, so these are the linearization with the state *frozen* at its current value:
the statement Cohen et al. test (the preconditioned sharpness hovers at the threshold).

Several param groups: the SGD family's threshold is the smallest group's (as
:func:`gdscope.train.stability_threshold`); for the preconditioned families a group's ``lr``
relative to the first group's is folded into ``P`` (``P_g · η₀/η_g``), so one ``η₀`` and one
threshold describe the whole update; groups with different momenta give no threshold.

>>> import torch
>>> p = torch.nn.Parameter(torch.zeros(3))
>>> read_optimizer(torch.optim.Adam([p], lr=0.01)).threshold  # 38/η
3800.0000000000005
>>> read_optimizer(torch.optim.SGD([p], lr=0.1, momentum=0.5, dampening=0.5)).threshold
60.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from gdscope.errors import InvalidArgumentError

__all__ = [
    "FAMILIES",
    "OptimizerSetting",
    "mode_rate",
    "optimizer_threshold",
    "read_optimizer",
]

#: The families an adapter exists for ("none": anything else, no threshold).
FAMILIES = ("gd", "heavy_ball", "nesterov", "adam", "rmsprop", "adagrad", "none")


def optimizer_threshold(lr: float, momentum: float = 0.0, nesterov: bool = False) -> float:
    """Largest sharpness at which a minimum is linearly stable (THEORY §3).

    ``2/η`` (GD), ``2(1+β)/η`` (heavy ball), ``2(1+β)/((1+2β)η)`` (Nesterov). Each is where a
    mode's recursion gets the root ``z = −1`` (period-2 oscillation).

    >>> optimizer_threshold(0.1), optimizer_threshold(0.1, 0.5), optimizer_threshold(0.1, 0.5, True)
    (20.0, 30.0, 15.0)

    ``η = 0`` gives ``inf`` (nothing moves). :func:`gdscope.train.stability_threshold` maps any
    optimizer's settings (PyTorch SGD's dampening and weight decay too) onto this formula.
    """
    if lr == 0:
        return math.inf
    if momentum == 0:
        return 2.0 / lr
    if nesterov:
        return 2.0 * (1 + momentum) / ((1 + 2 * momentum) * lr)
    return 2.0 * (1 + momentum) / lr


def mode_rate(a: float, momentum: float, nesterov: bool) -> float:
    """``log max|z|`` over the roots of one mode's recursion (``a = step · λ``)."""
    if momentum == 0:
        x = abs(1 - a)
        return math.log(x) if x > 0 else -math.inf
    b = momentum
    coeffs = [1.0, -(1 + b) * (1 - a), b * (1 - a)] if nesterov else [1.0, -(1 + b - a), b]
    r = float(np.abs(np.roots(coeffs)).max())
    return math.log(r) if r > 0 else -math.inf


@dataclass
class OptimizerSetting:
    """What an adapter read from a live optimizer (first group's settings, see module doc).

    ``family`` is one of :data:`FAMILIES`; ``lr`` the first group's current ``η``; ``momentum``
    and ``nesterov`` the user-facing momentum (SGD ``μ``, heavy-ball ``β``; 0 for Adam, whose
    ``β₁`` is ``beta1``); ``recursion = (step, β, nesterov)`` the linearized update of one mode
    (``a = step·λ``); ``weight_decay`` a coupled L2 decay (``H → H + wI``); ``precond`` the
    diagonal of ``P`` (flat; only with ``params`` given and the state present) and
    ``preconditioned`` whether the threshold is on ``λ_max(P^{-1/2}(H+wI)P^{-1/2})``;
    ``threshold`` (``None``: unknown, with a note saying why); ``sgd_ok``: the SGD mean-square
    analysis of :func:`gdscope.stability` applies (plain SGD family, one setting, no decay).
    """

    family: str
    lr: float
    momentum: float = 0.0
    nesterov: bool = False
    recursion: tuple[float, float, bool] = (0.0, 0.0, False)
    weight_decay: float = 0.0
    preconditioned: bool = False
    precond: Tensor | None = None
    beta1: float = 0.0
    threshold: float | None = None
    sgd_ok: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def lr_step(self) -> float:
        """The step of the recursion (``lr·(1−dampening)`` for damped SGD, ``η(1−β₁)`` Adam)."""
        return self.recursion[0]

    def mode_rate(self, lam: float) -> float:
        """Per-step log rate of the mode with eigenvalue ``lam`` of the (preconditioned) ``A``."""
        step, beta, nest = self.recursion
        return mode_rate(step * lam, beta, nest)


def _group_of(optimizer: Optimizer, param: Tensor) -> dict[str, Any] | None:
    for g in optimizer.param_groups:
        if any(p is param for p in g["params"]):
            return g
    return None


def _f(x: Any) -> float:
    return float(x.item() if isinstance(x, Tensor) else x)


# ---------------------------------------------------------------------- SGD family
def _sgd_family(opt: Optimizer) -> OptimizerSetting | None:
    """torch ``SGD`` and gdscope's ``GD`` / ``HeavyBall`` / ``Nesterov`` (duck-typed: theory/
    does not import train/)."""
    name = type(opt).__name__
    groups = opt.param_groups
    g0 = groups[0]
    lr = _f(g0["lr"])
    keys = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "beta", "maximize")
    multi = len({tuple(repr(g.get(k)) for k in keys) for g in groups}) > 1
    notes = []
    if multi:
        notes.append(
            "the optimizer's param groups have different settings: the first group's are "
            "analysed, the threshold is the smallest group's"
        )

    def one(g: dict[str, Any]) -> OptimizerSetting:
        glr = _f(g["lr"])
        if isinstance(opt, torch.optim.SGD):
            if g.get("maximize", False):
                return OptimizerSetting("none", glr, notes=["SGD with maximize=True: no minimum"])
            mu = _f(g.get("momentum", 0.0))
            tau = _f(g.get("dampening", 0.0))
            nest = bool(g.get("nesterov", False)) and mu > 0
            wd = _f(g.get("weight_decay", 0.0))
            step = glr * (1 - tau) if (mu > 0 and not nest) else glr
            fam = "gd" if mu == 0 else ("nesterov" if nest else "heavy_ball")
            st = OptimizerSetting(fam, glr, mu, nest, (step, mu, nest), weight_decay=wd)
            if tau and mu > 0:
                st.notes.append(
                    f"dampening {tau:g}: the recursion's step is lr·(1 − dampening) = {step:g}"
                )
            if wd:
                st.notes.append(
                    f"weight decay {wd:g} shifts H (and every H_i) by {wd:g}·I: included in the "
                    "threshold, not in the SGD analysis"
                )
            st.sgd_ok = not wd
            st.threshold = optimizer_threshold(step, mu, nest) - wd
            return st
        beta = g.get("beta", 0.0)
        nest = name == "Nesterov"
        if beta == "scheduled":
            k = 1 + max(
                (opt.state[p].get("step", 0) for p in g["params"] if p in opt.state), default=0
            )
            r = _f(g.get("r", 3.0))
            beta = (k - 1) / (k + r - 1)
            notes_b = [
                f"scheduled Nesterov momentum: analysed with the next step's β = {beta:.4g} "
                "(the threshold moves every step)"
            ]
        else:
            notes_b = []
        beta = _f(beta)
        nest = nest and beta > 0
        fam = "gd" if beta == 0 else ("nesterov" if nest else "heavy_ball")
        st = OptimizerSetting(fam, glr, beta, nest, (glr, beta, nest), sgd_ok=True, notes=notes_b)
        st.threshold = optimizer_threshold(glr, beta, nest)
        return st

    ours = (name == "GD" and "beta" not in g0) or (
        name in ("HeavyBall", "Nesterov") and "beta" in g0
    )
    if not (isinstance(opt, torch.optim.SGD) or ours):
        return None
    settings = [one(g) for g in groups]
    st = settings[0]
    st.notes = notes + st.notes
    st.lr = lr
    if any(s.family == "none" for s in settings):
        st.threshold = None
    else:
        st.threshold = min(s.threshold for s in settings)  # type: ignore[type-var]
    st.sgd_ok = st.sgd_ok and not multi and st.family != "none"
    return st


# ---------------------------------------------------------------------- adaptive families
def _common(opt: Optimizer, keys: tuple[str, ...], family: str) -> tuple[OptimizerSetting, bool]:
    """The first group's setting shell; False when the groups disagree on ``keys``."""
    groups = opt.param_groups
    st = OptimizerSetting(family, _f(groups[0]["lr"]), preconditioned=True)
    same = len({tuple(repr(g.get(k)) for k in keys) for g in groups}) == 1
    if not same:
        st.notes.append(f"param groups with different {', '.join(keys)}: no single threshold")
    if any(g.get("maximize", False) for g in groups):
        st.notes.append(f"{type(opt).__name__} with maximize=True: no minimum")
        same = False
    return st, same


def _collect(
    opt: Optimizer,
    params: Sequence[Tensor] | None,
    names: Sequence[str] | None,
    st: OptimizerSetting,
    diag: Any,
) -> None:
    """Fill ``st.precond`` from ``diag(group, state) -> Tensor`` per parameter (lr folded in).

    A parameter the optimizer does not hold never moves: ``P = ∞`` there, so
    ``P^{-1/2} H P^{-1/2}`` is zero on it.
    """
    if params is None:
        return
    parts = []
    for i, p in enumerate(params):
        g = _group_of(opt, p)
        state = opt.state.get(p, {})
        label = names[i] if names is not None else f"#{i}"
        if g is None:  # not trained: it never moves, P = ∞ (P^{-1/2} = 0 on it)
            parts.append(torch.full((p.numel(),), math.inf, dtype=torch.float64))
            continue
        d = diag(g, state) if state else None
        if d is None:
            st.notes.append(
                f"the optimizer's state is empty for {label!r} (take at least one step first): "
                f"no preconditioner, no {type(opt).__name__} threshold"
            )
            st.precond, st.threshold = None, None
            return
        scale = st.lr / _f(g["lr"]) if _f(g["lr"]) > 0 else math.inf
        parts.append((d.detach() * scale).reshape(-1))
    device = next((q.device for q in parts if q.device.type != "cpu"), torch.device("cpu"))
    st.precond = torch.cat([q.to(device, torch.float64) for q in parts])


def _adam(opt: Optimizer, params: Any, names: Any) -> OptimizerSetting:
    st, same = _common(opt, ("betas",), "adam")
    beta1, beta2 = (_f(b) for b in opt.param_groups[0]["betas"])
    st.beta1 = beta1
    st.recursion = (st.lr * (1 - beta1), beta1, False)
    if not same:
        return st
    adamw = isinstance(opt, torch.optim.AdamW)
    wds = {_f(g.get("weight_decay", 0.0)) for g in opt.param_groups}
    if adamw and any(wds):
        st.notes.append("AdamW's decoupled weight decay is not part of the threshold")
    elif any(wds):
        if len(wds) > 1:
            st.notes.append("param groups with different L2 weight decay: no single threshold")
            return st
        st.weight_decay = wds.pop()
        st.notes.append(f"Adam's L2 weight decay {st.weight_decay:g}: H + wI is preconditioned")
    st.threshold = (2 + 2 * beta1) / ((1 - beta1) * st.lr) if st.lr > 0 else math.inf

    def diag(g: dict[str, Any], state: dict[str, Any]) -> Tensor | None:
        key = "max_exp_avg_sq" if g.get("amsgrad", False) else "exp_avg_sq"
        if key not in state:
            return None
        t = _f(state["step"])
        v = state[key].detach().double()
        denom = (v / (1 - beta2**t)).sqrt() + _f(g["eps"])
        return (1 - beta1**t) * denom  # θ -= lr/(1−β₁ᵗ) · m/(√v̂ + ε) = lr·P⁻¹m

    _collect(opt, params, names, st, diag)
    if st.threshold is not None:
        st.notes.append(
            "Adam: preconditioner P = (1 − β₁ᵗ)(√v̂ + ε) from the optimizer state (Cohen et al. "
            f"2022), threshold (2 + 2β₁)/((1 − β₁)η) with β₁ = {beta1:g}"
        )
    return st


def _rmsprop(opt: Optimizer, params: Any, names: Any) -> OptimizerSetting:
    st, same = _common(opt, ("momentum", "weight_decay"), "rmsprop")
    g0 = opt.param_groups[0]
    mu = _f(g0.get("momentum", 0.0))
    st.momentum = mu
    st.recursion = (st.lr, mu, False)
    if not same:
        return st
    st.weight_decay = _f(g0.get("weight_decay", 0.0))
    st.threshold = optimizer_threshold(st.lr, mu, False)

    def diag(g: dict[str, Any], state: dict[str, Any]) -> Tensor | None:
        if "square_avg" not in state:
            return None
        v = state["square_avg"].detach().double()
        if g.get("centered", False):
            v = v - state["grad_avg"].detach().double() ** 2
        return v.clamp_min(0).sqrt() + _f(g["eps"])

    _collect(opt, params, names, st, diag)
    if st.threshold is not None:
        st.notes.append(
            "RMSprop: preconditioner P = √v + ε (centered: √(v − ḡ²) + ε) from the optimizer "
            "state, "
            f"threshold {'2(1+μ)/η' if mu else '2/η'} on the preconditioned sharpness"
        )
    return st


def _adagrad(opt: Optimizer, params: Any, names: Any) -> OptimizerSetting:
    st, same = _common(opt, ("lr_decay", "weight_decay"), "adagrad")
    g0 = opt.param_groups[0]
    decay = _f(g0.get("lr_decay", 0.0))
    steps = [
        _f(opt.state[p]["step"])
        for g in opt.param_groups
        for p in g["params"]
        if p in opt.state and "step" in opt.state[p]
    ]
    t = max(steps, default=0.0)
    eta = st.lr / (1 + t * decay)  # the next update's step
    st.recursion = (eta, 0.0, False)
    if not same:
        return st
    st.weight_decay = _f(g0.get("weight_decay", 0.0))
    st.threshold = 2.0 / eta if eta > 0 else math.inf

    def diag(g: dict[str, Any], state: dict[str, Any]) -> Tensor | None:
        if "sum" not in state or _f(state.get("step", 0)) == 0:
            return None
        return state["sum"].detach().double().sqrt() + _f(g["eps"])

    _collect(opt, params, names, st, diag)
    if st.threshold is not None:
        st.notes.append(
            "Adagrad: preconditioner P = √(Σg²) + ε from the optimizer state, threshold 2/η_t "
            f"with η_t = η/(1 + t·lr_decay) = {eta:.4g} (P only grows: the preconditioned "
            "sharpness falls)"
        )
    return st


def read_optimizer(
    optimizer: Optimizer,
    params: Sequence[Tensor] | None = None,
    names: Sequence[str] | None = None,
) -> OptimizerSetting:
    """The adapter's reading of ``optimizer``'s current settings (and ``P`` for ``params``).

    Args:
        optimizer: a live ``torch.optim.Optimizer``.
        params: the parameters, in the flat order the preconditioner is wanted in (e.g. a
            problem's ``[named[n] for n in prob.names]``); ``None``: no ``P``.
        names: their names, for notes.

    An optimizer no adapter knows gives family ``"none"`` and no threshold (with a note).
    """
    if not isinstance(optimizer, Optimizer):
        raise InvalidArgumentError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}."
        )
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return _adam(optimizer, params, names)
    if isinstance(optimizer, torch.optim.RMSprop):
        return _rmsprop(optimizer, params, names)
    if isinstance(optimizer, torch.optim.Adagrad):
        return _adagrad(optimizer, params, names)
    st = _sgd_family(optimizer)
    if st is not None:
        return st
    name = type(optimizer).__name__
    return OptimizerSetting(
        "none",
        _f(optimizer.param_groups[0]["lr"]),
        notes=[f"no stability threshold is drawn for optimizer {name}"],
    )
