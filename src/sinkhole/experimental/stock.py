"""A stock model file for a fix: the model rewritten in an architecture that stock engines load.

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

import contextlib
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..attack.families import CATALOGUE, build_case, check_disjoint
from ..attack.prompts import has_chat_template
from ..data import load_text
from ..decoding.engines import gguf_of
from ..errors import SinkholeError
from ..progress import progress
from .finetune import TRAIN_WORDS
from .gguf_export import gguf_weights, write_patched_gguf

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


def _rope(lm) -> dict:
    """``lm``'s RoPE parameters, or a one-line refusal of a model the stock rewrite does not cover."""
    cfg = lm.model.config
    if getattr(cfg, "model_type", None) != "llama":
        raise SinkholeError(f"a stock sink model is built from a Llama-architecture model; {lm.name} is "
                            f"{getattr(cfg, 'model_type', 'unknown')!r}")
    rope = dict(getattr(cfg, "rope_parameters", None) or {"rope_type": "default",
                                                         "rope_theta": getattr(cfg, "rope_theta", 10000.0)})
    if rope.get("rope_type", "default") != "default":
        raise SinkholeError(f"{lm.name} scales RoPE ({rope.get('rope_type')}); the stock sink model supports plain "
                            "RoPE only")
    return rope


def check_stock(lm) -> None:
    """Refuse, in one line and before any work, a model ``sinkhole experimental stock`` cannot rewrite: not a Llama
    architecture with plain RoPE, or not loaded from a GGUF (the stock folder holds a GGUF made from it)."""
    _rope(lm)
    if not (getattr(lm, "info", None) or {}).get("gguf"):
        raise SinkholeError("the stock route builds its GGUF from the model's own GGUF: pass an embedded model or a .gguf path "
                            f"(this model came from {getattr(lm, 'source', 'elsewhere')})")


def to_granite_swa(lm, sinks: torch.Tensor | None = None):
    """The Llama model of ``lm`` as a ``GraniteSWAForCausalLM`` with full attention (:func:`layer_types`) and the given
    ``sinks`` (layers x heads; default :data:`NO_SINK` everywhere: the same model). Refused in one line for
    any other architecture."""
    from transformers import GraniteSWAConfig, GraniteSWAForCausalLM

    src = lm.model
    cfg = src.config
    rope = _rope(lm)
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


STOCK_QUANTS = ("source", "Q8_0", "F16")


def stock_gguf(lm, sinks: torch.Tensor, out: str | os.PathLike, weights: dict | None = None, quant: str = "source",
               trained_type: str = "Q8_0") -> dict:
    """The GGUF ``lm`` was loaded from, rewritten as llama.cpp's ``granite_swa`` with the ``sinks`` (layers x
    heads) as ``blk.N.attn_sinks.weight`` and the trained MLP ``weights`` (Hugging Face names, as
    :func:`train_stock` returns them): the ``llama.*`` keys are renamed, and granite's scales are set to Llama's
    (logit, residual and embedding scale 1, attention scale 1/sqrt(head_dim), a sliding window only as wide
    as the training context). ``quant``: ``source`` copies every other tensor byte for byte in its own
    quantization (SmolLM2: Q4_1) and writes the trained ones in ``trained_type``; ``Q8_0`` or ``F16`` writes
    every matrix in that type."""
    if quant not in STOCK_QUANTS:
        raise SinkholeError(f"unknown stock GGUF type {quant!r}; use one of {', '.join(STOCK_QUANTS)}")
    changed = gguf_weights(weights or {}, "the stock model trains")
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
    whole = None if quant == "source" else quant
    return write_patched_gguf(gguf_of(lm), changed, out, whole or trained_type, arch="granite_swa", extra_kv=extra,
                              added=added, retype=whole)


# ------------------------------------------------------------------------------------------
# Training the sinks and the layers that read the first token (the circuit-local objective)

STOCK_TRAIN_FAMILIES = ("repeat", "open_wording", "garak_quoted", "chat_user", "chat_assistant", "comma", "newline",
                        "phrase", "raw", "filler", "mixture", "variants", "separators", "offset", "lookalike")


@dataclass
class StockConfig:
    """What :func:`train_stock` trains and on what. The sinks of ``sink_layers`` start at the first token's
    median self-score in each head (its output halved) and are trained with the MLPs of ``mlp_layers``;
    both are compared with the source model at the residual stream after layer ``stop - 1``."""

    sink_layers: tuple = (0,)  # every head of these layers gets a sink; the others keep NO_SINK
    sink_offset: float = -1.5  # initial sink: the head's median first-token self-score plus this
    mlp_layers: tuple = (0, 1, 2)
    stop: int = 3
    words: tuple = TRAIN_WORDS  # the fine-tuning patch's training words (disjoint from every held-out word)
    families: tuple = STOCK_TRAIN_FAMILIES
    reps: tuple = (64, 200, 600)
    texts: tuple = ("tempest", "sonnets")
    text_window: int = 64
    n_text_rows: int = 160
    early: int = 8  # the first positions of a text, where a sink acts most ...
    early_weight: float = 8.0  # ... count this many times in the keep term
    steps: int = 250
    lr: float = 2e-4
    sink_lr: float = 3e-2
    text_batch: int = 6
    run_batch: int = 2
    anchor: int = 8  # a token repeated this often is represented as at its anchor-th occurrence ...
    min_count: int = 16  # ... from its min_count-th occurrence on
    fix_weight: float = 0.5
    seed: int = 0

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@contextlib.contextmanager
def _first_layers(model, stop: int):
    """``model`` cut to its first ``stop`` layers: yields ``f(ids) -> residual stream after layer stop - 1``
    (no final norm), and puts the model back afterwards."""
    inner = model.model
    layers, norm = inner.layers, inner.norm
    inner.layers, inner.norm = torch.nn.ModuleList(list(layers)[:stop]), torch.nn.Identity()
    try:
        yield lambda ids: inner(input_ids=ids, use_cache=False).last_hidden_state
    finally:
        inner.layers, inner.norm = layers, norm


def occurrence_targets(ids, anchor: int, min_count: int) -> list[tuple[int, int]]:
    """(position, anchor position) for every token seen at least ``min_count`` times before it: such a
    position should be represented as the same token's ``anchor``-th occurrence was. Needs no unit, so
    it covers runs with fillers, mixtures, variants and offsets alike."""
    seen: dict[int, list[int]] = {}
    out = []
    for j, t in enumerate(ids):
        occ = seen.setdefault(int(t), [])
        if len(occ) >= min_count:
            out.append((j, occ[anchor - 1]))
        occ.append(j)
    return out


def _train_word(fam: str, rng: random.Random, words: tuple) -> str:
    """A training word for ``fam``: phrases and mixtures take two to four training words."""
    spec = CATALOGUE[fam]
    if fam in ("phrase", "offset"):
        return " ".join(rng.sample(words, 3))
    if spec.build == "mixture":
        return " ".join(rng.sample(words, rng.randint(2, 4)))
    return rng.choice(words)


def _stock_examples(lm, cfg: StockConfig, rng: random.Random) -> list[list[int]]:
    """Token rows of every training family x repetition count, half of them without BOS."""
    check_disjoint(cfg.words)
    rows = []
    for fam in cfg.families:
        if fam not in CATALOGUE or CATALOGUE[fam].build == "cluster":
            raise SinkholeError(f"unknown or unusable training family {fam!r}")
        if CATALOGUE[fam].chat and not has_chat_template(lm):
            continue
        for reps in cfg.reps:
            ids = list(build_case(lm, fam, _train_word(fam, rng, cfg.words), reps, rng).ids)
            if lm.bos_id is not None and ids[0] == lm.bos_id and rng.random() < 0.5:
                ids = ids[1:]
            rows.append(ids)
    return rows


def _text_rows(lm, cfg: StockConfig, rng: random.Random) -> torch.Tensor:
    toks = [t for name in cfg.texts for t in lm.encode(load_text(name), bos=False)]
    w = cfg.text_window
    rows = []
    for _ in range(cfg.n_text_rows):
        i = rng.randrange(0, len(toks) - w)
        r = toks[i:i + w]
        rows.append(([lm.bos_id] + r[:-1]) if lm.bos_id is not None and len(rows) % 2 else r)
    return torch.tensor(rows)


def _err(h: torch.Tensor, t: torch.Tensor, typ2: float) -> torch.Tensor:
    """Squared error per position, in units of a typical text state's squared norm: the first token's state
    (many times the typical norm, and read by every later position) weighs in by its absolute error."""
    return ((h - t) ** 2).sum(-1) / typ2


def first_token_scores(model, ids: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """Each head's attention score of the first token on itself at ``layer`` (rows of ``ids``; position 0
    has no rotation), from the layer's own projections: (rows, heads)."""
    attn = model.model.layers[layer].self_attn
    cfg = model.config
    hd, nh, nkv = _head_dim(cfg), cfg.num_attention_heads, cfg.num_key_value_heads
    with torch.no_grad():
        x = model.model.layers[layer].input_layernorm(model.model.embed_tokens(ids[:, :1]) * cfg.embedding_multiplier)
        q = attn.q_proj(x).view(-1, nh, hd)
        k = attn.k_proj(x).view(-1, nkv, hd).repeat_interleave(nh // nkv, dim=1)
        return (q * k).sum(-1) * cfg.attention_multiplier


def train_stock(lm, cfg: StockConfig | None = None, log=None) -> dict:
    """Train the stock model's sinks and the MLPs that read the first token (``lm`` is left unchanged).

    At the residual stream after layer ``stop - 1`` (SmolLM2: after the marking layers 1-2), against the
    source model:

    * **keep**: every position of ordinary text (with and without BOS; the first token included, so the
      attention sink keeps its state), and every run position before its token's ``min_count``-th
      occurrence, stays where it was;
    * **fix**: a run position whose token has occurred ``min_count`` times is represented as that token's
      ``anchor``-th occurrence was (a short run's state, which does not diverge).

    The sinks are what make this possible: without one, a long run's layer-0 state converges to a lone
    first token's (the paper's Theorem 4.1) and no later weight can tell them apart; with one, a lone first
    token's head output is scaled by ``sigmoid(score - sink)`` and a long run's by nearly 1.

    Returns ``{"sinks": (layers x heads), "weights": {hf name: tensor}, "meta": {...}}``."""
    cfg = cfg or StockConfig()
    n = lm.adapter.n_layers
    if not 0 < cfg.stop <= n or any(not 0 <= int(i) < cfg.stop for i in (*cfg.mlp_layers, *cfg.sink_layers)):
        raise SinkholeError(f"trained layers must lie before the comparison layer {cfg.stop} (of {n})")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = to_granite_swa(lm)
    t0 = time.perf_counter()
    text = _text_rows(lm, cfg, rng)
    runs = _stock_examples(lm, cfg, rng)
    with torch.no_grad(), _first_layers(model, cfg.stop) as f:
        text_ref = torch.cat([f(text[i:i + 16]) for i in range(0, len(text), 16)])
        run_ref = [f(torch.tensor([r]))[0] for r in runs]
    typ2 = float(text_ref[:, 1:].norm(dim=-1).median()) ** 2
    pos_w = torch.ones(text.shape[1])
    pos_w[:cfg.early] = cfg.early_weight
    fixes = [occurrence_targets(r, cfg.anchor, cfg.min_count) for r in runs]
    layers = sorted({int(L) for L in cfg.sink_layers})
    params = {f"model.layers.{L}.self_attn.sinks": model.model.layers[L].self_attn.sinks for L in layers}
    with torch.no_grad():
        for L in layers:
            params[f"model.layers.{L}.self_attn.sinks"].copy_(
                first_token_scores(model, text, L).median(0).values + cfg.sink_offset)
    mlp = {f"model.layers.{L}.mlp.{k}": p for L in cfg.mlp_layers
           for k, p in model.model.layers[L].mlp.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in (*params.values(), *mlp.values()):
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": list(params.values()), "lr": cfg.sink_lr},
                            {"params": list(mlp.values()), "lr": cfg.lr}])
    history = []
    with _first_layers(model, cfg.stop) as f:
        for step in progress(range(cfg.steps), desc="train stock sinks", total=cfg.steps):
            opt.zero_grad(set_to_none=True)
            sel = rng.sample(range(len(text)), min(cfg.text_batch, len(text)))
            keep = (_err(f(text[sel]), text_ref[sel], typ2) * pos_w).sum(-1).mean() / pos_w.sum()
            fix_terms, keep_terms = [], []
            for k in rng.sample(range(len(runs)), min(cfg.run_batch, len(runs))):
                h = f(torch.tensor([runs[k]]))[0]
                tgt = run_ref[k].clone()
                pos = torch.tensor([j for j, _ in fixes[k]], dtype=torch.long)
                if len(pos):
                    tgt[pos] = run_ref[k][torch.tensor([a for _, a in fixes[k]], dtype=torch.long)]
                    mask = torch.zeros(len(runs[k]), dtype=torch.bool)
                    mask[pos] = True
                    fix_terms.append(_err(h[mask], tgt[mask], typ2).mean())
                    keep_terms.append(_err(h[~mask], tgt[~mask], typ2).mean())
                else:
                    keep_terms.append(_err(h, tgt, typ2).mean())
            fix = torch.stack(fix_terms).mean() if fix_terms else torch.zeros(())
            keep = (keep + torch.stack(keep_terms).mean()) / 2
            loss = keep + cfg.fix_weight * fix
            loss.backward()
            opt.step()
            history.append({"step": step, "keep": round(keep.item(), 6), "fix": round(fix.item(), 6)})
            if log and (step % 25 == 0 or step == cfg.steps - 1):
                log(f"  step {step}: keep {keep.item():.5f}, fix {fix.item():.4f}")
    out_sinks = _sinks(model.config, None)
    for L in layers:
        out_sinks[L] = model.model.layers[L].self_attn.sinks.detach().clone()
    weights = {k: p.detach().clone() for k, p in mlp.items()}
    return {"sinks": out_sinks, "weights": weights,
            "meta": {"config": cfg.to_dict(),
                     "sinks": {L: [round(float(x), 3) for x in out_sinks[L]] for L in layers},
                     "train_seconds": round(time.perf_counter() - t0, 1), "n_runs": len(runs),
                     "n_text_rows": len(text), "history": history[-1:]}}


def stock_model(lm, trained: dict):
    """The stock granite_swa model of ``lm`` with ``trained``'s sinks and weights."""
    model = to_granite_swa(lm, trained["sinks"])
    sd = model.state_dict()
    with torch.no_grad():
        for k, w in trained["weights"].items():
            if k not in sd:
                raise SinkholeError(f"the trained weight {k} is not a parameter of the stock model")
            sd[k].copy_(w)
    return model
