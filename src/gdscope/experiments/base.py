"""Experiments: each tests one claim of THEORY.md and returns verdicts with figures.

An experiment is split into independent *tasks* (one width, one seed, one learning rate), each a
JSON-ready dict. :func:`execute_task` runs one anywhere (this process, a process pool, a Ray
worker): it records its runs in a private in-memory store and returns them detached
(:class:`TaskOutput`), so that only the driver ever writes the user's SQLite store. The
experiment's :meth:`Experiment.judge` then turns the task results into :class:`Verdict` rows and
:class:`Figure` s. Writing the experiment and its runs to a store, ``verdict.json`` and
``report.html`` is the runner's job (:mod:`gdscope.runner`), one layer up.

    class Width(Experiment):
        name = "width"
        Config = WidthConfig
        def tasks(self, cfg): return [{"width": m} for m in cfg.widths]
        def run_task(self, cfg, task, ctx): ...; return {"width": ..., "rate": ...}
        def judge(self, cfg, results): return Judgement([Verdict(...)], [Figure.of(fig, ...)])
"""

from __future__ import annotations

import base64
import importlib
import io
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import torch

from gdscope.errors import ConfigError, InvalidArgumentError
from gdscope.experiments.config import build, load_toml, merge, parse_assignments, to_dict
from gdscope.store import RunPayload, Store
from gdscope.verdict import Verdict

__all__ = [
    "DataConfig",
    "Executor",
    "Experiment",
    "ExperimentConfig",
    "Figure",
    "Judgement",
    "SerialExecutor",
    "TaskContext",
    "TaskOutput",
    "execute_task",
    "experiment_names",
    "get_experiment",
    "register",
    "resolve",
    "run_tasks",
]


@dataclass(frozen=True)
class ExperimentConfig:
    """Fields every experiment has. ``dtype`` applies to models, data and measurements."""

    seed: int = 0
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float64"


@dataclass(frozen=True)
class DataConfig:
    """A data set of :func:`gdscope.zoo.load_dataset`: ``name``, ``n`` samples, local ``root``."""

    name: str = "digits"
    n: int | None = 256
    root: str | None = None

    def load(
        self, *, seed: int, dtype: torch.dtype, one_hot: bool, flatten: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X, Y)`` from :func:`gdscope.zoo.load_dataset`; a bad data set is a ConfigError."""
        from gdscope.zoo import load_dataset

        try:
            return load_dataset(
                self.name,
                n=self.n,
                seed=seed,
                one_hot=one_hot,
                root=self.root,
                dtype=dtype,
                flatten=flatten,
            )
        except InvalidArgumentError as e:
            raise ConfigError(f"data (name={self.name!r}, n={self.n!r}): {e}") from e


@dataclass(frozen=True)
class Figure:
    """A rendered figure: ``uri`` is a ``data:image/png;base64`` URI, ready for HTML."""

    name: str
    caption: str
    uri: str

    @classmethod
    def of(cls, fig: Any, name: str, caption: str, dpi: int = 110) -> Figure:
        """Render a matplotlib figure (and close it)."""
        import matplotlib.pyplot as plt

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
        plt.close(fig)
        return cls(
            name, caption, f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"
        )

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "caption": self.caption, "uri": self.uri}


@dataclass(frozen=True)
class Judgement:
    """What an experiment concludes: verdict rows and the figures behind them."""

    verdicts: list[Verdict]
    figures: list[Figure] = field(default_factory=list)


@dataclass
class TaskContext:
    """What a task may use: a private store for its runs, the device, dtype and a logger."""

    store: Store
    device: torch.device
    dtype: torch.dtype
    log: Callable[[str], None] = lambda message: None


@dataclass(frozen=True)
class TaskOutput:
    """A finished task: its input, its JSON-ready result, its runs (detached), its wall time."""

    task: dict[str, Any]
    result: dict[str, Any]
    runs: list[RunPayload]
    seconds: float


class Experiment(ABC):
    """One claim, tested: ``tasks`` → ``run_task`` (anywhere, independently) → ``judge``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type[ExperimentConfig]]
    #: ``--set`` overrides that turn the default (2-CPU, minutes) size into the paper's scale.
    paper_scale: ClassVar[dict[str, Any]] = {}

    @abstractmethod
    def tasks(self, cfg: Any) -> list[dict[str, Any]]:
        """The independent units of work, as JSON-ready dicts."""

    @abstractmethod
    def run_task(self, cfg: Any, task: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        """Run one task; record runs in ``ctx.store``; return JSON-ready measurements."""

    @abstractmethod
    def judge(self, cfg: Any, results: list[dict[str, Any]]) -> Judgement:
        """Verdicts and figures from all task results (in the order of :meth:`tasks`)."""


_REGISTRY: dict[str, type[Experiment]] = {}


def register(cls: type[Experiment]) -> type[Experiment]:
    """Class decorator: make an experiment available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def experiment_names() -> list[str]:
    """Names of the built-in experiments."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_experiment(name: str) -> Experiment:
    """The experiment called ``name``."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ConfigError(
            f"experiment={name!r} is unknown: use one of {', '.join(sorted(_REGISTRY))}, "
            "or the path of a TOML config."
        )
    return _REGISTRY[name]()


#: Modules of the built-in experiments (each registers its class on import).
BUILTIN_MODULES = (
    "width",
    "disparity",
    "optimizers",
    "stability",
    "skips",
    "cross_entropy",
    "attention",
    "edge",
)


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(f"gdscope.experiments.{module}")


def resolve(
    config: str | Path | Mapping[str, Any],
    overrides: Sequence[str] | Mapping[str, Any] = (),
) -> tuple[Experiment, ExperimentConfig]:
    """The experiment and its validated config.

    ``config`` is a built-in name (``"width"``), the path of a TOML file, or a mapping; TOML
    and mappings name their experiment in an ``experiment`` field. ``overrides`` are
    ``"key=value"`` strings (``--set``) or a nested mapping, applied last.
    """
    if isinstance(config, Mapping):
        data = dict(config)
    elif isinstance(config, Path) or str(config).endswith(".toml"):
        data = load_toml(config)
    else:
        data = {"experiment": str(config)}
    if not isinstance(overrides, Mapping):
        overrides = parse_assignments(overrides)
    data = merge(data, overrides)
    name = data.pop("experiment", None)
    if not isinstance(name, str):
        raise ConfigError(
            f'experiment: missing or not a string ({name!r}); add experiment = "NAME" with '
            f"NAME one of {', '.join(experiment_names())}."
        )
    exp = get_experiment(name)
    return exp, build(exp.Config, data)


def execute_task(name: str, config: dict[str, Any], task: dict[str, Any]) -> TaskOutput:
    """Run one task of experiment ``name`` in this process; picklable for any executor."""
    exp, cfg = resolve({"experiment": name, **config})
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(
            f"device={cfg.device!r}, but CUDA is not available here: use --device cpu."
        )
    t0 = time.perf_counter()
    with Store(":memory:") as store:
        ctx = TaskContext(store, device, getattr(torch, cfg.dtype))
        result = exp.run_task(cfg, task, ctx)
        runs = [store.export_run(r.id) for r in store.runs()]
    return TaskOutput(task, result, runs, time.perf_counter() - t0)


class Executor(Protocol):
    """Runs ``fn(*args)`` for each ``args``; yields ``(index, output)`` as each finishes."""

    def map(
        self, fn: Callable[..., Any], items: Sequence[tuple[Any, ...]]
    ) -> Iterable[tuple[int, Any]]: ...


class SerialExecutor:
    """Runs everything in this process, in order."""

    def map(
        self, fn: Callable[..., Any], items: Sequence[tuple[Any, ...]]
    ) -> Iterable[tuple[int, Any]]:
        for i, args in enumerate(items):
            yield i, fn(*args)


def run_tasks(
    exp: Experiment,
    cfg: ExperimentConfig,
    executor: Executor | None = None,
    on_task: Callable[[TaskOutput], None] | None = None,
) -> list[TaskOutput]:
    """Run every task of ``exp`` through ``executor`` (serial by default), in task order."""
    tasks = exp.tasks(cfg)
    config = to_dict(cfg)
    outputs: list[TaskOutput | None] = [None] * len(tasks)
    items = [(exp.name, config, task) for task in tasks]
    for i, out in (executor or SerialExecutor()).map(execute_task, items):
        outputs[i] = out
        if on_task is not None:
            on_task(out)
    return [o for o in outputs if o is not None]
