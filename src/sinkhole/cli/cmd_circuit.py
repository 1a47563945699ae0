"""``sinkhole circuit``: sink layers, causally verified sink neurons and the analyses of the
paper's sections 3-4, as a table or JSON."""

from __future__ import annotations


def add_parser(sub) -> None:
    from . import add_common_args, add_model_args  # lazy: start-up time

    p = sub.add_parser("circuit", help="find the sink circuit: sink layers, sink neurons, first-token detector, "
                                       "layer-0 convergence, attention-sink metrics",
                       description="Find every candidate sink layer and the sink neurons whose ablation at position 0 "
                                   "collapses the first token's norm, then (unless --fast) the first-token detector, "
                                   "layer-0 convergence, attention-sink metrics and norm curves.")
    add_model_args(p)
    add_common_args(p)
    p.add_argument("--fast", action="store_true",
                   help="only sink layers, sink neurons and the circuit's roles (about a second after loading)")
    p.add_argument("--words", default=None, help="comma-separated words for repetitions (default: the,poem)")
    p.add_argument("--reps", type=int, default=1000, help="repetitions for norm curves and neuron firing (default 1000)")
    p.add_argument("--conv-reps", type=int, default=500, help="repetitions for layer-0 convergence (default 500)")
    p.add_argument("--attn-reps", default="16,64,256",
                   help="comma-separated repetition counts for attention metrics (default 16,64,256)")
    p.add_argument("--top-k", type=int, default=8, help="candidate neurons per sink layer before ablation (default 8)")
    p.add_argument("--frac", type=float, default=0.5,
                   help="'repeats needed' threshold as a fraction of the first-token norm (default 0.5)")
    p.add_argument("--out", default=None, help="also write the JSON result to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..attack.prompts import parse_int_list, parse_words  # lazy: start-up time
    from ..errors import SinkholeError  # lazy: start-up time
    from ..pipeline.engine import ScanOptions  # lazy: start-up time
    from ..pipeline.registry import (  # lazy: start-up time
        CIRCUIT_STEPS,
        load_document,
        run_scan,
    )
    from . import check_out_file, emit, info, load_from_args  # lazy: start-up time

    for flag, v in (("--reps", args.reps), ("--conv-reps", args.conv_reps), ("--top-k", args.top_k)):
        if v <= 0:
            raise SinkholeError(f"{flag} must be a positive integer")
    if not 0 < args.frac <= 1:
        raise SinkholeError("--frac must be in (0, 1], e.g. --frac 0.5")
    attn_reps = parse_int_list(args.attn_reps, "--attn-reps")
    words = parse_words(args.words) if args.words is not None else ["the", "poem"]
    check_out_file(args.out)
    lm = load_from_args(args)
    if not args.fast and lm.n_ctx:
        longest = max(args.reps, args.conv_reps + 8, max(attn_reps)) * max(len(lm.word_ids(w)) for w in words) + 8
        if longest > lm.n_ctx:
            raise SinkholeError(f"the longest repetition ({longest} tokens) exceeds the model's context of "
                                f"{lm.n_ctx} tokens; lower --reps/--conv-reps/--attn-reps")
    info(args, f"circuit: finding sink layers, sink neurons and the circuit's roles in {lm.name} ...")
    opts = ScanOptions(seed=args.seed, words=words, curve_reps=args.reps, conv_reps=args.conv_reps,
                       attn_reps=attn_reps, frac=args.frac, top_k=args.top_k, firing=not args.fast)
    steps = ["model", "circuit"] if args.fast else CIRCUIT_STEPS
    res = run_scan(lm, opts, steps=steps, command="circuit", log=lambda m: info(args, m))
    doc = res["doc"]
    if doc.get("errors"):
        name, msg = next(iter(doc["errors"].items()))
        raise SinkholeError(f"the {name} analysis failed ({msg}); set SINKHOLE_DEBUG=1 for a traceback", exit_code=1)
    if emit(args, doc):
        return 0
    print(summary(load_document(doc)))
    return 0


def summary(res: dict) -> str:
    """A human-readable summary of the circuit analyses (typed results of ``sinkhole circuit``)."""
    c = res["circuit"]
    lines = [f"model {c.model}",
             f"sink layers (robust rule): {c.sink_layers or 'none'}; paper rule (BOS alone, mean+2std): "
             f"{c.paper_sink_layer}",
             f"roles: marking layers {c.marking_layers}, massive layer {c.massive_layer}, drift layer "
             f"{c.drift_layer}",
             f"first-token norm {c.first_token_norm:.1f} vs typical {c.typical_norm:.1f} at the massive layer",
             "sink neurons (zeroed at position 0):"]
    for s in c.sink_neurons:
        joint = "–" if s["joint_norm_after"] is None else f"{s['joint_norm_after']:.1f}"
        lines.append(f"  layer {s['layer']:>3} neuron {s['neuron']:>6}  act {s['activation']:>10.2f}  "
                     f"norm {s['norm_before']:.1f} -> {s['norm_after']:.1f} alone, -> {joint} with the layer's set")
    for r in c.neurons:
        if not r["collapsed"]:
            lines.append(f"  layer {r['layer']}: no neuron set of the top {len(r['candidates'])} collapses the norm")
    if "first_token_detector" in res:
        det = res["first_token_detector"]
        lines.append(f"first-token detector: layer {det.detector_layer} neuron {det.detector_neuron} "
                     f"AUC {det.detector_auc:.3f} (perfect split: {det.perfect})")
    if "convergence" in res:
        for cv in res["convergence"].curves:
            lines.append(f"layer-0 convergence '{cv['word']}': distance {cv['distance'][0]:.2f} -> "
                         f"{cv['distance'][-1]:.3f} after {cv['reps'][-1]} repetitions")
        idt = res["convergence"].identity
        lines.append(f"identity check (no BOS, pure repeat): max relative deviation "
                     f"{max(idt['max_relative_deviation']):.2e} -> identical: {idt['identical']}")
    if "attention_sinks" in res:
        at = res["attention_sinks"]
        lines.append(f"sink rate (Gu, eps {at.eps}, T {at.T}): text {at.sink_rate_text:.2f}, "
                     f"repeated token {at.sink_rate_repeat:.2f}")
    if "norm_curves" in res:
        for r in res["norm_curves"].repeats_needed:
            lines.append(f"repeats needed '{r['word']}' layer {r['layer']}: {r['repeats_needed']} (sustained "
                         f"{r['repeats_needed_sustained']}) (max norm {r['max_norm']:.1f} vs first "
                         f"{r['first_token_norm']:.1f})")
    return "\n".join(lines)
