"""``sinkhole patch``: build, verify and export the run gate (or, with ``--method paper``, the paper's patch)."""

from __future__ import annotations

import sys

# the patch command's generated tokens per case (the library's SearchConfig keeps 40 for the scan step)
MAX_NEW_TOKENS = 32


def add_parser(sub) -> None:
    from . import add_common_args, add_model_args, add_role_args  # lazy: start-up time

    p = sub.add_parser(
        "patch", help="build, verify and export the run gate, the fix that stops repeated-token divergence",
        description="Build the run gate (tokens deep inside a long run of one token or a short unit hidden from "
                    "attention, positions renumbered; ordinary text bit-identical; no weight changes), measure it on "
                    "search words, verify it on held-out words and the broad held-out set (every attack family and "
                    "text setting; --baselines adds the paper's patch or the input-side collapse beside it), and "
                    "write DIR: patch.json, the model in "
                    "save_pretrained layout, summary.json and SUMMARY.md. Reload with sinkhole.load_patched(DIR); "
                    "run it in llama.cpp with 'sinkhole diverge MODEL.gguf --engine llama.cpp --patch DIR'. "
                    "--method paper builds the paper's neuron patch instead. Research routes: 'sinkhole "
                    "experimental --help'.")
    add_model_args(p)
    add_common_args(p)
    add_patch_args(p)
    p.add_argument("--method", default="gate", choices=["gate", "paper"],
                   help="gate: the run gate (default); paper: the paper's patch, the massive layer's sink neurons "
                        "clamped (then zeroed) at non-first positions, for a model where the paper's mechanism holds")
    add_role_args(p, ["massive_layer"])
    p.set_defaults(func=run)


def add_patch_args(p) -> None:
    """The options ``sinkhole patch`` shares with ``sinkhole experimental search``."""
    p.add_argument("--out", default=None, help="output folder (patch.json, the patched model, summary.json, "
                                                "SUMMARY.md)")
    p.add_argument("--patch-file", default=None, help="skip the search: verify and export this patch.json instead")
    p.add_argument("--words", default=None, help="search words (default: poem,company,book,music)")
    p.add_argument("--reps", default=None, help="search repetition counts (default: 100,300)")
    p.add_argument("--verify-words", default=None, help="held-out words (default: flower,table,ocean,silver,letter,forest)")
    p.add_argument("--verify-reps", default=None, help="held-out repetition counts (default: 150,250)")
    p.add_argument("--quick", action="store_true", help="fewer cases (a first look, tests)")
    p.add_argument("--no-broad", action="store_true",
                   help="skip the broad verification (every attack family and text setting); the narrow held-out "
                        "set is still measured")
    p.add_argument("--baselines", default=None,
                   help="measured beside the patch in the broad verification: paper (the paper's neuron patch; as "
                        "slow as the unpatched model), collapse (the input-side collapse of long runs, what a "
                        "serving layer could do), both comma-separated, or none (default: none)")
    p.add_argument("--compare", action="append", default=[], metavar="PATCH",
                   help="a saved patch (patch.json or a folder from 'sinkhole patch') measured beside the chosen one "
                        "in the broad verification; repeatable")


def build_config(args, cfg=None):
    """The search configuration from the shared options (``cfg``: the configuration to fill, a
    :class:`sinkhole.patch.search.SearchConfig` by default)."""
    from ..attack.prompts import parse_int_list, parse_words  # lazy: start-up time
    from ..errors import SinkholeError  # lazy: start-up time
    from ..patch.search import BASELINES, METHODS, SearchConfig  # lazy: start-up time

    if cfg is None:
        cfg = SearchConfig(families=METHODS[getattr(args, "method", "gate")], max_new_tokens=MAX_NEW_TOKENS)
    if args.words:
        cfg.search_words = tuple(parse_words(args.words))
    if args.reps:
        cfg.search_reps = tuple(parse_int_list(args.reps, "--reps"))
    if args.verify_words:
        cfg.verify_words = tuple(parse_words(args.verify_words, "--verify-words"))
    if args.verify_reps:
        cfg.verify_reps = tuple(parse_int_list(args.verify_reps, "--verify-reps"))
    cfg.broad = not args.no_broad
    if args.baselines is not None:
        bl = [] if args.baselines.strip() == "none" else parse_words(args.baselines, "--baselines")
        bad = [b for b in bl if b not in BASELINES]
        if bad:
            raise SinkholeError(f"unknown baseline {bad[0]!r}; use {', '.join(BASELINES)} or none")
        cfg.baselines = tuple(bl)
    if args.quick:
        cfg = cfg.as_quick()
    cfg.check_disjoint()
    return cfg


def run(args) -> int:
    from ..errors import SinkholeError  # lazy: start-up time

    if args.out is None:
        raise SinkholeError("give --out DIR, the folder to write the patch to")
    return run_search(args, build_config(args), roles=("massive_layer",) if args.method == "paper" else ())


def run_search(args, cfg, search=None, roles=("massive_layer",)) -> int:
    """Search (``search(lm, cfg, circuit=, log=)``, :func:`sinkhole.patch.search.search_patch` by default),
    verify and export; ``args.patch_file`` skips the search."""
    from pathlib import Path

    from ..patch.export import read_patch  # lazy: start-up time
    from ..results import prepare_out_dir  # lazy: start-up time

    patch_file = read_patch(args.patch_file) if args.patch_file else None
    compare = {}
    for c in args.compare:
        name = Path(c).stem if Path(c).suffix == ".json" else Path(c).name
        compare[name if name not in compare else f"{name}_{len(compare)}"] = read_patch(c)
    created = not Path(args.out).exists()
    out = prepare_out_dir(args.out)  # an unwritable --out fails before any work
    try:
        return _run(args, cfg, patch_file, out, compare, search, list(roles))
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refused or interrupted run leaves no empty folder behind
        raise


def _run(args, cfg, patch_file, out, compare, search_fn, roles) -> int:
    from ..errors import SinkholeError  # lazy: start-up time
    from ..patch import export_patched  # lazy: start-up time
    from ..patch.search import search_patch, verify_patch  # lazy: start-up time
    from ..patch.tables import summary_markdown  # lazy: start-up time
    from ..results import dumps  # lazy: start-up time
    from . import circuit_from_args, info, load_from_args, model_meta  # lazy: start-up time

    gguf = getattr(args, "gguf", None)
    if gguf is not None and not str(gguf).lower().endswith(".gguf"):
        raise SinkholeError("--gguf must be a path ending in .gguf")
    lm = load_from_args(args)
    if gguf is not None:
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
        circ = circuit_from_args(args, lm, roles)
        res = (search_fn or search_patch)(lm, cfg, circuit=circ, log=log)
        search, tried, patch = res.to_dict(), res.tried, res.patch
        if patch is None:
            if res.baseline_search.get("either_rate", 0) == 0:
                raise SinkholeError("the model did not diverge on the search cases: nothing to patch (try more "
                                    "--reps or other --words)", exit_code=1)
            errors = [t for t in tried if "error" in t]
            if errors and len(errors) == len([t for t in tried if "skipped" not in t]):
                raise SinkholeError(f"every candidate failed; {errors[0]['family']}: {errors[0]['error']}",
                                    exit_code=1)
            raise SinkholeError(f"no candidate stayed within the perplexity budget of {cfg.ppl_budget_pct}%"
                                + ("; raise --ppl-budget or try other --families" if search_fn else ""),
                                exit_code=1)
    timing["search_s"] = round(time.perf_counter() - t0, 1)
    t1 = time.perf_counter()
    verification = verify_patch(lm, patch, cfg, log=log, circuit=circ, compare=compare, quiet=args.quiet or None)
    timing["verification_s"] = round(time.perf_counter() - t1, 1)
    if verification.get("broad"):
        timing["broad_verification_s"] = verification["broad"]["seconds"]
    summary = {"model": model_meta(lm).to_dict(), "patch": patch.to_dict(), "search": search,
               "verification": verification}
    md = summary_markdown(verification, tried, search.get("chosen") if search else None)
    if gguf is not None:  # first, so that summary.json records it
        from ..experimental.gguf_export import patch_to_gguf  # lazy: start-up time

        rep = patch_to_gguf(lm, patch, gguf, args.gguf_type)
        summary["gguf"] = {"path": str(gguf), "type": args.gguf_type, **rep}
        info(args, f"wrote {gguf}: {len(rep['patched'])} patched tensors ({args.gguf_type}), {rep['copied']} "
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
