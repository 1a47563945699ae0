"""Why the predictor's held-out agreement stops below 90 %: an analysis of a saved predictor run.

Reads a ``study_predictor.py`` result (per-case features, generation labels, generated text) and prints:

1. every held-out error with its feature values, the token where generation diverged and the end of
   the generated text;
2. the ceiling of a single-feature threshold chosen on the held-out cases themselves (an upper
   bound, not a predictor);
3. logistic fits on two and three features (standardised, L2 0.01, fitted on the training cases);
4. with ``--lookahead``: the predictor refitted on features of the prompt extended by a fraction of
   the generation's length in repetitions (loads the model; one truncated pass per case).

Usage::

    python studies/experimental/analyze_predictor.py benchmarks/results/predictor_48_large.json --lookahead 0,0.5,1 --save predictor_analysis
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import parser, report, save  # noqa: E402



def _oracle(cases, feature):
    y = [c["diverged"] for c in cases]
    x = [c[feature] for c in cases]
    best = 0.0
    for t in sorted(set(x)):
        for s in (1, -1):
            best = max(best, sum((s * v >= s * t) == lab for v, lab in zip(x, y)) / len(y))
    return best


def _logistic(train, test, feats, l2=1e-2, steps=5000, lr=0.5):
    import numpy as np

    def mat(cs):
        return np.array([[c[f] for f in feats] for c in cs]), np.array([c["diverged"] for c in cs], float)

    X, y = mat(train)
    mu, sd = X.mean(0), X.std(0) + 1e-9
    Z = (X - mu) / sd
    w, b = np.zeros(Z.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(Z @ w + b)))
        w -= lr * (Z.T @ (p - y) / len(y) + l2 * w)
        b -= lr * float((p - y).mean())
    Xt, yt = mat(test)
    pt = 1 / (1 + np.exp(-(((Xt - mu) / sd) @ w + b)))
    return float(((pt > 0.5) == yt).mean())


def lookahead(doc, fracs):
    import torch

    from sinkhole import load_model
    from sinkhole.experimental.predictor import Predictor, case_features
    from sinkhole.attack.prompts import make_cases

    torch.manual_seed(0)
    lm = load_model(doc.get("model") or "smollm2-135m-instruct", progress=False)
    C = doc["cases"]
    tr = [i for i, c in enumerate(C) if c["split"] == "train"]
    te = [i for i, c in enumerate(C) if c["split"] == "held_out"]
    y = [c["diverged"] for c in C]
    out = {}
    for frac in fracs:
        cases = []
        for c in C:
            extra = int(round(frac * doc["max_new_tokens"] / len(lm.word_ids(c["word"]))))
            cases += make_cases(lm, [c["word"]], [c["reps"] + extra], [c["template"]])
        f = case_features(lm, cases, drift_layer=doc.get("sink_layer"), quiet=True)
        p = Predictor.fit([f[i] for i in tr], [y[i] for i in tr])
        ev = p.evaluate([f[i] for i in te], [y[i] for i in te])
        out[str(frac)] = {"feature": p.feature, "threshold": p.threshold,
                          "train_balanced_accuracy": p.train_balanced_accuracy, "held_out": ev}
        print(f"look-ahead {frac:g} x generation: {p.feature} > {p.threshold:.3f}, train balanced accuracy "
              f"{p.train_balanced_accuracy:.3f}, held-out accuracy {ev['accuracy']:.3f} (AUC {ev['auc']})")
    return out


def main(argv=None):
    ap = parser(__doc__, model=None, study=True)
    ap.add_argument("result", help="a study_predictor.py result JSON")
    ap.add_argument("--lookahead", default="", help="comma-separated fractions of the generation length")
    a = ap.parse_args(argv)
    doc = json.loads(Path(a.result).read_text())
    from sinkhole.experimental.predictor import FEATURES, Predictor

    C = doc["cases"]
    pr = Predictor(**doc["predictor"])
    train = [c for c in C if c["split"] == "train"]
    test = [c for c in C if c["split"] == "held_out"]
    summary = {"source": a.result, "errors": []}
    print(f"predictor: {pr.feature} sign {pr.sign} threshold {pr.threshold:.4f}")
    for c in test:
        pred = pr.predict(SimpleNamespace(**c))
        if pred != c["diverged"]:
            e = {"word": c["word"], "reps": c["reps"], "diverged": c["diverged"], "predicted": pred,
                 **{f: round(c[f], 3) for f in FEATURES}, "tokens_until_divergence": c["tokens_until_divergence"],
                 "text_end": c["text"][-60:]}
            summary["errors"].append(e)
            print(f"  error: {c['word']} x{c['reps']}: diverged={c['diverged']} predicted={pred} "
                  f"norm_ratio={c['norm_ratio']:.3f} at token {c['tokens_until_divergence']}: ...{c['text'][-60:]!r}")
    summary["oracle_held_out"] = {f: _oracle(test, f) for f in FEATURES}
    print("single-feature ceiling (threshold chosen on the held-out cases):", summary["oracle_held_out"])
    summary["logistic_held_out"] = {"+".join(fs): _logistic(train, test, fs)
                                    for r in (2, 3) for fs in itertools.combinations(FEATURES, r)}
    print("logistic fits, held-out accuracy:", summary["logistic_held_out"])
    if a.lookahead:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        summary["lookahead"] = lookahead(doc, [float(x) for x in a.lookahead.split(",")])
    report(save(a, summary), {"held_out_errors": len(summary["errors"])})


if __name__ == "__main__":
    main()
