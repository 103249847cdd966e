"""The verdict vocabulary: holds / fails / undetermined / outside the theorem's assumptions."""

from __future__ import annotations

import json

import pytest

from gdscope.verdict import STATUSES, Verdict


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
