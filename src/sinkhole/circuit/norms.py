"""Hidden-state norms: the first token against ordinary tokens, and norms under repetition."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from ..capture import Hooks
from ..data import snippets
from ..models.attention import fast_attention
from ..progress import progress
from ..results import StepResult


def _norm_reduce(x: torch.Tensor, pos) -> torch.Tensor:
    return x.detach().float().norm(dim=-1)  # (B, T)


@dataclass
class LayerNorms(StepResult):
    """Per-layer residual-stream norms (``resid_post``) on ordinary text."""

    layers: list[int]
    first_token_norm: list[float]  # mean over texts of the norm at position 0
    typical_norm: list[float]  # mean norm over all positions > 0
    typical_std: list[float]
    ratio: list[float]  # first / typical
    n_texts: int
    n_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


def layer_norms(lm, texts: list[str] | None = None, max_layer: int | None = None, quiet: bool | None = None) -> LayerNorms:
    """Norm of the first token vs the mean of later tokens at every layer, on ordinary text."""
    texts = texts if texts is not None else snippets("sonnets", n=16, n_words=48, seed=0)
    n_layers = lm.adapter.n_layers if max_layer is None else max_layer + 1
    first = torch.zeros(n_layers, dtype=torch.float64)
    rest_sum = torch.zeros(n_layers, dtype=torch.float64)
    rest_sq = torch.zeros(n_layers, dtype=torch.float64)
    n_rest = 0
    for text in progress(texts, desc="norms on text", disable=quiet):
        ids = torch.tensor([lm.encode(text)], device=lm.device)
        h = Hooks(lm)
        for i in range(n_layers):
            h.read("resid_post", i, reduce=_norm_reduce)
        h.stop_after(n_layers - 1)
        with torch.no_grad(), h:
            h.forward(ids, use_cache=False)
        norms = torch.stack([h.cache[f"resid_post.{i}"][0] for i in range(n_layers)]).double().cpu()  # (L, T)
        first += norms[:, 0]
        rest_sum += norms[:, 1:].sum(1)
        rest_sq += (norms[:, 1:] ** 2).sum(1)
        n_rest += norms.shape[1] - 1
    first /= len(texts)
    mean = rest_sum / max(n_rest, 1)
    std = (rest_sq / max(n_rest, 1) - mean**2).clamp_min(0).sqrt()
    return LayerNorms(
        layers=list(range(n_layers)),
        first_token_norm=[float(v) for v in first],
        typical_norm=[float(v) for v in mean],
        typical_std=[float(v) for v in std],
        ratio=[float(a / b) if b > 0 else float("inf") for a, b in zip(first, mean)],
        n_texts=len(texts),
        n_tokens=int(n_rest + len(texts)),
    )


def repeat_ids(lm, word: str, n: int, bos: bool = True, prefix: str = "") -> tuple[list[int], int]:
    """Token ids of ``[BOS] prefix word word ... word`` (n copies of the word's tokens), and the
    index where the run starts."""
    unit = lm.word_ids(word)
    head = lm.encode(prefix, bos=bos) if (prefix or bos) else []
    return head + unit * n, len(head)


@dataclass
class NormCurve:
    """Hidden-state norm at ``layer`` for each repetition of ``word`` (paper Figure 2)."""

    word: str
    layer: int
    n_tokens_per_word: int
    reps: list[int]  # repetition index (1-based) of each point
    norm: list[float]  # norm at the last token of each repetition
    first_token_norm: float  # norm at position 0 of the same input
    typical_norm: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def norm_curve(lm, word: str, n_reps: int, layer: int, typical_norm: float | None = None) -> NormCurve:
    """Run ``[BOS] w w ... w`` once (stopping after ``layer``) and return the norm at every repetition."""
    ids, start = repeat_ids(lm, word, n_reps)
    k = len(lm.word_ids(word))
    h = Hooks(lm)
    h.read("resid_post", layer, reduce=_norm_reduce)
    h.stop_after(layer)

    with torch.no_grad(), fast_attention(lm), h:  # no pattern is read: SDPA, ~3x faster on long runs
        h.forward(torch.tensor([ids], device=lm.device), use_cache=False)
    norms = h.cache[f"resid_post.{layer}"][0]
    idx = torch.arange(start + k - 1, len(ids), k)
    return NormCurve(
        word=word,
        layer=layer,
        n_tokens_per_word=k,
        reps=[int(i) for i in range(1, len(idx) + 1)],
        norm=[float(v) for v in norms[idx]],
        first_token_norm=float(norms[0]),
        typical_norm=typical_norm,
    )


REPEATS_RULE = ("repeats needed = the smallest number of repetitions n at which the hidden-state norm of the "
                "n-th repetition's last token, at the given layer, reaches `frac` (default 0.5) of the first "
                "token's norm at that layer in the same input; None when it never does within the tested run. "
                "'sustained' = the smallest n >= 32 at which the median norm of the last 32 repetitions (n-31..n) "
                "reaches it (robust to isolated spikes)")


def repeats_needed(curve: NormCurve, frac: float = 0.5, window: int = 1) -> int | None:
    """The first repetition count whose norm reaches ``frac`` of the first-token norm (see
    ``REPEATS_RULE``); with ``window`` > 1, the first n (>= window) where the median of the
    norms of the last ``window`` repetitions reaches it. None if it never does within the curve."""
    thr = frac * curve.first_token_norm
    norms = torch.tensor(curve.norm, dtype=torch.float64)
    w = max(1, min(window, len(norms)))
    for i in range(w - 1, len(norms)):
        seg = norms[i - w + 1:i + 1]
        if float(seg.median()) >= thr:
            return int(curve.reps[i])
    return None


def norm_curves(lm, words: list[str], n_reps: int, layers: list[int], typical: dict | None = None,
                quiet: bool | None = None) -> list[NormCurve]:
    """Norm curves of every word at several layers, one forward pass per word (stopped at the
    deepest layer asked for; SDPA attention, since no pattern is read)."""
    last = max(layers)
    out = []
    for word in progress(list(words), desc="norm curves", disable=quiet):
        ids, start = repeat_ids(lm, word, n_reps, bos=lm.bos_id is not None)
        k = len(lm.word_ids(word))
        h = Hooks(lm)
        for layer in layers:
            h.read("resid_post", layer, reduce=_norm_reduce)
        h.stop_after(last)
        with torch.no_grad(), fast_attention(lm), h:
            h.forward(torch.tensor([ids], device=lm.device), use_cache=False)
        idx = torch.arange(start + k - 1, len(ids), k)
        for layer in layers:
            norms = h.cache[f"resid_post.{layer}"][0]
            out.append(NormCurve(word=word, layer=layer, n_tokens_per_word=k,
                                 reps=[int(i) for i in range(1, len(idx) + 1)],
                                 norm=[float(v) for v in norms[idx]], first_token_norm=float(norms[0]),
                                 typical_norm=(typical or {}).get(layer)))
    return out


@dataclass
class NormCurves(StepResult):
    layer: int  # the massive layer (Figure 2)
    layers: list  # every layer with curves: the sink layers and the massive layer
    curves: list  # curves at ``layer``
    all_curves: list  # curves at every layer of ``layers``
    repeats_needed: list
    repeats_rule: str
    headline: str = ""
    status: str | None = None
