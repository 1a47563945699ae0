"""The foundation's scan steps: model metadata, norms on text, the Figure-2 norm curve."""

from __future__ import annotations

import torch

from .circuit.norms import layer_norms, norm_curve
from .scan import Context, main_sink_layer, step


@step("model", "model metadata")
def _model(ctx: Context) -> dict:
    meta = ctx.lm.metadata()
    meta.pop("gguf", None)  # machine-specific paths stay out of results.json
    return meta


@step("layer_norms", "first-token vs typical hidden-state norm per layer")
def _layer_norms(ctx: Context) -> dict:
    return layer_norms(ctx.lm).to_dict()


@step("norm_curves", "norm vs repetitions at the sink layer (Figure 2)")
def _norm_curves(ctx: Context) -> dict:
    layer = main_sink_layer(ctx)
    typical = ctx.get("layer_norms", "typical_norm")[layer]
    curves = []
    for w in ctx.options.get("curve_words", ["the"]):
        with torch.no_grad():
            curves.append(norm_curve(ctx.lm, w, int(ctx.options.get("curve_reps", 1000)), layer, typical).to_dict())
    return {"layer": layer, "curves": curves}
