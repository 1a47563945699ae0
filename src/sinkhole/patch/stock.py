"""A stock model file for a fix (issue 28): the model rewritten in an architecture that stock engines load.

The route measured first is *learned attention sinks*: an extra logit per attention head in the softmax's
denominator (gpt-oss was trained with one). ``transformers``' ``granite_swa`` is the Llama block plus such a
sink per layer and head (its eager attention scales each head's output by ``sigmoid(logsumexp(scores) -
sink)``, the same thing as the extra logit), with multipliers that reduce to Llama's and ``layer_types``
that may be full attention; llama.cpp has the same architecture (``granite_swa``, tensor
``blk.N.attn_sinks``). So a Llama model converts to it exactly, with every sink at :data:`NO_SINK`
(``sigmoid(x + 1e4)`` is 1.0 in float32, ``exp(-1e4)`` is 0): :func:`to_granite_swa` does that, and
:func:`parity` measures it.

What the sinks would change: a lone first token attends only to itself, so its head output is scaled by
``sigmoid(score - sink)``; a run of n copies of it by ``sigmoid(score + log n - sink)``, which tends to 1. With
a sink near the self-score, the run's layer-0 state no longer converges to the first token's (the
paper's Theorem 4.1 no longer holds), which is what the repeated-token attack relies on.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..decoding.engines import gguf_of
from ..errors import SinkholeError
from .gguf_export import write_patched_gguf

NO_SINK = -1.0e4  # a sink logit that changes nothing: sigmoid(lse + 1e4) == 1.0 and exp(-1e4) == 0 in float32


def layer_types(n: int) -> list[str]:
    """The stock model's attention types: llama.cpp's granite_swa refuses a model with no sliding-window layer
    (``GGML_ASSERT(hparams.is_swa_any())``), so layer 0 is a sliding layer whose window is the whole training
    context (``max_position_embeddings``): over any sequence the model can read, the same as full attention."""
    return ["sliding_attention"] + ["full_attention"] * (n - 1)


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _sinks(cfg, sinks) -> torch.Tensor:
    """``sinks`` as a float32 (layers x heads) tensor (default :data:`NO_SINK` everywhere), or a one-line error."""
    n, h = cfg.num_hidden_layers, cfg.num_attention_heads
    s = torch.full((n, h), NO_SINK) if sinks is None else torch.as_tensor(sinks, dtype=torch.float32)
    if tuple(s.shape) != (n, h):
        raise SinkholeError(f"sinks must be layers x heads = {n} x {h} (got {tuple(s.shape)})")
    return s


def to_granite_swa(lm, sinks: torch.Tensor | None = None):
    """The Llama model of ``lm`` as a ``GraniteSWAForCausalLM`` with full attention (:func:`layer_types`) and the given
    ``sinks`` (layers x heads; default :data:`NO_SINK` everywhere: the same model). Refused in one line for
    any other architecture."""
    from transformers import GraniteSWAConfig, GraniteSWAForCausalLM

    src = lm.model
    cfg = src.config
    if getattr(cfg, "model_type", None) != "llama":
        raise SinkholeError(f"a stock sink model is built from a Llama-architecture model; {lm.name} is "
                            f"{getattr(cfg, 'model_type', 'unknown')!r}")
    rope = dict(getattr(cfg, "rope_parameters", None) or {"rope_type": "default",
                                                         "rope_theta": getattr(cfg, "rope_theta", 10000.0)})
    if rope.get("rope_type", "default") != "default":
        raise SinkholeError(f"{lm.name} scales RoPE ({rope.get('rope_type')}); the stock sink model supports plain "
                            "RoPE only")
    head_dim = _head_dim(cfg)
    n, h = cfg.num_hidden_layers, cfg.num_attention_heads
    sinks = _sinks(cfg, sinks)
    new = GraniteSWAConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=n, num_attention_heads=h, num_key_value_heads=cfg.num_key_value_heads,
        head_dim=head_dim, hidden_act=cfg.hidden_act, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, pad_token_id=cfg.pad_token_id, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, tie_word_embeddings=bool(cfg.tie_word_embeddings), rope_parameters=rope,
        attention_bias=bool(getattr(cfg, "attention_bias", False)), mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        embedding_multiplier=1.0, logits_scaling=1.0, residual_multiplier=1.0,
        attention_multiplier=head_dim ** -0.5, sliding_window=cfg.max_position_embeddings,
        layer_types=layer_types(n))
    new._attn_implementation = "eager"
    model = GraniteSWAForCausalLM(new)
    state = {k: v for k, v in src.state_dict().items() if "rotary_emb" not in k}
    for i in range(n):
        state[f"model.layers.{i}.self_attn.sinks"] = sinks[i].clone()
    if new.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (new.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise SinkholeError(f"the Llama weights of {lm.name} do not map onto granite_swa: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
    if new.tie_word_embeddings:
        model.tie_weights()
    model.to(torch.float32).eval()
    return model


def parity(lm, model, ids) -> float:
    """Largest absolute logit difference between ``lm``'s model and ``model`` on the token rows ``ids``."""
    t = torch.as_tensor(ids, dtype=torch.long)
    t = t.unsqueeze(0) if t.dim() == 1 else t
    with torch.no_grad():
        a = lm.model(input_ids=t).logits.float()
        b = model(input_ids=t).logits.float()
    return float((a - b).abs().max())


def stock_gguf(lm, sinks: torch.Tensor, out: str | os.PathLike) -> dict:
    """The GGUF ``lm`` was loaded from, rewritten as llama.cpp's ``granite_swa`` with the ``sinks`` (layers x
    heads) as ``blk.N.attn_sinks.weight``: every tensor is copied byte for byte in its own quantization, the
    ``llama.*`` keys are renamed, and granite's scales are set to Llama's (logit, residual and embedding scale
    1, attention scale 1/sqrt(head_dim), a sliding window only as wide as the training context)."""
    from gguf import GGUFValueType

    cfg = lm.model.config
    head_dim = _head_dim(cfg)
    n = cfg.num_hidden_layers
    f32, u32 = GGUFValueType.FLOAT32, GGUFValueType.UINT32
    extra = {"logit_scale": (1.0, f32, None), "residual_scale": (1.0, f32, None),
             "embedding_scale": (1.0, f32, None), "attention.scale": (float(head_dim) ** -0.5, f32, None),
             "attention.sliding_window": (int(cfg.max_position_embeddings), u32, None),
             "attention.sliding_window_pattern": ([t == "sliding_attention" for t in layer_types(n)],
                                                  GGUFValueType.ARRAY, GGUFValueType.BOOL)}
    s = _sinks(cfg, sinks)
    added = {f"blk.{i}.attn_sinks.weight": s[i].numpy().astype(np.float32) for i in range(n)}
    return write_patched_gguf(gguf_of(lm), {}, out, "F32", arch="granite_swa", extra_kv=extra, added=added)
