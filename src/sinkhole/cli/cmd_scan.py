"""``sinkhole scan``: the whole pipeline, results.json + report.html + figures."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    from . import add_common_args, add_model_args

    p = sub.add_parser("scan", help="run the whole pipeline and write results.json and report.html",
                       description="Run every analysis on a model and write DIR/results.json, DIR/report.html "
                                   "and DIR/figures/. Finished steps are checkpointed; --resume continues.")
    add_model_args(p)
    add_common_args(p)
    p.add_argument("--out", default="sinkhole-out", help="output folder (default: ./sinkhole-out)")
    p.add_argument("--resume", action="store_true", help="keep the finished steps of an interrupted scan")
    p.add_argument("--patch", action="store_true", help="also search, verify and export a patch")
    p.add_argument("--words", default=None, help="comma-separated words for norm curves and divergence")
    p.add_argument("--curve-reps", type=int, default=1000, help="repetitions for the norm curves (default 1000)")
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


def run(args) -> int:
    from ..errors import SinkholeError
    from ..report.html import write_report
    from ..results import dumps, prepare_out_dir, write_json
    from ..scan import PARTIAL, run_scan
    from . import info, load_from_args

    if args.curve_reps <= 0:
        raise SinkholeError("--curve-reps must be a positive integer")
    words = parse_words(args.words, ["the", "poem"])
    out = prepare_out_dir(args.out)
    lm = load_from_args(args)
    if lm.n_ctx and args.curve_reps * max(len(lm.word_ids(w)) for w in words) + 8 > lm.n_ctx:
        raise SinkholeError(f"--curve-reps {args.curve_reps} exceeds the model's context of {lm.n_ctx} tokens; "
                            "lower it")
    options = {"seed": args.seed, "curve_words": words, "curve_reps": args.curve_reps, "patch": bool(args.patch),
               "words": words}
    res = run_scan(lm, options, out, resume=args.resume, log=lambda m: info(args, m))
    doc = res["doc"]
    write_json(out / "results.json", doc)
    write_json(out / "timings.json", {"steps": res["timings"], "total_s": round(sum(res["timings"].values()), 2)})
    report = write_report(doc, out)
    (out / PARTIAL).unlink(missing_ok=True)
    info(args, "timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in res["timings"].items()))
    if args.json:
        sys.stdout.write(dumps(doc))
    else:
        info(args, f"wrote {out / 'results.json'} and {report}")
    return 0
