"""Adversarial input to the command line: names and paths printed, files written, advice given."""

from __future__ import annotations

import os
import re
import shlex
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest
from typer.testing import CliRunner

from gdscope.cli import _safe, app
from gdscope.experiments import DataConfig, Experiment, ExperimentConfig, Judgement, register
from gdscope.store import HTML_MARKER, MetricRow, Store
from gdscope.verdict import Verdict

runner = CliRunner(env={"COLUMNS": "250"})
NAME = "test-adv-cli-tiny"
ENV = {"python": "3", "torch": "2"}


@dataclass(frozen=True)
class TinyConfig(ExperimentConfig):
    rates: tuple[float, ...] = (0.5,)
    data: DataConfig = field(default_factory=lambda: DataConfig(n=8))


@register
class Tiny(Experiment):
    name = NAME
    summary = "A CLI test experiment."
    Config = TinyConfig
    paper_scale: ClassVar[dict] = {}

    def tasks(self, cfg: TinyConfig) -> list[dict]:
        return [{"rate": r} for r in cfg.rates]

    def run_task(self, cfg: TinyConfig, task: dict, ctx) -> dict:
        cfg.data.load(seed=cfg.seed, dtype=ctx.dtype, one_hot=True, flatten=True)
        run = ctx.store.create_run(f"decay-{task['rate']}", task)
        ctx.store.log_step(run, 0, [MetricRow("loss", 1.0, "loss")])
        ctx.store.finish_run(run, "completed")
        return {"rate": task["rate"], "seed": cfg.seed}

    def judge(self, cfg: TinyConfig, results: list[dict]) -> Judgement:
        return Judgement([Verdict("r < 1", "r < 1", "ok", True)])


def _text(output: str) -> str:
    return " ".join(output.split())


def _store(path: Path, names: list[str]) -> Path:
    """A store whose runs carry ``names`` as written (inserted directly, as another tool might)."""
    with Store(path) as s:
        for _ in names:
            run = s.create_run(None, environment=ENV)
            s.log_step(run, 0, [MetricRow("loss", 1.0, "loss")])
            s.finish_run(run)
    con = sqlite3.connect(path)
    for i, name in enumerate(names, start=1):
        con.execute("UPDATE runs SET name = ? WHERE id = ?", (name, i))
    con.commit()
    con.close()
    return path


# ---------------------------------------------------------------------- what the terminal shows
HOSTILE_NAMES = [
    ("[/]", "[/]"),
    ("[bold red]FAKE completed[/]", "[bold red]FAKE completed[/]"),
    ("[/bold]", "[/bold]"),
    ("[link=https://example.com]click[/link]", "[link=https://example.com]click[/link]"),
    ("ends with a backslash\\", "ends with a backslash\\"),
    ("\\[escaped]", "\\[escaped]"),
    (":warning: :thumbs_up:", ":warning: :thumbs_up:"),
    ("red\x1b[31mALERT\x1b[0m", "redALERT"),
    ("title\x1b]0;pwned\x07set", "titleset"),
    ("clear\x1b[2J\x1b[Hscreen", "clearscreen"),
    ("over\rwrite", "over\ufffdwrite"),
    ("bell\x07", "bell\ufffd"),
    ("c1\x9b31m", "c1\ufffd31m"),
    ("new\nline", "new\ufffdline"),
    ("back\x08space", "back\ufffdspace"),
]


@pytest.mark.parametrize(("name", "shown"), HOSTILE_NAMES)
def test_runs_prints_stored_names_literally(tmp_path, name, shown):
    db = _store(tmp_path / "runs.db", [name, "plain"])
    res = runner.invoke(app, ["runs", "--store", str(db)])
    assert res.exit_code == 0, res.output
    assert shown in res.output and "plain" in res.output
    assert "\x1b" not in res.output and "\r" not in res.output and "\x07" not in res.output


@pytest.mark.parametrize(("name", "shown"), HOSTILE_NAMES[:8])
def test_errors_print_names_literally(tmp_path, name, shown):
    db = _store(tmp_path / "runs.db", ["plain"])
    res = runner.invoke(
        app, ["report", name, "--store", str(db), "--out", str(tmp_path / "r.html")]
    )
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and "no run" in res.output
    assert "\x1b" not in res.output  # a repr in the message shows it as text: \\x1b
    if "\x1b" not in name:
        assert shown.split()[0] in res.output


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("a\udc80b", "a\ufffdb"),
        ("\ud800", "\ufffd"),
        ("x\x1b[1;31my", "xy"),
        ("[red]r[/red]", "\\[red]r\\[/red]"),
        ("tab\tok", "tab\tok"),
        (Path("/tmp/[bold]x"), "/tmp/\\[bold]x"),
        (ValueError("bad [/] value"), "bad \\[/] value"),
    ],
)
def test_safe_is_the_one_terminal_sanitizer(value, expected):
    assert _safe(value) == expected


def test_a_store_path_with_markup_prints_literally(tmp_path):
    folder = tmp_path / "[bold]dir"
    folder.mkdir()
    db = _store(folder / "runs.db", ["r"])
    res = runner.invoke(app, ["runs", "--store", str(db)])
    assert res.exit_code == 0 and "[bold]dir" in res.output


def test_a_surrogate_name_is_refused_at_creation(tmp_path):
    with Store(tmp_path / "runs.db") as s:
        with pytest.raises(Exception, match=r"\bname\b.*UTF-8") as info:
            s.create_run("a\udc80", environment=ENV)
        assert type(info.value).__name__ == "InvalidArgumentError"


# ---------------------------------------------------------------------- report --out
def _report_targets(tmp_path: Path, db: Path) -> dict[str, Path]:
    (tmp_path / "notes.txt").write_text("notes\n")
    (tmp_path / "page.html").write_text("<html>mine</html>")
    (tmp_path / "link.html").symlink_to(db)
    (tmp_path / "dir").mkdir()
    return {
        "the-store": db,
        "symlink-to-store": tmp_path / "link.html",
        "store-dotdot": tmp_path / "dir" / ".." / db.name,
        "foreign-file": tmp_path / "notes.txt",
        "foreign-page": tmp_path / "page.html",
        "directory": tmp_path / "dir",
        "missing-dir": tmp_path / "nope" / "r.html",
    }


@pytest.mark.parametrize(
    "target",
    [
        "the-store",
        "symlink-to-store",
        "store-dotdot",
        "foreign-file",
        "foreign-page",
        "directory",
        "missing-dir",
    ],
)
@pytest.mark.parametrize("experiment", [False, True])
def test_report_out_never_overwrites_the_store_or_a_foreign_file(tmp_path, target, experiment):
    db = _store(tmp_path / "runs.db", ["r"])
    with Store(db) as s:
        s.add_experiment(NAME, {}, "h", status="completed", verdicts=[], results=[], figures=[])
    out = _report_targets(tmp_path, db)[target]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()}
    args = ["report", "1", "--store", str(db), "--out", str(out)]
    res = runner.invoke(app, [*args, "--experiment"] if experiment else args)
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and "out=" in _text(res.output)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()}
    assert after == before
    with Store(db) as s:
        assert [r.name for r in s.runs()] == ["r"]


def test_report_replaces_its_own_page(tmp_path):
    db = _store(tmp_path / "runs.db", ["r"])
    out = tmp_path / "r.html"
    for _ in range(2):
        res = runner.invoke(app, ["report", "r", "--store", str(db), "--out", str(out)])
        assert res.exit_code == 0, res.output
    assert HTML_MARKER in out.read_text()


def test_report_by_an_ambiguous_name_lists_the_ids(tmp_path):
    db = _store(tmp_path / "runs.db", ["same", "other", "same"])
    res = runner.invoke(app, ["report", "same", "--store", str(db), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert re.search(r"'same' is ambiguous.*ids 1, 3.*Pass an id", _text(res.output))
    res = runner.invoke(app, ["report", "3", "--store", str(db), "--out", str(tmp_path / "x")])
    assert res.exit_code == 0, res.output


# ---------------------------------------------------------------------- read-only stores
@pytest.mark.parametrize("command", ["runs", "report"])
def test_read_commands_work_on_a_read_only_store(tmp_path, monkeypatch, command):
    folder = tmp_path / "ro"
    folder.mkdir()
    db = _store(folder / "runs.db", ["kept"])
    before = db.read_bytes()
    real_access = os.access
    # what a non-root user sees on a chmod 444 file (root may write anyway)
    monkeypatch.setattr(
        os, "access", lambda p, mode, **kw: False if mode & os.W_OK else real_access(p, mode)
    )
    db.chmod(0o444)
    try:
        args = (
            ["runs"] if command == "runs" else ["report", "kept", "--out", str(tmp_path / "r.html")]
        )
        res = runner.invoke(app, [*args, "--store", str(db)])
    finally:
        db.chmod(0o644)
    assert res.exit_code == 0, res.output
    assert db.read_bytes() == before
    assert [p.name for p in folder.iterdir()] == ["runs.db"]  # no -wal or -shm left behind


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "no store at"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text("x" * 200), "not an SQLite database"),
        (lambda p: sqlite3.connect(p).executescript("CREATE TABLE t (x)"), "not a gdscope store"),
    ],
    ids=["missing", "directory", "text", "foreign-sqlite"],
)
@pytest.mark.parametrize("command", [["runs"], ["report", "1"]])
def test_read_commands_refuse_what_is_not_a_store_and_create_nothing(
    tmp_path, setup, message, command
):
    path = tmp_path / "runs.db"
    setup(path)
    before = sorted(p.name for p in tmp_path.iterdir())
    res = runner.invoke(app, [*command, "--store", str(path)])
    assert res.exit_code == 2 and message in _text(res.output), res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ---------------------------------------------------------------------- demo / run / sweep
@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda out: out.write_text("keep me"), "is a file, not a folder"),
        (lambda out: (out.mkdir(), (out / "report.html").write_text("keep me")), "report"),
        (
            lambda out: (
                out.mkdir(),
                _store(out / "runs.db", ["r"]),
                (out / "report.html").symlink_to(out / "runs.db"),
            ),
            "is the store",
        ),
        (lambda out: (out.mkdir(), (out / "report.html").mkdir()), "is a directory"),
        (lambda out: (out.mkdir(), (out / "runs.db").write_text("x" * 100)), "not an SQLite"),
    ],
    ids=["out-is-a-file", "foreign-report", "report-links-to-store", "report-is-dir", "bad-db"],
)
def test_demo_refuses_bad_outputs_before_training(tmp_path, setup, message):
    out = tmp_path / "demo"
    setup(out)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()}
    res = runner.invoke(app, ["demo", "--out", str(out), "--steps", "2", "--samples", "32"])
    assert res.exit_code == 2, res.output
    assert message in _text(res.output), res.output
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()}
    assert after == before


@pytest.mark.parametrize(
    "sets",
    [
        ["experiment=width"],
        ["experiment=optimizers", "seed=1"],
        [f"experiment={NAME}"],
        ["experiment=[1, 2]"],
    ],
)
def test_run_refuses_set_experiment(tmp_path, sets):
    args = ["run", NAME, *(a for s in sets for a in ("--set", s)), "--out", str(tmp_path / "o")]
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "--set experiment=" in _text(res.output) and "gdscope run" in _text(res.output)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", NAME, "--set", "rates=[nan]"], "rates[0]: expected a finite number"),
        (["run", NAME, "--set", "seed=1e999"], "seed: expected an integer"),
        (["run", NAME, "--set", "data.name=mnist", "--set", "data.root=EMPTY"], "MNIST"),
        (["run", NAME, "--set", "data.name=no-such-set"], "no-such-set"),
        (
            [
                "sweep",
                NAME,
                "--grid",
                "seed=[0, 1]",
                "--set",
                "data.root=EMPTY",
                "--set",
                "data.name=mnist",
            ],
            "MNIST",
        ),
    ],
)
def test_errors_leave_no_store_or_folder_behind(tmp_path, args, message):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a.replace("EMPTY", str(empty)) for a in args]
    out = tmp_path / "o"
    res = runner.invoke(app, [*args, "--executor", "serial", "--out", str(out)])
    assert res.exit_code in (1, 2), res.output
    assert message in _text(res.output)
    assert not (out / "runs.db").exists()


def test_sweep_by_builtin_name_gives_advice_that_works(tmp_path):
    out = tmp_path / "o"
    res = runner.invoke(app, ["sweep", NAME, "--executor", "serial", "--out", str(out)])
    assert res.exit_code == 2, res.output
    text = _text(res.output)
    advice = re.search(r"(gdscope sweep \S+ --grid '[^']*')", text)
    assert advice, text
    assert not out.exists()
    argv = shlex.split(advice.group(1))[1:]  # drop the program name
    res = runner.invoke(app, [*argv, "--executor", "serial", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.count("completed") == 2
    # the same through --set, and the page and JSON are there
    res = runner.invoke(
        app,
        [
            "sweep",
            NAME,
            "--set",
            "sweep.grid.seed=[0, 1]",
            "--executor",
            "serial",
            "--out",
            str(out),
        ],
    )
    assert res.exit_code == 0 and res.output.count("stored") >= 2, res.output
    assert (out / "sweep.html").exists() and (out / "sweep.json").exists()


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ("seed", "--grid 'seed': expected FIELD=[values]"),
        ("=[0, 1]", "expected FIELD=[values]"),
        ("seed=0", "sweep.grid.seed: expected a non-empty list"),
        ("seed=[]", "sweep.grid.seed: expected a non-empty list"),
        ("nope=[1, 2]", "nope: unknown field"),
        ("experiment=['a', 'b']", "experiment cannot vary"),
    ],
)
def test_sweep_grid_option_errors(tmp_path, grid, message):
    out = tmp_path / "o"
    res = runner.invoke(app, ["sweep", NAME, "--grid", grid, "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert message in _text(res.output)
    assert not out.exists()


@pytest.mark.parametrize(
    "table",
    [
        "[sweep]\ngrid = {}\n",
        "[sweep.grid]\n",
        "[sweep]\ngrid = { data = {} }\n",
    ],
)
def test_sweep_with_an_empty_grid_is_refused(tmp_path, table):
    config = tmp_path / "s.toml"
    config.write_text(f'experiment = "{NAME}"\n{table}')
    res = runner.invoke(app, ["sweep", str(config), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    assert "sweep.grid:" in _text(res.output) and "empty" in _text(res.output)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["sweep", "--help"], "[sweep]"),
        (["sweep", "--help"], "--grid 'seed=[0, 1]'"),
        (["run", "--help"], "--set 'widths=[32, 64]'"),
    ],
)
def test_help_keeps_its_brackets(command, expected):
    res = runner.invoke(app, command)
    assert res.exit_code == 0 and expected in _text(res.output), res.output


# ---------------------------------------------------------------------- end to end
@pytest.mark.parametrize(
    "name", ["red\x1b[31mALERT\x1b[0m", "[bold red]FAKE[/]"], ids=["ansi", "markup"]
)
def test_runs_in_a_real_terminal_process(tmp_path, name):
    db = _store(tmp_path / "runs.db", [name])
    res = subprocess.run(
        [sys.executable, "-m", "gdscope.cli", "runs", "--store", str(db)],
        capture_output=True,
        env={**os.environ, "COLUMNS": "200", "FORCE_COLOR": "0", "TERM": "dumb"},
        timeout=120,
        check=False,
    )
    out = res.stdout.decode("utf-8", "replace")
    assert res.returncode == 0, res.stderr.decode()
    assert b"\x1b[31m" not in res.stdout and ("ALERT" in out or "[bold red]FAKE[/]" in out)


def test_report_over_its_own_store_end_to_end(tmp_path):
    db = _store(tmp_path / "runs.db", ["r"])
    before = db.read_bytes()
    res = subprocess.run(
        [sys.executable, "-m", "gdscope.cli", "report", "r", "--store", str(db), "--out", str(db)],
        capture_output=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=120,
        check=False,
    )
    assert res.returncode == 2 and b"is the store" in res.stdout, res.stdout
    assert db.read_bytes() == before
