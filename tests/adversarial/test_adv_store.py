"""Adversarial inputs to the store: run names, look-ups, read-only stores, CSV export paths."""

from __future__ import annotations

import csv
import os
import sqlite3
from pathlib import Path

import pytest

from gdscope.errors import InvalidArgumentError, StoreError
from gdscope.store import CSV_COLUMNS, HTML_MARKER, MetricRow, Store

ENV = {"python": "3", "torch": "2"}


@pytest.fixture
def store(tmp_path):
    with Store(tmp_path / "runs.db") as s:
        yield s


def _bytes(path: Path) -> bytes:
    return path.read_bytes()


# ---------------------------------------------------------------------- run names
BAD_NAMES = [
    ("a\udc80", "UTF-8 cannot encode"),  # a lone surrogate (os.fsdecode of a bad file name)
    ("\udcff", "UTF-8 cannot encode"),
    ("\ud800x", "UTF-8 cannot encode"),
    ("ok\x1b[31mred", "control character"),
    ("a\nb", "control character"),
    ("a\rb", "control character"),
    ("tab\there", "control character"),
    ("nul\x00", "control character"),
    ("bell\x07", "control character"),
    ("del\x7f", "control character"),
    ("csi\x9b31m", "control character"),
    ("42", "reads as a run id"),
    (" 7 ", "reads as a run id"),
    ("007", "reads as a run id"),
    (5, "must be a string"),
    (b"bytes", "must be a string"),
    (["list"], "must be a string"),
    (3.5, "must be a string"),
    ("   ", "is blank"),
    ("\t", "control character"),
]


@pytest.mark.parametrize(("name", "message"), BAD_NAMES)
def test_create_run_refuses_bad_names(store, name, message):
    with pytest.raises(InvalidArgumentError, match=r"\bname\b") as info:
        store.create_run(name, environment=ENV)
    assert message in str(info.value)
    assert store.runs() == []  # nothing half-created


@pytest.mark.parametrize(
    "name", ["[/]", "[bold red]x[/]", "ünïcødé", "a b", "run-1", "x" * 500, ":warning:"]
)
def test_odd_but_printable_names_are_stored_as_is(store, name):
    run = store.create_run(name, environment=ENV)
    assert store.run(run).name == name and store.run(name).id == run


@pytest.mark.parametrize(
    ("row", "arg"),
    [
        (MetricRow("loss\udc80", 1.0), "MetricRow.name"),
        (MetricRow("loss", 1.0, probe="p\udc80"), "probe"),
        (MetricRow(3, 1.0), "MetricRow.name"),  # type: ignore[arg-type]
    ],
)
def test_log_step_refuses_unstorable_text(store, row, arg):
    run = store.create_run("r", environment=ENV)
    with pytest.raises(InvalidArgumentError, match=rf"\b{arg}\b"):
        store.log_step(run, 0, [MetricRow("ok", 1.0), row])
    assert store.metrics(run) == []  # the step is all or nothing


@pytest.mark.parametrize(
    ("kwargs", "arg"),
    [
        ({"name": "a\udc80", "data": b"x"}, "name"),
        ({"name": "a", "data": "\udc80"}, "data"),
        ({"name": "a", "data": b"x", "mime": "text/\udc80"}, "mime"),
    ],
)
def test_add_artifact_refuses_unstorable_text(store, kwargs, arg):
    run = store.create_run("r", environment=ENV)
    with pytest.raises(InvalidArgumentError, match=rf"\b{arg}\b"):
        store.add_artifact(run, **kwargs)


# ---------------------------------------------------------------------- look-ups
def test_a_shared_name_is_ambiguous_and_lists_the_ids(store):
    a = store.create_run("same", environment=ENV)
    b = store.create_run("same", environment=ENV)
    c = store.create_run("same", environment=ENV)
    with pytest.raises(InvalidArgumentError, match=rf"'same' is ambiguous.*ids {a}, {b}, {c}"):
        store.run("same")
    assert [store.run(i).id for i in (a, b, c)] == [a, b, c]  # ids still work


@pytest.mark.parametrize("run", [1.5, None, True, [1], "a\udc80", "nope"])
def test_run_lookup_of_bad_keys_is_a_clear_error(store, run):
    store.create_run("r", environment=ENV)
    with pytest.raises(InvalidArgumentError, match=r"\brun\b"):
        store.run(run)


# ---------------------------------------------------------------------- read-only stores
def _filled(path: Path) -> Path:
    with Store(path) as s:
        run = s.create_run("kept", environment=ENV)
        s.log_step(run, 0, [MetricRow("loss", 1.0)])
        s.finish_run(run)
    return path


@pytest.mark.parametrize("how", ["file-444", "directory-555", "no-write-access"])
def test_a_read_only_store_opens_read_only(tmp_path, monkeypatch, how):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = _filled(folder / "runs.db")
    before = _bytes(path)
    path.chmod(0o444)
    if how == "directory-555":
        folder.chmod(0o555)
    real_access = os.access
    if how == "no-write-access":  # what a non-root user sees (root may write anyway)
        monkeypatch.setattr(
            os, "access", lambda p, mode, **kw: False if mode & os.W_OK else real_access(p, mode)
        )
        with pytest.raises(StoreError, match="not writable"):
            Store(path)
    try:
        with Store(path, readonly=True) as s:
            assert [r.name for r in s.runs()] == ["kept"]
            with pytest.raises(StoreError, match=r"readonly|read-only"):
                s.create_run("new", environment=ENV)
    finally:
        folder.chmod(0o755)
        path.chmod(0o644)
    assert _bytes(path) == before


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "no store at"),
        (
            lambda p: p.write_text("not a database, but long enough to have a header"),
            "not an SQLite",
        ),
        (
            lambda p: sqlite3.connect(p).execute("CREATE TABLE t (x)").connection.commit(),
            "not a gdscope",
        ),
        (lambda p: p.mkdir(), "no store at"),
    ],
    ids=["missing", "text-file", "foreign-sqlite", "directory"],
)
def test_readonly_refuses_what_is_not_a_store(tmp_path, setup, message):
    path = tmp_path / "x.db"
    setup(path)
    with pytest.raises(StoreError, match=message):
        Store(path, readonly=True)


def test_readonly_memory_store_is_refused():
    with pytest.raises(InvalidArgumentError, match="readonly"):
        Store(":memory:", readonly=True)


# ---------------------------------------------------------------------- CSV export paths
def _csv_targets(tmp_path: Path, store_path: Path) -> dict[str, Path]:
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    (tmp_path / "page.html").write_text(f"<!DOCTYPE html><head>{HTML_MARKER}</head>")
    (tmp_path / "folder").mkdir()
    with Store(tmp_path / "other.db") as other:
        other.create_run("o", environment=ENV)
    (tmp_path / "link-to-store.csv").symlink_to(store_path)
    (tmp_path / "dangling.csv").symlink_to(tmp_path / "nowhere" / "x")
    (tmp_path / "sub").mkdir()
    return {
        "the-store": store_path,
        "store-via-dotdot": tmp_path / "sub" / ".." / store_path.name,
        "symlink-to-store": tmp_path / "link-to-store.csv",
        "store-wal": store_path.with_name(store_path.name + "-wal"),
        "store-shm": store_path.with_name(store_path.name + "-shm"),
        "foreign-text": tmp_path / "notes.txt",
        "foreign-csv": tmp_path / "data.csv",
        "gdscope-html": tmp_path / "page.html",
        "directory": tmp_path / "folder",
        "another-store": tmp_path / "other.db",
        "dangling-symlink": tmp_path / "dangling.csv",
        "missing-directory": tmp_path / "missing" / "x.csv",
    }


@pytest.mark.parametrize(
    "target",
    [
        "the-store",
        "store-via-dotdot",
        "symlink-to-store",
        "store-wal",
        "store-shm",
        "foreign-text",
        "foreign-csv",
        "gdscope-html",
        "directory",
        "another-store",
        "dangling-symlink",
        "missing-directory",
    ],
)
def test_to_csv_never_writes_over_the_store_or_a_foreign_file(tmp_path, target):
    store_path = tmp_path / "runs.db"
    with Store(store_path) as s:
        run = s.create_run("r", environment=ENV)
        s.log_step(run, 0, [MetricRow("loss", 1.0)])
    path = _csv_targets(tmp_path, store_path)[target]
    existing = {p: _bytes(p) for p in tmp_path.iterdir() if p.is_file()}
    with Store(store_path) as s, pytest.raises(InvalidArgumentError, match=r"\bpath\b"):
        s.to_csv(path)
    for p, data in existing.items():  # the store and every other file byte-identical
        assert _bytes(p) == data, p


def test_to_csv_replaces_its_own_csv(store, tmp_path):
    run = store.create_run("r", environment=ENV)
    store.log_step(run, 0, [MetricRow("loss", 1.0)])
    out = tmp_path / "m.csv"
    store.to_csv(out)
    store.log_step(run, 1, [MetricRow("loss", 0.5)])
    store.to_csv(out)  # the header says gdscope wrote it
    with out.open() as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 3
