"""Generation-free predictor vs greedy generation, side by side in one run.

For every (word, repetitions, template) case we (1) greedily generate and judge divergence with
the run judge (the label) and (2) compute the predictor's features from one forward pass over
the prompt stopped a few layers after the sink layer. The predictor (one feature + threshold)
is fitted on the TRAIN words and evaluated on the HELD-OUT words (no word in both). Timings are
wall-clock per case on this machine, measured in the same process, batch size 1 for both.

    python studies/experimental/study_predictor.py [--model smollm2-135m-instruct] [--save predictor]
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SINKHOLE_NO_PROGRESS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import machine, parser, report, result_path, save, smoke_model, smoke_out  # noqa: E402

SMOKE = True

TRAIN = ["poem", "company", "the", "book", "house", "music", "paper", "green", "stone", "city"]
HELD_OUT = ["water", "king", "love", "blue", "time", "flower", "table", "ocean", "silver", "letter"]


def main(argv=None) -> int:
    ap = parser(__doc__, study=True, smoke=True)
    ap.add_argument("--reps", default="50,200,500")
    ap.add_argument("--templates", default="repeat,garak_this")
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--sink-layer", type=int, default=2, help="SmolLM2: 2 (first layer with first-token norm >= 5x)")
    ap.add_argument("--words-per-split", type=int, default=5, help="words in each of train / held-out (max 10)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.model, a.reps, a.templates, a.max_new_tokens, a.words_per_split, a.sink_layer = \
            smoke_model(), "8,16", "repeat", 4, 2, 1
        smoke_out(a, "predictor")
    from sinkhole import load_model
    from sinkhole.attack.diverge import run_cases
    from sinkhole.attack.prompts import make_cases
    from sinkhole.experimental.predictor import Predictor, case_features

    lm = load_model(a.model, progress=False)
    rows = []
    train, held = TRAIN[:a.words_per_split], HELD_OUT[:a.words_per_split]
    for split, words in (("train", train), ("held_out", held)):
        for c in make_cases(lm, words, a.reps, a.templates):
            t0 = time.perf_counter()
            g = run_cases(lm, [c], max_new_tokens=a.max_new_tokens, batch_size=1, quiet=True, keep_ids=True)[0]
            t_gen = time.perf_counter() - t0
            t0 = time.perf_counter()
            f = case_features(lm, [c], drift_layer=a.sink_layer, batch_size=1, quiet=True)[0]
            t_pred = time.perf_counter() - t0
            rows.append({"split": split, **f.to_dict(), "diverged": g.diverged, "garak_diverged": g.garak_diverged,
                         "tokens_until_divergence": g.tokens_until_divergence, "text": g.text,
                         "generated_ids": g.generated_ids,
                         "t_generate_s": round(t_gen, 3), "t_predict_s": round(t_pred, 3)})
            print(f"{split:8s} {c.template:10s} {c.word:8s} {c.reps:4d} diverged={g.diverged!s:5s} "
                  f"attn_drop={f.attn_drop:.3f} norm_ratio={f.norm_ratio:.3f} gen {t_gen:.1f}s pred {t_pred:.2f}s",
                  file=sys.stderr, flush=True)

    class _F:
        def __init__(self, r):
            self.__dict__.update(r)

    tr = [r for r in rows if r["split"] == "train"]
    te = [r for r in rows if r["split"] == "held_out"]
    pred = Predictor.fit([_F(r) for r in tr], [r["diverged"] for r in tr])
    ev = pred.evaluate([_F(r) for r in te], [r["diverged"] for r in te])
    t_gen = sum(r["t_generate_s"] for r in rows) / len(rows)
    t_pred = sum(r["t_predict_s"] for r in rows) / len(rows)

    by = {}
    for r in rows:
        by.setdefault((r["template"], r["reps"]), []).append(r["diverged"])
    doc = {
        "machine": machine(), "command": "python " + " ".join(sys.argv),
        "model": lm.name, "sink_layer": a.sink_layer, "max_new_tokens": a.max_new_tokens,
        "train_words": train, "held_out_words": held, "reps": a.reps, "templates": a.templates,
        "predictor": pred.to_dict(), "held_out": ev,
        "train_divergence_rate": round(sum(r["diverged"] for r in tr) / len(tr), 4),
        "held_out_divergence_rate": round(sum(r["diverged"] for r in te) / len(te), 4),
        "rate_by_template_reps": [{"template": t, "reps": n, "rate": round(sum(v) / len(v), 4), "n": len(v)}
                                  for (t, n), v in sorted(by.items())],
        "mean_time_generate_s": round(t_gen, 3), "mean_time_predict_s": round(t_pred, 3),
        "speedup": round(t_gen / t_pred, 1) if t_pred > 0 else None,
        "cases": rows,
    }
    path = save(result_path(a, "predictor"), doc)
    print(json.dumps({k: v for k, v in doc.items() if k != "cases"}, indent=1))
    report(path, {"held_out_accuracy": ev.get("accuracy"), "speedup": doc["speedup"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
