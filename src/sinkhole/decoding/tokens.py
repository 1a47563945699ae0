"""Token helpers every decoder shares: stop and special ids, the pad id, left padding, and the
per-token pieces of a decoded text."""

from __future__ import annotations

from typing import Sequence

import torch


def stop_ids(lm) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(lm.model, "generation_config", None), lm.model.config, lm.tokenizer):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    return ids


def pad_id(lm) -> int:
    for src in (lm.tokenizer, getattr(lm.model, "generation_config", None), lm.model.config):
        p = getattr(src, "pad_token_id", None)
        if isinstance(p, int):
            return p
    stops = stop_ids(lm)
    return min(stops) if stops else 0


def special_ids(lm) -> set[int]:
    s = set(stop_ids(lm))
    extra = getattr(lm.tokenizer, "all_special_ids", None)
    if extra:
        s.update(int(i) for i in extra)
    return s


def decode_pieces(lm, ids: Sequence[int]) -> list[str]:
    """One string per token such that ``"".join(pieces)`` is the decoded text (special tokens
    give empty strings). Decoding token by token breaks byte-level merges, so pieces are the
    differences of cumulative decodes."""
    special = special_ids(lm)
    pieces, prev, keep = [], "", []
    for t in ids:
        if int(t) in special:
            pieces.append("")
            continue
        keep.append(int(t))
        cur = lm.tokenizer.decode(keep, skip_special_tokens=True)
        if cur.startswith(prev):
            pieces.append(cur[len(prev):])
        else:  # a merge rewrote earlier text (rare): attribute the whole difference here
            pieces.append(cur[len(prev):] if len(cur) > len(prev) else "")
        prev = cur
    return pieces


def pad_left(lm, rows: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of ``rows`` padded on the left to the longest, on the model's device. The
    padding is masked out, so its id (:func:`pad_id`) never changes a real position."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id(lm), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(lm.device), mask.to(lm.device)
