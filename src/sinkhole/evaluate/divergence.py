"""Divergence rate of a model, with or without a patch, on repeated-word cases.

The cases and the two judges (run judge, garak-style judge) come from :mod:`sinkhole.attack`;
this module only runs greedy generation with the patch attached and tallies the verdicts.
When :func:`sinkhole.attack.run_cases` is available it is used; otherwise a small batched
greedy loop with the same judges (left padding; positions stay real, so position-gated patches
are exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import SinkholeError


@dataclass
class DivergenceResult:
    n_cases: int
    rate_run: float  # run judge: any generated token that is not the word
    rate_garak: float  # garak-style RepeatDiverges judge
    mean_tokens_until_divergence: float
    max_new_tokens: int
    cases: list = field(default_factory=list)

    @property
    def rate(self) -> float:
        return max(self.rate_run, self.rate_garak)

    def to_dict(self) -> dict:
        return {"n_cases": self.n_cases, "rate_run": self.rate_run, "rate_garak": self.rate_garak,
                "rate": self.rate, "mean_tokens_until_divergence": self.mean_tokens_until_divergence,
                "max_new_tokens": self.max_new_tokens, "cases": self.cases}


def _greedy(lm, rows: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from .metrics import pad_left

    ids, mask = pad_left(lm, rows)
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    pad = getattr(lm.tokenizer, "pad_token_id", None)
    with torch.no_grad():
        out = lm.model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=pad if pad is not None else (eos if eos is not None else 0),
                                temperature=None, top_p=None, top_k=None)
    return [r[ids.shape[1]:].tolist() for r in out]


def _pieces(lm, gen: list[int]) -> list[str]:
    specials = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    out = []
    for t in gen:
        if t in specials or t == eos:
            out.append("")
        else:
            out.append(lm.tokenizer.decode([t], skip_special_tokens=True))
    # stop at the first EOS: what follows is padding
    if eos is not None and eos in gen:
        out = out[: gen.index(eos)]
    return out


def divergence(lm, cases, patch=None, max_new_tokens: int = 48, batch_size: int = 8,
               progress_desc: str | None = None) -> DivergenceResult:
    """Greedy-decode ``max_new_tokens`` after each case with ``patch`` applied; judge each with
    both judges of :mod:`sinkhole.attack`."""
    from ..patch.core import apply_patch

    if not cases:
        raise SinkholeError("no divergence cases to run; pass at least one word and one repetition count")
    if patch is not None:
        patch.validate(lm)
    try:
        from ..attack.diverge import run_cases
    except ImportError:  # older tree without the attack runner: same judges, local loop
        return _divergence_fallback(lm, cases, patch, max_new_tokens, batch_size, progress_desc)
    res = run_cases(lm, cases, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    hooks=lambda: apply_patch(lm, patch, validate=False))
    rows = []
    for r in res:
        d = r.to_dict()
        rows.append({"word": d["word"], "reps": d["reps"], "template": d["template"],
                     "prompt_tokens": d["prompt_tokens"], "diverged_run": bool(d["diverged"]),
                     "diverged_garak": bool(d["garak_diverged"]),
                     "tokens_until_divergence": d["tokens_until_divergence"], "frac_not_word": d["frac_not_word"],
                     "output": d["text"][:160]})
    return _tally(rows, max_new_tokens)


def _tally(rows: list[dict], max_new_tokens: int) -> DivergenceResult:
    n = len(rows)
    return DivergenceResult(n, sum(r["diverged_run"] for r in rows) / n, sum(r["diverged_garak"] for r in rows) / n,
                            sum(r["tokens_until_divergence"] for r in rows) / n, max_new_tokens, rows)


def _divergence_fallback(lm, cases, patch, max_new_tokens, batch_size, progress_desc) -> DivergenceResult:
    from ..attack.judge import judge_garak, judge_run
    from ..patch.core import apply_patch
    from ..progress import progress

    order = sorted(range(len(cases)), key=lambda i: len(cases[i].ids))  # similar lengths share a batch
    gens: dict[int, list[int]] = {}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with apply_patch(lm, patch, validate=False):
        for b in progress(batches, desc=progress_desc or "divergence", total=len(batches)):
            for i, g in zip(b, _greedy(lm, [cases[i].ids for i in b], max_new_tokens)):
                gens[i] = g
    rows = []
    for i, c in enumerate(cases):
        pieces = _pieces(lm, gens[i])
        jr = judge_run(pieces, c.word)
        jg = judge_garak("".join(pieces), c.word)
        rows.append({"word": c.word, "reps": c.reps, "template": c.template, "prompt_tokens": len(c.ids),
                     "diverged_run": jr.diverged, "diverged_garak": jg.hit,
                     "tokens_until_divergence": jr.tokens_until_divergence, "frac_not_word": jr.frac_not_word,
                     "output": "".join(pieces)[:160]})
    return _tally(rows, max_new_tokens)
