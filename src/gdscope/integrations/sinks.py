"""Sinks: mirror each tracked value where users already look (TensorBoard, MLflow, a trainer's log).

The gdscope store stays the source of truth; a sink receives a copy of what one tracked step
computed (the dict :meth:`gdscope.Tracker.step` returns) and writes it elsewhere::

    tracker = gs.Tracker(prob, store="runs.db")
    sinks = [TensorBoardSink("tb/"), MLflowSink(tracking_uri="file:./mlruns")]
    for s in sinks:
        s.open("my-run", tracker.config)
    for t in range(steps):
        ...                                  # the training step
        values = tracker.step(t, opt, loss=loss)
        for s in sinks:
            s.write(t, values)
    for s in sinks:
        s.close("completed")

The trainer callbacks (:mod:`gdscope.integrations.lightning`, :mod:`gdscope.integrations.hf`) do
this for you. Conventions, the same in every sink:

* a value named ``n`` in the store is written as ``<prefix><n>`` (prefix ``"gdscope/"``), so
  ``sharpness`` appears as ``gdscope/sharpness`` and the optimizer's threshold beside it as
  ``gdscope/threshold`` (``gdscope/preconditioned_threshold`` for adaptive optimizers);
* the step is the store's ``step`` column: the number of optimizer updates before the one the
  values were tracked after (so a value with ``iterate='after'`` describes ``θ_{step+1}``);
* NaN and ±inf are written as they are (the reader decides how to draw them).

Each sink imports its library only when created, so ``import gdscope`` never needs TensorBoard or
MLflow (``pip install gdscope[tensorboard]`` / ``gdscope[mlflow]``).
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

from gdscope.errors import GdscopeError, InvalidArgumentError

__all__ = [
    "CallableSink",
    "MLflowSink",
    "PREFIX",
    "SHARPNESS_PAIRS",
    "Sink",
    "TensorBoardSink",
    "check_sinks",
    "replay",
]

#: The prefix of every mirrored value's name.
PREFIX = "gdscope/"
#: Curvature values and the thresholds they are compared with (drawn together in TensorBoard).
SHARPNESS_PAIRS: tuple[tuple[str, str], ...] = (
    ("sharpness", "threshold"),
    ("preconditioned_sharpness", "preconditioned_threshold"),
)


def _missing(package: str, extra: str, what: str) -> GdscopeError:
    return GdscopeError(
        f"{what} needs the {package!r} package, which is not installed: "
        f"pip install 'gdscope[{extra}]' (or pip install {package})."
    )


def _check_prefix(prefix: Any) -> str:
    if not isinstance(prefix, str):
        raise InvalidArgumentError(
            f"prefix={prefix!r} ({type(prefix).__name__}) must be a string, e.g. 'gdscope/'."
        )
    return prefix


class Sink(ABC):
    """Where tracked values are mirrored. ``open`` once, ``write`` per tracked step, ``close``."""

    prefix: str = PREFIX

    def open(self, run_name: str, config: Mapping[str, Any]) -> None:  # noqa: B027 (optional)
        """Called once before the first ``write`` with the run's name and config."""

    @abstractmethod
    def write(self, step: int, values: Mapping[str, float]) -> None:
        """Mirror one tracked step's values (names as in the store, without the prefix)."""

    def close(self, status: str = "completed") -> None:  # noqa: B027 (optional)
        """Flush and release; ``status`` is the run's (completed, failed, diverged)."""

    def key(self, name: str) -> str:
        """The mirrored name of the stored value ``name``."""
        return self.prefix + name


class TensorBoardSink(Sink):
    """Scalars in TensorBoard event files (``torch.utils.tensorboard.SummaryWriter``).

    Every value is a scalar ``gdscope/<name>`` at the store's step. A custom-scalars layout
    (category ``gdscope``) draws each sharpness with its threshold in one chart
    (:data:`SHARPNESS_PAIRS`), so the edge of stability reads as two lines meeting.

    Args:
        log_dir: the event-file directory (created), or an existing ``SummaryWriter``
            (``writer=``), e.g. the one of Lightning's ``TensorBoardLogger.experiment``.
        prefix: put before every name.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        writer: Any = None,
        prefix: str = PREFIX,
    ) -> None:
        if (log_dir is None) == (writer is None):
            raise InvalidArgumentError(
                f"TensorBoardSink(log_dir={log_dir!r}, writer={writer!r}): pass exactly one, the "
                "event-file directory (e.g. 'runs/tb') or an existing SummaryWriter."
            )
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise InvalidArgumentError(
                f"log_dir={log_dir!r} ({type(log_dir).__name__}) must be a directory path."
            )
        self.prefix = _check_prefix(prefix)
        self._own = writer is None
        if writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise _missing("tensorboard", "tensorboard", "TensorBoardSink") from e
            writer = SummaryWriter(log_dir=os.fspath(log_dir))  # type: ignore[arg-type]
        elif not hasattr(writer, "add_scalar"):
            raise InvalidArgumentError(
                f"writer={writer!r} ({type(writer).__name__}) has no add_scalar: pass a "
                "torch.utils.tensorboard.SummaryWriter."
            )
        self.writer = writer
        self.log_dir = getattr(writer, "log_dir", None)

    def open(self, run_name: str, config: Mapping[str, Any]) -> None:
        charts = {
            f"{s} and {t}": ["Multiline", [self.key(s), self.key(t)]] for s, t in SHARPNESS_PAIRS
        }
        if hasattr(self.writer, "add_custom_scalars"):
            self.writer.add_custom_scalars({self.prefix.rstrip("/") or "gdscope": charts})
        if hasattr(self.writer, "add_text"):
            self.writer.add_text(self.key("run"), f"gdscope run {run_name}", 0)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(self.key(name), float(value), int(step))

    def close(self, status: str = "completed") -> None:
        self.writer.flush()
        if self._own:
            self.writer.close()


# MLflow metric names: alphanumerics, underscores, dashes, periods, spaces, colons and slashes
_MLFLOW_BAD = re.compile(r"[^\w\-. /:]")


class MLflowSink(Sink):
    """Metrics in an MLflow run (``MlflowClient.log_batch``, one batch per tracked step).

    The run is, in order: ``run_id`` when given; else the active run (``mlflow.start_run``) when
    no ``tracking_uri`` is given; else a new run named after the gdscope run in ``experiment``
    (created if needed), ended with the gdscope run's status (FINISHED, FAILED). The run gets
    the tags ``gdscope.run_name`` and ``gdscope.integration`` and the gdscope config's scalar
    settings as params (``gdscope.<key>``). Characters MLflow refuses in a name become ``_``.

    Args:
        tracking_uri: e.g. ``"file:./mlruns"`` (MLflow ≥ 3 asks for ``MLFLOW_ALLOW_FILE_STORE=
            true`` to use a file store) or ``"http://host:5000"``; default MLflow's own.
        experiment: experiment name for a new run.
        run_id: log into this existing run.
        prefix: put before every name.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "gdscope",
        run_id: str | None = None,
        *,
        prefix: str = PREFIX,
    ) -> None:
        for arg, value in (("tracking_uri", tracking_uri), ("run_id", run_id)):
            if value is not None and not isinstance(value, str):
                raise InvalidArgumentError(
                    f"{arg}={value!r} ({type(value).__name__}) must be a string or None."
                )
        if not isinstance(experiment, str) or not experiment.strip():
            raise InvalidArgumentError(
                f"experiment={experiment!r} must be a non-empty experiment name, e.g. 'gdscope'."
            )
        self.prefix = _check_prefix(prefix)
        try:
            import mlflow
            from mlflow.tracking import MlflowClient
        except ImportError as e:
            raise _missing("mlflow-skinny", "mlflow", "MLflowSink") from e
        self._mlflow = mlflow
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id = run_id
        self._created = False

    def key(self, name: str) -> str:
        return _MLFLOW_BAD.sub("_", self.prefix + name)

    def open(self, run_name: str, config: Mapping[str, Any]) -> None:
        if self.run_id is None and self.tracking_uri is None:
            active = self._mlflow.active_run()
            if active is not None:
                self.run_id = active.info.run_id
        if self.run_id is None:
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp is not None else None
            if exp_id is None:
                exp_id = self.client.create_experiment(self.experiment)
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
            self._created = True
        from mlflow.entities import Param, RunTag

        tags = [RunTag("gdscope.run_name", str(run_name))]
        if "integration" in config:
            tags.append(RunTag("gdscope.integration", str(config["integration"])))
        params = [
            Param(_MLFLOW_BAD.sub("_", f"gdscope.{k}")[:250], str(v)[:500])
            for k, v in config.items()
            if isinstance(v, (str, int, float, bool)) or v is None
        ]
        self.client.log_batch(self.run_id, params=params, tags=tags)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        if self.run_id is None:
            raise GdscopeError("MLflowSink.write before open(): open the sink first.")
        from mlflow.entities import Metric

        now = int(_now() * 1000)
        metrics = [Metric(self.key(k), float(v), now, int(step)) for k, v in values.items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str = "completed") -> None:
        if self._created and self.run_id is not None:
            self.client.set_terminated(
                self.run_id, "FINISHED" if status == "completed" else "FAILED"
            )
            self._created = False


def _now() -> float:
    import time

    return time.time()


class CallableSink(Sink):
    """Calls ``fn(metrics, step)`` with ``{prefix + name: value}``: any logger with a
    ``log_metrics(metrics, step)``-style method (Lightning loggers, W&B's ``run.log`` through a
    lambda, a list's ``append``)."""

    def __init__(self, fn: Callable[[dict[str, float], int], Any], *, prefix: str = PREFIX) -> None:
        if not callable(fn):
            raise InvalidArgumentError(
                f"fn={fn!r} ({type(fn).__name__}) must be callable as fn(metrics, step), e.g. "
                "logger.log_metrics."
            )
        self.fn = fn
        self.prefix = _check_prefix(prefix)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        self.fn({self.key(k): float(v) for k, v in values.items()}, int(step))


def check_sinks(sinks: Any) -> list[Sink]:
    """``sinks`` as a list of :class:`Sink` (None: none), else a clear error."""
    if sinks is None:
        return []
    if isinstance(sinks, Sink):
        return [sinks]
    if isinstance(sinks, (str, bytes, Mapping)) or not hasattr(sinks, "__iter__"):
        raise InvalidArgumentError(
            f"sinks={sinks!r} ({type(sinks).__name__}) must be a list of sinks, e.g. "
            "[TensorBoardSink('tb/')], or None."
        )
    out = list(sinks)
    for i, s in enumerate(out):
        if not isinstance(s, Sink):
            raise InvalidArgumentError(
                f"sinks[{i}]={s!r} ({type(s).__name__}) is not a gdscope sink: pass "
                "TensorBoardSink, MLflowSink, CallableSink or a Sink subclass."
            )
    return out


def replay(store: Any, run: int | str, sinks: Sink | list[Sink]) -> int:
    """Write a stored run into ``sinks`` (e.g. to TensorBoard after the fact); returns the
    number of steps written. The values are the store's, step by step, as tracking wrote them.
    """
    from gdscope.store import Store

    if not isinstance(store, Store):
        raise InvalidArgumentError(
            f"store={store!r} ({type(store).__name__}) must be a gdscope.store.Store: open it "
            "with Store(path, readonly=True)."
        )
    targets = check_sinks(sinks)
    info = store.run(run)
    by_step: dict[int, dict[str, float]] = {}
    for step, name, value, _probe, _it in store.metrics(info.id):
        by_step.setdefault(step, {})[name] = value
    for s in targets:
        s.open(info.name, info.config)
    for step in sorted(by_step):
        for s in targets:
            s.write(step, by_step[step])
    status = info.status if info.status in ("completed", "failed", "diverged") else "failed"
    for s in targets:
        s.close(status)
    return len(by_step)
