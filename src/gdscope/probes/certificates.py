"""Certificate probes (THEORY §1, §4): the quantities global-convergence proofs assume, measured.

Every probe here evaluates the parameters the model holds when the tracker calls it, i.e. the
iterate *after* the step's update (``iterate="after"``), except :class:`DataSeparationProbe`,
which does not depend on the parameters. Losses and gradients are of the full empirical risk
``L`` of the tracker's problem (not a mini-batch), computed once per step and shared between
probes through ``ProbeState.cache``.

* :class:`LocalSmoothnessProbe` ``local_smoothness = ‖∇L(θ_b) − ∇L(θ_a)‖ / ‖θ_b − θ_a‖``.
* :class:`SemiSmoothnessProbe` ``semi_smooth_residual = L(θ_a + Δ) − L(θ_a) − ⟨∇L(θ_a), Δ⟩``
  with ``step_norm = ‖Δ‖``, ``step_norm_sq = ‖Δ‖²`` and ``semi_smooth_ratio`` = residual/‖Δ‖²
  (``≈ ½ Δᵀ∇²L Δ/‖Δ‖²`` for small steps, at most ``S/2`` under ``S``-smoothness).

  For both, ``θ_b`` is the current iterate and ``θ_a`` the one at the probe's previous call (``θ₀``
  from ``start`` for the first): with ``Every(1)`` that is the step just taken, ``Δ = θ_{t+1} −
  θ_t``; with a sparser schedule it is the secant over the steps in between. The residual is a
  difference of losses: in float32 it is dominated by round-off (``~1e-7·L``), so measure it on
  a float64 problem.
* :class:`GradRatioProbe` ``grad_ratio/<module> = ‖∇_{θ_l} L‖² / L`` for each module ``l`` that
  owns parameters (weight and bias together, named as in ``dist_init/<module>``) and the total
  ``grad_ratio = ‖∇L‖²/L`` (the gradient lower bound of Allen-Zhu, Li & Song is of this form).
* :class:`ReluPatternProbe` ``relu_pattern_change``: fraction of ReLU units, over a fixed
  sample, whose on/off state (output ``> 0``) differs from ``θ₀``'s; per module too.
* :class:`DataSeparationProbe` ``data_separation = min_{i≠j} ‖x̂_i − x̂_j‖``, ``x̂ = x/‖x‖``
  (:func:`data_separation`).
* :class:`MarginProbe` ``param_norm = ‖θ‖`` and, for classification, ``margin =
  min_i (f_{y_i}(x_i) − max_{j≠y_i} f_j(x_i))`` and ``normalized_margin = margin / ‖θ‖^D``.
* :class:`BlockJacobianProbe` singular values of ``∂ logits / ∂ (block output)`` per sample
  (:func:`block_jacobian`), pooled: ``block_sv_{min,q10,q50,q90,max}/<module>``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap
from torch.utils._pytree import tree_map

from gdscope.errors import InvalidArgumentError, ShapeMismatchError
from gdscope.probes.base import Iterate, Probe, ProbeState, Schedule, current_outputs
from gdscope.problem import Params, Problem, _batch_size, _take

__all__ = [
    "BlockJacobianProbe",
    "DataSeparationProbe",
    "GradRatioProbe",
    "LocalSmoothnessProbe",
    "MarginProbe",
    "ReluPatternProbe",
    "SemiSmoothnessProbe",
    "block_jacobian",
    "data_separation",
    "homogeneity_degree",
]

logger = logging.getLogger(__name__)

_CACHE_KEY = "certificates/loss_grad"


# ---------------------------------------------------------------------- shared evaluation
class _Point:
    """``θ`` (flat), ``L(θ)`` and ``∇L(θ)`` (flat), all float64 copies."""

    __slots__ = ("grad", "loss", "theta")

    def __init__(self, theta: Tensor, loss: float, grad: Tensor) -> None:
        self.theta, self.loss, self.grad = theta, loss, grad


def _evaluate(prob: Problem) -> _Point:
    params = prob.params
    grads, loss = torch.func.grad_and_value(prob.loss)(params)
    return _Point(
        prob.flatten(params).detach().double().clone(),
        float(loss),
        prob.flatten(grads).detach().double(),
    )


def _current(state: ProbeState) -> _Point:
    """The current point of the full problem, once per step (shared via ``state.cache``)."""
    if _CACHE_KEY not in state.cache:
        state.cache[_CACHE_KEY] = _evaluate(state.problem)
    return state.cache[_CACHE_KEY]


def _layer(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


# ---------------------------------------------------------------------- smoothness
class _PreviousPointProbe(Probe):
    """Keeps ``(θ, L, ∇L)`` of its previous call (``θ₀`` from ``start``)."""

    iterate: Iterate = "after"

    def __init__(self, schedule: Schedule | int | None = None) -> None:
        super().__init__(schedule)
        self._prev: _Point | None = None

    def start(self, problem: Problem) -> None:
        self._prev = _evaluate(problem)

    def _advance(self, state: ProbeState) -> tuple[_Point | None, _Point]:
        prev, cur = self._prev, _current(state)
        self._prev = cur
        return prev, cur


class LocalSmoothnessProbe(_PreviousPointProbe):
    """``local_smoothness = ‖∇L(θ_b) − ∇L(θ_a)‖/‖θ_b − θ_a‖`` along the steps (THEORY §4).

    ``θ_b`` is the current iterate and ``θ_a`` the one at the previous call (see the module
    docstring); nothing is reported when the two coincide or on the first call without
    ``start``. One full gradient per call, shared with the other certificate probes.
    """

    name = "local_smoothness"

    def compute(self, state: ProbeState) -> dict[str, float]:
        prev, cur = self._advance(state)
        if prev is None:
            return {}
        step = torch.linalg.vector_norm(cur.theta - prev.theta).item()
        if step == 0:
            return {}
        diff = torch.linalg.vector_norm(cur.grad - prev.grad).item()
        return {"local_smoothness": diff / step}


class SemiSmoothnessProbe(_PreviousPointProbe):
    """``semi_smooth_residual = L(θ+Δ) − L(θ) − ⟨∇L(θ), Δ⟩`` with ``Δ`` the step just taken.

    Also ``step_norm = ‖Δ‖``, ``step_norm_sq = ‖Δ‖²`` and ``semi_smooth_ratio`` =
    residual/‖Δ‖² (omitted when ``Δ = 0``). ``θ`` is the iterate at the previous call (see the
    module docstring). Measure on a float64 problem: the residual is a difference of losses.
    """

    name = "semi_smooth"

    def compute(self, state: ProbeState) -> dict[str, float]:
        prev, cur = self._advance(state)
        if prev is None:
            return {}
        delta = cur.theta - prev.theta
        sq = float(delta @ delta)
        resid = cur.loss - prev.loss - float(prev.grad @ delta)
        out = {"semi_smooth_residual": resid, "step_norm": math.sqrt(sq), "step_norm_sq": sq}
        if sq > 0:
            out["semi_smooth_ratio"] = resid / sq
        return out


# ---------------------------------------------------------------------- gradient ratio
class GradRatioProbe(Probe):
    """``grad_ratio = ‖∇L‖²/L`` and ``grad_ratio/<module> = ‖∇_{θ_l}L‖²/L`` per module.

    A module's parameters (e.g. ``0.weight`` and ``0.bias``) are grouped under its name
    (``0``). ``L`` is the full loss at the current iterate; ``L = 0`` gives ``inf`` (or ``0``
    with a zero gradient).
    """

    name = "grad_ratio"
    iterate: Iterate = "after"

    def __init__(self, schedule: Schedule | int | None = None, per_layer: bool = True) -> None:
        super().__init__(schedule)
        self.per_layer = per_layer

    def compute(self, state: ProbeState) -> dict[str, float]:
        cur = _current(state)
        prob = state.problem
        sq = cur.grad.pow(2)
        out = {"grad_ratio": _div(float(sq.sum()), cur.loss)}
        if self.per_layer:
            sums: dict[str, float] = {}
            i = 0
            for name, p in zip(prob.names, prob.params.values(), strict=True):
                m = p.numel()
                layer = _layer(name)
                sums[layer] = sums.get(layer, 0.0) + float(sq[i : i + m].sum())
                i += m
            for layer, s in sums.items():
                out[f"grad_ratio/{layer}"] = _div(s, cur.loss)
        return out


def _div(a: float, b: float) -> float:
    if b > 0:
        return a / b
    return math.inf if a > 0 else 0.0


# ---------------------------------------------------------------------- fixed samples
def _fixed_inputs(prob: Problem, samples: int, seed: int) -> Any:
    """``samples`` inputs of ``prob``: a seeded random subset of tensor data, else the first
    ones a pass over the loader yields (kept, so the sample never changes). Dict inputs (an
    adapter's) stay dicts of tensors, sliced along the batch dimension."""
    full = prob.full_batch
    if full is not None:
        X = full[0]
        n = _batch_size(X)
        if n <= samples:
            return X
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:samples]
        return _take(X, idx.to(prob.device))
    parts, have = [], 0
    for x, _, _ in prob.batches():
        parts.append(_take(x, slice(0, samples - have)))
        have += _batch_size(parts[-1])
        if have >= samples:
            break
    return _cat_inputs(parts)


def _cat_inputs(parts: list[Any]) -> Any:
    """Batches of inputs joined along the batch dimension (tensors, or dicts of tensors)."""
    if isinstance(parts[0], Mapping):
        return {
            k: torch.cat([p[k] for p in parts]) if isinstance(v, Tensor) and v.ndim else v
            for k, v in parts[0].items()
        }
    return torch.cat(parts)


def _to_problem(prob: Problem, x: Any) -> Any:
    """Inputs on the problem's device, floating ones in its dtype (each tensor of a dict)."""
    if isinstance(x, Mapping):
        return {k: _to_problem(prob, v) for k, v in x.items()}
    x = x.to(prob.device)
    return x.to(prob.dtype) if x.is_floating_point() else x


def _check_samples(samples: int) -> int:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InvalidArgumentError(f"samples={samples!r} must be a positive integer.")
    return samples


# ---------------------------------------------------------------------- ReLU patterns
_RELU_TYPES = (nn.ReLU, nn.LeakyReLU)


def _relu_patterns(prob: Problem, modules: dict[str, nn.Module], x: Any) -> dict[str, Tensor]:
    """On/off state (output > 0) of every unit of every call of each module, flattened."""
    rec: dict[str, list[Tensor]] = {n: [] for n in modules}

    def hook(name: str):
        def fn(_m: nn.Module, _inp: Any, out: Tensor) -> None:
            rec[name].append((out.detach() > 0).reshape(-1))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            prob.forward(prob.params, x)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n, r in rec.items() if not r]
    if missing:
        raise InvalidArgumentError(
            f"modules {missing} were not called in the model's forward: pass modules= with "
            "the activation modules the forward actually uses."
        )
    return {n: torch.cat(r) for n, r in rec.items()}


class ReluPatternProbe(Probe):
    """``relu_pattern_change``: fraction of ReLU on/off states changed since ``θ₀``.

    Hooks ``modules`` (default: every ``nn.ReLU`` and ``nn.LeakyReLU`` of the model; ``F.relu``
    calls inside a ``forward`` cannot be hooked) and records, on a fixed sample of ``samples``
    inputs, whether each unit's output is positive. A module called several times (a shared
    ``self.relu``) contributes every call. Reported in total and, with several modules, per
    module as ``relu_pattern_change/<module>``. The reference patterns are taken in ``start``
    (at ``θ₀``), or at the first call when the probe was not started.
    """

    name = "relu_pattern_change"
    iterate: Iterate = "after"

    def __init__(
        self,
        schedule: Schedule | int | None = None,
        samples: int = 256,
        seed: int = 0,
        modules: Sequence[str] | None = None,
    ) -> None:
        super().__init__(schedule)
        self.samples, self.seed = _check_samples(samples), seed
        self.module_names = None if modules is None else list(modules)
        self._x: Any = None
        self._modules: dict[str, nn.Module] = {}
        self._ref: dict[str, Tensor] | None = None

    def _setup(self, prob: Problem) -> None:
        named = dict(prob.model.named_modules())
        if self.module_names is None:
            mods = {n: m for n, m in named.items() if isinstance(m, _RELU_TYPES)}
            if not mods:
                raise InvalidArgumentError(
                    "the model has no nn.ReLU or nn.LeakyReLU modules (F.relu calls cannot be "
                    "hooked): use nn.ReLU modules, or pass modules= naming the activations."
                )
        else:
            unknown = [n for n in self.module_names if n not in named]
            if unknown:
                raise InvalidArgumentError(
                    f"modules {unknown} are not in the model; it has {list(named)[1:]}."
                )
            mods = {n: named[n] for n in self.module_names}
        self._modules = mods
        self._x = _fixed_inputs(prob, self.samples, self.seed)

    def start(self, problem: Problem) -> None:
        self._setup(problem)
        assert self._x is not None
        self._ref = _relu_patterns(problem, self._modules, self._x)

    def compute(self, state: ProbeState) -> dict[str, float]:
        if self._ref is None:
            self.start(state.problem)
        assert self._x is not None and self._ref is not None
        cur = _relu_patterns(state.problem, self._modules, self._x)
        changed = total = 0
        out: dict[str, float] = {}
        for n, ref in self._ref.items():
            c = int((cur[n] != ref).sum())
            changed, total = changed + c, total + ref.numel()
            if len(self._ref) > 1:
                out[f"relu_pattern_change/{n}"] = c / ref.numel()
        out["relu_pattern_change"] = changed / total
        return out


# ---------------------------------------------------------------------- data separation
def data_separation(x: Tensor, chunk: int = 1024) -> tuple[float, int]:
    """``(δ, zeros)``: ``δ = min_{i≠j} ‖x̂_i − x̂_j‖`` with ``x̂ = x/‖x‖`` per sample (flattened).

    Zero inputs have no direction: they are left out and counted in ``zeros``. Candidates come
    from ``2 − 2 x̂_i·x̂_j`` (one matrix product per chunk of rows); each row's nearest
    neighbour is then recomputed as an explicit difference in float64, so ``δ`` is exact for
    that pair (a near-tie closer than ``~1e-8`` may pick the other pair). ``δ = 0`` means
    duplicate directions. Cost ``O(n² d)``; ``inf`` with fewer than two nonzero inputs.
    """
    X = x.reshape(x.shape[0], -1).double()
    norms = torch.linalg.vector_norm(X, dim=1)
    keep = norms > 0
    zeros = int((~keep).sum())
    Xh = X[keep] / norms[keep, None]
    n = Xh.shape[0]
    if n < 2:
        return math.inf, zeros
    best = math.inf
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        d2 = (2 - 2 * Xh[s:e] @ Xh.T).clamp_min(0)
        d2[torch.arange(e - s), torch.arange(s, e)] = math.inf
        j = d2.argmin(dim=1)
        exact = torch.linalg.vector_norm(Xh[s:e] - Xh[j], dim=1)
        best = min(best, float(exact.min()))
    return best, zeros


class DataSeparationProbe(Probe):
    """``data_separation`` δ of the normalized training inputs (:func:`data_separation`).

    Computed once in ``start`` (on all inputs, or a seeded random ``max_samples`` of them:
    ``data_separation_samples`` says how many) and reported on the first scheduled call only,
    with ``data_zero_inputs`` (inputs left out for having norm 0). Independent of ``θ``.
    """

    name = "data_separation"
    iterate: Iterate = "before"

    def __init__(
        self, schedule: Schedule | int | None = None, max_samples: int = 10_000, seed: int = 0
    ) -> None:
        super().__init__(schedule)
        self.max_samples, self.seed = _check_samples(max_samples), seed
        self._values: dict[str, float] | None = None
        self._reported = False

    def start(self, problem: Problem) -> None:
        x = _fixed_inputs(problem, self.max_samples, self.seed)
        if isinstance(x, Mapping):
            raise InvalidArgumentError(
                f"data_separation needs tensor inputs (points in R^d); the problem's inputs are "
                f"dict batches with keys {sorted(map(str, x))} (token ids have no distance "
                "between directions): drop DataSeparationProbe for this problem."
            )
        delta, zeros = data_separation(x)
        self._values = {
            "data_separation": delta,
            "data_separation_samples": float(x.shape[0]),
            "data_zero_inputs": float(zeros),
        }
        self._reported = False

    def compute(self, state: ProbeState) -> dict[str, float]:
        if self._values is None:
            self.start(state.problem)
        if self._reported:
            return {}
        self._reported = True
        assert self._values is not None
        return dict(self._values)


# ---------------------------------------------------------------------- margin
_LAYER_TYPES = (nn.Linear, nn.modules.conv._ConvNd)


def homogeneity_degree(model: nn.Module) -> int:
    """Number of ``Linear``/``Conv`` layers with a trainable weight: the degree ``D`` of a
    bias-free, positively homogeneous network (ReLU, max-pool, no normalization) in ``θ``."""
    count = 0
    for m in model.modules():
        weight = getattr(m, "weight", None)
        if isinstance(m, _LAYER_TYPES) and weight is not None and weight.requires_grad:
            count += 1
    return count


def _labels(targets: Tensor, k: int) -> Tensor | None:
    """Class indices, from index targets or exact one-hot rows; ``None`` for anything else."""
    if targets.ndim == 1 and not targets.is_floating_point():
        return targets.long()
    if targets.ndim == 2 and targets.shape[1] == k and k > 1:
        binary = bool(((targets == 0) | (targets == 1)).all())
        if binary and bool((targets.sum(dim=1) == 1).all()):
            return targets.argmax(dim=1)
    return None


class MarginProbe(Probe):
    """``param_norm = ‖θ‖``; for classification ``margin`` and ``normalized_margin``.

    ``margin = min_i (f_{y_i}(x_i) − max_{j≠y_i} f_j(x_i))`` over the full training set
    (negative while a sample is misclassified) and ``normalized_margin = margin/‖θ‖^D``
    (THEORY §4). ``D`` is ``depth`` when given, else :func:`homogeneity_degree` (the count of
    Linear/Conv layers). The normalization is meaningful only for bias-free positively
    homogeneous networks of degree ``D`` (``f(cθ) = c^D f(θ)``): ``start`` logs a warning when
    trainable parameters other than Linear/Conv weights exist. Labels are class indices or
    exact one-hot rows; other targets (regression) give ``param_norm`` only.
    """

    name = "margin"
    iterate: Iterate = "after"

    def __init__(self, schedule: Schedule | int | None = None, depth: int | None = None) -> None:
        super().__init__(schedule)
        bad = isinstance(depth, bool) or not isinstance(depth, int) or depth < 1
        if depth is not None and bad:
            raise InvalidArgumentError(f"depth={depth!r} must be a positive integer or None.")
        self.depth = depth
        self.degree: int | None = depth

    def start(self, problem: Problem) -> None:
        model = problem.model
        if self.depth is None:
            self.degree = homogeneity_degree(model)
            if self.degree == 0:
                raise InvalidArgumentError(
                    "the model has no Linear/Conv layers to count: pass depth= (the degree D "
                    "of homogeneity)."
                )
        weights = {
            f"{n}.weight" if n else "weight"
            for n, m in model.named_modules()
            if isinstance(m, _LAYER_TYPES)
        }
        other = [n for n in problem.names if n not in weights]
        if other:
            logger.warning(
                "MarginProbe: parameters %s are not Linear/Conv weights, so the network is "
                "not a bias-free homogeneous one: normalized_margin = margin/‖θ‖^%d is not "
                "the quantity of the theory.",
                other,
                self.degree,
            )

    def compute(self, state: ProbeState) -> dict[str, float]:
        if self.degree is None:
            self.start(state.problem)
        assert self.degree is not None
        prob = state.problem
        theta = prob.flatten(prob.params).double()
        norm = torch.linalg.vector_norm(theta).item()
        out = {"param_norm": norm}
        outs, ys = current_outputs(prob)
        outs = outs.double()
        labels = _labels(ys.to(outs.device), outs.shape[1])
        if labels is None or outs.shape[1] < 2 or outs.shape[0] == 0:
            return out
        correct = outs.gather(1, labels[:, None]).squeeze(1)
        others = outs.scatter(1, labels[:, None], -math.inf).max(dim=1).values
        margin = float((correct - others).min())
        out["margin"] = margin
        out["normalized_margin"] = margin / norm**self.degree if norm > 0 else math.nan
        return out


# ---------------------------------------------------------------------- block Jacobian
def block_jacobian(prob: Problem, module_name: str, x: Any, params: Params | None = None) -> Tensor:
    """Per-sample Jacobian of the outputs with respect to a block's output: ``(n, k, m)``.

    ``J_i = ∂ f(x_i) / ∂ z_i`` where ``z_i`` is the output of module ``module_name`` on sample
    ``x_i`` (``m`` its numel per sample) and ``f`` the model's flattened output (``k``). Each
    sample runs alone (a batch of one) with a forward hook that substitutes ``z_i`` for the
    module's output, differentiated by ``torch.func.vmap(jacrev)``. The module must return one
    tensor and be called exactly once per forward; samples must not interact (eval-mode
    normalization).
    """
    named = dict(prob.model.named_modules())
    if module_name not in named or module_name == "":
        raise InvalidArgumentError(
            f"module {module_name!r} is not a submodule of the model; it has "
            f"{[n for n in named if n]}."
        )
    module = named[module_name]
    params = prob.params if params is None else params
    x = _to_problem(prob, x)
    captured: list[Any] = []
    handle = module.register_forward_hook(lambda _m, _i, o: captured.append(o))
    try:
        with torch.no_grad():
            prob.forward(params, x)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise InvalidArgumentError(
            f"module {module_name!r} was called {len(captured)} times in one forward: pick a "
            "module that runs exactly once (a block, not a shared activation)."
        )
    Z = captured[0]
    if not isinstance(Z, Tensor) or Z.shape[0] != _batch_size(x):
        raise ShapeMismatchError(
            f"module {module_name!r} must return one tensor with the batch dimension first; "
            f"got {type(Z).__name__}{'' if not isinstance(Z, Tensor) else tuple(Z.shape)}."
        )
    Z = Z.detach()

    def f(z: Tensor, xi: Any) -> Tensor:
        h = module.register_forward_hook(lambda _m, _i, _o: z.unsqueeze(0))
        try:
            one = tree_map(lambda t: t.unsqueeze(0), xi)  # a batch of one (dicts too)
            return prob.forward(params, one).reshape(-1)
        finally:
            h.remove()

    J = vmap(jacrev(f))(Z, x).detach()
    return J.reshape(J.shape[0], J.shape[1], -1)


class BlockJacobianProbe(Probe):
    """Singular values of ``∂ logits/∂ (block output)`` per sample (THEORY §4, MacDonald et al.).

    On a fixed sample of ``samples`` inputs, :func:`block_jacobian` gives ``J_i`` (``k × m``)
    per sample; their singular values (``min(k, m)`` each, float64) are pooled and reported as
    ``block_sv_min``, ``block_sv_q10``, ``block_sv_q50`` (median), ``block_sv_q90`` and
    ``block_sv_max``, each suffixed ``/<module_name>``. The full ``(samples, min(k, m))`` set of
    every call is kept in ``history[step]`` (for a histogram per epoch) unless ``keep=False``.
    The probe's name is ``block_jacobian/<module_name>``.
    """

    iterate: Iterate = "after"

    def __init__(
        self,
        module_name: str,
        schedule: Schedule | int | None = None,
        samples: int = 32,
        seed: int = 0,
        keep: bool = True,
    ) -> None:
        super().__init__(schedule)
        if not isinstance(module_name, str) or not module_name:
            raise InvalidArgumentError(
                f"module_name={module_name!r} must name a submodule (e.g. 'layer1.0')."
            )
        self.module_name = module_name
        self.name = f"block_jacobian/{module_name}"
        self.samples, self.seed, self.keep = _check_samples(samples), seed, keep
        self._x: Any = None
        self.history: dict[int, Tensor] = {}

    def start(self, problem: Problem) -> None:
        if self.module_name not in dict(problem.model.named_modules()):
            raise InvalidArgumentError(
                f"module {self.module_name!r} is not a submodule of the model."
            )
        self._x = _fixed_inputs(problem, self.samples, self.seed)

    def singular_values(self, prob: Problem) -> Tensor:
        """``(samples, min(k, m))`` singular values at the current parameters, float64."""
        if self._x is None:
            self.start(prob)
        assert self._x is not None
        J = block_jacobian(prob, self.module_name, self._x)
        return torch.linalg.svdvals(J.double())

    def compute(self, state: ProbeState) -> dict[str, float]:
        sv = self.singular_values(state.problem)
        if self.keep:
            self.history[state.step] = sv.cpu()
        flat = sv.reshape(-1)
        q = torch.quantile(
            flat, torch.tensor([0.1, 0.5, 0.9], dtype=flat.dtype, device=flat.device)
        )
        m = self.module_name
        return {
            f"block_sv_min/{m}": flat.min().item(),
            f"block_sv_q10/{m}": q[0].item(),
            f"block_sv_q50/{m}": q[1].item(),
            f"block_sv_q90/{m}": q[2].item(),
            f"block_sv_max/{m}": flat.max().item(),
        }
