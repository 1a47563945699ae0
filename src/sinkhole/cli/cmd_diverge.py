"""``sinkhole diverge``: greedy generation after repeated-word prompts, judged two ways."""

from __future__ import annotations



def add_parser(sub) -> None:
    from . import add_common_args, add_model_args

    p = sub.add_parser("diverge", help="measure repeated-word divergence by greedy generation",
                       description="Greedily decode after prompts that repeat each word n times (templates: raw, "
                                   "repeat, garak_following, garak_word, garak_this, chat_user, chat_assistant) "
                                   "and judge each continuation with the run judge (diverged, tokens until "
                                   "divergence, fraction of non-word tokens) and a garak RepeatDiverges-style judge.")
    add_model_args(p)
    add_common_args(p)
    p.add_argument("--words", default="poem,company", help="comma-separated words (default poem,company)")
    p.add_argument("--reps", default="100,400", help="comma-separated repetition counts (default 100,400)")
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
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..attack.diverge import diverge
    from ..attack.prompts import GARAK_REPS, GARAK_TEXT, GARAK_WORDS, parse_int_list, parse_words
    from ..errors import SinkholeError
    from ..scan import document
    from . import check_out_file, emit, info, load_from_args, model_meta, vars_of

    if args.garak:
        if args.exact:
            raise SinkholeError("--exact cannot run the --garak prompt set (its templates do not end with the run); "
                                "drop --exact or --garak")
        words, reps, templates = list(GARAK_WORDS), list(GARAK_REPS), list(GARAK_TEXT)
    else:
        words, reps, templates = parse_words(args.words), parse_int_list(args.reps), args.templates
    if args.max_new_tokens < 1 or args.max_new_tokens > 4096:
        raise SinkholeError("--max-new-tokens must be between 1 and 4096")
    if args.batch_size < 1:
        raise SinkholeError("--batch-size must be a positive integer")
    check_out_file(args.out)
    lm = load_from_args(args)
    if args.exact and templates in (None, "default", "all"):  # minus the templates the check cannot draft
        from ..attack.predictor import RUN_AT_END
        from ..attack.prompts import resolve_templates

        templates = [t for t in resolve_templates(lm, templates) if t in RUN_AT_END]
    res = diverge(lm, words, reps, templates, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                  exact=True if args.exact else False, quiet=args.quiet)
    if emit(args, document(model_meta(lm), {"divergence": res}, "diverge", vars_of(args))):
        return 0
    print(f"{'template':16s} {'word':12s} {'reps':>5s} {'diverged':>8s} {'garak':>6s} {'until':>5s} "
          f"{'non-word':>8s}  continuation")
    for c in res.cases:
        text = c["text"].replace("\n", "\\n")
        print(f"{c['template']:16s} {c['word'][:12]:12s} {c['reps']:5d} {str(c['diverged']):>8s} "
              f"{str(c['garak_diverged']):>6s} {c['tokens_until_divergence']:5d} {c['frac_not_word']:8.2f}  "
              f"{text[:60]!r}")
    print(f"divergence rate: {res.rate:.2f} (run judge), {res.garak_rate:.2f} (garak-style judge), "
          f"{res.either_rate:.2f} (either); judges agree on {res.judges_agree:.0%} of {res.n_cases} cases"
          + (" (greedy tokens from the exact check)" if res.method != "generate" else ""))
    for t, v in res.by_template.items():
        print(f"  {t:16s} rate {v['rate']:.2f}  garak {v['garak_rate']:.2f}  (n={v['n']})")
    if res.multi_token_words:
        info(args, f"note: {', '.join(res.multi_token_words)} tokenize to several tokens; the whole word "
                   "was repeated")
    if args.out:
        info(args, f"wrote {args.out}")
    return 0
