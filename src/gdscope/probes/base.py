"""The probe plugin API: what a measured quantity declares and when it runs.

A :class:`Probe` has a ``name``, a :class:`Schedule` (the tracker calls it only on scheduled
steps), the inputs it ``needs`` and the iterate it measures: ``"before"`` the step's optimizer
update (``θ_t``: it reuses the loss or outputs of the step) or ``"after"`` it (``θ_{t+1}``: it
evaluates the parameters the model now holds). ``compute(state)`` returns named values: floats,
or scalar tensors, which the tracker reads in one batch after all of a step's probes ran (on an
accelerator: one host sync per step instead of one per value). ``evaluates(state)`` says whether
a call may run the model or draw random numbers (default yes); the trainer callbacks guard only
such calls (RNG states and train/eval flags saved and restored).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from gdscope.errors import InvalidArgumentError
from gdscope.problem import Params, Problem

__all__ = [
    "At",
    "Every",
    "Iterate",
    "LogSpaced",
    "Probe",
    "ProbeState",
    "Schedule",
    "class_view",
    "current_outputs",
]

Iterate = Literal["before", "after"]


class Schedule(ABC):
    """Decides on which steps a probe runs."""

    @abstractmethod
    def __call__(self, step: int) -> bool: ...


def _is_int(x: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


@dataclass(frozen=True)
class Every(Schedule):
    """Every ``n`` steps starting at ``start`` (``Every(1)``: every step)."""

    n: int = 1
    start: int = 0

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise InvalidArgumentError(
                f"Every(n={self.n!r}): n must be a positive integer ({type(self.n).__name__} "
                "given): pass n=1 for every step, n=10 for every tenth."
            )
        if not _is_int(self.start) or self.start < 0:
            raise InvalidArgumentError(
                f"Every(start={self.start!r}): start must be an integer >= 0 "
                f"({type(self.start).__name__} given): the first step to run at, e.g. start=0."
            )

    def __call__(self, step: int) -> bool:
        return step >= self.start and (step - self.start) % self.n == 0


@dataclass(frozen=True)
class LogSpaced(Schedule):
    """Steps ``0`` and ``⌈10^(j/per_decade)⌉``, ``j = 0, 1, …``: about ``per_decade`` a decade."""

    per_decade: int = 10

    def __post_init__(self) -> None:
        if not _is_int(self.per_decade) or self.per_decade < 1:
            raise InvalidArgumentError(
                f"LogSpaced(per_decade={self.per_decade!r}): per_decade must be an integer >= 1 "
                f"({type(self.per_decade).__name__} given), e.g. per_decade=10."
            )

    def __call__(self, step: int) -> bool:
        # run at s iff some integer j has 10^(j/per_decade) in (s − 1, s]
        if step <= 1:
            return step >= 0
        hi = math.floor(self.per_decade * math.log10(step) + 1e-9)
        return hi > self.per_decade * math.log10(step - 1) + 1e-9


@dataclass(frozen=True)
class At(Schedule):
    """At an explicit set of steps."""

    steps: frozenset[int]

    def __init__(self, steps: Iterable[int]) -> None:
        if isinstance(steps, (str, bytes)) or not isinstance(steps, Iterable):
            raise InvalidArgumentError(
                f"At(steps={steps!r}): steps must be an iterable of integer steps "
                f"({type(steps).__name__} given), e.g. At([0, 10, 100])."
            )
        items = list(steps)
        bad = [s for s in items if not _is_int(s) or s < 0]
        if bad:
            raise InvalidArgumentError(
                f"At(steps=...): steps must be integers >= 0, got {bad[0]!r} "
                f"({type(bad[0]).__name__}): pass e.g. At([0, 10, 100])."
            )
        object.__setattr__(self, "steps", frozenset(int(s) for s in items))

    def __call__(self, step: int) -> bool:
        return step in self.steps


@dataclass
class ProbeState:
    """What a probe may read at one tracked step.

    ``loss``, ``outputs`` and ``targets`` are the training step's own (before the update; any may
    be ``None``). ``problem`` evaluates the current parameters (after the update) on the full
    data; ``subset`` on the tracker's fixed subset (the full problem when none was set).
    """

    step: int
    problem: Problem
    subset: Problem
    optimizer: torch.optim.Optimizer | None
    initial_params: Params
    loss: Tensor | None = None
    outputs: Tensor | None = None
    targets: Tensor | None = None
    cache: dict[str, Any] = field(default_factory=dict)


class Probe(ABC):
    """A measured quantity. Subclasses set ``name``, ``iterate`` and implement ``compute``."""

    name: str = "probe"
    iterate: Iterate = "after"
    needs: frozenset[str] = frozenset()

    def __init__(self, schedule: Schedule | int | None = None) -> None:
        if _is_int(schedule):
            schedule = Every(int(schedule))  # type: ignore[arg-type]
        elif schedule is not None and not isinstance(schedule, Schedule):
            raise InvalidArgumentError(
                f"{type(self).__name__}(schedule={schedule!r}): schedule must be a Schedule "
                f"(Every, LogSpaced, At), an integer n for Every(n) or None for every step; got "
                f"{type(schedule).__name__}."
            )
        self.schedule: Schedule = Every(1) if schedule is None else schedule

    def start(self, problem: Problem) -> None:  # noqa: B027  (optional hook, no-op by default)
        """Called once when the tracker is created, at the initial parameters ``θ₀``."""

    def measures(self, state: ProbeState) -> Iterate:
        """The iterate this call measures (probes that reuse the step's data may fall back)."""
        return self.iterate

    def evaluates(self, state: ProbeState) -> bool:
        """Whether this call may run the model or draw random numbers (default ``True``).

        A probe that only reads the step's loss, outputs and gradients, the optimizer and the
        parameters returns ``False``: a tracker's ``guard`` (the trainer callbacks': RNG states
        and train/eval flags saved and restored, autocast off) is then not entered for it.
        """
        return True

    @abstractmethod
    def compute(self, state: ProbeState) -> Mapping[str, float | Tensor]:
        """Named values at ``state.step``: floats or one-element tensors (read as floats)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(schedule={self.schedule})"


# ------------------------------------------------------------- outputs as the loss sees them
def class_view(prob: Problem, outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(outputs, targets)`` one row per prediction, as the loss compares them.

    With an adapter, its :meth:`~gdscope.adapters.Adapter.loss_view` (causal shift, sequence
    logits ``(N, T, C)`` flattened to ``(N·T', C)``); rows whose class label equals the loss's
    ``ignore_index`` are left out. Otherwise the outputs are flattened per sample, ``(n, k)``.
    """
    if prob.adapter is not None:
        outputs, targets = prob.adapter.loss_view(outputs, targets)
    ignore = prob.loss_spec.ignore_index
    if (
        ignore is not None
        and not targets.is_floating_point()
        and targets.ndim == 1
        and targets.shape[0] == outputs.shape[0]
    ):
        keep = targets != ignore
        outputs, targets = outputs[keep.to(outputs.device)], targets[keep]
    return outputs.reshape(outputs.shape[0], -1), targets


def current_outputs(prob: Problem) -> tuple[Tensor, Tensor]:
    """:func:`class_view` of all the data at the current parameters (no gradient), stacked.

    Dict batches and adapters are handled as :meth:`Problem.forward` does.
    """
    outs: list[Tensor] = []
    ys: list[Tensor] = []
    params = prob.params
    with torch.no_grad():
        for x, y, _ in prob.batches():
            o, t = class_view(prob, prob.forward(params, x), y)
            outs.append(o)
            ys.append(t.to(o.device))
    return torch.cat(outs), torch.cat(ys)
