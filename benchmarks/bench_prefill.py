"""Benchmark 4, the floor of any exact method: one full forward pass over each prompt (the prefill).

Generation pays the prefill and then one decoding step per token; any method that reproduces generation
exactly must at least read the prompt through the whole model. This times that pass alone (SDPA attention,
logits for the last position only) on the timing cases of a ``bench_greedy_check.py`` result and compares it
with the generation times measured there, per repetition count.

    python benchmarks/bench_prefill.py benchmarks/results/predictor_exact_check.json --save prefill
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, parser, report, save  # noqa: E402


def main(argv=None):
    ap = parser(__doc__)
    ap.add_argument("result", help="a bench_greedy_check.py result")
    a = ap.parse_args(argv)
    import torch

    from sinkhole import load_model
    from sinkhole.attack.prompts import make_cases
    from sinkhole.models.attention import fast_attention

    rows = json.loads(Path(a.result).read_text())["rows"]
    lm = load_model(a.model, progress=False)
    times = []
    with fast_attention(lm), torch.no_grad():
        lm.model(input_ids=torch.tensor([[1, 2, 3]], device=lm.device))  # warm-up
        for r in rows:
            ids = make_cases(lm, [r["word"]], [r["reps"]], ["repeat"])[0].ids
            t = time.perf_counter()
            lm.model(input_ids=torch.tensor([ids], device=lm.device), logits_to_keep=1)
            times.append(time.perf_counter() - t)
    by = {}
    for reps in sorted({r["reps"] for r in rows}):
        p = [t for t, r in zip(times, rows) if r["reps"] == reps]
        g = [r["t_generate_s"] for r in rows if r["reps"] == reps]
        by[reps] = {"prefill_s": statistics.mean(p), "generate_s": statistics.mean(g),
                    "generate_over_prefill": statistics.mean(g) / statistics.mean(p)}
    gen = statistics.mean(r["t_generate_s"] for r in rows)
    doc = {"machine": machine(), "source": a.result, "n": len(rows), "mean_prefill_s": statistics.mean(times),
           "mean_generate_s": gen, "generate_over_prefill": gen / statistics.mean(times), "by_reps": by,
           "note": "generation times are those of the source result (same cases, same machine, other process)"}
    print(json.dumps({k: v for k, v in doc.items() if k != "machine"}, indent=1))
    report(save(a, doc), {"generate_over_prefill": round(doc["generate_over_prefill"], 2)})


if __name__ == "__main__":
    main()
