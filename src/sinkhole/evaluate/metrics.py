"""Before/after measurements of a patch on ordinary text and under long repetitions.

* :func:`text_metrics`: perplexity of the unpatched and the patched model on held-out text, the
  top-1 next-token agreement of the patched with the unpatched model, and the mean KL divergence
  KL(P_unpatched || P_patched) in nats per token. One forward pass per batch and model; nothing
  but per-token scalars is kept.
* :func:`sink_attention`: attention mass on position 0 (the first token) from the last query
  positions of ``<bos> w w ... w``, averaged over heads, per layer: the attention sink that long
  repetitions break.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..capture import Hooks
from ..circuit.norms import repeat_ids
from ..data import heldout_texts
from ..decoding.tokens import pad_left
from ..errors import SinkholeError


def encode_batch(lm, texts: list[str], max_tokens: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, BOS first, at most ``max_tokens`` tokens each."""
    rows = [lm.encode(t, bos=True)[:max_tokens] for t in texts]
    return pad_left(lm, rows)


def token_kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P) per position, in nats, from log-probabilities over the last dimension."""
    return (ref_logp.exp() * (ref_logp - logp)).sum(-1)


@dataclass
class TextMetrics:
    n_tokens: int
    ppl_before: float
    ppl_after: float
    ppl_change_pct: float
    top1_agreement: float
    mean_kl_nats: float
    max_kl_nats: float

    def to_dict(self) -> dict:
        return asdict(self)


def _held(lm, patch):
    """``patch`` held on ``lm`` (a :class:`sinkhole.patch.Patch`, or anything with ``applied(lm, validate=...)``);
    nothing for None."""
    return contextlib.nullcontext() if patch is None else patch.applied(lm, validate=False)


def _logits(lm, ids, mask, patch):
    with torch.no_grad(), _held(lm, patch):
        return lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()


def pair_sums(lb: torch.Tensor, la: torch.Tensor, tgt: torch.Tensor, valid: torch.Tensor | None = None) -> dict:
    """Sums over the (``valid``) positions of two models' logits ``lb`` (reference) and ``la`` on
    the next tokens ``tgt``: negative log-likelihoods, KL(before || after) and its max, top-1
    agreements, and the count. The one place both text comparisons (``text_metrics`` and the broad
    verification's fidelity) turn logits into these numbers."""
    lpb, lpa = F.log_softmax(lb.float(), -1), F.log_softmax(la.float(), -1)
    nb = -lpb.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    na = -lpa.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    kl = token_kl(lpb, lpa)
    agree = lb.argmax(-1) == la.argmax(-1)
    if valid is None:
        valid = torch.ones_like(agree)
    return {"nll_before": float(nb[valid].sum()), "nll_after": float(na[valid].sum()),
            "kl": float(kl[valid].sum()), "kl_max": float(kl[valid].max()) if valid.any() else 0.0,
            "agree": int(agree[valid].sum()), "n": int(valid.sum())}


def text_metrics(lm, patch, texts: list[str] | None = None, batch_size: int = 8, max_tokens: int = 128,
                 before=None) -> TextMetrics:
    """Compare the patched with the unpatched model on ``texts`` (held-out text by default).

    ``before`` may be another patch (or None for the plain model) to compare against."""
    texts = texts if texts is not None else heldout_texts()
    if patch is not None:
        patch.validate(lm)
    nll_b = nll_a = kl_sum = 0.0
    kl_max = 0.0
    agree = n = 0
    for i in range(0, len(texts), batch_size):
        ids, mask = encode_batch(lm, texts[i:i + batch_size], max_tokens)
        lb = _logits(lm, ids, mask, before)[:, :-1]
        la = _logits(lm, ids, mask, patch)[:, :-1]
        valid = (mask[:, :-1] > 0) & (mask[:, 1:] > 0)
        s = pair_sums(lb, la, ids[:, 1:], valid)
        nll_b, nll_a, kl_sum = nll_b + s["nll_before"], nll_a + s["nll_after"], kl_sum + s["kl"]
        kl_max = max(kl_max, s["kl_max"])
        agree, n = agree + s["agree"], n + s["n"]
    if n == 0:
        raise SinkholeError("the held-out texts produced no tokens to score; pass longer texts")
    pb, pa = math.exp(nll_b / n), math.exp(nll_a / n)
    return TextMetrics(n, pb, pa, 100.0 * (pa / pb - 1.0), agree / n, kl_sum / n, kl_max)


def _mass_reduce(last: int):
    def reduce(w, pos):
        # w: (B, H, T, Tk); mass on key position 0 (real first token) from the last queries.
        q = w[:, :, -last:, :]
        first_key = (pos == 0).to(w.dtype) if pos is not None else None
        if first_key is not None and first_key.shape[-1] == w.shape[-1]:
            m = (q * first_key[:, None, None, :]).sum(-1)
        else:
            m = q[..., 0]
        return m.mean(dim=(1, 2)).detach().cpu()

    return reduce


def sink_attention(lm, patch, word: str = "poem", reps: int = 400, last: int = 32, prefix: str = "") -> dict:
    """Attention mass on position 0 per layer (mean over heads and the last ``last`` queries) for
    ``<bos> prefix w*reps``, unpatched and patched. Also the same for ordinary text as reference."""
    ids, _ = repeat_ids(lm, word, reps, bos=True, prefix=prefix)
    if lm.n_ctx and len(ids) > lm.n_ctx:
        raise SinkholeError(f"{reps} repetitions exceed the model's context of {lm.n_ctx} tokens; use fewer")
    x = torch.as_tensor([ids], device=lm.device)
    out = {"word": word, "reps": reps, "last_queries": last}
    att_layers = lm.adapter.attention_layers
    for tag, p in (("before", None), ("after", patch)):
        h = Hooks(lm, check_finite=False)
        for layer in att_layers:
            h.read("attn_pattern", layer, reduce=_mass_reduce(last))
        with torch.no_grad(), _held(lm, p), h:
            h.forward(x, use_cache=False)
        out[tag] = [float(h.cache[f"attn_pattern.{i}"][0]) if i in att_layers else None
                    for i in range(lm.adapter.n_layers)]
    # reference: ordinary text (held-out), same queries
    text = heldout_texts(n=1, n_words=max(64, min(reps, 300)), seed=3)[0]
    tids = torch.as_tensor([lm.encode(text)[: len(ids)]], device=lm.device)
    h = Hooks(lm, check_finite=False)
    for layer in att_layers:
        h.read("attn_pattern", layer, reduce=_mass_reduce(last))
    with torch.no_grad(), h:
        h.forward(tids, use_cache=False)
    out["text_reference"] = [float(h.cache[f"attn_pattern.{i}"][0]) if i in att_layers else None
                             for i in range(lm.adapter.n_layers)]
    skip = min(2, lm.adapter.n_layers - 1)  # layers 0-1 have no sink yet in most models
    for tag in ("before", "after", "text_reference"):
        vals = [v for v in out[tag][skip:] if v is not None] or [v for v in out[tag] if v is not None]
        out[f"mean_{tag}"] = sum(vals) / len(vals)
    out["mean_over_layers_from"] = skip
    return out
