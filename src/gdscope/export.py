"""Export a run's metrics from the store to CSV or Parquet (``gdscope export RUN --format ...``).

Both formats hold the store's metrics in long format, one row per value, with the columns of
:data:`gdscope.store.CSV_COLUMNS`::

    run_id, run_name, step, iterate_index, name, value, probe, iterate

``iterate_index`` is ``step`` for ``iterate='before'`` values (θ_step) and ``step + 1`` for
``'after'`` values (θ_{step+1}); NaN values are written as NaN (an empty CSV cell is never
used). See ``docs/store-schema.md`` for the store itself (``pandas.read_sql`` on it is a
supported interface).

CSV needs nothing beyond the standard library; Parquet needs ``pyarrow``
(``pip install pyarrow``), and its files carry the key ``generator = gdscope`` in their schema
metadata, so an export can be overwritten by the next while any other file is refused.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from gdscope.errors import GdscopeError, InvalidArgumentError
from gdscope.store import CSV_COLUMNS, Store, check_output

__all__ = ["FORMATS", "export_metrics"]

FORMATS = ("csv", "parquet")
Format = Literal["csv", "parquet"]
_PARQUET_MAGIC = b"PAR1"


def export_metrics(
    store: Store,
    path: str | os.PathLike[str],
    run: int | str | None = None,
    format: Format = "csv",
) -> Path:
    """Write the metrics of ``run`` (id or name; ``None``: every run) to ``path``; return it.

    ``path`` may be a new file or an earlier export of the same format; the store, any SQLite
    file and any other existing file are refused (:class:`~gdscope.errors.InvalidArgumentError`).
    """
    if not isinstance(store, Store):
        raise InvalidArgumentError(
            f"store={store!r} ({type(store).__name__}) must be a gdscope.store.Store."
        )
    if format not in FORMATS:
        raise InvalidArgumentError(
            f"format={format!r} is not supported: use one of {', '.join(FORMATS)}."
        )
    run_id = None if run is None else store.run(run).id
    if format == "csv":
        return store.to_csv(path, run_id)
    return _write_parquet(store, Path(path), run_id)


def _parquet_ok(path: Path, store: Store) -> None:
    """Refuse a path gdscope may not write a Parquet export to: the same rules as for CSV
    exports (:func:`gdscope.store.check_output`), with an earlier Parquet export replaceable."""
    protect = [store.path] if isinstance(store.path, Path) else []
    if path.is_file() and _written_by_gdscope(path):
        return
    # a missing directory, a directory, the store, any SQLite file, a file gdscope did not write
    check_output(path, "csv", protect=protect, arg="out")
    if path.exists():
        raise InvalidArgumentError(
            f"cannot write the Parquet export to out={str(path)!r}: it is a CSV export, not a "
            "Parquet one, so it is not overwritten. Pass another path, e.g. one ending .parquet."
        )


def _written_by_gdscope(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        with path.open("rb") as f:
            if f.read(4) != _PARQUET_MAGIC:
                return False
        meta = pq.read_schema(path).metadata or {}
    except Exception:  # unreadable or not Parquet: not ours
        return False
    return meta.get(b"generator") == b"gdscope"


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as e:
        raise GdscopeError(
            "exporting to Parquet needs pyarrow, which is not installed: pip install pyarrow "
            "(or export with --format csv)."
        ) from e
    return pyarrow


def _write_parquet(store: Store, path: Path, run_id: int | None) -> Path:
    pa = _pyarrow()
    import pyarrow.parquet as pq

    _parquet_ok(path, store)
    rows = store._long_rows(run_id)
    cols = list(zip(*rows, strict=True)) if rows else [() for _ in CSV_COLUMNS]
    types = [
        pa.int64(),
        pa.string(),
        pa.int64(),
        pa.int64(),
        pa.string(),
        pa.float64(),
        pa.string(),
        pa.string(),
    ]
    schema = pa.schema(
        [pa.field(n, t) for n, t in zip(CSV_COLUMNS, types, strict=True)],
        metadata={"generator": "gdscope", "columns": ",".join(CSV_COLUMNS)},
    )
    table = pa.table(
        [pa.array(list(c), type=t) for c, t in zip(cols, types, strict=True)], schema=schema
    )
    target = path.resolve() if path.is_symlink() else path
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InvalidArgumentError(
            f"cannot write the Parquet export to {str(path)!r} ({e}): pass a path in an "
            "existing, writable directory."
        ) from e
    return path
