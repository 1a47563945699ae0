"""Before/after evaluation of patches: held-out text metrics, divergence, sink attention, lm-eval."""

from .metrics import TextMetrics, heldout_texts, sink_attention, text_metrics  # noqa: F401
