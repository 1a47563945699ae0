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
    p.add_argument("--check", action="store_true",
                   help="open the report in headless chromium and fail if it has console errors or a missing figure")
    p.add_argument("--screenshot", metavar="PNG", help="also save a screenshot of the report (needs chromium)")
    p.add_argument("--full-page", action="store_true", help="with --screenshot: the whole page, not the first screen")
    p.add_argument("--width", type=int, default=1366, help="browser width in CSS pixels (default 1366, a laptop)")
    p.add_argument("--height", type=int, default=800, help="browser height in CSS pixels (default 800)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report.browser import check_page, find_chromium  # lazy: start-up time
    from ..report.html import write_report  # lazy: start-up time
    from ..results import load_results, prepare_out_dir  # lazy: start-up time

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
    from ..errors import SinkholeError  # lazy: start-up time

    if args.width < 320 or args.height < 200:
        raise SinkholeError("--width must be at least 320 and --height at least 200 pixels")
    if (args.check or args.screenshot) and not find_chromium():
        raise SinkholeError("--check/--screenshot need chromium; install it with scripts/install-chromium.sh "
                            "(Debian: apt-get install chromium) or set SINKHOLE_CHROMIUM")
    if args.screenshot:
        shot = Path(args.screenshot)
        if shot.is_dir() or not shot.parent.exists():
            raise SinkholeError(f"--screenshot {shot}: give a file path in an existing folder")
    path = write_report(doc, out, timings=timings or {})
    if not args.quiet:
        print(path)
    if args.check or args.screenshot:
        info = check_page(path, screenshot=args.screenshot, width=args.width, height=args.height,
                          full_page=args.full_page)
        bad = [f["name"] for f in info["figures"] if not f["loaded"]]
        if not args.quiet:
            print(f"chromium: {len(info['figures']) - len(bad)}/{len(info['figures'])} figures drawn, "
                  f"{len(info['console_errors'])} console error(s), page width {info['scroll_width']}px"
                  + (f"; screenshot {args.screenshot}" if args.screenshot else ""))
            for e in info["console_errors"]:
                print(f"  console: {e}")
        if args.check and (bad or info["console_errors"] or info["section_errors"]):
            raise SinkholeError(f"report check failed: {len(info['console_errors'])} console error(s), "
                                f"missing figures {bad or 'none'}, {info['section_errors']} broken section(s)",
                                exit_code=1)
    return 0
