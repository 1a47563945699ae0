"""HTML building blocks the report's sections share: escaping, number formatting, tables, notes."""

from __future__ import annotations

import html as _html


def esc(x) -> str:
    return _html.escape(str(x))


def fmt(x, digits: int = 3) -> str:
    """A number for humans: 3 significant digits, thousands separators, '–' for missing."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if x != x:
            return "–"
        if abs(x) >= 1e6 or (abs(x) < 0.01 and x != 0):
            return f"{x:.{digits}g}"
        if abs(x) < 1:
            return f"{x:.{digits}g}"
        return f"{x:,.{max(digits - len(str(int(abs(x)))), 0)}f}" if abs(x) < 10 ** digits else f"{x:,.0f}"
    if isinstance(x, int):
        return f"{x:,}" if abs(x) >= 10000 else str(x)
    return esc(x)


class _Raw(str):
    """A table cell that is already HTML."""


def raw(s: str) -> _Raw:
    return _Raw(s)


def _cell(c) -> str:
    if isinstance(c, _Raw):
        return f"<td>{c}</td>"
    if isinstance(c, (int, float)) and not isinstance(c, bool):
        return f'<td class="num">{fmt(c)}</td>'
    return f"<td>{fmt(c)}</td>"


def table(headers: list[str], rows: list[list], cls: str = "") -> str:
    """An HTML table; numbers are right-aligned and formatted with ``fmt``; ``raw()`` cells pass as HTML.
    Wide tables scroll sideways inside their box instead of widening the page."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(c) for c in r) + "</tr>" for r in rows)
    return f'<div class="tablewrap"><table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def details(summary: str, body_html: str, open: bool = False) -> str:
    """A collapsible block (e.g. long example generations)."""
    return f"<details{' open' if open else ''}><summary>{esc(summary)}</summary>{body_html}</details>"


def pre(text: str) -> str:
    """Preformatted, escaped text (model outputs); long text scrolls inside the box."""
    return f"<pre>{esc(text)}</pre>"


def note(text_html: str) -> str:
    """A short explanatory paragraph in smaller grey type."""
    return f'<p class="note">{text_html}</p>'
