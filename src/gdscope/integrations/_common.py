"""What the trainer callbacks share: the evaluation subset, default probes, and a tracking session
that leaves the training run exactly as it would have been without it.

Leaving training unchanged (bit-identical weights with and without a callback) rests on four
things, done by :func:`preserved` (the tracker's ``guard``) around every probe call that may run
the model or draw random numbers (:meth:`Probe.evaluates <gdscope.probes.Probe.evaluates>`; the
cheap probes that read the step's loss and gradients, the parameters and the optimizer skip its
≈ 0.2 ms) and by :func:`eval_batches`:

* the RNG states (torch CPU, every initialised CUDA device, Python ``random``, NumPy) are saved
  before and restored after, so dropout masks, data shuffling and augmentation draw the same
  numbers as in a run without gdscope;
* every module's ``training`` flag is saved, the model is put in eval mode for the probes
  (dropout off: a deterministic loss, as curvature needs) and each flag is restored after;
* autocast is off inside the probes (curvature in float32 or the model's own float type, never
  in bf16/fp16; a model stored in half precision is measured on float32 copies of its
  parameters), while the trainer's own autocast is untouched;
* probes are functional (``torch.func``): they never write ``.grad`` and never step the
  optimizer; the evaluation subset is drawn from the data set with gdscope's own generator, so
  the trainer's data loader is never iterated.
"""

from __future__ import annotations

import contextlib
import logging
import random
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from gdscope.errors import InvalidArgumentError, NonFiniteError
from gdscope.integrations.sinks import Sink, check_sinks
from gdscope.probes import (
    DistanceProbe,
    GradNormProbe,
    LossProbe,
    PreconditionedSharpnessProbe,
    Probe,
    ProbeState,
    SharpnessProbe,
    ThresholdProbe,
)
from gdscope.probes.base import Iterate
from gdscope.problem import _resolve_loss
from gdscope.tracker import Tracker, check_probes, check_run_name, check_store_arg

__all__ = [
    "CallbackSettings",
    "DEFAULT_CURVATURE_EVERY",
    "DEFAULT_EVAL_SAMPLES",
    "EvalLossProbe",
    "TrackingSession",
    "callback_probes",
    "curvature_dtype",
    "eval_batches",
    "move",
    "preserved",
    "problem_data",
    "unwrap_optimizer",
]

log = logging.getLogger("gdscope.integrations")

#: Samples in the fixed evaluation subset curvature is measured on.
DEFAULT_EVAL_SAMPLES = 64
#: Optimizer steps between two sharpness measurements.
DEFAULT_CURVATURE_EVERY = 50
_ON_ERROR = ("warn", "raise")


class EvalLossProbe(Probe):
    """``eval_loss``: ``L`` on the fixed evaluation subset at the current parameters (after).

    Beside the trainer's mini-batch ``loss`` it is the loss whose Hessian the sharpness is.
    """

    name = "eval_loss"
    iterate: Iterate = "after"

    def compute(self, state: ProbeState) -> dict[str, float]:
        with torch.no_grad():
            return {"eval_loss": state.subset.loss().item()}


def callback_probes(
    curvature_every: int = DEFAULT_CURVATURE_EVERY, *, eval_loss: bool = True
) -> list[Probe]:
    """The callbacks' default probes: cheap ones every step (``loss``, ``grad_norm``,
    ``dist_init``, ``lr`` and the optimizer's ``threshold``); every ``curvature_every`` steps
    sharpness, for adaptive optimizers preconditioned sharpness, and (``eval_loss=True``) the
    loss on the evaluation subset, whose Hessian the sharpness is (a forward pass over the
    subset: as costly as a training step, so not every step)."""
    probes: list[Probe] = [
        LossProbe(),
        GradNormProbe(),
        DistanceProbe(per_layer=False),
        ThresholdProbe(),
        SharpnessProbe(curvature_every),
        PreconditionedSharpnessProbe(curvature_every),
    ]
    if eval_loss:
        probes.append(EvalLossProbe(curvature_every))
    return probes


# ---------------------------------------------------------------------- leaving training intact
@contextlib.contextmanager
def _no_autocast() -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Run the body with the model in eval mode and autocast off; restore every RNG state and
    every module's train/eval flag afterwards (also when the body raises)."""
    cpu = torch.random.get_rng_state()
    cuda = (
        torch.cuda.get_rng_state_all()
        if torch.cuda.is_available() and torch.cuda.is_initialized()
        else None
    )
    py = random.getstate()
    npy = np.random.get_state()
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with _no_autocast():
            yield
    finally:
        for m, flag in modes:
            m.training = flag
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(py)
        np.random.set_state(npy)


# ---------------------------------------------------------------------- the evaluation subset
def _batch_len(batch: Any) -> int:
    first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch[0]
    return len(first)


def eval_batches(
    loader: Any, samples: int, *, seed: int = 0, batch_size: int | None = None
) -> list[Any]:
    """A fixed evaluation subset of ``loader``: ``samples`` items of its data set, drawn with
    ``torch.Generator().manual_seed(seed)`` (in data-set order), collated by its ``collate_fn``
    in batches of its batch size.

    The loader itself is not iterated, so its sampler and the global RNG are untouched. A loader
    over an iterable data set (no ``__getitem__``) gives its first batches instead; call this
    under :func:`preserved` then.
    """
    check_subset_args(samples, batch_size, seed)
    dataset = getattr(loader, "dataset", None)
    bs = batch_size or getattr(loader, "batch_size", None)
    if bs is None:
        bs = getattr(getattr(loader, "batch_sampler", None), "batch_size", None) or samples
    indexable = (
        dataset is not None
        and not isinstance(dataset, torch.utils.data.IterableDataset)
        and hasattr(dataset, "__getitem__")
        and hasattr(dataset, "__len__")
    )
    if indexable:
        from torch.utils.data import default_collate

        collate = getattr(loader, "collate_fn", None) or default_collate
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise InvalidArgumentError("the training data set is empty: nothing to measure on.")
        take = min(samples, n)
        gen = torch.Generator().manual_seed(seed)
        idx = torch.randperm(n, generator=gen)[:take].sort().values.tolist()
        return [collate([dataset[i] for i in idx[j : j + bs]]) for j in range(0, take, bs)]  # type: ignore[index]
    if loader is None or not hasattr(loader, "__iter__"):
        raise InvalidArgumentError(
            f"cannot draw an evaluation subset from {type(loader).__name__}: pass eval_data= "
            "((X, Y) tensors, a list of batches or a DataLoader)."
        )
    out: list[Any] = []
    got = 0
    for batch in loader:
        out.append(batch)
        got += _batch_len(batch)
        if got >= samples:
            break
    if not out:
        raise InvalidArgumentError("the training data loader gave no batch: nothing to measure.")
    return out


def move(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor on ``device`` (dicts, tuples and lists kept)."""
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(move(v, device) for v in batch)
    if isinstance(batch, list):
        return [move(v, device) for v in batch]
    return batch


def problem_data(batches: Sequence[Any]) -> Any:
    """The Problem's data from collated batches: ``(X, Y)`` tensors, one dict of tensors when
    every batch has the same keys and per-sample shapes, else the list of batches."""
    if all(
        isinstance(b, (tuple, list)) and len(b) == 2 and all(isinstance(t, Tensor) for t in b)
        for b in batches
    ):
        try:
            return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        except RuntimeError:
            return [tuple(b) for b in batches]
    if all(isinstance(b, Mapping) for b in batches):
        keys = list(batches[0])
        same = all(list(b) == keys for b in batches) and all(
            isinstance(b[k], Tensor) and b[k].shape[1:] == batches[0][k].shape[1:]
            for b in batches
            for k in keys
        )
        if same:
            return {k: torch.cat([b[k] for b in batches]) for k in keys}
    return list(batches)


def curvature_dtype(model: nn.Module) -> torch.dtype:
    """The float type curvature is measured in: the parameters' own, float32 for half types."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point():
            return torch.float32 if p.dtype in (torch.float16, torch.bfloat16) else p.dtype
    return torch.float32


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer inside wrappers (accelerate's ``AcceleratedOptimizer``, Lightning's
    ``LightningOptimizer``): what :func:`gdscope.theory.read_optimizer` understands."""
    seen = 0
    while optimizer is not None and hasattr(optimizer, "optimizer") and seen < 8:
        inner = optimizer.optimizer
        if not isinstance(inner, torch.optim.Optimizer) and not hasattr(inner, "optimizer"):
            break
        optimizer, seen = inner, seen + 1
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_subset_args(samples: Any, batch_size: Any, seed: Any) -> None:
    """Refuse a bad ``eval_samples``, ``eval_batch_size`` or ``seed`` (at construction)."""
    if not _positive_int(samples):
        raise InvalidArgumentError(
            f"eval_samples={samples!r} must be a positive integer: the size of the fixed subset "
            "curvature is measured on, e.g. 64."
        )
    if batch_size is not None and not _positive_int(batch_size):
        raise InvalidArgumentError(
            f"eval_batch_size={batch_size!r} must be a positive integer or None (the training "
            "loader's batch size)."
        )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InvalidArgumentError(
            f"seed={seed!r} ({type(seed).__name__}) must be an integer: the seed of the "
            "evaluation subset's draw, e.g. 0."
        )


def check_on_error(on_error: Any) -> str:
    if on_error not in _ON_ERROR:
        raise InvalidArgumentError(
            f"on_error={on_error!r} must be 'warn' (a failing probe ends tracking with a "
            "warning; training goes on) or 'raise' (the error stops training)."
        )
    return str(on_error)


def check_every(curvature_every: Any) -> int:
    if isinstance(curvature_every, bool) or not isinstance(curvature_every, int):
        raise InvalidArgumentError(
            f"curvature_every={curvature_every!r} must be a positive integer (optimizer steps "
            "between sharpness measurements), e.g. 50."
        )
    if curvature_every < 1:
        raise InvalidArgumentError(
            f"curvature_every={curvature_every} must be >= 1, e.g. 50 (every 50 steps)."
        )
    return curvature_every


# ---------------------------------------------------------------------- a session
class CallbackSettings:
    """What both trainer callbacks take besides their own arguments, checked in one place."""

    def _set_common(
        self,
        store: Any,
        probes: Sequence[Probe] | None,
        loss: Any,
        eval_data: Any,
        eval_samples: int,
        eval_batch_size: int | None,
        seed: int,
        curvature_every: int,
        run_name: str | None,
        config: Mapping[str, Any] | None,
        sinks: Any,
        log_to_trainer: bool,
        on_error: str,
    ) -> None:
        if config is not None and not isinstance(config, Mapping):
            raise InvalidArgumentError(f"config={config!r} must be a dict of settings or None.")
        check_subset_args(eval_samples, eval_batch_size, seed)
        # refused when the callback is made, not steps into training
        check_store_arg(store)
        check_run_name(run_name)
        if loss is not None:
            _resolve_loss(loss, None)
        if not isinstance(log_to_trainer, (bool, np.bool_)):
            raise InvalidArgumentError(
                f"log_to_trainer={log_to_trainer!r} ({type(log_to_trainer).__name__}) must be "
                "True (values also go to the trainer's logger) or False."
            )
        self.store = store
        self.curvature_every = check_every(curvature_every)
        self.probes = check_probes(probes) if probes is not None else None
        self.loss = loss
        self.eval_data = eval_data
        self.eval_samples = eval_samples
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self.run_name = run_name
        self.config = dict(config or {})
        self.sinks = check_sinks(sinks)
        self.log_to_trainer = bool(log_to_trainer)
        self.on_error = check_on_error(on_error)
        #: The session of the current training (``None`` before it, and off the main process).
        self.session: TrackingSession | None = None


class TrackingSession:
    """A :class:`~gdscope.Tracker` and its sinks, run from a trainer's hook.

    ``step`` runs the tracker (whose ``guard`` is :func:`preserved`), then mirrors the values it
    returned to each sink (opened at the first step, with the stored run's name). With
    ``on_error="warn"`` a failing probe or a diverged loss ends tracking (the run is stored as
    failed or diverged, with a warning) while training goes on; a failing sink is dropped with a
    warning.
    """

    def __init__(self, tracker: Tracker, sinks: Sequence[Sink], on_error: str = "warn") -> None:
        self.tracker = tracker
        self.sinks = list(sinks)
        self.on_error = check_on_error(on_error)
        self.closed = False
        self._opened = False
        #: The values of the last tracked step (what the sinks received).
        self.last: dict[str, float] = {}

    @property
    def run_name(self) -> str:
        t = self.tracker
        if t.store is not None and t.run_id is not None:
            return t.store.run(t.run_id).name
        return t.run_name or "gdscope"

    def _open_sinks(self) -> None:
        self._opened = True
        for s in list(self.sinks):
            try:
                s.open(self.run_name, self.tracker.config)
            except Exception as e:
                self._drop(s, "open", e)

    def _drop(self, sink: Sink, what: str, e: BaseException) -> None:
        msg = f"gdscope: sink {type(sink).__name__} failed to {what} ({e}); it is dropped."
        warnings.warn(msg, RuntimeWarning, stacklevel=4)
        log.warning(msg)
        self.sinks.remove(sink)

    def _mirror(self, step: int, values: Mapping[str, float]) -> None:
        self.last = dict(values)
        if not self._opened:
            self._open_sinks()
        for s in list(self.sinks):
            try:
                s.write(step, values)
            except Exception as e:
                self._drop(s, "write", e)

    def _values_of(self, step: int) -> dict[str, float]:
        return {k: pts[-1][1] for k, pts in self.tracker.history.items() if pts[-1][0] == step}

    def step(
        self, step: int, optimizer: torch.optim.Optimizer | None, loss: Tensor | None = None
    ) -> dict[str, float] | None:
        """Track ``step`` (the optimizer update just done is number ``step``, from 0)."""
        if self.closed:
            return None
        try:
            values = self.tracker.step(step, optimizer, loss=loss)
        except NonFiniteError as e:
            self._mirror(step, self._values_of(step))
            self._fail("diverged", e)
            return None
        except Exception as e:
            self._fail("failed", e)
            return None
        self._mirror(step, values)
        return values

    def _fail(self, status: str, e: BaseException) -> None:
        msg = (
            f"gdscope: tracking stopped at step {self.tracker.last_step} ({status}): {e}. "
            "Training goes on; the run is stored as " + status + "."
        )
        self.close(status)
        if self.on_error == "raise":
            raise e
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        log.warning(msg)

    def close(self, status: str = "completed") -> None:
        """Close the tracker (the stored run gets ``status``) and the sinks. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            self.tracker.close(status)
        finally:
            for s in list(self.sinks):
                try:
                    s.close(status)
                except Exception as e:
                    self._drop(s, "close", e)
