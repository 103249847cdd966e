"""Built-in probes: loss, accuracy, gradient norm, distance from init, threshold, sharpness
(plain and preconditioned), trace.

Cheap probes reuse the training step's own loss and outputs (``iterate="before"``) and fall back
to evaluating the problem at the current parameters (``"after"``) when the loop did not pass
them. Curvature probes evaluate the current parameters on the tracker's subset.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from gdscope.curvature import curvature_operator, hessian_trace
from gdscope.linalg import CallableOperator, lanczos
from gdscope.probes.base import (
    Iterate,
    Probe,
    ProbeState,
    Schedule,
    class_view,
    current_outputs,
)
from gdscope.problem import Problem
from gdscope.theory.optim import read_optimizer

__all__ = [
    "AccuracyProbe",
    "DistanceProbe",
    "GradNormProbe",
    "HessianTraceProbe",
    "LossProbe",
    "PreconditionedSharpnessProbe",
    "SharpnessProbe",
    "ThresholdProbe",
    "default_probes",
]


class LossProbe(Probe):
    """``loss``: the step's loss (before the update), else ``L`` at the current parameters."""

    name = "loss"
    needs = frozenset({"loss"})

    def measures(self, state: ProbeState) -> Iterate:
        return "before" if state.loss is not None else "after"

    def evaluates(self, state: ProbeState) -> bool:
        return state.loss is None

    def compute(self, state: ProbeState) -> dict[str, float | Tensor]:
        if state.loss is not None:
            return {"loss": state.loss}  # a scalar tensor: the tracker reads it without a sync
        with torch.no_grad():
            return {"loss": state.problem.loss().item()}


def _labels(outputs: Tensor, targets: Tensor) -> Tensor | None:
    """Class indices of ``targets`` (indices, or the argmax of one-hot rows), or ``None``."""
    if outputs.ndim != 2 or outputs.shape[1] < 2:
        return None
    if targets.ndim == 1 and not targets.is_floating_point():
        return targets.to(outputs.device)
    if targets.shape == outputs.shape:
        return targets.argmax(dim=1).to(outputs.device)
    return None


def _accuracy(outputs: Tensor, labels: Tensor) -> float | Tensor:
    """Fraction of argmax predictions equal to ``labels``: ``count/n`` in float64 (on the CPU a
    float from the count; elsewhere a float64 scalar tensor, read with the step's values)."""
    hits = outputs.argmax(dim=1) == labels
    if hits.device.type == "cpu":
        return int(torch.count_nonzero(hits)) / hits.numel()
    return hits.mean(dtype=torch.float64)


class AccuracyProbe(Probe):
    """``accuracy``: argmax accuracy of the step's outputs, else of the current parameters.

    Targets may be class indices or one-hot rows (MSE on one-hot labels); regression targets
    give no value. With an adapter, logits and labels are compared as the loss compares them
    (causal shift, one row per token); labels equal to ``ignore_index`` do not count.
    """

    name = "accuracy"
    needs = frozenset({"outputs", "targets"})

    def __init__(self, schedule: Schedule | int | None = None) -> None:
        super().__init__(schedule)
        # the labels of the last targets seen, reused while the loop passes the same unchanged
        # tensor (full batch): (targets, its version counter, its shape, labels)
        self._last: tuple[Tensor, int, tuple[int, ...], Tensor | None] | None = None

    def measures(self, state: ProbeState) -> Iterate:
        return "before" if state.outputs is not None and state.targets is not None else "after"

    def evaluates(self, state: ProbeState) -> bool:
        return state.outputs is None or state.targets is None

    def _labels(self, outs: Tensor, ys: Tensor) -> Tensor | None:
        last = self._last
        if (
            last is not None
            and last[0] is ys
            and last[1] == ys._version
            and last[2] == tuple(outs.shape)
        ):
            return last[3]
        labels = _labels(outs, ys)
        self._last = (ys, ys._version, tuple(outs.shape), labels)
        return labels

    def compute(self, state: ProbeState) -> dict[str, float | Tensor]:
        if state.outputs is not None and state.targets is not None:
            outs, ys = class_view(state.problem, state.outputs, state.targets)
        else:
            outs, ys = current_outputs(state.problem)
        if not outs.shape[0]:
            return {}
        labels = self._labels(outs, ys)
        return {} if labels is None else {"accuracy": _accuracy(outs, labels)}


class GradNormProbe(Probe):
    """``grad_norm`` = ‖∇L‖: from the ``.grad`` the step left (before), else recomputed (after)."""

    name = "grad_norm"
    needs = frozenset({"grad"})

    def __init__(self, schedule: Schedule | int | None = None) -> None:
        super().__init__(schedule)
        self._params = LiveParams()

    def _grads(self, state: ProbeState) -> list[Tensor] | None:
        cached = state.cache.get("grad_norm/grads", False)
        if cached is not False:
            return cached  # type: ignore[no-any-return]
        grads: list[Tensor] | None = None
        if state.loss is not None:
            grads = [p.grad for p in self._params(state.problem)]  # type: ignore[misc]
            if any(g is None for g in grads):
                grads = None
        state.cache["grad_norm/grads"] = grads
        return grads

    def measures(self, state: ProbeState) -> Iterate:
        return "before" if self._grads(state) is not None else "after"

    def evaluates(self, state: ProbeState) -> bool:
        return self._grads(state) is None

    def compute(self, state: ProbeState) -> dict[str, float | Tensor]:
        grads = self._grads(state)
        if grads is not None:
            return {"grad_norm": _total_norm(grads)}
        return {"grad_norm": torch.linalg.vector_norm(state.problem.gradient()).item()}


def _total_norm(tensors: list[Tensor]) -> Tensor:
    """``‖(t_1, …, t_k)‖₂`` as a scalar tensor: one fused ``_foreach_norm``, or, where the
    tensors do not share a device and dtype (or are sparse), :func:`torch.nn.utils.get_total_norm`.
    """
    try:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors)))
    except (RuntimeError, NotImplementedError):
        return torch.nn.utils.get_total_norm(tensors)


class LiveParams:
    """A problem's parameter tensors in ``names`` order, looked up once and then re-checked by
    identity at each call (a dict look-up per parameter instead of walking the modules), so a
    parameter replaced by a new tensor is found again."""

    def __init__(self) -> None:
        self._prob: Problem | None = None
        self._slots: list[tuple[dict[str, Any], str, Tensor]] = []
        self._params: list[Tensor] = []

    def __call__(self, prob: Problem) -> list[Tensor]:
        if self._prob is prob and all(d.get(k) is p for d, k, p in self._slots):
            return self._params
        named = dict(prob.model.named_parameters())
        self._params = [named[n] for n in prob.names]
        slots = []
        for n, p in zip(prob.names, self._params, strict=True):
            prefix, _, leaf = n.rpartition(".")
            owner = prob.model.get_submodule(prefix) if prefix else prob.model
            slots.append((owner._parameters, leaf, p))
        self._slots, self._prob = slots, prob
        return self._params


def _layer(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


class DistanceProbe(Probe):
    """``dist_init`` = ‖θ − θ₀‖ and ``dist_init_rel`` = ‖θ − θ₀‖/‖θ₀‖, in total and per layer.

    Per-layer names are ``dist_init/<module>`` and ``dist_init_rel/<module>`` (the module that
    owns the parameters, e.g. ``0`` for ``0.weight`` and ``0.bias``). Computed in float64 with
    fused per-parameter norms (``θ − θ₀`` per tensor, ``‖·‖`` per tensor, squares summed per
    layer): two fused operations and one host read per call.
    """

    name = "dist_init"
    iterate: Iterate = "after"

    def __init__(self, schedule: Schedule | int | None = None, per_layer: bool = True) -> None:
        super().__init__(schedule)
        self.per_layer = per_layer
        self._params = LiveParams()
        self._init: _DistInit | None = None
        self._direct: tuple[list[Tensor] | None, bool] = (None, False)

    def evaluates(self, state: ProbeState) -> bool:
        return False  # reads the parameters only

    def _setup(self, state: ProbeState) -> _DistInit:
        """θ₀ (float64, flat and per parameter), a float64 buffer for θ − θ₀ with views shaped
        like the parameters, each parameter's layer index, layer names and ‖θ₀‖² per layer
        (cached)."""
        key = id(state.initial_params)
        if self._init is None or self._init.key != key:
            prob = state.problem
            layers = list(dict.fromkeys(_layer(n) for n in prob.names))
            theta0 = [state.initial_params[n].detach().double() for n in prob.names]
            flat0 = (
                torch.cat([t.reshape(-1) for t in theta0])
                if theta0
                else torch.zeros(0, dtype=torch.float64)
            )
            buf = torch.empty_like(flat0)
            pieces = list(buf.split([t.numel() for t in theta0])) if theta0 else []
            shaped = [v.view(t.shape) for v, t in zip(pieces, theta0, strict=True)]
            where = [layers.index(_layer(n)) for n in prob.names]
            base = [0.0] * len(layers)
            for j, t in zip(where, theta0, strict=True):
                base[j] += float(torch.dot(t.reshape(-1), t.reshape(-1)))
            keys = [(f"dist_init/{layer}", f"dist_init_rel/{layer}") for layer in layers]
            self._init = _DistInit(
                key, theta0, flat0, buf, pieces, shaped, where, layers, base, keys
            )
            self._direct = (None, False)
        return self._init

    def _diff_norms(self, state: ProbeState, init: _DistInit) -> list[Tensor]:
        """``‖θ_i − θ₀_i‖`` per parameter in float64. When the live parameters are in the
        problem's dtype, on θ₀'s device and of θ₀'s shapes: copied (exactly) into the float64
        buffer, ``θ₀`` subtracted in place, norms fused (no allocation); else converted as
        :attr:`Problem.params` converts them."""
        prob = state.problem
        ps = self._params(prob)
        if ps is not self._direct[0]:
            direct = all(
                p.dtype == prob.dtype and p.device == t.device and p.shape == t.shape
                for p, t in zip(ps, init.theta0, strict=True)
            )
            self._direct = (ps, direct)
        with torch.no_grad():
            if self._direct[1]:
                torch._foreach_copy_(init.shaped, ps)
                init.buf.sub_(init.flat0)
                return list(torch._foreach_norm(init.pieces))
            cur = [p.detach().to(prob.device, prob.dtype).double() for p in ps]
            return list(torch._foreach_norm(torch._foreach_sub(cur, init.theta0)))

    def compute(self, state: ProbeState) -> dict[str, float | Tensor]:
        init = self._setup(state)
        layers, base = init.layers, init.base
        if not init.theta0:
            return {"dist_init": 0.0, "dist_init_rel": 0.0}
        diff = [0.0] * len(layers)
        norms = torch.stack(self._diff_norms(state, init)).tolist()  # one host read
        for j, v in zip(init.where, norms, strict=True):
            diff[j] += v * v
        tot, tot0 = math.fsum(diff), math.fsum(base)
        out: dict[str, float | Tensor] = {
            "dist_init": math.sqrt(tot),
            "dist_init_rel": _ratio(tot, tot0),
        }
        if self.per_layer and len(layers) > 1:
            for (key, key_rel), d, b in zip(init.keys, diff, base, strict=True):
                out[key] = math.sqrt(d)
                out[key_rel] = _ratio(d, b)
        return out


class _DistInit(NamedTuple):
    key: int
    theta0: list[Tensor]
    flat0: Tensor
    buf: Tensor
    pieces: list[Tensor]
    shaped: list[Tensor]
    where: list[int]
    layers: list[str]
    base: list[float]
    keys: list[tuple[str, str]]  # per layer: its dist_init/… and dist_init_rel/… names


def _ratio(sq: float, sq0: float) -> float:
    return math.sqrt(sq / sq0) if sq0 > 0 else math.inf if sq > 0 else 0.0


class ThresholdProbe(Probe):
    """``lr`` and the optimizer's stability threshold, each comparable with its own sharpness.

    ``threshold`` is on ``λ_max(∇²L)`` (:class:`SharpnessProbe`): GD ``2/η``, heavy ball,
    Nesterov, PyTorch ``SGD`` with momentum, dampening, nesterov and weight decay.
    ``preconditioned_threshold`` is on ``λ_max(P^{-1/2} H P^{-1/2})``
    (:class:`PreconditionedSharpnessProbe`): Adam/AdamW ``(2+2β₁)/((1−β₁)η)``, RMSprop ``2/η``
    (``2(1+μ)/η`` with momentum), Adagrad ``2/η_t``. Both come from the optimizer adapters
    (:mod:`gdscope.theory.optim`); an optimizer without one gives only ``lr``.

    Cheap: reads the current param groups, so a learning-rate schedule moves the line every step.
    An infinite threshold (``lr = 0``: no step, nothing can be unstable) is not stored.
    """

    name = "threshold"
    needs = frozenset({"optimizer"})

    def __init__(self, schedule: Schedule | int | None = None) -> None:
        super().__init__(schedule)
        self._last: tuple[Any, dict[str, float]] | None = None

    def evaluates(self, state: ProbeState) -> bool:
        return False  # reads the optimizer's settings (and, for Adagrad, its state) only

    def compute(self, state: ProbeState) -> dict[str, float]:
        opt = state.optimizer
        if opt is None:
            return {}
        key = _settings_key(opt)
        if key is not None and self._last is not None and self._last[0] == key:
            return dict(self._last[1])
        out = {"lr": float(opt.param_groups[0]["lr"])}
        st = read_optimizer(opt)
        if st.threshold is not None and math.isfinite(st.threshold):
            name = "preconditioned_threshold" if st.preconditioned else "threshold"
            out[name] = float(st.threshold)
        self._last = None if key is None else (key, dict(out))
        return out


_STATEFUL = (torch.optim.Adagrad,)  # thresholds that read the optimizer's state (η_t)


def _settings_key(opt: torch.optim.Optimizer) -> tuple[Any, ...] | None:
    """The optimizer's identity, type and hyperparameters (every group, ``params`` left out),
    when its threshold depends on nothing else; ``None``: read it every time (a stateful
    optimizer, a tensor or unhashable setting)."""
    if isinstance(opt, _STATEFUL):
        return None
    items: list[Any] = [id(opt), type(opt)]
    for g in opt.param_groups:
        for k, v in g.items():
            if k == "params":
                continue
            if isinstance(v, Tensor):
                return None
            items.append((k, v))
    key = tuple(items)
    try:
        hash(key)
    except TypeError:
        return None
    return key


class _WarmTopEig(Probe):
    """Top eigenpair of a symmetric operator by Lanczos, warm-started step to step.

    The first call (and any call after an unconverged one) may spend ``max_matvecs`` products;
    once a previous call converged, the next starts from its eigenvector with the budget
    ``warm_matvecs`` (``None``: ``max_matvecs``). On a slowly changing model a warm call costs
    the Krylov minimum of 3 products (:data:`gdscope.linalg.lanczos.MIN_EXTRA` + 1) or a few
    more. A call that did not converge within its budget is stored with
    ``<name>_converged = 0`` (its value is then a Ritz value, a lower bound on ``λ_max``) and
    the next call gets the full budget again.
    """

    iterate: Iterate = "after"

    def __init__(
        self,
        schedule: Schedule | int | None = None,
        tol: float = 1e-3,
        max_matvecs: int = 200,
        warm_matvecs: int | None = 8,
    ) -> None:
        super().__init__(schedule)
        self.tol, self.max_matvecs, self.warm_matvecs = tol, max_matvecs, warm_matvecs
        self._v: Tensor | None = None
        self._warm = False
        self._checked: int | None = None

    def _operator(self, prob: Problem) -> CallableOperator:
        check = self._checked != id(prob)  # Problem.check (determinism) once per problem
        self._checked = id(prob)
        return curvature_operator(prob, "hessian", check=check)

    def _solve(self, op: CallableOperator) -> dict[str, float]:
        v0 = self._v if self._v is not None and self._v.shape[0] == op.shape[0] else None
        budget = self.max_matvecs
        if self._warm and v0 is not None and self.warm_matvecs is not None:
            budget = self.warm_matvecs
        res = lanczos(op, 1, "largest", self.tol, v0=v0, return_vectors=True, max_matvecs=budget)
        assert res.vectors is not None
        self._v = res.vectors[:, 0]
        self._warm = bool(res.converged)
        n = self.name
        return {
            n: res.values[0].item(),
            f"{n}_residual": res.residuals[0].item(),
            f"{n}_converged": float(res.converged),
            f"{n}_matvecs": float(res.matvecs),
        }


class SharpnessProbe(_WarmTopEig):
    """``sharpness`` = λ_max(∇²L) by Lanczos, warm-started from the previous eigenvector.

    Also ``sharpness_residual`` (‖Hv − λv‖), ``sharpness_converged`` (0/1) and
    ``sharpness_matvecs`` (Hessian-vector products of this call). Evaluated on the tracker's
    fixed subset (``Tracker(subset=...)``) at the current parameters. Budgets: see
    ``warm_matvecs`` below; an unconverged value is flagged by ``sharpness_converged = 0``.

    Args:
        schedule: when to run.
        tol: relative residual ``‖Hv − λv‖ ≤ tol·‖H‖``.
        max_matvecs: budget of a cold call (the first, or after an unconverged one).
        warm_matvecs: budget of a call warm-started from a converged previous eigenvector.
    """

    name = "sharpness"

    def compute(self, state: ProbeState) -> dict[str, float]:
        return self._solve(self._operator(state.subset))


class PreconditionedSharpnessProbe(_WarmTopEig):
    """``preconditioned_sharpness`` = λ_max(P^{-1/2}(H + wI)P^{-1/2}) of an adaptive optimizer.

    ``P`` is the diagonal preconditioner the optimizer applies now (Adam/AdamW ``(1−β₁ᵗ)(√v̂ +
    ε)``, RMSprop ``√v + ε``, Adagrad ``√Σg² + ε``; :mod:`gdscope.theory.optim`), read from its
    state at every call; ``w`` a coupled L2 weight decay; ``H`` the Hessian on the tracker's
    subset. Lanczos on ``v ↦ P^{-1/2} H P^{-1/2} v`` (one Hessian-vector product each),
    warm-started like :class:`SharpnessProbe`. Compare with the threshold probe's
    ``preconditioned_threshold`` (38/η for Adam at β₁ = 0.9: Cohen et al. 2022). Gives nothing
    for the SGD family (use :class:`SharpnessProbe`), before the optimizer's first step, or while
    its learning rate is 0 (the end of a schedule: ``P`` is infinite, nothing is measured).
    Also ``_residual``, ``_converged`` and ``_matvecs`` as for :class:`SharpnessProbe`.
    """

    name = "preconditioned_sharpness"
    needs = frozenset({"optimizer"})

    def compute(self, state: ProbeState) -> dict[str, float]:
        if state.optimizer is None:
            return {}
        prob = state.subset
        named = dict(prob.model.named_parameters())
        st = read_optimizer(state.optimizer, [named[n] for n in prob.names], prob.names)
        if not st.preconditioned or st.precond is None:
            return {}
        if not st.lr > 0:  # lr = 0 (end of a schedule): P = ∞, nothing to measure
            return {}
        op = self._operator(prob)
        d_isq = st.precond.to(prob.device, prob.dtype).rsqrt()
        wd = st.weight_decay

        def mv(v: Tensor) -> Tensor:
            u = d_isq * v
            hu = op.matvec(u)
            return d_isq * (hu + wd * u if wd else hu)

        return self._solve(CallableOperator(mv, prob.num_params, prob.dtype, prob.device))


class HessianTraceProbe(Probe):
    """``hessian_trace`` by Hutch++ and its standard error ``hessian_trace_se`` (on the subset)."""

    name = "hessian_trace"
    iterate: Iterate = "after"

    def __init__(self, schedule: Schedule | int | None = None, samples: int = 30) -> None:
        super().__init__(schedule)
        self.samples = samples

    def compute(self, state: ProbeState) -> dict[str, float]:
        est = hessian_trace(state.subset, self.samples, seed=state.step)
        return {"hessian_trace": est.value, "hessian_trace_se": est.stderr}


def default_probes(curvature_every: int = 100) -> list[Probe]:
    """Cheap probes every step; sharpness (plain and, for adaptive optimizers, preconditioned)
    and trace every ``curvature_every`` steps."""
    return [
        LossProbe(),
        AccuracyProbe(),
        GradNormProbe(),
        DistanceProbe(),
        ThresholdProbe(),
        SharpnessProbe(curvature_every),
        PreconditionedSharpnessProbe(curvature_every),
        HessianTraceProbe(curvature_every),
    ]
