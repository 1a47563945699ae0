"""Layer-0 convergence (the paper's Theorem 4.1, measured; Figure 5) and the exact-identity check.

* **convergence**: for ``[BOS] prefix w w ... w`` the distance between the block-0 output
  (``resid_post`` of layer 0, the notebook's ``blocks.1.hook_resid_pre``) at each repeated
  token and the block-0 output of the one-token sequence ``(w)`` (no BOS). The theorem predicts
  it goes to 0 as the repetition grows (softmax leakage). Reported as L2 distance and as a
  fraction of the singleton's norm, with the distance of the *first* repeated token as scale.
* **identity**: with no BOS and no prefix, all positions of ``w w ... w`` should be identical at
  every layer (attention over identical values returns that value). Reported per layer as the
  largest relative deviation of any position from position 0 (float rounding only: ~1e-6).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..capture import Hooks
from ..models.attention import fast_attention
from ..results import StepResult


@dataclass
class ConvergenceCurve:
    word: str
    layer: int
    prefix: str
    reps: list[int]
    distance: list[float]  # L2 distance to the singleton's output
    relative: list[float]  # distance / ||singleton output||
    singleton_norm: float
    distance_to_first: float | None  # distance of the last repetition to the BOS/first token output

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class IdentityCheck:
    word: str
    n_tokens: int
    layers: list[int]
    max_relative_deviation: list[float]
    identical: bool
    tolerance: float

    def to_dict(self) -> dict:
        return asdict(self)


def _sample_idx(n: int, n_samples: int = 60) -> list[int]:
    pts = torch.logspace(0, torch.log10(torch.tensor(float(max(n, 1)))), n_samples)
    return sorted(set(int(round(float(x))) for x in pts) | {n})


def convergence_curve(lm, word: str, n_reps: int = 500, prefix: str = "some prefix:", layer: int = 0,
                      n_samples: int = 60) -> ConvergenceCurve:
    unit = lm.word_ids(word)
    head = lm.encode(prefix, bos=lm.bos_id is not None) if prefix or lm.bos_id is not None else []
    ids = head + unit * n_reps
    k = len(unit)

    def out_at(seq):
        h = Hooks(lm)
        h.read("resid_post", layer, reduce=lambda x, p: x.detach().float()[0])
        h.stop_after(layer)
        with torch.no_grad(), fast_attention(lm), h:
            h.forward(torch.tensor([seq], device=lm.device), use_cache=False)
        return h.cache[f"resid_post.{layer}"]

    run_out = out_at(ids)
    single = out_at(unit)[-1]  # last token of the word alone (the word itself for 1-token words)
    last_tok = torch.arange(len(head) + k - 1, len(ids), k, device=run_out.device)
    d = (run_out[last_tok] - single).norm(dim=-1)
    idx = _sample_idx(n_reps, n_samples)
    sn = float(single.norm())
    dfirst = float((run_out[last_tok[-1]] - run_out[0]).norm()) if head else None
    return ConvergenceCurve(word=word, layer=layer, prefix=prefix, reps=idx, distance=[float(d[i - 1]) for i in idx],
                            relative=[float(d[i - 1]) / sn if sn > 0 else 0.0 for i in idx], singleton_norm=sn,
                            distance_to_first=dfirst)


def identity_check(lm, word: str = "the", n_tokens: int = 32, tolerance: float = 1e-4) -> IdentityCheck:
    unit = lm.word_ids(word)[:1]
    ids = torch.tensor([unit * n_tokens], device=lm.device)
    L = lm.adapter.n_layers
    h = Hooks(lm)
    for i in range(L):
        h.read("resid_post", i, reduce=lambda x, p: ((x[0].float() - x[0, :1].float()).norm(dim=-1).max()
                                                    / x[0, 0].float().norm().clamp_min(1e-12)).reshape(1))
    h.stop_after(L - 1)
    with torch.no_grad(), fast_attention(lm), h:
        h.forward(ids, use_cache=False)
    dev = [float(h.cache[f"resid_post.{i}"][0]) for i in range(L)]
    return IdentityCheck(word=word, n_tokens=n_tokens, layers=list(range(L)), max_relative_deviation=dev,
                         identical=bool(max(dev) <= tolerance), tolerance=tolerance)


@dataclass
class ConvergenceResult(StepResult):
    curves: list  # ConvergenceCurve.to_dict() per word
    identity: dict  # IdentityCheck.to_dict()
