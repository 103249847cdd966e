"""Experiment configs: frozen dataclasses filled from TOML and ``--set key=value``.

Every field is checked against its type hint; an error names the field's path
(``data.n: expected an integer, got 'many'``). Supported hints: ``int``, ``float``, ``str``,
``bool``, ``Literal[...]``, ``X | None``, ``tuple[T, ...]``, ``list[T]``, ``dict[str, Any]`` and
nested dataclasses. A config's identity is the SHA-256 of its canonical JSON (sorted keys), so
two spellings of the same config hash alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from gdscope.errors import ConfigError

__all__ = ["build", "config_hash", "load_toml", "merge", "parse_assignments", "to_dict"]

T = TypeVar("T")


def build(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """An instance of the dataclass ``cls`` from ``data``, every field validated."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path or 'config'}: expected a table of fields, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{_join(path, unknown[0])}: unknown field. Known fields of "
            f"{path or 'the config'}: {', '.join(sorted(fields))}."
        )
    hints = typing.get_type_hints(cls)
    values = {name: _convert(hints[name], data[name], _join(path, name)) for name in data}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or 'config'}: {e}") from e


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON-ready data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_hash(data: Mapping[str, Any] | Any) -> str:
    """SHA-256 of the canonical JSON of a config (a dataclass or a mapping)."""
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        data = to_dict(data)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, with an error that names the file and the line."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(
            f"config file {path} does not exist: pass the path of a TOML file or the name of a "
            "built-in experiment (`gdscope run --list`)."
        ) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}.") from e


def parse_assignments(assignments: Sequence[str]) -> dict[str, Any]:
    """``["data.n=64", "widths=[8, 16]"]`` → ``{"data": {"n": 64}, "widths": [8, 16]}``.

    Values are TOML literals; a bare word that is not one is taken as a string (``name=digits``).
    """
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set data.n=64."
            )
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is both a value and a table.")
        node[leaf] = value
    return out


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` applied, tables merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0]
            if len(errors) == 1
            else f"{path}: {value!r} fits none of {' | '.join(_type_name(a) for a in args)}."
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"{path}: {value!r} is not allowed; use one of {', '.join(map(repr, args))}."
            )
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}.")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{path}: expected {len(args)} items, got {len(value)}.")
            return tuple(
                _convert(a, v, f"{path}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        item = args[0] if args else Any
        items = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a table, got {value!r}.")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}.")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}.")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}.")
        if not math.isfinite(value):
            raise ConfigError(
                f"{path}: expected a finite number, got {value!r} (a config is hashed as JSON, "
                "which has no nan or inf); pass a number."
            )
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}.")
        return value
    raise ConfigError(f"{path}: fields of type {_type_name(hint)} are not supported.")
