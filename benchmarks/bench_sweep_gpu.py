"""Benchmark 5 on a GPU: the whole SmolLM2 vocabulary through ``sweep_tokens``, float32 and bfloat16.

Measured (not projected): the wall time of ``sweep_tokens(lm, all 49,152 token ids, max_reps=256,
batch_size=64)`` after a one-batch warm-up, with ``torch.cuda.synchronize()`` around the timed call,
the number of tokens whose run reaches the sink within 256 repetitions, and how often float32 and
bfloat16 agree on reaching it. Needs a CUDA device; the embedded model must be installed.

Usage::

    python benchmarks/bench_sweep_gpu.py benchmarks/results/sweep_gpu_h100_full.json [records.json]
"""

import json
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(out_path: str, records_path: str | None = None) -> None:
    from sinkhole import load_model
    from sinkhole.attack.sweep import sweep_tokens

    if not torch.cuda.is_available():
        sys.exit("bench_sweep_gpu.py: no CUDA device; run it on a GPU machine")
    out, recs = {}, {}
    for dt in ("float32", "bfloat16"):
        lm = load_model("smollm2-135m-instruct", device="cuda", dtype=dt, progress=False)
        cand = list(range(lm.model.config.vocab_size))
        sweep_tokens(lm, cand[:64], max_reps=256, batch_size=64, quiet=True)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = sweep_tokens(lm, cand, max_reps=256, batch_size=64, quiet=True)
        torch.cuda.synchronize()
        s = time.perf_counter() - t0
        r = {int(k): v["reps_to_sink"] for k, v in res["records"].items()}
        recs[dt] = r
        out[dt] = {"tokens": len(cand), "seconds": s, "tokens_per_s": len(cand) / s,
                   "n_reaching_sink": sum(v is not None for v in r.values()),
                   "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
        print(dt, out[dt], flush=True)
        del lm
        torch.cuda.empty_cache()
    a, b = recs["float32"], recs["bfloat16"]
    out["agree_reach"] = sum((a[k] is None) == (b.get(k) is None) for k in a) / len(a)
    out["device"], out["torch"] = torch.cuda.get_device_name(), torch.__version__
    with open(out_path, "w") as f:
        json.dump(out, f, indent=1)
    if records_path:
        with open(records_path, "w") as f:
            json.dump({k: {str(t): v for t, v in r.items()} for k, r in recs.items()}, f)
    print(out)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python benchmarks/bench_sweep_gpu.py OUT.json [RECORDS.json]")
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)
