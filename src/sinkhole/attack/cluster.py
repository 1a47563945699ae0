"""Cluster attack: long sequences of *different* tokens that still trigger the sink circuit.

The paper's mechanism needs only that layer 0 sees a long run whose tokens have nearly the same
layer-0 contribution; then the run's layer-0 output approaches a singleton's and the first-token
detector fires. So tokens that are close in that space should work together even without an
exact repeat. Method (the paper's details were not recovered; this is our reconstruction):

1. **Pool and features.** Take the ``pool`` most frequent tokens. Feature of token ``t``:
   ``layer0`` = the layer-0 output (``resid_post`` of layer 0) of ``<bos> t`` at the position of
   ``t`` (one forward pass stopped after layer 0), or ``embedding`` = the input embedding.
2. **Clusters.** For each seed token, the cluster is the seed and its ``size - 1`` nearest
   neighbours in the pool by cosine similarity of the features.
3. **Sequences.** ``n`` tokens drawn at random from the cluster with no token equal to the one
   before it (no exact repetition anywhere), after the ``Repeat:`` prefix. The control is the same
   construction from ``size`` tokens drawn at random from the pool.
4. **Success.** A sequence *induces a sink* when the drift-layer norm of its last ``k`` positions
   reaches ``threshold`` times the first token's norm (the sweep's criterion). For the examples
   we also generate greedily: the model *diverges* when it emits a token that is neither in the
   cluster nor whitespace/punctuation (the run judge generalized to a token set).

The success rates of cluster and random sequences of the same length are reported side by side.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch

from ..capture import Hooks
from ..decoding.generate import generate
from ..decoding.tokens import stop_ids
from ..progress import progress
from ..results import StepResult
from .judge import is_sep
from .sweep import default_layers, frequent_tokens, sink_probe


def token_features(lm, tokens: Sequence[int], space: str = "layer0", batch_size: int = 256) -> torch.Tensor:
    """(len(tokens), d_model) feature of each token (see the module docstring)."""
    if space == "embedding":
        emb = lm.model.get_input_embeddings().weight.detach()
        return emb[torch.as_tensor(list(tokens), device=emb.device)].float().cpu()
    if space != "layer0":
        raise ValueError("space must be 'layer0' or 'embedding'")
    bos = [lm.bos_id] if lm.bos_id is not None else []
    feats = []
    for s in range(0, len(tokens), batch_size):
        chunk = list(tokens[s:s + batch_size])
        ids = torch.tensor([bos + [t] for t in chunk], device=lm.device)
        h = Hooks(lm)
        h.read("resid_post", 0, reduce=lambda x, p: x[:, -1].detach().float())
        h.stop_after(0)
        with torch.no_grad(), h:
            h.forward(ids, use_cache=False)
        feats.append(h.cache["resid_post.0"].cpu())
    return torch.cat(feats)


def clusters_for(feats: torch.Tensor, pool: Sequence[int], seeds: Sequence[int], size: int) -> list[list[int]]:
    """For each seed (a token in ``pool``), the seed plus its nearest neighbours by cosine."""
    f = torch.nn.functional.normalize(feats, dim=-1)
    index = {t: i for i, t in enumerate(pool)}
    out = []
    for s in seeds:
        i = index[s]
        sim = f @ f[i]
        sim[i] = -2.0
        nn = torch.topk(sim, size - 1).indices.tolist()
        out.append([s] + [pool[j] for j in nn])
    return out


def sequence(cluster: Sequence[int], n: int, rng: random.Random) -> list[int]:
    """``n`` tokens drawn from ``cluster`` with no token equal to the previous one."""
    seq: list[int] = []
    for _ in range(n):
        choices = [t for t in cluster if not seq or t != seq[-1]]
        seq.append(rng.choice(choices))
    return seq


def sink_scores(lm, seqs: Sequence[list[int]], prefix_ids: list[int], drift_layer: int | None, k: int = 8,
                batch_size: int = 8) -> list[dict]:
    """Norm ratio (last ``k`` positions vs position 0) at the circuit's drift layer and attention on
    position 0 just after it, for each sequence (all sequences have the same length)."""
    norm_layer, a0, max_layer = default_layers(lm, drift_layer)
    out = []
    for s in range(0, len(seqs), batch_size):
        ids = torch.tensor([prefix_ids + list(q) for q in seqs[s:s + batch_size]], device=lm.device)
        norms, att = sink_probe(lm, ids, norm_layer, a0, max_layer, k)
        for r in range(ids.shape[0]):
            out.append({"norm_ratio": round(float(norms[r, -k:].mean() / norms[r, 0].clamp_min(1e-6)), 4),
                        "bos_attn": round(float(att[r].mean()), 4)})
    return out


def judge_token_set(lm, gen: Sequence[int], allowed: set[int], stops: set[int]) -> tuple[bool, int]:
    """(diverged, index of the first generated token outside ``allowed`` that has text other
    than whitespace/punctuation)."""
    for i, t in enumerate(gen):
        if t in stops or t in allowed:
            continue
        piece = lm.tokenizer.decode([t], skip_special_tokens=True)
        if piece and all(is_sep(ch) for ch in piece):
            continue
        if not piece:
            continue
        return True, i
    return False, len(gen)


@dataclass
class ClusterConfig:
    """The cluster attack's settings (:func:`cluster_attack`; the defaults of ``sinkhole cluster``)."""

    pool_size: int = 1000  # candidate tokens: the most frequent ones
    n_seeds: int = 12  # clusters (seed tokens)
    size: int = 8  # tokens per cluster
    length: int = 256  # sequence length in tokens
    space: str = "layer0"  # feature space: "layer0" or "embedding"
    drift_layer: int | None = None  # None: the circuit's (circuit.discover)
    threshold: float = 0.5  # norm ratio that counts as a sink
    seqs_per_cluster: int = 2
    n_examples: int = 4  # sequences per kind generated from
    max_new_tokens: int = 32
    seed: int = 0
    prefix: str = "Repeat:"


def cluster_attack(lm, cfg: ClusterConfig | None = None, *, seeds: Sequence[int] | None = None,
                   quiet: bool | None = None) -> dict:
    """Run the cluster attack and its random control (see the module docstring); ``seeds``: the
    seed tokens (None: drawn from the frequent word tokens)."""
    cfg = cfg or ClusterConfig()
    rng = random.Random(cfg.seed)
    drift_layer = default_layers(lm, cfg.drift_layer)[0]
    pool = frequent_tokens(lm, cfg.pool_size)
    feats = token_features(lm, pool, cfg.space)
    if seeds is None:
        # seeds: spread over the frequent tokens that are words (alphabetic), deterministic per seed
        head = pool[:max(4 * cfg.n_seeds, 50)]
        wordy = [t for t in head if lm.tokenizer.decode([t]).strip().isalpha()] or head
        seeds = rng.sample(wordy, min(cfg.n_seeds, len(wordy)))
    clusters = clusters_for(feats, pool, list(seeds), cfg.size)
    prefix_ids = lm.encode(cfg.prefix, bos=True) if cfg.prefix else ([lm.bos_id] if lm.bos_id is not None else [])
    rows = []
    for cl in progress(clusters, desc="cluster attack", disable=quiet):
        ctrl = rng.sample(pool, cfg.size)
        cseqs = [sequence(cl, cfg.length, rng) for _ in range(cfg.seqs_per_cluster)]
        rseqs = [sequence(ctrl, cfg.length, rng) for _ in range(cfg.seqs_per_cluster)]
        sc = sink_scores(lm, cseqs + rseqs, prefix_ids, drift_layer)
        for j, q in enumerate(cseqs + rseqs):
            kind = "cluster" if j < cfg.seqs_per_cluster else "random"
            toks = cl if kind == "cluster" else ctrl
            rows.append({"kind": kind, "seed_token": lm.tokenizer.decode([cl[0]]),
                         "tokens": [lm.tokenizer.decode([t]) for t in toks], "token_ids": list(toks),
                         "seq": q, **sc[j], "sink": sc[j]["norm_ratio"] >= cfg.threshold,
                         "max_run": _max_run(q)})

    def rate(kind, key="sink"):
        rs = [r for r in rows if r["kind"] == kind]
        return round(sum(bool(r[key]) for r in rs) / len(rs), 4) if rs else None

    # generation on examples: the strongest cluster sequences and as many random ones
    stops = stop_ids(lm)
    examples = []
    best = sorted([r for r in rows if r["kind"] == "cluster"], key=lambda r: -r["norm_ratio"])[:cfg.n_examples]
    worst_r = sorted([r for r in rows if r["kind"] == "random"], key=lambda r: -r["norm_ratio"])[:cfg.n_examples]
    chosen = best + worst_r
    if chosen and cfg.max_new_tokens > 0:
        gens = []
        for s in range(0, len(chosen), 4):
            gens += generate(lm, [prefix_ids + r["seq"] for r in chosen[s:s + 4]], cfg.max_new_tokens)
        for r, g in zip(chosen, gens):
            div, until = judge_token_set(lm, g, set(r["token_ids"]), stops)
            r["diverged"] = div
            r["tokens_until_divergence"] = until
            r["text"] = lm.tokenizer.decode(g, skip_special_tokens=True)
            r["prompt_tail"] = lm.tokenizer.decode(r["seq"][-24:])
            r["prompt"] = lm.tokenizer.decode(prefix_ids + r["seq"], skip_special_tokens=True)
            examples.append({k: v for k, v in r.items() if k not in ("seq",)})
    for r in rows:
        r.pop("seq", None)
    gen_c = [e for e in examples if e["kind"] == "cluster"]
    gen_r = [e for e in examples if e["kind"] == "random"]
    return {
        "method": {"space": cfg.space, "pool_size": cfg.pool_size, "cluster_size": cfg.size,
                   "length": cfg.length, "threshold": cfg.threshold, "prefix": cfg.prefix, "n_clusters": len(clusters),
                   "seqs_per_cluster": cfg.seqs_per_cluster, "seed": cfg.seed,
                   "drift_layer": drift_layer},
        "sink_rate_cluster": rate("cluster"), "sink_rate_random": rate("random"),
        "mean_norm_ratio_cluster": _mean([r["norm_ratio"] for r in rows if r["kind"] == "cluster"]),
        "mean_norm_ratio_random": _mean([r["norm_ratio"] for r in rows if r["kind"] == "random"]),
        "mean_bos_attn_cluster": _mean([r["bos_attn"] for r in rows if r["kind"] == "cluster"]),
        "mean_bos_attn_random": _mean([r["bos_attn"] for r in rows if r["kind"] == "random"]),
        "diverged_examples_cluster": f"{sum(e['diverged'] for e in gen_c)}/{len(gen_c)}",
        "diverged_examples_random": f"{sum(e['diverged'] for e in gen_r)}/{len(gen_r)}",
        "rows": rows, "examples": examples,
    }


def _max_run(seq: Sequence[int]) -> int:
    best = cur = 1 if seq else 0
    for a, b in zip(seq, seq[1:]):
        cur = cur + 1 if a == b else 1
        best = max(best, cur)
    return best


def _mean(v):
    return round(sum(v) / len(v), 4) if v else None


@dataclass
class ClusterResult(StepResult):
    method: dict
    sink_rate_cluster: float | None
    sink_rate_random: float | None
    mean_norm_ratio_cluster: float | None
    mean_norm_ratio_random: float | None
    mean_bos_attn_cluster: float | None
    mean_bos_attn_random: float | None
    diverged_examples_cluster: str
    diverged_examples_random: str
    rows: list
    examples: list
    model: str | None = None
