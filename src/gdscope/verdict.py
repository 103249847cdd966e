"""A verdict: one claim, what theory predicts, what was measured, and whether it holds.

The vocabulary (docs/theory.md §8):

* **holds**: the measurement agrees with the statement within its uncertainty;
* **fails**: the measurement contradicts the statement beyond its uncertainty;
* **undetermined**: the uncertainty straddles the statement;
* **outside**: a hypothesis of the theorem is not met at the size run (``assumption`` says which,
  with the measured figure), so the measurement can neither confirm nor contradict it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["STATUSES", "Status", "Verdict"]

Status = Literal["holds", "fails", "undetermined", "outside"]
#: The four verdicts, in the order reports list them.
STATUSES: tuple[Status, ...] = ("holds", "fails", "undetermined", "outside")


@dataclass(frozen=True)
class Verdict:
    """One claim: prediction, measurement, and ``holds`` (True, False, or None).

    ``holds is None`` is "undetermined", or "outside the theorem's assumptions" when
    ``assumption`` names the unmet hypothesis (with its measured figure). ``reason`` is the
    one-line why of the verdict; ``theorem`` the exact statement tested and why the decision rule
    tests it at finite size; ``section`` the anchor of docs/theory.md behind the claim.
    ``details`` is free text or a JSON-ready dict (numbers behind the measurement, fits, counts).
    """

    claim: str
    predicted: str
    measured: str
    holds: bool | None
    details: str | dict[str, Any] = ""
    reason: str = ""
    theorem: str = ""
    section: str = ""
    assumption: str = ""

    def __post_init__(self) -> None:
        if self.assumption and self.holds is not None:
            raise ValueError(
                f"Verdict {self.claim!r}: an unmet assumption ({self.assumption!r}) leaves the "
                f"claim undecided, so holds must be None, not {self.holds!r}"
            )

    @property
    def status(self) -> Status:
        """``holds``, ``fails``, ``undetermined`` or ``outside`` (the theorem's assumptions)."""
        if self.holds is True:
            return "holds"
        if self.holds is False:
            return "fails"
        return "outside" if self.assumption else "undetermined"

    def to_dict(self) -> dict[str, Any]:
        """The verdict as a plain dict (JSON-ready), with its ``status``."""
        return {**asdict(self), "status": self.status}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Verdict:
        """Inverse of :meth:`to_dict` (also reads dicts stored before the newer fields)."""
        return cls(
            data["claim"],
            data["predicted"],
            data["measured"],
            data["holds"],
            data.get("details", ""),
            reason=data.get("reason", ""),
            theorem=data.get("theorem", ""),
            section=data.get("section", ""),
            assumption=data.get("assumption", ""),
        )
