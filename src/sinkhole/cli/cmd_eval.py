"""``sinkhole eval``: before/after comparison of a patch (held-out cases and text, harness tasks)."""

from __future__ import annotations


def add_parser(sub) -> None:
    from . import add_common_args, add_model_args  # lazy: start-up time

    p = sub.add_parser(
        "eval", help="compare a model with and without a patch",
        description="Measure a patch against the unpatched MODEL: divergence on held-out repeated-word cases (both "
                    "judges), perplexity, top-1 agreement and mean KL on held-out text, attention on position 0 under "
                    "long repetitions; with --tasks, the same comparison on lm-evaluation-harness tasks (needs "
                    "'pip install lm-eval'; offline, only cached datasets or local task YAML files can run).")
    add_model_args(p)
    add_common_args(p)
    p.add_argument("--patch", default=None, help="patch.json, or a folder written by 'sinkhole patch --out'")
    p.add_argument("--engine", default="transformers", choices=["transformers", "llama.cpp"],
                   help="llama.cpp: the broad verification in llama.cpp on the model's GGUF (llama.cpp's own "
                        "tokens and logits for every method and for the reference); the patch runs as its run gate "
                        "there, or give a weight patch's patched GGUF with --gguf")
    p.add_argument("--gguf", default=None, help="with --engine llama.cpp: the patched GGUF to verify (written by "
                                                "'sinkhole experimental search --gguf')")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-eval task names or local task YAML files/folders; 'local' writes and "
                        "runs sinkhole's offline cloze task")
    p.add_argument("--limit", type=int, default=None, help="at most this many documents per task")
    p.add_argument("--verify-words", default=None, help="held-out words (default: flower,table,ocean,silver,letter,forest)")
    p.add_argument("--verify-reps", default=None, help="held-out repetition counts (default: 150,250)")
    p.add_argument("--templates", default=None, help="prompt templates (default: repeat,chat_assistant)")
    p.add_argument("--heldout-text", default="twelfth_night",
                   help="held-out text: a shipped name (twelfth_night) or a .txt file (default twelfth_night)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generated tokens per case (default 32)")
    p.add_argument("--no-divergence", action="store_true", help="skip the generation-based divergence check")
    p.add_argument("--broad", action="store_true",
                   help="also the broad held-out verification (every attack family and text setting, beside the "
                        "input-side collapse; about 6 minutes for SmolLM2 on 2 CPU cores)")
    p.add_argument("--out", default=None, help="also write the comparison to this JSON file")
    p.set_defaults(func=run)


def run(args) -> int:
    import tempfile
    from pathlib import Path

    from ..attack.prompts import parse_int_list, parse_words  # lazy: start-up time
    from ..errors import SinkholeError  # lazy: start-up time
    from ..patch.export import read_patch  # lazy: start-up time
    from ..patch.search import SearchConfig, verify_patch  # lazy: start-up time
    from ..patch.tables import summary_markdown  # lazy: start-up time
    from . import check_out_file, emit, info, load_from_args  # lazy: start-up time

    if args.limit is not None and args.limit < 1:
        raise SinkholeError("--limit must be a positive integer")
    if args.max_new_tokens < 1:
        raise SinkholeError("--max-new-tokens must be at least 1")
    check_out_file(args.out)
    if args.engine == "llama.cpp":
        return _run_llamacpp(args)
    if args.gguf:
        raise SinkholeError("--gguf is verified in llama.cpp: add --engine llama.cpp")
    if not args.patch:
        raise SinkholeError("eval needs --patch (patch.json or a folder written by 'sinkhole patch --out')")
    patch = read_patch(args.patch)
    cfg = SearchConfig(max_new_tokens=args.max_new_tokens, broad=bool(getattr(args, "broad", False)),
                       broad_seed=args.seed)
    if args.verify_words:
        cfg.verify_words = tuple(parse_words(args.verify_words, "--verify-words"))
    if args.verify_reps:
        cfg.verify_reps = tuple(parse_int_list(args.verify_reps, "--verify-reps"))
    if args.templates:
        cfg.templates = tuple(parse_words(args.templates, "--templates"))
    cfg.search_words, cfg.search_reps = (), ()  # eval has no search set
    lm = load_from_args(args)
    patch.validate(lm)
    result: dict = {"model": lm.name, "patch": patch.describe()}
    log = (lambda m: info(args, m))
    if not args.no_divergence:
        result["verification"] = verify_patch(lm, patch, cfg, heldout_text=args.heldout_text, log=log)
    else:
        from ..data import heldout_texts  # lazy: start-up time
        from ..evaluate.metrics import text_metrics  # lazy: start-up time

        result["text"] = text_metrics(lm, patch, heldout_texts(args.heldout_text, n=24, n_words=64)).to_dict()
    if args.tasks:
        from ..integrations.lm_eval import compare_tasks, write_local_task  # lazy: start-up time

        tasks = args.tasks
        if "local" in [t.strip() for t in tasks.split(",")]:
            tmp = write_local_task(Path(tempfile.mkdtemp(prefix="sinkhole-task-")))
            tasks = ",".join(str(tmp) if t.strip() == "local" else t for t in tasks.split(","))
        result["tasks"] = compare_tasks(lm, patch, tasks, limit=args.limit)
    if emit(args, result):
        return 0
    if "verification" in result:  # the comparison is the command's output: stdout, also with --quiet
        print(summary_markdown(result["verification"]))
    elif "text" in result:
        t = result["text"]
        print(f"held-out text: ppl {t['ppl_before']:.3f} -> {t['ppl_after']:.3f} ({t['ppl_change_pct']:+.2f}%), "
                   f"top-1 {t['top1_agreement']:.2%}, KL {t['mean_kl_nats']:.5f} nats/token")
    for task, metrics in result.get("tasks", {}).items():
        for m, v in metrics.items():
            print(f"{task} {m}: {v['before']:.4f} -> {v['after']:.4f} ({v['change']:+.4f})")
    return 0


def _run_llamacpp(args) -> int:
    """``eval --engine llama.cpp``: the broad verification with every method in llama.cpp."""
    from ..errors import SinkholeError  # lazy: start-up time
    from ..patch.export import read_patch  # lazy: start-up time
    from ..patch.tables import broad_markdown  # lazy: start-up time
    from ..patch.verify import Fix, verify_broad  # lazy: start-up time
    from . import emit, info, load_from_args  # lazy: start-up time

    if args.tasks or args.verify_words or args.verify_reps or args.templates or args.no_divergence:
        raise SinkholeError("--engine llama.cpp runs the broad verification only: drop --tasks, --verify-words, "
                            "--verify-reps, --templates and --no-divergence")
    if not args.patch and not args.gguf:
        raise SinkholeError("--engine llama.cpp needs --patch (a run-gate patch) or --gguf (a patched GGUF)")
    patch = read_patch(args.patch) if args.patch else None
    lm = load_from_args(args)
    if patch is not None:
        patch.validate(lm)
    res = verify_broad(lm, Fix(patch, engine="llama.cpp", gguf=args.gguf), baselines={"input_collapse": "collapse"},
                       seed=args.seed, log=lambda m: info(args, m), quiet=args.quiet)
    res.pop("seconds", None)
    result = {"model": lm.name, "engine": "llama.cpp", "patch": patch.describe() if patch else None,
              "gguf": args.gguf, "broad": res}
    if emit(args, result):
        return 0
    print("\n".join(broad_markdown(res)))
    return 0
