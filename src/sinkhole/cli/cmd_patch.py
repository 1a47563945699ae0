"""``sinkhole patch``: find, verify and export a patch that stops repeated-token divergence."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    from ..patch.search import DEFAULT_FAMILIES, FAMILIES  # lazy: start-up time
    from . import add_common_args, add_model_args, add_role_args  # lazy: start-up time

    p = sub.add_parser(
        "patch", help="search, verify and export a patch that stops divergence",
        description="Try the paper's patch (sink neurons clamped at non-first positions), then, while divergence "
                    "remains, other candidates (neuron caps, MLP-output norm caps, targeted fine-tuning), measured on "
                    "search words/repetitions; verify the chosen patch on disjoint held-out words/repetitions and "
                    "held-out text; write DIR with the patched model (save_pretrained layout), patch.json and a "
                    "before/after summary. Reload with sinkhole.load_patched(DIR).")
    add_model_args(p)
    add_common_args(p)
    p.add_argument("--out", default=None, help="output folder for the patched model (with --stock: optional, "
                                                "a copy of the stock model's summary.json and SUMMARY.md)")
    p.add_argument("--stock", default=None, metavar="DIR",
                   help="instead of a patch, write the fix as a stock model file: a folder that "
                        "AutoModelForCausalLM.from_pretrained(DIR) loads and a GGUF in it that llama.cpp loads, both "
                        "with no sinkhole code at run time (Llama-architecture GGUF models; trained attention sinks)")
    p.add_argument("--stock-type", default="source", choices=["source", "Q8_0", "F16"],
                   help="the stock GGUF's tensor type: source (the source's own quantization, byte for byte, the "
                        "trained tensors in Q8_0; default), Q8_0 or F16 (every matrix)")
    p.add_argument("--words", default=None, help="search words (default: poem,company,book,music)")
    p.add_argument("--reps", default=None, help="search repetition counts (default: 100,300)")
    p.add_argument("--verify-words", default=None, help="held-out words (default: flower,table,ocean,silver,letter,forest)")
    p.add_argument("--verify-reps", default=None, help="held-out repetition counts (default: 150,250)")
    p.add_argument("--templates", default=None, help="prompt templates (default: repeat,chat_assistant)")
    p.add_argument("--families", default=None,
                   help=f"candidate families in order (default: {','.join(DEFAULT_FAMILIES)}; any of "
                        f"{', '.join(FAMILIES)}; finetune_mlp, the full-model objective, is slow on CPU)")
    p.add_argument("--finetune-layers", default=None, help="layers whose MLPs the fine-tuning patch trains")
    p.add_argument("--steps", type=int, default=None,
                   help="fine-tuning steps (default 400; with --stock, the stock model's training steps, "
                        "default 250)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generated tokens per case (default 32)")
    p.add_argument("--ppl-budget", type=float, default=1.0, help="largest allowed perplexity increase in %% (default 1)")
    p.add_argument("--neurons", type=int, default=4, help="sink neurons to patch (default 4)")
    p.add_argument("--patch-file", default=None,
                   help="skip the search: verify and export this patch.json instead")
    p.add_argument("--quick", action="store_true", help="fewer cases and steps (a first look, tests)")
    p.add_argument("--no-broad", action="store_true",
                   help="skip the broad verification (every attack family and text setting, beside the paper's "
                        "patch and the input-side collapse); the narrow held-out set is still measured")
    p.add_argument("--baselines", default="collapse",
                   help="baselines measured beside the patch in the broad verification: paper (the paper's neuron "
                        "patch; as slow as the unpatched model), collapse (the input-side collapse of long runs), "
                        "both comma-separated, or none (default: collapse)")
    p.add_argument("--compare", action="append", default=[], metavar="PATCH",
                   help="a saved patch (patch.json or a folder from 'sinkhole patch') measured beside the chosen one "
                        "in the broad verification; repeatable")
    p.add_argument("--gguf", default=None,
                   help="also write the patched model as a GGUF for llama.cpp (a weight patch of a GGUF model): "
                        "the source's metadata and untouched tensors copied bit for bit, the patched ones in "
                        "--gguf-type")
    p.add_argument("--gguf-type", default="F32", choices=["F32", "F16", "Q8_0", "source"],
                   help="type of the patched tensors in the GGUF (default F32; 'source' re-quantizes to the "
                        "source's type, which can lose a fine-tuning patch's small change)")
    add_role_args(p, ["massive_layer", "marking_layers"])
    p.set_defaults(func=run)


def build_config(args):
    from ..attack.prompts import parse_int_list, parse_words  # lazy: start-up time
    from ..errors import SinkholeError  # lazy: start-up time
    from ..patch.search import SearchConfig, check_families  # lazy: start-up time

    cfg = SearchConfig()
    if args.words:
        cfg.search_words = tuple(parse_words(args.words))
    if args.reps:
        cfg.search_reps = tuple(parse_int_list(args.reps, "--reps"))
    if args.verify_words:
        cfg.verify_words = tuple(parse_words(args.verify_words, "--verify-words"))
    if args.verify_reps:
        cfg.verify_reps = tuple(parse_int_list(args.verify_reps, "--verify-reps"))
    if args.templates:
        cfg.templates = tuple(parse_words(args.templates, "--templates"))
    if args.families:
        cfg.families = tuple(parse_words(args.families, "--families"))
    if getattr(args, "gguf", None) is not None and not args.patch_file:
        from ..patch.search import WEIGHT_FAMILIES  # lazy: start-up time

        if not args.families:
            cfg.families = tuple(f for f in cfg.families if f in WEIGHT_FAMILIES)
        hooks_only = [f for f in cfg.families if f not in WEIGHT_FAMILIES]
        if hooks_only:
            raise SinkholeError(f"--gguf writes a weight patch, but {', '.join(hooks_only)} act through hooks, which "
                                f"a GGUF cannot hold; use --families {','.join(WEIGHT_FAMILIES[:1])}")
    if args.finetune_layers:
        cfg.finetune_layers = tuple(parse_int_list(args.finetune_layers, "--finetune-layers", minimum=0))
    for name, v, lo in (("--steps", args.steps, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                        ("--neurons", args.neurons, 1)):
        if v < lo:
            raise SinkholeError(f"{name} must be at least {lo}")
    if args.ppl_budget < 0:
        raise SinkholeError("--ppl-budget must be >= 0")
    cfg.finetune_steps, cfg.max_new_tokens, cfg.n_neurons = args.steps, args.max_new_tokens, args.neurons
    cfg.ppl_budget_pct = args.ppl_budget
    cfg.broad = not args.no_broad
    from ..patch.search import BASELINES  # lazy: start-up time

    bl = [] if args.baselines.strip() == "none" else parse_words(args.baselines, "--baselines")
    bad = [b for b in bl if b not in BASELINES]
    if bad:
        raise SinkholeError(f"unknown baseline {bad[0]!r}; use {', '.join(BASELINES)} or none")
    cfg.baselines = tuple(bl)
    if args.quick:
        cfg = cfg.as_quick()
    cfg.check_disjoint()
    check_families(cfg.families)
    return cfg


def run(args) -> int:
    from pathlib import Path

    from ..errors import SinkholeError  # lazy: start-up time
    from ..patch.export import read_patch  # lazy: start-up time
    from ..results import prepare_out_dir  # lazy: start-up time

    if args.stock is not None:
        return _run_stock(args)
    if args.out is None:
        raise SinkholeError("give --out DIR (a patch for sinkhole's runtime) or --stock DIR (a stock model file)")
    if args.steps is None:
        args.steps = 400

    cfg = build_config(args)
    patch_file = read_patch(args.patch_file) if args.patch_file else None
    compare = {}
    for c in args.compare:
        name = Path(c).stem if Path(c).suffix == ".json" else Path(c).name
        compare[name if name not in compare else f"{name}_{len(compare)}"] = read_patch(c)
    created = not Path(args.out).exists()
    out = prepare_out_dir(args.out)  # an unwritable --out fails before any work
    try:
        return _run(args, cfg, patch_file, out, compare)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refused or interrupted run leaves no empty folder behind
        raise


def _run(args, cfg, patch_file, out, compare) -> int:
    from ..errors import SinkholeError  # lazy: start-up time
    from ..patch import export_patched  # lazy: start-up time
    from ..patch.search import search_patch, verify_patch  # lazy: start-up time
    from ..patch.tables import summary_markdown  # lazy: start-up time
    from ..results import dumps  # lazy: start-up time
    from . import circuit_from_args, info, load_from_args, model_meta  # lazy: start-up time

    if args.gguf is not None and not str(args.gguf).lower().endswith(".gguf"):
        raise SinkholeError("--gguf must be a path ending in .gguf")
    lm = load_from_args(args)
    if args.gguf is not None:
        from ..decoding.engines import gguf_of  # lazy: start-up time

        gguf_of(lm)  # a model that is not a GGUF: refused before the search
    log = (lambda m: info(args, m))
    import time

    t0 = time.perf_counter()
    timing = {}
    tried = []
    search = None
    circ = None
    for p in compare.values():
        p.validate(lm)
    if patch_file is not None:
        patch = patch_file
        patch.validate(lm)
    else:
        circ = circuit_from_args(args, lm, ["massive_layer", "marking_layers"])
        res = search_patch(lm, cfg, circuit=circ, log=log)
        search, tried, patch = res.to_dict(), res.tried, res.patch
        if patch is None:
            if res.baseline_search.get("either_rate", 0) == 0:
                raise SinkholeError("the model did not diverge on the search cases: nothing to patch (try more "
                                    "--reps or other --words)", exit_code=1)
            errors = [t for t in tried if "error" in t]
            if errors and len(errors) == len([t for t in tried if "skipped" not in t]):
                raise SinkholeError(f"every candidate failed; {errors[0]['family']}: {errors[0]['error']}",
                                    exit_code=1)
            raise SinkholeError(f"no candidate stayed within the perplexity budget of {cfg.ppl_budget_pct}%; "
                                "raise --ppl-budget or try other --families", exit_code=1)
    timing["search_s"] = round(time.perf_counter() - t0, 1)
    t1 = time.perf_counter()
    verification = verify_patch(lm, patch, cfg, log=log, circuit=circ, compare=compare, quiet=args.quiet or None)
    timing["verification_s"] = round(time.perf_counter() - t1, 1)
    if verification.get("broad"):
        timing["broad_verification_s"] = verification["broad"]["seconds"]
    summary = {"model": model_meta(lm).to_dict(), "patch": patch.to_dict(), "search": search,
               "verification": verification}
    md = summary_markdown(verification, tried, search.get("chosen") if search else None)
    if args.gguf is not None:  # first, so that summary.json records it
        from ..patch.gguf_export import patch_to_gguf  # lazy: start-up time

        rep = patch_to_gguf(lm, patch, args.gguf, args.gguf_type)
        summary["gguf"] = {"path": str(args.gguf), "type": args.gguf_type, **rep}
        info(args, f"wrote {args.gguf}: {len(rep['patched'])} patched tensors ({args.gguf_type}), {rep['copied']} "
                   f"copied bit for bit; {rep['bytes_out'] / 2**20:.1f} MiB against {rep['bytes_source'] / 2**20:.1f} "
                   "MiB for the source")
    t2 = time.perf_counter()
    summary["timing"] = dict(timing)  # summary.json and --json print the same document
    export_patched(lm, patch, out, summary=summary, summary_md=md)
    timing["export_s"] = round(time.perf_counter() - t2, 1)
    timing["total_s"] = round(time.perf_counter() - t0, 1)
    info(args, "time: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in timing.items()))
    if args.json:
        sys.stdout.write(dumps(summary))
    else:
        if not args.quiet:  # with --quiet the table is in DIR/SUMMARY.md only
            print(md)
        info(args, f"wrote {out} (patched model, patch.json, summary.json, SUMMARY.md); "
                   f"reload with sinkhole.load_patched('{out}')")
    return 0


def _run_stock(args) -> int:
    """``--stock DIR``: train the stock model, verify it briefly, write the folder (sinkhole.patch.stock_export)."""
    import time
    from pathlib import Path

    from ..errors import SinkholeError  # lazy: start-up time
    from ..patch.stock import StockConfig, check_stock, stock_model, train_stock  # lazy: start-up time
    from ..patch.stock_export import stock_summary_md, write_stock_folder  # lazy: start-up time
    from ..patch.verify import QUICK, stock_targets, verify_broad  # lazy: start-up time
    from ..results import dumps, prepare_out_dir, write_atomic  # lazy: start-up time
    from . import info, load_from_args, model_meta  # lazy: start-up time

    for flag in ("patch_file", "gguf", "families", "finetune_layers"):
        if getattr(args, flag, None):
            raise SinkholeError(f"--{flag.replace('_', '-')} belongs to the patch search; --stock trains its own fix")
    stock = Path(args.stock)
    if stock.exists() and (not stock.is_dir() or any(stock.iterdir())):
        raise SinkholeError(f"--stock {stock} exists and is not an empty folder; choose a new folder")
    if args.steps is not None and args.steps < 1:
        raise SinkholeError("--steps must be at least 1")
    out = prepare_out_dir(args.out) if args.out else None
    lm = load_from_args(args)
    check_stock(lm)  # a model the route cannot rewrite is declined before any work
    log = (lambda m: info(args, m))
    cfg = StockConfig()
    if args.steps is not None:
        cfg.steps = int(args.steps)
    if args.quick:
        cfg.steps, cfg.reps = min(cfg.steps, 20), (64,)
    t0 = time.perf_counter()
    trained = train_stock(lm, cfg, log=log)
    model = stock_model(lm, trained)
    summary = {"model": model_meta(lm).to_dict(), "route": "trained attention sinks (granite_swa)",
               "training": trained["meta"]}
    if not args.no_broad:
        t1 = time.perf_counter()
        q = QUICK
        ver = verify_broad(lm, None, model=model, families=q["families"], reps=q["reps"], sources=q["sources"],
                           windows=q["windows"], total=q["total"], log=log, quiet=args.quiet or None)
        ver.pop("records", None)
        summary["verification"] = ver
        summary["targets"] = t = stock_targets(ver)
        log(f"quick verification: {time.perf_counter() - t1:.0f} s")
        if not t["all"]:
            worst = t.get("worst_top1")
            info(args, "the stock model misses its targets (families over target: "
                       f"{', '.join(t['families_failed']) or 'none'}"
                       + (f"; worst text top-1 {worst['top1_agreement']:.1%}" if worst else "")
                       + "); the run gate (--out DIR) is the fix that meets them")
    summary = write_stock_folder(lm, model, trained, stock, args.stock_type, log=log, summary=summary,
                                 summary_md=stock_summary_md, started=t0)
    md = stock_summary_md(summary)
    if out is not None:
        write_atomic(out / "summary.json", dumps(summary))
        write_atomic(out / "SUMMARY.md", md)
    if args.json:
        sys.stdout.write(dumps(summary))
    else:
        if not args.quiet:
            print(md)
        info(args, f"wrote {stock} ({', '.join(summary['files'])}) in {summary['seconds']:.0f} s")
    bad = [k for k, v in summary["engines"].items() if not v["verified"]]
    if bad:
        info(args, f"not verified here: {', '.join(bad)} (see SUMMARY.md)")
    return 0
