"""Adversarial output paths and page contents: reports, verdict.json, sweep.json, figure URIs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

from gdscope.errors import ConfigError, InvalidArgumentError
from gdscope.executors import SerialExecutor
from gdscope.experiments import (
    DataConfig,
    Experiment,
    ExperimentConfig,
    Figure,
    Judgement,
    register,
)
from gdscope.report import plots as plots_module
from gdscope.report import write_experiment_report, write_report, write_sweep_report
from gdscope.runner import run_experiment, run_sweep
from gdscope.store import HTML_MARKER, MetricRow, Store
from gdscope.verdict import Verdict

NAME = "test-adv-outputs-tiny"
ENV = {"python": "3", "torch": "2"}
PNG = "data:image/png;base64,iVBORw0KGgo="


@dataclass(frozen=True)
class TinyConfig(ExperimentConfig):
    rates: tuple[float, ...] = (0.5,)
    scale: float = 1.0
    uri: str = PNG
    data: DataConfig = field(default_factory=lambda: DataConfig(n=8))


@register
class Tiny(Experiment):
    name = NAME
    summary = "A test experiment: geometric decay."
    Config = TinyConfig
    paper_scale: ClassVar[dict] = {}
    ran: ClassVar[list] = []

    def tasks(self, cfg: TinyConfig) -> list[dict]:
        return [{"rate": r} for r in cfg.rates]

    def run_task(self, cfg: TinyConfig, task: dict, ctx) -> dict:
        Tiny.ran.append(task)
        cfg.data.load(seed=cfg.seed, dtype=ctx.dtype, one_hot=True, flatten=True)
        run = ctx.store.create_run(f"decay-{task['rate']}", task)
        ctx.store.log_step(run, 0, [MetricRow("loss", 1.0, "loss")])
        ctx.store.finish_run(run, "completed")
        return {"rate": task["rate"]}

    def judge(self, cfg: TinyConfig, results: list[dict]) -> Judgement:
        worst = max(r["rate"] for r in results)
        figure = Figure("decay", "a figure", cfg.uri)
        return Judgement([Verdict("r < 1", "r < 1", f"r = {worst:g}", worst < 1)], [figure])


def _store_with_a_run(path: Path) -> tuple[Path, int]:
    with Store(path) as s:
        run = s.create_run("r", {"lr": 0.1}, environment=ENV)
        for t in range(3):
            s.log_step(run, t, [MetricRow("loss", 1.0 / (t + 1), "loss")])
        s.finish_run(run)
    return path, run


def _snapshot(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


# ---------------------------------------------------------------------- report paths
def _targets(tmp_path: Path, store: Path) -> dict[str, Path]:
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "index.html").write_text("<!DOCTYPE html><title>my page</title>\n")
    (tmp_path / "verdict.json").write_text('[{"claim": "x"}]')
    (tmp_path / "empty.html").write_text("")
    (tmp_path / "folder").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.html").symlink_to(store)
    (tmp_path / "rel-link.html").symlink_to(store.name)
    (tmp_path / "link-to-notes.html").symlink_to(tmp_path / "notes.txt")
    (tmp_path / "dangling.html").symlink_to(tmp_path / "nowhere.html")
    with Store(tmp_path / "other.db") as other:
        other.create_run("o", environment=ENV)
    return {
        "store": store,
        "store-dotdot": tmp_path / "sub" / ".." / store.name,
        "symlink-to-store": tmp_path / "link.html",
        "relative-symlink-to-store": tmp_path / "rel-link.html",
        "store-wal": store.with_name(store.name + "-wal"),
        "foreign-text": tmp_path / "notes.txt",
        "foreign-html": tmp_path / "index.html",
        "foreign-json": tmp_path / "verdict.json",
        "empty-file": tmp_path / "empty.html",
        "symlink-to-foreign": tmp_path / "link-to-notes.html",
        "dangling-symlink": tmp_path / "dangling.html",
        "directory": tmp_path / "folder",
        "another-store": tmp_path / "other.db",
        "missing-directory": tmp_path / "no" / "r.html",
    }


TARGETS = [
    "store",
    "store-dotdot",
    "symlink-to-store",
    "relative-symlink-to-store",
    "store-wal",
    "foreign-text",
    "foreign-html",
    "foreign-json",
    "empty-file",
    "symlink-to-foreign",
    "dangling-symlink",
    "directory",
    "another-store",
    "missing-directory",
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("page", ["run", "experiment", "sweep"])
def test_pages_never_write_over_the_store_or_a_foreign_file(tmp_path, target, page):
    store_path, run = _store_with_a_run(tmp_path / "runs.db")
    with Store(store_path) as s:
        exp = s.add_experiment(
            NAME, {}, "h", status="completed", verdicts=[], results=[], figures=[], sweep="sw"
        )
    out = _targets(tmp_path, store_path)[target]
    before = _snapshot(tmp_path)
    with Store(store_path) as s, pytest.raises(InvalidArgumentError, match=r"\bout\b"):
        if page == "run":
            write_report(s, [run], out)
        elif page == "experiment":
            write_experiment_report(s, exp, out)
        else:
            write_sweep_report(s, "sw", out)
    assert _snapshot(tmp_path) == before
    with Store(store_path) as s:
        assert [r.name for r in s.runs()] == ["r"]


@pytest.mark.parametrize(
    "existing",
    [
        f"<!DOCTYPE html>\n<html><head>{HTML_MARKER}</head></html>\n",
        # a page written before the marker existed
        "<!DOCTYPE html>\n<html><body><header><h1>t</h1><p class='generated'>Generated "
        "2024-01-01 by gdscope 0.1</p></header></body></html>\n",
    ],
    ids=["marked", "legacy"],
)
def test_a_page_gdscope_wrote_is_replaced(tmp_path, existing):
    store_path, run = _store_with_a_run(tmp_path / "runs.db")
    out = tmp_path / "report.html"
    out.write_text(existing)
    with Store(store_path) as s:
        write_report(s, [run], out)
        page = out.read_text()
        assert HTML_MARKER in page and "Runs" in page
        write_report(s, [run], out)  # and again: its own page
    link = tmp_path / "link.html"
    link.symlink_to(out)
    with Store(store_path) as s:
        write_report(s, [run], link)
    assert out.is_file() and HTML_MARKER in out.read_text()


# ---------------------------------------------------------------------- figure URIs
BAD_URIS = [
    "javascript:alert(1)",
    "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
    "http://example.com/x.png",
    "https://example.com/x.png",
    "file:///etc/passwd",
    "//example.com/x.png",
    "x.png",
    "",
    "' onerror='alert(1)",
    "DATA:image/png;base64,AAAA",
    " data:image/png;base64,AAAA",
    "data:image/jpeg;base64,AAAA",
    "data:image/png,AAAA",
    "data:application/octet-stream;base64,AAAA",
]


def _experiment_with_figure(path: Path, uri: object, sweep: str | None = None) -> int:
    with Store(path) as s:
        exp = s.add_experiment(
            NAME,
            {},
            "h",
            status="completed",
            verdicts=[],
            results=[],
            figures=[{"name": "f", "caption": "c", "uri": uri}],
            sweep=sweep,
        )
    assert exp is not None
    return exp


@pytest.mark.parametrize("uri", BAD_URIS)
@pytest.mark.parametrize("page", ["experiment", "sweep"])
def test_pages_refuse_figure_uris_that_are_not_inline_images(tmp_path, uri, page):
    exp = _experiment_with_figure(tmp_path / "runs.db", uri, sweep="sw")
    out = tmp_path / "page.html"
    with Store(tmp_path / "runs.db") as s, pytest.raises(InvalidArgumentError, match=r"\buri\b"):
        if page == "experiment":
            write_experiment_report(s, exp, out)
        else:
            write_sweep_report(s, "sw", out)
    assert not out.exists()


@pytest.mark.parametrize("uri", [123, None, ["data:image/png;base64,"]])
def test_a_stored_figure_uri_of_the_wrong_type_is_refused(tmp_path, uri):
    exp = _experiment_with_figure(tmp_path / "runs.db", uri)
    with Store(tmp_path / "runs.db") as s, pytest.raises(InvalidArgumentError, match=r"\buri\b"):
        write_experiment_report(s, exp, tmp_path / "page.html")


@pytest.mark.parametrize("uri", BAD_URIS[:4])
def test_the_run_page_checks_its_figures_too(tmp_path, monkeypatch, uri):
    store_path, run = _store_with_a_run(tmp_path / "runs.db")
    monkeypatch.setattr(
        plots_module, "standard_figures", lambda *a, **k: [plots_module.Plot("x", "c", uri)]
    )
    with Store(store_path) as s, pytest.raises(InvalidArgumentError, match=r"\buri\b"):
        write_report(s, [run], tmp_path / "r.html")


@pytest.mark.parametrize(
    "uri",
    [
        "data:image/png;base64,AAAA' onerror='alert(1)",
        'data:image/png;base64,AAAA" onerror="alert(1)',
        "data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=",
        "data:image/svg+xml,%3Csvg%3E%3C/svg%3E'><script>alert(1)</script>",
    ],
)
def test_allowed_uris_are_escaped_in_the_attribute(tmp_path, uri):
    exp = _experiment_with_figure(tmp_path / "runs.db", uri)
    with Store(tmp_path / "runs.db") as s:
        page = write_experiment_report(s, exp, tmp_path / "page.html").read_text()
    assert "onerror='alert" not in page and 'onerror="alert' not in page
    assert "<script>alert" not in page


# ---------------------------------------------------------------------- run_experiment / sweeps
def _foreign(folder: Path, name: str, text: str = "mine\n") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(text)
    return folder / name


OUTPUT_CLASHES = [
    ("verdict.json", "mine\n"),
    ("verdict.json", '{"claim": "not a list"}'),
    ("verdict.json", '[{"note": "a list, but not of verdicts"}]'),
    ("verdict.json", "[1, 2]"),
    ("report.html", "<html>my page</html>"),
    ("report.html", ""),
]


@pytest.mark.parametrize(("name", "text"), OUTPUT_CLASHES)
def test_run_experiment_refuses_foreign_outputs_before_running(tmp_path, name, text):
    out = tmp_path / "out"
    _foreign(out, name, text)
    before = _snapshot(out)
    Tiny.ran.clear()
    with pytest.raises(InvalidArgumentError, match=r"\bout\b"):
        run_experiment(NAME, out=out)
    assert Tiny.ran == []  # refused up front: nothing ran
    assert _snapshot(out) == before and not (out / "runs.db").exists()


@pytest.mark.parametrize("name", ["verdict.json", "report.html"])
def test_run_experiment_refuses_an_output_that_links_to_the_store(tmp_path, name):
    out = tmp_path / "out"
    out.mkdir()
    store_path, _ = _store_with_a_run(out / "runs.db")
    (out / name).symlink_to(store_path)
    before = _snapshot(out)
    with pytest.raises(InvalidArgumentError, match=r"\bout\b.*store"):
        run_experiment(NAME, out=out)
    assert _snapshot(out) == before


@pytest.mark.parametrize("name", ["verdict.json", "report.html"])
def test_run_experiment_refuses_a_store_that_is_one_of_its_outputs(tmp_path, name):
    out = tmp_path / "out"
    with pytest.raises(InvalidArgumentError, match=r"\bout\b.*store"):
        run_experiment(NAME, out=out, store=out / name)
    assert not (out / name).exists()


def test_run_experiment_rerun_replaces_its_own_outputs(tmp_path):
    out = tmp_path / "out"
    first = run_experiment(NAME, out=out)
    second = run_experiment(NAME, ["rates=[0.25]"], out=out)
    assert json.loads((out / "verdict.json").read_text())[0]["measured"] == "r = 0.25"
    assert first.paths["report"] == second.paths["report"]
    with Store(out / "runs.db") as s:
        assert len(s.experiments()) == 2


def test_out_that_is_a_file_is_refused(tmp_path):
    out = _foreign(tmp_path, "out.txt")
    with pytest.raises(InvalidArgumentError, match=r"out=.*out\.txt.*is a file"):
        run_experiment(NAME, out=out)
    assert out.read_text() == "mine\n"


@pytest.mark.parametrize(("name", "text"), [("sweep.json", "{}"), ("sweep.html", "x")])
def test_run_sweep_refuses_foreign_outputs_before_running(tmp_path, name, text):
    out = tmp_path / "out"
    _foreign(out, name, text)
    before = _snapshot(out)
    Tiny.ran.clear()
    config = {"experiment": NAME, "sweep": {"grid": {"scale": [1.0, 2.0]}}}
    with pytest.raises(InvalidArgumentError, match=r"\bout\b"):
        run_sweep(config, out=out, executor=SerialExecutor())
    assert Tiny.ran == [] and _snapshot(out) == before


def test_sweep_json_carries_the_generator_key_and_is_replaced(tmp_path):
    config = {"experiment": NAME, "sweep": {"grid": {"scale": [1.0, 2.0]}}}
    run_sweep(config, out=tmp_path, executor=SerialExecutor())
    assert json.loads((tmp_path / "sweep.json").read_text())["generator"] == "gdscope"
    res = run_sweep(config, out=tmp_path, executor=SerialExecutor())  # a rerun: its own files
    assert [p.status for p in res.points] == ["stored", "stored"]


# ---------------------------------------------------------------------- configs
@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=width"],
        ["experiment=nope"],
        ["experiment=" + NAME],
        {"experiment": "width"},
    ],
)
def test_overrides_cannot_switch_the_experiment(tmp_path, overrides):
    with pytest.raises(ConfigError, match=r"experiment.*not by --set"):
        run_experiment(NAME, overrides, out=tmp_path / "o")
    with pytest.raises(ConfigError, match=r"experiment.*not by --set"):
        run_sweep(
            {"experiment": NAME, "sweep": {"grid": {"scale": [1.0]}}},
            overrides,
            out=tmp_path / "o",
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "spec",
    [
        {"grid": {}},
        {"grid": {"data": {}}},
        {"grid": {}, "points": [{"scale": 2.0}]},
    ],
)
def test_an_empty_grid_is_refused(tmp_path, spec):
    with pytest.raises(ConfigError, match=r"sweep\.grid:.*empty"):
        run_sweep(
            {"experiment": NAME, "sweep": spec}, out=tmp_path / "o", executor=SerialExecutor()
        )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("overrides", "field_path"),
    [
        (["scale=nan"], "scale"),
        (["scale=inf"], "scale"),
        (["scale=-inf"], "scale"),
        (["rates=[0.5, nan]"], r"rates\[1\]"),
        (["rates=[inf]"], r"rates\[0\]"),
    ],
)
def test_non_finite_floats_are_refused_by_field(tmp_path, overrides, field_path):
    with pytest.raises(ConfigError, match=rf"^{field_path}: expected a finite number"):
        run_experiment(NAME, overrides, out=tmp_path / "o")


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.name=mnist", "data.root=EMPTY"],
        ["data.name=no-such-data-set"],
        ["data.n=0"],
    ],
)
def test_a_data_error_leaves_no_empty_store_behind(tmp_path, overrides):
    empty = tmp_path / "empty"
    empty.mkdir()
    overrides = [o.replace("EMPTY", str(empty)) for o in overrides]
    with pytest.raises(ConfigError):
        run_experiment(NAME, overrides, out=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_data_error_keeps_an_existing_store(tmp_path):
    out = tmp_path / "o"
    run_experiment(NAME, out=out)
    before = (out / "runs.db").read_bytes()
    with pytest.raises(ConfigError):
        run_experiment(NAME, ["data.name=no-such-data-set"], out=out)
    assert (out / "runs.db").read_bytes() == before


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a\udc80", "UTF-8 cannot encode"),
        ("x\x1b[2J", "control character"),
        ("line\nbreak", "control character"),
        ("", "non-empty string"),
        ("  ", "non-empty string"),
        (7, "non-empty string"),
    ],
)
def test_sweep_names_must_be_printable_text(tmp_path, name, message):
    config = {"experiment": NAME, "sweep": {"grid": {"scale": [1.0]}}}
    with pytest.raises(InvalidArgumentError, match=r"\bname\b") as info:
        run_sweep(config, out=tmp_path / "o", name=name, executor=SerialExecutor())
    assert message in str(info.value)
    assert not (tmp_path / "o").exists()
