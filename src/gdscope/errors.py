"""Exceptions raised by gdscope.

Every error names what was wrong (the argument and its value) and what to do about it. All derive
from :class:`GdscopeError`; those about a bad argument also derive from :class:`ValueError` so that
callers catching the builtin keep working.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "DataNotFoundError",
    "GdscopeError",
    "InvalidArgumentError",
    "NonDeterministicError",
    "NonFiniteError",
    "ShapeMismatchError",
    "StatefulModuleError",
    "StoreError",
]


class GdscopeError(Exception):
    """Base class of every error gdscope raises on purpose."""


class InvalidArgumentError(GdscopeError, ValueError):
    """An argument has a value gdscope cannot use."""


class ShapeMismatchError(InvalidArgumentError):
    """Data and model (or two tensors) do not fit together."""


class NonFiniteError(GdscopeError, FloatingPointError):
    """A loss, gradient or parameter became NaN or infinite."""


class NonDeterministicError(GdscopeError, RuntimeError):
    """The same function evaluated twice gave different results (dropout, random augmentation)."""


class StatefulModuleError(GdscopeError, RuntimeError):
    """A module couples samples or mutates buffers in forward (train-mode BatchNorm and kin)."""


class StoreError(GdscopeError, OSError):
    """The results store cannot be opened, written or read."""


class ConfigError(InvalidArgumentError):
    """A configuration field is missing, unknown or of the wrong type."""


class DataNotFoundError(InvalidArgumentError, FileNotFoundError):
    """A data set's local files are missing (gdscope never downloads): put them where it says."""
