"""Self-contained HTML report built only from ``results.json`` (never runs a model).

Sections are listed in page order in ``report/layout.py``; each takes the results document and
returns ``(html, [Figure, ...])`` or None when its data is absent. A section's html should start with ``<h2>Title</h2>``: the title
goes into the table of contents. Helpers for section authors: ``table``, ``fmt``, ``esc``,
``raw``, ``details``, ``pre``, ``note`` and ``figures.new``.

The page has no external resources: CSS and a few lines of script are inline, figures are
embedded as SVG data URIs (and also written as PNG + SVG files to ``DIR/figures``).
"""

from __future__ import annotations

import base64
import html as _html
import os
import re
from pathlib import Path

from ..pipeline.registry import load_document
from ..results import dumps, write_atomic
from .figures import Figure
from . import layout
from .markup import esc, fmt, table

# ----------------------------------------------------------------------------- page


def _svg_size(svg: str) -> tuple[int, int] | None:
    m = re.search(r'<svg[^>]*\swidth="([\d.]+)pt"[^>]*\sheight="([\d.]+)pt"', svg)
    if not m:
        return None
    return round(float(m.group(1)) * 4 / 3), round(float(m.group(2)) * 4 / 3)


def figure_html(f: Figure) -> str:
    data = base64.b64encode(f.svg.encode("utf-8")).decode("ascii")
    size = _svg_size(f.svg)
    wh = f' width="{size[0]}" height="{size[1]}"' if size else ""
    return (f'<figure class="fig" id="fig-{esc(f.name)}" data-figure="{esc(f.name)}">'
            f'<img src="data:image/svg+xml;base64,{data}" alt="{esc(f.caption)}"{wh}>'
            f"<figcaption>{esc(f.caption)} <span class='files'>"
            f"<a href='figures/{esc(f.name)}.png'>PNG</a> · <a href='figures/{esc(f.name)}.svg'>SVG</a></span>"
            f"</figcaption></figure>")


CSS = """
:root{--ink:#1d232a;--mut:#5a6570;--line:#e3e6ea;--bg:#f6f7f9;--acc:#1a73e8}
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;margin:0;color:var(--ink);
 background:var(--bg);line-height:1.45;font-size:15px}
.layout{display:grid;grid-template-columns:220px minmax(0,1fr);gap:24px;max-width:1240px;margin:0 auto;padding:20px}
nav.toc{position:sticky;top:16px;align-self:start;max-height:calc(100vh - 32px);overflow:auto;font-size:.9em}
nav.toc h3{font-size:.8em;text-transform:uppercase;letter-spacing:.06em;color:var(--mut);margin:4px 0 6px}
nav.toc ol{list-style:none;padding:0;margin:0} nav.toc li{margin:0}
nav.toc a{display:block;padding:3px 8px;border-radius:4px;color:var(--ink);text-decoration:none}
nav.toc a:hover{background:#e8eef9} nav.toc a.here{background:#e3ebfb;font-weight:600}
main{min-width:0}
header h1{font-size:1.55em;margin:0 0 2px} .sub{color:var(--mut);font-size:.9em}
h2{font-size:1.2em;margin:2px 0 8px} h3{font-size:1.02em;margin:14px 0 6px}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:12px 18px;margin:14px 0;
 scroll-margin-top:12px}
.verdict{font-size:1.08em;padding:12px 16px;border-radius:8px;margin:14px 0;border:2px solid}
.verdict.bad{background:#fdecea;border-color:#d93025} .verdict.good{background:#e6f4ea;border-color:#188038}
.facts{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:4px 12px;margin:6px 0;font-size:.9em}
.facts div{display:flex;flex-direction:column;border-left:3px solid var(--line);padding:1px 8px}
.facts span{color:var(--mut);font-size:.78em}.facts b{font-weight:600;overflow-wrap:anywhere;line-height:1.25}
.verdict.unknown{background:#fff8e1;border-color:#f9ab00} .verdict ul{margin:6px 0 0 0;padding-left:20px}
.errors{background:#fff4e5;border:1px solid #f9ab00;border-radius:8px;padding:8px 14px;margin:14px 0}
.section-error{color:#a50e0e}
.tablewrap{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:8px 0;font-size:.9em}
th,td{border:1px solid #dde;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5;position:sticky;top:0} td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:12px 0} .fig img{max-width:100%;height:auto;display:block}
figcaption{color:#4a5560;font-size:.9em;margin-top:4px;max-width:760px}
figcaption .files{white-space:nowrap;font-size:.85em} figcaption .files a{color:var(--mut)}
.fig.broken{outline:2px dashed #d93025}
.note{color:var(--mut);font-size:.9em;max-width:820px}
code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.88em}
pre{white-space:pre-wrap;word-break:break-word;background:#f6f8fa;padding:6px 8px;border-radius:4px;
 max-height:12em;overflow:auto;margin:4px 0}
details{margin:6px 0} summary{cursor:pointer;color:var(--acc)}
footer{color:var(--mut);font-size:.85em;margin:24px 0 8px}
@media (max-width:1000px){.layout{grid-template-columns:minmax(0,1fr);padding:12px}
 nav.toc{position:static;max-height:none;background:#fff;border:1px solid var(--line);border-radius:8px;padding:8px}
 nav.toc ol{columns:2}}
@media print{nav.toc{display:none}.layout{display:block}section{break-inside:avoid}}
"""

# Marks figures that failed to load (visible outline) and records the count on <html> for tests.
SCRIPT = """
window.addEventListener('load',function(){var f=document.querySelectorAll('figure[data-figure]'),ok=0;
for(var i=0;i<f.length;i++){var im=f[i].querySelector('img');
if(im&&im.complete&&im.naturalWidth>0){ok++;}else{f[i].classList.add('broken');}}
document.documentElement.setAttribute('data-figures-ok',ok+'/'+f.length);
var links={},secs=[];document.querySelectorAll('nav.toc a').forEach(function(a){var id=a.getAttribute('href').slice(1),
s=document.getElementById(id);if(s){links[id]=a;secs.push(s);}});
function mark(){var cur=null;for(var i=0;i<secs.length;i++){if(secs[i].getBoundingClientRect().top<120){cur=secs[i].id;}}
for(var k in links){links[k].classList.toggle('here',k===cur);}}
window.addEventListener('scroll',mark,{passive:true});mark();});
"""

_H2 = re.compile(r"<h2(?:\s[^>]*)?>(.*?)</h2>", re.S)


def _strip_tags(s: str) -> str:
    return _html.unescape(re.sub(r"<[^>]+>", "", s)).strip()


def _section_error(name: str, err: Exception) -> str:
    return (f"<h2>{esc(name)}</h2><p class='section-error'>This section could not be rendered "
            f"({esc(type(err).__name__)}: {esc(str(err)[:300])}). The data is in results.json; "
            "please report this.</p>")


def render(doc: dict, timings: dict | None = None) -> tuple[str, list[Figure]]:
    """Return (html, figures) for a results document. ``timings`` (from timings.json), when given,
    is shown in the footer."""
    import json

    typed = load_document(doc)  # every step result as its typed object: a renamed field fails here
    doc = json.loads(dumps({**doc, "results": {k: v for k, v in typed.items() if k != "model"}}))
    blocks, toc, figs, top = [], [], [], []
    for name, fn in layout.SECTIONS:  # read at render time (tests add sections)
        try:
            out = fn(doc)
        except Exception as err:  # one broken section must not lose the report
            if os.environ.get("SINKHOLE_DEBUG"):
                raise
            out = (_section_error(name, err), [])
        if out is None:
            continue
        body, fs = out
        seen = {f.name for f in figs}
        for f in fs:  # two figures with one name would overwrite each other's files
            base, k = f.name, 2
            while f.name in seen:
                f.name, k = f"{base}-{k}", k + 1
            seen.add(f.name)
        fig_html = "".join(figure_html(f) for f in fs)
        figs.extend(fs)
        sid = f"sec-{name}"
        m = _H2.search(body)
        if name == "verdict" and not m:
            top.append(f'<div id="{esc(sid)}" data-section="{esc(name)}">{body}{fig_html}</div>')
            continue
        if m:
            toc.append((sid, _strip_tags(m.group(1))))
        blocks.append(f'<section id="{esc(sid)}" data-section="{esc(name)}">{body}{fig_html}</section>')

    model = doc.get("model", {}) or {}
    name = model.get("name", "model")
    title = f"sinkhole report: {name}"
    opts = doc.get("options", {}) or {}
    optline = ", ".join(f"{k}={v}" for k, v in sorted(opts.items()) if not isinstance(v, (list, dict)))
    errors = doc.get("errors") or {}
    err_html = ""
    if errors:
        err_html = ("<div class='errors'><b>Some steps failed</b>; their sections are missing. Rerun the scan "
                    "with <code>--resume</code> after fixing the cause.<ul>"
                    + "".join(f"<li><code>{esc(k)}</code>: {esc(v)}</li>" for k, v in errors.items())
                    + "</ul></div>")
    toc_html = ("<nav class='toc' aria-label='Contents'><h3>Contents</h3><ol>"
                + "<li><a href='#top'>Verdict</a></li>"
                + "".join(f"<li><a href='#{esc(i)}'>{esc(t)}</a></li>" for i, t in toc)
                + (f"<li><a href='#figures'>All figures ({len(figs)})</a></li>" if figs else "")
                + "</ol></nav>")
    fig_index = ""
    if figs:
        fig_index = ("<section id='figures'><h2>All figures</h2><ol>"
                     + "".join(f"<li><a href='#fig-{esc(f.name)}'>{esc(f.caption.split(':')[0] if f.caption.startswith('Figure') else f.name)}</a>"
                               f" — <code>figures/{esc(f.name)}.png</code>, <code>.svg</code></li>" for f in figs)
                     + "</ol></section>")
    timing_html = ""
    if timings and timings.get("steps"):
        timing_html = ("<details><summary>Scan timings</summary>"
                       + table(["step", "seconds"], [[k, float(timings["steps"][k])] for k in
                                                     sorted(timings["steps"], key=lambda k: (
                                                         doc.get("steps", []).index(k) if k in doc.get("steps", [])
                                                         else 10**6, k))]
                               + ([["load model", float(timings["load_model_s"])]] if "load_model_s" in timings else [])
                               + [["total", float(timings.get("total_s", sum(timings["steps"].values())))]])
                       + "</details>")
    page = (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<div class='layout'>{toc_html}<main>"
        f"<header id='top'><h1>{esc(title)}</h1><div class='sub'>{esc(model.get('hf_name', ''))}"
        f"{' · ' if model.get('hf_name') else ''}{fmt(model.get('n_layers'))} layers · "
        f"scan options: {esc(optline)}</div></header>"
        + "".join(top) + err_html + "".join(blocks) + fig_index
        + f"<footer>Built from results.json (schema {esc(doc.get('schema_version'))}) by sinkhole "
        f"{esc(doc.get('sinkhole_version', ''))}. Re-render with <code>sinkhole report DIR</code>; the figures "
        f"are also in <code>DIR/figures/</code> as PNG and SVG. {timing_html}</footer>"
        f"</main></div><script>{SCRIPT}</script></body></html>\n"
    )
    return page, figs


def write_report(doc: dict, out: Path, timings: dict | None = None) -> Path:
    """Write ``out/report.html`` and ``out/figures/*.png|svg``; returns the report's path.
    Reads ``out/timings.json`` for the footer when ``timings`` is not given."""
    import json

    out = Path(out)
    if timings is None:
        try:
            timings = json.loads((out / "timings.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            timings = None
    page, figs = render(doc, timings)
    for f in figs:
        f.save(out / "figures")
    target = out / "report.html"
    write_atomic(target, page)
    return target
