"""The verdict vocabulary: holds / fails / undetermined / outside the theorem's assumptions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gdscope.verdict import STATUSES, Verdict, hover, hover_rule


@pytest.mark.parametrize(
    ("holds", "assumption", "status"),
    [
        (True, "", "holds"),
        (False, "", "fails"),
        (None, "", "undetermined"),
        (None, "width 64 < 512: kernel drift 0.4 is not small", "outside"),
    ],
)
def test_status(holds, assumption, status):
    v = Verdict("c", "p", "m", holds, assumption=assumption, reason="why")
    assert v.status == status
    assert status in STATUSES
    d = v.to_dict()
    assert d["status"] == status
    assert Verdict.from_dict(json.loads(json.dumps(d))) == v


@pytest.mark.parametrize("holds", [True, False])
def test_unmet_assumption_cannot_decide(holds):
    with pytest.raises(ValueError, match="holds must be None"):
        Verdict("c", "p", "m", holds, assumption="no minimum reached")


def test_reads_old_dicts():
    old = {"claim": "c", "predicted": "p", "measured": "m", "holds": None, "details": {"a": 1}}
    v = Verdict.from_dict(old)
    assert v.status == "undetermined" and v.details == {"a": 1} and v.theorem == ""


# ---------------------------------------------------------------------- the edge-of-stability rule
def test_hover_finds_the_onset_and_summarizes_what_follows():
    steps = [0, 10, 20, 30, 40, 50, 60]
    ratio = [0.3, float("nan"), 0.8, 0.96, 1.1, 0.9, 1.0]
    h = hover(steps, ratio, 0.95)
    assert (h.start, h.max, h.onset_step, h.count) == (0.3, 1.1, 30, 4)
    after = np.array([0.96, 1.1, 0.9, 1.0])
    assert h.median == pytest.approx(np.median(after))
    assert (h.q25, h.q75) == pytest.approx(tuple(np.percentile(after, [25, 75])))
    never = hover(steps[:3], [0.3, 0.5, 0.9], 0.95)
    assert never.onset_step is None and never.median is None and never.count == 0


@pytest.mark.parametrize(
    ("ratio", "holds", "outside"),
    [
        ([0.3, 0.6, 0.97, 1.0, 1.02, 0.99, 1.01], True, False),  # rises and hovers
        ([0.3, 0.6, 0.97, 1.3, 1.4, 1.35, 1.3], False, False),  # overshoots: contradicts it
        ([0.3, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9], None, True),  # never reaches the threshold
        ([1.3, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], None, True),  # starts above: a catapult
        ([0.3, 0.5, 0.6, 0.7, 0.8, 0.97, 1.0], None, False),  # 2 values after the onset
    ],
)
def test_hover_rule(ratio, holds, outside):
    h = hover(range(len(ratio)), ratio, 0.95)
    got, reason, assumption = hover_rule(h, (0.9, 1.1), min_post_onset=3, unit="×")
    assert got is holds and bool(assumption) is outside and reason
    if holds is not None or outside:
        assert "×" in reason  # the ratio in the unit given
    else:
        assert "2 measurements after the onset" in reason
