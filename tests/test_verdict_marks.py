"""The four verdict statuses are shown as themselves on the pages and in the terminal."""

from __future__ import annotations

import pytest

from gdscope.cli import _mark as cli_mark
from gdscope.report.experiment import _verdict_rows
from gdscope.report.html import _verdict_row
from gdscope.verdict import Verdict

CASES = [
    (Verdict("c", "p", "m", True, reason="r-holds"), "holds", "✔ holds"),
    (Verdict("c", "p", "m", False, reason="r-fails"), "fails", "✘ fails"),
    (Verdict("c", "p", "m", None, reason="r-open"), "unknown", "? undetermined"),
    (
        Verdict("c", "p", "m", None, reason="r-out", assumption="no minimum: ‖∇L‖ = 0.3"),
        "outside",
        "outside the theorem's assumptions",
    ),
]


@pytest.mark.parametrize(("v", "css", "mark"), CASES)
def test_run_and_experiment_pages_show_the_status_and_its_reason(v, css, mark):
    for row in (_verdict_row(v), _verdict_rows([v.to_dict()])[0]):
        assert f"class='{css}'" in row and mark in row
        assert v.reason in row
        if v.assumption:
            assert "no minimum" in row


def test_old_stored_verdicts_without_status_still_render():
    old = {"claim": "c", "predicted": "p", "measured": "m", "holds": False, "details": ""}
    row = _verdict_rows([old])[0]
    assert "class='fails'" in row and "✘ fails" in row


@pytest.mark.parametrize(
    ("v", "word"),
    [(c[0], w) for c, w in zip(CASES, ["holds", "fails", "undetermined", "outside"], strict=True)],
)
def test_terminal_marks(v, word):
    assert word in cli_mark(v)
    assert word in cli_mark(v.to_dict())
