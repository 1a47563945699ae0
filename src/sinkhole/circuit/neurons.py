"""Sink neurons: rank each sink layer's MLP neurons by their write into the first token, keep
only those whose ablation at position 0 collapses the first token's norm, then measure what
the ablation does downstream and whether the neurons also fire on long repetitions.

* **score** of neuron j at layer L = ``|act_j(pos 0)| * ||W_out[:, j]||`` (the norm of its
  write into the residual stream of the first token; the paper's ``||MLP_j(BoS)||``).
* **causal filter**: zero each of the top ``k`` candidates at position 0 alone and measure the
  first token's ``resid_post`` norm at L. Candidates are sorted by that effect and added one by
  one while each addition lowers the joint-ablation norm by at least ``min_gain`` (0.1) of the
  original norm; that prefix is the layer's sink-neuron set when its joint ablation brings the
  norm to at most ``collapse`` (0.5) of its value. A layer where it does not gets no sink
  neurons (and says so in ``collapsed``).
* The probe is the first token alone (BOS, or the first text token for a model without BOS):
  position 0 only sees itself, so one token gives exactly its value in any text.
* **fires on repetition**: for ``BOS w w ... w`` a neuron fires at repetition n when its
  activation reaches ``fire_frac`` (0.5) of its first-token activation, with the same sign.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..capture import READ_SITES, Edit, Hooks
from ..models.attention import fast_attention
from .common import norm_reduce, text_batch
from .norms import repeat_ids


@dataclass
class LayerNeurons:
    layer: int
    candidates: list[dict]  # neuron, activation, score, norm_after (alone), drop (alone)
    norm_before: float  # first-token resid_post norm at this layer
    cumulative: list[dict]  # n, neurons, norm_after, drop (joint ablation of the first n)
    selected: list[int]
    collapsed: bool

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AblationEffect:
    """Joint ablation of a layer's sink neurons at position 0, on ordinary text."""

    layer: int
    neurons: list[int]
    first_norm_before: list[float]  # per layer (0..last) at position 0
    first_norm_after: list[float]
    typical_norm_before: list[float]
    typical_norm_after: list[float]
    attn_to_first_before: list  # per layer: mean attention mass on position 0 (queries > 0); None at a
    attn_to_first_after: list  # hybrid's linear-attention layers

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RepetitionFiring:
    word: str
    layer: int
    n_reps: int
    neurons: list[int]
    first_activation: list[float]  # at position 0 of the same input
    reps: list[int]  # sampled repetition counts
    activation: list[list[float]]  # [neuron][sample]
    fires_at: list[int | None]  # first repetition count where the neuron fires
    max_ratio: list[float]  # max over repetitions of act / first-token act
    repeat_top: list[int]  # top neurons by score at the last repeated token (the notebook's ranking)

    def to_dict(self) -> dict:
        return asdict(self)


def _w_norm(lm, layer: int) -> torch.Tensor:
    return lm.adapter.w_out(layer).detach().float().norm(dim=0)  # (d_mlp,)


def _per_row_zero(neuron_sets: list[list[int]]):
    """An Edit fn zeroing, in row b, the neurons ``neuron_sets[b]`` (row count = len(sets))."""

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        for b, ns in enumerate(neuron_sets):
            if ns:
                x[b, ..., ns] = 0
        return x

    return fn


def _first_norm_under_ablations(lm, ids_row: torch.Tensor, layer: int, sets: list[list[int]]) -> list[float]:
    """Norm of resid_post[layer] at position 0 for each neuron set zeroed at position 0 (batched)."""
    ids = ids_row.expand(len(sets), -1)
    h = Hooks(lm)
    h.edit(Edit("neurons", layer, positions="first", op="fn", fn=_per_row_zero(sets)))
    h.read("resid_post", layer, reduce=lambda x, p: x.detach().float()[:, 0].norm(dim=-1))
    h.stop_after(layer)
    with torch.no_grad(), fast_attention(lm), h:
        h.forward(ids, use_cache=False)
    return [float(v) for v in h.cache[f"resid_post.{layer}"]]


def rank_and_filter(lm, layer: int, k: int = 8, collapse: float = 0.5, min_gain: float = 0.1,
                    probe: torch.Tensor | None = None) -> LayerNeurons:
    """Top-k neurons of ``layer`` by first-token write, filtered by ablation (module docstring)."""
    probe = probe if probe is not None else text_batch(lm, n=1, n_tokens=4, bos=lm.bos_id is not None)
    probe = probe[:1, :1]
    h = Hooks(lm)
    h.read("neurons", layer, reduce=lambda x, p: x.detach().float()[:, 0])
    h.stop_after(layer)
    with torch.no_grad(), fast_attention(lm), h:
        h.forward(probe, use_cache=False)
    act = h.cache[f"neurons.{layer}"][0]
    score = act.abs() * _w_norm(lm, layer)
    k = min(k, score.numel())
    top = [int(j) for j in score.topk(k).indices]
    norms = _first_norm_under_ablations(lm, probe, layer, [[]] + [[j] for j in top])
    before = norms[0]
    cands = [{"neuron": j, "activation": float(act[j]), "score": float(score[j]), "norm_after": norms[1 + i],
              "drop": 1 - norms[1 + i] / before if before > 0 else 0.0} for i, j in enumerate(top)]
    order = sorted(cands, key=lambda c: (-c["drop"], -c["score"]))
    prefixes = [[c["neuron"] for c in order[: n + 1]] for n in range(len(order))]
    joint = _first_norm_under_ablations(lm, probe, layer, prefixes)
    cumulative = [{"n": n + 1, "neurons": prefixes[n], "norm_after": joint[n],
                   "drop": 1 - joint[n] / before if before > 0 else 0.0} for n in range(len(prefixes))]
    n_keep, prev = 0, before
    for c in cumulative:
        if before > 0 and (prev - c["norm_after"]) / before >= min_gain:
            n_keep, prev = c["n"], c["norm_after"]
        else:
            break
    collapsed = n_keep > 0 and cumulative[n_keep - 1]["norm_after"] <= collapse * before
    sel = cumulative[n_keep - 1]["neurons"] if collapsed else []
    return LayerNeurons(layer=layer, candidates=cands, norm_before=before, cumulative=cumulative,
                        selected=list(sel), collapsed=bool(collapsed))


def norms_and_attention(lm, ids: torch.Tensor, last: int, edit: Edit | None = None):
    """Per layer up to ``last``: mean first-token norm, mean typical norm and mean attention
    mass on position 0 (over heads and queries > 0), with an optional edit."""
    site = "attn_first" if "attn_first" in READ_SITES else "attn_pattern"
    h = Hooks(lm)
    if edit is not None:
        h.edit(edit)
    att_layers = set(lm.adapter.attention_in(range(last + 1)))
    for i in range(last + 1):
        h.read("resid_post", i, reduce=norm_reduce)
        if i not in att_layers:
            continue
        if site == "attn_first":  # (B, H, T): weight on the first token, fused kernel
            h.read(site, i, reduce=lambda x, p: x.detach().float()[:, :, 1:].mean().reshape(1), name=f"att.{i}")
        else:
            h.read(site, i, reduce=lambda x, p: x.detach().float()[:, :, 1:, 0].mean().reshape(1), name=f"att.{i}")
    h.stop_after(last)
    with torch.no_grad(), h:
        h.forward(ids, use_cache=False)
    c = h.cache
    first = [float(c[f"resid_post.{i}"][:, 0].mean()) for i in range(last + 1)]
    typ = [float(c[f"resid_post.{i}"][:, 1:].mean()) for i in range(last + 1)]
    att = [float(c[f"att.{i}"][0]) if i in att_layers else None for i in range(last + 1)]
    return first, typ, att


def ablation_effect(lm, layer: int, neurons: list[int], batch: torch.Tensor | None = None,
                    last_layer: int | None = None, n_texts: int = 8, n_tokens: int = 24,
                    control: tuple | None = None) -> AblationEffect:
    """Zero ``neurons`` of ``layer`` at position 0 on ordinary text; per layer up to
    ``last_layer``, the first-token and typical norms and the attention mass on position 0,
    before and after. ``control`` reuses an unedited pass (from ``norms_and_attention`` on the
    same batch and ``last_layer``)."""
    L = lm.adapter.n_layers
    last = L - 1 if last_layer is None else last_layer
    ids = batch if batch is not None else text_batch(lm, n=n_texts, n_tokens=n_tokens, bos=lm.bos_id is not None)
    fb, tb, ab = control if control is not None else norms_and_attention(lm, ids, last)
    edit = Edit("neurons", layer, neurons=list(neurons), positions="first", op="zero") if neurons else None
    fa, ta, aa = norms_and_attention(lm, ids, last, edit)
    return AblationEffect(layer=layer, neurons=[int(n) for n in neurons], first_norm_before=fb, first_norm_after=fa,
                          typical_norm_before=tb, typical_norm_after=ta, attn_to_first_before=ab,
                          attn_to_first_after=aa)


def repetition_firing(lm, layer: int, neurons: list[int], word: str = "the", n_reps: int = 1000,
                      fire_frac: float = 0.5, n_samples: int = 64, top: int = 5) -> RepetitionFiring:
    """Activations of ``neurons`` at ``layer`` on ``BOS w w ... w`` (one pass, stopped at the layer)."""
    return repetition_firing_layers(lm, {layer: neurons}, word, n_reps, fire_frac, n_samples, top)[0]


def repetition_firing_layers(lm, neurons_by_layer: dict[int, list[int]], word: str = "the", n_reps: int = 1000,
                             fire_frac: float = 0.5, n_samples: int = 64, top: int = 5) -> list[RepetitionFiring]:
    """``repetition_firing`` for several layers from one forward pass (stopped at the deepest)."""
    ids, start = repeat_ids(lm, word, n_reps, bos=lm.bos_id is not None)
    kw = len(lm.word_ids(word))
    layers = sorted(neurons_by_layer)
    h = Hooks(lm)
    for layer in layers:
        h.read("neurons", layer, reduce=lambda x, p: x.detach().float()[0])
    h.stop_after(layers[-1])
    with torch.no_grad(), fast_attention(lm), h:
        h.forward(torch.tensor([ids], device=lm.device), use_cache=False)
    idx = sorted(set(int(round(float(x))) for x in torch.logspace(0, torch.log10(torch.tensor(float(n_reps))), n_samples)))
    out = []
    for layer in layers:
        neurons = neurons_by_layer[layer]
        acts = h.cache[f"neurons.{layer}"]  # (T, d_mlp)
        last_tok = torch.arange(start + kw - 1, len(ids), kw, device=acts.device)  # last token of each repetition
        a0 = acts[0]
        fires_at, max_ratio, series = [], [], []
        for j in neurons:
            ref = float(a0[j])
            r = acts[last_tok, j] / ref if ref != 0 else torch.zeros(len(last_tok))
            hit = (r >= fire_frac).nonzero()
            fires_at.append(int(hit[0]) + 1 if len(hit) else None)
            max_ratio.append(float(r.max()) if len(r) else 0.0)
            series.append([float(acts[last_tok[n - 1], j]) for n in idx])
        score = acts[last_tok[-1]].abs() * _w_norm(lm, layer)
        out.append(RepetitionFiring(word=word, layer=layer, n_reps=n_reps, neurons=[int(j) for j in neurons],
                                    first_activation=[float(a0[j]) for j in neurons], reps=idx, activation=series,
                                    fires_at=fires_at, max_ratio=max_ratio,
                                    repeat_top=[int(j) for j in score.topk(min(top, score.numel())).indices]))
    return out
