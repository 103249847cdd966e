"""Sweeps: expansion and validation, resuming, failing points, workers killed mid-sweep.

The experiment registered here records one small run per task straight into the task's store
and can misbehave on request: raise, or kill its own worker process (``os._exit``) the first
time it runs (a marker file makes that happen once) or every time. Each execution appends a
line to a counter file, so the tests count executions across processes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gdscope.errors import ConfigError, GdscopeError, InvalidArgumentError
from gdscope.executors import LocalExecutor, RayExecutor, get_executor
from gdscope.experiments import (
    DataConfig,
    Experiment,
    ExperimentConfig,
    Judgement,
    SerialExecutor,
    config_hash,
    register,
)
from gdscope.runner import plan_sweep, run_sweep
from gdscope.store import MetricRow, Store
from gdscope.verdict import Verdict

NAME = "test-sweep-point"
CLAIM = "x is positive"


@dataclass(frozen=True)
class PointConfig(ExperimentConfig):
    x: float = 1.0
    tasks: int = 1
    fail: bool = False
    die: str = ""  # "once" (needs marker) or "always"
    marker: str = ""
    counter: str = ""
    data: DataConfig = field(default_factory=lambda: DataConfig(n=8))


@register
class Point(Experiment):
    name = NAME
    summary = "A test experiment whose tasks can raise or kill their worker."
    Config = PointConfig

    def tasks(self, cfg: PointConfig) -> list[dict]:
        return [{"t": t} for t in range(cfg.tasks)]

    def run_task(self, cfg: PointConfig, task: dict, ctx) -> dict:
        if cfg.die == "always" or (cfg.die == "once" and not os.path.exists(cfg.marker)):
            if cfg.marker:
                Path(cfg.marker).touch()
            os._exit(1)
        if cfg.counter:
            with open(cfg.counter, "a") as f:
                f.write(f"{cfg.x} {task['t']}\n")
        run = ctx.store.create_run(f"x{cfg.x}-t{task['t']}", {"x": cfg.x, **task})
        for step in range(3):
            ctx.store.log_step(run, step, [MetricRow("loss", cfg.x / (step + 1), "loss")])
        ctx.store.finish_run(run, "completed")
        if cfg.fail:
            raise RuntimeError(f"point x={cfg.x} failed on purpose")
        return {"x": cfg.x, "t": task["t"]}

    def judge(self, cfg: PointConfig, results: list[dict]) -> Judgement:
        holds = None if cfg.x == 0 else cfg.x > 0
        return Judgement([Verdict(CLAIM, "x > 0", f"x = {cfg.x:g}", holds, {"x": cfg.x})])


def _executions(counter: Path) -> list[str]:
    return counter.read_text().splitlines() if counter.exists() else []


def _sweep(grid=None, points=None, **base) -> dict:
    spec = {}
    if grid is not None:
        spec["grid"] = grid
    if points is not None:
        spec["points"] = points
    return {"experiment": NAME, **base, "sweep": spec}


# ---------------------------------------------------------------------- expansion and validation
def test_grid_is_a_cartesian_product_with_dotted_and_nested_keys():
    plan = plan_sweep(_sweep(grid={"x": [1.0, 2.0], "data.n": [8, 16]}))
    assert plan.experiment == NAME
    assert [p.values for p in plan.points] == [
        {"x": 1.0, "data.n": 8},
        {"x": 1.0, "data.n": 16},
        {"x": 2.0, "data.n": 8},
        {"x": 2.0, "data.n": 16},
    ]
    assert [p.index for p in plan.points] == [0, 1, 2, 3]
    assert plan.points[1].config["data"] == {"name": "digits", "n": 16, "root": None}
    assert plan.points[1].config_hash == config_hash({"experiment": NAME, **plan.points[1].config})
    nested = plan_sweep(_sweep(grid={"x": [1.0, 2.0], "data": {"n": [8, 16]}}))
    assert [p.config_hash for p in nested.points] == [p.config_hash for p in plan.points]
    assert nested.name == plan.name and plan.name.startswith(f"{NAME}-")
    # another spelling of the same points (ints for floats, defaults spelled out): same name
    same = plan_sweep(_sweep(grid={"data.n": [8, 16], "x": [1, 2]}, tasks=1))
    assert {p.config_hash for p in same.points} == {p.config_hash for p in plan.points}


def test_points_alone_and_points_times_grid():
    plan = plan_sweep(_sweep(points=[{"x": 3.0}, {"x": 4.0, "data.n": 4}], tasks=2))
    assert [p.values for p in plan.points] == [{"x": 3.0}, {"x": 4.0, "data.n": 4}]
    assert [p.config["tasks"] for p in plan.points] == [2, 2]
    both = plan_sweep(_sweep(grid={"tasks": [1, 2]}, points=[{"x": 3.0}, {"x": 4.0}]))
    assert [p.values for p in both.points] == [
        {"x": 3.0, "tasks": 1},
        {"x": 3.0, "tasks": 2},
        {"x": 4.0, "tasks": 1},
        {"x": 4.0, "tasks": 2},
    ]
    # --set applies to the base config
    over = plan_sweep(_sweep(grid={"x": [1.0]}), ["tasks=3"], name="mine")
    assert over.name == "mine" and over.points[0].config["tasks"] == 3


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            _sweep(grid={"x": [1.0, "big"]}),
            r"sweep point 1 \(x=\"big\"\): x: expected a number, got 'big'",
        ),
        (
            _sweep(points=[{"x": 1.0}, {"data.nn": 3}]),
            r"sweep point 1 \(data\.nn=3\): data\.nn: unknown field",
        ),
        (_sweep(grid={"x": 1.0}), r"sweep\.grid\.x: expected a non-empty list of values"),
        (_sweep(grid={"x": []}), r"sweep\.grid\.x: expected a non-empty list"),
        (_sweep(points=[]), r"sweep\.points: expected a non-empty list"),
        (_sweep(points=[3]), r"sweep\.points\[0\]: expected a table"),
        (_sweep(), r"sweep: give grid"),
        ({"experiment": NAME, "sweep": {"grid": {"x": [1]}, "seeds": 2}}, r"sweep\.seeds: unknown"),
        ({"experiment": NAME, "x": 1.0}, r"sweep: missing; .*add a \[sweep\] table"),
        (_sweep(grid={"x": [1.0]}, points=[{"x": 2.0}]), r"x is set by both sweep\.grid"),
        (_sweep(grid={"experiment": ["a", "b"]}), r"experiment cannot vary within a sweep"),
        (_sweep(points=[{"x": 1.0}, {"x": 1}]), r"sweep point 1 \(x=1\): the same config as"),
        (_sweep(grid={"x": [1.0]}, nope=1), r"^nope: unknown field"),
        ({"experiment": "nope", "sweep": {"grid": {"x": [1]}}}, r"experiment='nope' is unknown"),
        (
            _sweep(grid={"data.root": [None, "/no/such/dir"]}),
            r"sweep point 1 .*data\.root='/no/such/dir' is not a directory",
        ),
    ],
)
def test_invalid_sweeps_name_the_point_and_field(tmp_path, config, message):
    with pytest.raises(ConfigError, match=message):
        run_sweep(config, out=tmp_path / "out", executor=SerialExecutor())
    assert not (tmp_path / "out").exists()  # validated before anything was created


def test_sweep_config_from_toml_and_by_name_is_refused(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        f'experiment = "{NAME}"\ntasks = 2\n[sweep]\ngrid = {{ x = [1.0, 2.0], "data.n" = [4] }}\n'
    )
    plan = plan_sweep(path)
    assert [p.values for p in plan.points] == [{"x": 1.0, "data.n": 4}, {"x": 2.0, "data.n": 4}]
    # a built-in name is its base config; without a [sweep] table the error gives a command
    # that works (it used to say "a sweep needs a TOML file")
    with pytest.raises(ConfigError, match=rf"gdscope sweep {NAME} --grid 'seed=\[0, 1\]'"):
        plan_sweep(NAME)
    by_name = plan_sweep(NAME, ["sweep.grid.seed=[0, 1]"])
    assert [p.values for p in by_name.points] == [{"seed": 0}, {"seed": 1}]
    with pytest.raises(InvalidArgumentError, match="name=''"):
        plan_sweep(path, name="")


# ---------------------------------------------------------------------- running
def test_sweep_runs_stores_each_point_and_a_rerun_skips_them(tmp_path):
    counter = tmp_path / "count"
    config = _sweep(grid={"x": [1.0, 2.0], "tasks": [1, 2]}, counter=str(counter))
    seen = []
    res = run_sweep(config, out=tmp_path / "out", executor=SerialExecutor(), on_point=seen.append)
    assert [p.status for p in res.points] == ["completed"] * 4
    assert len(_executions(counter)) == 1 + 2 + 1 + 2 and len(seen) == 4
    assert res.failed == [] and res.experiment == NAME
    with Store(tmp_path / "out" / "runs.db") as store:
        infos = store.experiments(res.name)
        assert len(infos) == 4 and {i.sweep for i in infos} == {res.name}
        assert {i.config_hash for i in infos} == {p.config_hash for p in res.points}
        assert store.sweep_hashes(res.name) == {p.config_hash for p in res.points}
        by_id = {i.id: i for i in infos}
        for p in res.points:
            info = by_id[p.experiment_id]
            assert info.config == p.config and len(info.run_ids) == p.config["tasks"]
            keys = ("claim", "predicted", "measured", "holds", "details")
            assert [{k: v[k] for k in keys} for v in info.verdicts] == [
                {
                    "claim": CLAIM,
                    "predicted": "x > 0",
                    "measured": f"x = {p.config['x']:g}",
                    "holds": True,
                    "details": {"x": p.config["x"]},
                }
            ]
        assert len(store.runs()) == 6
    data = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert data["sweep"] == res.name and len(data["points"]) == 4
    assert {"index", "values", "config", "config_hash", "status", "verdicts"} <= set(
        data["points"][0]
    )
    page = (tmp_path / "out" / "sweep.html").read_text()
    assert "<section id='points'>" in page and page.count("<section class='point'") == 4
    for p in res.points:
        assert f"href='#point-{p.experiment_id}'" in page
        assert f"id='point-{p.experiment_id}'" in page
    assert "<th>x</th>" in page and "<th>tasks</th>" in page and "<th>seed</th>" not in page

    again = run_sweep(config, out=tmp_path / "out", executor=SerialExecutor())
    assert again.name == res.name and [p.status for p in again.points] == ["stored"] * 4
    assert [p.experiment_id for p in again.points] == [p.experiment_id for p in res.points]
    assert again.points[0].verdicts[0]["holds"] is True
    assert len(_executions(counter)) == 6  # nothing ran again

    # extending the grid under the same name runs only the new points
    wider = _sweep(grid={"x": [1.0, 2.0, 3.0], "tasks": [1, 2]}, counter=str(counter))
    more = run_sweep(wider, out=tmp_path / "out", executor=SerialExecutor(), name=res.name)
    assert [p.status for p in more.points].count("completed") == 2
    assert len(_executions(counter)) == 6 + 3
    with Store(tmp_path / "out" / "runs.db") as store:
        assert len(store.experiments(res.name)) == 6


def test_a_failing_point_is_reported_and_nothing_of_it_stored(tmp_path):
    config = _sweep(points=[{"x": 1.0}, {"x": 2.0, "fail": True}, {"x": 0.0}], tasks=2)
    res = run_sweep(config, out=tmp_path, executor=SerialExecutor())
    assert [p.status for p in res.points] == ["completed", "failed", "completed"]
    (bad,) = res.failed
    assert bad.index == 1 and bad.experiment_id is None
    assert bad.error.startswith("RuntimeError: point x=2.0 failed on purpose\n")
    assert "Traceback" in bad.error and "in run_task" in bad.error
    assert res.points[2].verdicts[0]["holds"] is None
    with Store(tmp_path / "runs.db") as store:
        assert len(store.experiments(res.name)) == 2
        # the failing point's first task recorded a run in its private store: not kept
        assert sorted(r.name for r in store.runs()) == ["x0.0-t0", "x0.0-t1", "x1.0-t0", "x1.0-t1"]
    page = (tmp_path / "sweep.html").read_text()
    assert "<section id='failures'>" in page and "failed on purpose" in page
    assert "<th>x</th>" in page and "<th>fail</th>" in page and "<th>tasks</th>" not in page
    assert "? undetermined" in page
    assert json.loads((tmp_path / "sweep.json").read_text())["points"][1]["status"] == "failed"


# ---------------------------------------------------------------------- executors
def test_get_executor():
    assert isinstance(get_executor("serial"), SerialExecutor)
    local = get_executor("local", workers=3)
    assert isinstance(local, LocalExecutor) and local.workers == 3
    ray = get_executor("ray", address="auto", workers=2)
    assert isinstance(ray, RayExecutor) and ray.address == "auto" and ray._ray is None
    with pytest.raises(InvalidArgumentError, match="executor='dask' is unknown"):
        get_executor("dask")
    with pytest.raises(InvalidArgumentError, match="applies only to executor='ray'"):
        get_executor("local", address="auto")
    with pytest.raises(InvalidArgumentError, match="workers=0 must be at least 1"):
        LocalExecutor(0)
    with pytest.raises(InvalidArgumentError, match="retries=-1"):
        RayExecutor(retries=-1)


def test_ray_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(InvalidArgumentError, match=r"pip install 'gdscope\[ray\]'"):
        RayExecutor().start()


def test_local_executor_retries_a_killed_worker_and_stores_once(tmp_path):
    counter, marker = tmp_path / "count", tmp_path / "died"
    config = _sweep(
        points=[{"x": 1.0}, {"x": 2.0, "die": "once", "marker": str(marker)}, {"x": 3.0}],
        counter=str(counter),
    )
    res = run_sweep(config, out=tmp_path / "out", executor=LocalExecutor(workers=2))
    assert marker.exists()  # the worker of point 1 did die once
    assert [p.status for p in res.points] == ["completed"] * 3
    runs = _executions(counter)
    assert sorted(set(runs)) == ["1.0 0", "2.0 0", "3.0 0"] and runs.count("2.0 0") == 1
    with Store(tmp_path / "out" / "runs.db") as store:
        assert len(store.experiments(res.name)) == 3 and len(store.runs()) == 3

    # a worker that always dies: given up after `retries`, the error names the item;
    # what finished is stored and the pages are written
    dying = _sweep(points=[{"x": 5.0}, {"x": 6.0, "die": "always"}])
    with pytest.raises(GdscopeError, match=r"lost its worker process 2 times"):
        run_sweep(dying, out=tmp_path / "d", executor=LocalExecutor(workers=1, retries=1))
    status = [
        p["status"] for p in json.loads((tmp_path / "d" / "sweep.json").read_text())["points"]
    ]
    assert status == ["completed", "pending"]


# ---------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_executor():
    pytest.importorskip("ray")
    ex = RayExecutor(workers=2)
    ex.start()
    yield ex
    ex.close()


def test_ray_retries_a_killed_worker_and_stores_once(ray_executor, tmp_path):
    counter, marker = tmp_path / "count", tmp_path / "died"
    config = _sweep(
        points=[{"x": 1.0}, {"x": 2.0, "die": "once", "marker": str(marker)}, {"x": 3.0}],
        counter=str(counter),
        tasks=2,
    )
    res = run_sweep(config, out=tmp_path / "out", executor=ray_executor)
    assert marker.exists()
    assert [p.status for p in res.points] == ["completed"] * 3
    assert sorted(_executions(counter)) == ["1.0 0", "1.0 1", "2.0 0", "2.0 1", "3.0 0", "3.0 1"]
    with Store(tmp_path / "out" / "runs.db") as store:
        assert len(store.experiments(res.name)) == 3 and len(store.runs()) == 6
    again = run_sweep(config, out=tmp_path / "out", executor=ray_executor)
    assert [p.status for p in again.points] == ["stored"] * 3


def test_ray_task_errors_come_back_as_themselves(ray_executor, tmp_path):
    config = _sweep(points=[{"x": 1.0}, {"x": 2.0, "fail": True}])
    res = run_sweep(config, out=tmp_path, executor=ray_executor)
    assert [p.status for p in res.points] == ["completed", "failed"]
    assert "failed on purpose" in res.failed[0].error
    from gdscope.runner import run_experiment

    with pytest.raises(RuntimeError, match="failed on purpose"):
        run_experiment(NAME, ["fail=true"], out=tmp_path / "e", executor=ray_executor)
