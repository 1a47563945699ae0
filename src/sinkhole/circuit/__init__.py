"""Sink-circuit analyses (the paper's sections 3-4) as functions returning plain result objects.

>>> from sinkhole import analyze
>>> from sinkhole.circuit import discover
>>> c = discover(lm)          # sink layers, verified sink neurons and the circuit's roles (about a second)
>>> c.massive_layer, c.marking_layers, c.drift_layer
>>> res = analyze(lm, words=["the", "poem"])   # every analysis of sections 3-4, as typed step results
>>> res["circuit"].sink_neurons, res["norm_curves"].repeats_needed
"""

from .attention import attention_sinks
from .circuit import ROLE_RULES, Circuit, discover
from .convergence import convergence_curve, identity_check
from .detector import first_token_detector
from .neurons import ablation_effect, rank_and_filter, repetition_firing, repetition_firing_layers
from .norms import layer_norms, norm_curve, norm_curves, repeat_ids, repeats_needed
from .sink_layers import find_sink_layers

__all__ = [
    "ROLE_RULES", "Circuit", "ablation_effect", "attention_sinks", "convergence_curve", "discover", "find_sink_layers",
    "first_token_detector", "identity_check", "layer_norms", "norm_curve", "norm_curves", "rank_and_filter",
    "repeat_ids", "repeats_needed", "repetition_firing", "repetition_firing_layers",
]


