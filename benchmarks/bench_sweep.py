"""Benchmark 5: vocabulary sweep throughput of a generation-free sink score, and projections.

Times the library's ``sinkhole.attack.sweep.sweep_tokens`` (no generation): for each candidate
token t one batched pass over ``<bos> Repeat: t t ... t`` (n repetitions), stopped a few layers
after the sink layer, the norm at the sink layer and the attention on position 0 reduced in the
hooks, giving the repetitions needed to reach a sink. Measured: candidate tokens per second on a sample of the
SmolLM2 vocabulary; the whole-vocabulary time is that rate applied to 49,152 tokens (measured
rate, extrapolated count). The 7B line is a projection from FLOP counts (assumptions printed).

Usage::

    python benchmarks/bench_sweep.py --n-reps 256 --batch 16 --sample 128
"""

from __future__ import annotations

import argparse  # noqa: F401  (argparse.SUPPRESS)
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, llama_layer_flops, machine, median, parser, python_for, report, run_child, save, smoke_model, smoke_out  # noqa: E402,E501

SMOKE = True

# Llama-2-7B shapes (public config) and the paper's sink layer for it (0-based layer 1).
LLAMA7B = dict(d=4096, n_heads=32, n_kv=32, head_dim=128, d_mlp=11008, vocab=32000, sink_layer=1)
# One H100 SXM: 989 TFLOP/s dense bf16 (vendor figure); the projection assumes 40% of it
# (model FLOPs utilization of a large batched forward without generation).
GPU_PEAK_FLOPS, GPU_MFU = 989e12, 0.40


def measure(args) -> dict:
    import torch

    from sinkhole import load_model
    from sinkhole.attack.sweep import SweepConfig, sweep_tokens
    from sinkhole.experimental.predictor import default_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model, progress=False)
    vocab = lm.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    cand = [int(t) for t in torch.randperm(vocab, generator=g)[: args.sample]]
    sink = None if args.layer < 0 else args.layer
    sweep_tokens(lm, cand[:2], SweepConfig(drift_layer=sink, max_reps=16, batch_size=2), quiet=True)  # warm-up
    t0 = time.perf_counter()
    res = sweep_tokens(lm, cand, SweepConfig(drift_layer=sink, max_reps=args.n_reps, batch_size=args.batch), quiet=True)
    total = time.perf_counter() - t0
    norm_layer, a0, max_layer = default_layers(lm, sink)
    n_blocks = max(norm_layer, max_layer) + 1
    T = len(lm.encode("Repeat:", bos=True)) + args.n_reps
    cfg = lm.model.config
    flops_per_cand = n_blocks * llama_layer_flops(T, cfg.hidden_size, cfg.num_attention_heads,
                                                  cfg.num_key_value_heads, cfg.head_dim,
                                                  cfg.intermediate_size, causal_only=False)
    reps = [r["reps_to_sink"] for r in res["records"].values()]
    return ({"tokens_scored": len(cand), "seconds": total, "tokens_per_s": len(cand) / total,
          "vocab": vocab, "flops_per_candidate": flops_per_cand, "blocks_run": n_blocks, "seq_len": T,
          "sink_layer": norm_layer, "n_reaching_sink": sum(r is not None for r in reps),
          "torch_threads": torch.get_num_threads()})


def child(args):
    emit(measure(args))


def project_7b(n_reps: int) -> dict:
    m = LLAMA7B
    T = n_reps + 1
    blocks = m["sink_layer"] + 5  # sweep_tokens' default_layers: stop 4 layers after the sink layer
    per_cand = blocks * llama_layer_flops(T + 3, m["d"], m["n_heads"], m["n_kv"], m["head_dim"], m["d_mlp"])
    total = per_cand * m["vocab"]
    secs = total / (GPU_PEAK_FLOPS * GPU_MFU)
    return {
        "flops_per_candidate": per_cand, "total_flops": total, "projected_seconds": secs,
        "assumptions": (f"Llama-2-7B shapes (d=4096, d_mlp=11008, 32 heads, vocab 32,000), forward stopped "
                        f"4 layers after the sink layer (layer {m['sink_layer']}, so {blocks} blocks, as sweep_tokens does), "
                        f"{n_reps} repetitions + '<s> Repeat:' per candidate, causal attention FLOPs, one H100 at {GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s "
                        f"bf16 x {GPU_MFU:.0%} utilization; embedding lookup, norms and the host side ignored"),
    }


def main(argv=None):
    p = parser(__doc__, smoke=True)
    p.add_argument("--n-reps", type=int, default=256, help="max_reps of sweep_tokens (its default)")
    p.add_argument("--layer", type=int, default=-1, help="sink layer (-1: sweep_tokens' default)")
    p.add_argument("--batch", type=int, default=16, help="batch_size of sweep_tokens (its default)")
    p.add_argument("--sample", type=int, default=128, help="candidate tokens timed")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--peak-gflops", type=float, default=None, help="machine peak for the share-of-peak column")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    if args.smoke:  # in this process, a few candidates of the tiny model
        args.model, args.n_reps, args.batch, args.sample = smoke_model(), 16, 4, 8
        smoke_out(args, "sweep")
        runs = [measure(args)]
    else:
        me = str(Path(__file__).resolve())
        argv_ = [python_for(None), me, "--child", "--model", args.model, "--n-reps", str(args.n_reps), "--layer",
                 str(args.layer), "--batch", str(args.batch), "--sample", str(args.sample), "--threads",
                 str(args.threads)]
        runs = [run_child(argv_) for _ in range(args.rounds)]
    ok = [r for r in runs if "error" not in r]
    if not ok:
        print(runs[0]["error"], file=sys.stderr)
        sys.exit(1)
    rate = median([r["tokens_per_s"] for r in ok])
    vocab = ok[0]["vocab"]
    gflops = rate * ok[0]["flops_per_candidate"] / 1e9
    res = {
        "n_reps": args.n_reps, "layer": ok[0]["sink_layer"], "blocks_run": ok[0]["blocks_run"],
        "seq_len": ok[0]["seq_len"], "batch": args.batch, "sample": args.sample,
        "tokens_per_s": rate, "gflop_per_s": gflops,
        "smollm2_whole_vocab_s": vocab / rate, "smollm2_vocab": vocab,
        "llama7b_projection": project_7b(args.n_reps), "runs": runs,
    }
    if args.peak_gflops:
        res["share_of_peak"] = gflops / args.peak_gflops
    payload = {"benchmark": "vocabulary sweep", "command": " ".join(["python"] + sys.argv), "machine": machine(),
               "threads": args.threads or "torch default", "result": res}
    print(f"{rate:.1f} candidate tokens/s; whole SmolLM2 vocab {vocab / rate / 60:.1f} min; "
          f"7B projection {res['llama7b_projection']['projected_seconds']:.0f} s", file=sys.stderr)
    report(save(args.out or args.save or "sweep", payload), {"tokens_per_s": round(rate, 1)})


if __name__ == "__main__":
    main()
