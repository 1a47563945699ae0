"""Scan steps of the sink-circuit analyses (registered after ``sinkhole.scan_steps``).

``circuit`` runs first so that later steps (and ``main_sink_layer``) use its main sink layer.
This module also re-registers ``norm_curves`` so that it runs after ``circuit`` (the
``@step`` registry moves a re-registered name to the end) and adds curves at every sink layer
plus the "repeats needed" of each word; the output keeps the foundation's shape
(``layer``, ``curves``).
"""

from __future__ import annotations

from ..scan import Context, main_sink_layer, step
from .attention import attention_sinks, fig1_layers
from .circuit import discover
from .convergence import convergence_curve, identity_check
from .detector import first_token_detector
from .neurons import repetition_firing_layers
from .norms import REPEATS_RULE, norm_curves, repeats_needed


def _words(ctx: Context) -> list[str]:
    return list(ctx.options.get("curve_words") or ctx.options.get("words") or ["the"])


@step("circuit", "sink layers and causally verified sink neurons")
def _circuit(ctx: Context) -> dict:
    c = discover(ctx.lm)
    d = c.to_dict()
    reps = int(ctx.options.get("curve_reps", 1000))
    sel = {r["layer"]: r["selected"] for r in c.neurons if r["selected"]}
    d["repetition_firing"] = []
    if sel:
        for w in _words(ctx):
            d["repetition_firing"] += [f.to_dict() for f in repetition_firing_layers(ctx.lm, sel, w, reps)]
    return d


@step("first_token_detector", "first-token detector neuron and direction (Figure 4)")
def _detector(ctx: Context) -> dict:
    return first_token_detector(ctx.lm).to_dict()


@step("convergence", "layer-0 convergence of repeated tokens to a first token (Figure 5, Theorem 4.1)")
def _convergence(ctx: Context) -> dict:
    words = _words(ctx)
    reps = min(500, int(ctx.options.get("curve_reps", 1000)))
    return {"curves": [convergence_curve(ctx.lm, w, reps).to_dict() for w in words],
            "identity": identity_check(ctx.lm, words[0]).to_dict()}


@step("attention_sinks", "attention mass on position 0, sink rate, attention maps (Figure 1)")
def _attention(ctx: Context) -> dict:
    sink_layers = ctx.get("circuit", "sink_layers") or []
    main = main_sink_layer(ctx)
    counts = (16, 64) if ctx.options.get("quick") else (16, 64, 256)
    reps = [n for n in counts if n <= int(ctx.options.get("curve_reps", 1000))] or [16]
    return attention_sinks(ctx.lm, words=_words(ctx)[:1], reps=reps,
                           map_layers=fig1_layers(ctx.lm, sink_layers, main)).to_dict()


@step("norm_curves", "norm vs repetitions at the sink layers, repeats needed (Figure 2, Table 1)")
def _norm_curves(ctx: Context) -> dict:
    main = main_sink_layer(ctx)
    layers = sorted(set((ctx.get("circuit", "sink_layers") or []) + [main]))
    typical_all = ctx.get("layer_norms", "typical_norm") or ctx.get("circuit", "layers", {}).get("typical_norm")
    typical = {i: typical_all[i] for i in layers} if typical_all else None
    curves = norm_curves(ctx.lm, _words(ctx), int(ctx.options.get("curve_reps", 1000)), layers, typical=typical,
                         quiet=True)
    frac = float(ctx.options.get("frac", 0.5))
    return {
        "layer": main,
        "layers": layers,
        "curves": [c.to_dict() for c in curves if c.layer == main],
        "all_curves": [c.to_dict() for c in curves],
        "repeats_needed": [{"word": c.word, "layer": c.layer, "frac": frac, "repeats_needed": repeats_needed(c, frac),
                            "repeats_needed_sustained": repeats_needed(c, frac, window=32),
                            "max_norm": max(c.norm), "first_token_norm": c.first_token_norm} for c in curves],
        "repeats_rule": REPEATS_RULE,
    }
