"""Benchmark 4, the exact alternative: ``greedy_check`` (draft-verified greedy decoding) against generation.

1. Agreement: every case of a saved ``studies/experimental/study_predictor.py`` result (with its generated ids and run-judge
   labels) is checked with ``sinkhole.attack.exact.greedy_check``; reported: label agreement, whether the
   tokens equal the saved greedy tokens, forward passes per case.
2. Speed, side by side in one process on a stratified subset (every repetition count equally often), each case
   timed with ``run_cases`` (generation + judge, batch 1), ``greedy_check`` and the sink probe (``case_features``),
   for ``--rounds`` rounds; means per case and ratios.
3. The cascade: trust the probe where it predicts divergence (it had no false positive in the saved run), run the
   exact check elsewhere. Timed as one program in step 2 (probe, then the check when the probe says "no"), and
   also computed over all cases from the per-case times of step 1.
4. The limit: each method's executed FLOPs (analytic count, as in bench_core.py) per second, against the float32
   matmul peak of ``bench_peak.py`` when ``--peak`` names its result.

Usage::

    python benchmarks/bench_greedy_check.py studies/results/predictor_48_large.json --save predictor_exact_check
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SINKHOLE_NO_PROGRESS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, model_flops, parser, report, save  # noqa: E402


def flops(cfg, T: int, n_new: int, probe_layers: int | None = None) -> dict:
    """Executed FLOPs of one case with a T-token prompt: generation (prefill, then one token per step, LM head
    on the last position of each pass) and the sink probe (``probe_layers`` blocks, no head). An exact check
    that accepts the whole draft in one pass does generation's arithmetic in one pass (the repeating case; a
    departure adds a short pass), so the check is counted with generation's FLOPs."""
    head = 2 * cfg.hidden_size * cfg.vocab_size
    return {"generate": model_flops(cfg, T + n_new) + (n_new + 1) * head,
            "probe": model_flops(cfg, T, n_layers=probe_layers)}


def main(argv=None):
    ap = parser(__doc__, model=None)
    ap.add_argument("result", help="a studies/experimental/study_predictor.py result (cases with generated ids)")
    ap.add_argument("--subset", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--peak", default="", help="a bench_peak.py result (JSON) for the share of peak")
    a = ap.parse_args(argv)
    from sinkhole import load_model
    from sinkhole.attack.diverge import run_cases
    from sinkhole.attack.exact import greedy_check
    from sinkhole.attack.prompts import make_cases
    from sinkhole.experimental.predictor import Predictor, case_features, default_layers

    d = json.loads(Path(a.result).read_text())
    C, N = d["cases"], d["max_new_tokens"]
    lm = load_model(d.get("model") or "smollm2-135m-instruct", progress=False)
    cases = [make_cases(lm, [c["word"]], [c["reps"]], [c["template"]])[0] for c in C]
    greedy_check(lm, cases[:1], N, quiet=True)  # warm-up
    checks, t_check = [], []
    for c in cases:
        t = time.perf_counter()
        checks.append(greedy_check(lm, [c], N, quiet=True)[0])
        t_check.append(time.perf_counter() - t)
    agree = [k.diverged == c["diverged"] for k, c in zip(checks, C)]
    same = [k.generated_ids == c["generated_ids"][:len(k.generated_ids)] for k, c in zip(checks, C)]
    held = [i for i, c in enumerate(C) if c["split"] == "held_out"]
    n_reps = len({c["reps"] for c in C})
    idx = [n_reps * j + (j % n_reps) for j in range(a.subset) if n_reps * j + (j % n_reps) < len(C)]
    rows = []
    pred = Predictor(**d["predictor"])
    probe_blocks = max(default_layers(lm, d.get("sink_layer"))) + 1
    run_cases(lm, cases[:1], max_new_tokens=4, batch_size=1, quiet=True)
    for r in range(a.rounds):
        for i in idx:
            c = cases[i]
            t = time.perf_counter()
            g = run_cases(lm, [c], max_new_tokens=N, batch_size=1, quiet=True)[0]
            tg = time.perf_counter() - t
            t = time.perf_counter()
            k = greedy_check(lm, [c], N, quiet=True)[0]
            tk = time.perf_counter() - t
            t = time.perf_counter()
            case_features(lm, [c], drift_layer=d.get("sink_layer"), batch_size=1, quiet=True)
            tp = time.perf_counter() - t
            t = time.perf_counter()  # the cascade as one program: probe, then the exact check if it says "no"
            f = case_features(lm, [c], drift_layer=d.get("sink_layer"), batch_size=1, quiet=True)[0]
            cas = True if pred.predict(f) else greedy_check(lm, [c], N, quiet=True)[0].diverged
            tc = time.perf_counter() - t
            rows.append({"word": c.word, "reps": c.reps, "round": r, "t_generate_s": tg, "t_check_s": tk,
                         "t_probe_s": tp, "t_cascade_s": tc, "agree": g.diverged == k.diverged,
                         "cascade_agree": g.diverged == cas, "passes": k.passes,
                         "flops": flops(lm.model.config, len(c.ids), N, probe_blocks)})
    tg = statistics.mean(x["t_generate_s"] for x in rows)
    tk = statistics.mean(x["t_check_s"] for x in rows)
    tp = statistics.mean(x["t_probe_s"] for x in rows)
    tc = statistics.mean(x["t_cascade_s"] for x in rows)
    peak = None
    if a.peak and Path(a.peak).exists():
        peak = json.loads(Path(a.peak).read_text())["result"]["peak_gflop_per_s"]
    limit = {}
    for key, fk in (("generate", "generate"), ("check", "generate"), ("probe", "probe")):
        rate = sum(x["flops"][fk] for x in rows) / sum(x[f"t_{key}_s"] for x in rows) / 1e9
        limit[key] = {"gflop_per_s": rate, "share_of_peak": rate / peak if peak else None}
    limit["note"] = ("check FLOPs count one pass over prompt + draft; its extra passes after a departure are "
                     "not counted, so its rate is a lower bound")
    neg = [i for i, c in enumerate(C) if not pred.predict(SimpleNamespace(**c))]
    false_pos = sum(1 for i, c in enumerate(C) if i not in neg and not c["diverged"])
    cascade_s = tp + sum(t_check[i] for i in neg) / len(C)
    doc = {"machine": machine(), "source": a.result, "n_cases": len(C), "max_new_tokens": N,
           "agreement": sum(agree) / len(C), "agreement_held_out": sum(agree[i] for i in held) / max(len(held), 1),
           "same_tokens_as_generation": sum(same) / len(C),
           "mean_passes": statistics.mean(k.passes for k in checks), "max_passes": max(k.passes for k in checks),
           "timing_subset": {"n_cases": len(idx), "rounds": a.rounds, "mean_generate_s": tg, "mean_check_s": tk,
                             "mean_probe_s": tp, "mean_cascade_s": tc, "speedup_check": tg / tk,
                             "speedup_probe": tg / tp, "speedup_cascade_timed": tg / tc,
                             "median_generate_s": statistics.median(x["t_generate_s"] for x in rows),
                             "median_check_s": statistics.median(x["t_check_s"] for x in rows),
                             "median_probe_s": statistics.median(x["t_probe_s"] for x in rows),
                             "median_cascade_s": statistics.median(x["t_cascade_s"] for x in rows),
                             "agreement_in_timing_runs": sum(x["agree"] for x in rows) / len(rows),
                             "cascade_agreement_in_timing_runs": sum(x["cascade_agree"] for x in rows) / len(rows),
                             "peak_gflop_per_s": peak, "limit": limit},
           "cascade": {"probe_negatives": len(neg), "probe_false_positives": false_pos,
                       "agreement": (len(C) - false_pos) / len(C), "mean_s_per_case": cascade_s,
                       "speedup": tg / cascade_s,
                       "how": "probe time (timing subset) + the exact check's measured time on the probe's negatives; "
                              "timed as one program on the timing subset: timing_subset.mean_cascade_s"},
           "rows": rows, "checks": [{**k.to_dict(), "t_s": t} for k, t in zip(checks, t_check)]}
    print(json.dumps({k: v for k, v in doc.items() if k not in ("rows", "checks", "machine")}, indent=1))
    report(save(a, doc), {"agreement": round(doc["agreement"], 3),
                          "speedup_check": round(doc["timing_subset"]["speedup_check"], 2)})


if __name__ == "__main__":
    main()
