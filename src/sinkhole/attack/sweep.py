"""Vocabulary sweep: how many repetitions of each token it takes to induce a sink.

For each token ``t`` we run ``<bos> prefix t t ... t`` (``max_reps`` copies; the default prefix
is the paper's ``Repeat:``) once, stopped after a few layers, and read at the circuit's drift layer the
residual norm of every run position divided by the norm of position 0 (the real first token).
The prefix matters on SmolLM2: right after its BOS (``<|im_start|>``, normally followed by a
role name) many tokens get a first-token-sized norm at position 1 whatever follows, which would
make "1 repetition" a position artefact rather than a repetition effect; pass ``prefix=""`` for
the bare ``<bos> t t t`` input. ``reps_to_sink`` is the first repetition whose ratio reaches
``threshold`` (default 0.5: the repeated token's state is at least half as large as a first
token's; the typical token is ~0.1 on SmolLM2), or None if it never does within ``max_reps``.
The same pass gives the generation-free predictor's features at the end of the run (attention on
position 0 just after the drift layer, the final norm ratio). With ``generate_tokens > 0`` each
token is also continued greedily after the paper's ``Repeat:`` template and judged.

Tokens are ranked "most dangerous first": fewest repetitions to a sink, then highest final norm
ratio. The sweep is batched (all runs of one batch have the same length, so no padding),
checkpointed to a JSON file after every batch (rerun with the same file to resume), and can be
split into shards (``shard``/``num_shards``, or the ``RANK``/``WORLD_SIZE`` variables that
``torchrun`` and ``accelerate launch`` set); each shard writes its own checkpoint and
:func:`merge` joins them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..capture import Hooks
from ..circuit import discover
from ..circuit.circuit import STATE_RATIO
from ..data import load_text
from ..errors import SinkholeError
from ..progress import progress
from ..results import StepResult, write_json
from .diverge import run_cases
from .prompts import Case

SWEEP_VERSION = 2  # 2: the layer is the circuit's drift layer (config key drift_layer)


def frequent_tokens(lm, n: int | None, texts: Sequence[str] | None = None) -> list[int]:
    """The ``n`` most frequent tokens in the shipped texts (ties by id), then the lowest
    remaining ids (early BPE merges are frequent) until there are ``n``; None = whole
    vocabulary. Special tokens are left out."""
    vocab = int(getattr(lm.model.config, "vocab_size", 0) or len(lm.tokenizer))
    special = set(int(i) for i in (getattr(lm.tokenizer, "all_special_ids", None) or []))
    for v in (lm.bos_id, getattr(lm.tokenizer, "eos_token_id", None), getattr(lm.tokenizer, "pad_token_id", None)):
        if isinstance(v, int):
            special.add(v)
    if n is None or n >= vocab:
        return [i for i in range(vocab) if i not in special]
    if texts is None:
        texts = [load_text(name) for name in ("sonnets", "tempest", "twelfth_night")]
    counts: Counter = Counter()
    for t in texts:
        counts.update(lm.encode(t, bos=False))
    ranked = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if t not in special and t < vocab]
    seen = set(ranked)
    out = ranked[:n]
    i = 0
    while len(out) < n and i < vocab:
        if i not in seen and i not in special:
            out.append(i)
        i += 1
    return out


def shard_from_env() -> tuple[int, int]:
    """(shard, num_shards) from torchrun / accelerate launch environment variables."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        return 0, 1


@dataclass
class SweepConfig:
    """The sweep's settings (:func:`sweep_tokens`; the checkpoint records them)."""

    drift_layer: int | None = None  # None: the circuit's (circuit.discover)
    max_reps: int = 256
    threshold: float = STATE_RATIO  # norm ratio that counts as a sink (the circuit's)
    batch_size: int = 16
    k: int = 8  # positions at the end of the run read for the final ratio and the attention
    generate_tokens: int = 0  # > 0: also continue each token greedily and judge it
    prefix: str = "Repeat:"


def sweep_tokens(lm, tokens: Sequence[int], cfg: SweepConfig | None = None, *, checkpoint: str | Path | None = None,
                 quiet: bool | None = None, extra: dict | None = None) -> dict:
    """Sweep ``tokens``; returns ``{"config": ..., "records": {token_id: {...}}}``. With a
    ``checkpoint`` path, records already there are kept (resume) and the file is rewritten
    atomically after each batch. ``extra``: more keys for the recorded config (``shard``,
    ``num_shards``)."""
    cfg = cfg or SweepConfig()
    norm_layer, a0, max_layer = default_layers(lm, cfg.drift_layer)
    settings = {"version": SWEEP_VERSION, "model": lm.name, "drift_layer": norm_layer,
                "attn_layers": [a0, max_layer], "max_reps": int(cfg.max_reps), "threshold": float(cfg.threshold),
                "k": int(cfg.k), "generate_tokens": int(cfg.generate_tokens), "prefix": cfg.prefix, **(extra or {})}
    if lm.n_ctx and cfg.max_reps + 2 > lm.n_ctx:
        raise SinkholeError(f"--max-reps {cfg.max_reps} exceeds the model's context of {lm.n_ctx}; lower it")
    if cfg.max_reps < cfg.k + 1:
        raise SinkholeError(f"--max-reps must be at least {cfg.k + 1}")
    records: dict[str, dict] = {}
    if checkpoint is not None and Path(checkpoint).exists():
        try:
            saved = json.loads(Path(checkpoint).read_text())
        except (OSError, ValueError):
            raise SinkholeError(f"checkpoint {checkpoint} is unreadable; delete it or pass another --checkpoint")
        old = {k2: v for k2, v in saved.get("config", {}).items() if k2 not in ("shard", "num_shards")}
        new = {k2: v for k2, v in settings.items() if k2 not in ("shard", "num_shards")}
        if old != new:
            raise SinkholeError(f"checkpoint {checkpoint} was written with other settings ({_diff(old, new)}); "
                                "use the same settings, or another --checkpoint")
        records = saved.get("records", {})
    todo = [int(t) for t in tokens if str(int(t)) not in records]
    bos = lm.encode(cfg.prefix, bos=True) if cfg.prefix else ([lm.bos_id] if lm.bos_id is not None else [])
    dev = lm.device
    batches = [todo[i:i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    for batch in progress(batches, desc="sweep", total=len(batches), disable=quiet):
        ids = torch.tensor([bos + [t] * cfg.max_reps for t in batch], device=dev)
        norms, att = sink_probe(lm, ids, norm_layer, a0, max_layer, cfg.k)
        off = len(bos)
        for r, t in enumerate(batch):
            ratio = norms[r, off:] / norms[r, 0].clamp_min(1e-6)  # per repetition
            hit = (ratio >= cfg.threshold).nonzero()
            records[str(t)] = {
                "token_id": t, "token": lm.tokenizer.decode([t]),
                "reps_to_sink": int(hit[0, 0]) + 1 if len(hit) else None,
                "final_norm_ratio": round(float(ratio[-cfg.k:].mean()), 4),
                "max_norm_ratio": round(float(ratio.max()), 4),
                "bos_attn": round(float(att[r].mean()), 4),
            }
        if cfg.generate_tokens > 0:
            _generate_batch(lm, batch, records, bos, cfg.max_reps, cfg.generate_tokens, cfg.prefix)
        if checkpoint is not None:
            write_json(checkpoint, {"config": settings, "records": records})
    return {"config": settings, "records": records}


def _generate_batch(lm, batch, records, head, reps, n_new, prefix):
    tname = "repeat" if prefix == "Repeat:" else ("raw" if not prefix else "custom")
    cases = [Case(lm.tokenizer.decode([t]).strip() or str(t), reps, tname, head + [t] * reps, [t]) for t in batch]
    for t, r in zip(batch, run_cases(lm, cases, max_new_tokens=n_new, batch_size=len(cases), quiet=True)):
        records[str(t)].update({"diverged": r.diverged, "tokens_until_divergence": r.tokens_until_divergence,
                                "text": r.text})


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:4])


def rank(records: dict) -> list[dict]:
    """Records, most dangerous first (fewest reps to a sink, then highest final norm ratio)."""
    big = 10**9
    return sorted(records.values(), key=lambda r: (r["reps_to_sink"] if r["reps_to_sink"] is not None else big,
                                                   -r["final_norm_ratio"], r["token_id"]))


def summarize(result: dict, top: int = 20) -> dict:
    recs = rank(result["records"])
    n = len(recs)
    sunk = [r for r in recs if r["reps_to_sink"] is not None]
    out = {"config": result["config"], "n_tokens": n,
           "frac_sink_within_max_reps": round(len(sunk) / n, 4) if n else None,
           "median_reps_to_sink": (sorted(r["reps_to_sink"] for r in sunk)[len(sunk) // 2] if sunk else None),
           "top": recs[:top], "safest": recs[-min(5, n):] if n else []}
    gen = [r for r in recs if "diverged" in r]
    if gen:
        out["generation_rate"] = round(sum(r["diverged"] for r in gen) / len(gen), 4)
    return out


def merge(paths: Sequence[str | Path]) -> dict:
    """Join shard checkpoints (same settings) into one result."""
    cfg, records = None, {}
    for p in paths:
        if not Path(p).is_file():
            raise SinkholeError(f"shard checkpoint {p} is not a file; pass the files a sharded sweep wrote")
        try:
            d = json.loads(Path(p).read_text())
        except (OSError, ValueError):
            raise SinkholeError(f"cannot read shard checkpoint {p}")
        if (not isinstance(d, dict) or not isinstance(d.get("config"), dict) or not isinstance(d.get("records"), dict)
                or d["config"].get("version") != SWEEP_VERSION):
            raise SinkholeError(f"{p} is not a sweep checkpoint of this sinkhole version; pass the files a sharded "
                                "sweep wrote")
        c = {k: v for k, v in d["config"].items() if k not in ("shard", "num_shards")}
        if cfg is None:
            cfg = c
        elif c != cfg:
            raise SinkholeError(f"shard {p} used other settings ({_diff(cfg, c)}); merge shards of one sweep only")
        records.update(d.get("records", {}))
    if cfg is None:
        raise SinkholeError("no shard checkpoints to merge")
    return {"config": cfg, "records": records}


@dataclass
class SweepSummary(StepResult):
    config: dict
    n_tokens: int
    frac_sink_within_max_reps: float | None
    median_reps_to_sink: int | None
    top: list
    safest: list
    generation_rate: float | None = None


def _attn_to_first(k: int):
    def reduce(w: torch.Tensor, pos):  # w: (B, H, T), weight on each row's real first token
        return w[:, :, -k:].float().mean(1).detach()  # (B, k)
    return reduce


def _norms(x: torch.Tensor, pos):
    return x.detach().float().norm(dim=-1)  # (B, T)


def default_layers(lm, drift_layer: int | None = None) -> tuple[int, int, int]:
    """(norm_layer, first_attn_layer, max_layer): the norm at the circuit's drift layer (found
    with ``circuit.discover`` when not given), attention from just after it to a few layers
    later; everything stops well before the end of the model."""
    n = lm.adapter.n_layers
    if drift_layer is None:
        drift_layer = discover(lm).drift_layer
    s = min(max(int(drift_layer), 0), n - 1)
    first_attn = min(s + 1, n - 1)
    return s, first_attn, min(n - 1, first_attn + 3)


def sink_probe(lm, ids: torch.Tensor, norm_layer: int, a0: int, max_layer: int, k: int,
               attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One truncated forward pass: the residual norm at ``norm_layer`` for every position (B, T)
    and the attention on the first real token from the last ``k`` positions, averaged over
    layers ``a0..max_layer`` and heads (B, k). Both on the CPU."""
    h = Hooks(lm)
    att_layers = lm.adapter.attention_in(range(a0, max_layer + 1)) or \
        [min(lm.adapter.attention_layers, key=lambda i: (abs(i - a0), i))]  # a hybrid's nearest attention layer
    for L in att_layers:
        h.read("attn_first", L, reduce=_attn_to_first(k))
    h.read("resid_post", norm_layer, reduce=_norms)
    h.stop_after(max(max_layer, norm_layer, *att_layers))
    kw = {} if attention_mask is None else {"attention_mask": attention_mask.to(lm.device)}
    with torch.no_grad(), h:
        h.forward(ids.to(lm.device), use_cache=False, **kw)
    att = torch.stack([h.cache[f"attn_first.{L}"] for L in att_layers]).mean(0)
    return h.cache[f"resid_post.{norm_layer}"].cpu(), att.cpu()
