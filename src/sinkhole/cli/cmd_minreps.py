"""``sinkhole minreps``: each word's smallest repetition count after which its greedy continuation leaves the run."""

from __future__ import annotations


def add_parser(sub) -> None:
    from . import add_common_args, add_export_args, add_model_args  # lazy: start-up time

    p = sub.add_parser("minreps", help="the smallest repetition count that makes each word diverge",
                       description="Search each word's smallest repetition count whose greedy continuation leaves the "
                                   "run (doubling, bisection, probes above it that report words whose divergence is "
                                   "not monotone in the count; the exact greedy check), beside the sweep's norm-based "
                                   "repetitions to a sink, with their rank correlation.")
    add_model_args(p)
    add_common_args(p)
    p.add_argument("--words", default=None,
                   help="comma-separated words (default: poem, company and frequent one-token words, --n-words in all)")
    p.add_argument("--templates", default="repeat",
                   help="one template that ends with the run: repeat (default), raw or chat_assistant")
    p.add_argument("--max-reps", type=int, default=2048, help="largest count the search tries (default 2048)")
    p.add_argument("--start-reps", type=int, default=8, help="first count of the doubling (default 8)")
    p.add_argument("--resolution", type=int, default=4,
                   help="bisection stops when the bracket is at most this many repetitions wide (default 4)")
    p.add_argument("--n-words", type=int, default=30, help="without --words: how many words (default 30)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens checked per case (default 48)")
    add_export_args(p)
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..attack.minreps import MinRepsConfig, default_words, min_reps_table  # lazy: start-up time
    from ..attack.prompts import (  # lazy: start-up time
        RUN_AT_END,
        parse_words,
    )
    from ..errors import SinkholeError  # lazy: start-up time
    from ..pipeline.engine import document  # lazy: start-up time
    from . import (  # lazy: start-up time
        check_export,
        check_out_file,
        emit,
        info,
        load_from_args,
        maybe_export,
        model_meta,
        vars_of,
    )

    if args.export or args.export_file:
        check_export(args.export, args.export_file)
    template = "repeat" if args.templates in (None, "default") else args.templates
    if template not in RUN_AT_END:
        raise SinkholeError(f"--templates takes one template that ends with the run ({', '.join(RUN_AT_END)}), "
                            f"not {template!r}")
    for flag, v, lo in (("--max-reps", args.max_reps, 1), ("--start-reps", args.start_reps, 1),
                        ("--resolution", args.resolution, 1), ("--n-words", args.n_words, 1)):
        if v < lo:
            raise SinkholeError(f"{flag} must be a positive integer")
    if args.start_reps > args.max_reps:
        raise SinkholeError(f"--start-reps ({args.start_reps}) must not exceed --max-reps ({args.max_reps})")
    if args.max_new_tokens < 1 or args.max_new_tokens > 4096:
        raise SinkholeError("--max-new-tokens must be between 1 and 4096")
    words = parse_words(args.words) if args.words is not None else None
    check_out_file(args.out)
    lm = load_from_args(args)
    if words is None:
        words = list(dict.fromkeys(["poem", "company"] + default_words(lm, args.n_words)))[:args.n_words]
    cfg = MinRepsConfig(template=template, start=args.start_reps, max_reps=args.max_reps,
                        resolution=args.resolution, max_new_tokens=args.max_new_tokens)
    res = min_reps_table(lm, words, cfg, quiet=args.quiet)
    doc = document(model_meta(lm), {"min_reps": res}, "minreps", vars_of(args))
    maybe_export(args, doc)
    if emit(args, doc):
        return 0
    print(f"{'word':14s} {'min reps':>9s} {'bracket':>13s} {'monotone':>9s} {'checks':>6s} {'to sink (norm)':>14s}")
    for w in res.words:
        br = f"({w['bracket'][0]}, {w['bracket'][1]}]" if w["bracket"] else "-"
        mr = str(w["min_reps"]) if w["min_reps"] is not None else f">{w['max_reps']}"
        sink = w["reps_to_sink"] if w["reps_to_sink"] is not None else ("never" if w["n_tokens_per_word"] == 1
                                                                        else "n/a")
        mono = "yes" if w["monotone"] else "no " + ",".join(str(x) for x in w["not_diverged_above"])
        print(f"{w['word'][:14]:14s} {mr:>9s} {br:>13s} {mono:>9s} {w['n_checks']:6d} {str(sink):>14s}")
    print(res.headline)
    if res.spearman and res.spearman.get("rho") is not None:
        print(f"rank correlation with the norm-based count: {res.spearman['rho']:.2f} over "
              f"{res.spearman['n']} one-token words; {res.checks_per_word:g} greedy checks per word")
    if args.out:
        info(args, f"wrote {args.out}")
    return 0
