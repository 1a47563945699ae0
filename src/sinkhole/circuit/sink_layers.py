"""Sink layers: where the first token's huge hidden-state norm is created.

Two rules are reported side by side:

* **paper** (the authors' notebook): feed the BOS token alone, take the norm of each layer's
  MLP output at position 0 for the first ``min(15, n_layers)`` layers, and pick the first layer
  above ``mean + 2 std`` of those norms. It finds one layer at most and fails on models
  whose first-token norm is built over several layers.
* **robust** (ours), on ordinary text (position 0 vs the rest): layer L is a sink layer when
  (a) its MLP writes at least ``mlp_ratio`` (10) times more into position 0 than into a
  typical token, (b) the first token's residual norm grows at least ``growth`` (1.5) times
  through block L, and (c) after block L the first token's norm is at least ``resid_ratio``
  (3) times the typical norm. Every such layer is a candidate. Here the **strongest layer** is
  the candidate with the largest growth (the paper rule's layer, else the largest norm ratio, when
  there is no candidate); ``circuit.discover`` then names the circuit's roles (see
  ``circuit.ROLE_RULES``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..capture import Hooks
from .common import norm_reduce, text_batch


@dataclass
class SinkLayers:
    layers: list[int]
    # paper rule: BOS alone, ||mlp_out|| at position 0
    bos_mlp_out_norm: list[float]
    paper_max_layer: int
    paper_threshold: float | None
    paper_layer: int | None
    # robust rule: ordinary text, position 0 vs positions > 0
    first_mlp_out_norm: list[float]
    typical_mlp_out_norm: list[float]
    mlp_ratio: list[float]
    first_resid_pre_norm: list[float]
    first_token_norm: list[float]  # resid_post at position 0
    typical_norm: list[float]  # mean resid_post over positions > 0
    growth: list[float]  # ||resid_post|| / ||resid_pre|| at position 0
    sink_layers: list[int]
    strongest_layer: int
    rule: dict = field(default_factory=dict)
    n_texts: int = 0
    n_tokens: int = 0
    has_bos: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def find_sink_layers(lm, n_texts: int = 16, n_tokens: int = 32, mlp_ratio: float = 10.0, growth: float = 1.5,
                     resid_ratio: float = 3.0, paper_max_layer: int = 15, batch: torch.Tensor | None = None) -> SinkLayers:
    """Find every candidate sink layer (see the module docstring for both rules)."""
    A = lm.adapter
    L = A.n_layers
    has_bos = lm.bos_id is not None
    ids = batch if batch is not None else text_batch(lm, n=n_texts, n_tokens=n_tokens, bos=has_bos)
    h = Hooks(lm)
    for i in range(L):
        h.read("mlp_out", i, reduce=norm_reduce)
        h.read("resid_post", i, reduce=norm_reduce)
        h.read("resid_pre", i, reduce=lambda x, p: x.detach().float()[:, 0].norm(dim=-1), name=f"pre0.{i}")
    h.stop_after(L - 1)
    with torch.no_grad(), h:
        h.forward(ids, use_cache=False)
    c = h.cache
    mlp = torch.stack([c[f"mlp_out.{i}"] for i in range(L)]).double()  # (L, B, T)
    res = torch.stack([c[f"resid_post.{i}"] for i in range(L)]).double()
    pre0 = torch.stack([c[f"pre0.{i}"] for i in range(L)]).double()  # (L, B)
    first_mlp = mlp[:, :, 0].mean(1)
    typ_mlp = mlp[:, :, 1:].mean((1, 2))
    first_res = res[:, :, 0].mean(1)
    typ_res = res[:, :, 1:].mean((1, 2))
    pre0m = pre0.mean(1)
    ratio = first_mlp / typ_mlp.clamp_min(1e-12)
    grow = first_res / pre0m.clamp_min(1e-12)
    rratio = first_res / typ_res.clamp_min(1e-12)
    cands = [i for i in range(L) if ratio[i] >= mlp_ratio and grow[i] >= growth and rratio[i] >= resid_ratio]

    # paper rule on BOS alone (or the first text token when the model has no BOS)
    single = ids[:1, :1]
    h2 = Hooks(lm)
    m = min(paper_max_layer, L)
    for i in range(m):
        h2.read("mlp_out", i, reduce=norm_reduce)
    h2.stop_after(m - 1)
    with torch.no_grad(), h2:
        h2.forward(single, use_cache=False)
    bos_mlp = torch.tensor([float(h2.cache[f"mlp_out.{i}"][0, 0]) for i in range(m)], dtype=torch.float64)
    thr = float(bos_mlp.mean() + 2 * bos_mlp.std()) if m > 1 else None
    paper = next((i for i in range(m) if thr is not None and bos_mlp[i] > thr), None)

    if cands:
        main = max(cands, key=lambda i: float(grow[i]))
    elif paper is not None:
        main = paper
    else:
        main = int(rratio.argmax())
    return SinkLayers(
        layers=list(range(L)),
        bos_mlp_out_norm=[float(v) for v in bos_mlp],
        paper_max_layer=m,
        paper_threshold=thr,
        paper_layer=paper,
        first_mlp_out_norm=[float(v) for v in first_mlp],
        typical_mlp_out_norm=[float(v) for v in typ_mlp],
        mlp_ratio=[float(v) for v in ratio],
        first_resid_pre_norm=[float(v) for v in pre0m],
        first_token_norm=[float(v) for v in first_res],
        typical_norm=[float(v) for v in typ_res],
        growth=[float(v) for v in grow],
        sink_layers=cands,
        strongest_layer=int(main),
        rule={"mlp_ratio": mlp_ratio, "growth": growth, "resid_ratio": resid_ratio,
              "strongest": "candidate with the largest first-token norm growth through its block"},
        n_texts=int(ids.shape[0]),
        n_tokens=int(ids.numel()),
        has_bos=has_bos,
    )
