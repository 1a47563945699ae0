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

import contextlib
import inspect
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ..capture import Hooks
from ..progress import progress
from .prompts import Case

FEATURES = ("attn_drop", "norm_ratio", "norm_growth")


def _attn_to_first(k: int):
    def reduce(w: torch.Tensor, pos):  # w: (B, H, T), weight on each row's real first token
        return w[:, :, -k:].float().mean(1).detach()  # (B, k)
    return reduce


def _norms(x: torch.Tensor, pos):
    return x.detach().float().norm(dim=-1)  # (B, T)


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


def default_layers(lm, drift_layer: int | None = None) -> tuple[int, int, int]:
    """(norm_layer, first_attn_layer, max_layer): the norm at the circuit's drift layer (found
    with ``circuit.discover`` when not given), attention from just after it to a few layers
    later; everything stops well before the end of the model."""
    n = lm.adapter.n_layers
    if drift_layer is None:
        from ..circuit import discover

        drift_layer = discover(lm).drift_layer
    s = min(max(int(drift_layer), 0), n - 1)
    first_attn = min(s + 1, n - 1)
    return s, first_attn, min(n - 1, first_attn + 3)


def sink_probe(lm, ids: torch.Tensor, norm_layer: int, a0: int, max_layer: int, k: int,
               attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One truncated forward pass: the residual norm at ``norm_layer`` for every position (B, T)
    and the attention on the first real token from the last ``k`` positions, averaged over
    layers ``a0..max_layer`` and heads (B, k). Both on the CPU."""
    h = Hooks(lm)
    att_layers = lm.adapter.attention_in(range(a0, max_layer + 1)) or \
        [min(lm.adapter.attention_layers, key=lambda i: (abs(i - a0), i))]  # a hybrid's nearest attention layer
    for L in att_layers:
        h.read("attn_first", L, reduce=_attn_to_first(k))
    h.read("resid_post", norm_layer, reduce=_norms)
    h.stop_after(max(max_layer, norm_layer, *att_layers))
    kw = {} if attention_mask is None else {"attention_mask": attention_mask.to(lm.device)}
    with torch.no_grad(), h:
        h.forward(ids.to(lm.device), use_cache=False, **kw)
    att = torch.stack([h.cache[f"attn_first.{L}"] for L in att_layers]).mean(0)
    return h.cache[f"resid_post.{norm_layer}"].cpu(), att.cpu()


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
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, i in enumerate(idx):
            p = cases[i].ids
            ids[r, width - len(p):] = torch.as_tensor(p)
            mask[r, width - len(p):] = 1
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
    from ..circuit.common import auc as auc_of

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


# ------------------------------------------------------------------------------------------
# The exact check: greedy decoding verified against a repetition draft (no token-by-token decoding)
RUN_AT_END = ("raw", "repeat", "chat_assistant")


@dataclass
class GreedyCheck:
    """The greedy continuation of one case, found by verifying drafts of the run.

    ``leaves_at``: index of the first generated token that is not the run's next token (``None``:
    the run continues for all ``n_checked`` tokens); ``diverged`` / ``tokens_until_divergence``: the
    run judge's verdict on the exact greedy tokens, decided as soon as it is certain; ``passes``: the
    forward passes used (one per departure from the draft, plus one); ``generated_ids``: the greedy
    tokens up to the point where the verdict was certain (all of them with ``complete``); ``stop_token``: the end-of-sequence token
    that ended generation, if one did."""

    word: str
    reps: int
    template: str
    n_checked: int
    leaves_at: int | None
    diverged: bool
    tokens_until_divergence: int
    passes: int
    generated_ids: list[int] = field(default_factory=list, repr=False)
    stop_token: int | None = None  # the stop token that ended the continuation (not in generated_ids)

    def to_dict(self) -> dict:
        return asdict(self)


def _draft(gen: list[int], unit: list[int], n: int) -> list[int]:
    """The next ``n`` tokens if the model goes on repeating: continue the unit's cycle after a
    word token, restart it after anything else."""
    k = len(unit)
    p = 0
    if gen:
        last = gen[-1]
        p = (unit.index(last) + 1) % k if last in unit else 0
    return [unit[(p + j) % k] for j in range(n)]


def new_cache(model):
    """An empty KV cache that records past states, so that a sliding-window layer beyond its window
    (Gemma-3, Mistral) can still be cut back; None (the model's default cache) where that fails."""
    try:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        if hasattr(cache, "activate_past_recording"):
            _record_past(cache, 0)
        return cache
    except Exception:  # an architecture whose cache cannot be built from its config
        return None


def _record_past(cache, states: int) -> None:
    """Record past states; linear-attention layers also keep their recurrent state after each of a
    pass's last ``states`` positions (the argument exists from transformers 5.25, where leaving it
    out breaks the next pass)."""
    try:
        cache.activate_past_recording(recurrent_states_to_keep=states)
    except TypeError:  # transformers < 5.25
        cache.activate_past_recording()


def keep_for_rollback(past, n: int) -> None:
    """Before a pass whose last ``n`` tokens may be rolled back: a linear-attention layer
    (Qwen3.5's Gated DeltaNet) keeps its recurrent state after each of the pass's last ``n + 1``
    positions (transformers >= 5.25, ``activate_past_recording(recurrent_states_to_keep=...)``), so
    that :func:`rollback` restores the state exactly. Older versions record no recurrent states:
    their linear layers report themselves not croppable and :func:`rollback` declines."""
    if past is not None and hasattr(past, "activate_past_recording"):
        _record_past(past, int(n) + 1)


def rollback(past, n: int):
    """The cache without its last ``n`` tokens, or None where it cannot be put back exactly (the
    recurrent state of linear attention without :func:`keep_for_rollback`, e.g. Qwen3.5's Gated
    DeltaNet before transformers 5.25): the next pass then re-reads the whole sequence."""
    if past is None or not getattr(past, "is_croppable", True):
        return None
    try:
        past.crop(-n)  # negative: remove that many (every transformers version reads it so)
        return past
    except (RuntimeError, IndexError):  # a layer that kept too little history to go back n tokens
        return None


def greedy_check(lm, cases: Sequence[Case], max_new_tokens: int, quiet: bool | None = None,
                 hooks=None, complete: bool = False) -> list[GreedyCheck]:
    """Greedy decoding of ``max_new_tokens`` tokens after each prompt, judged, without decoding token
    by token: the model reads the prompt plus a *draft* (the run continued) in one pass, and every
    draft token that equals that position's argmax is exactly what greedy decoding would produce.
    At the first mismatch the argmax is the true next token; it is kept, the KV cache is cut back
    to the accepted tokens, and a new draft is verified from there. The run judge decides after each
    pass and the check stops once divergence is certain. Passes = departures from the draft + 1, so
    a model that keeps repeating needs one pass where ``generate`` needs ``max_new_tokens`` steps.

    Only prompts that end with the run (templates ``raw``, ``repeat``, ``chat_assistant``) are
    drafted this way. The tokens equal ``run_cases``' greedy tokens up to floating-point near-ties
    between multi-token and one-token cached passes (test: tiny models of every family).

    ``hooks``: a factory of a context manager held open during the check (e.g. a patch).
    ``complete``: do not stop at a certain divergence; decode on from the same KV cache, one token
    per pass without a draft (a draft of the run is rejected at every token past a divergence), until
    ``max_new_tokens`` or a stop token: the whole greedy continuation, without re-reading the prompt."""
    from ..circuit.common import fast_attention
    from ..errors import SinkholeError
    from .diverge import stop_ids, decode_pieces
    from .judge import judge_run

    bad = sorted({c.template for c in cases if not c.run_at_end})
    if bad:
        raise SinkholeError(f"greedy_check needs prompts that end with the run; templates {bad} do not "
                            f"(use {', '.join(RUN_AT_END)})")
    n = int(max_new_tokens)
    if n < 1:
        raise SinkholeError("greedy_check needs max_new_tokens >= 1")
    stops = stop_ids(lm)
    model = lm.model
    # transformers >= 5.2x names the KV cache argument ``cache`` (``past_key_values`` before)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = []
    with fast_attention(lm), torch.no_grad(), (hooks() if hooks is not None else contextlib.nullcontext()):
        for c in progress(cases, desc="greedy check", disable=quiet):
            word = lm.tokenizer.decode(c.unit, skip_special_tokens=True).strip() or c.word
            unit = list(c.unit)
            seq, fed, gen, past, passes, stopped, stop_token = list(c.ids), 0, [], new_cache(model), 0, False, None
            verdict, certain = None, None
            while len(gen) < n and not stopped:
                draft = [] if certain is not None else _draft(gen, unit, n - len(gen))
                inp = seq[fed:] + draft
                keep_for_rollback(past, len(draft))
                kw = {"input_ids": torch.tensor([inp], device=lm.device), "use_cache": True, cache_kw: past}
                keep = len(draft) + 1  # logits of the positions that predict the draft (and one more) only
                try:
                    res = model(**kw, logits_to_keep=keep)
                except TypeError:  # a signature without logits_to_keep
                    res = model(**kw)
                past, passes = getattr(res, "cache", None) or res.past_key_values, passes + 1
                pred = res.logits[0, -keep:].argmax(-1).tolist()  # pred[j] is the argmax where draft[j] stands
                i = 0
                while i < len(draft) and pred[i] == draft[i]:
                    i += 1
                new = draft[:i] + [pred[i]]
                new = new[:n - len(gen)]
                for j, t in enumerate(new):
                    if t in stops:  # generation ends here: stopping is not diverging
                        new, stopped, stop_token = new[:j], True, t
                        break
                gen += new
                rolled = True
                if i < len(draft):  # cut the cache back to the prompt and the accepted draft tokens
                    past = rollback(past, len(draft) - i)
                    rolled = past is not None
                seq += draft[:i]
                if rolled:
                    fed = len(seq)
                else:  # the cache could not be cut back: a new one re-reads the whole sequence
                    past, fed = new_cache(model), 0
                seq += new[i:]  # the mismatching (true) token, fed with the next draft
                if certain is None:
                    verdict = judge_run(decode_pieces(lm, gen), word)
                    if verdict.diverged:
                        if not complete:
                            break
                        certain = verdict  # decided: decode the rest plainly
            verdict = certain or verdict
            run = _draft([], unit, len(gen))
            leaves = next((j for j, t in enumerate(gen) if t != run[j]), None)
            out.append(GreedyCheck(c.word, c.reps, c.template, n, leaves, verdict.diverged,
                                   verdict.tokens_until_divergence if verdict.diverged else len(gen), passes, gen,
                                   stop_token))
    return out
