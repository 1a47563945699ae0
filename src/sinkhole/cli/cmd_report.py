"""``sinkhole report DIR``: re-render report.html from results.json without a model."""

from __future__ import annotations

import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="re-render DIR/report.html from DIR/results.json (no model needed)",
                       description="Re-render the HTML report and the PNG/SVG figures from a scan's results.json "
                                   "without loading a model.")
    p.add_argument("dir", help="folder written by 'sinkhole scan --out DIR' (or a results.json file)")
    p.add_argument("--out", help="where to write report.html and figures/ (default: the same folder)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report.html import write_report
    from ..results import load_results, prepare_out_dir

    doc = load_results(args.dir)
    src = Path(args.dir)
    src_dir = src if src.is_dir() else src.parent
    out = prepare_out_dir(args.out or src_dir)
    try:
        timings = json.loads((src_dir / "timings.json").read_text(encoding="utf-8"))
        if not isinstance(timings, dict):
            timings = None
    except (OSError, ValueError):
        timings = None
    path = write_report(doc, out, timings=timings or {})
    if not args.quiet:
        print(path)
    return 0
