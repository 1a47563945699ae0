"""The attention kernel a model runs with while no attention pattern is read."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def fast_attention(lm, enabled: bool = True):
    """Switch the model to PyTorch SDPA attention while no attention pattern is read (about
    2x faster on long repetitions on CPU), and restore the previous kernel afterwards.
    A model that cannot switch keeps its kernel."""
    model = getattr(lm, "model", lm)
    cfg = getattr(model, "config", None)
    prev = getattr(cfg, "_attn_implementation", None)
    switched = False
    if enabled and prev == "eager" and hasattr(model, "set_attn_implementation"):
        try:
            model.set_attn_implementation("sdpa")
            switched = True
        except Exception:  # architecture without an SDPA kernel: keep eager
            switched = False
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(prev)
