"""Self-contained HTML report built only from ``results.json`` (never runs a model).

Sections are registered in order; each takes the results document and returns
``(html, [Figure, ...])`` or None when its data is absent.
"""

from __future__ import annotations

import html as _html
from pathlib import Path
from typing import Callable

from ..results import write_atomic
from .figures import Figure

SECTIONS: list[tuple[str, Callable]] = []

# Modules that register sections, in page order (each area owns one module).
SECTION_MODULES = [
    "sinkhole.report.sections",
]


def section(name: str):
    def deco(fn):
        SECTIONS[:] = [s for s in SECTIONS if s[0] != name]
        SECTIONS.append((name, fn))
        return fn

    return deco


def esc(x) -> str:
    return _html.escape(str(x))


def fmt(x, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if abs(x) >= 1000 or (abs(x) < 0.01 and x != 0):
            return f"{x:.{digits}g}"
        return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:,.{max(digits - 1, 1)}f}"
    return esc(x)


def table(headers: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class _Raw(str):
    """A table cell that is already HTML."""


def raw(s: str) -> _Raw:
    return _Raw(s)


def figure_html(f: Figure) -> str:
    return (f'<figure class="fig" id="fig-{esc(f.name)}" data-figure="{esc(f.name)}">{f.inline_svg()}'
            f"<figcaption>{esc(f.caption)}</figcaption></figure>")


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:1.6em;margin:0 0 4px} h2{font-size:1.25em;margin:28px 0 8px;border-bottom:1px solid #dde;padding-bottom:4px}
.sub{color:#5a6570} section{background:#fff;border:1px solid #e3e6ea;border-radius:8px;padding:12px 18px;margin:14px 0}
.verdict{font-size:1.15em;padding:14px 18px;border-radius:8px;margin:16px 0;border:2px solid}
.verdict.bad{background:#fdecea;border-color:#d93025} .verdict.good{background:#e6f4ea;border-color:#188038}
.verdict.unknown{background:#fff8e1;border-color:#f9ab00}
table{border-collapse:collapse;margin:8px 0;font-size:.92em} th,td{border:1px solid #dde;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5} td.num{text-align:right} .fig svg{max-width:100%;height:auto} figure{margin:10px 0}
figcaption{color:#4a5560;font-size:.92em;margin-top:4px} code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.9em}
pre{white-space:pre-wrap;background:#f6f8fa;padding:6px;border-radius:4px;max-height:8em;overflow:auto}
"""


def render(doc: dict) -> tuple[str, list[Figure]]:
    """Return (html, figures) for a results document."""
    import importlib

    for mod in SECTION_MODULES:
        importlib.import_module(mod)

    parts, figs = [], []
    for name, fn in SECTIONS:
        out = fn(doc)
        if out is None:
            continue
        body, fs = out
        parts.append(f'<section id="sec-{esc(name)}">{body}{"".join(figure_html(f) for f in fs)}</section>')
        figs.extend(fs)
    model = doc.get("model", {})
    title = f"sinkhole report: {model.get('name', 'model')}"
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{esc(title)}</h1><div class='sub'>sinkhole {esc(doc.get('sinkhole_version', ''))} · "
        f"results schema {esc(doc.get('schema_version'))}</div>"
        + "".join(parts)
        + "</main></body></html>\n"
    )
    return page, figs


def write_report(doc: dict, out: Path) -> Path:
    page, figs = render(doc)
    for f in figs:
        f.save(out / "figures")
    target = out / "report.html"
    write_atomic(target, page)
    return target
