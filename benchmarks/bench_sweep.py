"""Benchmark 5: vocabulary sweep throughput of a generation-free sink score, and projections.

The score of a candidate token t: the residual-stream norm at the sink layer at the last of n
repetitions of t (``[BOS] t t ... t``), the pass stopped after the sink layer, the norm reduced
in the hook, candidates batched. Measured: candidate tokens per second on a sample of the
SmolLM2 vocabulary; the whole-vocabulary time is that rate applied to 49,152 tokens (measured
rate, extrapolated count). The 7B line is a projection from FLOP counts (assumptions printed).

Usage::

    python benchmarks/bench_sweep.py --n-reps 64 --batch 32 --sample 256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, llama_layer_flops, machine, median, python_for, run_child, save  # noqa: E402

# Llama-2-7B shapes (public config) and the paper's sink layer for it (0-based layer 1).
LLAMA7B = dict(d=4096, n_heads=32, n_kv=32, head_dim=128, d_mlp=11008, vocab=32000, sink_layer=1)
# One H100 SXM: 989 TFLOP/s dense bf16 (vendor figure); the projection assumes 40% of it
# (model FLOPs utilization of a large batched forward without generation).
GPU_PEAK_FLOPS, GPU_MFU = 989e12, 0.40


def child(args):
    import torch

    from sinkhole import Hooks, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m-instruct", progress=False)
    vocab = lm.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    cand = torch.randperm(vocab, generator=g)[: args.sample]

    def score(tokens: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([torch.full((len(tokens), 1), lm.bos_id), tokens[:, None].expand(-1, args.n_reps)], 1)
        h = Hooks(lm)
        h.read("resid_post", args.layer, reduce=lambda x, pos: x[:, -1].float().norm(dim=-1))
        h.stop_after(args.layer)
        with torch.no_grad(), h:
            h.forward(ids, use_cache=False)
        return h.cache[f"resid_post.{args.layer}"]

    score(cand[:2])  # warm-up
    batch_times = []
    scores = []
    t0 = time.perf_counter()
    for i in range(0, len(cand), args.batch):
        t = time.perf_counter()
        scores.append(score(cand[i:i + args.batch]))
        batch_times.append(time.perf_counter() - t)
    total = time.perf_counter() - t0
    s = torch.cat(scores)
    cfg = lm.model.config
    T = args.n_reps + 1
    flops_per_cand = (args.layer + 1) * llama_layer_flops(T, cfg.hidden_size, cfg.num_attention_heads,
                                                          cfg.num_key_value_heads, cfg.head_dim,
                                                          cfg.intermediate_size, causal_only=False)
    emit({"tokens_scored": len(cand), "seconds": total, "tokens_per_s": len(cand) / total,
          "batch_times_s": batch_times, "vocab": vocab, "flops_per_candidate": flops_per_cand,
          "score_min": float(s.min()), "score_median": float(s.median()), "score_max": float(s.max()),
          "torch_threads": torch.get_num_threads()})


def project_7b(n_reps: int) -> dict:
    m = LLAMA7B
    T = n_reps + 1
    per_cand = (m["sink_layer"] + 1) * llama_layer_flops(T, m["d"], m["n_heads"], m["n_kv"], m["head_dim"], m["d_mlp"])
    total = per_cand * m["vocab"]
    secs = total / (GPU_PEAK_FLOPS * GPU_MFU)
    return {
        "flops_per_candidate": per_cand, "total_flops": total, "projected_seconds": secs,
        "assumptions": (f"Llama-2-7B shapes (d=4096, d_mlp=11008, 32 heads, vocab 32,000), forward stopped after "
                        f"the sink layer (layer {m['sink_layer']}, so {m['sink_layer'] + 1} blocks), {n_reps} repetitions "
                        f"+ BOS per candidate, causal attention FLOPs, one H100 at {GPU_PEAK_FLOPS / 1e12:.0f} TFLOP/s "
                        f"bf16 x {GPU_MFU:.0%} utilization; embedding lookup, norms and the host side ignored"),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-reps", type=int, default=64)
    p.add_argument("--layer", type=int, default=11, help="sink layer (SmolLM2: 11)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--sample", type=int, default=256, help="candidate tokens timed")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--peak-gflops", type=float, default=None, help="machine peak for the share-of-peak column")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    me = str(Path(__file__).resolve())
    argv_ = [python_for(None), me, "--child", "--n-reps", str(args.n_reps), "--layer", str(args.layer),
             "--batch", str(args.batch), "--sample", str(args.sample), "--threads", str(args.threads)]
    runs = [run_child(argv_) for _ in range(args.rounds)]
    ok = [r for r in runs if "error" not in r]
    if not ok:
        print(runs[0]["error"], file=sys.stderr)
        sys.exit(1)
    rate = median([r["tokens_per_s"] for r in ok])
    vocab = ok[0]["vocab"]
    gflops = rate * ok[0]["flops_per_candidate"] / 1e9
    res = {
        "n_reps": args.n_reps, "layer": args.layer, "batch": args.batch, "sample": args.sample,
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
    print(save("sweep", payload))


if __name__ == "__main__":
    main()
