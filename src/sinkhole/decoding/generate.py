"""Batched generation with the KV cache (greedy, or seeded temperature sampling)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..models.attention import fast_attention
from .tokens import pad_id, pad_left, stop_ids


def generate(lm, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float | None = None,
             seed: int = 0) -> list[list[int]]:
    """Greedy KV-cache continuation of a batch of prompts (left padded, SDPA attention where the
    model has it); returns the generated ids of each row, cut after the first stop token. With ``temperature``: pure temperature
    sampling (no top-k or top-p), seeded by ``seed``."""
    pad = pad_id(lm)
    stops = stop_ids(lm)
    width = max(len(p) for p in prompts)
    ids, mask = pad_left(lm, prompts)
    sample = temperature is not None
    if sample:
        torch.manual_seed(int(seed))
    with torch.no_grad(), fast_attention(lm):  # no pattern is read while generating: SDPA, as the exact check
        out = lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=int(max_new_tokens),
                                do_sample=sample, num_beams=1, pad_token_id=pad,
                                eos_token_id=sorted(stops) if stops else None, top_p=1.0 if sample else None,
                                top_k=0 if sample else None, temperature=float(temperature) if sample else None)
    rows = []
    for r in out[:, width:].tolist():
        cut = []
        for t in r:
            cut.append(t)
            if t in stops:
                break
        rows.append(cut)
    return rows
