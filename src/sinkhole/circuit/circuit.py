"""The whole sink circuit of a model in one call.

``discover(lm)`` (fast: a few short forward passes) finds every candidate sink layer and the
causally verified sink neurons of each. ``analyze(lm, ...)`` adds what the ablation does
downstream (norms and attention to position 0 in later layers), whether the sink neurons fire on
long repetitions, the first-token detector, layer-0 convergence and the identity check,
attention-sink metrics, and norm curves with "repeats needed".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..progress import progress
from .attention import attention_sinks, fig1_layers
from .convergence import convergence_curve, identity_check
from .detector import first_token_detector
from .common import text_batch
from .neurons import _norms_and_attention, ablation_effect, rank_and_filter, repetition_firing_layers
from .norms import REPEATS_RULE, norm_curves, repeats_needed
from .sink_layers import find_sink_layers


@dataclass
class Circuit:
    model: str
    sink_layers: list[int]
    main_sink_layer: int
    paper_sink_layer: int | None
    first_token_norm: float  # at the main sink layer (ordinary text, position 0)
    typical_norm: float  # at the main sink layer (mean over positions > 0)
    sink_neurons: list[dict]  # layer, neuron, activation, score, norm_before, norm_after, drop, ...
    layers: dict  # SinkLayers.to_dict()
    neurons: list[dict]  # LayerNeurons.to_dict() per sink layer
    extra: dict = field(default_factory=dict)  # filled by analyze()

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(extra)
        return d


MAIN_RULE = ("main sink layer = the candidate sink layer whose sink neurons (or, when no set collapses the norm, "
             "its strongest candidate), zeroed at position 0 on ordinary text, lower the mean attention mass on "
             "position 0 over all later layers the most; with one candidate (or no measurable effect) the "
             "candidate with the largest first-token norm growth through its block")


def discover(lm, k: int = 8, collapse: float = 0.5, min_gain: float = 0.1, n_texts: int = 8,
             n_tokens: int = 24, attn_texts: int = 4, attn_tokens: int = 16) -> Circuit:
    """Sink layers, causally verified sink neurons, and the main sink layer (seconds on SmolLM2)."""
    sl = find_sink_layers(lm, n_texts=n_texts, n_tokens=n_tokens)
    layers = sl.sink_layers or [sl.main_sink_layer]
    per_layer, flat = [], []
    for L in layers:
        r = rank_and_filter(lm, L, k=k, collapse=collapse, min_gain=min_gain)
        per_layer.append(r.to_dict())
        joint = r.cumulative[len(r.selected) - 1]["norm_after"] if r.selected else None
        by_n = {c["neuron"]: c for c in r.candidates}
        for j in r.selected:
            c = by_n[j]
            flat.append({"layer": int(L), "neuron": int(j), "activation": c["activation"], "score": c["score"],
                         "norm_before": r.norm_before, "norm_after": c["norm_after"], "drop": c["drop"],
                         "joint_norm_after": joint, "joint_drop": 1 - joint / r.norm_before if joint else None})
    # which layer makes the attention sink: ablate each layer's neurons, watch later attention
    abl, effect = [], {}
    n_layers = lm.adapter.n_layers
    batch = text_batch(lm, n=attn_texts, n_tokens=attn_tokens, bos=lm.bos_id is not None)
    control = _norms_and_attention(lm, batch, n_layers - 1)
    for r in per_layer:
        ns = r["selected"] or [r["cumulative"][0]["neurons"][0]]
        e = ablation_effect(lm, r["layer"], ns, batch=batch, control=control)
        d = e.to_dict()
        d["verified"] = bool(r["selected"])
        later = range(r["layer"] + 1, n_layers)
        if len(later):
            d["later_attn_before"] = sum(e.attn_to_first_before[i] for i in later) / len(later)
            d["later_attn_after"] = sum(e.attn_to_first_after[i] for i in later) / len(later)
            effect[r["layer"]] = d["later_attn_before"] - d["later_attn_after"]
        abl.append(d)
    m = sl.main_sink_layer
    if len(layers) > 1 and effect and max(effect.values()) > 0.02:
        m = max(effect, key=lambda i: effect[i])
    c = Circuit(model=getattr(lm, "name", "model"), sink_layers=list(sl.sink_layers), main_sink_layer=int(m),
                paper_sink_layer=sl.paper_layer, first_token_norm=sl.first_token_norm[m],
                typical_norm=sl.typical_norm[m], sink_neurons=flat, layers=sl.to_dict(), neurons=per_layer)
    c.extra = {"ablation": abl, "main_rule": MAIN_RULE}
    return c


def analyze(lm, words: list[str] = ("the", "poem"), n_reps: int = 1000, conv_words: list[str] | None = None,
            conv_reps: int = 500, attn_reps: list[int] = (16, 64, 256), frac: float = 0.5,
            circuit: Circuit | None = None, quiet: bool | None = None) -> Circuit:
    """``discover`` plus every analysis of the paper's sections 3-4 (see the module docstring)."""
    words = list(words)
    c = circuit or discover(lm)
    L = lm.adapter.n_layers
    layers = c.sink_layers or [c.main_sink_layer]
    steps = ["ablation", "firing", "detector", "convergence", "identity", "attention", "norm curves"]
    bar = progress(total=len(steps), desc="circuit", disable=quiet)
    # 1. what each layer's ablation does downstream (measured by discover)
    abl = c.extra.get("ablation", [])
    bar.update(1)
    # 2. do the sink neurons fire on repetitions?
    firing = []
    sel = {r["layer"]: r["selected"] for r in c.neurons if r["selected"]}
    if sel:
        for w in words:
            firing.extend(f.to_dict() for f in repetition_firing_layers(lm, sel, w, n_reps))
    bar.update(1)
    det = first_token_detector(lm).to_dict()
    bar.update(1)
    conv = [convergence_curve(lm, w, conv_reps).to_dict() for w in (conv_words or words)]
    bar.update(1)
    ident = identity_check(lm, words[0]).to_dict()
    bar.update(1)
    att = attention_sinks(lm, words=words[:1], reps=list(attn_reps),
                          map_layers=fig1_layers(lm, c.sink_layers, c.main_sink_layer)).to_dict()
    bar.update(1)
    typical = {i: c.layers["typical_norm"][i] for i in layers}
    curves = norm_curves(lm, words, n_reps, layers, typical=typical, quiet=True)
    needed = [{"word": cv.word, "layer": cv.layer, "frac": frac, "repeats_needed": repeats_needed(cv, frac),
               "repeats_needed_sustained": repeats_needed(cv, frac, window=32),
               "max_norm": max(cv.norm), "first_token_norm": cv.first_token_norm} for cv in curves]
    bar.update(1)
    bar.close()
    c.extra = {
        **c.extra,
        "ablation": abl,
        "repetition_firing": firing,
        "first_token_detector": det,
        "convergence": conv,
        "identity": ident,
        "attention": att,
        "norm_curves": [cv.to_dict() for cv in curves],
        "repeats_needed": needed,
        "repeats_rule": REPEATS_RULE.replace("`frac` (default 0.5)", f"{frac}"),
        "settings": {"words": words, "n_reps": n_reps, "conv_reps": conv_reps, "attn_reps": list(attn_reps),
                     "frac": frac, "n_layers": L},
    }
    return c
