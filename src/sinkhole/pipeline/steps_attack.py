"""Scan steps of the attack module (divergence, vocabulary sweep, cluster attack) and their
result types.

Defaults are small so that a whole scan stays within minutes on a CPU (``ScanOptions`` holds them
and their --quick values); the CLI commands ``sinkhole diverge``, ``sinkhole sweep`` and
``sinkhole cluster`` run larger versions.
"""

from __future__ import annotations

from ..attack.cluster import ClusterConfig, ClusterResult, cluster_attack
from ..attack.diverge import DivergeConfig, DivergenceResult, diverge
from ..attack.memorization import memorization_check
from ..attack.minreps import MinRepsConfig, default_words, min_reps_table
from ..attack.prompts import has_chat_template
from ..attack.sweep import SweepConfig, SweepSummary, frequent_tokens, summarize, sweep_tokens
from ..errors import SinkholeError
from .engine import Context


def divergence_step(ctx: Context) -> DivergenceResult:
    lm, o = ctx.lm, ctx.options
    words = list(o.words)[:2]
    reps = list(o.diverge_reps)
    longest = max(len(lm.word_ids(w)) for w in words)
    if lm.n_ctx:
        reps = [r for r in reps if r * longest + 64 < lm.n_ctx] or [max(1, (lm.n_ctx - 64) // longest)]
    templates = ["raw", "repeat", "garak_this"] + (["chat_user"] if has_chat_template(lm) else [])
    res = diverge(lm, words, reps, templates, DivergeConfig(max_new_tokens=o.diverge_tokens, batch_size=4),
                  explain=bool(o.explain), circ=ctx.circuit if o.explain else None)
    return res


def memorization_step(ctx: Context):
    """The divergence step's divergent continuations checked against the shipped texts (the
    reference corpus sinkhole has; near zero is the expected answer), beside ordinary prompts."""
    from importlib.resources import files

    div = ctx.results.get("divergence")
    if div is None:
        raise SinkholeError("the memorization step needs the divergence step")
    return memorization_check(ctx.lm, div, str(files("sinkhole.data")), n_control=8 if ctx.options.quick else 16,
                              quiet=True)


def min_reps_step(ctx: Context):
    """The behavioural repetitions-to-diverge search for a few words, beside the sweep's norm-based count."""
    lm, o = ctx.lm, ctx.options
    words = list(dict.fromkeys(list(o.words) + default_words(lm, int(o.min_reps_words))))[:int(o.min_reps_words)]
    return min_reps_table(lm, words, MinRepsConfig(max_reps=int(o.min_reps_max), max_new_tokens=32,
                                                   drift_layer=ctx.circuit.drift_layer), quiet=True)


def sweep_step(ctx: Context) -> SweepSummary:
    lm, o = ctx.lm, ctx.options
    max_reps = o.sweep_reps
    if lm.n_ctx:
        max_reps = min(max_reps, lm.n_ctx - 16)
    res = sweep_tokens(lm, frequent_tokens(lm, o.sweep_tokens),
                       SweepConfig(drift_layer=ctx.circuit.drift_layer, max_reps=max_reps, batch_size=16))
    return SweepSummary.from_dict(summarize(res, top=20))


def cluster_step(ctx: Context) -> ClusterResult:
    lm, o = ctx.lm, ctx.options
    length = o.cluster_length
    if lm.n_ctx:
        length = min(length, lm.n_ctx - 64)
    res = cluster_attack(lm, ClusterConfig(pool_size=300 if o.quick else 500, n_seeds=4 if o.quick else 6, size=8,
                                           length=length, drift_layer=ctx.circuit.drift_layer, n_examples=2,
                                           max_new_tokens=16 if o.quick else 24, seed=int(o.seed)))
    for r in res["rows"]:
        r.pop("token_ids", None)
    return ClusterResult.from_dict(res)
