"""Built-in probes: loss, accuracy, gradient norm, distance from init, threshold, sharpness, trace.

Cheap probes reuse the training step's own loss and outputs (``iterate="before"``) and fall back
to evaluating the problem at the current parameters (``"after"``) when the loop did not pass
them. Curvature probes evaluate the current parameters on the tracker's subset.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gdscope.curvature import hessian_eigs, hessian_trace
from gdscope.probes.base import Iterate, Probe, ProbeState, Schedule
from gdscope.train.optimizers import stability_threshold

__all__ = [
    "AccuracyProbe",
    "DistanceProbe",
    "GradNormProbe",
    "HessianTraceProbe",
    "LossProbe",
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

    def compute(self, state: ProbeState) -> dict[str, float]:
        if state.loss is not None:
            return {"loss": float(state.loss)}
        with torch.no_grad():
            return {"loss": state.problem.loss().item()}


def _accuracy(outputs: Tensor, targets: Tensor) -> float | None:
    """Fraction of argmax predictions equal to the class (index or one-hot/argmax target)."""
    if outputs.ndim != 2 or outputs.shape[1] < 2:
        return None
    pred = outputs.argmax(dim=1)
    if targets.ndim == 1 and not targets.is_floating_point():
        labels = targets
    elif targets.shape == outputs.shape:
        labels = targets.argmax(dim=1)
    else:
        return None
    return (pred == labels.to(pred.device)).double().mean().item()


class AccuracyProbe(Probe):
    """``accuracy``: argmax accuracy of the step's outputs, else of the current parameters.

    Targets may be class indices or one-hot rows (MSE on one-hot labels); regression targets
    give no value.
    """

    name = "accuracy"
    needs = frozenset({"outputs", "targets"})

    def measures(self, state: ProbeState) -> Iterate:
        return "before" if state.outputs is not None and state.targets is not None else "after"

    def compute(self, state: ProbeState) -> dict[str, float]:
        if state.outputs is not None and state.targets is not None:
            acc = _accuracy(state.outputs.reshape(state.outputs.shape[0], -1), state.targets)
        else:
            outs = state.problem.outputs()
            ys = torch.cat([y for _, y, _ in state.problem.batches()])
            acc = _accuracy(outs, ys)
        return {} if acc is None else {"accuracy": acc}


class GradNormProbe(Probe):
    """``grad_norm`` = ‖∇L‖: from the ``.grad`` the step left (before), else recomputed (after)."""

    name = "grad_norm"
    needs = frozenset({"grad"})

    def _grads(self, state: ProbeState) -> list[Tensor] | None:
        named = dict(state.problem.model.named_parameters())
        grads = [named[n].grad for n in state.problem.names]
        if state.loss is None or any(g is None for g in grads):
            return None
        return grads  # type: ignore[return-value]

    def measures(self, state: ProbeState) -> Iterate:
        return "before" if self._grads(state) is not None else "after"

    def compute(self, state: ProbeState) -> dict[str, float]:
        grads = self._grads(state)
        if grads is not None:
            return {"grad_norm": torch.nn.utils.get_total_norm(grads).item()}
        return {"grad_norm": torch.linalg.vector_norm(state.problem.gradient()).item()}


def _layer(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


class DistanceProbe(Probe):
    """``dist_init`` = ‖θ − θ₀‖ and ``dist_init_rel`` = ‖θ − θ₀‖/‖θ₀‖, in total and per layer.

    Per-layer names are ``dist_init/<module>`` and ``dist_init_rel/<module>`` (the module that
    owns the parameters, e.g. ``0`` for ``0.weight`` and ``0.bias``).
    """

    name = "dist_init"
    iterate: Iterate = "after"

    def __init__(self, schedule: Schedule | int | None = None, per_layer: bool = True) -> None:
        super().__init__(schedule)
        self.per_layer = per_layer
        self._init: tuple[int, Tensor, Tensor, list[str], list[float]] | None = None

    def _setup(self, state: ProbeState) -> tuple[Tensor, Tensor, list[str], list[float]]:
        """θ₀ flattened, each entry's layer index, layer names and ‖θ₀‖² per layer (cached)."""
        key = id(state.initial_params)
        if self._init is None or self._init[0] != key:
            prob = state.problem
            layers = list(dict.fromkeys(_layer(n) for n in prob.names))
            theta0 = prob.flatten(state.initial_params).double()
            index = torch.cat(
                [
                    torch.full((state.initial_params[n].numel(),), layers.index(_layer(n)))
                    for n in prob.names
                ]
            ).to(theta0.device)
            base = torch.zeros(len(layers), dtype=torch.float64, device=theta0.device)
            base = base.index_add(0, index, theta0.pow(2)).tolist()
            self._init = (key, theta0, index, layers, base)
        return self._init[1:]

    def compute(self, state: ProbeState) -> dict[str, float]:
        theta0, index, layers, base = self._setup(state)
        sq = (state.problem.flatten(state.problem.params).double() - theta0).pow(2)
        diff = torch.zeros(len(layers), dtype=torch.float64, device=sq.device)
        diff = diff.index_add(0, index, sq).tolist()
        tot, tot0 = sum(diff), sum(base)
        out = {"dist_init": math.sqrt(tot), "dist_init_rel": _ratio(tot, tot0)}
        if self.per_layer and len(layers) > 1:
            for layer, d, b in zip(layers, diff, base, strict=True):
                out[f"dist_init/{layer}"] = math.sqrt(d)
                out[f"dist_init_rel/{layer}"] = _ratio(d, b)
        return out


def _ratio(sq: float, sq0: float) -> float:
    return math.sqrt(sq / sq0) if sq0 > 0 else math.inf if sq > 0 else 0.0


class ThresholdProbe(Probe):
    """``lr`` and the optimizer's stability ``threshold`` (none for optimizers without one).

    Cheap: reads the param groups, so a learning-rate schedule moves the line every step.
    """

    name = "threshold"
    needs = frozenset({"optimizer"})

    def compute(self, state: ProbeState) -> dict[str, float]:
        if state.optimizer is None:
            return {}
        out = {"lr": float(state.optimizer.param_groups[0]["lr"])}
        thr = stability_threshold(state.optimizer)
        if thr is not None:
            out["threshold"] = float(thr)
        return out


class SharpnessProbe(Probe):
    """``sharpness`` = λ_max(∇²L) by Lanczos, warm-started from the previous eigenvector.

    Also ``sharpness_residual`` (‖Hv − λv‖), ``sharpness_converged`` (0/1) and
    ``sharpness_matvecs``. Evaluated on the tracker's subset at the current parameters.
    """

    name = "sharpness"
    iterate: Iterate = "after"

    def __init__(
        self, schedule: Schedule | int | None = None, tol: float = 1e-3, max_matvecs: int = 200
    ) -> None:
        super().__init__(schedule)
        self.tol, self.max_matvecs = tol, max_matvecs
        self._v: Tensor | None = None

    def compute(self, state: ProbeState) -> dict[str, float]:
        res = hessian_eigs(
            state.subset,
            1,
            "largest",
            self.tol,
            v0=self._v,
            return_vectors=True,
            max_matvecs=self.max_matvecs,
        )
        assert res.vectors is not None
        self._v = res.vectors[:, 0]
        return {
            "sharpness": res.values[0].item(),
            "sharpness_residual": res.residuals[0].item(),
            "sharpness_converged": float(res.converged),
            "sharpness_matvecs": float(res.matvecs),
        }


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
    """Cheap probes every step; sharpness and trace every ``curvature_every`` steps."""
    return [
        LossProbe(),
        AccuracyProbe(),
        GradNormProbe(),
        DistanceProbe(),
        ThresholdProbe(),
        SharpnessProbe(curvature_every),
        HessianTraceProbe(curvature_every),
    ]
