"""Text fidelity of a patch: does the patched model read ordinary text exactly as the unpatched one?

Two sources (a shipped play the search never trains on, and text the unpatched model generates from
varied prompts), with and without BOS, in windows of 64, 512 and 2,048 tokens: top-1 agreement, mean
KL and perplexity change for every setting, for every method of the broad verification.
"""

from __future__ import annotations

import math
import random

import torch

from ..attack.prompts import chat_ids, has_chat_template
from ..data import TEXTS
from ..data import load_text as shipped
from ..decoding.engines import LlamaCpp, TorchGate
from ..decoding.gate import RunGate, gate_expiry, hidden_mask
from ..decoding.state_check import read_state
from ..decoding.generate import generate
from ..errors import SinkholeError
from ..evaluate.metrics import pair_sums
from ..models.attention import fast_attention
from ..models.gguf_cache import cache_dir
from ..progress import progress
from ..results import write_atomic
from .core import Patch, apply_patch

WINDOWS = (64, 512, 2048)


TEXT_TOKENS = 2048  # scored tokens per text setting (e.g. 32 windows of 64)


GEN_PROMPTS = (
    "Write a short story about a lighthouse keeper.", "Explain how photosynthesis works.",
    "Give me three tips for learning a new language.", "What is the history of the printing press?",
    "Describe a busy market in the morning.", "How do I bake bread at home?",
    "Write a letter to a friend about a trip to the mountains.", "Summarize the causes of the First World War.",
    "What makes a good team leader?", "Explain recursion to a beginner programmer.",
    "Describe the life cycle of a butterfly.", "Write a poem about the sea at night.",
    "What are the benefits of regular exercise?", "How does a bicycle stay upright?",
    "Tell me about the planets of the solar system.", "Write a product description for a wooden chair.",
)


def generated_text(lm, n_tokens: int = 160, seed: int = 0) -> str:
    """Text the unpatched model writes from :data:`GEN_PROMPTS` (sampled at temperature 0.8,
    seeded), the answers joined by blank lines: closer to its training distribution than a play."""
    prompts = [(chat_ids(lm, p) if has_chat_template(lm) else lm.encode(p + "\n", bos=True)) for p in GEN_PROMPTS]
    outs = []
    for i in range(0, len(prompts), 8):
        outs += generate(lm, prompts[i:i + 8], n_tokens, temperature=0.8, seed=seed + i)
    return "\n\n".join(lm.tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs)


def text_tokens(lm, source: str, seed: int = 0, need: int = TEXT_TOKENS) -> list[int]:
    """The token stream of a text source: ``generated`` (the model's own text, kept in the sinkhole
    cache per model and seed, since generating it takes a minute on a CPU) or a shipped text name /
    .txt path (a random stretch of it, chosen by ``seed``)."""
    if source == "generated":
        return _generated_tokens(lm, seed, need)

    if source in TEXTS:
        body = shipped(source)
    else:
        from pathlib import Path

        p = Path(source)
        if not p.exists():
            raise SinkholeError(f"text source {source!r} is neither a shipped text ({', '.join(TEXTS)}), "
                                "'generated', nor a file")
        body = p.read_text(encoding="utf-8", errors="replace")
    toks = lm.encode(body, bos=False)
    if len(toks) < need:
        raise SinkholeError(f"text source {source!r} has {len(toks)} tokens; need at least {need}")
    start = random.Random(seed).randrange(0, len(toks) - need + 1)
    return toks[start:start + need]


def _generated_tokens(lm, seed: int, need: int) -> list[int]:
    import hashlib
    import json

    sig = {"name": lm.name, "n_layers": lm.adapter.n_layers, "d_model": lm.adapter.d_model,
           "vocab": int(lm.model.config.vocab_size), "prompts": GEN_PROMPTS, "seed": seed,
           "weights": float(next(lm.model.parameters()).detach().flatten()[:64].double().sum())}
    key = hashlib.sha256(json.dumps(sig, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "generated-text" / f"{key}.json"
    try:
        toks = json.loads(path.read_text())["tokens"]
        if len(toks) >= need:
            return toks[:need]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    toks = []
    k = 0
    while len(toks) < need and k < 6:
        toks += lm.encode(generated_text(lm, seed=seed + 100 * k) + "\n\n", bos=False)
        k += 1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps({"model": lm.name, "seed": seed, "tokens": toks}))
    except OSError:
        pass  # an unwritable cache only costs the next run the generation
    return toks[:need]


def _windows(lm, toks: list[int], window: int, bos: bool, total: int) -> list[list[int]]:
    n = max(1, total // window)
    rows = []
    for i in range(n):
        w = toks[i * window:(i + 1) * window]
        if len(w) < window:
            break
        rows.append(([lm.bos_id] + w[:-1]) if bos and lm.bos_id is not None else w)
    return rows


def _forward(lm, rows: list[list[int]], patch=None, transform=None, batch: int = 8):
    """Logits (list of (T-1, V) per row) of the model (with ``patch``) on ``rows``; with
    ``transform`` (the input-side collapse) the model reads the transformed row and each kept
    position's logits stand for its original position, a deleted one takes its last kept one's.
    ``patch`` may also be a :class:`sinkhole.decoding.engines.LlamaCpp` made with ``logits_all``: llama.cpp's
    own logits (gated if the engine has a gate), or a :class:`~sinkhole.decoding.engines.TorchGate` without a gate
    over another model (a stock rewrite): that model's logits."""
    out = []
    if isinstance(patch, (LlamaCpp, TorchGate)):  # an engine: its own logits
        for r in rows:
            seen = list(transform(r)) if transform else r
            g = torch.from_numpy(patch.logits(seen))
            if len(seen) != len(r):
                g = g[_kept_index(r, transform)]
            out.append(g[:-1])
        return out
    with torch.no_grad(), fast_attention(lm), apply_patch(lm, patch, validate=False):
        for i in range(0, len(rows), batch):
            part = rows[i:i + batch]
            seen = [list(transform(r)) if transform else r for r in part]
            if len({len(s) for s in seen}) == 1:
                lg = lm.model(input_ids=torch.tensor(seen, device=lm.device), use_cache=False).logits.float()
                got = [lg[j] for j in range(len(seen))]
            else:
                got = [lm.model(input_ids=torch.tensor([s], device=lm.device), use_cache=False).logits.float()[0]
                       for s in seen]
            for r, s, g in zip(part, seen, got):
                if len(s) != len(r):
                    g = g[_kept_index(r, transform)]
                out.append(g[:-1])
    return out


def _kept_index(row: list[int], transform) -> torch.Tensor:
    """For each original position, the index in the collapsed row of its last kept position."""
    gate = getattr(transform, "gate", None)
    if gate is None:
        return torch.arange(len(row))
    t = torch.tensor([row])
    keep = (gate_expiry(t, gate, read_state(getattr(transform, "lm", None), t, gate))[0] >= len(row)).long()
    return (keep.cumsum(0) - 1).clamp_min(0)


def fidelity(lm, methods: dict, sources=("twelfth_night", "generated"), windows=WINDOWS, total: int = TEXT_TOKENS,
             seed: int = 0, quiet: bool | None = None, texts: dict | None = None, base=(None, None)) -> dict:
    """Per method, per text setting (source x BOS x window): top-1 agreement with the unpatched
    model, mean KL (nats/token), perplexity change (%), how many tokens the gate hides and whether
    the method's forward *is* the reference's (``same_forward``: a gate that hides no token of the
    windows, or a collapse that changes none, runs exactly the reference computation, which is then
    not repeated). ``methods``: name -> (patch or None, input transform or None); ``base``: the reference, the
    unpatched model in transformers unless given (e.g. a llama.cpp engine, for llama.cpp's logits)."""
    texts = dict(texts or {})
    settings = [(s, b, w) for s in sources for b in (False, True) for w in windows]
    res: dict = {name: [] for name in methods}
    for src, bos, win in progress(settings, desc="fidelity", disable=quiet):
        if src not in texts:
            texts[src] = text_tokens(lm, src, seed=seed, need=max(total, max(windows)))
        rows = _windows(lm, texts[src], win, bos, total)
        if not rows:
            raise SinkholeError(f"text source {src!r} is shorter than one {win}-token window")
        tgts = [torch.tensor(r[1:], device=lm.device) for r in rows]
        plan = {}
        for name, (patch, transform) in methods.items():
            gate = getattr(patch, "gate", None) or getattr(transform, "gate", None) or RunGate()
            hidden = int(sum(int(hidden_mask([r], gate, read_state(lm, [r], gate)).sum()) for r in rows))
            # nothing to hide: the collapse sends the same input, and a gate-only patch's hooks return
            # before touching anything (bit-identical: tests/test_gate.py, tests/test_patch_real.py), so
            # the method's forward is the reference forward and is not run again
            same = hidden == 0 and (
                (patch is base[0] and transform is not None)
                or (isinstance(patch, Patch) and patch.gate is not None and not patch.ops and not patch.weights
                    and transform is None and base[0] is None))
            plan[name] = (hidden, same)
        ref = None if all(same for _, same in plan.values()) else _forward(lm, rows, *base)
        n_scored = sum(int(t.numel()) for t in tgts)
        for name, (patch, transform) in methods.items():
            hidden, same = plan[name]
            rec = {"source": src, "bos": bos, "window": win, "n_windows": len(rows), "n_tokens": n_scored,
                   "gated_tokens": hidden, "same_forward": bool(same)}
            if same:  # the same logits as the reference: equal by construction
                res[name].append({**rec, "top1_agreement": 1.0, "mean_kl_nats": 0.0, "ppl_change_pct": 0.0})
                continue
            after = _forward(lm, rows, patch, transform)
            sums = [pair_sums(lb, la, t) for lb, la, t in zip(ref, after, tgts)]
            nb, na, kl, agree, n = (sum(x[k] for x in sums) for k in ("nll_before", "nll_after", "kl", "agree", "n"))
            res[name].append({**rec, "top1_agreement": agree / n, "mean_kl_nats": kl / n,
                              "ppl_change_pct": 100.0 * (math.exp((na - nb) / n) - 1.0)})
    return res
