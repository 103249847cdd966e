"""The ``gdscope`` command line (Typer + rich)."""

from __future__ import annotations

import time
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from gdscope.errors import GdscopeError

app = typer.Typer(
    name="gdscope",
    help="Does gradient descent reach a global minimum on my network, how fast, and why?",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()

_MARK = {True: "[green]✔ holds[/]", False: "[red]✘ fails[/]", None: "[yellow]? undetermined[/]"}


def _fail(e: Exception) -> None:
    console.print(f"[red]error:[/] {e}")
    raise typer.Exit(code=2)


@app.command()
def demo(
    out: Path = typer.Option(Path("demo_out"), help="Folder for runs.db and report.html."),
    steps: int = typer.Option(2000, min=1, help="GD steps per learning rate."),
    quick: bool = typer.Option(False, help="A short run (300 steps) to try things out."),
) -> None:
    """Train an MLP on digits with full-batch GD at three learning rates and explain the runs."""
    from gdscope.demo import DemoConfig, run_demo

    config = DemoConfig(steps=300 if quick else steps)
    t0 = time.perf_counter()
    try:
        result = run_demo(
            out, config, progress=True, on_run=lambda name: console.rule(f"[bold]{name}")
        )
    except GdscopeError as e:
        _fail(e)
        return
    for name, verdicts in result.runs.items():
        table = Table(title=name, show_lines=False)
        for col in ("claim", "predicted", "measured", "verdict"):
            table.add_column(col, overflow="fold")
        for v in verdicts:
            table.add_row(v.claim, v.predicted, v.measured, _MARK[v.holds])
        console.print(table)
    console.print(f"store:  {result.store_path}")
    console.print(f"report: {result.report_path}")
    console.print(f"done in {time.perf_counter() - t0:.1f} s")


@app.command()
def runs(store: Path = typer.Option(Path("runs.db"), help="The SQLite store.")) -> None:
    """List the runs in a store."""
    from gdscope.store import Store

    if not store.exists():
        _fail(FileNotFoundError(f"no store at {store}: pass --store PATH"))
    try:
        with Store(store) as s:
            table = Table(title=str(store))
            for col in ("id", "name", "status", "last step", "created"):
                table.add_column(col)
            for r in s.runs():
                table.add_row(
                    str(r.id),
                    r.name,
                    r.status_label,
                    "" if r.last_step is None else str(r.last_step),
                    time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created_at)),
                )
            console.print(table)
    except GdscopeError as e:
        _fail(e)


@app.command()
def report(
    run: list[str] = typer.Argument(..., help="Run ids or names (several overlay in one page)."),
    store: Path = typer.Option(Path("runs.db"), help="The SQLite store."),
    out: Path = typer.Option(Path("report.html"), help="HTML file to write."),
) -> None:
    """Write a self-contained HTML report for one or more runs."""
    from gdscope.report import write_report
    from gdscope.store import Store

    if not store.exists():
        _fail(FileNotFoundError(f"no store at {store}: pass --store PATH"))
    try:
        with Store(store) as s:
            ids = [s.run(int(r) if r.isdigit() else r).id for r in run]
            path = write_report(s, ids, out)
    except GdscopeError as e:
        _fail(e)
        return
    console.print(f"report: {path}")
