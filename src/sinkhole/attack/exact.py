"""The exact greedy check: greedy decoding verified against drafts of the run, the core of every divergence verdict."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ..decoding.cache import cache_argument, keep_for_rollback, new_cache, rollback
from ..decoding.tokens import decode_pieces, stop_ids
from ..errors import SinkholeError
from ..models.attention import fast_attention
from ..progress import progress
from .judge import judge_run
from .prompts import RUN_AT_END, Case


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
    cache_kw = cache_argument(model)
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
