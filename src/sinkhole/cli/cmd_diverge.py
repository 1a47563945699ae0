"""``sinkhole diverge``: greedy generation after repeated-word prompts, judged two ways."""

from __future__ import annotations


def add_parser(sub) -> None:
    from . import add_common_args, add_export_args, add_model_args  # lazy: start-up time

    p = sub.add_parser("diverge", help="measure repeated-word divergence by greedy generation",
                       description="Greedily decode after prompts that repeat each word n times (templates: raw, "
                                   "repeat, garak_following, garak_word, garak_this, chat_user, chat_assistant) "
                                   "and judge each continuation with the run judge (diverged, tokens until "
                                   "divergence, fraction of non-word tokens) and a garak RepeatDiverges-style judge.")
    add_model_args(p)
    add_common_args(p)
    p.add_argument("--words", default=None, help="comma-separated words (default poem,company)")
    p.add_argument("--reps", default=None, help="comma-separated repetition counts (default 100,400)")
    p.add_argument("--templates", default="default",
                   help="comma-separated templates, 'all' or 'default' (raw, repeat, garak_this and, for chat "
                        "models, chat_user and chat_assistant)")
    p.add_argument("--garak", action="store_true",
                   help="garak's divergence.Repeat prompt set: words poem,company,book,a x reps 1,3,40 x its three "
                        "templates (overrides --words/--reps/--templates)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate per case (default 48)")
    p.add_argument("--batch-size", type=int, default=4, help="cases per generate() call (default 4)")
    p.add_argument("--exact", action="store_true",
                   help="no decoding loop: verify drafts of the run against the model (greedy_check). The same "
                        "greedy tokens and both judges, faster on cases that keep repeating; only templates that "
                        "end with the run (raw, repeat, chat_assistant)")
    p.add_argument("--engine", default="transformers", choices=["transformers", "llama.cpp"],
                   help="inference engine for the continuations: transformers (default) or llama.cpp (the GGUF "
                        "itself on llama.cpp's quantized kernels, through the optional llama-cpp-python; greedy, "
                        "same cases and judges)")
    p.add_argument("--patch", default=None,
                   help="run with a patch (a folder written by 'sinkhole patch --out', or a patch.json): attached "
                        "in transformers; with --engine llama.cpp its run gate runs in llama.cpp (a weight patch "
                        "goes in as its patched .gguf, passed as MODEL)")
    g = p.add_argument_group("sampling and memorisation")
    g.add_argument("--samples", type=int, default=0,
                   help="sample this many continuations per prompt (seeded by --seed) instead of greedy decoding; "
                        "the rate comes with a 95%% confidence interval")
    g.add_argument("--temperature", type=float, default=None, help="sampling temperature (required with --samples)")
    g.add_argument("--corpus", default=None,
                   help="a folder of .txt/.jsonl files (or one file): mark every span of the continuations that "
                        "occurs verbatim in it (>= --min-span bytes) and report the share of divergent tokens "
                        "inside, beside continuations of ordinary prompts (the index is built once and cached)")
    g.add_argument("--min-span", type=int, default=50, help="shortest verbatim span counted, in bytes (default 50)")
    p.add_argument("--explain", action="store_true",
                   help="say per case whether the attention sink did it: the circuit's readings over the run's last "
                        "32 tokens and, for every diverged case, a causal test (the run's state cut back to its "
                        "16-repetition state at the drift layer, decoded again); verdict sink, sink state not causal "
                        "or no sink. Greedy transformers decoding of the plain model only")
    add_export_args(p)
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..attack.diverge import DivergeConfig, diverge  # lazy: start-up time
    from ..attack.prompts import GARAK_REPS, GARAK_TEXT, GARAK_WORDS, parse_int_list, parse_words  # lazy: start-up time
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
    if args.garak:
        if args.exact:
            raise SinkholeError("--exact cannot run the --garak prompt set (its templates do not end with the run); "
                                "drop --exact or --garak")
        words, reps, templates = list(GARAK_WORDS), list(GARAK_REPS), list(GARAK_TEXT)
    else:
        words = parse_words(args.words if args.words is not None else "poem,company")
        reps = parse_int_list(args.reps if args.reps is not None else "100,400")
        templates = args.templates
    if args.max_new_tokens < 1 or args.max_new_tokens > 4096:
        raise SinkholeError("--max-new-tokens must be between 1 and 4096")
    _check_sampling(args)
    if args.engine == "llama.cpp" and (args.exact or args.samples):
        raise SinkholeError("--engine llama.cpp decodes greedily itself: drop --exact and --samples")
    if args.batch_size < 1:
        raise SinkholeError("--batch-size must be a positive integer")
    if args.explain and args.engine == "llama.cpp":
        raise SinkholeError("--explain reads and edits the model's hidden states, which llama.cpp does not expose: "
                            "drop --engine llama.cpp (the same GGUF runs in transformers by default)")
    if args.explain and (args.patch or args.samples):
        raise SinkholeError("--explain explains the plain model's greedy divergences: drop --patch and --samples")
    check_out_file(args.out)
    patch = None
    if args.patch:
        from ..patch.export import read_patch  # lazy: start-up time

        patch = read_patch(args.patch)
        if args.engine == "llama.cpp":
            from ..patch.core import llamacpp_gate  # lazy: start-up time

            llamacpp_gate(patch, what="--patch")  # refused before loading: pass a weight patch's GGUF as MODEL
    lm = load_from_args(args)
    hooks = None
    if patch is not None:
        from ..patch.core import apply_patch  # lazy: start-up time

        patch.validate(lm)
        hooks = (lambda: apply_patch(lm, patch, validate=False))  # noqa: E731
    if args.exact and templates in (None, "default", "all"):  # minus the templates the check cannot draft
        from ..attack.prompts import (  # lazy: start-up time
            RUN_AT_END,
            resolve_templates,
        )

        templates = [t for t in resolve_templates(lm, templates) if t in RUN_AT_END]
    if args.engine == "llama.cpp":
        from ..attack.diverge import run_llamacpp  # lazy: start-up time
        from ..attack.prompts import make_cases, resolve_templates  # lazy: start-up time

        res = run_llamacpp(lm, make_cases(lm, words, reps, templates), args.max_new_tokens, quiet=args.quiet,
                           gate=patch.gate if patch is not None else None)
        res.words, res.reps, res.templates = list(words), list(reps), resolve_templates(lm, templates)
        res.set_headline()
    else:
        cfg = DivergeConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            exact=True if args.exact else False, samples=args.samples, temperature=args.temperature,
                            seed=args.seed)
        circ = None
        if args.explain:
            from ..circuit import discover  # lazy: start-up time

            circ = discover(lm)
            info(args, f"explaining with the circuit: {circ.log_line()}; sink kind {circ.sink_kind}")
        res = diverge(lm, words, reps, templates, cfg, hooks=hooks, quiet=args.quiet, explain=args.explain, circ=circ)
    results = {"divergence": res}
    if args.corpus:
        from ..attack.memorization import memorization_check  # lazy: start-up time

        results["memorization"] = memorization_check(lm, res, args.corpus, min_bytes=args.min_span,
                                                     temperature=args.temperature, seed=args.seed, quiet=args.quiet)
    doc = document(model_meta(lm), results, "diverge", vars_of(args))
    maybe_export(args, doc)
    if emit(args, doc):
        return 0
    from ..attack.explain import VERDICTS  # lazy: start-up time

    ex = res.explanation is not None
    print(f"{'template':16s} {'word':12s} {'reps':>5s} {'diverged':>8s} {'garak':>6s} {'until':>5s} "
          f"{'non-word':>8s}  " + (f"{'ratio':>5s} {'verdict':22s} " if ex else "") + "continuation")
    for c in res.cases:
        text = c["text"].replace("\n", "\\n")
        why = ""
        if ex:
            e = c.get("explain") or {}
            r = e.get("ratio_drift")
            why = f"{'-' if r is None else format(r, '.2f'):>5s} {VERDICTS.get(e.get('verdict'), '-'):22s} "
        print(f"{c['template']:16s} {c['word'][:12]:12s} {c['reps']:5d} {str(c['diverged']):>8s} "
              f"{str(c['garak_diverged']):>6s} {c['tokens_until_divergence']:5d} {c['frac_not_word']:8.2f}  "
              f"{why}{text[:60]!r}")
    print(f"divergence rate: {res.rate:.2f} (run judge), {res.garak_rate:.2f} (garak-style judge), "
          f"{res.either_rate:.2f} (either); judges agree on {res.judges_agree:.0%} of {res.n_cases} cases"
          + (" (greedy tokens from the exact check)" if res.method.startswith("exact") else "")
          + (f"; {res.samples} samples per prompt at temperature {res.temperature:g}, run-judge rate 95% CI "
             f"{res.rate_ci[0]:.2f}-{res.rate_ci[1]:.2f}" if res.method == "sample" and res.rate_ci else ""))
    for t, v in res.by_template.items():
        print(f"  {t:16s} rate {v['rate']:.2f}  garak {v['garak_rate']:.2f}  (n={v['n']})")
    if ex:
        print(res.explanation["headline"])
        print("  (ratio: the norm over the run's last 32 tokens at the drift layer, as a share of the first token's)")
        for t, v in res.explanation["by_template"].items():
            print(f"  {t:16s} {v['sink']} of {v['diverged']} divergences caused by the sink "
                  f"({v['sink_state_not_causal']} sink state, not causal; {v['no_sink']} no sink)")
    if res.multi_token_words:
        info(args, f"note: {', '.join(res.multi_token_words)} tokenize to several tokens; the whole word "
                   "was repeated")
    if args.corpus:
        print(results["memorization"].headline)
    if args.out:
        info(args, f"wrote {args.out}")
    return 0


def _check_sampling(args) -> None:
    from ..errors import SinkholeError  # lazy: start-up time

    if args.samples < 0:
        raise SinkholeError("--samples must be a positive integer")
    if args.samples and args.temperature is None:
        raise SinkholeError("--samples needs --temperature T (e.g. 1.0)")
    if args.temperature is not None and not args.samples:
        raise SinkholeError("--temperature needs --samples N")
    if args.temperature is not None and not (0 < args.temperature <= 10):
        raise SinkholeError("--temperature must be in (0, 10]")
    if args.samples and args.exact:
        raise SinkholeError("--exact checks greedy decoding; drop it with --samples")
    if args.min_span < 32:
        raise SinkholeError("--min-span must be at least 32 bytes (the index's window)")
    if args.corpus:
        from ..attack.memorization import corpus_files  # lazy: start-up time

        corpus_files(args.corpus)
