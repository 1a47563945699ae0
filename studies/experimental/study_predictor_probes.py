"""Benchmark 4, a study: can a *learned* probe on early residuals predict divergence well enough?

The one-feature sink probe (bench_predictor.py) stops at 77.5 % held-out agreement, and all its errors are
divergences without a sink signature (docs/benchmarks.md, section 4). This study asks whether a linear probe
on the whole residual stream of the last prompt position, at a layer well before the end, does better:

1. **Labels**: many more cases, ``--words`` frequent single-token words of the shared public-domain texts
   (none of the 20 words of bench_predictor.py) x 30/100/200/400 repetitions, ``repeat`` template, 48
   generated tokens, labelled by the run judge on the exact greedy tokens from ``greedy_check`` (the same
   tokens as ``generate`` on all 80 cases of bench_greedy_check.py, at a quarter of the cost). A sample of
   ``--verify`` cases is also generated with ``run_cases`` and the labels are compared.
2. **Features**: one pass per case stopped after the deepest layer asked for; at each layer the last
   position's residual direction (unit vector), its log norm, its log ratio to position 0's norm and log
   repetitions. With ``--lookahead N`` the prompt holds N more repetitions (what the model would see if it
   went on repeating for N tokens).
3. **Probes**: L2 logistic regression (scikit-learn), the strength chosen by 5-fold cross-validation grouped
   by word. Reported per layer: grouped cross-validated accuracy and balanced accuracy on the new words, the
   majority-class rate, and accuracy on the 40 held-out cases of ``--bench`` (labels from generation) after
   training on the new words plus that file's 40 training cases.

Usage::

    python studies/experimental/study_predictor_probes.py --bench benchmarks/results/predictor_48_large.json --save probe_study
"""

from __future__ import annotations

import collections
import json
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SINKHOLE_NO_PROGRESS", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "benchmarks"))
sys.path.insert(0, str(HERE))
from _common import machine, parser, report, save  # noqa: E402

TEXT_DIR = HERE.parents[2] / "shared" / "data" / "text"  # the shared public-domain texts beside the checkout


def study_words(lm, n: int, exclude: set[str], text_dir: Path) -> list[str]:
    """The ``n`` most frequent words (4+ letters) of the texts that are one token after a space."""
    text = " ".join(p.read_text(errors="replace") for p in sorted(text_dir.glob("*.txt")))
    counts = collections.Counter(w.lower() for w in re.findall(r"[A-Za-z]{4,}", text))
    out = []
    for w, _ in counts.most_common():
        if w not in exclude and len(lm.word_ids(w)) == 1:
            out.append(w)
            if len(out) == n:
                break
    return out


def residual_features(lm, cases, layers: list[int], lookahead: int):
    import numpy as np
    import torch

    from sinkhole.attack.prompts import make_cases
    from sinkhole.capture import Hooks

    rows = {L: [] for L in layers}
    for c in cases:
        ids = make_cases(lm, [c.word], [c.reps + lookahead], [c.template])[0].ids if lookahead else c.ids
        h = Hooks(lm)
        for L in layers:
            h.read("resid_post", L, reduce=lambda x, pos: x.detach().float()[0])
        h.stop_after(max(layers))
        with torch.no_grad(), h:
            h.forward(torch.tensor([ids], device=lm.device), use_cache=False)
        for L in layers:
            x = h.cache[f"resid_post.{L}"].cpu()
            n_last, n0 = float(x[-1].norm()), float(x[0].norm())
            rows[L].append(np.concatenate([(x[-1] / n_last).numpy(),
                                           [np.log(n_last), np.log(n_last / n0), np.log(c.reps + lookahead)]]))
    return {L: np.stack(v) for L, v in rows.items()}


def probe_scores(Xa, ya, ga, Xb_tr, yb_tr, Xb_te, yb_te, cs=(0.01, 0.03, 0.1, 0.3, 1.0)):
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import GroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def model(C):
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000))

    best = None
    for C in cs:
        pred = cross_val_predict(model(C), Xa, ya, groups=ga, cv=GroupKFold(min(5, len(set(ga.tolist())))))
        acc = float((pred == ya).mean())
        bal = balanced_accuracy_score(ya, pred)
        if best is None or acc > best["cv_accuracy"]:
            best = {"C": C, "cv_accuracy": round(acc, 4), "cv_balanced_accuracy": round(float(bal), 4)}
    m = model(best["C"]).fit(np.vstack([Xa, Xb_tr]), np.concatenate([ya, yb_tr]))
    best["bench_held_out_accuracy"] = round(float((m.predict(Xb_te) == yb_te).mean()), 4)
    return best


def main(argv=None):
    ap = parser(__doc__, model=None, study=True)
    ap.add_argument("--bench", required=True, help="a study_predictor.py result with 'repeat' cases")
    ap.add_argument("--words", type=int, default=120)
    ap.add_argument("--layers", default="1,2,4,6,8,10,12,15,20")
    ap.add_argument("--lookahead", default="0,24", help="comma list of extra repetitions to probe")
    ap.add_argument("--verify", type=int, default=24, help="cases also generated with run_cases")
    ap.add_argument("--text-dir", default=str(TEXT_DIR))
    a = ap.parse_args(argv)
    import numpy as np
    from study_predictor import HELD_OUT, TRAIN

    from sinkhole import load_model
    from sinkhole.attack.diverge import run_cases
    from sinkhole.attack.exact import greedy_check
    from sinkhole.attack.prompts import make_cases

    bench = json.loads(Path(a.bench).read_text())
    N, layers = bench["max_new_tokens"], [int(x) for x in a.layers.split(",")]
    lm = load_model(bench.get("model") or "smollm2-135m-instruct", progress=False)
    words = study_words(lm, a.words, set(TRAIN) | set(HELD_OUT), Path(a.text_dir))
    cases = make_cases(lm, words, [30, 100, 200, 400], ["repeat"])
    t = time.perf_counter()
    checks = greedy_check(lm, cases, N, quiet=True)
    t_label = time.perf_counter() - t
    ya = np.array([k.diverged for k in checks])
    ga = np.array([c.word for c in cases])
    sample = random.Random(0).sample(range(len(cases)), min(a.verify, len(cases)))
    gen = run_cases(lm, [cases[i] for i in sample], max_new_tokens=N, batch_size=1, quiet=True)
    verified = sum(g.diverged == checks[i].diverged for g, i in zip(gen, sample))
    bcases = [make_cases(lm, [c["word"]], [c["reps"]], [c["template"]])[0] for c in bench["cases"]]
    yb = np.array([c["diverged"] for c in bench["cases"]])
    tr = np.array([c["split"] == "train" for c in bench["cases"]])
    results = []
    for la in [int(x) for x in a.lookahead.split(",")]:
        Fa, Fb = residual_features(lm, cases, layers, la), residual_features(lm, bcases, layers, la)
        for L in layers:
            r = probe_scores(Fa[L], ya, ga, Fb[L][tr], yb[tr], Fb[L][~tr], yb[~tr])
            results.append({"lookahead": la, "layer": L, **r})
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    by_reps = {r: round(float(ya[[c.reps == r for c in cases]].mean()), 4) for r in (30, 100, 200, 400)}
    doc = {"machine": machine(), "model": lm.name, "max_new_tokens": N, "n_words": len(words), "words": words,
           "n_cases": len(cases), "divergence_rate": round(float(ya.mean()), 4), "divergence_rate_by_reps": by_reps,
           "majority_class_accuracy": round(float(max(ya.mean(), 1 - ya.mean())), 4),
           "label_seconds": round(t_label, 1),
           "labels_verified_with_generation": {"n": len(sample), "same_label": verified},
           "bench": a.bench, "bench_held_out_majority_accuracy": round(float(max(yb[~tr].mean(), 1 - yb[~tr].mean())), 4),
           "probes": results,
           "cases": [{"word": c.word, "reps": c.reps, "diverged": bool(k.diverged),
                      "tokens_until_divergence": k.tokens_until_divergence} for c, k in zip(cases, checks)]}
    print(json.dumps({k: v for k, v in doc.items() if k not in ("machine", "cases", "words")}, indent=1))
    best = max(results, key=lambda r: r["cv_accuracy"])
    report(save(a, doc), {"majority_class_accuracy": doc["majority_class_accuracy"],
                          "best_cv_accuracy": round(best["cv_accuracy"], 3)})


if __name__ == "__main__":
    main()
