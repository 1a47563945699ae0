"""Scan steps of the sink-circuit analyses, and their result types.

``sinkhole circuit`` runs these same steps (``registry.CIRCUIT_STEPS``) through the same
pipeline, so its JSON is a results document that ``sinkhole report`` renders.
"""

from __future__ import annotations

from ..circuit.attention import AttentionSinks, attention_sinks, fig1_layers
from ..circuit.circuit import Circuit
from ..circuit.controls import circuit_controls
from ..circuit.convergence import ConvergenceResult, convergence_curve, identity_check
from ..circuit.detector import FirstTokenDetector, first_token_detector
from ..circuit.neurons import repetition_firing_layers
from ..circuit.norms import REPEATS_RULE, NormCurves, norm_curves, repeats_needed
from .engine import Context, find_circuit


def circuit_step(ctx: Context) -> Circuit:
    c = find_circuit(ctx.lm, ctx.options)
    sel = {r["layer"]: r["selected"] for r in c.neurons if r["selected"]}
    if sel and ctx.options.firing:
        c.controls = circuit_controls(ctx.lm, sel)
        for w in ctx.options.words:
            c.repetition_firing += [f.to_dict() for f in repetition_firing_layers(ctx.lm, sel, w,
                                                                                   ctx.options.curve_reps)]
    return c


def detector_step(ctx: Context) -> FirstTokenDetector:
    return first_token_detector(ctx.lm)


def convergence_step(ctx: Context) -> ConvergenceResult:
    words = ctx.options.words
    return ConvergenceResult(curves=[convergence_curve(ctx.lm, w, ctx.options.conv_reps).to_dict() for w in words],
                             identity=identity_check(ctx.lm, words[0]).to_dict())


def attention_step(ctx: Context) -> AttentionSinks:
    c = ctx.circuit
    return attention_sinks(ctx.lm, words=ctx.options.words[:1], reps=list(ctx.options.attn_reps),
                           map_layers=fig1_layers(ctx.lm, c.sink_layers, c.massive_layer))


def norm_curves_step(ctx: Context) -> NormCurves:
    c = ctx.circuit
    main = c.massive_layer
    layers = sorted(set(c.sink_layers) | {main})
    ln = ctx.results.get("layer_norms")
    typical_all = ln.typical_norm if ln is not None else c.layers.get("typical_norm")
    typical = {i: typical_all[i] for i in layers} if typical_all else None
    curves = norm_curves(ctx.lm, ctx.options.words, ctx.options.curve_reps, layers, typical=typical, quiet=True)
    frac = float(ctx.options.frac)
    res = NormCurves(
        layer=main, layers=layers, curves=[cv.to_dict() for cv in curves if cv.layer == main],
        all_curves=[cv.to_dict() for cv in curves],
        repeats_needed=[{"word": cv.word, "layer": cv.layer, "frac": frac, "repeats_needed": repeats_needed(cv, frac),
                         "repeats_needed_sustained": repeats_needed(cv, frac, window=32),
                         "max_norm": max(cv.norm), "first_token_norm": cv.first_token_norm} for cv in curves],
        repeats_rule=REPEATS_RULE.replace("`frac` (default 0.5)", f"{frac:g}"))
    res.headline = runs_reach_sink_headline(res.repeats_needed, main, frac, int(ctx.options.curve_reps))
    return res


def runs_reach_sink_headline(rows: list, layer: int, frac: float, reps: int) -> str:
    """Whether a long run reaches the sink state at the massive layer, for the verdict box."""
    at = [r for r in rows if r["layer"] == layer]
    hit = sorted((r["repeats_needed_sustained"] or r["repeats_needed"], r["word"]) for r in at
                 if (r["repeats_needed_sustained"] or r["repeats_needed"]) is not None)
    if hit:
        n, w = hit[0]
        return (f"Long runs reach the sink state: a run of '{w}' reaches {frac:g} of the first token's norm at the "
                f"massive layer {layer} after {n} repetitions ({len(hit)} of {len(at)} words within {reps}).")
    best = max(at, key=lambda r: r["max_norm"] / max(r["first_token_norm"], 1e-12)) if at else None
    tail = (f" (at most {best['max_norm'] / max(best['first_token_norm'], 1e-12):.2f} of it, '{best['word']}')"
            if best else "")
    return (f"Long runs do not reach the sink state: no run of {', '.join(repr(r['word']) for r in at)} reaches "
            f"{frac:g} of the first token's norm at the massive layer {layer} within {reps} repetitions{tail}.")
