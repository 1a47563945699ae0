"""Scan steps of the attack module: divergence by generation, vocabulary sweep, cluster attack.

Defaults are small so that a whole scan stays within minutes on a CPU; the CLI commands
``sinkhole diverge``, ``sinkhole sweep`` and ``sinkhole cluster`` run larger versions.
"""

from __future__ import annotations

from ..scan import Context, main_sink_layer, step


def _quick(ctx: Context) -> bool:
    return bool(ctx.options.get("quick"))


@step("divergence", "divergence by greedy generation (run judge and garak-style judge)")
def _divergence(ctx: Context) -> dict:
    from .diverge import diverge
    from .prompts import has_chat_template

    lm = ctx.lm
    words = list(ctx.options.get("words") or ["the", "poem"])[:2]
    reps = ctx.options.get("diverge_reps") or ([200] if _quick(ctx) else [100, 400])
    longest = max(len(lm.word_ids(w)) for w in words)
    if lm.n_ctx:
        reps = [r for r in reps if r * longest + 64 < lm.n_ctx] or [max(1, (lm.n_ctx - 64) // longest)]
    templates = ["raw", "repeat", "garak_this"] + (["chat_user"] if has_chat_template(lm) else [])
    n_new = int(ctx.options.get("diverge_tokens", 12 if _quick(ctx) else 16))
    res = diverge(lm, words, reps, templates, max_new_tokens=n_new, batch_size=4)
    res["words"], res["reps"], res["templates"] = words, list(reps), templates
    n_div = sum(c["diverged"] for c in res["cases"])
    worst = max(res["by_template"].items(), key=lambda kv: kv[1]["rate"])[0] if res["by_template"] else None
    res["headline"] = (f"{n_div} of {res['n_cases']} repeated-word prompts diverged under greedy decoding "
                       f"(garak-style judge: {sum(c['garak_diverged'] for c in res['cases'])})"
                       + (f", the earliest at {res['min_reps_diverged']} repetitions; most often with the "
                          f"'{worst}' template." if n_div else "."))
    res["status"] = "bad" if n_div else "good"
    return res


@step("sweep", "vocabulary sweep: repetitions needed to induce a sink (generation-free)")
def _sweep(ctx: Context) -> dict:
    from .sweep import frequent_tokens, summarize, sweep_tokens

    lm = ctx.lm
    n = int(ctx.options.get("sweep_tokens", 48 if _quick(ctx) else 128))
    max_reps = int(ctx.options.get("sweep_reps", 128 if _quick(ctx) else 256))
    if lm.n_ctx:
        max_reps = min(max_reps, lm.n_ctx - 16)
    res = sweep_tokens(lm, frequent_tokens(lm, n), sink_layer=main_sink_layer(ctx), max_reps=max_reps,
                       batch_size=16)
    return summarize(res, top=20)


@step("cluster", "cluster attack: non-repeating sequences that induce a sink")
def _cluster(ctx: Context) -> dict:
    from .cluster import cluster_attack

    lm = ctx.lm
    length = int(ctx.options.get("cluster_length", 128 if _quick(ctx) else 256))
    if lm.n_ctx:
        length = min(length, lm.n_ctx - 64)
    res = cluster_attack(lm, pool_size=300 if _quick(ctx) else 500, n_seeds=4 if _quick(ctx) else 6, size=8,
                         length=length, sink_layer=main_sink_layer(ctx), n_examples=2,
                         max_new_tokens=16 if _quick(ctx) else 24, seed=int(ctx.options.get("seed", 0)))
    for r in res["rows"]:
        r.pop("token_ids", None)
    return res
