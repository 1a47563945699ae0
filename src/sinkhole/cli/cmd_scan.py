"""``sinkhole scan``: the whole pipeline, results.json + report.html + figures."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    from . import add_common_args, add_model_args

    p = sub.add_parser("scan", help="run the whole pipeline and write results.json and report.html",
                       description="Run every analysis on a model and write DIR/results.json, DIR/report.html, "
                                   "DIR/figures/*.png|svg and DIR/timings.json. Finished steps are checkpointed: "
                                   "after Ctrl-C, rerun the same command with --resume to continue.")
    add_model_args(p)
    add_common_args(p)
    p.add_argument("--out", default="sinkhole-out", help="output folder (default: ./sinkhole-out)")
    p.add_argument("--resume", action="store_true",
                   help="keep the finished steps of an interrupted (or finished) scan in --out with the same "
                        "model and options, and run only the rest")
    p.add_argument("--patch", action="store_true", help="also search, verify and export a patch")
    p.add_argument("--quick", action="store_true",
                   help="a small, fast scan (fewer cases, shorter runs): for a first look, tests and CI")
    p.add_argument("--words", default=None, help="comma-separated words for norm curves and divergence")
    p.add_argument("--curve-reps", type=int, default=None,
                   help="repetitions for the norm curves (default 1000, 300 with --quick)")
    p.set_defaults(func=run)


def parse_words(text: str | None, default: list[str]) -> list[str]:
    from ..errors import SinkholeError

    if text is None:
        return default
    words = [w.strip() for w in text.split(",")]
    if not any(words):
        raise SinkholeError("--words is empty; pass comma-separated words, e.g. --words poem,company")
    if any(not w for w in words):
        raise SinkholeError("--words contains an empty or whitespace-only word; remove the stray comma")
    return words


def build_options(args, lm) -> dict:
    """The scan options (stored in results.json) from the command line."""
    from ..errors import SinkholeError

    reps = args.curve_reps if args.curve_reps is not None else (300 if args.quick else 1000)
    if reps <= 0:
        raise SinkholeError("--curve-reps must be a positive integer")
    words = parse_words(args.words, ["the", "poem"])
    longest = max(len(lm.word_ids(w)) for w in words)
    if lm.n_ctx and reps * longest + 8 > lm.n_ctx:
        if args.curve_reps is not None:
            raise SinkholeError(f"--curve-reps {reps} exceeds the model's context of {lm.n_ctx} tokens; lower it")
        reps = max(1, (lm.n_ctx - 8) // longest)
    return {"seed": args.seed, "quick": bool(args.quick), "patch": bool(args.patch), "words": words,
            "curve_words": words, "curve_reps": reps}


def run(args) -> int:
    import time

    from ..report.html import write_report
    from ..results import dumps, prepare_out_dir, write_json
    from ..scan import PARTIAL, ScanInterrupted, run_scan
    from . import info, load_from_args

    if args.curve_reps is not None and args.curve_reps <= 0:
        from ..errors import SinkholeError

        raise SinkholeError("--curve-reps must be a positive integer")
    parse_words(args.words, [])  # bad --words fails before the model loads
    out = prepare_out_dir(args.out)
    t0 = time.perf_counter()
    lm = load_from_args(args)
    t_load = round(time.perf_counter() - t0, 2)
    options = build_options(args, lm)
    try:
        res = run_scan(lm, options, out, resume=args.resume, log=lambda m: info(args, m))
    except ScanInterrupted as stop:
        print(f"sinkhole: interrupted during step '{stop.step}'; {len(stop.done)} finished step(s) kept in "
              f"{stop.partial}; rerun the same command with --resume to continue", file=sys.stderr)
        return 130
    doc = res["doc"]
    timings = res["timings"]
    write_json(out / "results.json", doc)
    write_json(out / "timings.json", {"load_model_s": t_load, "steps": timings,
                                      "total_s": round(t_load + sum(timings.values()), 2)})
    report = write_report(doc, out)
    (out / PARTIAL).unlink(missing_ok=True)
    width = max([len(k) for k in timings] + [10])
    info(args, "step timings:\n" + f"  {'load model':{width}s} {t_load:7.1f}s\n" + "".join(
        f"  {k:{width}s} {v:7.1f}s\n" for k, v in timings.items()) +
        f"  {'total':{width}s} {t_load + sum(timings.values()):7.1f}s")
    if args.json:
        sys.stdout.write(dumps(doc))
    else:
        info(args, f"wrote {out / 'results.json'}, {report} and {out / 'figures'}/")
    if doc.get("errors"):
        info(args, f"{len(doc['errors'])} step(s) failed: {', '.join(doc['errors'])}; see results.json 'errors', "
                   "fix and rerun with --resume")
        return 1
    return 0
