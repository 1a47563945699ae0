"""The sink circuit of a model: computed once here, consumed by every other part of sinkhole.

``discover(lm)`` (about a second on SmolLM2: a few short forward passes) finds every candidate
sink layer, the causally verified sink neurons of each, and gives each *role* a layer has in the
circuit its own name, because one model has several layers that matter for different reasons:

``marking_layers``  the early layers that mark the first token (SmolLM2: 1, 2). The patch's
                    fine-tune and neuron caps act here.
``massive_layer``   the layer whose sink neurons create the massive activation later attention
                    parks on (SmolLM2: 11). The paper's neuron patch and the norm curves of
                    Figure 2 use it.
``drift_layer``     the layer at which a repeated run's norm is compared with the first
                    token's (SmolLM2: 2): the sweep, the cluster attack and the predictor
                    measure "repetitions to a sink" there.

Each command that needs a layer takes its role from this object, prints the role and layer it
used, and accepts an explicit override (``Circuit.with_roles``).

The circuit also classifies the model's sink (``sink_kind``, rule in ``SINK_RULE``), because the
paper's mechanism needs one precondition: that *any* token at position 0 becomes a sink.

``any_token``  ordinary text without BOS (a word at position 0) already gets the massive
               first-token norm and the concentrated attention: a long run can look like a first
               token, the paper's mechanism and patch apply (SmolLM2).
``bos_only``   only text that starts with BOS does (Gemma-3-270M): a run of words is never a
               first token, so the mechanism does not apply.
``none``       neither: no massive first-token norm or no concentrated attention on position 0
               (random weights; attention designed not to sink). The roles are then nominal:
               the commands still need a layer, but there is no classical sink to name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import SinkholeError
from ..results import StepResult
from .common import first_layer_over, text_batch
from .neurons import ablation_effect, norms_and_attention, rank_and_filter
from .sink_layers import find_sink_layers

DRIFT_RATIO = 5.0
# a token's state counts as first-token-like (the sink state a long run reaches) when its norm at the drift layer is
# at least this share of the first token's: the sweep's "repetitions to a sink" and the per-case explanation
STATE_RATIO = 0.5
SINK_ATTENTION = 0.3  # mean attention on position 0 that counts as concentrated (Gu et al.'s epsilon)
SINK_KINDS = {
    "any_token": "any token at position 0 becomes a sink",
    "bos_only": "only the BOS token is a sink",
    "none": "no classical sink",
}
SINK_RULE = (f"a setting has a sink when the first token's residual norm reaches at least {DRIFT_RATIO:g}x the typical "
             f"norm at some layer and the attention mass on position 0 (queries > 0, mean over heads and softmax-"
             f"attention layers 1..L-1) is at least {SINK_ATTENTION:g} (uniform attention over the same queries "
             "gives about 0.15); any_token: text whose position 0 is a word has one; bos_only: only text that "
             "starts with BOS has one; none: neither")

ROLE_RULES = {
    "massive_layer": "the candidate sink layer whose sink neurons (or, when no set collapses the norm, its "
                     "strongest candidate), zeroed at position 0 on ordinary text, lower the mean attention mass on "
                     "position 0 over all later layers the most; with one candidate (or no measurable effect) the "
                     "candidate with the largest first-token norm growth through its block",
    "marking_layers": "the candidate sink layers before the massive layer (they mark the first token); the massive "
                      "layer itself when there are none",
    "drift_layer": f"the first layer whose first-token norm is at least {DRIFT_RATIO:g}x the typical norm (mean over "
                   "positions > 0) on ordinary text, else the layer with the largest ratio",
}
ROLE_NAMES = {"massive_layer": "massive layer", "marking_layers": "marking layers", "drift_layer": "drift layer"}


@dataclass
class Circuit(StepResult):
    model: str
    sink_layers: list  # every candidate sink layer (robust rule)
    massive_layer: int
    marking_layers: list
    drift_layer: int
    paper_sink_layer: int | None
    first_token_norm: float  # at the massive layer (ordinary text, position 0)
    typical_norm: float  # at the massive layer (mean over positions > 0)
    sink_neurons: list  # layer, neuron, activation, score, norm_before, norm_after, drop, ...
    layers: dict  # SinkLayers.to_dict()
    neurons: list  # LayerNeurons.to_dict() per sink layer
    ablation: list  # what zeroing each layer's sink neurons does to later layers
    roles: dict  # role -> {"rule": ..., "source": "circuit" | "override"}
    repetition_firing: list = field(default_factory=list)  # filled by the scan's circuit step
    controls: dict = field(default_factory=dict)  # ablation controls and super weights (circuit/controls.py), idem
    sink_kind: str = ""  # any_token | bos_only | none (SINK_KINDS)
    sink_evidence: dict = field(default_factory=dict)  # per setting (bos, no_bos): norm_ratio, layer, attn_first
    headline: str = ""
    status: str | None = None

    @property
    def has_sink(self) -> bool:
        return self.sink_kind != "none"

    def neurons_at(self, layer: int, k: int | None = None) -> list[int]:
        """The verified sink neurons of ``layer`` (strongest first), at most ``k``."""
        ns = [int(s["neuron"]) for s in self.sink_neurons if int(s["layer"]) == int(layer)]
        return ns[:k] if k else ns

    def describe(self, role: str) -> str:
        """'drift layer 2 (circuit)' — what a command prints before it uses a role."""
        v = getattr(self, role)
        src = self.roles.get(role, {}).get("source", "circuit")
        return f"{ROLE_NAMES[role]} {v} ({'set by you' if src == 'override' else 'from the circuit'})"

    def log_line(self) -> str:
        roles = "; ".join(self.describe(r) for r in ROLE_NAMES)
        if self.sink_kind == "none":
            return f"{SINK_KINDS['none']}: nominal roles, {roles}"
        return roles

    def with_roles(self, n_layers: int, **roles) -> "Circuit":
        """A copy with some roles overridden (``None`` keeps the circuit's answer); checked against
        the model's layer count."""
        changes, new_roles = {}, {k: dict(v) for k, v in self.roles.items()}
        for role, v in roles.items():
            if v is None:
                continue
            changes[role] = role_value(role, v, n_layers)
            new_roles[role] = {**new_roles.get(role, {}), "source": "override"}
        return dataclasses.replace(self, roles=new_roles, **changes)


def role_value(role: str, value, n_layers: int):
    """An override of ``role`` checked against the model's layer count: a layer index, or a sorted
    list of them for ``marking_layers``."""
    if role not in ROLE_NAMES:
        raise ValueError(f"unknown circuit role {role!r}")
    vals = [int(x) for x in value] if isinstance(value, (list, tuple)) else [int(value)]
    if not vals or any(not 0 <= x < n_layers for x in vals):
        raise SinkholeError(f"--{role.replace('_', '-')} must be in 0..{n_layers - 1}")
    return sorted(set(vals)) if role == "marking_layers" else vals[0]


def _roles(sink_layers: list[int], massive: int, ratios: list[float]) -> tuple[list[int], int]:
    marking = [i for i in sink_layers if i < massive] or [massive]
    return marking, first_layer_over(ratios, DRIFT_RATIO)


def _setting(first: list, typical: list, attn: list) -> dict:
    ratios = [f / max(t, 1e-12) for f, t in zip(first, typical)]
    i = max(range(len(ratios)), key=ratios.__getitem__)
    a = [x for x in attn[1:] if x is not None] or [x for x in attn if x is not None]
    mass = sum(a) / len(a)
    return {"norm_ratio": round(ratios[i], 3), "layer": int(i), "attn_first": round(mass, 4),
            "sink": bool(ratios[i] >= DRIFT_RATIO and mass >= SINK_ATTENTION)}


def classify_sink(lm, bos_control: tuple | None = None, n_texts: int = 4, n_tokens: int = 16) -> tuple[str, dict]:
    """(sink_kind, evidence per setting) from ordinary text with and without BOS (SINK_RULE).
    ``bos_control``: ``norms_and_attention`` of a with-BOS text batch already run to the last layer."""
    n_layers = lm.adapter.n_layers
    ev = {}
    if lm.bos_id is not None:
        ctl = bos_control or norms_and_attention(lm, text_batch(lm, n=n_texts, n_tokens=n_tokens, bos=True),
                                                 n_layers - 1)
        ev["bos"] = _setting(*ctl)
    ev["no_bos"] = _setting(*norms_and_attention(lm, text_batch(lm, n=n_texts, n_tokens=n_tokens, bos=False),
                                                 n_layers - 1))
    kind = "any_token" if ev["no_bos"]["sink"] else "bos_only" if ev.get("bos", {}).get("sink") else "none"
    return kind, ev


def sink_headline(kind: str, ev: dict) -> str:
    """The report's verdict line for the sink classification (and whether the paper applies)."""
    def says(k):
        e = ev[k]
        return (f"{'with' if k == 'bos' else 'without'} BOS, the first token's norm reaches {e['norm_ratio']:.3g}x the "
                f"typical norm (layer {e['layer']}) and {e['attn_first']:.2f} of attention sits on position 0")
    parts = "; ".join(says(k) for k in ("no_bos", "bos") if k in ev)
    if kind == "any_token":
        return (f"Sink: {SINK_KINDS[kind]} ({parts}): a long run can look like a first token, so the paper's "
                "mechanism and patch apply.")
    if kind == "bos_only":
        return (f"Sink: {SINK_KINDS[kind]} ({parts}): a run of words never becomes a first token, so the paper's "
                "mechanism does not apply; a divergence found here has another cause.")
    return (f"{SINK_KINDS['none'].capitalize()} ({parts}): the paper's mechanism and patch do not apply, and the "
            "circuit's layer roles are nominal.")


def discover(lm, k: int = 8, collapse: float = 0.5, min_gain: float = 0.1, n_texts: int = 8,
             n_tokens: int = 24, attn_texts: int = 4, attn_tokens: int = 16) -> Circuit:
    """Candidate sink layers, causally verified sink neurons, and the circuit's roles."""
    sl = find_sink_layers(lm, n_texts=n_texts, n_tokens=n_tokens)
    layers = sl.sink_layers or [sl.strongest_layer]
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
    control = norms_and_attention(lm, batch, n_layers - 1)
    for r in per_layer:
        ns = r["selected"] or [r["cumulative"][0]["neurons"][0]]
        e = ablation_effect(lm, r["layer"], ns, batch=batch, control=control)
        d = e.to_dict()
        d["verified"] = bool(r["selected"])
        later = lm.adapter.attention_in(range(r["layer"] + 1, n_layers))
        if len(later):
            d["later_attn_before"] = sum(e.attn_to_first_before[i] for i in later) / len(later)
            d["later_attn_after"] = sum(e.attn_to_first_after[i] for i in later) / len(later)
            effect[r["layer"]] = d["later_attn_before"] - d["later_attn_after"]
        abl.append(d)
    m = sl.strongest_layer
    if len(layers) > 1 and effect and max(effect.values()) > 0.02:
        m = max(effect, key=lambda i: effect[i])
    ratios = [f / max(t, 1e-12) for f, t in zip(sl.first_token_norm, sl.typical_norm)]
    marking, drift = _roles(list(sl.sink_layers), int(m), ratios)
    kind, ev = classify_sink(lm, bos_control=control if lm.bos_id is not None else None,
                             n_texts=attn_texts, n_tokens=attn_tokens)
    headline = sink_headline(kind, ev)
    return Circuit(model=getattr(lm, "name", "model"), sink_layers=list(sl.sink_layers), massive_layer=int(m),
                   marking_layers=marking, drift_layer=int(drift), paper_sink_layer=sl.paper_layer,
                   first_token_norm=sl.first_token_norm[m], typical_norm=sl.typical_norm[m], sink_neurons=flat,
                   layers=sl.to_dict(), neurons=per_layer, ablation=abl,
                   roles={r: {"rule": ROLE_RULES[r], "source": "circuit"} for r in ROLE_RULES},
                   sink_kind=kind, sink_evidence={**ev, "rule": SINK_RULE}, headline=headline)
