"""``GdscopeCallback`` for the Hugging Face ``transformers.Trainer``.

    from transformers import Trainer, TrainingArguments
    from gdscope.integrations.hf import GdscopeCallback

    cb = GdscopeCallback(store="runs.db", curvature_every=50)
    Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb]).train()

At ``on_train_begin`` the callback builds a :class:`~gdscope.Problem` with
:meth:`~gdscope.Problem.from_hf` (dict batches, ``labels`` as targets, ``.logits`` as outputs,
cross-entropy with ``-100`` ignored as ``transformers`` computes it, the causal shift for
``*ForCausalLM``-type models) on a fixed evaluation subset of the training data set
(``eval_samples`` items drawn with gdscope's own generator, collated by the trainer's data
collator), and a :class:`~gdscope.Tracker` on it. At ``on_step_end`` (after
``optimizer.step()``, the scheduler step and ``model.zero_grad()``) it tracks step ``t =
state.global_step − 1``: the values are measured at the updated parameters on the subset
(``loss`` too: the Trainer does not hand callbacks its loss; ``grad_norm`` is the subset's
gradient, the trainer's having been zeroed), and ``threshold``/``preconditioned_threshold``
come from the trainer's real optimizer (unwrapped from accelerate) and its state, with the
learning rate the scheduler set for the next update.

Values go to the store and to every sink. With ``log_to_trainer`` the latest value of each is
also merged, as ``gdscope/<name>``, into the Trainer's own log at its logging steps
(``state.log_history``, the ``logs`` of ``on_log`` seen by callbacks after this one). The
reporting callbacks of ``report_to`` run before user callbacks, so for TensorBoard or MLflow use
:class:`~gdscope.integrations.sinks.TensorBoardSink` / ``MLflowSink``.

Promises (checked by the tests): weights bit-identical to a run without the callback,
nothing done on processes other than the main one (``state.is_world_process_zero``), curvature
in float32 under ``bf16``/``fp16`` mixed precision (stored config: ``precision``,
``curvature_dtype``, ``autocast_in_probes``). The Trainer has no hook for a crash: a run whose
training raised stays ``running`` in the store (shown as incomplete) until the callback's next
``train()`` (then ``failed``) or :meth:`GdscopeCallback.close`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import transformers
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from gdscope.errors import InvalidArgumentError
from gdscope.integrations._common import (
    DEFAULT_CURVATURE_EVERY,
    DEFAULT_EVAL_SAMPLES,
    CallbackSettings,
    TrackingSession,
    callback_probes,
    curvature_dtype,
    eval_batches,
    move,
    preserved,
    problem_data,
    unwrap_optimizer,
)
from gdscope.integrations.sinks import PREFIX, Sink
from gdscope.probes import Probe
from gdscope.problem import Problem
from gdscope.store import Store
from gdscope.tracker import Tracker

__all__ = ["GdscopeCallback", "is_causal_lm"]

HOOK = "on_step_end (after optimizer.step, lr_scheduler.step, zero_grad; step = global_step - 1)"


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a causal language model (its class is in ``transformers``' causal-LM
    auto mapping, or its name ends in ``ForCausalLM``/``LMHeadModel``): its loss shifts labels."""
    name = type(model).__name__
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        known: set[str] = set()
        for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            known.update([v] if isinstance(v, str) else v)
    except ImportError:  # pragma: no cover - layout of older transformers
        known = set()
    return name in known or name.endswith(("ForCausalLM", "LMHeadModel"))


class _TrainerLog(Sink):
    """Keeps the latest value of each name until the Trainer's next log."""

    def __init__(self, prefix: str = PREFIX) -> None:
        self.prefix = prefix
        self.pending: dict[str, float] = {}

    def write(self, step: int, values: Mapping[str, float]) -> None:
        self.pending.update({self.key(k): float(v) for k, v in values.items()})

    def flush(self) -> dict[str, float]:
        out, self.pending = self.pending, {}
        return out


class GdscopeCallback(CallbackSettings, TrainerCallback):
    """Track gdscope probes during ``Trainer.train`` (see the module docstring).

    Args:
        store: SQLite store path (or a :class:`~gdscope.store.Store`); ``None``: memory only.
        probes: the probes (default: cheap ones every step, sharpness every
            ``curvature_every`` steps; :func:`~gdscope.integrations.callback_probes`).
        loss: the loss (default ``nn.CrossEntropyLoss()``, as ``transformers``).
        shift: causal-LM label shift (default: :func:`is_causal_lm` of the model).
        labels, logits: the batch key of the targets and the output attribute of the logits.
        eval_data: data to measure curvature on instead of a subset of the training data: a
            dict of tensors, a list of dict batches or a DataLoader (then subsampled too).
        eval_samples, eval_batch_size, seed: the fixed evaluation subset's size, batch size
            (default ``per_device_train_batch_size``) and the seed of its draw.
        curvature_every: steps between sharpness measurements (default probes only).
        run_name, config: stored with the run (config merged with the callback's own).
        sinks: where values are mirrored (:mod:`gdscope.integrations.sinks`).
        log_to_trainer: merge the latest values into the Trainer's log at its logging steps.
        on_error: ``"warn"`` (a failing probe ends tracking with a warning, training goes on)
            or ``"raise"``.
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | Store | None = "runs.db",
        probes: Sequence[Probe] | None = None,
        *,
        loss: Any = None,
        shift: bool | None = None,
        labels: str = "labels",
        logits: str = "logits",
        eval_data: Any = None,
        eval_samples: int = DEFAULT_EVAL_SAMPLES,
        eval_batch_size: int | None = None,
        seed: int = 0,
        curvature_every: int = DEFAULT_CURVATURE_EVERY,
        run_name: str | None = None,
        config: Mapping[str, Any] | None = None,
        sinks: Sink | Sequence[Sink] | None = None,
        log_to_trainer: bool = True,
        on_error: str = "warn",
    ) -> None:
        if shift is not None and not isinstance(shift, bool):
            raise InvalidArgumentError(
                f"shift={shift!r} must be True, False or None (decided from the model class)."
            )
        self._set_common(
            store,
            probes,
            loss,
            eval_data,
            eval_samples,
            eval_batch_size,
            seed,
            curvature_every,
            run_name,
            config,
            sinks,
            log_to_trainer,
            on_error,
        )
        self.shift = shift
        self.labels = labels
        self.logits = logits
        self._log: _TrainerLog | None = None

    def _data(self, args: TrainingArguments, train_dataloader: Any) -> Any:
        data = self.eval_data
        if isinstance(data, (list, Mapping)):
            return data
        loader = data if data is not None else train_dataloader
        if loader is None:
            raise InvalidArgumentError(
                "the Trainer gave no train_dataloader at on_train_begin: pass eval_data= (a "
                "dict of tensors, dict batches or a DataLoader) to GdscopeCallback."
            )
        bs = self.eval_batch_size or args.per_device_train_batch_size
        return problem_data(eval_batches(loader, self.eval_samples, seed=self.seed, batch_size=bs))

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        train_dataloader: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.session is not None:
            # a second train() with the same callback makes a new run; a previous one still
            # open never reached its end (the training raised): it is stored as failed
            self.session.close("failed")
        self.session = None
        if not state.is_world_process_zero:
            return  # distributed: the main process tracks; the others do nothing at all
        if not isinstance(model, nn.Module):
            raise InvalidArgumentError(
                f"the Trainer passed model={type(model).__name__} to the callback: gdscope needs "
                "the nn.Module being trained."
            )
        dtype = curvature_dtype(model)
        device = next(p for p in model.parameters() if p.requires_grad).device
        shift = is_causal_lm(model) if self.shift is None else self.shift
        with preserved(model):
            data = move(self._data(args, train_dataloader), device)
            prob = Problem.from_hf(
                model,
                data,
                loss=self.loss,
                shift=shift,
                labels=self.labels,
                logits=self.logits,
                dtype=dtype,
            )
            tracker = Tracker(
                prob,
                self.probes
                if self.probes is not None
                else callback_probes(self.curvature_every, eval_loss=False),
                store=self.store,
                run_name=self.run_name,
                config=self._config(args, model, prob, optimizer, shift),
                guard=functools.partial(preserved, model),
            )
        sinks = list(self.sinks)
        self._log = None
        if self.log_to_trainer:
            self._log = _TrainerLog()
            sinks.append(self._log)
        self.session = TrackingSession(tracker, sinks, self.on_error)

    def _config(
        self, args: TrainingArguments, model: nn.Module, prob: Problem, optimizer: Any, shift: bool
    ) -> dict[str, Any]:
        param_dtype = next(p for p in model.parameters() if p.requires_grad).dtype
        precision = "bf16 mixed" if args.bf16 else "fp16 mixed" if args.fp16 else "32"
        opt = unwrap_optimizer(optimizer)
        out: dict[str, Any] = {
            "integration": "hf",
            "transformers": transformers.__version__,
            "model_class": type(model).__name__,
            "shift": shift,
            "precision": precision,
            "param_dtype": str(param_dtype).removeprefix("torch."),
            "curvature_dtype": str(prob.dtype).removeprefix("torch."),
            "autocast_in_probes": False,
            "eval_samples": prob.n,
            "eval_seed": self.seed,
            "optimizer": None if opt is None else type(opt).__name__,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "world_size": args.world_size,
            "device": str(prob.device),
            "hook": HOOK,
        }
        out.update(self.config)
        return out

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        if self.session is None or self.session.closed:
            return
        self.session.step(state.global_step - 1, unwrap_optimizer(optimizer))

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if self._log is None or not self._log.pending:
            return
        values = self._log.flush()
        if logs is not None:
            logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if self.session is not None:
            self.session.close("completed")

    def close(self, status: str = "failed") -> None:
        """End the stored run now with ``status`` (after a training that raised: the Trainer
        has no exception hook). Does nothing once the run is closed."""
        if self.session is not None:
            self.session.close(status)

    @property
    def tracker(self) -> Tracker | None:
        """The tracker of the current (or last) training on this process."""
        return None if self.session is None else self.session.tracker
