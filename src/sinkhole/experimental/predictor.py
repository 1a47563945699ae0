"""A generation-free divergence predictor: one forward pass over the prompt, stopped early.

For every case we run the prompt (no generation) through layers ``0..max_layer`` and read, at
the last ``k`` prompt positions (where the model is about to continue the run):

* ``bos_attn``: mean attention weight on the first token (position 0), averaged over heads and
  over layers ``first_attn_layer..max_layer``. A broken attention sink shows up as a drop.
* ``attn_drop``: ``1 - bos_attn`` (the score that rises with divergence risk).
* ``norm_ratio``: residual-stream norm (``resid_post`` at ``norm_layer``, the circuit's drift layer) of the
  last positions divided by the norm of position 0. Near 1 means the repeated tokens look like
  a first token to the model (the paper's mechanism).
* ``norm_growth``: the same norm at the last positions divided by its value at the first token
  of the run.

:class:`Predictor` picks, on training cases with generation labels, the single feature and
threshold (and direction) with the best balanced accuracy; it is evaluated on held-out cases
with accuracy and AUC (``evaluate``). Attention patterns are reduced inside the hook to the
``k`` rows and one column that are needed, so long prompts fit in memory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ..attack.diverge import run_cases
from ..attack.prompts import Case, make_cases
from ..attack.sweep import default_layers, sink_probe
from ..circuit.common import auc as auc_of
from ..decoding.tokens import pad_left
from ..errors import SinkholeError
from ..progress import progress

FEATURES = ("attn_drop", "norm_ratio", "norm_growth")


@dataclass
class CaseFeatures:
    word: str
    reps: int
    template: str
    bos_attn: float
    attn_drop: float
    norm_ratio: float
    norm_growth: float

    def to_dict(self) -> dict:
        return asdict(self)


def case_features(lm, cases: Sequence[Case], drift_layer: int | None = None, k: int = 8, batch_size: int = 4,
                  quiet: bool | None = None) -> list[CaseFeatures]:
    """Features of every case from one truncated forward pass per batch (left padded)."""
    norm_layer, a0, max_layer = default_layers(lm, drift_layer)
    order = sorted(range(len(cases)), key=lambda i: len(cases[i].ids))
    out: list[CaseFeatures | None] = [None] * len(cases)
    for s in progress(range(0, len(order), batch_size), desc="predictor", total=(len(order) + batch_size - 1)
                      // max(batch_size, 1), disable=quiet):
        idx = order[s:s + batch_size]
        width = max(len(cases[i].ids) for i in idx)
        ids, mask = pad_left(lm, [cases[i].ids for i in idx])
        norms, att = sink_probe(lm, ids, norm_layer, a0, max_layer, k, attention_mask=mask)
        for r, i in enumerate(idx):
            c = cases[i]
            pad = width - len(c.ids)
            first = float(norms[r, pad])
            run_start = pad + len(c.ids) - c.n_word_tokens * c.reps
            tail = float(norms[r, -k:].mean())
            start = float(norms[r, max(run_start, pad)])
            b = float(att[r].mean())
            out[i] = CaseFeatures(c.word, c.reps, c.template, b, 1.0 - b, tail / first if first > 0 else 0.0,
                                  tail / start if start > 0 else 0.0)
    return out  # type: ignore[return-value]


def auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve (probability a positive outscores a negative; ties count 1/2) of
    labelled scores: :func:`sinkhole.circuit.common.auc`, None where a class is empty."""
    pos = [float(s) for s, y in zip(scores, labels) if y]
    neg = [float(s) for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    return auc_of(torch.tensor(pos, dtype=torch.float64), torch.tensor(neg, dtype=torch.float64))


@dataclass
class Predictor:
    """A one-feature threshold rule: diverged iff ``sign * feature > sign * threshold``."""

    feature: str = "attn_drop"
    threshold: float = 0.5
    sign: int = 1
    train_balanced_accuracy: float | None = None
    train_n: int = 0
    candidates: dict = field(default_factory=dict)

    def score(self, f: CaseFeatures) -> float:
        return self.sign * getattr(f, self.feature)

    def predict(self, f: CaseFeatures) -> bool:
        return self.score(f) > self.sign * self.threshold

    @classmethod
    def fit(cls, feats: Sequence[CaseFeatures], labels: Sequence[bool], features=FEATURES) -> "Predictor":
        best = None
        cand = {}
        for name in features:
            vals = [getattr(f, name) for f in feats]
            for sign in (1, -1):
                for thr, acc in _best_threshold([sign * v for v in vals], labels):
                    cand.setdefault(name, []).append((acc, sign))
                    if best is None or acc > best[0]:
                        best = (acc, name, sign * thr, sign)
        if best is None:
            return cls(train_n=len(feats))
        acc, name, thr, sign = best
        cand = {k: round(max(a for a, _ in v), 4) for k, v in cand.items()}
        return cls(name, float(thr), sign, round(acc, 4), len(feats), cand)

    def evaluate(self, feats: Sequence[CaseFeatures], labels: Sequence[bool]) -> dict:
        pred = [self.predict(f) for f in feats]
        n = len(labels)
        acc = sum(p == y for p, y in zip(pred, labels)) / n if n else None
        return {"n": n, "accuracy": None if acc is None else round(acc, 4),
                "auc": _r(auc([self.score(f) for f in feats], labels)),
                "auc_per_feature": {k: _r(auc([getattr(f, k) for f in feats], labels)) for k in FEATURES},
                "positives": int(sum(bool(y) for y in labels)), "predicted_positive": int(sum(pred))}

    def to_dict(self) -> dict:
        return asdict(self)


def _r(v):
    return None if v is None else round(float(v), 4)


def _best_threshold(scores, labels):
    """Yield the (threshold, balanced accuracy) of the best cut between sorted scores."""
    pts = sorted(set(scores))
    cuts = [pts[0] - 1.0] + [(a + b) / 2 for a, b in zip(pts, pts[1:])]
    npos = sum(bool(y) for y in labels)
    nneg = len(labels) - npos
    best = None
    for c in cuts:
        tp = sum(s > c and y for s, y in zip(scores, labels))
        tn = sum(s <= c and not y for s, y in zip(scores, labels))
        bal = 0.5 * ((tp / npos if npos else 1.0) + (tn / nneg if nneg else 1.0))
        if best is None or bal > best[1]:
            best = (c, bal)
    if best is not None:
        yield best




def check_split(train_words: Sequence[str], held_out_words: Sequence[str]) -> None:
    """Refuse training and held-out words that overlap (case-insensitively)."""
    both = sorted({w.lower() for w in train_words} & {w.lower() for w in held_out_words})
    if both:
        raise SinkholeError(f"the training and held-out words overlap ({', '.join(both)}); they must be disjoint")


def fit_and_evaluate(lm, train_words: Sequence[str], held_out_words: Sequence[str], reps: Sequence[int],
                     templates: Sequence[str] | None = None, max_new_tokens: int = 20, drift_layer: int | None = None,
                     quiet: bool | None = None) -> dict:
    """Label every case of ``train_words`` and ``held_out_words`` by greedy generation and the run judge, fit
    a :class:`Predictor` on the first and score it on the second (``sinkhole experimental predict``)."""
    check_split(train_words, held_out_words)
    out: dict = {"train_words": list(train_words), "held_out_words": list(held_out_words), "reps": list(reps),
                 "templates": list(templates) if templates else None, "max_new_tokens": max_new_tokens}
    split = {}
    for name, words in (("train", train_words), ("held_out", held_out_words)):
        cases = make_cases(lm, list(words), list(reps), list(templates) if templates else None)
        labels = [r.diverged for r in run_cases(lm, cases, max_new_tokens=max_new_tokens, quiet=quiet)]
        split[name] = (case_features(lm, cases, drift_layer=drift_layer, quiet=quiet), labels)
    pred = Predictor.fit(*split["train"])
    out["predictor"] = pred.to_dict()
    out["held_out"] = pred.evaluate(*split["held_out"])
    out["cases"] = [{"split": name, **f.to_dict(), "diverged": y}
                    for name, (fs, ys) in split.items() for f, y in zip(fs, ys)]
    return out
