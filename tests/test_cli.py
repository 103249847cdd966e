"""The command line end to end: demo, runs, report."""

from __future__ import annotations

import sqlite3

from typer.testing import CliRunner

from gdscope.cli import app

runner = CliRunner(env={"COLUMNS": "200"})


def test_demo_runs_writes_store_and_report_and_explains(tmp_path):
    out = tmp_path / "demo"
    res = runner.invoke(app, ["demo", "--out", str(out), "--steps", "120", "--samples", "64"])
    assert res.exit_code == 0, res.output
    assert (out / "runs.db").exists() and (out / "report.html").exists()
    for name in ("demo-ntk-m2048", "demo-gd-lr0.25", "demo-gd-lr1", "demo-gd-lr2"):
        assert name in res.output
    assert "kernel regime" in res.output and "feature learning" in res.output
    assert "NTK certificate" in res.output and "λ_min(K₀)" in res.output
    assert "edge of stability" in res.output and "outside" in res.output
    assert "✘ fails" not in res.output
    con = sqlite3.connect(out / "runs.db")
    statuses = [r[0] for r in con.execute("SELECT status FROM runs ORDER BY id")]
    assert statuses == ["completed"] * 4
    # the high learning rate reaches the edge of stability quickly: sharpness ≥ 0.95·2/η
    sharp = con.execute(
        "SELECT MAX(m.value) FROM metrics m JOIN runs r ON r.id = m.run_id "
        "WHERE r.name = 'demo-gd-lr2' AND m.name = 'sharpness'"
    ).fetchone()[0]
    assert sharp >= 0.95 * 2 / 2.0

    res = runner.invoke(app, ["runs", "--store", str(out / "runs.db")])
    assert res.exit_code == 0 and "demo-gd-lr1" in res.output and "completed" in res.output

    report = tmp_path / "one.html"
    res = runner.invoke(
        app, ["report", "demo-gd-lr1", "--store", str(out / "runs.db"), "--out", str(report)]
    )
    assert res.exit_code == 0, res.output
    html = report.read_text()
    assert "demo-gd-lr1" in html  # (other runs appear only in the demo's verdict details)


def test_missing_store_and_unknown_run_are_clear_errors(tmp_path):
    res = runner.invoke(app, ["runs", "--store", str(tmp_path / "nope.db")])
    assert res.exit_code == 2 and "no store" in res.output
    out = tmp_path / "d"
    res = runner.invoke(app, ["demo", "--out", str(out), "--steps", "2", "--samples", "32"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["report", "no-such-run", "--store", str(out / "runs.db")])
    assert res.exit_code == 2 and "no-such-run" in res.output
