"""Run an experiment, or a sweep of them, and keep everything: store, verdicts, HTML pages.

    result = run_experiment("width", ["widths=[32, 64]"], out="width_out")
    result.verdicts            # [Verdict(claim, predicted, measured, holds, details), ...]
    # width_out/runs.db (the experiment and its runs), verdict.json, report.html

    sweep = run_sweep("lr_sweep.toml", out="sweep_out", executor=RayExecutor())
    # sweep_out/runs.db (one experiment per point), sweep.json, sweep.html

A sweep config is an experiment config plus a ``[sweep]`` table::

    experiment = "width"
    widths = [64]
    [sweep]
    grid = { lr_scale = [0.25, 0.5], "data.n" = [64, 128] }  # the product: 4 points
    points = [ { seed = 0 }, { seed = 1 } ]            # each combined with every grid point

``grid`` alone gives its product, ``points`` alone the listed points, both the listed points ×
the grid product; keys are dotted field paths. Every point is validated before anything runs.
A point is identified by the hash of its full canonical config (defaults included); a sweep by
its name (default: the experiment's name and a hash of its points' hashes). A rerun of the same
sweep skips the points already stored (to extend a sweep, rerun it under the same ``name``),
and a point whose worker died and was run again is stored once. Only this process (the
driver) writes the store: one transaction per point, as each arrives; a point that raises is
reported and leaves nothing in the store. A built-in experiment's name is a sweep config too,
with the sweep given as overrides: ``run_sweep("width", ["sweep.grid.seed=[0, 1]"])``
(``gdscope sweep width --grid 'seed=[0, 1]'``); an empty ``grid`` is refused.

Output files are checked before anything runs (:func:`gdscope.store.check_output`): none may
be the store, and an existing one must be an output gdscope wrote (``verdict.json``'s list of
verdicts, ``sweep.json``'s ``"generator": "gdscope"``, a page's generator meta tag). A command
that fails removes the store and output folder it created if it left them empty, and ``--set
experiment=...`` is refused (the experiment is the config's, not an override's).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gdscope.errors import ConfigError, GdscopeError, InvalidArgumentError
from gdscope.executors import LocalExecutor, RayExecutor
from gdscope.experiments import (
    DataConfig,
    Executor,
    Experiment,
    ExperimentConfig,
    Figure,
    TaskOutput,
    config_hash,
    experiment_names,
    load_toml,
    parse_assignments,
    resolve,
    run_tasks,
    to_dict,
)
from gdscope.experiments.config import merge
from gdscope.store import (
    OutputKind,
    RunPayload,
    Store,
    check_name,
    check_output,
    write_output,
)
from gdscope.verdict import Verdict

__all__ = [
    "ExperimentResult",
    "PointOutput",
    "SweepPlan",
    "SweepPoint",
    "SweepResult",
    "plan_sweep",
    "run_experiment",
    "run_point",
    "run_sweep",
]

log = logging.getLogger(__name__)

#: A failed sweep point keeps at most this many characters of its traceback.
_TRACE_CHARS = 4000

PathLike = str | Path
StoreLike = Store | str | Path


@dataclass(frozen=True)
class ExperimentResult:
    """A finished experiment: its validated config, verdicts, figures and where it was written.

    ``results`` are the task results in task order (what :meth:`Experiment.judge` saw);
    ``experiment_id`` and ``run_ids`` are ``None``/empty when nothing was stored; ``paths``
    maps ``"store"``, ``"verdict"`` and ``"report"`` to the files written.
    """

    name: str
    config: dict[str, Any]
    config_hash: str
    verdicts: list[Verdict]
    figures: list[Figure]
    results: list[dict[str, Any]]
    experiment_id: int | None
    run_ids: list[int]
    paths: dict[str, Path]
    seconds: float


@dataclass(frozen=True)
class PointOutput:
    """One experiment run to completion anywhere, as plain picklable data (for the driver)."""

    name: str
    config: dict[str, Any]
    config_hash: str
    verdicts: list[dict[str, Any]]
    figures: list[dict[str, str]]
    results: list[dict[str, Any]]
    runs: list[RunPayload]
    seconds: float


PointStatus = Literal["pending", "completed", "stored", "failed"]


@dataclass(frozen=True)
class SweepPoint:
    """One point of a sweep.

    ``values`` are the dotted fields the sweep set for it; ``status`` is ``"completed"`` (run
    and stored now), ``"stored"`` (stored by an earlier run, skipped), ``"failed"`` (``error``
    says why; nothing stored) or ``"pending"`` (planned, not run).
    """

    index: int
    values: dict[str, Any]
    config: dict[str, Any]
    config_hash: str
    status: PointStatus = "pending"
    experiment_id: int | None = None
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The point as JSON-ready data (for ``sweep.json``)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class SweepResult:
    """A sweep: its name (the store's ``sweep`` column), experiment, points and files."""

    name: str
    experiment: str
    points: list[SweepPoint]
    paths: dict[str, Path]
    seconds: float

    @property
    def failed(self) -> list[SweepPoint]:
        """The points that failed in this run."""
        return [p for p in self.points if p.status == "failed"]


# ---------------------------------------------------------------------------------- one experiment
def _check_ready(cfg: ExperimentConfig, cuda_here: bool, where: str = "") -> None:
    """Refuse early what would fail in every task: a missing data directory, absent CUDA.

    ``cuda_here``: the tasks run on this machine, so a CUDA device must be available here.
    """
    for path, value in _walk(cfg):
        root = value.root if isinstance(value, DataConfig) else None
        if root is not None and not Path(root).expanduser().is_dir():
            raise ConfigError(
                f"{where}{path}.root={root!r} is not a directory: create it and put the "
                f"{value.name} files there, or fix --set {path}.root=DIR."
            )
    if cuda_here and str(cfg.device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise InvalidArgumentError(
                f"{where}device={cfg.device!r}, but CUDA is not available here: use --device cpu "
                "(or --set device=cpu)."
            )


def _walk(obj: Any, path: str = "") -> list[tuple[str, Any]]:
    """``(dotted path, value)`` of every dataclass inside ``obj``, ``obj`` included."""
    out = [(path, obj)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out += _walk(value, f"{path}.{f.name}" if path else f.name)
    return out


def _identity(exp: Experiment, cfg: ExperimentConfig) -> tuple[dict[str, Any], str]:
    """The canonical config (defaults included) and its hash (the experiment's name included)."""
    config = to_dict(cfg)
    return config, config_hash({"experiment": exp.name, **config})


def _package(
    exp: Experiment, cfg: ExperimentConfig, outputs: Sequence[TaskOutput], seconds: float
) -> PointOutput:
    """Judge the task outputs and pack everything as plain data."""
    judgement = exp.judge(cfg, [o.result for o in outputs])
    config, chash = _identity(exp, cfg)
    return PointOutput(
        name=exp.name,
        config=config,
        config_hash=chash,
        verdicts=[v.to_dict() for v in judgement.verdicts],
        figures=[f.to_dict() for f in judgement.figures],
        results=[o.result for o in outputs],
        runs=[run for o in outputs for run in o.runs],
        seconds=seconds,
    )


def run_point(name: str, config: Mapping[str, Any]) -> PointOutput:
    """Run every task of experiment ``name`` here, in order, and judge: one sweep point.

    Picklable, for executors: ``config`` is the experiment's config as plain data.
    """
    t0 = time.perf_counter()
    exp, cfg = resolve({**config, "experiment": name})
    outputs = run_tasks(exp, cfg)
    return _package(exp, cfg, outputs, time.perf_counter() - t0)


def _store(point: PointOutput, store: Store, sweep: str | None = None) -> int | None:
    return store.add_experiment(
        point.name,
        point.config,
        point.config_hash,
        status="completed",
        verdicts=point.verdicts,
        results=point.results,
        figures=point.figures,
        runs=point.runs,
        sweep=sweep,
        seconds=point.seconds,
    )


def _start(executor: Executor | None) -> None:
    """Connect an executor that has a ``start`` (Ray) before anything is written."""
    start = getattr(executor, "start", None)
    if callable(start):
        start()


def _out_dir(out: PathLike) -> tuple[Path, bool]:
    """``(folder, made)``: the output folder, created if needed, and whether this call made it."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise InvalidArgumentError(
            f"out={str(out)!r} is a file, not a folder: pass a folder (new or existing) for "
            "the outputs, e.g. --out gdscope_out."
        )
    made = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InvalidArgumentError(
            f"out={str(out)!r}: cannot create the output folder ({e}); pass a writable path."
        ) from e
    return path, made


@dataclass
class _Workspace:
    """Where a command writes: its output folder and store, and what it created itself."""

    folder: Path | None
    db: Store | None
    store_path: Path | None
    created_store: bool

    def protect(self) -> list[Path]:
        return [self.store_path] if self.store_path is not None else []

    def write_json(self, name: str, data: Any) -> Path:
        """Write ``folder/name`` (never over the store or a file gdscope did not write)."""
        assert self.folder is not None
        text = json.dumps(data, indent=2, default=str) + "\n"
        return write_output(self.folder / name, text, "json", protect=self.protect(), arg="out")

    def store_kept(self) -> bool:
        """False when the store is one this command created and nothing was stored in it."""
        return not (self.created_store and self.db is not None and self.db.is_empty())


@contextmanager
def _workspace(
    out: PathLike | None,
    store: StoreLike | None,
    files: Mapping[str, OutputKind],
    executor: Executor | None,
) -> Iterator[_Workspace]:
    """Check every output path, start the executor, open the store; undo what is left empty.

    The output files (``files``, under ``out``) are checked before anything runs: none may be
    the store, and an existing one must be an output gdscope wrote. On exit a store this call
    created and left empty (a failed command) is removed, and so is an output folder it created
    and left empty.
    """
    folder, made = _out_dir(out) if out is not None else (None, False)
    ws = _Workspace(folder, None, None, False)
    owned = False
    try:
        if isinstance(store, Store):
            ws.db = store
            ws.store_path = store.path if isinstance(store.path, Path) else None
        elif store is not None and str(store) != ":memory:":
            ws.store_path = Path(store)
        elif store is None and folder is not None:
            ws.store_path = folder / "runs.db"
        if folder is not None:
            for name, kind in files.items():
                check_output(folder / name, kind, protect=ws.protect(), arg="out")
        _start(executor)
        if ws.db is None and (store is not None or folder is not None):
            path = ws.store_path if ws.store_path is not None else ":memory:"
            ws.created_store = ws.store_path is not None and not ws.store_path.exists()
            ws.db = Store(path)
            owned = True
        yield ws
    finally:
        if owned and ws.db is not None:
            try:
                remove = not ws.store_kept()
            except GdscopeError:
                remove = False
            ws.db.close()
            if remove and ws.store_path is not None:
                for suffix in ("", "-wal", "-shm"):
                    ws.store_path.with_name(ws.store_path.name + suffix).unlink(missing_ok=True)
        if made and folder is not None and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _overrides(overrides: Sequence[str] | Mapping[str, Any]) -> dict[str, Any]:
    """``--set`` strings or a mapping as a nested mapping; the experiment cannot be overridden."""
    data = dict(overrides) if isinstance(overrides, Mapping) else parse_assignments(overrides)
    if "experiment" in data:
        raise ConfigError(
            f"--set experiment={data['experiment']!r}: the experiment is chosen by the "
            "EXPERIMENT argument (or the config's experiment field), not by --set. Run "
            f"gdscope run {data['experiment']} (with your other --set options) instead."
        )
    return data


def run_experiment(
    config: PathLike | Mapping[str, Any],
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    out: PathLike | None = "gdscope_out",
    store: StoreLike | None = None,
    executor: Executor | None = None,
    on_task: Callable[[TaskOutput], None] | None = None,
) -> ExperimentResult:
    """Run an experiment: validate → tasks (through ``executor``) → judge → store and pages.

    Args:
        config: a built-in name (``"width"``), a TOML path or a mapping naming ``experiment``.
        overrides: ``"key=value"`` strings (``--set``) or a nested mapping, applied last.
        out: folder for ``runs.db`` (unless ``store`` is given), ``verdict.json`` (a list of
            ``{claim, predicted, measured, holds, details}``) and ``report.html``; ``None``
            writes no files.
        store: a :class:`~gdscope.store.Store` or a path (default ``out/runs.db``); the
            experiment and all its runs are written in one transaction once every task is done.
        executor: where the tasks run (default: this process, in order).
        on_task: called with each finished task (progress).

    Nothing is written when the config is invalid or a task fails.
    """
    t0 = time.perf_counter()
    if isinstance(config, (Mapping, Path)) or str(config).endswith(".toml"):
        config = _load(config)
        if "sweep" in config:
            raise ConfigError(
                "sweep: this config is a sweep (it has a [sweep] table): run it with run_sweep "
                "(gdscope sweep CONFIG), or remove the table."
            )
    exp, cfg = resolve(config, _overrides(overrides))
    _check_ready(cfg, not isinstance(executor, RayExecutor))
    files: dict[str, OutputKind] = {"verdict.json": "json", "report.html": "html"}
    with _workspace(out, store, files, executor) as ws:
        folder, db = ws.folder, ws.db
        outputs = run_tasks(exp, cfg, executor, on_task)
        point = _package(exp, cfg, outputs, time.perf_counter() - t0)
        paths: dict[str, Path] = {}
        exp_id: int | None = None
        run_ids: list[int] = []
        if db is not None:
            exp_id = _store(point, db)
            if isinstance(db.path, Path):
                paths["store"] = db.path
        if db is not None and exp_id is not None:
            run_ids = db.experiment(exp_id).run_ids
        if folder is not None:
            paths["verdict"] = ws.write_json("verdict.json", point.verdicts)
            if db is not None and exp_id is not None:
                # imported here: the report imports gdscope, whose __init__ imports this module
                from gdscope.report.experiment import write_experiment_report

                paths["report"] = write_experiment_report(db, exp_id, folder / "report.html")
    return ExperimentResult(
        name=exp.name,
        config=point.config,
        config_hash=point.config_hash,
        verdicts=[Verdict.from_dict(v) for v in point.verdicts],
        figures=[Figure(**f) for f in point.figures],
        results=point.results,
        experiment_id=exp_id,
        run_ids=run_ids,
        paths=paths,
        seconds=time.perf_counter() - t0,
    )


# ---------------------------------------------------------------------------------- sweeps
def _flatten(table: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    """``{"data": {"n": 1}, "lr": 2}`` → ``{"data.n": 1, "lr": 2}`` (dotted keys kept)."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{path}.{key}" if path else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def _nest(values: Mapping[str, Any]) -> dict[str, Any]:
    """``{"data.n": 1}`` → ``{"data": {"n": 1}}``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _describe(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in values.items()) or "the base config"


def _sweep_spec(spec: Any) -> list[dict[str, Any]]:
    """The dotted ``values`` of every point of a ``[sweep]`` table, in order."""
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"sweep: expected a table with grid and/or points, got {spec!r}; e.g. "
            "[sweep] grid = { lr = [0.1, 0.2] }."
        )
    unknown = sorted(set(spec) - {"grid", "points"})
    if unknown:
        raise ConfigError(
            f"sweep.{unknown[0]}: unknown field. Known fields of sweep: grid, points."
        )
    if "grid" not in spec and "points" not in spec:
        raise ConfigError(
            "sweep: give grid = { FIELD = [values] } and/or points = [ { FIELD = value } ]."
        )
    grid_table = spec.get("grid", {})
    if not isinstance(grid_table, Mapping):
        raise ConfigError(f"sweep.grid: expected a table of FIELD = [values], got {grid_table!r}.")
    grid = _flatten(grid_table)
    if "grid" in spec and not grid:
        raise ConfigError(
            f"sweep.grid: {grid_table!r} is empty, a grid with no points (the sweep would run "
            "only the base config): add FIELD = [values], e.g. grid = { seed = [0, 1] }, or "
            "remove grid and list points."
        )
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"sweep.grid.{key}: expected a non-empty list of values, got {values!r}."
            )
    listed = spec.get("points", [{}])
    if not isinstance(listed, list) or not listed:
        raise ConfigError(f"sweep.points: expected a non-empty list of tables, got {listed!r}.")
    points = []
    for i, point in enumerate(listed):
        if not isinstance(point, Mapping):
            raise ConfigError(f"sweep.points[{i}]: expected a table of fields, got {point!r}.")
        points.append(_flatten(point))
    out = []
    for i, point in enumerate(points):
        for combo in itertools.product(*grid.values()):
            values = dict(zip(grid, combo, strict=True))
            both = sorted(set(point) & set(values))
            if both:
                raise ConfigError(
                    f"sweep: {both[0]} is set by both sweep.grid and sweep.points[{i}]; set it "
                    "in one place."
                )
            out.append({**point, **values})
    for values in out:
        for key in values:
            if key.split(".")[0] in ("experiment", "sweep"):
                raise ConfigError(
                    f"sweep: {key} cannot vary within a sweep; run one sweep per experiment."
                )
    return out


def _load(config: PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """A mapping as is, a TOML file read, a built-in experiment's name as its base config."""
    if isinstance(config, Mapping):
        return dict(config)
    text = str(config)
    if text.endswith(".toml") or Path(text).is_file() or text not in experiment_names():
        return load_toml(config)
    return {"experiment": text}


def _sweep_advice(experiment: Any) -> str:
    """A command that runs a sweep of ``experiment`` (every experiment has a ``seed``)."""
    name = experiment if isinstance(experiment, str) and experiment else "NAME"
    return (
        f"gdscope sweep {name} --grid 'seed=[0, 1]' (--grid FIELD=[values], repeatable; or "
        "--set 'sweep.grid.seed=[0, 1]')"
    )


@dataclass(frozen=True)
class SweepPlan:
    """A sweep expanded and validated: the experiment's name, the sweep's name, its points."""

    experiment: str
    name: str
    points: list[SweepPoint]


def plan_sweep(
    config: PathLike | Mapping[str, Any],
    overrides: Sequence[str] | Mapping[str, Any] = (),
    name: str | None = None,
    *,
    cuda_here: bool = False,
) -> SweepPlan:
    """Expand and validate every point of a sweep config; run nothing.

    Raises :class:`~gdscope.errors.ConfigError` naming the point and the field path for the
    first invalid point, or naming two points that are the same config. ``cuda_here`` also
    requires CUDA on this machine for points on a CUDA device.
    """
    data = merge(_load(config), _overrides(overrides))
    if "sweep" not in data:
        raise ConfigError(
            "sweep: missing; a sweep needs the points to run: add a [sweep] table to the "
            "config (e.g. [sweep] grid = { seed = [0, 1] }), or give them on the command line: "
            f"{_sweep_advice(data.get('experiment'))}. To run one experiment use gdscope run."
        )
    all_values = _sweep_spec(data.pop("sweep"))
    exp, base = resolve(data)
    _check_ready(base, cuda_here)
    points: list[SweepPoint] = []
    seen: dict[str, int] = {}
    for i, values in enumerate(all_values):
        where = f"sweep point {i} ({_describe(values)}): "
        try:
            _, cfg = resolve(merge(data, _nest(values)))
        except ConfigError as e:
            raise ConfigError(f"{where}{e}") from e
        _check_ready(cfg, cuda_here, where)
        full, chash = _identity(exp, cfg)
        if chash in seen:
            raise ConfigError(
                f"{where}the same config as sweep point {seen[chash]}; remove one of them."
            )
        seen[chash] = i
        points.append(SweepPoint(i, values, full, chash))
    if name is None:
        name = f"{exp.name}-{config_hash({'points': [p.config_hash for p in points]})[:12]}"
    elif not isinstance(name, str) or not name.strip():
        raise InvalidArgumentError(f"name={name!r} must be a non-empty string or None.")
    else:
        check_name(name)
    return SweepPlan(exp.name, name, points)


def _attempt(name: str, config: dict[str, Any]) -> tuple[PointOutput | None, str | None]:
    """Run one sweep point in a worker: ``(output, None)``, or ``(None, error)`` if it raised."""
    try:
        return run_point(name, config), None
    except Exception as e:  # a point's failure is reported, not fatal to the sweep
        trace = "".join(traceback.format_exception(e))
        return None, f"{type(e).__name__}: {e}\n\n{trace[-_TRACE_CHARS:]}"


def run_sweep(
    config: PathLike | Mapping[str, Any],
    overrides: Sequence[str] | Mapping[str, Any] = (),
    *,
    out: PathLike = "gdscope_out",
    store: StoreLike | None = None,
    executor: Executor | None = None,
    name: str | None = None,
    on_point: Callable[[SweepPoint], None] | None = None,
) -> SweepResult:
    """Run every point of a sweep config (see the module docstring); skip those stored.

    Args:
        config: a TOML path or mapping: an experiment config plus a ``[sweep]`` table.
        overrides: ``--set`` strings or a mapping, applied to the base config.
        out: folder for ``runs.db`` (unless ``store``), ``sweep.json`` and ``sweep.html``.
        store: a :class:`~gdscope.store.Store` or a path (default ``out/runs.db``).
        executor: where the points run, each point's tasks serially in one worker (default
            :class:`~gdscope.executors.LocalExecutor` over all CPUs; its ``retries`` rerun a
            point whose worker died).
        name: the sweep's name in the store (default: experiment name + a hash of the points).
        on_point: called with each point as it completes or fails (progress).

    Points that fail are in :attr:`SweepResult.failed` (nothing of them stored); if the executor
    gives up (a worker lost more than ``retries`` times) the pages are written and the error
    raised: a rerun resumes where it stopped.
    """
    t0 = time.perf_counter()
    plan = plan_sweep(config, overrides, name, cuda_here=not isinstance(executor, RayExecutor))
    files: dict[str, OutputKind] = {"sweep.json": "json", "sweep.html": "html"}
    with _workspace(out, store, files, executor) as ws:
        assert ws.db is not None
        db = ws.db
        points = list(plan.points)
        stored = {e.config_hash: e for e in db.experiments(plan.name)}
        for i, p in enumerate(points):
            if p.config_hash in stored:
                info = stored[p.config_hash]
                points[i] = dataclasses.replace(
                    p, status="stored", experiment_id=info.id, verdicts=info.verdicts
                )
        todo = [p for p in points if p.status == "pending"]
        log.info("sweep %s: %d points, %d to run", plan.name, len(points), len(todo))
        error: GdscopeError | None = None
        if todo:
            runner = executor if executor is not None else LocalExecutor()
            items = [(plan.experiment, p.config) for p in todo]
            try:
                for k, (output, failure) in runner.map(_attempt, items):
                    point = todo[k]
                    if output is None:
                        point = dataclasses.replace(point, status="failed", error=failure)
                    else:
                        exp_id = _store(output, db, plan.name)
                        point = dataclasses.replace(
                            point,
                            status="completed" if exp_id is not None else "stored",
                            experiment_id=exp_id,
                            verdicts=output.verdicts,
                            seconds=output.seconds,
                        )
                    points[point.index] = point
                    if on_point is not None:
                        on_point(point)
            except GdscopeError as e:
                error = e
        result = SweepResult(plan.name, plan.experiment, points, {}, time.perf_counter() - t0)
        paths = _write_sweep_files(result, ws)
    if error is not None:
        raise error
    return dataclasses.replace(result, paths=paths, seconds=time.perf_counter() - t0)


def _write_sweep_files(result: SweepResult, ws: _Workspace) -> dict[str, Path]:
    from gdscope.report.experiment import write_sweep_report  # see run_experiment

    db, folder = ws.db, ws.folder
    assert db is not None and folder is not None
    paths: dict[str, Path] = {}
    if isinstance(db.path, Path) and ws.store_kept():
        paths["store"] = db.path
    paths["json"] = ws.write_json(
        "sweep.json",
        {
            "generator": "gdscope",
            "sweep": result.name,
            "experiment": result.experiment,
            "points": [p.to_dict() for p in result.points],
        },
    )
    failures = [p.to_dict() for p in result.points if p.status == "failed"]
    paths["report"] = write_sweep_report(db, result.name, folder / "sweep.html", failures)
    return paths
