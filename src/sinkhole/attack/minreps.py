"""Repetitions needed to diverge, measured by behaviour.

For one word and template, :func:`min_reps` finds the smallest repetition count after which greedy
decoding leaves the run (the run judge of :mod:`sinkhole.attack.judge`, on ``max_new_tokens``
tokens found by :func:`sinkhole.attack.exact.greedy_check`, so no decoding loop):

1. **doubling**: ``start``, ``2 start``, ``4 start`` ... up to ``max_reps`` (which is checked last
   when the doubling skips it), until one count diverges;
2. **bisection** between the last count that kept repeating and the first that diverged, until
   the bracket is at most ``resolution`` repetitions wide: ``min_reps`` is the bracket's upper end,
   and the true threshold lies in ``(bracket[0], bracket[1]]``;
3. **monotonicity probes**: bisection assumes that every count above a diverging one diverges too.
   That is checked, not assumed: a few counts above ``min_reps`` (``+resolution``, x1.5, x2, x4,
   within ``max_reps``) are run as well, and every one that does *not* diverge is listed in
   ``not_diverged_above``; ``monotone`` is False when there is any.

A word that never diverges up to ``max_reps`` has ``min_reps`` None. A word that already diverges
at the first count tried never repeated in this template at all (``repeated_below`` False: the
model answers something else rather than leaving a run it was following); it is reported apart
and left out of the rank correlation, which is about *when* a followed run breaks. Each result
records every count it checked, so the search can be audited (``checks``).

:func:`min_reps_table` runs the search for several words and puts it beside the norm-based
"repetitions to a sink" of the vocabulary sweep (:func:`sinkhole.attack.sweep.sweep_tokens`, at the
circuit's drift layer, same ``Repeat:`` prefix) with their Spearman rank correlation, like the
paper's Table 1.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from ..circuit.common import average_ranks
from ..data import corpus_words
from ..errors import SinkholeError
from ..progress import progress
from ..results import StepResult
from .exact import greedy_check
from .prompts import RUN_AT_END, Case, build_ids, parse_words
from .sweep import SweepConfig, sweep_tokens

PROBE_FACTORS = (1.5, 2.0, 4.0)


@dataclass
class MinReps:
    word: str
    template: str
    min_reps: int | None  # smallest count found to diverge (upper end of the bracket); None: none up to max_reps
    bracket: list | None  # [last count that kept repeating (0: none checked below), first that diverged]
    resolution: int
    max_reps: int
    monotone: bool
    not_diverged_above: list  # probed counts above min_reps that did not diverge
    n_checks: int
    checks: list  # {"reps", "diverged", "leaves_at"} per checked count, in the order checked
    n_tokens_per_word: int = 1
    reps_to_sink: int | None = None  # the sweep's norm-based count (single-token words; None otherwise or never)
    repeated_below: bool = True  # some count below min_reps kept repeating (False: diverged at the first count)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class MinRepsResult(StepResult):
    """The minimum-repetition search over several words (``sinkhole minreps``, the
    scan's ``min_reps`` step)."""

    config: dict  # template, start, max_reps, resolution, max_new_tokens, judge, drift_layer
    words: list  # MinReps.to_dict() per word
    n_checks: int
    checks_per_word: float
    n_diverged: int
    n_non_monotone: int
    spearman: dict | None  # {"rho", "n"}: min_reps vs reps_to_sink over one-token words that repeated first
    n_at_once: int = 0  # words that diverged at the first count tried (never followed the run)
    headline: str = ""
    status: str | None = None


def _longest_fitting(lm, word: str, template: str, max_reps: int, max_new_tokens: int = 16) -> int:
    """The most repetitions whose prompt and continuation fit the model's context."""
    if not lm.n_ctx:
        return max_reps
    unit = lm.word_ids(word)
    overhead = len(build_ids(lm, word, 1, template, unit)) - len(unit)
    room = (lm.n_ctx - max(16, int(max_new_tokens) + 1) - overhead) // len(unit)
    return max(1, min(max_reps, room))


def min_reps(lm, word: str, template: str = "repeat", start: int = 8, max_reps: int = 2048, resolution: int = 4,
             max_new_tokens: int = 32, hooks=None) -> MinReps:
    """The smallest repetition count of ``word`` (in ``template``) whose greedy continuation
    diverges, by doubling then bisection, with monotonicity probes (module docstring)."""
    if template not in RUN_AT_END:
        raise SinkholeError(f"the minimum-repetition search needs a template that ends with the run "
                            f"({', '.join(RUN_AT_END)}), not {template!r}")
    if start < 1 or resolution < 1:
        raise SinkholeError("--start-reps and --resolution must be positive integers")
    if max_reps < start:
        raise SinkholeError(f"--max-reps ({max_reps}) must be at least --start-reps ({start})")
    unit = lm.word_ids(word)
    top = _longest_fitting(lm, word, template, max_reps, max_new_tokens)
    seen: dict[int, dict] = {}
    order: list[dict] = []

    def check(n: int) -> bool:
        if n not in seen:
            case = Case(word, n, template, build_ids(lm, word, n, template, unit), unit)
            g = greedy_check(lm, [case], max_new_tokens, quiet=True, hooks=hooks)[0]
            seen[n] = {"reps": n, "diverged": bool(g.diverged), "leaves_at": g.leaves_at}
            order.append(seen[n])
        return seen[n]["diverged"]

    lo, hi, n = 0, None, min(start, top)
    while True:
        if check(n):
            hi = n
            break
        lo = n
        if n >= top:
            break
        n = min(n * 2, top)
    if hi is None:
        return MinReps(word, template, None, None, int(resolution), int(top), True, [], len(order), order, len(unit))
    while hi - lo > resolution:
        mid = (lo + hi) // 2
        if check(mid):
            hi = mid
        else:
            lo = mid
    probes = sorted({min(hi + resolution, top)} | {min(int(math.ceil(hi * f)), top) for f in PROBE_FACTORS})
    bad = [p for p in probes if p > hi and not check(p)]
    # counts checked above hi during the search itself that kept repeating (possible only when not monotone)
    bad = sorted(set(bad) | {c["reps"] for c in order if c["reps"] > hi and not c["diverged"]})
    return MinReps(word, template, int(hi), [int(lo), int(hi)], int(resolution), int(top), not bad, bad, len(order),
                   order, len(unit), repeated_below=any(not c["diverged"] and c["reps"] < hi for c in order))


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Spearman's rank correlation (average ranks for ties); None with fewer than 3 pairs or a
    constant side."""
    import torch

    if len(xs) < 3:
        return None
    rx = average_ranks(torch.tensor(list(xs), dtype=torch.float64))
    ry = average_ranks(torch.tensor(list(ys), dtype=torch.float64))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    vx, vy = float((rx * rx).sum()), float((ry * ry).sum())
    if vx == 0 or vy == 0:
        return None
    return float((rx * ry).sum()) / math.sqrt(vx * vy)


@dataclass
class MinRepsConfig:
    """The settings of :func:`min_reps_table` (the defaults of :func:`min_reps`)."""

    template: str = "repeat"  # one template that ends with the run (RUN_AT_END)
    start: int = 8  # first count of the doubling
    max_reps: int = 2048
    resolution: int = 4  # bisection stops at a bracket this wide
    max_new_tokens: int = 32
    drift_layer: int | None = None  # for the norm-based count; None: the circuit's (circuit.discover)
    norm_based: bool = True  # also the sweep's norm-based repetitions to a sink and the rank correlation


def min_reps_table(lm, words: Sequence[str], cfg: MinRepsConfig | None = None, *,
                   quiet: bool | None = None) -> MinRepsResult:
    """:func:`min_reps` for every word, beside the sweep's norm-based repetitions to a sink."""
    cfg = cfg or MinRepsConfig()
    drift_layer = cfg.drift_layer  # the sweep's answer replaces None
    words = parse_words(words)
    rows = [min_reps(lm, w, cfg.template, cfg.start, cfg.max_reps, cfg.resolution, cfg.max_new_tokens)
            for w in progress(words, desc="min reps", disable=quiet)]
    if cfg.norm_based:
        single = {r.word: lm.word_ids(r.word)[0] for r in rows if r.n_tokens_per_word == 1}
        if single:
            top = max(r.max_reps for r in rows)
            if lm.n_ctx:
                top = min(top, lm.n_ctx - 16)
            sw = sweep_tokens(lm, sorted(set(single.values())),
                              SweepConfig(drift_layer=drift_layer, max_reps=max(top, 9), batch_size=4), quiet=True)
            drift_layer = sw["config"]["drift_layer"]
            for r in rows:
                if r.word in single:
                    r.reps_to_sink = sw["records"][str(single[r.word])]["reps_to_sink"]
    both = [r for r in rows if r.n_tokens_per_word == 1 and (r.min_reps is None or r.repeated_below)] \
        if cfg.norm_based else []
    rho = None
    if both:
        never_b = max(r.max_reps for r in both) + 1  # "never within max_reps" ranks above every count
        rho_v = spearman([r.min_reps if r.min_reps is not None else never_b for r in both],
                         [r.reps_to_sink if r.reps_to_sink is not None else never_b for r in both])
        rho = {"rho": None if rho_v is None else round(rho_v, 4), "n": len(both)}
    n_checks = sum(r.n_checks for r in rows)
    n_div = sum(r.min_reps is not None for r in rows)
    at_once = [r.word for r in rows if r.min_reps is not None and not r.repeated_below]
    non_mono = [r.word for r in rows if not r.monotone]
    res = MinRepsResult(
        config={"template": cfg.template, "start": int(cfg.start), "max_reps": int(cfg.max_reps),
                "resolution": int(cfg.resolution), "max_new_tokens": int(cfg.max_new_tokens),
                "judge": "run judge (greedy_check)", "drift_layer": drift_layer, "probe_factors": list(PROBE_FACTORS)},
        words=[r.to_dict() for r in rows], n_checks=n_checks, checks_per_word=round(n_checks / max(len(rows), 1), 2),
        n_diverged=n_div, n_non_monotone=len(non_mono), spearman=rho, n_at_once=len(at_once))
    found = sorted((r.min_reps, r.word) for r in rows if r.min_reps is not None and r.repeated_below)
    res.headline = (f"{n_div} of {len(rows)} words diverge within {cfg.max_reps} repetitions "
                    f"('{cfg.template}' template)"
                    + (f"; {len(at_once)} at the first count tried ({cfg.start}), never following the run" if at_once
                       else "")
                    + (f"; of the runs the model followed, the first broke after {found[0][0]} repetitions "
                       f"({found[0][1]!r}), the median after {found[len(found) // 2][0]}" if found else "")
                    + (f"; not monotone in the count for {', '.join(non_mono)}" if non_mono else "") + ".")
    res.status = "bad" if n_div else "good"
    return res


def default_words(lm, n: int = 30) -> list[str]:
    """``n`` frequent words of the shipped texts (3+ letters) that are one token each."""
    out = []
    for w in corpus_words("sonnets", 400):
        if len(lm.word_ids(w)) == 1:
            out.append(w)
        if len(out) == n:
            break
    return out


__all__ = ["MinReps", "MinRepsConfig", "MinRepsResult", "default_words", "min_reps", "min_reps_table", "spearman"]
