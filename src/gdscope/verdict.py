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

import numpy as np

__all__ = ["STATUSES", "Hover", "Status", "Verdict", "hover", "hover_rule"]

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


# ---------------------------------------------------------------------- the edge-of-stability rule
@dataclass(frozen=True)
class Hover:
    """A sharpness series relative to its stability threshold, around the edge-of-stability
    onset: the first value ``≥ onset_fraction`` (ratio to the threshold).

    ``start`` and ``max`` are over the whole series; ``median``, ``q25``, ``q75`` and ``count``
    over the onset and every value after it (``None``/0 when the onset never came).
    """

    start: float
    max: float
    onset_fraction: float
    onset_step: int | None = None
    median: float | None = None
    q25: float | None = None
    q75: float | None = None
    count: int = 0


def hover(steps: Any, ratio: Any, onset_fraction: float) -> Hover:
    """:class:`Hover` of the finite values of ``ratio`` (sharpness / threshold) at ``steps``."""
    x = np.asarray(steps)
    r = np.asarray(ratio, dtype=np.float64)
    keep = np.isfinite(r)
    x, r = x[keep], r[keep]
    if not r.size:
        raise ValueError("hover: no finite sharpness value")
    base = Hover(float(r[0]), float(r.max()), float(onset_fraction))
    hits = np.flatnonzero(r >= onset_fraction)
    if not hits.size:
        return base
    after = r[hits[0] :]
    q25, med, q75 = (float(v) for v in np.percentile(after, [25, 50, 75]))
    return Hover(
        base.start, base.max, base.onset_fraction, int(x[hits[0]]), med, q25, q75, int(after.size)
    )


def hover_rule(
    h: Hover, band: tuple[float, float], min_post_onset: int, unit: str = "·2/η"
) -> tuple[bool | None, str, str]:
    """``(holds, reason, assumption)`` of the claim "the sharpness rises to its threshold and
    hovers there" (Cohen et al.: GD's sharpness at ``2/η``; adaptive methods' preconditioned
    sharpness at theirs): the post-onset median must lie in ``band``.

    Outside the claim (``assumption`` set): a run that starts at or above the threshold (a
    catapult, not a rise) or never reaches ``onset_fraction`` of it. Undetermined: fewer than
    ``min_post_onset`` values after the onset. ``unit`` words the ratio (``·2/η``, ``×``).
    """
    lo, hi = band
    if h.start >= 1:
        why = f"the run starts above the threshold ({h.start:.3g}{unit}): a catapult, not a rise"
        return None, why, why
    if h.median is None:
        why = (
            f"the claim is made for runs that reach the threshold: max {h.max:.3f}{unit} < "
            f"{h.onset_fraction:g}{unit} in the steps run"
        )
        return None, why, why
    if h.count < min_post_onset:
        return None, f"only {h.count} measurements after the onset: more steps would decide", ""
    holds = bool(lo <= h.median <= hi)
    where = "inside" if holds else "outside"
    return holds, f"post-onset median {h.median:.3f}{unit} {where} [{lo:g}, {hi:g}]", ""
