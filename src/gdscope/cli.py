"""The ``gdscope`` command line (Typer + rich): demo, run, sweep, runs, report."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gdscope.errors import ConfigError, GdscopeError

app = typer.Typer(
    name="gdscope",
    help="Does gradient descent reach a global minimum on my network, how fast, and why?",
    no_args_is_help=True,
    add_completion=False,
)
# no :emoji: codes: a run named ":warning:" prints as written
console = Console(emoji=False)

_MARK = {
    "holds": "[green]✔ holds[/]",
    "fails": "[red]✘ fails[/]",
    "undetermined": "[yellow]? undetermined[/]",
    "outside": "[blue]○ outside the theorem's assumptions[/]",
}
#: Plain symbols of the statuses, for counts in a table cell (✔ ✘ ? ○).
_STATUS_SYMBOL = {"holds": "✔", "fails": "✘", "undetermined": "?", "outside": "○"}
_SHORT_MARK = {
    "holds": "[green]✔[/]",
    "fails": "[red]✘[/]",
    "undetermined": "[yellow]?[/]",
    "outside": "[blue]○[/]",
}

# ANSI/VT escape sequences (CSI, OSC, other ESC sequences), then any other C0/C1 control
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-_]?")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_CONTROL_ONE_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _safe(value: object, *, one_line: bool = False) -> str:
    """Any user or store text, safe to print through rich: the one helper for all of it.

    ANSI escape sequences are removed; other control characters (``\\r``, bell, C1, and with
    ``one_line`` also newlines and tabs) become ``�``; lone surrogates become ``�``; rich markup
    (``[bold]``, ``[/]``) is escaped so it prints as written.
    """
    text = _SURROGATE.sub("\ufffd", str(value))
    text = _ANSI.sub("", text)
    text = (_CONTROL_ONE_LINE if one_line else _CONTROL).sub("\ufffd", text)
    return escape(text)


def _mark(v: object, marks: dict[str, str] = _MARK) -> str:
    """A verdict's mark by its status (a Verdict or its dict; holds/fails/undetermined/outside)."""
    status = v.get("status") if isinstance(v, dict) else getattr(v, "status", None)
    if status not in marks and isinstance(v, dict):
        holds = v.get("holds")
        status = "outside" if v.get("assumption") else {True: "holds", False: "fails"}.get(holds)
    return marks.get(str(status), marks["undetermined"])


def _fail(e: Exception) -> None:
    console.print(f"[red]error:[/] {_safe(e)}", highlight=False)
    raise typer.Exit(code=2)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), help="Folder for runs.db and report.html."),
    steps: int | None = typer.Option(
        None,
        min=1,
        help="GD steps per step size of the standard net (default 1000; 2000 with --full).",
        show_default=False,
    ),
    quick: bool = typer.Option(False, help="A short run (300 steps) to try things out."),
    samples: int = typer.Option(256, min=8, max=1797, help="Digits samples trained on."),
    full: bool = typer.Option(
        False,
        "--full",
        help="The longer version: 2000 steps per step size, 1000 in the kernel "
        "regime (a few minutes).",
    ),
) -> None:
    """The theory working on digits, then its edge: the kernel regime of a wide NTK-parameterized
    net, feature learning in a standard net, and the edge of stability of full-batch GD."""
    from dataclasses import replace

    from gdscope.demo import DemoConfig, choose_demo_threads, run_demo

    @contextmanager
    def phase(description: str) -> Iterator[None]:
        start = time.perf_counter()
        with _spinner(description):
            yield
        console.print(
            f"[green]✔[/] {_safe(description, one_line=True)} "
            f"[dim]({time.perf_counter() - start:.1f} s)[/]",
            highlight=False,
        )

    t0 = time.perf_counter()
    try:
        config = DemoConfig.full() if full else DemoConfig()
        config = replace(config, samples=samples, steps=300 if quick else (steps or config.steps))
        threads = choose_demo_threads()
        console.print(_safe(threads.describe(), one_line=True), highlight=False)
        result = run_demo(out, config, progress=True, phase=phase, threads=threads)
    except GdscopeError as e:
        _fail(e)
        return
    table = Table(title="gdscope demo: what theory predicts on digits, and what was measured")
    table.add_column("claim", overflow="fold", ratio=1)
    table.add_column("measured", overflow="fold", ratio=1)
    table.add_column("verdict", no_wrap=True)
    for part, verdicts in result.verdicts.items():
        table.add_row(f"[bold]{_safe(part, one_line=True)}[/]", "", "", end_section=False)
        for i, v in enumerate(verdicts):
            mark = f"{_mark(v, _SHORT_MARK)} {_safe(v.status)}"
            table.add_row(
                _safe(v.claim), _safe(v.measured), mark, end_section=i == len(verdicts) - 1
            )
    console.print(table)
    console.print(
        "[blue]○ outside[/] the theorem's assumptions: its premise is not met in that run (the "
        "measured figure says which), so it is a contrast, not a failure.",
        highlight=False,
    )
    console.print(f"store:  {_safe(result.store_path)}", highlight=False)
    console.print(f"report: {_safe(result.report_path)}", highlight=False)
    console.print(f"done in {time.perf_counter() - t0:.1f} s")


@app.command()
def runs(store: Path = typer.Option(Path("runs.db"), help="The SQLite store.")) -> None:
    """List the runs in a store."""
    from gdscope.report.summary import stop_reason
    from gdscope.store import Store

    _need_store(store)
    try:
        with Store(store, readonly=True) as s:
            table = Table(title=_safe(store, one_line=True))
            runs = s.runs()
            # names stay whole on a narrow terminal; the stop reason folds first
            longest = max((len(_safe(r.name, one_line=True)) for r in runs), default=4)
            for col in ("id", "name", "status", "last step", "created", "why it stopped"):
                width = min(longest, 32) if col == "name" else None
                table.add_column(col, overflow="fold", min_width=width)
            for r in runs:
                table.add_row(
                    str(r.id),
                    _safe(r.name, one_line=True),
                    _safe(r.status_label, one_line=True),
                    "" if r.last_step is None else str(r.last_step),
                    _created(r.created_at),
                    _safe(stop_reason(s, r), one_line=True),
                )
            console.print(table)
    except GdscopeError as e:
        _fail(e)


def _need_store(store: Path) -> None:
    """Refuse a missing store (a read command creates nothing)."""
    if not store.is_file():
        what = "is a directory" if store.is_dir() else "does not exist"
        _fail(FileNotFoundError(f"no store at {store}: it {what}; pass --store PATH of a store"))


def _created(when: object) -> str:
    """A stored Unix time as local date and time (an unreadable value as is)."""
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(when)))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError, OSError):
        return _safe(when, one_line=True)


@app.command()
def report(
    run: list[str] = typer.Argument(..., help="Run ids or names (several overlay in one page)."),
    store: Path = typer.Option(Path("runs.db"), help="The SQLite store."),
    out: Path = typer.Option(Path("report.html"), help="HTML file to write."),
    experiment: bool = typer.Option(
        False, "--experiment", help="RUN is the id of a stored experiment: write its page."
    ),
) -> None:
    """Write a self-contained HTML report for one or more runs (or one experiment)."""
    from gdscope.report import write_experiment_report, write_report
    from gdscope.store import Store

    _need_store(store)
    if experiment and (len(run) != 1 or not run[0].isdigit()):
        _fail(ValueError(f"--experiment takes one experiment id, got {' '.join(run)!r}"))
    try:
        with Store(store, readonly=True) as s:
            if experiment:
                path = write_experiment_report(s, int(run[0]), out)
            else:
                ids = [s.run(int(r) if r.isdigit() else r).id for r in run]
                path = write_report(s, ids, out)
    except GdscopeError as e:
        _fail(e)
        return
    console.print(f"report: {_safe(path)}", highlight=False)


_SET_HELP = "Override a config field, e.g. --set data.n=64 --set 'widths=[32, 64]' (repeatable)."
# rich markup would swallow a bare [sweep]: help texts escape it
_GRID_HELP = (
    "Vary a field over values, e.g. --grid 'seed=[0, 1]' (repeatable; the same as --set "
    "'sweep.grid.seed=[0, 1]'): the points are the product, with any \\[sweep] table's points."
)
_EXECUTOR_HELP = "Where the work runs: serial (this process), local (a process pool) or ray."
_ADDRESS_HELP = "Ray cluster address (with --executor ray); default: start a private local Ray."
_WORKERS_HELP = "Worker processes (local) or CPUs of the local Ray (default: all CPUs)."


def _executor(name: str, address: str | None, workers: int | None) -> Any:
    from gdscope.executors import get_executor

    return get_executor(name, address, workers)


def _close(executor: Any) -> None:
    close = getattr(executor, "close", None)
    if close is not None:
        close()


def _verdict_table(title: str, verdicts: list[Any]) -> Table:
    table = Table(title=_safe(title, one_line=True))
    for col in ("claim", "predicted", "measured", "verdict"):
        table.add_column(col, overflow="fold")
    for v in verdicts:
        reason = getattr(v, "reason", "")
        verdict = f"{_mark(v)}\n[dim]{_safe(reason)}[/]" if reason else _mark(v)
        table.add_row(_safe(v.claim), _safe(v.predicted), _safe(v.measured), verdict)
    return table


@contextmanager
def _spinner(description: str) -> Iterator[Callable[[str], None]]:
    """A spinner and the elapsed time while a phase runs (on a terminal; nothing into a pipe), so
    no phase is silent; yields a function that changes its text."""
    if not console.is_terminal:
        yield lambda text: None
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(_safe(description, one_line=True), total=None)
        yield lambda text: bar.update(task, description=_safe(text, one_line=True))


@contextmanager
def _threads(executor: str) -> Iterator[None]:
    """With the serial executor (work in this process): torch's threads from the CPUs actually
    free (:mod:`gdscope.threads`), said on the terminal and recorded with every run; restored
    after. Pool workers set their own (one thread each)."""
    if executor != "serial":
        yield
        return
    from gdscope.threads import apply_threads, choose_threads, reset_threads

    choice = apply_threads(choose_threads())
    console.print(_safe(choice.describe(), one_line=True), highlight=False)
    try:
        yield
    finally:
        reset_threads()


def _values(values: dict[str, Any]) -> str:
    """A sweep point's fields: ``lr=0.1, data.n=64``."""
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def _list_experiments() -> None:
    from gdscope.experiments import experiment_names, get_experiment

    table = Table(title="experiments (gdscope run NAME)")
    table.add_column("name")
    table.add_column("summary", overflow="fold")
    table.add_column("paper scale (--set)", overflow="fold")
    for name in experiment_names():
        exp = get_experiment(name)
        scale = " ".join(
            f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in exp.paper_scale.items()
        )
        table.add_row(_safe(name), _safe(exp.summary), _safe(scale))
    console.print(table)


@app.command("run")
def run_command(
    experiment: str | None = typer.Argument(
        None, help="A built-in experiment (see --list) or a TOML config file.", show_default=False
    ),
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
    out: Path = typer.Option(
        Path("gdscope_out"), help="Folder for runs.db, verdict.json and report.html."
    ),
    device: str | None = typer.Option(
        None, help="cpu or cuda (cuda:N): where models and data live.", show_default=False
    ),
    executor: str = typer.Option("serial", help=_EXECUTOR_HELP),
    address: str | None = typer.Option(None, help=_ADDRESS_HELP, show_default=False),
    workers: int | None = typer.Option(None, min=1, help=_WORKERS_HELP, show_default=False),
    list_: bool = typer.Option(False, "--list", help="List the built-in experiments and exit."),
) -> None:
    """Run one experiment: its verdicts, the store, verdict.json and report.html."""
    from gdscope.runner import run_experiment

    if list_:
        _list_experiments()
        return
    if experiment is None:
        _fail(ValueError("missing EXPERIMENT: name one (gdscope run --list) or a TOML config"))
    overrides = list(set_)
    if device is not None:
        if device != "cpu" and device != "cuda" and not device.startswith("cuda:"):
            _fail(ValueError(f"--device {device!r}: use cpu, cuda or cuda:N"))
        overrides.append(f"device={device}")
    t0 = time.perf_counter()
    ex = None
    try:
        ex = _executor(executor, address, workers)
        with _threads(executor), _spinner(f"{experiment}: running its tasks") as say:
            done = 0

            def on_task(o: Any) -> None:
                nonlocal done
                done += 1
                console.print(
                    f"task {_safe(json.dumps(o.task))} done in {o.seconds:.1f} s", highlight=False
                )
                say(f"{experiment}: {done} task(s) done; then judging and writing the report")

            result = run_experiment(experiment, overrides, out=out, executor=ex, on_task=on_task)
    except GdscopeError as e:
        _fail(e)
        return
    finally:
        _close(ex)
    console.print(
        _verdict_table(f"{result.name} (experiment {result.experiment_id})", result.verdicts)
    )
    _print_paths(result.paths)
    console.print(f"done in {time.perf_counter() - t0:.1f} s")


def _print_paths(paths: dict[str, Path]) -> None:
    for key, path in paths.items():
        console.print(f"{key + ':':8} {_safe(path)}", highlight=False)


@app.command()
def sweep(
    config: str = typer.Argument(
        ...,
        help="A TOML experiment config with a \\[sweep] table, or a built-in experiment "
        "(see gdscope run --list) with --grid.",
    ),
    set_: list[str] = typer.Option([], "--set", help=_SET_HELP),
    grid: list[str] = typer.Option([], "--grid", help=_GRID_HELP),
    out: Path = typer.Option(
        Path("gdscope_out"), help="Folder for runs.db, sweep.json and sweep.html."
    ),
    executor: str = typer.Option("local", help=_EXECUTOR_HELP),
    address: str | None = typer.Option(None, help=_ADDRESS_HELP, show_default=False),
    workers: int | None = typer.Option(None, min=1, help=_WORKERS_HELP, show_default=False),
    name: str | None = typer.Option(
        None, help="The sweep's name in the store (default: from its points).", show_default=False
    ),
) -> None:
    """Run every point of a sweep (skipping those already stored) and compare them.

    The points come from the config's \\[sweep] table and from --grid, e.g.
    gdscope sweep width --grid 'seed=[0, 1]'.
    """
    from gdscope.runner import SweepPoint, run_sweep

    def progress(p: SweepPoint) -> None:
        what = _safe(_values(p.values))
        if p.status == "failed":
            console.print(f"[red]✘ point {p.index} failed[/] ({what})", highlight=False)
        else:
            marks = " ".join(_mark(v, _SHORT_MARK) for v in p.verdicts)
            console.print(f"point {p.index} ({what}): {marks}", highlight=False)

    overrides = list(set_)
    for item in grid:
        field, sep, values = item.partition("=")
        if not sep or not field.strip():
            _fail(
                ConfigError(f"--grid {item!r}: expected FIELD=[values], e.g. --grid 'seed=[0, 1]'")
            )
        overrides.append(f"sweep.grid.{field.strip()}={values}")
    t0 = time.perf_counter()
    ex = None
    try:
        ex = _executor(executor, address, workers)
        with _threads(executor), _spinner(f"sweep {config}: running its points"):
            result = run_sweep(
                config, overrides, out=out, executor=ex, name=name, on_point=progress
            )
    except GdscopeError as e:
        _fail(e)
        return
    finally:
        _close(ex)
    table = Table(title=_safe(f"sweep {result.name} ({result.experiment})", one_line=True))
    for col in ("point", "values", "status", "verdicts"):
        table.add_column(col, overflow="fold")
    for p in result.points:
        statuses = [_mark(v, _STATUS_SYMBOL) for v in p.verdicts]
        summary = (
            " ".join(f"{statuses.count(sym)} {sym}" for sym in _STATUS_SYMBOL.values())
            if p.status != "failed"
            else ""
        )
        table.add_row(str(p.index), _safe(_values(p.values)), p.status, summary)
    console.print(table)
    for p in result.failed:
        console.print(f"[red]point {p.index} failed:[/] {_safe(p.error or '')}", highlight=False)
    _print_paths(result.paths)
    console.print(f"done in {time.perf_counter() - t0:.1f} s")
    if result.failed:
        raise typer.Exit(code=1)


@app.command("export")
def export_command(
    run: str | None = typer.Argument(
        None, help="Run id or name (default: every run in the store).", show_default=False
    ),
    store: Path = typer.Option(Path("runs.db"), help="The SQLite store."),
    format_: str = typer.Option("csv", "--format", help="csv or parquet (parquet needs pyarrow)."),
    out: Path | None = typer.Option(
        None,
        help="File to write (default: run-<id>.<format>, or metrics.<format> for every run).",
        show_default=False,
    ),
) -> None:
    """Export metrics in long format (run_id, run_name, step, iterate_index, name, value, probe,
    iterate) to CSV or Parquet; the store's schema is in docs/store-schema.md."""
    from gdscope.export import FORMATS, export_metrics
    from gdscope.store import Store

    if format_ not in FORMATS:
        _fail(ValueError(f"--format {format_!r}: use {' or '.join(FORMATS)}"))
    _need_store(store)
    try:
        with Store(store, readonly=True) as s:
            key: int | str | None = None
            if run is not None:
                key = s.run(int(run) if run.isdigit() else run).id
            path = out or Path(f"run-{key}.{format_}" if key is not None else f"metrics.{format_}")
            written = export_metrics(s, path, key, format_)  # type: ignore[arg-type]
    except GdscopeError as e:
        _fail(e)
        return
    console.print(f"{format_}: {_safe(written)}", highlight=False)


if __name__ == "__main__":  # python -m gdscope.cli
    app()
