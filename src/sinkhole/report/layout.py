"""The report's sections in page order: the one place that names them (a duplicate name is an
error). Each section takes the results document (validated by ``pipeline.registry.load_document``) and
returns ``(html, [Figure, ...])`` or None when its data is absent."""

from __future__ import annotations

from ..results import check_unique
from . import sections as base
from . import sections_attack as attack
from . import sections_circuit as circuit
from . import sections_patch as patch


def ordered(sections):
    check_unique((name for name, _ in sections), "report section")
    return tuple(sections)


SECTIONS = ordered([
    ("verdict", base.verdict),
    ("model", base.model_section),
    ("layer_norms", base.layer_norms_section),
    ("norm_curves", base.norm_curves_section),
    ("circuit", circuit.circuit_section),
    ("attention_sinks", circuit.attention_section),
    ("first_token_detector", circuit.detector_section),
    ("convergence", circuit.convergence_section),
    ("repeats_needed", circuit.repeats_section),
    ("divergence", attack.divergence_section),
    ("memorization", attack.memorization_section),
    ("min_reps", attack.min_reps_section),
    ("sweep", attack.sweep_section),
    ("cluster", attack.cluster_section),
    ("patch", patch.patch_section),
])
