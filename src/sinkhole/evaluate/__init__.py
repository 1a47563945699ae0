"""Before/after evaluation of patches: held-out text metrics, divergence, sink attention, lm-eval."""

from ..data import heldout_texts  # noqa: F401
from .metrics import TextMetrics, sink_attention, text_metrics  # noqa: F401
