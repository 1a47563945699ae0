"""The ``attn_first`` site: the attention weight each query puts on the real first token,
without building the T x T attention pattern.

Eager attention materializes a (B, H, T, T) float32 pattern per layer (576 MB for SmolLM2 at
4,000 tokens) although the sink analyses only need its first column. While a ``Hooks`` block
reads ``attn_first`` (and no ``attn_pattern``), the model's attention implementation is switched
to :func:`attention` below: the fused CPU kernel returns the output and the log-sum-exp of each
query's scores, and the weight on key 0 is ``exp(q . k0 * scale - lse)``: O(T) memory, about
half the attention FLOPs (causal blocks are skipped). Layers without an ``attn_first`` read use
transformers' own ``sdpa`` function. Where the fast path does not apply (padding, KV cache,
soft-capping, GPU), the flagged layer computes the weights explicitly and keeps their first
real column, which is exact but not faster.
"""

from __future__ import annotations

import math

import torch

NAME = "sinkhole_first"
_FLAG = "_sinkhole_attn_first"
_registered = False


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def _first_key_column(mask: torch.Tensor | None, n_keys: int, bsz: int, device) -> torch.Tensor:
    """Index (B,) of the first key any query may attend to: the real first token."""
    if mask is None:
        return torch.zeros(bsz, dtype=torch.long, device=device)
    m = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    allowed = m[:, 0].any(dim=-2) if m.dim() == 4 else m.any(dim=-2)  # (B, Tk)
    allowed = allowed.expand(bsz, n_keys) if allowed.shape[0] == 1 else allowed
    return allowed.to(torch.int8).argmax(dim=-1)


def _explicit(module, query, key, value, mask, scaling, softcap=None):
    """Plain attention math (as eager) returning the output and the weight on the first key."""
    n_rep = query.shape[1] // key.shape[1]
    k, v = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    scores = torch.matmul(query, k.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    tq, tk = scores.shape[-2:]
    if mask is None and tq > 1:
        causal = torch.ones(tq, tk, dtype=torch.bool, device=scores.device).tril(tk - tq)
        mask = causal[None, None]
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask[..., :tk]
    w = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(w, v).transpose(1, 2).contiguous()
    first = _first_key_column(mask, tk, w.shape[0], w.device)
    w0 = w.gather(-1, first.view(-1, 1, 1, 1).expand(w.shape[0], w.shape[1], tq, 1))[..., 0]
    return out, w0


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention function for transformers' ``AttentionInterface`` (see the module doc)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not getattr(module, _FLAG, False):
        if kwargs.get("softcap") is not None:  # SDPA cannot soft-cap the logits (Gemma-2): eager math
            scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
            return _explicit(module, query, key, value, attention_mask, scale, kwargs["softcap"])[0], None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("attn_first does not support models with learned attention sinks; read attn_pattern")
    scaling = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    softcap = kwargs.get("softcap")
    fast = (query.device.type == "cpu" and attention_mask is None and softcap is None
            and query.shape[2] == key.shape[2] and not module.training
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))
    if not fast:
        return _explicit(module, query, key, value, attention_mask, scaling, softcap)
    n_rep = query.shape[1] // key.shape[1]
    k, v = _repeat_kv(key, n_rep), _repeat_kv(value, n_rep)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        query, k, v, 0.0, True, scale=scaling)
    s0 = (query.float() * k[:, :, :1].float()).sum(-1) * scaling  # (B, H, T): score on key 0
    w0 = torch.exp(s0 - lse.float()).to(query.dtype)
    return out.transpose(1, 2).contiguous(), w0


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    _registered = True


def _configs(model) -> list:
    seen, out = set(), []
    for cfg in [getattr(model, "config", None)] + [getattr(m, "config", None) for m in model.modules()]:
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal") and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


def switch_on(model, attn_modules) -> list:
    """Route attention through :func:`attention`; flag ``attn_modules``. Returns what to undo.

    Only models in eager or sdpa mode are switched (their attention is plain softmax attention);
    others keep their implementation and the ``attn_first`` read falls back to the full weights."""
    cfgs = _configs(model)
    if not cfgs or any(c._attn_implementation_internal not in ("eager", "sdpa") for c in cfgs):
        return []
    register()
    undo = [(c, c._attn_implementation_internal) for c in cfgs]
    for c in cfgs:
        c._attn_implementation_internal = NAME
    for m in attn_modules:
        setattr(m, _FLAG, True)
    return undo + [(m, None) for m in attn_modules]


def switch_off(undo: list) -> None:
    for obj, old in undo:
        if old is None:
            if hasattr(obj, _FLAG):
                delattr(obj, _FLAG)
        else:
            obj._attn_implementation_internal = old


def first_column(w: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
    """(B, H, Tq) weight on the real first key from a full (B, H, Tq, Tk) pattern."""
    if w.dim() == 3:
        return w
    b, _, tq, tk = w.shape
    if pos is None:
        first = torch.zeros(b, dtype=torch.long, device=w.device)
    else:
        last = pos[:, -1]
        first = torch.where(last >= 0, (tk - 1) - last, torch.zeros_like(last)).clamp(0, tk - 1)
    return w.gather(-1, first.view(-1, 1, 1, 1).expand(b, w.shape[1], tq, 1))[..., 0]
