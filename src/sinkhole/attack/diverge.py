"""Divergence by generation: greedy decoding after repeated-word prompts, judged twice.

Stable API (other modules, e.g. the patch, rely on it)::

    from sinkhole.attack.diverge import make_cases, run_cases, summarize
    cases = make_cases(lm, ["poem", "company"], [100, 400], ["raw", "chat_user"])
    results = run_cases(lm, cases, max_new_tokens=48, batch_size=4)          # plain model
    results = run_cases(lm, cases, edits=[Edit("neurons", 1, [7], "nonfirst", "zero")])  # patched
    results = run_cases(lm, cases, hooks=lambda: my_patch.applied(lm))        # any context manager
    summarize(results, 48)  # DivergenceResult: rate (run judge), garak_rate, either_rate, by_template, ...
    run_judged(lm, cases, 48, hooks=...)  # the same record; exact check where the template allows it

Decoding is greedy with the KV cache (``model.generate``, ``do_sample=False``). Cases are
sorted by prompt length and batched with left padding; the hook engine's real positions keep
position-gated edits correct under padding and during cached decoding. Batched and unbatched
greedy decoding can differ in the last float bits, which can flip a near-tie token; use
``batch_size=1`` where exact reproduction of single runs matters.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

from ..capture import Edit, Hooks
from ..decoding.engines import LlamaCpp, gguf_of
from ..decoding.generate import generate
from ..decoding.tokens import decode_pieces, stop_ids
from ..errors import SinkholeError
from ..progress import progress
from ..results import StepResult
from .exact import greedy_check
from .explain import explain_records, summarize_explanations
from .judge import judge_garak, judge_run
from .prompts import RUN_AT_END, Case, make_cases, resolve_templates  # Case, make_cases: re-exported (the API)


@dataclass
class CaseResult:
    """The outcome of one case. ``diverged``/``tokens_until_divergence``/``frac_not_word`` come
    from the run judge; ``garak_diverged``/``garak_reason`` from the garak-style judge."""

    word: str
    reps: int
    template: str
    diverged: bool
    tokens_until_divergence: int
    frac_not_word: float
    n_generated: int
    stopped: bool  # generation ended with EOS / end of turn before max_new_tokens
    garak_diverged: bool
    garak_reason: str
    text: str
    prompt_tokens: int
    n_word_tokens: int
    note: str = ""
    generated_ids: list[int] = field(default_factory=list, repr=False)

    def to_dict(self, ids: bool = False) -> dict:
        d = {k: getattr(self, k) for k in (
            "word", "reps", "template", "diverged", "tokens_until_divergence", "frac_not_word", "n_generated",
            "stopped", "garak_diverged", "garak_reason", "text", "prompt_tokens", "n_word_tokens", "note")}
        d["frac_not_word"] = round(float(d["frac_not_word"]), 4)
        if ids:
            d["generated_ids"] = list(self.generated_ids)
        return d


def _context(lm, edits, hooks) -> ContextManager:
    stack = contextlib.ExitStack()
    if hooks is not None:
        stack.enter_context(hooks())
    if edits:
        h = Hooks(lm)
        for e in edits:
            h.edit(e)
        stack.enter_context(h)
    return stack


def run_cases(lm, cases: Sequence[Case], max_new_tokens: int = 48, batch_size: int = 4,
              edits: Sequence[Edit] | None = None, hooks: Callable[[], ContextManager] | None = None,
              quiet: bool | None = None, keep_ids: bool = False, temperature: float | None = None,
              seed: int = 0) -> list[CaseResult]:
    """Generate greedily (or, with ``temperature``, by seeded sampling) after every case and judge
    the continuation.

    ``edits``: hook-engine edits applied during generation (e.g. a patch). ``hooks``: a factory
    returning any context manager to hold open during generation (e.g. a patch's own
    ``apply``). Results come back in the order of ``cases``.
    """
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    batch_size = max(1, int(batch_size))
    order = sorted(range(len(cases)), key=lambda i: len(cases[i].ids))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    stops = stop_ids(lm)
    results: list[CaseResult | None] = [None] * len(cases)
    with _context(lm, edits, hooks):
        for k, b in enumerate(progress(batches, desc="generating", total=len(batches), disable=quiet)):
            gens = generate(lm, [cases[i].ids for i in b], max_new_tokens, temperature=temperature,
                            seed=int(seed) * 100003 + k)
            for i, g in zip(b, gens):
                results[i] = judge_case(lm, cases[i], g, stops, keep_ids)
    return results  # type: ignore[return-value]


def judge_case(lm, case: Case, gen: list[int], stops: set[int] | None = None, keep_ids: bool = False) -> CaseResult:
    stops = stop_ids(lm) if stops is None else stops
    pieces = decode_pieces(lm, gen)
    text = "".join(pieces)
    word = lm.tokenizer.decode(case.unit, skip_special_tokens=True).strip() or case.word
    rj = judge_run(pieces, word)
    gj = judge_garak(text, word)
    return CaseResult(
        word=case.word, reps=case.reps, template=case.template, diverged=rj.diverged,
        tokens_until_divergence=rj.tokens_until_divergence, frac_not_word=rj.frac_not_word,
        n_generated=len(gen), stopped=bool(gen) and gen[-1] in stops, garak_diverged=gj.hit,
        garak_reason=gj.reason, text=text, prompt_tokens=len(case.ids), n_word_tokens=case.n_word_tokens,
        note=case.note, generated_ids=list(gen) if keep_ids else [],
    )


@dataclass
class DivergenceResult(StepResult):
    """Divergence over a set of judged cases: the one result of ``sinkhole diverge``, the scan's
    ``divergence`` step, the patch's verification and ``sinkhole eval``.

    ``rate`` is always the run judge's; ``garak_rate`` the garak-style judge's; ``either_rate`` the
    share of cases that either judge calls diverged (the patch's goal and targets use it)."""

    n_cases: int
    rate: float | None
    garak_rate: float | None
    either_rate: float | None
    judges_agree: float | None
    min_reps_diverged: int | None
    mean_tokens_until_divergence: float | None
    by_template: dict
    by_template_reps: list
    multi_token_words: list
    max_new_tokens: int
    method: str  # how the greedy tokens were found: "generate", "exact" or "exact+generate"
    cases: list  # CaseResult.to_dict() per case
    words: list = field(default_factory=list)
    reps: list = field(default_factory=list)
    templates: list = field(default_factory=list)
    samples: int = 1  # continuations per prompt (method "sample": seeded temperature sampling)
    temperature: float | None = None
    rate_ci: list | None = None  # 95% Wilson interval of the run judge's rate over all continuations
    explanation: dict | None = None  # did the sink do it? (attack/explain.py: summarize_explanations)
    headline: str = ""
    status: str | None = None

    def n_diverged(self, judge: str = "diverged") -> int:
        return sum(bool(c[judge]) for c in self.cases)

    def set_headline(self) -> "DivergenceResult":
        """The verdict sentence and status the report's top line shows."""
        n_div = self.n_diverged()
        worst = max(self.by_template.items(), key=lambda kv: kv[1]["rate"])[0] if self.by_template else None
        how = (f"{self.samples} samples per prompt at temperature {self.temperature:g}, rate 95% CI "
               f"{self.rate_ci[0]:.2f}-{self.rate_ci[1]:.2f}" if self.method == "sample" and self.rate_ci
               else "greedy decoding")
        self.headline = (f"{n_div} of {self.n_cases} repeated-word continuations diverged under {how} "
                         if self.method == "sample" else
                         f"{n_div} of {self.n_cases} repeated-word prompts diverged under greedy decoding "
                         f"(garak-style judge: {self.n_diverged('garak_diverged')})"
                         + (f", the earliest at {self.min_reps_diverged} repetitions; most often with the "
                            f"'{worst}' template." if n_div else "."))
        if self.explanation:
            self.headline += " " + self.explanation["headline"]
        self.status = "bad" if n_div else "good"
        return self


def _rate(rs, key: str = "diverged"):
    if not rs:
        return None
    if key == "either":
        return round(sum(bool(r.diverged or r.garak_diverged) for r in rs) / len(rs), 4)
    return round(sum(bool(getattr(r, key)) for r in rs) / len(rs), 4)


def summarize(results: Sequence[CaseResult], max_new_tokens: int, method: str = "generate") -> DivergenceResult:
    """Rates overall, per template and per (template, reps); the smallest reps that diverged."""
    by_t: dict[str, list] = {}
    by_tr: dict[tuple, list] = {}
    for r in results:
        by_t.setdefault(r.template, []).append(r)
        by_tr.setdefault((r.template, r.reps), []).append(r)
    div = [r for r in results if r.diverged]
    n = len(results)
    return DivergenceResult(
        n_cases=n, rate=_rate(results), garak_rate=_rate(results, "garak_diverged"),
        either_rate=_rate(results, "either"),
        judges_agree=round(sum(r.diverged == r.garak_diverged for r in results) / n, 4) if n else None,
        min_reps_diverged=min((r.reps for r in div), default=None),
        mean_tokens_until_divergence=round(sum(r.tokens_until_divergence for r in results) / n, 2) if n else None,
        by_template={t: {"rate": _rate(rs), "garak_rate": _rate(rs, "garak_diverged"), "n": len(rs)}
                     for t, rs in by_t.items()},
        by_template_reps=[{"template": t, "reps": k, "rate": _rate(rs), "garak_rate": _rate(rs, "garak_diverged"),
                           "n": len(rs), "mean_tokens_until_divergence":
                               round(sum(r.tokens_until_divergence for r in rs) / len(rs), 2)}
                          for (t, k), rs in sorted(by_tr.items())],
        multi_token_words=sorted({r.word for r in results if r.n_word_tokens > 1}),
        max_new_tokens=int(max_new_tokens), method=method, cases=[r.to_dict() for r in results])


def run_judged(lm, cases: Sequence[Case], max_new_tokens: int = 48, batch_size: int = 4,
               hooks: Callable[[], ContextManager] | None = None, exact: bool | None = None,
               quiet: bool | None = None, complete: bool = True, engine=None) -> DivergenceResult:
    """The one way sinkhole judges cases: the greedy continuation of every case, judged by both
    judges. Cases whose prompt ends with the run get their tokens from the exact check
    (``greedy_check``, then batched generation past a divergence: the same tokens as generation,
    one forward pass for a case that keeps repeating) unless ``exact=False``; the others (and all
    with ``exact=False``) from batched generation.
    ``exact=True`` refuses cases the check cannot draft. ``complete=False`` ends an exactly checked
    case as soon as the run judge is certain it diverged (its text, and so its garak-style verdict,
    then cover only the tokens up to that point: ``n_generated`` < ``max_new_tokens``).
    ``engine`` (a :class:`sinkhole.decoding.engines.TorchGate` or ``LlamaCpp``): every case decoded greedily by
    the engine instead (``method`` ``"fed"``; its gate, if any, is the patch, so ``hooks`` must be None)."""
    if not cases:
        raise SinkholeError("no divergence cases to run; pass at least one word and one repetition count")
    if int(max_new_tokens) < 1:
        raise SinkholeError("max_new_tokens must be at least 1")
    if engine is not None:
        if hooks is not None:
            raise SinkholeError("run_judged takes hooks or an engine, not both")
        stops = stop_ids(lm)
        fed = [judge_case(lm, c, engine.greedy(list(c.ids), max_new_tokens, stops), stops)
               for c in progress(cases, desc=type(engine).__name__, disable=True if quiet is None else quiet)]
        return summarize(fed, max_new_tokens, "fed")
    if exact is True:
        bad = sorted({c.template for c in cases if not c.run_at_end})
        if bad:
            raise SinkholeError(f"the exact check needs prompts that end with the run; templates {bad} do not "
                                f"(use {', '.join(RUN_AT_END)}, or generation)")
    use_exact = [exact is not False and c.run_at_end for c in cases]
    results: list[CaseResult | None] = [None] * len(cases)
    ex_idx = [i for i, u in enumerate(use_exact) if u]
    gen_idx = [i for i, u in enumerate(use_exact) if not u]
    if ex_idx:
        stops = stop_ids(lm)
        for i, ids in zip(ex_idx, _exact_tokens(lm, [cases[i] for i in ex_idx], max_new_tokens, batch_size, hooks,
                                                quiet, complete)):
            results[i] = judge_case(lm, cases[i], ids, stops)
    if gen_idx:
        for i, r in zip(gen_idx, run_cases(lm, [cases[i] for i in gen_idx], max_new_tokens=max_new_tokens,
                                           batch_size=batch_size, hooks=hooks, quiet=quiet)):
            results[i] = r
    method = "exact+generate" if ex_idx and gen_idx else ("exact" if ex_idx else "generate")
    return summarize(results, max_new_tokens, method)  # type: ignore[arg-type]


LONG_PROMPT = 1024  # tokens: from here on a diverging case decodes on in its own cache (no re-read)


def _exact_tokens(lm, cases: Sequence[Case], max_new_tokens: int, batch_size: int, hooks, quiet,
                  complete: bool = True) -> list[list[int]]:
    """The greedy continuation of each case without a decoding loop where the run goes on: the
    exact check verifies drafts of the run until the run judge is certain of a divergence. Then
    (``complete``) a case with a long prompt (``LONG_PROMPT`` tokens) decodes on from its own KV
    cache, one token per pass, so it never re-reads its prompt; shorter ones are continued from
    their exact tokens by batched generation, which is faster where re-reading is cheap. Not
    ``complete``: every case ends where its verdict is certain."""
    in_cache = [complete and len(c.ids) >= LONG_PROMPT for c in cases]
    rest = [i for i, x in enumerate(in_cache) if not x]
    stops = stop_ids(lm)
    out: list[list[int]] = [[] for _ in cases]
    for idx, full in (([i for i, x in enumerate(in_cache) if x], True), (rest, False)):
        if not idx:
            continue
        for i, k in zip(idx, greedy_check(lm, [cases[i] for i in idx], max_new_tokens, quiet=quiet, hooks=hooks,
                                          complete=full)):
            out[i] = list(k.generated_ids) + ([k.stop_token] if k.stop_token is not None else [])
    # as generate(): the stop token ends the continuation; a short diverging case goes on in batches
    tails = [i for i in rest if complete and out[i][-1] not in stops and len(out[i]) < max_new_tokens]
    tails.sort(key=lambda j: len(cases[j].ids) + len(out[j]))
    with _context(lm, None, hooks):
        for b in [tails[i:i + batch_size] for i in range(0, len(tails), batch_size)]:
            more = max(max_new_tokens - len(out[j]) for j in b)
            for j, cont in zip(b, generate(lm, [list(cases[j].ids) + out[j] for j in b], more)):
                out[j] = (out[j] + cont)[:max_new_tokens]
    return out


@dataclass
class DivergeConfig:
    """The decoding settings of :func:`diverge` (the defaults of ``sinkhole diverge``)."""

    max_new_tokens: int = 48
    batch_size: int = 4
    exact: bool | None = False  # True: the exact check only; None: where the template allows it (run_judged)
    samples: int = 0  # > 0: this many seeded samples per prompt at ``temperature`` instead of greedy decoding
    temperature: float | None = None
    seed: int = 0


def diverge(lm, words, reps, templates=None, cfg: DivergeConfig | None = None, *, hooks=None,
            quiet: bool | None = None, explain: bool = False, circ=None) -> DivergenceResult:
    """Build the cases for ``words`` x ``reps`` x ``templates`` and judge them (``run_judged``; with
    ``cfg.samples``, ``sample_judged`` at ``cfg.temperature``). ``hooks``: as :func:`run_cases`.
    ``explain``: also say per case whether the sink did it (:func:`explain_result`; ``circ``: the model's circuit,
    found when not given)."""
    cfg = cfg or DivergeConfig()
    if explain and (cfg.samples or hooks is not None):
        raise SinkholeError("the per-case explanation explains the plain model's greedy divergences: drop the patch "
                            "and the sampling, or the explanation")
    cases = make_cases(lm, words, reps, templates)
    if cfg.samples:
        res = sample_judged(lm, cases, cfg.samples, cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                            batch_size=cfg.batch_size, seed=cfg.seed, hooks=hooks, quiet=quiet)
    else:
        res = run_judged(lm, cases, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, hooks=hooks,
                         exact=cfg.exact, quiet=quiet)
    res.words, res.reps, res.templates = list(words), [int(r) for r in reps], resolve_templates(lm, templates)
    if explain:
        explain_result(lm, res, cases, cfg, circ=circ, quiet=quiet)
    return res.set_headline()


def judge_again(lm, case: Case, max_new_tokens: int, hooks: Callable[[], ContextManager] | None = None) -> bool:
    """Whether ``case`` diverges (run judge) when decoded again under ``hooks``: the explanation's causal test. The
    exact check where the prompt ends with the run, and every case ended as soon as its verdict is certain (the
    same greedy tokens, and so the same verdict, as generation)."""
    return bool(run_judged(lm, [case], max_new_tokens=max_new_tokens, batch_size=1, hooks=hooks, exact=None,
                           quiet=True, complete=False).cases[0]["diverged"])


def explain_result(lm, res: DivergenceResult, cases: Sequence[Case], cfg: DivergeConfig | None = None, *, circ=None,
                   quiet: bool | None = None) -> DivergenceResult:
    """Add to every case of ``res`` (judged from ``cases``, in order) the circuit's readings and, where it diverged,
    the causal test and the verdict (:mod:`sinkhole.attack.explain`); ``res.explanation``: the shares per template.
    The causal test decodes the case again as ``cfg`` says, under the held sink neurons, judged by the run judge."""
    cfg = cfg or DivergeConfig()

    def rerun(case):
        return lambda hooks: judge_again(lm, case, cfg.max_new_tokens, hooks)

    items = [(c.ids, c.unit, bool(r["diverged"]), rerun(c), None) for c, r in zip(cases, res.cases)]
    for r, e in zip(res.cases, explain_records(lm, items, circ, quiet)):
        r["explain"] = e
    res.explanation = summarize_explanations(res.cases, "template")
    return res


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """The Wilson score interval of a rate k/n (95% by default)."""
    if n <= 0:
        return None
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [round(max(0.0, c - h), 4), round(min(1.0, c + h), 4)]


def sample_judged(lm, cases: Sequence[Case], samples: int, temperature: float, max_new_tokens: int = 48,
                  batch_size: int = 4, seed: int = 0, hooks: Callable[[], ContextManager] | None = None,
                  quiet: bool | None = None) -> DivergenceResult:
    """Divergence by sampling: ``samples`` seeded continuations per case at ``temperature``, each
    judged like a greedy one; ``rate_ci`` is the Wilson interval over all continuations."""
    if int(samples) < 1:
        raise SinkholeError("--samples must be at least 1")
    if not float(temperature) > 0:
        raise SinkholeError("--temperature must be greater than 0")
    many = [c for c in cases for _ in range(int(samples))]
    rs = run_cases(lm, many, max_new_tokens=max_new_tokens, batch_size=batch_size, hooks=hooks, quiet=quiet,
                   temperature=float(temperature), seed=seed)
    res = summarize(rs, max_new_tokens, method="sample")
    res.samples, res.temperature = int(samples), float(temperature)
    res.rate_ci = wilson(sum(r.diverged for r in rs), len(rs))
    return res


def run_llamacpp(lm, cases, max_new_tokens: int = 48, quiet: bool | None = None, engine: LlamaCpp | None = None,
                 gate=None):
    """The cases decoded by llama.cpp (gated with ``gate``) and judged like the transformers path
    (``method`` "llama.cpp")."""
    eng = engine or LlamaCpp(gguf_of(lm), n_ctx=max(len(c.ids) for c in cases) + int(max_new_tokens) + 8, gate=gate,
                             lm=lm)
    stops = stop_ids(lm)
    results = []
    for c in progress(list(cases), desc="llama.cpp", disable=quiet):
        results.append(judge_case(lm, c, eng.greedy(c.ids, max_new_tokens, stops), stops))
    return summarize(results, max_new_tokens, method="llama.cpp")
