"""``gdscope run`` and ``gdscope sweep`` end to end, with an experiment registered here."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from typer.testing import CliRunner

from gdscope.cli import app
from gdscope.experiments import (
    DataConfig,
    Experiment,
    ExperimentConfig,
    Judgement,
    register,
)
from gdscope.store import MetricRow, Store
from gdscope.verdict import Verdict
from gdscope.zoo import load_dataset

runner = CliRunner(env={"COLUMNS": "200"})
NAME = "test-cli-tiny"
CLAIM = "the decay rate is below one"


@dataclass(frozen=True)
class CliConfig(ExperimentConfig):
    rates: tuple[float, ...] = (0.5,)
    fail: bool = False
    data: DataConfig = field(default_factory=lambda: DataConfig(n=8))


@register
class CliTiny(Experiment):
    name = NAME
    summary = "Geometric decay x_t = r^t goes to zero when r < 1 (a CLI test experiment)."
    Config = CliConfig
    paper_scale: ClassVar[dict] = {"rates": [0.5, 0.9, 0.99]}

    def tasks(self, cfg: CliConfig) -> list[dict]:
        return [{"rate": r} for r in cfg.rates]

    def run_task(self, cfg: CliConfig, task: dict, ctx) -> dict:
        if cfg.fail:
            raise RuntimeError("this point fails on purpose")
        X, _ = load_dataset(cfg.data.name, n=cfg.data.n, root=cfg.data.root, dtype=ctx.dtype)
        run = ctx.store.create_run(f"decay-{task['rate']}", {**task, "samples": X.shape[0]})
        for t in range(4):
            ctx.store.log_step(run, t, [MetricRow("loss", task["rate"] ** t, "loss")])
        ctx.store.finish_run(run, "completed")
        return {"rate": task["rate"], "last": task["rate"] ** 3}

    def judge(self, cfg: CliConfig, results: list[dict]) -> Judgement:
        worst = max(r["rate"] for r in results)
        why = f"largest rate {worst:g} {'<' if worst < 1 else '≥'} 1"
        return Judgement([Verdict(CLAIM, "r < 1", f"max r = {worst:g}", worst < 1, reason=why)])


def _experiments(db) -> list:
    with Store(db) as store:
        return store.experiments()


def test_run_prints_verdicts_and_writes_everything(tmp_path):
    out = tmp_path / "out"
    before = torch.get_num_threads()
    res = runner.invoke(app, ["run", NAME, "--set", "rates=[0.5, 0.8]", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert CLAIM in res.output and "max r = 0.8" in res.output and "✔ holds" in res.output
    assert "largest rate 0.8 < 1" in res.output  # the reason beside the mark
    # serial: threads chosen from the free CPUs, said, recorded with each run, then restored
    assert "threads: " in res.output and "allowed" in res.output
    assert torch.get_num_threads() == before
    with Store(out / "runs.db") as store:
        envs = [store.run(r).environment for r in store.experiments()[0].run_ids]
    assert all(e["thread_choice"]["threads"] >= 1 for e in envs)
    listed = runner.invoke(app, ["runs", "--store", str(out / "runs.db")]).output
    assert "why it stopped" in listed and "completed 4 steps" in listed
    assert 'task {"rate": 0.8} done' in res.output
    for name in ("runs.db", "verdict.json", "report.html"):
        assert (out / name).exists() and str(out / name) in res.output
    (info,) = _experiments(out / "runs.db")
    assert info.name == NAME and info.config["rates"] == [0.5, 0.8] and len(info.run_ids) == 2
    assert json.loads((out / "verdict.json").read_text())[0]["holds"] is True

    page = tmp_path / "exp.html"
    res = runner.invoke(
        app,
        [
            "report",
            str(info.id),
            "--experiment",
            "--store",
            str(out / "runs.db"),
            "--out",
            str(page),
        ],
    )
    assert res.exit_code == 0, res.output
    assert CLAIM in page.read_text() and "decay-0.8" in page.read_text()


def test_run_from_a_toml_config_with_device_and_local_executor(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'experiment = "{NAME}"\nrates = [0.25, 1.5]\n')
    out = tmp_path / "out"
    args = ["run", str(config), "--device", "cpu", "--executor", "local", "--workers", "2"]
    res = runner.invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "max r = 1.5" in res.output and "✘ fails" in res.output
    (info,) = _experiments(out / "runs.db")
    assert info.config["device"] == "cpu" and info.verdicts[0]["holds"] is False


def test_run_list():
    res = runner.invoke(app, ["run", "--list"])
    assert res.exit_code == 0, res.output
    assert NAME in res.output and "Geometric decay" in res.output
    assert "rates=[0.5, 0.9, 0.99]" in res.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run"], "missing EXPERIMENT"),
        (["run", "nope"], "experiment='nope' is unknown"),
        (["run", NAME, "--set", "colour=red"], "colour: unknown field"),
        (["run", NAME, "--set", "rates=fast"], "rates: expected a list, got 'fast'"),
        (["run", NAME, "--set", "rates=[0.5, 'x']"], "rates[1]: expected a number"),
        (["run", NAME, "--set", "novalue"], "expected KEY=VALUE"),
        (["run", NAME, "--set", "data.root=/no/such/dir"], "data.root='/no/such/dir' is not a"),
        (["run", NAME, "--device", "tpu"], "--device 'tpu': use cpu, cuda or cuda:N"),
        (["run", NAME, "--executor", "dask"], "executor='dask' is unknown"),
        (["run", NAME, "--address", "auto"], "applies only to executor='ray'"),
        (["run", "missing.toml"], "config file missing.toml does not exist"),
    ],
)
def test_run_errors_exit_2_and_store_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    res = runner.invoke(app, [*args, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and message in " ".join(res.output.split())
    assert not (out / "runs.db").exists()


def test_missing_data_files_exit_2_and_store_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for sets, message in (
        (["data.name=mnist"], "MNIST is read from local files and never downloaded"),
        (["data.name=mnist", f"data.root={empty}"], "MNIST"),
    ):
        args = ["run", NAME, *(a for s in sets for a in ("--set", s))]
        res = runner.invoke(app, [*args, "--out", str(tmp_path / "out")])
        assert res.exit_code == 2, res.output
        assert message in " ".join(res.output.split())
        # nothing is left behind: no empty runs.db (it used to stay), no empty folder
        assert not (tmp_path / "out").exists()


def test_a_failing_task_propagates_and_stores_nothing(tmp_path):
    res = runner.invoke(app, ["run", NAME, "--set", "fail=true", "--out", str(tmp_path)])
    assert res.exit_code != 0 and isinstance(res.exception, RuntimeError)
    assert _experiments(tmp_path / "runs.db") == []


def test_ray_missing_exits_2(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    for command in (["run", NAME], ["sweep", str(_sweep_file(tmp_path))]):
        res = runner.invoke(app, [*command, "--executor", "ray", "--out", str(tmp_path / "o")])
        assert res.exit_code == 2, res.output
        assert "pip install 'gdscope[ray]'" in res.output
    assert not (tmp_path / "o").exists()


def test_unreachable_ray_address_exits_2_and_writes_nothing(tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "o"
    for command in (["run", NAME], ["sweep", str(_sweep_file(tmp_path))]):
        args = [*command, "--executor", "ray", "--address", "127.0.0.1:1", "--out", str(out)]
        res = runner.invoke(app, args)
        assert res.exit_code == 2, res.output
        text = " ".join(res.output.split())
        assert "address='127.0.0.1:1': nothing answers there" in text
        assert "leave out --address" in text
    assert not out.exists()


def _sweep_file(tmp_path: Path, points: str = "") -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(
        f'experiment = "{NAME}"\n[sweep]\ngrid = {{ rates = [[0.5], [0.5, 2.0]] }}\n{points}'
    )
    return path


def test_sweep_runs_then_skips_and_reports_failures(tmp_path):
    config, out = _sweep_file(tmp_path), tmp_path / "out"
    res = runner.invoke(app, ["sweep", str(config), "--executor", "serial", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (
        "point 0 (rates=[0.5]): ✔" in res.output and "point 1 (rates=[0.5, 2.0]): ✘" in res.output
    )
    assert res.output.count("completed") == 2 and "1 ✔ 0 ✘ 0 ?" in res.output
    for name in ("runs.db", "sweep.json", "sweep.html"):
        assert (out / name).exists() and str(out / name) in res.output
    assert len(_experiments(out / "runs.db")) == 2

    res = runner.invoke(app, ["sweep", str(config), "--executor", "serial", "--out", str(out)])
    assert res.exit_code == 0 and res.output.count("stored") >= 2 and "completed" not in res.output

    failing = _sweep_file(tmp_path, "points = [ { fail = false }, { fail = true } ]\n")
    res = runner.invoke(
        app, ["sweep", str(failing), "--executor", "serial", "--out", str(tmp_path / "f")]
    )
    assert res.exit_code == 1, res.output
    assert "point 2 failed" in res.output and "this point fails on purpose" in res.output
    assert len(_experiments(tmp_path / "f" / "runs.db")) == 2


def test_run_refuses_a_sweep_config(tmp_path):
    res = runner.invoke(app, ["run", str(_sweep_file(tmp_path)), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "gdscope sweep CONFIG" in " ".join(res.output.split())


def test_sweep_errors_exit_2(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(f'experiment = "{NAME}"\n[sweep]\ngrid = {{ rates = [[0.5], "x"] }}\n')
    res = runner.invoke(app, ["sweep", str(bad), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert 'sweep point 1 (rates="x"): rates: expected a list' in " ".join(res.output.split())
    res = runner.invoke(app, ["sweep", str(_sweep_file(tmp_path)), "--set", "nope=1"])
    assert res.exit_code == 2 and "nope: unknown field" in res.output
    assert not (tmp_path / "o").exists()
