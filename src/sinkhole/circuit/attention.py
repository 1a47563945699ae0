"""Attention-sink metrics: attention mass on position 0 and on a repeated run, per layer;
Gu et al.'s sink rate; and the attention maps of the paper's Figure 1.

* **mass on position 0** at layer L: the attention weight on key 0, averaged over heads and
  over query positions > 0 (for a repetition input: over the repeated tokens only).
* **mass on the run**: for a repetition input, the total weight a repeated token puts on the
  repeated tokens (keys from the start of the run up to itself), same averaging.
* **sink rate** (Gu et al. 2025, ICLR): the fraction of (layer, head) pairs whose mean
  attention on the first token, ``alpha = mean_{t >= 0} A[t, 0]``, exceeds ``eps`` (0.3),
  on sequences of ``T`` (64) tokens. Gu et al. report 92-99% on natural text for 7B models and
  0% for a repeated single token. ``head_shares`` gives the same share at both thresholds in
  use (0.3, Gu et al.; 0.8, Barbero et al. 2025), on text and on the longest run, with and
  without BOS first.
* **three-way split** of a repeated token's attention, per layer: on position 0, on the run, and
  on everything else (the prompt between them), which sum to 1.
* **Figure 1 maps** use attention *probabilities* (mean over heads, and over snippets for
  text); the paper's notebook plotted pre-softmax scores, which HF does not expose.

Every reduction happens inside the hook, so no (B, H, T, T) pattern is kept.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from ..capture import READ_SITES, Hooks
from ..results import StepResult
from .common import text_batch
from .norms import repeat_ids


@dataclass
class AttentionProfile:
    label: str
    n_tokens: int
    layers: list[int]
    mass_first: list  # per layer (None at a hybrid's linear-attention layers)
    mass_run: list | None = None  # per layer, repetition inputs only
    sink_rate: float | None = None  # Gu et al., over all layers and heads (eps below)
    eps: float = 0.3
    sink_rates: dict = field(default_factory=dict)  # share of heads over each threshold of SHARE_EPS
    bos: bool = True  # position 0 is BOS

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AttentionSinks(StepResult):
    text: AttentionProfile
    repetitions: list[AttentionProfile]  # one per (word, n)
    sink_rate_text: float
    sink_rate_repeat: float  # BOS + the word repeated, T tokens
    eps: float
    T: int
    fig1: dict = field(default_factory=dict)  # {"layers": [...], "text": [[...]], "repeat": [[...]], ...}
    head_shares: list = field(default_factory=list)  # {"input", "bos", "eps", "share"} per setting and threshold
    split: dict = field(default_factory=dict)  # three-way split of the longest run: first, run, other per layer

    def to_dict(self) -> dict:
        return asdict(self)


SHARE_EPS = (0.3, 0.8)  # Gu et al.; Barbero et al.


def _profile(lm, ids: torch.Tensor, label: str, run_start: int | None = None, eps: float = 0.3,
             bos: bool = True) -> AttentionProfile:
    """Per-layer attention metrics of one input. When the run starts right after the first token
    (or there is no run) only the weight on the first token is needed, read from the fused
    ``attn_first`` site (no T x T pattern); otherwise the eager pattern, reduced in the hook."""
    L = lm.adapter.n_layers
    q0 = 1 if run_start is None else max(run_start, 1)
    fused = "attn_first" in READ_SITES and run_start in (None, 0, 1)
    h = Hooks(lm)

    def reduce_first(x, p):
        a = x.detach().float()  # (B, H, T): weight on the first token
        first = a[:, :, q0:].mean()
        alpha = a.mean(-1).mean(0)  # (H,) Gu's alpha over all queries t >= 0
        out = [first.reshape(1), alpha]
        if run_start is not None:  # keys of the run = every key but the first (or all of them)
            out.append((1.0 - first if run_start == 1 else torch.ones_like(first)).reshape(1))
        return torch.cat(out)

    def reduce_pattern(x, p):
        a = x.detach().float()  # (B, H, T, Tk)
        T = a.shape[-2]
        first = a[:, :, q0:, 0].mean()
        alpha = a[:, :, :, 0].mean(-1).mean(0)
        out = [first.reshape(1), alpha]
        if run_start is not None:
            tri = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
            keys = torch.zeros(T, dtype=torch.bool, device=a.device)
            keys[run_start:] = True
            m = (tri & keys[None, :])[q0:]  # (Tq, Tk)
            out.append((a[:, :, q0:, :] * m).sum(-1).mean().reshape(1))
        return torch.cat(out)

    att_layers = lm.adapter.attention_layers  # a hybrid's linear-attention layers have no weights: None
    for i in att_layers:
        h.read("attn_first" if fused else "attn_pattern", i, reduce=reduce_first if fused else reduce_pattern,
               name=f"att.{i}")
    with torch.no_grad(), h:
        h.forward(ids, use_cache=False)
    c = {i: h.cache[f"att.{i}"] for i in att_layers}
    H = c[att_layers[0]].numel() - 1 - (1 if run_start is not None else 0)
    alphas = torch.stack([v[1:1 + H] for v in c.values()])
    return AttentionProfile(label=label, n_tokens=int(ids.shape[1]), layers=list(range(L)),
                            mass_first=[float(c[i][0]) if i in c else None for i in range(L)],
                            mass_run=[float(c[i][-1]) if i in c else None for i in range(L)]
                            if run_start is not None else None,
                            sink_rate=float((alphas > eps).double().mean()), eps=eps,
                            sink_rates={f"{e:g}": round(float((alphas > e).double().mean()), 4)
                                        for e in sorted(set(SHARE_EPS) | {eps})}, bos=bool(bos))


def _map(lm, ids: torch.Tensor, layers: list[int]) -> list[list[list[float]]]:
    h = Hooks(lm)
    for i in layers:
        h.read("attn_pattern", i, reduce=lambda x, p: x.detach().float().mean((0, 1)))
    h.stop_after(max(layers))
    with torch.no_grad(), h:
        h.forward(ids, use_cache=False)
    return [[[round(float(v), 5) for v in row] for row in h.cache[f"attn_pattern.{i}"]] for i in layers]


def fig1_layers(lm, sink_layers: list[int], main: int) -> list[int]:
    """Up to four layers for the attention maps: the first sink layer, the one after the massive
    layer, a middle one and the last (each moved to the nearest softmax-attention layer)."""
    L = lm.adapter.n_layers
    att = lm.adapter.attention_layers
    first = sink_layers[0] if sink_layers else main
    cand = [min(first, L - 1), min(main + 1, L - 1), min((main + 1 + L) // 2, L - 1), L - 1]
    out = []
    for c in cand:
        c = min(att, key=lambda a: (abs(a - c), a))
        if c not in out:
            out.append(c)
    return out


def attention_sinks(lm, words: list[str] = ("the",), reps: list[int] = (16, 64, 256), T: int = 64,
                    eps: float = 0.3, n_texts: int = 8, map_layers: list[int] | None = None,
                    map_tokens: int = 20) -> AttentionSinks:
    bos = lm.bos_id is not None
    text_ids = text_batch(lm, n=n_texts, n_tokens=T, bos=bos)
    text = _profile(lm, text_ids, "text", eps=eps, bos=bos)
    profs = []
    for w in words:
        for n in reps:
            ids, start = repeat_ids(lm, w, int(n), bos=bos)
            profs.append(_profile(lm, torch.tensor([ids], device=lm.device), f"'{w}' x{n}", run_start=start, eps=eps,
                                  bos=bos))
    head_shares = _shares(text, "text")
    if bos:  # the same without BOS: a word at position 0
        nb = _profile(lm, text_batch(lm, n=n_texts, n_tokens=T, bos=False), "text, no BOS", eps=eps, bos=False)
        head_shares += _shares(nb, "text")
    split = {}
    if profs:
        w, n = words[-1], int(reps[-1])
        last = profs[-1]  # the last word at the last repetition count
        split = {"label": last.label, "layers": last.layers, "first": last.mass_first, "run": last.mass_run,
                 "other": [None if f is None else round(max(0.0, 1.0 - f - r), 6)
                           for f, r in zip(last.mass_first, last.mass_run)]}
        head_shares += _shares(last, "run")
        if bos:
            ids, start = repeat_ids(lm, w, n, bos=False)
            head_shares += _shares(_profile(lm, torch.tensor([ids], device=lm.device), f"'{w}' x{n}, no BOS",
                                            run_start=start, eps=eps, bos=False), "run")
    w0 = words[0]
    unit = lm.word_ids(w0)
    ids, start = repeat_ids(lm, w0, max(1, (T - (1 if bos else 0)) // len(unit)), bos=bos)
    rep_rate = _profile(lm, torch.tensor([ids[:T]], device=lm.device), f"'{w0}' T={T}", run_start=start, eps=eps).sink_rate
    fig1 = {}
    if map_layers:
        m_text = text_batch(lm, n=4, n_tokens=map_tokens, bos=bos)
        ids, _ = repeat_ids(lm, w0, map_tokens, bos=bos)
        m_rep = torch.tensor([ids[:map_tokens]], device=lm.device)
        fig1 = {"layers": list(map_layers), "word": w0, "n_tokens": map_tokens,
                "text": _map(lm, m_text, map_layers), "repeat": _map(lm, m_rep, map_layers),
                "value": "attention probability, mean over heads (and over 4 text snippets)"}
    return AttentionSinks(text=text, repetitions=profs, sink_rate_text=text.sink_rate, sink_rate_repeat=rep_rate,
                          eps=eps, T=T, fig1=fig1, head_shares=head_shares, split=split)


def _shares(p: AttentionProfile, kind: str) -> list[dict]:
    return [{"input": p.label, "kind": kind, "bos": p.bos, "eps": float(e), "share": p.sink_rates[f"{e:g}"]}
            for e in SHARE_EPS]
