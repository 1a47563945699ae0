"""The KV cache of a decoding that drafts and rolls back (the exact check, the gate engines)."""

from __future__ import annotations


def common_prefix(a, b) -> int:
    """How many leading tokens the token lists ``a`` and ``b`` share (what a KV cache of ``a`` keeps for ``b``)."""
    p = 0
    for x, y in zip(a, b):
        if x != y:
            break
        p += 1
    return p


def cache_argument(model) -> str:
    """The name of ``model.forward``'s KV cache argument: ``cache`` from transformers 5.2x, ``past_key_values``
    before (and in models not yet renamed)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def new_cache(model):
    """An empty KV cache that records past states, so that a sliding-window layer beyond its window
    (Gemma-3, Mistral) can still be cut back; None (the model's default cache) where that fails."""
    try:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
        if hasattr(cache, "activate_past_recording"):
            _record_past(cache, 0)
        return cache
    except Exception:  # an architecture whose cache cannot be built from its config
        return None


def _record_past(cache, states: int) -> None:
    """Record past states; linear-attention layers also keep their recurrent state after each of a
    pass's last ``states`` positions (the argument exists from transformers 5.25, where leaving it
    out breaks the next pass)."""
    try:
        cache.activate_past_recording(recurrent_states_to_keep=states)
    except TypeError:  # transformers < 5.25
        cache.activate_past_recording()


def keep_for_rollback(past, n: int) -> None:
    """Before a pass whose last ``n`` tokens may be rolled back: a linear-attention layer
    (Qwen3.5's Gated DeltaNet) keeps its recurrent state after each of the pass's last ``n + 1``
    positions (transformers >= 5.25, ``activate_past_recording(recurrent_states_to_keep=...)``), so
    that :func:`rollback` restores the state exactly. Older versions record no recurrent states:
    their linear layers report themselves not croppable and :func:`rollback` declines."""
    if past is not None and hasattr(past, "activate_past_recording"):
        _record_past(past, int(n) + 1)


def rollback(past, n: int):
    """The cache without its last ``n`` tokens, or None where it cannot be put back exactly (the
    recurrent state of linear attention without :func:`keep_for_rollback`, e.g. Qwen3.5's Gated
    DeltaNet before transformers 5.25): the next pass then re-reads the whole sequence."""
    if past is None or not getattr(past, "is_croppable", True):
        return None
    try:
        past.crop(-n)  # negative: remove that many (every transformers version reads it so)
        return past
    except (RuntimeError, IndexError):  # a layer that kept too little history to go back n tokens
        return None
