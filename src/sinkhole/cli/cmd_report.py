"""``sinkhole report DIR``: re-render report.html from results.json without a model."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="re-render DIR/report.html from DIR/results.json (no model needed)",
                       description="Re-render the HTML report and figures from a scan's results.json.")
    p.add_argument("dir", help="folder written by 'sinkhole scan --out DIR' (or a results.json file)")
    p.add_argument("--out", help="where to write report.html (default: the same folder)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report.html import write_report
    from ..results import load_results, prepare_out_dir

    doc = load_results(args.dir)
    src = Path(args.dir)
    out = prepare_out_dir(args.out or (src if src.is_dir() else src.parent))
    path = write_report(doc, out)
    if not args.quiet:
        print(path)
    return 0
