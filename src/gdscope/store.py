"""SQLite results store: runs, per-step metrics and artifacts in plain tables.

    with Store("runs.db") as store:
        run = store.create_run("my-run", config={"lr": 0.1})
        store.log_step(run, 0, [MetricRow("loss", 2.3, probe="loss")])
        store.finish_run(run, "completed")
        steps, loss = store.series(run, "loss")

The schema is readable with the ``sqlite3`` command line, without gdscope:

- ``runs(id, name, status, config, environment, summary, created_at, finished_at)``;
  ``config``, ``environment`` and ``summary`` hold JSON, times are Unix seconds.
- ``metrics(run_id, step, name, value, probe, iterate)``: ``iterate`` is ``'before'`` when the
  value describes the parameters before that step's optimizer update (θ_t) and ``'after'`` when
  it describes θ_{t+1}. A NULL ``value`` is NaN (SQLite cannot store NaN); ±inf are stored as is.
- ``artifacts(run_id, name, mime, data, created_at)`` and ``meta(key, value)``.
- ``experiments(id, name, sweep, config_hash, config, status, verdicts, results, figures,
  run_ids, seconds, created_at)``: one row per experiment run (JSON columns), written together
  with its runs in one transaction. ``(sweep, config_hash)`` is UNIQUE, so a sweep point is
  stored once however often it is retried.

The database runs in WAL mode with ``synchronous=NORMAL``: every :meth:`Store.log_step` is one
transaction, so a process that dies mid-run loses at most the step it was writing. Such a run
stays ``running`` with no ``finished_at`` and is shown as *incomplete*.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePath
from typing import Any, Literal

import numpy as np

from gdscope.errors import GdscopeError, InvalidArgumentError, StoreError

__all__ = [
    "HTML_MARKER",
    "ExperimentInfo",
    "MetricRow",
    "RunInfo",
    "RunPayload",
    "Store",
    "check_name",
    "check_output",
    "environment_info",
    "write_output",
]

SCHEMA_VERSION = 1
RUN_STATUSES = ("running", "completed", "failed", "diverged")
ITERATES = ("before", "after")
_SQLITE_MAGIC = b"SQLite format 3\x00"
CSV_COLUMNS = ("run_id", "run_name", "step", "iterate_index", "name", "value", "probe", "iterate")
#: In the ``<head>`` of every HTML page gdscope writes: such a page may be overwritten.
HTML_MARKER = "<meta name='generator' content='gdscope'>"
#: The key (value ``"gdscope"``) gdscope writes into its own JSON objects (``sweep.json``).
JSON_GENERATOR = "generator"
#: Bytes of an existing page read to recognise it as gdscope's.
_SNIFF_BYTES = 65536
OutputKind = Literal["html", "json", "csv"]

# ``metrics`` is one B-tree keyed (run_id, name, step) (WITHOUT ROWID): a series is one range
# scan and an insert touches one tree. Stores created before 2026-12-03 key it (run_id, step,
# name) with a second index on (run_id, name, step): the same columns and uniqueness, read alike.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    status TEXT NOT NULL,
    config TEXT,
    environment TEXT,
    summary TEXT,
    created_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id INTEGER NOT NULL,
    step INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    probe TEXT,
    iterate TEXT,
    PRIMARY KEY (run_id, name, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS artifacts (
    run_id INTEGER NOT NULL,
    name TEXT NOT NULL,
    mime TEXT,
    data BLOB,
    created_at REAL,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS experiments (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    sweep TEXT,
    config_hash TEXT NOT NULL,
    config TEXT,
    status TEXT NOT NULL,
    verdicts TEXT,
    results TEXT,
    figures TEXT,
    run_ids TEXT,
    seconds REAL,
    created_at REAL,
    UNIQUE (sweep, config_hash)
);
"""


@dataclass(frozen=True)
class MetricRow:
    """One value of one step: ``iterate`` is ``"before"`` (θ_t) or ``"after"`` (θ_{t+1})."""

    name: str
    value: float
    probe: str = ""
    iterate: str = "before"


@dataclass(frozen=True)
class RunInfo:
    """A run as stored. ``complete`` is False for a run still running or whose process died."""

    id: int
    name: str
    status: str
    config: dict[str, Any]
    environment: dict[str, Any]
    summary: dict[str, Any]
    created_at: float
    finished_at: float | None
    last_step: int | None

    @property
    def complete(self) -> bool:
        """Whether the run was finished (completed, failed or diverged)."""
        return self.status != "running" and self.finished_at is not None

    @property
    def status_label(self) -> str:
        """The status, or ``"incomplete"`` for a run that was never finished."""
        return self.status if self.complete else "incomplete"


@dataclass(frozen=True)
class ExperimentInfo:
    """An experiment run as stored: its config, verdicts (dicts), results and run ids."""

    id: int
    name: str
    sweep: str | None
    config_hash: str
    config: dict[str, Any]
    status: str
    verdicts: list[dict[str, Any]]
    results: Any
    figures: list[dict[str, Any]]
    run_ids: list[int]
    seconds: float | None
    created_at: float


#: A run detached from its store (:meth:`Store.export_run`), to move it between processes.
RunPayload = dict[str, Any]


def environment_info() -> dict[str, Any]:
    """Versions, device and threads of this process, recorded with each run.

    ``thread_choice`` is the :class:`gdscope.threads.ThreadChoice` in force (how many threads and
    why: CPUs allowed, busy, free), or None when the thread count was not chosen by gdscope.
    """
    import torch

    from gdscope.threads import current_choice

    choice = current_choice()

    cuda = torch.cuda.is_available()
    try:
        version = metadata.version("gdscope")
    except metadata.PackageNotFoundError:
        version = "dev"
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cuda_available": cuda,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "threads": torch.get_num_threads(),
        "thread_choice": None if choice is None else choice.to_dict(),
        "hostname": socket.gethostname(),
        "gdscope": version,
    }


def _json_default(obj: Any) -> Any:
    """numpy/torch scalars and arrays, paths and sets; anything else by its ``repr``."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj, key=repr)
    return repr(obj)


def _dumps(obj: dict[str, Any] | None) -> str:
    return json.dumps(obj or {}, default=_json_default)


def _as_float(row: MetricRow) -> float:
    try:
        if isinstance(row.value, (str, bytes)):
            raise TypeError("a string")
        return float(row.value)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(
            f"metric {row.name!r}: value {row.value!r} is not a number ({e}); pass a float."
        ) from e


def _value(v: float | None) -> float:
    return math.nan if v is None else v


# ---------------------------------------------------------------------------------- output files
def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise InvalidArgumentError(f"step={step!r} must be a non-negative integer.")
    return int(step)


def _metric_values(row: MetricRow) -> tuple[str, float, str, str]:
    """``(name, value, probe, iterate)`` of a row, checked."""
    _check_text(row.name, "MetricRow.name")
    _check_text(row.probe, f"metric {row.name!r}: probe")
    if row.iterate not in ITERATES:
        raise InvalidArgumentError(
            f"metric {row.name!r}: iterate={row.iterate!r} must be one of {ITERATES}."
        )
    return row.name, _as_float(row), row.probe, row.iterate


#: ``(keys, steps, values)``: see :meth:`Store.log_blocks`.
Block = tuple[Sequence[tuple[str, str, str]], Sequence[int], Sequence[Sequence[float]]]


def _check_block(
    keys: Sequence[tuple[str, str, str]], steps: Sequence[int], values: Sequence[Sequence[float]]
) -> tuple[list[tuple[str, str, str]], list[int], Sequence[Sequence[float]]]:
    """A block's names checked once, its steps and the shape and type of its values."""
    checked = [_metric_values(MetricRow(n, 0.0, pr, it)) for n, pr, it in keys]
    names = [c[0] for c in checked]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise InvalidArgumentError(f"a block of steps names {twice} more than once.")
    steps = [_check_step(s) for s in steps]
    if not steps or len(values) != len(steps):
        raise InvalidArgumentError(
            f"a block of {len(steps)} steps has {len(values)} rows of values: give one row per "
            "step, and at least one step."
        )
    width = len(checked)
    rows = list(values)
    for i, (step, row) in enumerate(zip(steps, rows, strict=True)):
        if len(row) != width:
            raise InvalidArgumentError(f"step {step} has {len(row)} values for {width} names.")
        if not all(type(v) is float for v in row):  # converted, or refused naming the metric
            rows[i] = [
                _as_float(MetricRow(n, v, pr, it))
                for (n, _, pr, it), v in zip(checked, row, strict=True)
            ]
    return [(n, pr, it) for n, _, pr, it in checked], steps, rows


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` and ``b`` name one file (resolved, symlinks followed; may not exist yet)."""
    ra, rb = a.expanduser().resolve(), b.expanduser().resolve()
    if ra == rb:
        return True
    try:
        return os.path.samefile(ra, rb)
    except OSError:
        return False


def _protected(path: Path, store: Path) -> bool:
    """Whether writing ``path`` would write over the store ``store`` or its journal files."""
    return any(
        _same_file(path, store.with_name(store.name + suffix))
        for suffix in ("", "-wal", "-shm", "-journal")
    )


def _is_gdscope_output(path: Path, kind: OutputKind) -> bool:
    """Whether the existing file ``path`` is a ``kind`` output gdscope wrote (so replaceable)."""
    try:
        with path.open("rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return False
    if kind == "html":
        text = head.decode("utf-8", "replace")
        legacy = text.startswith("<!DOCTYPE html>") and "<p class='generated'>" in text
        return HTML_MARKER in text or (legacy and " by gdscope " in text)
    if kind == "csv":
        return head.split(b"\n", 1)[0].rstrip(b"\r") == ",".join(CSV_COLUMNS).encode()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if isinstance(data, dict):  # sweep.json (older ones had no generator key)
        return data.get(JSON_GENERATOR) == "gdscope" or {"sweep", "experiment", "points"} <= set(
            data
        )
    # verdict.json: a list of verdicts, each with claim, predicted, measured and holds
    return isinstance(data, list) and all(
        isinstance(v, dict) and {"claim", "predicted", "measured", "holds"} <= set(v) for v in data
    )


def check_output(
    path: str | os.PathLike[str],
    kind: OutputKind,
    *,
    protect: Iterable[str | os.PathLike[str]] = (),
    arg: str = "path",
) -> Path:
    """``path`` as a Path, if gdscope may write its ``kind`` output there; else refuse.

    Every file gdscope writes (HTML pages, ``verdict.json``, ``sweep.json``, CSV exports) goes
    through this check. Refused, with :class:`InvalidArgumentError` naming ``arg``: a path in a
    directory that does not exist, a directory, a path that is (or links to) a store in
    ``protect`` or its journal files, any SQLite database, and any other existing file that is
    not a ``kind`` output gdscope wrote (recognised by :data:`HTML_MARKER`, the
    ``"generator": "gdscope"`` key or the verdict list of ``verdict.json``, the CSV header).
    """
    out = Path(path)
    what = {"html": "the report", "json": "the JSON output", "csv": "the CSV export"}[kind]
    shown = f"cannot write {what} to {arg}={str(path)!r}:"
    if not out.parent.is_dir():
        raise InvalidArgumentError(
            f"{shown} the directory {out.parent} does not exist. Create it first or pass "
            "another path."
        )
    for store in protect:
        if str(store) != ":memory:" and _protected(out, Path(store)):
            raise InvalidArgumentError(
                f"{shown} it is the store {store} (or one of its files), and writing there would "
                f"destroy every run in it. Pass another {arg}, e.g. a new .{kind} file."
            )
    if out.is_dir():
        raise InvalidArgumentError(
            f"{shown} it is a directory; pass the path of a .{kind} file to write."
        )
    if out.exists() or out.is_symlink():
        if not out.is_file():
            raise InvalidArgumentError(
                f"{shown} it exists and is not a regular file; pass the path of a new .{kind} file."
            )
        with out.open("rb") as f:
            sqlite = f.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC
        if sqlite:
            raise InvalidArgumentError(
                f"{shown} it is an SQLite database (a store?) and writing there would destroy "
                f"it. Pass another {arg}, e.g. a new .{kind} file."
            )
        if not _is_gdscope_output(out, kind):
            raise InvalidArgumentError(
                f"{shown} it exists and is not a {kind} file gdscope wrote, so it is not "
                f"overwritten. Move it away or pass another {arg}."
            )
    return out


def write_output(
    path: str | os.PathLike[str],
    text: str,
    kind: OutputKind,
    *,
    protect: Iterable[str | os.PathLike[str]] = (),
    arg: str = "path",
) -> Path:
    """Write ``text`` to ``path`` after :func:`check_output`, atomically (never half a file).

    A symlink to an earlier gdscope output is followed: the file it points to is replaced.
    """
    out = check_output(path, kind, protect=protect, arg=arg)
    target = out.resolve() if out.is_symlink() else out
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8", newline="")
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InvalidArgumentError(
            f"{arg}={str(path)!r}: cannot write it ({e}). Pass a path in an existing, writable "
            "directory."
        ) from e
    return out


def check_name(value: Any, arg: str = "name", *, run: bool = False) -> str:
    """``value`` if it is a name gdscope can store and print: text, UTF-8 encodable, no control
    characters; for a ``run`` name also not all digits (that reads as a run id)."""
    _check_text(value, arg)
    bad = [c for c in value if ord(c) < 32 or 127 <= ord(c) < 160]
    if bad:
        raise InvalidArgumentError(
            f"{arg}={value!r} holds the control character {bad[0]!r}: names are printed in "
            "terminals and pages; pass printable text."
        )
    if not value.strip():
        raise InvalidArgumentError(f"{arg}={value!r} is blank: pass a name with some text.")
    if run and value.strip().isdigit():
        raise InvalidArgumentError(
            f"{arg}={value!r} reads as a run id: gdscope report {value.strip()} would look up "
            f"id {value.strip()}. Pass a name with a letter in it, e.g. 'run-{value.strip()}'."
        )
    return value


def _check_text(value: Any, arg: str) -> str:
    """``value`` if it is a string SQLite can store (UTF-8 encodable)."""
    if not isinstance(value, str):
        raise InvalidArgumentError(
            f"{arg}={value!r} ({type(value).__name__}) must be a string: pass text."
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgumentError(
            f"{arg}={value!r} holds a character UTF-8 cannot encode ({e.reason} at position "
            f"{e.start}, e.g. a lone surrogate from a mis-decoded file name): pass valid text."
        ) from e
    return value


class Store:
    """A results store in one SQLite file (or ``":memory:"``); safe to share between threads.

    ``readonly=True`` opens an existing store for reading only (SQLite ``mode=ro``): it works on
    a read-only file or directory, creates nothing and refuses every write.
    """

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self.path = str(path) if str(path) == ":memory:" else Path(path)
        self.readonly = bool(readonly)
        if isinstance(self.path, Path):
            _check_path(self.path, self.readonly)
        elif self.readonly:
            raise InvalidArgumentError(
                "readonly=True needs the path of an existing store, not ':memory:'."
            )
        self._lock = threading.RLock()
        self._known_runs: set[int] = set()
        try:
            if self.readonly:
                assert isinstance(self.path, Path)
                self._con: sqlite3.Connection | None = _connect_readonly(self.path)
            else:
                self._con = _connect(self.path)
        except sqlite3.Error as e:
            raise StoreError(
                f"cannot open the store {self.path}: {e}. Pass the path of a gdscope SQLite "
                "store, or of a new file in a writable directory."
            ) from e

    # ------------------------------------------------------------------ plumbing
    def _connection(self) -> sqlite3.Connection:
        if self._con is None:
            raise StoreError(f"the store {self.path} is closed; open a new Store.")
        return self._con

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: committed on success, rolled back on any exception."""
        with self._lock:
            con = self._connection()
            try:
                con.execute("BEGIN IMMEDIATE")
                try:
                    yield con
                except BaseException:
                    con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
            except sqlite3.Error as e:
                raise StoreError(f"writing to the store {self.path} failed: {e}") from e

    def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._connection().execute(sql, params).fetchall()
            except sqlite3.Error as e:
                raise StoreError(f"reading the store {self.path} failed: {e}") from e

    # ------------------------------------------------------------------ writing
    def create_run(
        self,
        name: str | None = None,
        config: dict[str, Any] | None = None,
        environment: dict[str, Any] | None = None,
    ) -> int:
        """Start a run (status ``running``); return its id. Default name ``run-<id>``.

        ``name`` must be printable text (no control characters or lone surrogates) and not all
        digits (that reads as a run id). Several runs may share a name (a repeated demo, the
        same run in several sweep points); looking one up by such a name is then an error that
        lists their ids.
        """
        if name != "" and name is not None:  # "" or None: the default name run-<id>
            check_name(name, run=True)
        env = environment_info() if environment is None else environment
        with self._transaction() as con:
            cur = con.execute(
                "INSERT INTO runs (name, status, config, environment, summary, created_at) "
                "VALUES (?, 'running', ?, ?, '{}', ?)",
                (name or "", _dumps(config), _dumps(env), time.time()),
            )
            run_id = int(cur.lastrowid)  # type: ignore[arg-type]
            if not name:
                con.execute("UPDATE runs SET name = ? WHERE id = ?", (f"run-{run_id}", run_id))
        return run_id

    def log_step(self, run_id: int, step: int, rows: Iterable[MetricRow]) -> None:
        """Store one step's values in one transaction: all of them or, on any error, none."""
        self.log_steps(run_id, [(step, rows)])

    def log_steps(self, run_id: int, steps: Iterable[tuple[int, Iterable[MetricRow]]]) -> None:
        """Store several steps' values in one transaction (one commit for a batch of steps: the
        Tracker's batched writes). All of them or, on any error, none; the error names the step.
        """
        batch = [(_check_step(step), list(rows)) for step, rows in steps]
        with self._transaction() as con:
            self._check_run(con, run_id)
            for step, rows in batch:
                values = [(run_id, step, *_metric_values(row)) for row in rows]
                try:
                    con.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?)", values)
                except sqlite3.IntegrityError as e:
                    raise InvalidArgumentError(
                        f"a metric was already logged at step {step} of run {run_id}: {e}."
                    ) from e

    def log_blocks(self, run_id: int, blocks: Iterable[Block]) -> None:
        """Store blocks of steps in one transaction: all of them or, on any error, none.

        A block ``(keys, steps, values)`` holds steps that log the same values (a steady loop):
        ``values[i][j]`` is the value named ``keys[j] = (name, probe, iterate)`` at
        ``steps[i]``. Names are checked once per block rather than once per value, which makes
        this the Tracker's fast path.
        """
        checked = [_check_block(*block) for block in blocks]
        flat = (
            (run_id, step, n, v, pr, it)
            for keys, steps, values in checked
            for step, row in zip(steps, values, strict=True)
            for (n, pr, it), v in zip(keys, row, strict=True)
        )
        with self._transaction() as con:
            self._check_run(con, run_id)
            try:
                con.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?)", flat)
            except sqlite3.IntegrityError as e:
                first, last = checked[0][1][0], checked[-1][1][-1]
                raise InvalidArgumentError(
                    f"a metric was already logged at one of steps {first}..{last} of run "
                    f"{run_id}: {e}."
                ) from e

    def _check_run(self, con: sqlite3.Connection, run_id: int) -> None:
        """Refuse an unknown run (one look-up per run, not per write)."""
        if run_id not in self._known_runs:
            if not con.execute("SELECT 1 FROM runs WHERE id = ?", (run_id,)).fetchone():
                raise InvalidArgumentError(f"run_id={run_id!r}: no such run; create_run first.")
            self._known_runs.add(run_id)

    def finish_run(
        self, run_id: int, status: str = "completed", summary: dict[str, Any] | None = None
    ) -> None:
        """Mark a run finished with ``status`` (completed, failed or diverged)."""
        if status not in RUN_STATUSES[1:]:
            raise InvalidArgumentError(f"status={status!r} must be one of {RUN_STATUSES[1:]}.")
        with self._transaction() as con:
            cur = con.execute(
                "UPDATE runs SET status = ?, finished_at = ?, summary = COALESCE(?, summary) "
                "WHERE id = ?",
                (status, time.time(), None if summary is None else _dumps(summary), run_id),
            )
            if cur.rowcount == 0:
                raise InvalidArgumentError(f"run_id={run_id!r}: no such run.")

    def add_artifact(
        self,
        run_id: int,
        name: str,
        data: bytes | str,
        mime: str = "application/octet-stream",
    ) -> None:
        """Store (or replace) a named blob with a run; ``str`` data is stored as UTF-8."""
        _check_text(name, "name")
        _check_text(mime, "mime")
        if isinstance(data, str):
            _check_text(data, "data")
        self.run(run_id)
        blob = data.encode() if isinstance(data, str) else bytes(data)
        with self._transaction() as con:
            con.execute(
                "INSERT OR REPLACE INTO artifacts VALUES (?, ?, ?, ?, ?)",
                (run_id, name, mime, blob, time.time()),
            )

    def export_run(self, run_id: int) -> RunPayload:
        """A run with all its metrics and artifacts as plain data (picklable, for other stores)."""
        info = self.run(run_id)
        rows = self._query(
            "SELECT step, name, value, probe, iterate FROM metrics WHERE run_id = ?", (run_id,)
        )
        arts = self._query(
            "SELECT name, mime, data, created_at FROM artifacts WHERE run_id = ?", (run_id,)
        )
        return {
            "name": info.name,
            "status": info.status,
            "config": info.config,
            "environment": info.environment,
            "summary": info.summary,
            "created_at": info.created_at,
            "finished_at": info.finished_at,
            "metrics": rows,
            "artifacts": [(n, m, bytes(d), c) for n, m, d, c in arts],
        }

    def add_experiment(
        self,
        name: str,
        config: dict[str, Any],
        config_hash: str,
        *,
        status: str,
        verdicts: list[dict[str, Any]],
        results: Any,
        figures: list[dict[str, Any]],
        runs: Iterable[RunPayload] = (),
        sweep: str | None = None,
        seconds: float | None = None,
    ) -> int | None:
        """Store an experiment run and its runs in one transaction; return its id.

        Returns ``None``, writing nothing, when ``sweep`` already holds a point with this
        ``config_hash``: a retried sweep point is never stored twice.
        """
        with self._transaction() as con:
            try:
                cur = con.execute(
                    "INSERT INTO experiments (name, sweep, config_hash, config, status, verdicts, "
                    "results, figures, run_ids, seconds, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, '[]', ?, ?)",
                    (
                        name,
                        sweep,
                        config_hash,
                        _dumps(config),
                        status,
                        json.dumps(verdicts, default=_json_default),
                        json.dumps(results, default=_json_default),
                        json.dumps(figures, default=_json_default),
                        seconds,
                        time.time(),
                    ),
                )
            except sqlite3.IntegrityError:
                if sweep is None:
                    raise
                return None
            exp_id = int(cur.lastrowid)  # type: ignore[arg-type]
            run_ids = [_import_run(con, run) for run in runs]
            con.execute(
                "UPDATE experiments SET run_ids = ? WHERE id = ?", (json.dumps(run_ids), exp_id)
            )
        return exp_id

    def experiments(self, sweep: str | None = None) -> list[ExperimentInfo]:
        """Experiment runs, oldest first; only those of ``sweep`` when given."""
        if sweep is None:
            rows = self._query(f"{_EXPERIMENTS} ORDER BY id")
        else:
            rows = self._query(f"{_EXPERIMENTS} WHERE sweep = ? ORDER BY id", (sweep,))
        return [_experiment_info(r) for r in rows]

    def experiment(self, experiment_id: int) -> ExperimentInfo:
        """One experiment run by id."""
        rows = self._query(f"{_EXPERIMENTS} WHERE id = ?", (int(experiment_id),))
        if not rows:
            known = ", ".join(str(e.id) for e in self.experiments()) or "none"
            raise InvalidArgumentError(
                f"no experiment {experiment_id!r} in {self.path}; stored experiments: {known}."
            )
        return _experiment_info(rows[0])

    def sweep_hashes(self, sweep: str) -> set[str]:
        """Config hashes of the points of ``sweep`` already stored."""
        rows = self._query("SELECT config_hash FROM experiments WHERE sweep = ?", (sweep,))
        return {r[0] for r in rows}

    # ------------------------------------------------------------------ reading
    def artifact(self, run_id: int, name: str) -> bytes:
        """The bytes of a stored artifact."""
        rows = self._query(
            "SELECT data FROM artifacts WHERE run_id = ? AND name = ?", (run_id, name)
        )
        if not rows:
            names = [
                r[0]
                for r in self._query(
                    "SELECT name FROM artifacts WHERE run_id = ? ORDER BY name", (run_id,)
                )
            ]
            raise InvalidArgumentError(
                f"run {run_id} has no artifact {name!r}; it has {names or 'none'}."
            )
        return bytes(rows[0][0])

    def runs(self) -> list[RunInfo]:
        """All runs, oldest first."""
        return [_run_info(r) for r in self._query(f"{_RUNS} ORDER BY id")]

    def run(self, run: int | str) -> RunInfo:
        """A run by id, or by name; a name several runs share is an error listing their ids."""
        if isinstance(run, str):
            try:
                run.encode("utf-8")
            except UnicodeEncodeError:
                rows = []
            else:
                rows = self._query(f"{_RUNS} WHERE name = ? ORDER BY id", (run,))
            if len(rows) > 1:
                ids = ", ".join(str(r[0]) for r in rows)
                raise InvalidArgumentError(
                    f"run {run!r} is ambiguous in {self.path}: {len(rows)} runs share that name "
                    f"(ids {ids}). Pass an id instead, e.g. gdscope report {rows[-1][0]}."
                )
        elif isinstance(run, bool) or not isinstance(run, (int, np.integer)):
            raise InvalidArgumentError(
                f"run={run!r} ({type(run).__name__}) must be a run id (int) or name (str)."
            )
        else:
            rows = self._query(f"{_RUNS} WHERE id = ?", (int(run),))
        if not rows:
            available = ", ".join(f"{r.id} ({r.name})" for r in self.runs()) or "none"
            raise InvalidArgumentError(
                f"no run {run!r} in {self.path}. Available runs (id, name): {available}."
            )
        return _run_info(rows[0])

    def is_empty(self) -> bool:
        """Whether the store holds no run and no experiment."""
        return not self._query("SELECT 1 FROM runs UNION ALL SELECT 1 FROM experiments LIMIT 1")

    def metric_names(self, run_id: int) -> list[str]:
        """Names of the metrics a run has, sorted."""
        self.run(run_id)
        rows = self._query(
            "SELECT DISTINCT name FROM metrics WHERE run_id = ? ORDER BY name", (run_id,)
        )
        return [r[0] for r in rows]

    def series(self, run_id: int, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(x, values)`` of one metric, sorted by ``x``.

        ``x`` is the index of the iterate the value describes: the step for ``'before'`` values,
        step + 1 for ``'after'`` values (the number of updates applied).
        """
        rows = self._query(
            "SELECT step + (iterate = 'after'), value FROM metrics "
            "WHERE run_id = ? AND name = ? ORDER BY 1",
            (run_id, name),
        )
        if not rows:
            names = self.metric_names(run_id)
            raise InvalidArgumentError(
                f"run {run_id} has no metric {name!r}; it has {names or 'none'}."
            )
        x = np.array([r[0] for r in rows], dtype=np.int64)
        return x, np.array([_value(r[1]) for r in rows], dtype=np.float64)

    def metrics(self, run_id: int) -> list[tuple[int, str, float, str, str]]:
        """Raw rows ``(step, name, value, probe, iterate)`` ordered by step and name."""
        rows = self._query(
            "SELECT step, name, value, probe, iterate FROM metrics WHERE run_id = ? "
            "ORDER BY step, name",
            (run_id,),
        )
        return [(s, n, _value(v), p, it) for s, n, v, p, it in rows]

    def _long_rows(self, run_id: int | None) -> list[tuple[Any, ...]]:
        where, params = ("WHERE m.run_id = ?", (run_id,)) if run_id is not None else ("", ())
        if run_id is not None:
            self.run(run_id)
        rows = self._query(
            "SELECT m.run_id, r.name, m.step, m.step + (m.iterate = 'after'), m.name, m.value, "
            f"m.probe, m.iterate FROM metrics m JOIN runs r ON r.id = m.run_id {where} "
            "ORDER BY m.run_id, m.step, m.name",
            params,
        )
        return [(*r[:5], _value(r[5]), *r[6:]) for r in rows]

    def to_pandas(self, run_id: int | None = None) -> Any:
        """Metrics in long format as a ``pandas.DataFrame`` (columns: :data:`CSV_COLUMNS`)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise GdscopeError(
                "Store.to_pandas needs pandas, which is not installed: `pip install pandas`, "
                "or use Store.to_csv."
            ) from e
        return pd.DataFrame(self._long_rows(run_id), columns=list(CSV_COLUMNS))

    def to_csv(self, path: str | os.PathLike[str], run_id: int | None = None) -> Path:
        """Write metrics in long format (columns: :data:`CSV_COLUMNS`) to ``path``.

        ``path`` may be a new file or a CSV this method wrote; the store itself and any other
        existing file are refused (:func:`check_output`).
        """
        protect = [self.path] if isinstance(self.path, Path) else []
        check_output(path, "csv", protect=protect)
        rows = self._long_rows(run_id)
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
        return write_output(path, buf.getvalue(), "csv", protect=protect)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Close the connection (idempotent)."""
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"


def _connect(path: str | Path) -> sqlite3.Connection:
    """Open (creating the schema if needed) with WAL and one transaction per explicit BEGIN."""
    con = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.executescript(_SCHEMA)
        con.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        (version,) = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if int(version) > SCHEMA_VERSION:
            raise StoreError(
                f"the store {path} has schema version {version}, newer than this gdscope "
                f"understands ({SCHEMA_VERSION}): upgrade gdscope."
            )
    except BaseException:
        con.close()
        raise
    return con


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """Open an existing store read-only, creating no file, even in a read-only directory.

    A store with no ``-wal`` file has no open connection and all its data in the main file:
    it is read as is (``immutable=1``: no locks, no ``-shm``/``-wal`` files left behind). A
    store being written (its ``-wal`` exists) is opened with ``mode=ro``, which sees the
    writer's committed steps; where even that fails (a read-only directory without ``-shm``),
    the main file is read as is.
    """
    uri = f"{path.resolve().as_uri()}?mode=ro"
    if not path.with_name(path.name + "-wal").exists():
        con = sqlite3.connect(f"{uri}&immutable=1", uri=True, isolation_level=None)
    else:
        try:
            con = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None)
            con.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        except sqlite3.OperationalError:
            con = sqlite3.connect(f"{uri}&immutable=1", uri=True, isolation_level=None)
    con.execute("PRAGMA query_only=ON")
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not {"runs", "metrics"} <= tables:
        con.close()
        raise StoreError(
            f"{path} is an SQLite database but not a gdscope store (no runs table): pass the "
            "path of a store gdscope wrote."
        )
    return con


def _check_path(path: Path, readonly: bool = False) -> None:
    """Refuse, naming the fix, a path SQLite would fail on late or silently overwrite."""
    parent = path.parent
    if readonly and not path.is_file():
        raise StoreError(f"no store at {path}: pass the path of an existing store (--store PATH).")
    if not parent.is_dir():
        raise StoreError(
            f"cannot create the store {path}: the directory {parent} does not exist. "
            f"Create it first (mkdir -p {parent}) or pass another path."
        )
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as f:
            if f.read(len(_SQLITE_MAGIC)) != _SQLITE_MAGIC:
                raise StoreError(
                    f"{path} exists and is not an SQLite database: pass the path of a gdscope "
                    "store, or of a new file."
                )
    target = path if path.exists() else parent
    if not readonly and not os.access(target, os.W_OK):
        raise StoreError(
            f"cannot write the store {path}: {target} is not writable. Fix its permissions "
            "or pass a path in a writable directory."
        )


# the last step is derived from the metrics (primary-key prefix look-up), not stored per step
_RUNS = (
    "SELECT id, name, status, config, environment, summary, created_at, finished_at, "
    "(SELECT MAX(step) FROM metrics m WHERE m.run_id = runs.id) FROM runs"
)


_EXPERIMENTS = (
    "SELECT id, name, sweep, config_hash, config, status, verdicts, results, figures, run_ids, "
    "seconds, created_at FROM experiments"
)


def _experiment_info(row: tuple[Any, ...]) -> ExperimentInfo:
    eid, name, sweep, chash, config, status, verdicts, results, figures, run_ids, secs, at = row
    return ExperimentInfo(
        id=eid,
        name=name,
        sweep=sweep,
        config_hash=chash,
        config=json.loads(config or "{}"),
        status=status,
        verdicts=json.loads(verdicts or "[]"),
        results=json.loads(results or "null"),
        figures=json.loads(figures or "[]"),
        run_ids=json.loads(run_ids or "[]"),
        seconds=secs,
        created_at=at,
    )


def _import_run(con: sqlite3.Connection, run: RunPayload) -> int:
    """Insert an exported run (inside the caller's transaction); return its new id."""
    cur = con.execute(
        "INSERT INTO runs (name, status, config, environment, summary, created_at, finished_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            run["name"],
            run["status"],
            _dumps(run["config"]),
            _dumps(run["environment"]),
            _dumps(run["summary"]),
            run["created_at"],
            run["finished_at"],
        ),
    )
    run_id = int(cur.lastrowid)  # type: ignore[arg-type]
    con.executemany(
        "INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?)",
        [(run_id, *row) for row in run["metrics"]],
    )
    con.executemany(
        "INSERT INTO artifacts VALUES (?, ?, ?, ?, ?)",
        [(run_id, *art) for art in run["artifacts"]],
    )
    return run_id


def _run_info(row: tuple[Any, ...]) -> RunInfo:
    rid, name, status, config, env, summary, created, finished, last = row
    return RunInfo(
        id=rid,
        name=name,
        status=status,
        config=json.loads(config or "{}"),
        environment=json.loads(env or "{}"),
        summary=json.loads(summary or "{}"),
        created_at=created,
        finished_at=finished,
        last_step=last,
    )
