"""First-token detector: the neuron (or direction) of the first layers that separates tokens at
position 0 from later tokens on ordinary text (the paper's Figure 4).

Inputs are short snippets of shipped text **without BOS** (as in the paper's notebook), cut to
their first 3 tokens, so position 0 is an ordinary word. For every neuron of each layer we
compute the AUC of "position 0" against "positions 1-2" (0.5 = no separation, 1 or 0 = perfect).
The best neuron's activation histograms at positions 0, 1 and 2 are the data of Figure 4. A
linear direction (difference of class means of ``resid_post``, fitted on half of the snippets and
scored on the other half) gives a second, held-out separation statistic.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..capture import Hooks
from ..models.attention import fast_attention
from ..results import StepResult
from .common import auc, histogram, text_batch


def _auc_columns(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """AUC of every column (ties broken by order; fine for continuous activations)."""
    allv = torch.cat([pos, neg]).double()
    ranks = allv.argsort(0).argsort(0).double() + 1
    n1, n0 = pos.shape[0], neg.shape[0]
    u = ranks[:n1].sum(0) - n1 * (n1 + 1) / 2
    return u / (n1 * n0)


@dataclass
class FirstTokenDetector(StepResult):
    layers: list[int]
    best_neuron: list[int]  # per layer
    best_auc: list[float]  # per layer, oriented so that > 0.5 means "fires more on position 0"
    top_neurons: list[list[dict]]  # per layer: neuron, auc, mean_first, mean_later
    direction_auc: list[float]  # per layer, held-out AUC of the mean-difference direction
    detector_layer: int
    detector_neuron: int
    detector_auc: float
    perfect: bool  # the detector neuron's two groups do not overlap at all
    histogram: dict  # edges + counts for position 0, 1, 2 of the detector neuron
    n_snippets: int
    bos: bool

    def to_dict(self) -> dict:
        return asdict(self)


def first_token_detector(lm, layers: list[int] | None = None, n_snippets: int = 256, n_tokens: int = 3,
                         top: int = 5, bins: int = 40, seed: int = 0) -> FirstTokenDetector:
    layers = layers if layers is not None else list(range(min(2, lm.adapter.n_layers)))
    last = max(layers)
    ids = text_batch(lm, n=n_snippets, n_tokens=n_tokens, bos=False, seed=seed)
    h = Hooks(lm)
    for i in layers:
        h.read("neurons", i, reduce=lambda x, p: x.detach().float())
        h.read("resid_post", i, reduce=lambda x, p: x.detach().float())
    h.stop_after(last)
    with torch.no_grad(), fast_attention(lm), h:
        h.forward(ids, use_cache=False)
    best_n, best_a, tops, dir_auc = [], [], [], []
    n = ids.shape[0]
    half = n // 2
    for i in layers:
        act = h.cache[f"neurons.{i}"]  # (B, T, d_mlp)
        first, later = act[:, 0], act[:, 1:].reshape(-1, act.shape[-1])
        a = _auc_columns(first, later)
        sep = (a - 0.5).abs()
        order = sep.argsort(descending=True)[:top]
        tops.append([{"neuron": int(j), "auc": float(a[j]), "mean_first": float(first[:, j].mean()),
                      "mean_later": float(later[:, j].mean())} for j in order])
        best_n.append(int(order[0]))
        best_a.append(float(a[order[0]]))
        r = h.cache[f"resid_post.{i}"]
        d = r[:half, 0].mean(0) - r[:half, 1:].reshape(-1, r.shape[-1]).mean(0)
        s_first = r[half:, 0] @ d
        s_later = r[half:, 1:].reshape(-1, r.shape[-1]) @ d
        dir_auc.append(auc(s_first, s_later))
    k = max(range(len(layers)), key=lambda t: (abs(best_a[t] - 0.5), -t))
    layer, neuron = layers[k], best_n[k]
    act = h.cache[f"neurons.{layer}"][:, :, neuron]
    groups = {f"position {p}": act[:, p] for p in range(act.shape[1])}
    f, rest = act[:, 0], act[:, 1:].flatten()
    perfect = bool(f.min() > rest.max() or f.max() < rest.min())
    return FirstTokenDetector(layers=list(layers), best_neuron=best_n, best_auc=best_a, top_neurons=tops,
                              direction_auc=dir_auc, detector_layer=layer, detector_neuron=neuron,
                              detector_auc=best_a[k], perfect=perfect, histogram=histogram(groups, bins),
                              n_snippets=int(n), bos=False)
