"""Benchmark 5 on a GPU: the whole SmolLM2 vocabulary through ``sweep_tokens``, float32 and bfloat16.

Measured (not projected): the wall time of ``sweep_tokens(lm, all 49,152 token ids,
SweepConfig(max_reps=256, batch_size=64))`` after a one-batch warm-up, with ``torch.cuda.synchronize()``
around the timed call, the number of tokens whose run reaches the sink within 256 repetitions, and
how often float32 and bfloat16 agree on reaching it. Needs a CUDA device; the embedded model must be installed.

Usage::

    python benchmarks/bench_sweep_gpu.py --save sweep_gpu_h100_full [--records records.json]
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, report, save  # noqa: E402


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--records", default=None, help="also write every token's repetitions to the sink here")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from sinkhole import load_model
    from sinkhole.attack.sweep import SweepConfig, sweep_tokens

    if not torch.cuda.is_available():
        sys.exit("bench_sweep_gpu.py: no CUDA device; run it on a GPU machine")
    records_path = args.records
    out, recs = {}, {}
    for dt in ("float32", "bfloat16"):
        lm = load_model(args.model, device="cuda", dtype=dt, progress=False)
        cand = list(range(lm.model.config.vocab_size))
        sweep_tokens(lm, cand[:64], SweepConfig(max_reps=256, batch_size=64), quiet=True)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = sweep_tokens(lm, cand, SweepConfig(max_reps=256, batch_size=64), quiet=True)
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
    path = save(args.out or args.save or "sweep_gpu", out)
    if records_path:
        with open(records_path, "w") as f:
            json.dump({k: {str(t): v for t, v in r.items()} for k, r in recs.items()}, f)
    report(path, {dt: round(out[dt]["seconds"], 1) for dt in ("float32", "bfloat16")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
