"""The built-in trainer: full-batch GD on ``L = Σ w·L_b`` or mini-batch SGD from a sampler.

    result = gs.fit(prob, gs.GD(prob.model.parameters(), lr=0.1), steps=1000, tracker=tracker)

Each step ``t = 0 … steps−1``: ``zero_grad``; forward with the real module (``prob.model(x)``,
or ``prob.model(**x)`` for dict batches, the logits taken by the problem's adapter, attention
under the problem's :meth:`~gdscope.Problem.attention_context`, so the loss is the one the
problem measures); ``backward``; ``optimizer.step()``; then ``tracker.step(t, optimizer,
loss=…, outputs=…, targets=…)``. The loss and outputs handed to the tracker are those at the
parameters **before** this step's update (``θ_t``), as in any PyTorch loop; the model already
holds ``θ_{t+1}`` when the tracker runs.

A run that fails (an exception escapes the loop) is finished with status ``"failed"`` and
``summary={"error": "<ExcType>: <message>"}``, which the report's "why it stopped" shows.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from torch.optim import Optimizer

from gdscope.errors import InvalidArgumentError, NonFiniteError
from gdscope.problem import Problem, _take
from gdscope.train.optimizers import describe_optimizer
from gdscope.train.sampler import SAMPLERS

__all__ = ["FitResult", "TrackerLike", "fit"]

_ON_NONFINITE = ("raise", "stop")


class TrackerLike(Protocol):
    """What :func:`fit` needs of a tracker (:class:`gdscope.Tracker` has it)."""

    def step(
        self,
        step: int,
        optimizer: Optimizer | None = None,
        loss: Tensor | float | None = None,
        outputs: Tensor | None = None,
        targets: Tensor | None = None,
    ) -> Any: ...

    def close(self, status: str = "completed") -> None: ...


def _finish(tracker: TrackerLike, status: str, summary: dict[str, Any] | None = None) -> None:
    """End the tracker's run: ``finish`` (keeps it open for results) if it has one, else close.

    ``summary`` (e.g. ``{"error": ...}``) is passed when given; a tracker-like object whose
    method takes no summary is called with the status alone.
    """
    finish = getattr(tracker, "finish", None)
    _end(finish if callable(finish) else tracker.close, status, summary)


def _end(end: Any, status: str, summary: dict[str, Any] | None) -> None:
    """``end(status, summary)``, or ``end(status)`` for a method that takes no summary."""
    if summary is None:
        end(status)
        return
    try:
        end(status, summary)  # type: ignore[call-arg]
    except TypeError:
        end(status)


def error_summary(exc: BaseException, limit: int = 2000) -> dict[str, str]:
    """``{"error": "<ExcType>: <message>"}`` for a failed run's stored summary (message cut at
    ``limit`` characters); :func:`gdscope.report.summary.stop_reason` shows it."""
    text = f"{type(exc).__name__}: {exc}".rstrip(": ").strip()
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return {"error": text}


def module_outputs(prob: Problem, x: Any) -> Tensor:
    """Outputs of the live module (gradients flow into its parameters) on one batch of inputs.

    ``prob.model(**x)`` for dict inputs, else ``prob.model(x)``; with an adapter the logits of
    the output object; under the problem's attention context (math SDPA for attention models),
    so the values are those :meth:`Problem.forward` gives.
    """
    with prob.attention_context():
        out = prob.model(**x) if isinstance(x, Mapping) else prob.model(x)
    if prob.adapter is not None:
        return prob.adapter.logits(out)
    if not isinstance(out, Tensor):
        raise InvalidArgumentError(
            f"the model returns {type(out).__name__}, not a tensor: pass an adapter "
            "(adapter=gs.adapters.hf() takes output.logits)."
        )
    return out


@dataclass(frozen=True)
class FitResult:
    """What :func:`fit` did.

    Attributes:
        losses: ``losses[t]`` is the training loss at ``θ_t`` (before step ``t``'s update): the
            full ``L`` in full batch, the batch's loss in mini-batch mode. On divergence the
            last entry is the non-finite loss if that is what stopped the run.
        steps: optimizer steps taken.
        seconds: wall time of the loop.
        seed: the sampler's seed.
        diverged: the loss or the parameters became non-finite (with ``on_nonfinite="stop"``).
        diverged_at: the step ``t`` at which that was seen, else ``None``.
        batch_size: ``None`` for full batch.
        sampler: ``"fresh"``, ``"epoch"`` or ``"full"`` (full batch).
    """

    losses: list[float]
    steps: int
    seconds: float
    seed: int
    diverged: bool
    diverged_at: int | None
    batch_size: int | None
    sampler: str


def fit(
    prob: Problem,
    optimizer: Optimizer,
    steps: int,
    tracker: TrackerLike | None = None,
    *,
    batch_size: int | None = None,
    sampler: str = "fresh",
    seed: int = 0,
    on_nonfinite: str = "raise",
    progress: bool = False,
    description: str = "training",
) -> FitResult:
    """Train ``prob.model`` in place for ``steps`` optimizer steps.

    Args:
        prob: the problem; its model must hold its parameters in the problem's dtype and device
            (``fit`` updates the module itself).
        optimizer: any ``torch.optim.Optimizer`` over ``prob.model``'s parameters.
        steps: number of steps ``>= 0``.
        tracker: called after every step with the pre-update loss, outputs and targets. If it
            has ``record_config(dict)``, that is called once first with seed, steps, batch size,
            sampler and :func:`describe_optimizer`. When training ends ``fit`` finishes the run:
            status ``"completed"``, ``"diverged"`` or, when an error escapes, ``"failed"``
            (:meth:`gdscope.Tracker.finish`; a tracker without ``finish`` is closed). The stored
            run is complete when ``fit`` returns; ``record_prediction`` and ``close(status,
            summary)`` still work, further steps do not: one tracker per ``fit`` (a finished or
            already stepped tracker is refused).
        batch_size: ``None``: full-batch steps on ``L = Σ w·L_b`` (a ``DataLoader``'s batches
            are accumulated, so the step is exactly full-batch GD). Else mini-batches of this
            size drawn from tensor data, each loss ``prob.loss_fn`` on the batch.
        sampler: ``"fresh"`` (:class:`FreshBatchSampler`) or ``"epoch"``
            (:class:`EpochSampler`); mini-batch mode only.
        seed: seeds the sampler's ``torch.Generator``.
        on_nonfinite: when the loss (before a step) or the parameters (after it) are not finite:
            ``"raise"`` :class:`~gdscope.errors.NonFiniteError`, or ``"stop"`` and return a
            result with ``diverged=True``.
        progress: show a rich progress bar with the step and the loss.
        description: the progress bar's label.
    """
    _validate(prob, optimizer, steps, sampler, on_nonfinite, seed)
    steps, seed = int(steps), int(seed)
    _validate_tracker(tracker, prob)
    if not isinstance(progress, (bool, np.bool_)):
        raise InvalidArgumentError(
            f"progress={progress!r} ({type(progress).__name__}) must be True or False."
        )
    if not isinstance(description, str):
        raise InvalidArgumentError(
            f"description={description!r} ({type(description).__name__}) must be a string."
        )
    model = prob.model
    if batch_size is None:
        sampler_name = "full"
        draw = None
        data = None
    else:
        data = prob.full_batch
        if data is None:
            raise InvalidArgumentError(
                f"batch_size={batch_size!r} needs tensor data, but the problem's data is a "
                "DataLoader, which defines its own batches: pass (X, Y) tensors to use gdscope's "
                "sampler, or batch_size=None for full-batch steps."
            )
        n = prob.n
        if (
            isinstance(batch_size, bool)
            or not isinstance(batch_size, int)
            or not (1 <= batch_size <= n)
        ):
            raise InvalidArgumentError(
                f"batch_size={batch_size!r} must be an integer with 1 <= batch_size <= n={n}, "
                "or None for full batch."
            )
        sampler_name = sampler
        draw = SAMPLERS[sampler](n, batch_size, torch.Generator().manual_seed(seed))

    if tracker is not None and callable(getattr(tracker, "record_config", None)):
        tracker.record_config(  # type: ignore[attr-defined]
            {
                "seed": seed,
                "steps": steps,
                "batch_size": batch_size,
                "sampler": sampler_name,
                "optimizer": describe_optimizer(optimizer),
            }
        )

    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    losses: list[float] = []
    taken = 0
    diverged_at: int | None = None
    error: NonFiniteError | None = None
    bar = _Progress(steps, description) if progress else None
    start = time.perf_counter()
    try:
        with torch.enable_grad():
            for t in range(steps):
                optimizer.zero_grad(set_to_none=True)
                if draw is None:
                    loss, outputs, targets = _full_batch_backward(prob, tracker is not None)
                else:
                    assert data is not None
                    idx = draw().to(data[1].device)
                    x, targets = _take(data[0], idx), data[1][idx]
                    outputs = module_outputs(prob, x)
                    loss = prob.loss_fn(outputs, targets)
                    loss.backward()
                value = loss.item()
                losses.append(value)
                if not math.isfinite(value):
                    diverged_at = t
                    error = NonFiniteError(
                        f"step {t}: the training loss is {value} (at the parameters before the "
                        "update). Training diverged: lower the learning rate, or pass "
                        "on_nonfinite='stop' to keep the partial result."
                    )
                    break
                optimizer.step()
                taken += 1
                bad = _first_nonfinite(names, params)
                if bad is not None:
                    diverged_at = t
                    error = NonFiniteError(
                        f"step {t}: parameter {bad!r} is not finite after the update (the loss "
                        f"before it was {value:.6g}). Training diverged: lower the learning "
                        "rate, or pass on_nonfinite='stop' to keep the partial result."
                    )
                    break
                if tracker is not None:
                    try:
                        tracker.step(
                            t,
                            optimizer,
                            loss=loss.detach(),
                            outputs=None if outputs is None else outputs.detach(),
                            targets=targets,
                        )
                    except NonFiniteError as e:
                        diverged_at, error = t, e
                        break
                if bar is not None:
                    bar.update(t, value)
    except BaseException as exc:  # an error escaped: the run failed, and the store says why
        if tracker is not None:
            with contextlib.suppress(Exception):  # keep the original error
                _finish(tracker, "failed", error_summary(exc))
        raise
    finally:
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - start

    if tracker is not None:
        if error is not None:
            _end(tracker.close, "diverged", error_summary(error))
        else:
            _finish(tracker, "completed")
    if error is not None and on_nonfinite == "raise":
        raise error
    return FitResult(
        losses=losses,
        steps=taken,
        seconds=seconds,
        seed=seed,
        diverged=error is not None,
        diverged_at=diverged_at,
        batch_size=batch_size,
        sampler=sampler_name,
    )


def _full_batch_backward(
    prob: Problem, keep_outputs: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Accumulate ``∇ Σ w·L_b`` into ``.grad``; return ``L`` and, if asked, outputs and targets."""
    total: Tensor | None = None
    outs: list[Tensor] = []
    ys: list[Tensor] = []
    for x, y, w in prob.batches():
        out = module_outputs(prob, x)
        term = w * prob.loss_fn(out, y)
        term.backward()
        term = term.detach()
        total = term if total is None else total + term
        if keep_outputs:
            outs.append(out.detach())
            ys.append(y)
    assert total is not None
    if not keep_outputs:
        return total, None, None
    if len(outs) == 1:
        return total, outs[0], ys[0]
    try:
        return total, torch.cat(outs), torch.cat(ys)
    except RuntimeError:  # ragged batches (sequences of different lengths): no step outputs
        return total, None, None


def _first_nonfinite(names: list[str], params: list[Tensor]) -> str | None:
    """Name of the first parameter holding a NaN or inf (one device sync in all)."""
    with torch.no_grad():
        flags = torch.stack([torch.isfinite(p).all() for p in params])
    if bool(flags.all()):
        return None
    return names[int((~flags).nonzero()[0])]


def _validate(
    prob: Problem,
    optimizer: Optimizer,
    steps: int,
    sampler: str,
    on_nonfinite: str,
    seed: int,
) -> None:
    if not isinstance(prob, Problem):
        raise InvalidArgumentError(f"prob must be a gdscope.Problem, got {type(prob).__name__}.")
    if not isinstance(optimizer, Optimizer):
        raise InvalidArgumentError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}: "
            "e.g. gs.GD(prob.model.parameters(), lr=0.1)."
        )
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise InvalidArgumentError(
            f"steps={steps!r} ({type(steps).__name__}) must be an integer >= 0: the number of "
            "optimizer steps, e.g. steps=1000."
        )
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise InvalidArgumentError(
            f"sampler={sampler!r} is not known: use one of {sorted(SAMPLERS)}."
        )
    if not isinstance(on_nonfinite, str) or on_nonfinite not in _ON_NONFINITE:
        raise InvalidArgumentError(
            f"on_nonfinite={on_nonfinite!r} is not known: use 'raise' or 'stop'."
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidArgumentError(
            f"seed={seed!r} ({type(seed).__name__}) must be an integer, e.g. seed=0."
        )
    _check_optimizer_params(prob, optimizer)
    for name, p in prob.model.named_parameters():
        if p.requires_grad and (p.dtype != prob.dtype or not _same_device(p.device, prob.device)):
            raise InvalidArgumentError(
                f"parameter {name!r} is {p.dtype} on {p.device} but the problem evaluates in "
                f"{prob.dtype} on {prob.device}: fit trains the module itself, so move it first "
                "(model.to(device, dtype)) and build the Problem without a conversion."
            )


def _check_optimizer_params(prob: Problem, optimizer: Optimizer) -> None:
    """Refuse an optimizer whose parameters are not (all) the problem's model parameters."""
    model_ids = {id(p) for p in prob.model.parameters()}
    trainable = {id(p) for p in prob.model.parameters() if p.requires_grad}
    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    if not any(id(p) in trainable for p in opt_params):
        raise InvalidArgumentError(
            f"optimizer: none of its {len(opt_params)} parameter tensor(s) is a trainable "
            "parameter of prob.model (it was built on another model, or on a copy), so fit "
            "would train nothing: build it on this model, e.g. "
            "gs.GD(prob.model.parameters(), lr=0.1)."
        )
    foreign = [p for p in opt_params if id(p) not in model_ids]
    if foreign:
        shapes = [tuple(p.shape) for p in foreign[:3]]
        raise InvalidArgumentError(
            f"optimizer: {len(foreign)} of its {len(opt_params)} parameter tensor(s) (shapes "
            f"{shapes}{', ...' if len(foreign) > 3 else ''}) are not parameters of prob.model, "
            "so fit would never update them: build the optimizer on prob.model.parameters() "
            "(or a subset of them)."
        )


def _validate_tracker(tracker: Any, prob: Problem) -> None:
    """Refuse a tracker that cannot take ``fit``'s steps ``0, 1, …`` for this problem."""
    if tracker is None:
        return
    if not callable(getattr(tracker, "step", None)) or not callable(
        getattr(tracker, "close", None)
    ):
        raise InvalidArgumentError(
            f"tracker={tracker!r} ({type(tracker).__name__}) has no step()/close() methods: pass "
            "a gs.Tracker(prob, ...) or None."
        )
    done = getattr(tracker, "finished", None) or getattr(tracker, "status", None)
    if isinstance(done, str):
        raise InvalidArgumentError(
            f"tracker: its run is already finished (status {done!r}; fit finishes the run it "
            "tracks). Pass a new gs.Tracker(prob, ...) for each fit."
        )
    last = getattr(tracker, "last_step", None)
    if last is not None:
        raise InvalidArgumentError(
            f"tracker has already tracked steps (up to step {last}); fit numbers its steps from "
            "0 and records its own config: pass a new gs.Tracker(prob, ...)."
        )
    tracked = getattr(tracker, "prob", None)
    if isinstance(tracked, Problem) and tracked.model is not prob.model:
        raise InvalidArgumentError(
            "tracker: it tracks a Problem on another model than prob.model, so its probes would "
            "measure a model fit does not train: build the tracker on the same problem, "
            "gs.Tracker(prob, ...)."
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class _Progress:
    """A rich progress bar showing the step and the loss (rich imported only when used)."""

    def __init__(self, steps: int, description: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        self._task = self._progress.add_task(description, total=steps, loss="-")
        self._progress.start()

    def update(self, step: int, loss: float) -> None:
        self._progress.update(self._task, completed=step + 1, loss=f"{loss:.4g}")

    def close(self) -> None:
        self._progress.stop()
