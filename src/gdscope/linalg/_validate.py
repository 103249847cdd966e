"""Argument checks shared by the linear-algebra and curvature entry points.

Each raises :class:`~gdscope.errors.InvalidArgumentError` whose message names the argument, the
value it got (and its type) and what to pass instead.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from gdscope.errors import InvalidArgumentError

__all__ = [
    "check_bool",
    "check_choice",
    "check_int",
    "check_level",
    "check_operator",
    "check_optional_int",
    "check_seed",
    "check_tol",
    "check_vector",
    "describe",
]


def describe(value: Any) -> str:
    """``repr`` (shortened) and type name of ``value``, for error messages."""
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def check_int(name: str, value: Any, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an ``int`` in ``[minimum, maximum]``; bools, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentError(
            f"{name} must be an int >= {minimum}, got {describe(value)}: pass e.g. "
            f"{name}={max(minimum, 1)}."
        )
    value = int(value)
    if value < minimum:
        raise InvalidArgumentError(
            f"{name} must be an int >= {minimum}, got {value}: pass {name}={minimum} or more."
        )
    if maximum is not None and value > maximum:
        raise InvalidArgumentError(
            f"{name}={value} is too large: at most {maximum} here; pass {name}<={maximum}."
        )
    return value


def check_optional_int(name: str, value: Any, minimum: int = 1) -> int | None:
    """``None`` or :func:`check_int`."""
    return None if value is None else check_int(name, value, minimum)


def check_seed(value: Any, name: str = "seed") -> int:
    """A non-negative int seed."""
    return check_int(name, value, 0)


def check_bool(name: str, value: Any) -> bool:
    """A real ``bool`` (a string such as ``"False"`` would be truthy)."""
    if not isinstance(value, bool):
        raise InvalidArgumentError(
            f"{name} must be True or False, got {describe(value)}: pass {name}=True or False."
        )
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgumentError(
            f"{name}={describe(value)} is not supported: use one of {tuple(choices)}."
        )
    return value


def check_tol(value: Any, name: str = "tol") -> float:
    """A relative tolerance in ``(0, 1)``: at ``tol >= 1`` any vector passes as an eigenvector."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(
            f"{name} must be a float in (0, 1), got {describe(value)}: pass e.g. {name}=1e-6."
        )
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise InvalidArgumentError(
            f"{name}={value!r} is not a relative tolerance: it must lie in (0, 1) (at {name} >= 1 "
            f"every vector meets the residual test ‖Av − θv‖ <= {name}·‖A‖); pass e.g. "
            f"{name}=1e-6."
        )
    return value


def check_level(value: Any, name: str = "level") -> float:
    """A confidence level in ``(0, 1)``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidArgumentError(
            f"{name} must be a probability in (0, 1), got {describe(value)}: pass e.g. {name}=0.95."
        )
    value = float(value)
    if not (math.isfinite(value) and 0.0 < value < 1.0):
        raise InvalidArgumentError(
            f"{name}={value!r} must lie in (0, 1): pass e.g. {name}=0.95 for a 95% interval."
        )
    return value


def check_operator(op: Any, name: str = "op") -> None:
    """``op`` looks like a :class:`~gdscope.linalg.LinearOperator` (square, with ``matmat``)."""
    shape = getattr(op, "shape", None)
    ok = (
        callable(getattr(op, "matmat", None))
        and callable(getattr(op, "matvec", None))
        and isinstance(getattr(op, "dtype", None), torch.dtype)
        and isinstance(shape, tuple)
        and len(shape) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) for s in shape)
    )
    if not ok:
        raise InvalidArgumentError(
            f"{name} must be a gdscope.linalg.LinearOperator (shape, dtype, matvec, matmat), got "
            f"{describe(op)}: wrap a matrix in DenseOperator(A) or a function in "
            "CallableOperator(fn, size, dtype, device)."
        )
    if shape[0] != shape[1] or shape[0] < 1:
        raise InvalidArgumentError(
            f"{name} has shape {shape}: a symmetric operator is square and non-empty."
        )
    if not op.dtype.is_floating_point:
        raise InvalidArgumentError(
            f"{name} has dtype {op.dtype}: solvers need a real floating dtype (float32/float64)."
        )


def check_vector(
    name: str, value: Any, size: int, *, block: bool = False, max_cols: int | None = None
) -> Tensor:
    """A finite, non-zero real tensor with ``size`` rows (``(size,)``, or ``(size, j)`` if
    ``block``); returned as ``(size, j)`` (``j = 1`` for a vector)."""
    shapes = f"({size},)" + (f" or ({size}, j)" if block else "")
    if not isinstance(value, Tensor):
        raise InvalidArgumentError(
            f"{name} must be a torch tensor of shape {shapes}, got {describe(value)}: pass "
            f"e.g. a previous eigenvector, or {name}=None."
        )
    if value.is_complex() or not value.is_floating_point():
        raise InvalidArgumentError(
            f"{name} has dtype {value.dtype}: pass a real floating tensor (e.g. {name}.double())."
        )
    if value.ndim == 1 and value.shape[0] == size:
        cols = value[:, None]
    elif block and value.ndim == 2 and value.shape[0] == size and value.shape[1] >= 1:
        cols = value
    else:
        raise InvalidArgumentError(
            f"{name} has shape {tuple(value.shape)}: it must be {shapes} (one entry per "
            "parameter / operator row)."
        )
    if max_cols is not None and cols.shape[1] > max_cols:
        raise InvalidArgumentError(
            f"{name} has {cols.shape[1]} columns: at most {max_cols} fit; pass fewer columns."
        )
    if not bool(torch.isfinite(cols).all()):
        raise InvalidArgumentError(
            f"{name} contains NaN or inf: pass a finite vector (or {name}=None for a random one)."
        )
    if bool((torch.linalg.vector_norm(cols.double(), dim=0) == 0).any()):
        raise InvalidArgumentError(
            f"{name} has a zero column: a start vector must be non-zero (or pass {name}=None)."
        )
    return cols
