"""The verdict vocabulary of every page, and details a person reads without decoding.

One renderer for the run, experiment and sweep pages: each verdict is shown by its ``status``
(:data:`gdscope.verdict.STATUSES`: holds, fails, undetermined, outside the theorem's
assumptions), each with its colour and mark, its one-line ``reason`` beside it (and, for
"outside", the unmet ``assumption``), the ``theorem`` under the claim in a ``<details>``
element, and a link to the theory section behind it (:mod:`gdscope.report.theory`). Stored
verdict dicts are read through :meth:`gdscope.verdict.Verdict.from_dict`, so old stores without
the newer fields render too.

``details`` (free text or a JSON-ready dict) are formatted as definition lists and small tables,
numbers to 4 significant digits: never a JSON dump.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from gdscope.report.theory import VERDICT_SECTION, section_link
from gdscope.verdict import STATUSES, Status, Verdict

__all__ = [
    "STATUS_STYLE",
    "VERDICT_CSS",
    "as_verdict",
    "format_details",
    "format_number",
    "format_value",
    "humanize_key",
    "status_cell",
    "status_legend",
    "verdicts_table",
]

#: Per status: (CSS class, mark, words, colour). The marks are those the CLI prints.
STATUS_STYLE: dict[Status, tuple[str, str, str, str]] = {
    "holds": ("holds", "✔", "holds", "#1a7f37"),
    "fails": ("fails", "✘", "fails", "#c62828"),
    "undetermined": ("unknown", "?", "undetermined", "#9a6700"),
    "outside": ("outside", "○", "outside the theorem's assumptions", "#44607a"),
}

VERDICT_CSS = (
    "".join(
        f".{css} {{ color: {color}; font-weight: 600; }} "
        f"td.v-{css} {{ border-left: 4px solid {color}; }}\n"
        for css, _, _, color in STATUS_STYLE.values()
    )
    + """

.holds, .fails, .unknown, .outside { white-space: nowrap; }
td.verdict .reason, td.verdict .assumption { color: #333; font-weight: 400; font-size: 0.88em;
  margin-top: 0.2em; }
td.verdict .assumption b { font-weight: 600; }
.legend span { margin-right: 1.2em; white-space: nowrap; }
details.theorem { font-size: 0.88em; color: #444; margin-top: 0.3em; }
details.theorem summary { cursor: pointer; color: #555; }
.details { color: #555; font-size: 0.88em; margin-top: 0.3em; }
.details table { margin: 0.2em 0; font-size: 0.95em; }
.details th, .details td { padding: 0.1em 0.4em; }
.na { color: #888; }
a.theory-link { font-size: 0.88em; }
section.theory-section { border-top: 1px solid #eee; }
section.theory-section code { font-size: 0.92em; }
"""
)

#: Lists longer than this show their first values and the count.
LIST_MAX = 12
#: Nesting deeper than this is written inline (``key: value; …``).
DEPTH_MAX = 3

_WORDS = {
    "lr": "η",
    "eta": "η",
    "sigma": "σ",
    "lambda": "λ",
    "mu": "μ",
    "rho": "ρ",
    "delta": "δ",
    "beta": "β",
    "tol": "tolerance",
    "se": "standard error",
    "ci": "95% CI",
    "n": "n",
    "inf": "∞",
    "min": "min",
    "max": "max",
    "num": "number of",
    "aic": "AIC",
    "pl": "PL",
    "ntk": "NTK",
    "gd": "GD",
    "sgd": "SGD",
    "hvps": "Hessian-vector products",
    "matvecs": "matrix-vector products",
}
_UNITS = {"seconds": "s", "wall_s": "s", "time_s": "s"}


def humanize_key(key: Any) -> str:
    """A details key in words: ``mean_ratio`` → ``mean ratio``, ``sigma_inf`` → ``σ∞``.

    Keys that are not snake case identifiers are kept as they are.
    """
    text = str(key)
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*", text):
        return text
    words = [_WORDS.get(w.lower(), w) for w in text.split("_")]
    return " ".join(words).replace(" ∞", "∞")


def format_number(x: float | int) -> str:
    """A number to 4 significant digits; ``∞``/``−∞``/``NaN`` spelled out; minus as ``−``."""
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x).replace("-", "−")
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "∞" if x > 0 else "−∞"
    return f"{x:.4g}".replace("-", "−")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _scalar(x: Any) -> str:
    """Escaped text of a scalar (None is "—")."""
    if x is None:
        return "<span class='na'>—</span>"
    if isinstance(x, (bool, int, float)):
        return format_number(x)
    return html.escape(str(x))


def format_value(value: Any, depth: int = 0, unit: str = "") -> str:
    """Escaped HTML of a details value: scalars, lists of numbers, rows (a list of dicts) as a
    small table, dicts as a definition list. ``unit`` is appended to numbers."""
    suffix = f" {unit}" if unit else ""
    if isinstance(value, Mapping):
        if not value:
            return "<span class='na'>— (empty)</span>"
        if depth >= DEPTH_MAX:
            return "; ".join(
                f"{html.escape(humanize_key(k))}: {format_value(v, depth + 1)}"
                for k, v in value.items()
            )
        return _definition_list(value, depth)
    if isinstance(value, (list, tuple)):
        return _sequence(value, depth) + (suffix if value and all(map(_is_number, value)) else "")
    if _is_number(value):
        return format_number(value) + suffix
    return _scalar(value)


def _definition_list(items: Mapping[Any, Any], depth: int) -> str:
    rows = "".join(
        f"<dt>{html.escape(humanize_key(k))}</dt>"
        f"<dd>{format_value(v, depth + 1, _UNITS.get(str(k), ''))}</dd>"
        for k, v in items.items()
    )
    return f"<dl class='kv'>{rows}</dl>"


def _sequence(values: Sequence[Any], depth: int) -> str:
    if not values:
        return "<span class='na'>— (none)</span>"
    if all(isinstance(v, Mapping) for v in values) and depth < DEPTH_MAX:
        return _rows_table(values, depth)  # type: ignore[arg-type]
    shown = list(values[:LIST_MAX])
    if all(isinstance(v, (list, tuple)) for v in shown) and all(
        all(not isinstance(x, (Mapping, list, tuple)) for x in v) for v in shown
    ):
        text = ", ".join("(" + ", ".join(_scalar(x) for x in v) + ")" for v in shown)
    else:
        text = ", ".join(format_value(v, depth + 1) for v in shown)
    more = f", … ({len(values)} values)" if len(values) > LIST_MAX else ""
    return text + more


def _rows_table(rows: Sequence[Mapping[Any, Any]], depth: int) -> str:
    keys: list[Any] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    head = "".join(f"<th>{html.escape(humanize_key(k))}</th>" for k in keys)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{format_value(row[k], depth + 1) if k in row else _scalar(None)}</td>"
            for k in keys
        )
        + "</tr>"
        for row in rows[:LIST_MAX]
    )
    more = (
        f"<p class='note'>… {len(rows) - LIST_MAX} more rows not shown.</p>"
        if len(rows) > LIST_MAX
        else ""
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"


def format_details(details: Any) -> str:
    """A verdict's ``details`` as HTML (empty string when there are none)."""
    if details is None or details == "" or details == {}:
        return ""
    body = format_value(details) if not isinstance(details, str) else html.escape(details)
    return f"<div class='details'>{body}</div>"


# ---------------------------------------------------------------------- verdicts
def as_verdict(data: Verdict | Mapping[str, Any]) -> Verdict:
    """A :class:`Verdict` from a verdict or a stored dict (old or malformed dicts included)."""
    if isinstance(data, Verdict):
        return data
    try:
        return Verdict.from_dict(dict(data))
    except (KeyError, TypeError, ValueError):  # missing fields or contradicting ones
        holds = data.get("holds")
        return Verdict(
            str(data.get("claim", "")),
            str(data.get("predicted", "")),
            str(data.get("measured", "")),
            holds if holds is True or holds is False else None,
            data.get("details", "") if isinstance(data.get("details"), (str, Mapping)) else "",
            reason=str(data.get("reason", "")),
            theorem=str(data.get("theorem", "")),
            section=str(data.get("section", "")),
            assumption=str(data.get("assumption", "")) if holds is None else "",
        )


def mark(status: Status) -> str:
    """The mark and words of a status, e.g. ``✔ holds``."""
    _, symbol, words, _ = STATUS_STYLE[status]
    return f"{symbol} {words}"


def status_cell(v: Verdict) -> str:
    """The verdict cell: coloured mark, one-line reason and (outside) the unmet assumption; a
    reason that only repeats the assumption is shown once, as the assumption."""
    css = STATUS_STYLE[v.status][0]
    repeated = bool(v.assumption) and v.reason.strip() == v.assumption.strip()
    reason = (
        f"<div class='reason'>{html.escape(v.reason)}</div>" if v.reason and not repeated else ""
    )
    assumption = (
        f"<div class='assumption'><b>Assumption not met:</b> {html.escape(v.assumption)}</div>"
        if v.assumption
        else ""
    )
    return (
        f"<td class='verdict v-{css}' data-status='{v.status}'><span class='{css}'>"
        f"{html.escape(mark(v.status), quote=False)}</span>{reason}{assumption}</td>"
    )


def _claim_cell(v: Verdict) -> str:
    claim = html.escape(v.claim) if v.claim else "<span class='na'>— (no claim text)</span>"
    link = f"<div>{section_link(v.section)}</div>" if v.section else ""
    theorem = (
        "<details class='theorem'><summary>theorem tested</summary>"
        f"{html.escape(v.theorem)}</details>"
        if v.theorem
        else ""
    )
    return f"<td class='claim'>{claim}{theorem}{link}</td>"


def _text_cell(text: str, missing: str, extra: str = "") -> str:
    body = html.escape(text) if text else f"<span class='na'>— {html.escape(missing)}</span>"
    return f"<td>{body}{extra}</td>"


def verdict_row(v: Verdict) -> str:
    """One ``<tr>``: claim (theorem, section link), predicted, measured (details), verdict."""
    return (
        f"<tr>{_claim_cell(v)}{_text_cell(v.predicted, '(no prediction recorded)')}"
        f"{_text_cell(v.measured, '(nothing measured)', format_details(v.details))}"
        f"{status_cell(v)}</tr>"
    )


def status_legend() -> str:
    """The four statuses with their marks and colours, linked to the vocabulary's section."""
    spans = "".join(
        f"<span class='{STATUS_STYLE[s][0]}'>{html.escape(mark(s), quote=False)}</span>"
        for s in STATUSES
    )
    return (
        f"<p class='legend note'>{spans}<br>Each verdict carries its one-line reason; "
        f"what the four verdicts mean: {section_link(VERDICT_SECTION)}.</p>"
    )


def verdicts_table(verdicts: Iterable[Verdict | Mapping[str, Any]]) -> str:
    """The verdict table of a page (stored dicts or verdicts), or a note when there are none."""
    rows = [verdict_row(as_verdict(v)) for v in verdicts]
    if not rows:
        return "<p class='note'>No verdicts.</p>"
    head = "".join(f"<th>{h}</th>" for h in ("claim", "predicted", "measured", "verdict"))
    return (
        f"<table class='verdicts'><thead><tr>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def cited_sections(verdicts: Iterable[Verdict | Mapping[str, Any]]) -> list[str]:
    """The theory sections ``verdicts`` cite, first-seen order."""
    out: list[str] = []
    for v in verdicts:
        sec = as_verdict(v).section
        if sec and sec not in out:
            out.append(sec)
    return out
