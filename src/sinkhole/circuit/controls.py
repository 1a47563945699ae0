"""The controls reviewers ask for behind every sink-neuron effect.

For each layer with verified sink neurons, on ordinary text (BOS first when the model has one):

* **ablation controls**: the neurons' activations at position 0 replaced three ways, each measured
  by the first token's ``resid_post`` norm at that layer, the mean attention on position 0 over the
  later softmax-attention layers, and the change of the text's perplexity (positions > 0):

  - ``zero``: set to 0 (the ablation the circuit's causal filter uses);
  - ``mean_typical``: set to the neurons' mean activation over positions > 0 of the same texts,
    the gentler in-distribution control: what an ordinary token's value does in position 0;
  - ``mean_first``: set to their mean at position 0 over the texts (Sun et al. 2024's "set the
    massive activation to its mean"): the massive value stays, so it should be harmless; a large
    effect here would mean the circuit's claim rests on the exact value, not on its presence.

  The causal claim ("these neurons make the sink") survives the control when ``mean_typical``
  collapses the norm and frees attention about as much as ``zero`` does while ``mean_first``
  changes little.
* **super weights** (Yu et al. 2024): the largest entries of each sink neuron's output column
  ``W_out[:, j]`` (residual dimension, value, ratio to the column's median magnitude), and the
  effect of zeroing the single largest entry on the first token's norm and on perplexity.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass

import torch

from ..capture import Edit, Hooks
from .common import text_batch


@dataclass
class AblationControl:
    layer: int
    neurons: list
    replacement: str  # zero | mean_typical | mean_first
    values: list  # the activation written at position 0, per neuron
    first_norm_before: float
    first_norm_after: float
    later_attn_before: float | None
    later_attn_after: float | None
    ppl_before: float
    ppl_after: float
    ppl_change_pct: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SuperWeight:
    layer: int
    neuron: int
    top: list  # [{"row", "value", "ratio_to_median"}], largest |value| first
    first_norm_before: float
    first_norm_after: float  # with the single largest entry zeroed
    ppl_before: float
    ppl_after: float
    ppl_change_pct: float

    def to_dict(self) -> dict:
        return asdict(self)


def _measure(lm, ids: torch.Tensor, layer: int, edit: Edit | None = None) -> tuple[float, float | None, float]:
    """(first-token resid_post norm at ``layer``, mean attention on position 0 over the later
    softmax-attention layers, perplexity of positions > 0), one full pass."""
    later = lm.adapter.attention_in(range(layer + 1, lm.adapter.n_layers))
    h = Hooks(lm)
    if edit is not None:
        h.edit(edit)
    h.read("resid_post", layer, reduce=lambda x, p: x.detach().float()[:, 0].norm(dim=-1).mean().reshape(1),
           name="first")
    for i in later:  # weight on the first token from the fused kernel (no T x T pattern)
        h.read("attn_first", i, reduce=lambda x, p: x.detach().float()[:, :, 1:].mean().reshape(1), name=f"att.{i}")
    with torch.no_grad(), h:
        out = h.forward(ids, use_cache=False)
    logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).mean()
    att = [float(h.cache[f"att.{i}"][0]) for i in later]
    return float(h.cache["first"][0]), (sum(att) / len(att) if att else None), float(torch.exp(nll))


def _activations(lm, ids: torch.Tensor, layer: int, neurons: list[int]) -> torch.Tensor:
    idx = torch.as_tensor(neurons, dtype=torch.long)
    h = Hooks(lm)
    h.read("neurons", layer, reduce=lambda x, p: x.detach().float()[..., idx.to(x.device)])
    h.stop_after(layer)
    with torch.no_grad(), h:
        h.forward(ids, use_cache=False)
    return h.cache[f"neurons.{layer}"]  # (B, T, k)


def ablation_controls(lm, layer: int, neurons: list[int], ids: torch.Tensor,
                      before: tuple | None = None) -> list[AblationControl]:
    """The three replacements of ``neurons`` at position 0 (module docstring)."""
    acts = _activations(lm, ids, layer, neurons)
    values = {"zero": torch.zeros(len(neurons)), "mean_typical": acts[:, 1:].mean((0, 1)),
              "mean_first": acts[:, 0].mean(0)}
    fb, ab, pb = before or _measure(lm, ids, layer)
    out = []
    for name, v in values.items():
        vals = [float(x) for x in v]
        e = Edit("neurons", layer, neurons=list(neurons), positions="first", op="set", value=vals)
        fa, aa, pa = _measure(lm, ids, layer, e)
        out.append(AblationControl(layer, [int(n) for n in neurons], name, [round(x, 5) for x in vals], fb, fa, ab,
                                   aa, pb, pa, round(100 * (pa / pb - 1), 4)))
    return out


@contextlib.contextmanager
def zeroed_entry(lm, layer: int, row: int, neuron: int):
    """The model with one entry ``W_out[row, neuron]`` of ``layer`` set to 0, restored afterwards
    (the parameter itself is edited, whatever its layout: Linear, GPT-2 Conv1D, fused experts)."""
    ad = lm.adapter
    down = ad.down_proj(layer)
    if ad.spec.moe:
        inner = down.down_proj.shape[2]
        p, where = down.down_proj, (neuron // inner, row, neuron % inner)
    elif ad.spec.conv1d:
        p, where = down.weight, (neuron, row)
    else:
        p, where = down.weight, (row, neuron)
    with torch.no_grad():
        old = p[where].clone()
        p[where] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            p[where] = old


def super_weights(lm, layer: int, neurons: list[int], ids: torch.Tensor, top: int = 3,
                  before: tuple | None = None) -> list[SuperWeight]:
    """The largest output-column entries of each sink neuron, and zeroing the largest one."""
    w = lm.adapter.w_out(layer).detach().float()
    fb, _, pb = before or _measure(lm, ids, layer)
    out = []
    for j in neurons:
        col = w[:, int(j)]
        med = float(col.abs().median()) or 1e-12
        order = col.abs().argsort(descending=True)[:top]
        entries = [{"row": int(r), "value": round(float(col[r]), 5), "ratio_to_median": round(abs(float(col[r])) / med, 2)}
                   for r in order]
        with zeroed_entry(lm, layer, int(order[0]), int(j)):
            fa, _, pa = _measure(lm, ids, layer)
        out.append(SuperWeight(layer, int(j), entries, fb, fa, pb, pa, round(100 * (pa / pb - 1), 4)))
    return out


def circuit_controls(lm, neurons_by_layer: dict[int, list[int]], n_texts: int = 8, n_tokens: int = 32) -> dict:
    """Both controls for every layer with sink neurons: ``{"ablation": [...], "super_weights": [...]}``."""
    ids = text_batch(lm, n=n_texts, n_tokens=n_tokens, bos=lm.bos_id is not None)
    abl, sw = [], []
    for layer, ns in sorted(neurons_by_layer.items()):
        if not ns:
            continue
        before = _measure(lm, ids, layer)
        abl += [c.to_dict() for c in ablation_controls(lm, layer, ns, ids, before)]
        sw += [s.to_dict() for s in super_weights(lm, layer, ns, ids, before=before)]
    return {"ablation": abl, "super_weights": sw, "n_texts": int(ids.shape[0]), "n_tokens": int(ids.shape[1])}
