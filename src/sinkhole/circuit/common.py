"""Small helpers shared by the circuit analyses: inputs, reductions, a faster attention kernel."""

from __future__ import annotations

import torch

from ..data import snippets
from ..errors import SinkholeError


def norm_reduce(x: torch.Tensor, pos) -> torch.Tensor:
    """Hook reduction: L2 norm over the last dimension, (B, T)."""
    return x.detach().float().norm(dim=-1)


def first_layer_over(ratios, threshold: float = 5.0, default: int = 1) -> int:
    """The first layer whose first-token/typical norm ratio reaches ``threshold``, else the layer
    with the largest ratio (``None`` entries count as 0), else ``default`` when there are none."""
    vals = [0.0 if r is None else float(r) for r in ratios]
    for i, r in enumerate(vals):
        if r >= threshold:
            return i
    return int(max(range(len(vals)), key=vals.__getitem__)) if vals else default


def text_batch(lm, n: int = 16, n_tokens: int = 32, bos: bool = True, name: str = "sonnets",
               seed: int = 0) -> torch.Tensor:
    """A (n, n_tokens) batch of ordinary-text token ids (no padding: every row is cut to
    ``n_tokens``). With ``bos`` (and a model that has a BOS token) position 0 is BOS."""
    rows = []
    for text in snippets(name, n=n * 2, n_words=max(8, n_tokens), seed=seed):
        ids = lm.encode(text, bos=bos)
        if len(ids) >= n_tokens:
            rows.append(ids[:n_tokens])
        if len(rows) == n:
            break
    if not rows:
        raise SinkholeError(f"the tokenizer turns ordinary text into fewer than {n_tokens} tokens per snippet; "
                            "is it the model's own tokenizer?")
    return torch.tensor(rows, dtype=torch.long, device=lm.device)


def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a 1-D tensor, ties sharing their average rank (float64)."""
    v = values.double().flatten()
    order = v.argsort()
    ranks = torch.empty_like(v)
    _, inv, counts = torch.unique_consecutive(v[order], return_inverse=True, return_counts=True)
    avg = counts.cumsum(0).double() - (counts.double() - 1) / 2
    ranks[order] = avg[inv]
    return ranks


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """Area under the ROC curve of score ``pos`` (label 1) vs ``neg`` (label 0), ties = 1/2
    (the Mann-Whitney U statistic divided by n_pos * n_neg)."""
    pos = pos.double().flatten()
    neg = neg.double().flatten()
    ranks = average_ranks(torch.cat([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def histogram(values: dict[str, torch.Tensor], bins: int = 40) -> dict:
    """Shared-bin histograms of several groups: {'edges': [...], 'counts': {group: [...]}}."""
    allv = torch.cat([v.double().flatten() for v in values.values()])
    lo, hi = float(allv.min()), float(allv.max())
    if hi <= lo:
        hi = lo + 1e-6
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    counts = {k: torch.histc(v.double().flatten(), bins=bins, min=lo, max=hi).long().tolist() for k, v in values.items()}
    return {"edges": [float(e) for e in edges], "counts": counts}
