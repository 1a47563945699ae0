"""Sink-circuit analyses (the paper's sections 3-4) as functions returning plain result objects.

>>> from sinkhole.circuit import discover, analyze
>>> c = discover(lm)          # sink layers + causally verified sink neurons (seconds)
>>> c = analyze(lm, circuit=c, words=["the", "poem"])   # + every other analysis
>>> c.to_dict()["sink_layers"], c.main_sink_layer
"""

from .attention import attention_sinks
from .circuit import Circuit, analyze, discover
from .convergence import convergence_curve, identity_check
from .detector import first_token_detector
from .neurons import ablation_effect, rank_and_filter, repetition_firing, repetition_firing_layers
from .norms import layer_norms, norm_curve, norm_curves, repeat_ids, repeats_needed
from .sink_layers import find_sink_layers

__all__ = [
    "Circuit", "ablation_effect", "analyze", "attention_sinks", "convergence_curve", "discover", "find_sink_layers",
    "first_token_detector", "identity_check", "layer_norms", "norm_curve", "norm_curves", "rank_and_filter",
    "repeat_ids", "repeats_needed", "repetition_firing", "repetition_firing_layers",
]
