"""The SQLite results store: round trips, atomic steps, crash safety, errors, exports."""

from __future__ import annotations

import csv
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

import gdscope.store
from gdscope.errors import GdscopeError, InvalidArgumentError, StoreError
from gdscope.store import CSV_COLUMNS, MetricRow, RunInfo, Store, environment_info

SRC = Path(gdscope.store.__file__).resolve().parents[1]
ENV = {"python": "3.x"}  # skips environment_info() where the test is not about it


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "runs.db") as s:
        yield s


def test_round_trip(store):
    config = {"lr": np.float32(0.5), "sizes": (4, 8), "data": Path("/d/x.npz"), "n": np.int64(3)}
    run = store.create_run("first", config)
    store.log_step(
        run, 0, [MetricRow("loss", 2.0, "loss"), MetricRow("sharpness", 3, "s", "after")]
    )
    store.log_step(run, 1, [MetricRow("loss", np.float32(1.5), "loss"), MetricRow("ok", True)])
    store.finish_run(run, "completed", {"final": np.float64(1.5)})

    info = store.run(run)
    assert isinstance(info, RunInfo)
    assert info.name == "first" and info.status == "completed" and info.last_step == 1
    assert info.config == {"lr": 0.5, "sizes": [4, 8], "data": "/d/x.npz", "n": 3}
    assert info.summary == {"final": 1.5}
    assert info.complete and info.status_label == "completed"
    assert info.finished_at is not None and info.finished_at >= info.created_at
    assert set(environment_info()) <= set(info.environment)
    assert store.runs() == [info] and store.run("first") == info

    assert store.metric_names(run) == ["loss", "ok", "sharpness"]
    x, v = store.series(run, "loss")
    assert x.tolist() == [0, 1] and v.tolist() == [2.0, 1.5] and v.dtype == np.float64
    x, v = store.series(run, "sharpness")
    assert x.tolist() == [1] and v.tolist() == [3.0]  # 'after' step 0 describes iterate 1
    assert store.metrics(run) == [
        (0, "loss", 2.0, "loss", "before"),
        (0, "sharpness", 3.0, "s", "after"),
        (1, "loss", 1.5, "loss", "before"),
        (1, "ok", 1.0, "", "before"),
    ]


def test_environment_info_fields():
    env = environment_info()
    assert {"python", "platform", "torch", "numpy", "cuda_available", "threads", "hostname"} <= (
        set(env)
    )
    assert isinstance(env["threads"], int) and env["gdscope"]


def test_default_names_and_lookup_by_name(store):
    a = store.create_run(environment=ENV)
    assert store.run(a).name == f"run-{a}"
    first = store.create_run("same", environment=ENV)
    second = store.create_run("same", environment=ENV)
    # a name several runs share is ambiguous: an error listing their ids (it used to pick the
    # latest silently)
    with pytest.raises(InvalidArgumentError, match=rf"ambiguous.*ids {first}, {second}.*an id"):
        store.run("same")
    assert store.run(second).name == "same"
    with pytest.raises(InvalidArgumentError, match=rf"no run 'nope'.*{a} \(run-{a}\).*same"):
        store.run("nope")
    with pytest.raises(InvalidArgumentError, match="no run 99"):
        store.run(99)


def test_unfinished_run_is_incomplete(store):
    run = store.create_run("r", environment=ENV)
    store.log_step(run, 0, [MetricRow("loss", 1.0)])
    info = store.run(run)
    assert info.status == "running" and info.finished_at is None
    assert not info.complete and info.status_label == "incomplete"


def test_step_is_atomic(store):
    run = store.create_run("r", environment=ENV)
    store.log_step(run, 0, [MetricRow("loss", 1.0), MetricRow("acc", 0.5)])
    bad_value = [MetricRow("loss", 0.9), MetricRow("acc", 0.6), MetricRow("x", "oops")]  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match=r"metric 'x'.*'oops'"):
        store.log_step(run, 1, bad_value)

    def failing_rows():
        yield MetricRow("loss", 0.9)
        raise RuntimeError("probe crashed")

    with pytest.raises(RuntimeError, match="probe crashed"):
        store.log_step(run, 1, failing_rows())
    with pytest.raises(InvalidArgumentError, match="already logged"):
        store.log_step(run, 1, [MetricRow("loss", 0.9), MetricRow("loss", 0.8)])
    with pytest.raises(InvalidArgumentError, match="iterate"):
        store.log_step(run, 1, [MetricRow("loss", 0.9), MetricRow("acc", 0.7, iterate="later")])

    assert store.metrics(run) == [(0, "acc", 0.5, "", "before"), (0, "loss", 1.0, "", "before")]
    assert store.run(run).last_step == 0
    store.log_step(run, 1, [MetricRow("loss", 0.9)])  # the store is still usable
    assert store.series(run, "loss")[1].tolist() == [1.0, 0.9]


def test_log_blocks_stores_every_value_once_and_all_or_nothing(store):
    """log_blocks (the Tracker's fast path): each block's rows land as (step, name) values;
    one transaction across blocks; numbers of other types are converted."""
    run = store.create_run("r", environment=ENV)
    keys = [("loss", "loss", "before"), ("dist_init", "dist_init", "after")]
    store.log_blocks(
        run,
        [
            (keys, [0, 1], [[1.0, 0.0], [0.5, 0.25]]),
            ([("sharpness", "sharpness", "after")], [1], [[np.float64(2.5)]]),
            (keys, [2], [[0.25, 3]]),
        ],
    )
    assert store.series(run, "loss")[1].tolist() == [1.0, 0.5, 0.25]
    assert store.series(run, "dist_init")[1].tolist() == [0.0, 0.25, 3.0]
    assert store.series(run, "sharpness")[1].tolist() == [2.5]
    rows = {(s, n): (v, pr, it) for s, n, v, pr, it in store.metrics(run)}
    assert rows[(1, "dist_init")] == (0.25, "dist_init", "after")
    # a later block repeating a stored step: nothing of the call is stored
    with pytest.raises(InvalidArgumentError, match="already logged"):
        store.log_blocks(run, [(keys, [3], [[0.1, 0.1]]), (keys, [2], [[0.1, 0.1]])])
    assert store.series(run, "loss")[0].tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("block", "match"),
    [
        (([("loss", "p", "before")], [0], [["x"]]), "'loss': value 'x' is not a number"),
        (([("loss", "p", "before")], [0], [[1.0, 2.0]]), "step 0 has 2 values for 1 names"),
        (([("loss", "p", "before")], [0, 1], [[1.0]]), "one row per step"),
        (([("loss", "p", "before")], [], []), "at least one step"),
        (([("loss", "p", "before"), ("loss", "q", "after")], [0], [[1.0, 2.0]]), "more than"),
        (([("loss", "p", "during")], [0], [[1.0]]), "iterate='during'"),
        (([("loss", "p", "before")], [-1], [[1.0]]), "step=-1"),
        (([(None, "p", "before")], [0], [[1.0]]), "MetricRow.name=None"),
    ],
)
def test_log_blocks_refuses_a_bad_block_naming_it(store, block, match):
    run = store.create_run("r", environment=ENV)
    store.log_blocks(run, [([("loss", "p", "before")], [5], [[1.0]])])
    with pytest.raises(InvalidArgumentError, match=match):
        store.log_blocks(run, [([("ok", "p", "before")], [6], [[1.0]]), block])
    assert store.metric_names(run) == ["loss"]  # the good block of the call is not stored
    with pytest.raises(InvalidArgumentError, match="no such run"):
        store.log_blocks(run + 9, [([("loss", "p", "before")], [0], [[1.0]])])


def test_a_store_with_the_earlier_metrics_layout_reads_and_writes_alike(tmp_path):
    """Stores created before the WITHOUT ROWID layout key metrics (run_id, step, name) with an
    index on (run_id, name, step): same columns and uniqueness, so the same calls work."""
    path = tmp_path / "old.db"
    old_ddl = gdscope.store._SCHEMA.replace(
        "    PRIMARY KEY (run_id, name, step)\n) WITHOUT ROWID;",
        "    PRIMARY KEY (run_id, step, name)\n);\n"
        "CREATE INDEX IF NOT EXISTS metrics_by_name ON metrics (run_id, name, step);",
    )
    assert old_ddl != gdscope.store._SCHEMA
    with sqlite3.connect(path) as con:
        con.executescript(old_ddl)
        con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    with Store(path) as db:
        run = db.create_run("r", environment=ENV)
        db.log_blocks(run, [([("loss", "loss", "before")], [0, 1, 2], [[3.0], [2.0], [1.0]])])
        db.log_step(run, 3, [MetricRow("loss", 0.5)])
        with pytest.raises(InvalidArgumentError, match="already logged"):
            db.log_step(run, 2, [MetricRow("loss", 0.1)])
        assert db.series(run, "loss")[1].tolist() == [3.0, 2.0, 1.0, 0.5]
        assert db.runs()[0].last_step == 3
    with sqlite3.connect(path) as con:
        sql = con.execute("SELECT sql FROM sqlite_master WHERE name = 'metrics'").fetchone()[0]
    assert "WITHOUT ROWID" not in sql  # the file's own layout was left as it was


def test_a_batch_of_steps_is_one_transaction(store, tmp_path):
    """log_steps: several steps in one commit; an error in any step stores none of them and
    names the step."""
    run = store.create_run("r", environment=ENV)
    store.log_steps(run, [(t, [MetricRow("loss", 1.0 / (t + 1))]) for t in range(3)])
    assert store.series(run, "loss")[0].tolist() == [0, 1, 2]
    batch = [(3, [MetricRow("loss", 0.2)]), (1, [MetricRow("loss", 0.3)])]
    with pytest.raises(InvalidArgumentError, match="already logged at step 1"):
        store.log_steps(run, batch)
    with pytest.raises(InvalidArgumentError, match="step=-1"):
        store.log_steps(run, [(4, [MetricRow("loss", 0.2)]), (-1, [])])
    assert store.series(run, "loss")[0].tolist() == [0, 1, 2]  # step 3 rolled back too
    with pytest.raises(InvalidArgumentError, match="no such run"):
        store.log_steps(run + 99, [(0, [MetricRow("loss", 1.0)])])
    # one commit per batch: a second connection sees all of a batch or none of it
    db = Store(tmp_path / "b.db")
    r = db.create_run("b", environment=ENV)
    db.log_steps(r, [(t, [MetricRow("loss", float(t))]) for t in range(50)])
    with sqlite3.connect(tmp_path / "b.db") as con:
        assert con.execute("SELECT COUNT(*) FROM metrics").fetchone() == (50,)
    db.close()


def test_non_finite_values_round_trip(store, tmp_path):
    run = store.create_run("r", environment=ENV)
    values = [math.inf, -math.inf, math.nan, 1e-300]
    for t, value in enumerate(values):
        store.log_step(run, t, [MetricRow("loss", value)])
    _, v = store.series(run, "loss")
    assert v[0] == math.inf and v[1] == -math.inf and math.isnan(v[2]) and v[3] == 1e-300
    assert math.isnan(store.metrics(run)[2][2])
    with open(store.to_csv(tmp_path / "m.csv")) as f:
        assert [float(r["value"]) for r in csv.DictReader(f)][:2] == [math.inf, -math.inf]


def test_crash_mid_run_keeps_every_committed_step(tmp_path):
    path = tmp_path / "runs.db"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from gdscope.store import MetricRow, Store
        store = Store({str(path)!r})
        run = store.create_run("crashy", {{"lr": 0.1}})
        for t in range(5):
            store.log_step(run, t, [MetricRow("loss", 1.0 / (t + 1)), MetricRow("acc", t / 4)])
        print("logged", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert "logged" in proc.stdout
    with Store(path) as s:
        info = s.run("crashy")
        assert info.status_label == "incomplete" and not info.complete
        assert info.finished_at is None and info.last_step == 4 and info.config == {"lr": 0.1}
        x, loss = s.series(info.id, "loss")
        assert x.tolist() == [0, 1, 2, 3, 4]
        assert loss.tolist() == pytest.approx([1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5])
        assert s.series(info.id, "acc")[0].tolist() == [0, 1, 2, 3, 4]


def test_missing_or_unwritable_directory_names_path_and_fix(tmp_path):
    missing = tmp_path / "no" / "such" / "runs.db"
    with pytest.raises(StoreError, match=r"no/such.*does not exist.*mkdir -p"):
        Store(missing)
    not_a_dir = tmp_path / "file.txt"
    not_a_dir.write_text("x")
    with pytest.raises(StoreError, match=r"file\.txt"):
        Store(not_a_dir / "runs.db")
    with pytest.raises(StoreError, match=r"file\.txt exists and is not an SQLite database"):
        Store(not_a_dir)
    assert not_a_dir.read_text() == "x"  # SQLite would have overwritten a short file
    assert not missing.parent.exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root may write anywhere")
def test_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(StoreError, match=r"ro.*not writable.*permissions"):
            Store(ro / "runs.db")
    finally:
        ro.chmod(0o700)


def test_memory_store_and_closed_store():
    s = Store(":memory:")
    run = s.create_run("m", environment=ENV)
    s.log_step(run, 0, [MetricRow("loss", 1.0)])
    assert s.series(run, "loss")[1].tolist() == [1.0]
    s.close()
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.runs()
    with pytest.raises(StoreError, match="closed"):
        s.log_step(run, 1, [MetricRow("loss", 1.0)])


def test_bad_arguments(store):
    run = store.create_run("r", environment=ENV)
    with pytest.raises(InvalidArgumentError, match="status"):
        store.finish_run(run, "done")
    with pytest.raises(InvalidArgumentError, match="no such run"):
        store.finish_run(run + 1)
    with pytest.raises(InvalidArgumentError, match="no such run"):
        store.log_step(run + 1, 0, [MetricRow("loss", 1.0)])
    with pytest.raises(InvalidArgumentError, match="step"):
        store.log_step(run, -1, [MetricRow("loss", 1.0)])
    store.log_step(run, 0, [MetricRow("loss", 1.0)])
    with pytest.raises(InvalidArgumentError, match=r"no metric 'los'.*\['loss'\]"):
        store.series(run, "los")
    assert isinstance(StoreError("x"), GdscopeError)


def test_artifacts(store):
    run = store.create_run("r", environment=ENV)
    store.add_artifact(run, "model.pt", b"\x00\x01")
    store.add_artifact(run, "notes", "héllo", mime="text/plain")
    assert store.artifact(run, "model.pt") == b"\x00\x01"
    assert store.artifact(run, "notes") == "héllo".encode()
    store.add_artifact(run, "notes", "new")
    assert store.artifact(run, "notes") == b"new"
    with pytest.raises(InvalidArgumentError, match=r"no artifact 'x'.*model\.pt"):
        store.artifact(run, "x")
    with pytest.raises(InvalidArgumentError):
        store.add_artifact(run + 1, "x", b"")


def test_csv_export(store, tmp_path):
    a = store.create_run("a", environment=ENV)
    b = store.create_run("b", environment=ENV)
    store.log_step(a, 0, [MetricRow("loss", 1.0, "loss"), MetricRow("dist", 0.5, "d", "after")])
    store.log_step(b, 3, [MetricRow("loss", 2.0, "loss")])
    with open(store.to_csv(tmp_path / "all.csv")) as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert rows[1:] == [
        [str(a), "a", "0", "1", "dist", "0.5", "d", "after"],
        [str(a), "a", "0", "0", "loss", "1.0", "loss", "before"],
        [str(b), "b", "3", "3", "loss", "2.0", "loss", "before"],
    ]
    with open(store.to_csv(tmp_path / "b.csv", run_id=b)) as f:
        assert [r["run_name"] for r in csv.DictReader(f)] == ["b"]
    # a bad path is a bad argument (InvalidArgumentError; it was a StoreError before the one
    # output-path check, gdscope.store.check_output)
    with pytest.raises(InvalidArgumentError, match=r"path=.*missing.*does not exist"):
        store.to_csv(tmp_path / "missing" / "x.csv")


def test_to_pandas(store, monkeypatch):
    run = store.create_run("a", environment=ENV)
    store.log_step(run, 0, [MetricRow("loss", 1.0)])
    try:
        import pandas  # noqa: F401
    except ImportError:
        pass
    else:
        df = store.to_pandas(run)
        assert list(df.columns) == list(CSV_COLUMNS) and df["value"].tolist() == [1.0]
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(GdscopeError, match="pip install pandas"):
        store.to_pandas()


def test_readable_with_plain_sqlite3(tmp_path):
    path = tmp_path / "runs.db"
    with Store(path) as s:
        run = s.create_run("plain", {"lr": 0.1}, environment=ENV)
        s.log_step(run, 0, [MetricRow("loss", 1.0, "loss"), MetricRow("d", 2.0, "d", "after")])
        s.finish_run(run, "diverged")
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            "1",
        )
        name, status, config, last = con.execute(
            "SELECT name, status, config, (SELECT MAX(step) FROM metrics) FROM runs"
        ).fetchone()
        assert (name, status, last) == ("plain", "diverged", 0) and '"lr": 0.1' in config
        assert con.execute(
            "SELECT step, name, value, probe, iterate FROM metrics ORDER BY name"
        ).fetchall() == [
            (0, "d", 2.0, "d", "after"),
            (0, "loss", 1.0, "loss", "before"),
        ]
    finally:
        con.close()


def test_threads_share_one_store(store):
    runs = [store.create_run(f"t{i}", environment=ENV) for i in range(4)]

    def work(run: int) -> None:
        for t in range(50):
            store.log_step(run, t, [MetricRow("loss", float(t)), MetricRow("acc", 0.5)])

    threads = [threading.Thread(target=work, args=(r,)) for r in runs]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for r in runs:
        assert store.series(r, "loss")[1].tolist() == [float(t) for t in range(50)]
        assert store.run(r).last_step == 49


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "runs.db"
    Store(path).close()
    con = sqlite3.connect(path)
    with con:
        con.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    con.close()
    with pytest.raises(StoreError, match=r"schema version 99.*upgrade gdscope"):
        Store(path)
