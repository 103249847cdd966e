"""``gdscope export`` (CSV, Parquet) and the documented store schema read with pandas.read_sql."""

from __future__ import annotations

import csv
import json
import math
import sqlite3

import pytest
from typer.testing import CliRunner

from gdscope.cli import app
from gdscope.errors import InvalidArgumentError
from gdscope.export import export_metrics
from gdscope.store import CSV_COLUMNS, MetricRow, Store

runner = CliRunner()


@pytest.fixture
def db(tmp_path):
    """Two runs written through the Store API: NaN, inf, before/after values."""
    path = tmp_path / "runs.db"
    with Store(path) as s:
        a = s.create_run("alpha", {"lr": 0.1})
        s.log_step(a, 0, [MetricRow("loss", 1.5, "loss", "before"), MetricRow("x", math.nan)])
        s.log_step(a, 1, [MetricRow("sharpness", 3.25, "sharpness", "after")])
        s.finish_run(a, "completed")
        b = s.create_run("beta", {"lr": 0.2})
        s.log_step(b, 0, [MetricRow("loss", math.inf, "loss", "before")])
        s.finish_run(b, "diverged")
    return path


EXPECTED = [
    (1, "alpha", 0, 0, "loss", 1.5, "loss", "before"),
    (1, "alpha", 0, 0, "x", math.nan, "", "before"),
    (1, "alpha", 1, 2, "sharpness", 3.25, "sharpness", "after"),
    (2, "beta", 0, 0, "loss", math.inf, "loss", "before"),
]


def _same(rows, expected):
    assert len(rows) == len(expected)
    for got, want in zip(rows, expected, strict=True):
        assert got[:5] == want[:5] and got[6:] == want[6:]
        assert got[5] == want[5] or (math.isnan(got[5]) and math.isnan(want[5]))


def _read_csv(path):
    with open(path) as f:
        r = csv.reader(f)
        assert tuple(next(r)) == CSV_COLUMNS
        return [(int(a), b, int(c), int(d), e, float(v), p, it) for a, b, c, d, e, v, p, it in r]


def test_cli_export_csv_one_run_and_all(db, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["export", "alpha", "--store", str(db)])
    assert res.exit_code == 0, res.output
    _same(_read_csv(tmp_path / "run-1.csv"), EXPECTED[:3])
    res = runner.invoke(app, ["export", "--store", str(db), "--out", "all.csv"])
    assert res.exit_code == 0, res.output
    _same(_read_csv(tmp_path / "all.csv"), EXPECTED)
    # an earlier export is replaced; the store and foreign files are refused
    assert (
        runner.invoke(app, ["export", "2", "--store", str(db), "--out", "all.csv"]).exit_code == 0
    )
    _same(_read_csv(tmp_path / "all.csv"), EXPECTED[3:])
    res = runner.invoke(app, ["export", "1", "--store", str(db), "--out", str(db)])
    assert res.exit_code == 2 and "store" in res.output
    (tmp_path / "notes.csv").write_text("mine\n")
    res = runner.invoke(app, ["export", "1", "--store", str(db), "--out", "notes.csv"])
    assert res.exit_code == 2 and (tmp_path / "notes.csv").read_text() == "mine\n"


def test_cli_export_errors(db, tmp_path):
    res = runner.invoke(app, ["export", "1", "--store", str(db), "--format", "xlsx"])
    assert res.exit_code == 2 and "csv or parquet" in res.output
    res = runner.invoke(app, ["export", "gamma", "--store", str(db)])
    assert res.exit_code == 2 and "no run 'gamma'" in res.output
    res = runner.invoke(app, ["export", "--store", str(tmp_path / "none.db")])
    assert res.exit_code == 2 and "no store" in res.output


def test_export_parquet(db, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    with Store(db, readonly=True) as s:
        out = export_metrics(s, tmp_path / "m.parquet", format="parquet")
        table = pq.read_table(out)
        assert tuple(table.column_names) == CSV_COLUMNS
        assert table.schema.metadata[b"generator"] == b"gdscope"
        rows = list(zip(*(table.column(c).to_pylist() for c in CSV_COLUMNS), strict=True))
        _same(rows, EXPECTED)
        export_metrics(s, out, run="beta", format="parquet")  # its own export: replaced
        table = pq.read_table(out)
        _same(
            list(zip(*(table.column(c).to_pylist() for c in CSV_COLUMNS), strict=True)),
            EXPECTED[3:],
        )
        (tmp_path / "other.parquet").write_bytes(b"PAR1 not ours")
        for bad in (tmp_path / "other.parquet", db, tmp_path / "nodir" / "m.parquet", tmp_path):
            with pytest.raises(InvalidArgumentError):
                export_metrics(s, bad, format="parquet")
        s.to_csv(tmp_path / "m.csv")
        with pytest.raises(InvalidArgumentError, match="CSV export, not a Parquet"):
            export_metrics(s, tmp_path / "m.csv", format="parquet")
        with pytest.raises(InvalidArgumentError, match="format"):
            export_metrics(s, tmp_path / "m.json", format="json")  # type: ignore[arg-type]


def test_cli_export_parquet(db, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "x.parquet"
    res = runner.invoke(
        app, ["export", "1", "--store", str(db), "--format", "parquet", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert pq.read_table(out).num_rows == 3


def test_parquet_without_pyarrow_is_a_clear_error(db, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.startswith("pyarrow"):
            raise ImportError("no pyarrow")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with Store(db, readonly=True) as s, pytest.raises(Exception, match="pip install pyarrow"):
        export_metrics(s, tmp_path / "m.parquet", format="parquet")


def test_documented_schema_with_pandas_read_sql(db):
    """docs/store-schema.md: the queries it shows work with pandas.read_sql on the store."""
    pd = pytest.importorskip("pandas")
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        runs = pd.read_sql("SELECT id, name, status, config FROM runs ORDER BY id", con)
        assert runs["name"].tolist() == ["alpha", "beta"]
        assert runs["status"].tolist() == ["completed", "diverged"]
        assert json.loads(runs["config"][1]) == {"lr": 0.2}
        m = pd.read_sql(
            "SELECT r.name AS run, m.step, m.step + (m.iterate = 'after') AS iterate_index, "
            "m.name, m.value, m.iterate FROM metrics m JOIN runs r ON r.id = m.run_id "
            "ORDER BY m.run_id, m.step, m.name",
            con,
        )
        wide = m.pivot_table(index=["run", "iterate_index"], columns="name", values="value")
        assert wide.loc[("alpha", 2), "sharpness"] == 3.25
        assert m["value"].isna().tolist() == [False, True, False, False]  # NULL is NaN
        assert m["value"].iloc[3] == math.inf
        assert pd.read_sql("SELECT value FROM meta WHERE key = 'schema_version'", con).iloc[0, 0]
    finally:
        con.close()
