"""A verdict: one claim, what theory predicts, what was measured, and whether it holds."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Verdict"]


@dataclass(frozen=True)
class Verdict:
    """One claim: prediction, measurement, and ``holds`` (True, False, or None: undetermined).

    ``details`` is free text or a JSON-ready dict (numbers behind the measurement, fits, counts).
    """

    claim: str
    predicted: str
    measured: str
    holds: bool | None
    details: str | dict[str, Any] = ""

    def to_dict(self) -> dict[str, Any]:
        """The verdict as a plain dict (JSON-ready)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        """Inverse of :meth:`to_dict`."""
        return cls(
            data["claim"],
            data["predicted"],
            data["measured"],
            data["holds"],
            data.get("details", ""),
        )
