"""run_experiment end to end with a tiny experiment registered here; the experiment page."""

from __future__ import annotations

import json
import pickle
import re
import subprocess
from dataclasses import dataclass, field

import pytest
import torch

import gdscope as gs
from gdscope.errors import ConfigError, InvalidArgumentError
from gdscope.executors import LocalExecutor
from gdscope.experiments import (
    DataConfig,
    Experiment,
    ExperimentConfig,
    Figure,
    Judgement,
    SerialExecutor,
    config_hash,
    register,
)
from gdscope.probes import LossProbe
from gdscope.report import write_experiment_report
from gdscope.runner import ExperimentResult, run_point, run_sweep
from gdscope.store import Store
from gdscope.verdict import Verdict
from test_report import CHROMIUM_FLAGS, _chromium

NAME = "test-runner-tiny"
CLAIM = "GD lowers the least-squares loss at every learning rate"


@dataclass(frozen=True)
class TinyConfig(ExperimentConfig):
    lrs: tuple[float, ...] = (0.1, 0.2)
    steps: int = 12
    n: int = 16
    fail_at: float | None = None  # a task with this lr raises
    data: DataConfig = field(default_factory=lambda: DataConfig(n=16))


@register
class Tiny(Experiment):
    name = NAME
    summary = "GD on a linear least-squares problem lowers the loss (a test experiment)."
    Config = TinyConfig

    def tasks(self, cfg: TinyConfig) -> list[dict]:
        return [{"lr": lr} for lr in cfg.lrs]

    def run_task(self, cfg: TinyConfig, task: dict, ctx) -> dict:
        if task["lr"] == cfg.fail_at:
            raise RuntimeError(f"task lr={task['lr']} failed on purpose")
        g = torch.Generator().manual_seed(cfg.seed)
        X = torch.randn(cfg.n, 3, generator=g, dtype=ctx.dtype)
        Y = X @ torch.ones(3, 1, dtype=ctx.dtype)
        torch.manual_seed(cfg.seed)
        model = torch.nn.Linear(3, 1).to(ctx.dtype)
        prob = gs.Problem(model, "mse", (X, Y))
        with gs.Tracker(
            prob, [LossProbe()], store=ctx.store, run_name=f"tiny-lr{task['lr']}", config=task
        ) as tracker:
            fit = gs.fit(prob, gs.GD(model.parameters(), lr=task["lr"]), cfg.steps, tracker)
        return {"lr": task["lr"], "first": fit.losses[0], "last": fit.losses[-1]}

    def judge(self, cfg: TinyConfig, results: list[dict]) -> Judgement:
        import matplotlib.pyplot as plt  # here, so that pool workers need not import it

        ratios = [r["last"] / r["first"] for r in results]
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.plot([r["lr"] for r in results], ratios, "o-")
        return Judgement(
            [
                Verdict(
                    CLAIM,
                    "final/initial loss < 1",
                    f"max final/initial {max(ratios):.3g}",
                    max(ratios) < 1,
                    {"ratios": ratios},
                ),
                Verdict("a claim the test leaves open", "-", "-", None, "not decidable here"),
            ],
            [Figure.of(fig, "ratios", "final/initial loss by learning rate")],
        )


def test_run_experiment_end_to_end(tmp_path):
    out = tmp_path / "out"
    res = gs.run_experiment(NAME, ["steps=10"], out=out)
    assert isinstance(res, ExperimentResult) and res.name == NAME
    assert res.config["steps"] == 10 and res.config["lrs"] == [0.1, 0.2]
    assert res.config_hash == config_hash({"experiment": NAME, **res.config})
    v = res.verdicts[0]
    assert v.claim == CLAIM and v.holds is True and len(v.details["ratios"]) == 2
    assert res.verdicts[1].holds is None
    assert [r["lr"] for r in res.results] == [0.1, 0.2]
    assert all(r["last"] < r["first"] for r in res.results)
    assert res.figures[0].uri.startswith("data:image/png;base64,")
    assert res.paths == {
        "store": out / "runs.db",
        "verdict": out / "verdict.json",
        "report": out / "report.html",
    }
    with Store(out / "runs.db") as store:
        (info,) = store.experiments()
        assert info.id == res.experiment_id and info.name == NAME and info.sweep is None
        assert info.config == res.config and info.config_hash == res.config_hash
        assert info.verdicts == [v.to_dict() for v in res.verdicts]
        assert info.run_ids == res.run_ids and len(res.run_ids) == 2
        runs = [store.run(r) for r in res.run_ids]
        assert [r.name for r in runs] == ["tiny-lr0.1", "tiny-lr0.2"]
        assert all(r.status == "completed" for r in runs)
        steps, loss = store.series(runs[0].id, "loss")
        assert steps.tolist() == list(range(10)) and loss[-1] < loss[0]
    verdicts = json.loads((out / "verdict.json").read_text())
    assert [set(v) for v in verdicts] == [
        {"claim", "predicted", "measured", "holds", "details", "status", "reason", "theorem"}
        | {"section", "assumption"}
    ] * 2
    assert [v["status"] for v in verdicts] == ["holds", "undetermined"]
    assert verdicts[0]["holds"] is True and verdicts[1]["holds"] is None
    page = (out / "report.html").read_text()
    for section in ("verdicts", "figures", "config", "runs", "run-figures"):
        assert f"<section id='{section}'>" in page
    assert CLAIM in page and "✔ holds" in page and "? undetermined" in page
    assert "tiny-lr0.2" in page and "data-name='ratios'" in page and "data-name='loss'" in page
    assert "a test experiment" in page  # the summary

    # a second run of the same config is a second experiment row (only sweeps deduplicate)
    again = gs.run_experiment(NAME, {"steps": 10}, out=out)
    assert again.experiment_id == res.experiment_id + 1 and again.config_hash == res.config_hash


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["nope=1"], r"nope: unknown field\. Known fields of the config: data, device"),
        (["steps=many"], r"steps: expected an integer, got 'many'"),
        (["data.n=1.5"], r"data\.n: 1\.5 fits none of int \| None|data\.n: expected an integer"),
        (["data.colour=1"], r"data\.colour: unknown field"),
        (["lrs=0.1"], r"lrs: expected a list"),
        (["dtype=float16"], r"dtype: 'float16' is not allowed"),
    ],
)
def test_config_errors_name_the_field_and_write_nothing(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        gs.run_experiment(NAME, overrides, out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_experiment_and_missing_data_dir(tmp_path):
    with pytest.raises(ConfigError, match=rf"experiment='nope' is unknown: use one of .*{NAME}"):
        gs.run_experiment("nope", out=tmp_path / "out")
    missing = tmp_path / "no-data"
    with pytest.raises(ConfigError, match=r"data\.root=.*no-data.* is not a directory"):
        gs.run_experiment(NAME, [f"data.root={missing}"], out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failing_task_leaves_nothing_in_the_store(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="failed on purpose"):
        gs.run_experiment(NAME, ["fail_at=0.2"], out=out)
    # nothing is left behind: the store and folder the call created are removed again
    assert not (out / "runs.db").exists() and not out.exists()


def test_without_out_and_into_a_given_store(tmp_path):
    res = gs.run_experiment(NAME, ["lrs=[0.1]", "steps=3"], out=None)
    assert res.experiment_id is None and res.run_ids == [] and res.paths == {}
    assert res.verdicts[0].holds is True
    with Store(tmp_path / "mine.db") as store:
        res = gs.run_experiment(NAME, ["lrs=[0.1]", "steps=3"], out=None, store=store)
        assert store.experiment(res.experiment_id).run_ids == res.run_ids
    assert res.paths == {"store": tmp_path / "mine.db"}


def test_run_point_is_plain_picklable_data():
    point = pickle.loads(pickle.dumps(run_point(NAME, {"lrs": [0.1], "steps": 3})))
    assert point.name == NAME and point.config["steps"] == 3
    assert point.verdicts[0]["claim"] == CLAIM and point.verdicts[0]["holds"] is True
    assert point.figures[0]["name"] == "ratios"
    (run,) = point.runs
    assert run["name"] == "tiny-lr0.1" and run["status"] == "completed"
    assert {m[1] for m in run["metrics"]} >= {"loss"}


def test_tasks_in_a_process_pool(tmp_path):
    """Spawned workers find this module's experiment; results come back in task order."""
    ex = LocalExecutor(workers=2)
    seen = []
    res = gs.run_experiment(
        NAME, ["lrs=[0.05, 0.1, 0.2]", "steps=5"], out=tmp_path, executor=ex, on_task=seen.append
    )
    assert [r["lr"] for r in res.results] == [0.05, 0.1, 0.2]
    assert sorted(o.task["lr"] for o in seen) == [0.05, 0.1, 0.2]
    with Store(tmp_path / "runs.db") as store:
        names = [store.run(r).name for r in res.run_ids]
    assert names == ["tiny-lr0.05", "tiny-lr0.1", "tiny-lr0.2"]
    with pytest.raises(RuntimeError, match="failed on purpose"):
        gs.run_experiment(NAME, ["fail_at=0.1", "steps=2"], out=tmp_path / "x", executor=ex)


def test_experiment_report_errors(tmp_path):
    res = gs.run_experiment(NAME, ["lrs=[0.1]", "steps=2"], out=tmp_path)
    with Store(tmp_path / "runs.db") as store:
        with pytest.raises(InvalidArgumentError, match=r"no experiment 99"):
            write_experiment_report(store, 99, tmp_path / "r.html")
        with pytest.raises(InvalidArgumentError, match="does not exist"):
            write_experiment_report(store, res.experiment_id, tmp_path / "no" / "r.html")


def test_experiment_report_escapes_stored_strings(tmp_path):
    with Store(tmp_path / "runs.db") as store:
        exp_id = store.add_experiment(
            "<b>evil</b>",
            {"note": "<script>x</script>"},
            "h",
            status="completed",
            verdicts=[Verdict("<i>c</i>", "<p>", "&", False, {"<k>": "<v>"}).to_dict()],
            results=[],
            figures=[],
        )
        page = write_experiment_report(store, exp_id, tmp_path / "r.html").read_text()
    assert "<script>x" not in page and "&lt;script&gt;x" in page
    assert "<b>evil" not in page and "<i>c" not in page and "&lt;k&gt;" in page
    assert "✘ fails" in page and "No runs recorded." in page
    assert page.count("<script>") == 1


def _figures_ok(exe: str, page, profile) -> tuple[int, int]:
    """``(loaded, total)`` figures as the page's load script counts them in Chromium."""
    flags = [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    dom = subprocess.run(
        [*flags, "--dump-dom", page.resolve().as_uri()], capture_output=True, text=True, timeout=60
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    match = re.search(r'data-figures-ok="(\d+)/(\d+)"', dom.stdout)
    assert match, "the page's load script did not run: " + dom.stdout[:500]
    return int(match[1]), int(match[2])


@pytest.mark.browser
def test_experiment_and_sweep_pages_render_in_chromium(tmp_path):
    exe = _chromium()
    page = gs.run_experiment(NAME, ["steps=8"], out=tmp_path / "out").paths["report"]
    total = page.read_text().count("<figure class='plot'")
    assert total >= 2 and _figures_ok(exe, page, tmp_path / "p1") == (total, total)

    config = {"experiment": NAME, "steps": 4, "sweep": {"grid": {"n": [8, 16]}}}
    sweep = run_sweep(config, out=tmp_path / "sweep", executor=SerialExecutor())
    page = sweep.paths["report"]
    text = page.read_text()
    assert text.count("<figure class='plot'") == 2 and "<th>n</th>" in text
    assert _figures_ok(exe, page, tmp_path / "p2") == (2, 2)
