"""``sinkhole experimental``: the research routes the docs call failing or short of target, off every default
path, one command each: ``search`` (the patch search over the research candidate families: the run gate's
state check, caps, fine-tunes and their GGUF writer), ``stock`` (the fix as a stock model file with trained
attention sinks) and ``predict`` (the generation-free divergence predictor). docs/experimental.md gives
their figures."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    from . import add_common_args, add_model_args, add_role_args  # lazy: start-up time
    from .cmd_patch import MAX_NEW_TOKENS, add_patch_args  # lazy: start-up time

    p = sub.add_parser("experimental", help="research routes that do not meet the fix's targets (see "
                                            "docs/experimental.md)",
                       description="Research routes the docs call failing or short of target, kept to reproduce "
                                   "their figures and to try them on another model. The fix is 'sinkhole patch'.")
    ex = p.add_subparsers(dest="experiment", metavar="{search,stock,predict}", required=True)

    s = ex.add_parser("search", help="the patch search over the research candidate families",
                      description="The patch search of 'sinkhole patch' over any candidate families, the research "
                                  "ones included: state_gate (the run gate with the state check), detector_cap, "
                                  "norm_cap, finetune_neurons, finetune_local, finetune_mlp (and run_gate, "
                                  "paper_clamp, paper_zero); verified and exported as 'sinkhole patch' does.")
    add_model_args(s)
    add_common_args(s)
    add_patch_args(s)
    s.add_argument("--families", default=None,
                   help="candidate families in order (default: state_gate,detector_cap,norm_cap,finetune_neurons,"
                        "finetune_local; finetune_mlp, the full-model objective, is slow on CPU)")
    s.add_argument("--templates", default=None, help="prompt templates (default: repeat,chat_assistant)")
    s.add_argument("--finetune-layers", default=None, help="layers whose MLPs the fine-tuning families train")
    s.add_argument("--steps", type=int, default=400, help="fine-tuning steps (default 400)")
    s.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                   help=f"generated tokens per case (default {MAX_NEW_TOKENS})")
    s.add_argument("--ppl-budget", type=float, default=1.0, help="largest allowed perplexity increase in %% (default 1)")
    s.add_argument("--neurons", type=int, default=4, help="sink neurons of the paper's patch (default 4)")
    s.add_argument("--gguf", default=None,
                   help="also write the patched model as a GGUF for llama.cpp (a weight patch of a GGUF model: "
                        "the fine-tuning families): the source's metadata and untouched tensors copied bit for bit")
    s.add_argument("--gguf-type", default="F32", choices=["F32", "F16", "Q8_0", "source"],
                   help="type of the patched tensors in the GGUF (default F32; 'source' re-quantizes to the "
                        "source's type, which can lose a fine-tuning patch's small change)")
    add_role_args(s, ["massive_layer", "marking_layers"])
    s.set_defaults(func=run_search)

    t = ex.add_parser("stock", help="the fix as a stock model file (trained attention sinks)",
                      description="Train layer 0's attention sinks and the MLPs that read the first token, and write "
                                  "DIR: a folder that AutoModelForCausalLM.from_pretrained(DIR) loads (transformers' "
                                  "granite_swa) with a GGUF in it for llama.cpp 0.3.36+, no sinkhole code at run "
                                  "time; each engine is checked on the written folder. Llama-architecture GGUF "
                                  "models only. It does not meet the fix's targets (docs/experimental.md).")
    add_model_args(t)
    add_common_args(t)
    t.add_argument("dir", help="new (or empty) output folder")
    t.add_argument("--type", default="source", choices=["source", "Q8_0", "F16"],
                   help="the GGUF's tensor type: source (the source's own quantization, byte for byte, the trained "
                        "tensors in Q8_0; default), Q8_0 or F16 (every matrix)")
    t.add_argument("--steps", type=int, default=None, help="training steps (default 250)")
    t.add_argument("--quick", action="store_true", help="a few steps and one repetition count (a first look, tests)")
    t.add_argument("--no-broad", action="store_true", help="skip the quick broad verification")
    t.set_defaults(func=run_stock)

    q = ex.add_parser("predict", help="the generation-free divergence predictor, fitted and scored on held-out words",
                      description="Label each case by greedy generation (the run judge), compute the predictor's "
                                  "features from one forward pass over the prompt stopped after the drift layer, fit "
                                  "the one-feature threshold rule on --words and score it on --held-out-words.")
    add_model_args(q)
    add_common_args(q)
    q.add_argument("--words", default="poem,company,book,house,music", help="training words")
    q.add_argument("--held-out-words", default="water,king,love,blue,time", help="held-out words")
    q.add_argument("--reps", default="50,200,500", help="repetition counts")
    q.add_argument("--templates", default="repeat,garak_this", help="prompt templates")
    q.add_argument("--max-new-tokens", type=int, default=20, help="generated tokens per case (default 20)")
    q.add_argument("--out", default=None, help="write the results document (JSON) to this file")
    add_role_args(q, ["drift_layer"])
    q.set_defaults(func=run_predict)


def run_search(args) -> int:
    from ..attack.prompts import parse_int_list, parse_words  # lazy: start-up time
    from ..errors import SinkholeError  # lazy: start-up time
    from ..experimental.search import (  # lazy: start-up time
        ALL_FAMILIES,
        WEIGHT_FAMILIES,
        ExperimentalConfig,
        search_experimental,
    )
    from ..patch.search import check_families  # lazy: start-up time
    from .cmd_patch import build_config, run_search as run_patch_search  # lazy: start-up time

    if args.out is None:
        raise SinkholeError("give --out DIR, the folder to write the patch to")
    for name, v, lo in (("--steps", args.steps, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                        ("--neurons", args.neurons, 1)):
        if v < lo:
            raise SinkholeError(f"{name} must be at least {lo}")
    if args.ppl_budget < 0:
        raise SinkholeError("--ppl-budget must be >= 0")
    cfg = ExperimentalConfig(finetune_steps=args.steps, max_new_tokens=args.max_new_tokens, n_neurons=args.neurons,
                             ppl_budget_pct=args.ppl_budget)
    if args.families:
        cfg.families = tuple(parse_words(args.families, "--families"))
    if args.templates:
        cfg.templates = tuple(parse_words(args.templates, "--templates"))
    if args.finetune_layers:
        cfg.finetune_layers = tuple(parse_int_list(args.finetune_layers, "--finetune-layers", minimum=0))
    if args.gguf is not None and not args.patch_file:
        if not args.families:
            cfg.families = tuple(f for f in cfg.families if f in WEIGHT_FAMILIES)
        hooks_only = [f for f in cfg.families if f not in WEIGHT_FAMILIES]
        if hooks_only:
            raise SinkholeError(f"--gguf writes a weight patch, but {', '.join(hooks_only)} act through hooks, which "
                                f"a GGUF cannot hold; use --families {','.join(WEIGHT_FAMILIES[:1])}")
    check_families(cfg.families, ALL_FAMILIES)
    cfg = build_config(args, cfg)
    return run_patch_search(args, cfg, search_experimental, roles=("massive_layer", "marking_layers"))


def run_predict(args) -> int:
    from ..attack.prompts import parse_int_list, parse_words  # lazy: start-up time
    from ..errors import SinkholeError  # lazy: start-up time
    from ..experimental.predictor import check_split, fit_and_evaluate  # lazy: start-up time
    from ..results import dumps, write_atomic  # lazy: start-up time
    from . import check_out_file, circuit_from_args, info, load_from_args, model_meta  # lazy: start-up time

    words = parse_words(args.words, "--words")
    held = parse_words(args.held_out_words, "--held-out-words")
    check_split(words, held)
    reps = parse_int_list(args.reps, "--reps")
    templates = parse_words(args.templates, "--templates")
    if args.max_new_tokens < 1:
        raise SinkholeError("--max-new-tokens must be at least 1")
    out = check_out_file(args.out)
    lm = load_from_args(args)
    circ = circuit_from_args(args, lm, ["drift_layer"])
    res = fit_and_evaluate(lm, words, held, reps, templates, max_new_tokens=args.max_new_tokens,
                           drift_layer=circ.drift_layer, quiet=args.quiet or None)
    doc = {"command": "experimental predict", "model": model_meta(lm).to_dict(), "drift_layer": circ.drift_layer,
           **res}
    if out is not None:
        write_atomic(out, dumps(doc))
    if args.json:
        sys.stdout.write(dumps(doc))
    else:
        p, h = res["predictor"], res["held_out"]
        auc = "n/a (one class only)" if h["auc"] is None else f"{h['auc']:.3f}"
        print(f"predictor: {p['feature']} {'>' if p['sign'] > 0 else '<'} {p['threshold']:.4g} (train balanced "
              f"accuracy {p['train_balanced_accuracy']}, {p['train_n']} cases)")
        print(f"held out: accuracy {h['accuracy']}, AUC {auc}, {h['positives']} of {h['n']} cases diverged, "
              f"{h['predicted_positive']} predicted")
        if out is not None:
            info(args, f"wrote {out}")
    return 0


def run_stock(args) -> int:
    """Train the stock model, verify it briefly, write the folder (sinkhole.experimental.stock_export)."""
    import time
    from pathlib import Path

    from ..errors import SinkholeError  # lazy: start-up time
    from ..experimental.stock import StockConfig, check_stock, stock_model, train_stock  # lazy: start-up time
    from ..experimental.stock_export import stock_summary_md, write_stock_folder  # lazy: start-up time
    from ..patch.verify import QUICK, Fix, stock_targets, verify_broad  # lazy: start-up time
    from ..results import dumps  # lazy: start-up time
    from . import info, load_from_args, model_meta  # lazy: start-up time

    stock = Path(args.dir)
    if stock.exists() and (not stock.is_dir() or any(stock.iterdir())):
        raise SinkholeError(f"{stock} exists and is not an empty folder; choose a new folder")
    if args.steps is not None and args.steps < 1:
        raise SinkholeError("--steps must be at least 1")
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
        ver = verify_broad(lm, Fix(model=model), families=q["families"], reps=q["reps"], sources=q["sources"],
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
                       + "); the run gate ('sinkhole patch --out DIR') is the fix that meets them")
    summary = write_stock_folder(lm, model, trained, stock, args.type, log=log, summary=summary,
                                 summary_md=stock_summary_md, started=t0)
    md = stock_summary_md(summary)
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
