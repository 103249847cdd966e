"""The theory behind the verdicts, shipped with the package and embedded in every report page.

``theory.md`` (this folder; ``docs/theory.md`` is a link to it) is the reference every verdict
cites by a section anchor (``Verdict.section``, GitHub's heading slug, e.g.
``3-curvature-stability-of-minima-and-the-gd-map``). A page links each claim to ``#<section>``
and carries the cited sections in a "Theory" appendix (:func:`appendix`), rendered by a small
Markdown-to-HTML converter for the subset the file uses: headings, paragraphs, bullet lists
(nested by indentation), pipe tables, inline code, bold and italics. Everything is escaped;
nothing outside the page is needed.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

__all__ = [
    "VERDICT_SECTION",
    "Section",
    "appendix",
    "markdown_to_html",
    "section_link",
    "sections",
    "slug",
    "theory_text",
]

#: The section that defines the verdict vocabulary (holds, fails, undetermined, outside).
VERDICT_SECTION = "8-from-a-theorem-to-a-verdict"


@dataclass(frozen=True)
class Section:
    """One ``##`` section of theory.md: its anchor, heading text and Markdown body."""

    anchor: str
    title: str
    body: str


def theory_text() -> str:
    """The text of theory.md, read from the installed package."""
    return resources.files("gdscope.report").joinpath("theory.md").read_text(encoding="utf-8")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens.

    >>> slug("3. Curvature, stability of minima, and the GD map")
    '3-curvature-stability-of-minima-and-the-gd-map'
    """
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@lru_cache(maxsize=1)
def _sections() -> tuple[Section, ...]:
    out: list[Section] = []
    title, body = "", []
    for line in theory_text().splitlines():
        if line.startswith("## "):
            if title:
                out.append(Section(slug(title), title, "\n".join(body).strip()))
            title, body = line[3:].strip(), []
        elif title:
            body.append(line)
    if title:
        out.append(Section(slug(title), title, "\n".join(body).strip()))
    return tuple(out)


def sections() -> dict[str, Section]:
    """The ``##`` sections of theory.md by anchor, in file order."""
    return {s.anchor: s for s in _sections()}


def section_link(anchor: str) -> str:
    """An in-page link to section ``anchor`` (``§3 Curvature, …``), or its escaped name with
    a note when theory.md has no such section."""
    sec = sections().get(anchor)
    if sec is None:
        return (
            f"<span class='theory-missing'>theory section {html.escape(anchor)} "
            "(not in this version of theory.md)</span>"
        )
    number, _, words = sec.title.partition(". ")
    label = f"§{number} {words}" if words else sec.title
    return f"<a class='theory-link' href='#{html.escape(anchor)}'>{_inline(label)}</a>"


def appendix(anchors: Iterable[str]) -> str:
    """The "Theory" section of a page: every known section of ``anchors`` (plus the verdict
    vocabulary, :data:`VERDICT_SECTION`), in file order, under ids equal to their anchors."""
    wanted = {a for a in anchors if a} | {VERDICT_SECTION}
    parts = [
        f"<section class='theory-section' id='{html.escape(s.anchor)}'>"
        f"<h3>{_inline(s.title)}</h3>{markdown_to_html(s.body)}</section>"
        for s in _sections()
        if s.anchor in wanted
    ]
    missing = sorted(wanted - set(sections()))
    note = (
        "<p class='note'>Cited but not in this version of theory.md: "
        + ", ".join(html.escape(a) for a in missing)
        + ".</p>"
        if missing
        else ""
    )
    return (
        "<section id='theory'><h2>Theory</h2><p class='note'>The sections of gdscope's "
        "theory.md (shipped with the package; docs/theory.md in the repository) that the claims "
        f"on this page cite.</p>{note}{''.join(parts)}</section>"
    )


# ---------------------------------------------------------------------- Markdown subset
_INLINE = re.compile(
    r"\\([\\`*_])|`([^`]+)`|\*\*(.+?)\*\*|(?<![\w*\\])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])"
)


def _inline(text: str) -> str:
    """Escaped inline Markdown: ``code``, **bold**, *italics*, backslash escapes."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(html.escape(text[pos : m.start()]))
        if m[1] is not None:
            out.append(html.escape(m[1]))
        elif m[2] is not None:
            out.append(f"<code>{html.escape(m[2])}</code>")
        elif m[3] is not None:
            out.append(f"<strong>{_inline(m[3])}</strong>")
        else:
            out.append(f"<em>{_inline(m[4])}</em>")
        pos = m.end()
    out.append(html.escape(text[pos:]))
    return "".join(out)


_BULLET = re.compile(r"^(\s*)- (.*)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _list(lines: Sequence[str], start: int) -> tuple[str, int]:
    """A (nested) bullet list starting at ``lines[start]``; returns its HTML and the next line."""
    base = _indent(lines[start])
    items: list[str] = []
    i = start
    while i < len(lines):
        m = _BULLET.match(lines[i])
        if not m or len(m[1]) != base:
            break
        text, i = [m[2]], i + 1
        nested = ""
        while i < len(lines) and lines[i].strip():
            sub = _BULLET.match(lines[i])
            if sub and len(sub[1]) > base:
                block, i = _list(lines, i)
                nested += block
            elif sub or _indent(lines[i]) <= base:
                break
            else:
                text.append(lines[i].strip())
                i += 1
        items.append(f"<li>{_inline(' '.join(text))}{nested}</li>")
    return f"<ul>{''.join(items)}</ul>", i


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def markdown_to_html(text: str) -> str:
    """HTML of the Markdown subset theory.md uses (escaped; see the module docstring)."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if not stripped:
            i += 1
        elif stripped.startswith("#"):
            level = min(len(stripped) - len(stripped.lstrip("#")) + 1, 6)
            out.append(f"<h{level}>{_inline(stripped.lstrip('#').strip())}</h{level}>")
            i += 1
        elif _BULLET.match(line):
            block, i = _list(lines, i)
            out.append(block)
        elif stripped.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(_cells(lines[i]))
                i += 1
            body = [r for r in rows[1:] if not all(re.fullmatch(r":?-+:?", c) for c in r)]
            head = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
            cells = "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
        else:
            para = []
            while i < len(lines) and lines[i].strip():
                s = lines[i].strip()
                if s.startswith(("#", "|")) or _BULLET.match(lines[i]):
                    break
                para.append(s)
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "".join(out)
