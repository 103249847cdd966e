"""``GdscopeCallback`` for PyTorch Lightning: gdscope inside ``lightning.pytorch.Trainer.fit``.

    import lightning.pytorch as pl
    from gdscope.integrations.lightning import GdscopeCallback
    from gdscope.integrations.sinks import TensorBoardSink

    cb = GdscopeCallback(store="runs.db", loss=nn.CrossEntropyLoss(), curvature_every=50,
                         sinks=[TensorBoardSink("tb/")])
    pl.Trainer(max_epochs=3, callbacks=[cb]).fit(module, train_loader)

At ``on_train_start`` the callback builds a :class:`~gdscope.Problem` from the module (or
``model=``), the loss and a fixed evaluation subset of the training data set (``eval_samples``
items drawn with gdscope's own generator, collated as the loader does), and a
:class:`~gdscope.Tracker` on it. At ``on_train_batch_end`` after each optimizer update (when
gradients are accumulated, after the batch that stepped) it tracks step ``t =
trainer.global_step − 1``: ``loss`` is the training step's own loss (iterate ``before``),
``grad_norm`` reads the ``.grad`` the update used (not yet zeroed: Lightning zeroes gradients
just before the next backward), everything else is measured at the updated parameters on the
subset; ``threshold`` comes from the trainer's real optimizer (``trainer.optimizers[0]``, its
state for Adam and other adaptive ones). Values go to the store, to every sink and (with
``log_to_trainer``) to each of ``trainer.loggers`` as ``gdscope/<name>``.

What the callback promises (checked by the tests): the trained weights are bit-identical to a run
without it (``docs/integrations.md`` says how), non-zero ranks under DDP do
nothing, and curvature is measured in float32 under ``16-mixed``/``bf16-mixed`` (and on
float32 copies under ``16-true``/``bf16-true``), which the stored config says
(``precision``, ``curvature_dtype``, ``autocast_in_probes``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import Tensor, nn

from gdscope.adapters import Adapter, hf
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
from gdscope.integrations.sinks import CallableSink, Sink
from gdscope.probes import Probe
from gdscope.problem import Problem
from gdscope.store import Store
from gdscope.tracker import Tracker

__all__ = ["GdscopeCallback"]

#: Attributes of a LightningModule searched for its loss when ``loss=`` is not given.
LOSS_ATTRIBUTES = ("loss_fn", "criterion", "loss_func", "loss_module")
HOOK = "on_train_batch_end (after optimizer.step; step = trainer.global_step - 1)"


class GdscopeCallback(CallbackSettings, pl.Callback):
    """Track gdscope probes during ``Trainer.fit`` (see the module docstring).

    Args:
        store: SQLite store path (or a :class:`~gdscope.store.Store`); ``None``: memory only.
        probes: the probes (default :func:`~gdscope.integrations.callback_probes`:
            cheap ones every step, sharpness every ``curvature_every`` steps).
        loss: the training loss as gdscope takes it (``"mse"``, ``nn.CrossEntropyLoss()``, ...);
            default the module's ``loss_fn``/``criterion``/``loss_func``/``loss_module``.
        model: the network mapping inputs to outputs: default the LightningModule itself (its
            ``forward``), or an attribute name (``"net"``), or a callable ``module -> nn.Module``.
        adapter: for dict batches (default ``gs.adapters.hf()`` when the batches are dicts).
        eval_data: the data curvature is measured on instead of a subset of the training data:
            ``(X, Y)`` tensors, a list of batches or a DataLoader (then subsampled too).
        eval_samples, eval_batch_size, seed: the fixed evaluation subset's size, batch size
            (default the loader's) and the seed of its draw.
        curvature_every: steps between sharpness measurements (default probes only).
        run_name, config: stored with the run (config is merged with the callback's own).
        sinks: where values are mirrored (:mod:`gdscope.integrations.sinks`).
        log_to_trainer: also log to ``trainer.loggers`` (``logger.log_metrics``).
        on_error: ``"warn"`` (a failing probe ends tracking with a warning, training goes on)
            or ``"raise"``.
    """

    def __init__(
        self,
        store: str | os.PathLike[str] | Store | None = "runs.db",
        probes: Sequence[Probe] | None = None,
        *,
        loss: Any = None,
        model: str | nn.Module | Callable[[pl.LightningModule], nn.Module] | None = None,
        adapter: Adapter | None = None,
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
        super().__init__()
        if model is not None and not (isinstance(model, (str, nn.Module)) or callable(model)):
            raise InvalidArgumentError(
                f"model={model!r} ({type(model).__name__}) must be None (the LightningModule), "
                "an attribute name such as 'net', an nn.Module or a callable module -> nn.Module."
            )
        if adapter is not None and not isinstance(adapter, Adapter):
            raise InvalidArgumentError(
                f"adapter={adapter!r} must be a gdscope adapter, e.g. gs.adapters.hf()."
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
        self.model = model
        self.adapter = adapter
        self._last_global: int | None = None

    # ------------------------------------------------------------------ setup
    def _network(self, pl_module: pl.LightningModule) -> nn.Module:
        m = self.model
        if m is None:
            return pl_module
        if isinstance(m, nn.Module):
            return m
        if isinstance(m, str):
            net = getattr(pl_module, m, None)
            if not isinstance(net, nn.Module):
                raise InvalidArgumentError(
                    f"model={m!r}: the LightningModule {type(pl_module).__name__} has no "
                    f"nn.Module attribute {m!r}; pass the name of the network it holds."
                )
            return net
        net = m(pl_module)
        if not isinstance(net, nn.Module):
            raise InvalidArgumentError(
                f"model(module) returned {type(net).__name__}, not an nn.Module."
            )
        return net

    def _loss(self, pl_module: pl.LightningModule) -> Any:
        if self.loss is not None:
            return self.loss
        for name in LOSS_ATTRIBUTES:
            value = getattr(pl_module, name, None)
            if value is not None and callable(value):
                return value
        raise InvalidArgumentError(
            f"GdscopeCallback needs the training loss: pass loss= (e.g. 'mse', "
            f"nn.CrossEntropyLoss()) or give {type(pl_module).__name__} one of the attributes "
            f"{', '.join(LOSS_ATTRIBUTES)}."
        )

    def _data(self, trainer: pl.Trainer) -> Any:
        data = self.eval_data
        if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data):
            return data
        if isinstance(data, (list, Mapping)):
            return data
        loader = data if data is not None else trainer.train_dataloader
        if loader is None:
            raise InvalidArgumentError(
                "the trainer has no train_dataloader at on_train_start: pass eval_data= "
                "((X, Y) tensors or a DataLoader) to GdscopeCallback."
            )
        if isinstance(loader, (list, tuple, Mapping)) and not hasattr(loader, "dataset"):
            raise InvalidArgumentError(
                "the trainer has several train dataloaders: pass eval_data= (the one to measure "
                "curvature on) to GdscopeCallback."
            )
        batches = eval_batches(
            loader, self.eval_samples, seed=self.seed, batch_size=self.eval_batch_size
        )
        return problem_data(batches)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session is not None:
            # a second fit with the same callback makes a new run; a previous one still
            # open never reached its end (the training raised): it is stored as failed
            self.session.close("failed")
        self.session = None
        if not trainer.is_global_zero:
            return  # DDP: rank 0 tracks; the others do nothing at all
        net = self._network(pl_module)
        loss = self._loss(pl_module)
        dtype = curvature_dtype(net)
        device = next(p for p in net.parameters() if p.requires_grad).device
        with preserved(net):
            data = move(self._data(trainer), device)
            adapter = self.adapter
            if adapter is None and isinstance(data, Mapping | list) and _dict_batches(data):
                adapter = hf()
            prob = Problem(net, loss, data, dtype=dtype, adapter=adapter)
            tracker = Tracker(
                prob,
                self.probes if self.probes is not None else callback_probes(self.curvature_every),
                store=self.store,
                run_name=self.run_name,
                config=self._config(trainer, net, prob),
                guard=functools.partial(preserved, net),
            )
        sinks = list(self.sinks)
        if self.log_to_trainer:
            sinks += [CallableSink(lg.log_metrics) for lg in trainer.loggers]
        self.session = TrackingSession(tracker, sinks, self.on_error)
        self._last_global = trainer.global_step

    def _config(self, trainer: pl.Trainer, net: nn.Module, prob: Problem) -> dict[str, Any]:
        param_dtype = next(p for p in net.parameters() if p.requires_grad).dtype
        opts = trainer.optimizers
        out: dict[str, Any] = {
            "integration": "lightning",
            "lightning": pl.__version__,
            "precision": str(trainer.precision),
            "param_dtype": str(param_dtype).removeprefix("torch."),
            "curvature_dtype": str(prob.dtype).removeprefix("torch."),
            "autocast_in_probes": False,
            "eval_samples": prob.n,
            "eval_seed": self.seed,
            "optimizer": type(unwrap_optimizer(opts[0])).__name__ if opts else None,
            "optimizers": len(opts),
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "world_size": trainer.world_size,
            "device": str(prob.device),
            "hook": HOOK,
        }
        out.update(self.config)
        return out

    # ------------------------------------------------------------------ training
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.session is None or self.session.closed:
            return
        gs = trainer.global_step
        if gs == self._last_global:
            return  # gradients accumulating: no update happened on this batch
        self._last_global = gs
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        loss = loss.detach() if isinstance(loss, Tensor) and loss.numel() == 1 else None
        opt = unwrap_optimizer(trainer.optimizers[0]) if trainer.optimizers else None
        self.session.step(gs - 1, opt, loss=loss)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.session is not None:
            self.session.close("completed")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.session is not None:
            self.session.close("failed")

    @property
    def tracker(self) -> Tracker | None:
        """The tracker of the current (or last) fit on this rank."""
        return None if self.session is None else self.session.tracker


def _dict_batches(data: Any) -> bool:
    if isinstance(data, Mapping):
        return True
    return bool(data) and all(isinstance(b, Mapping) for b in data)
