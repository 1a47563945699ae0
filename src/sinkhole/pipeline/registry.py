"""The registry: the one ordered list of scan steps (``PIPELINE``), and the pipeline's functions
bound to it (``run_scan``, ``load_document``, ...).

Each area keeps its analyses and result types in its own package; ``pipeline/steps_*.py`` hold the
few lines of adapter that turn them into steps, and this list is the only place that names the
steps and fixes their order. A duplicate name is an error (``engine.pipeline``). The engine is
handed this list; it never fetches it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..attack.diverge import DivergenceResult
from ..attack.memorization import MemorizationResult
from ..attack.minreps import MinRepsResult
from ..circuit.attention import AttentionSinks
from ..circuit.circuit import Circuit
from ..circuit.detector import FirstTokenDetector
from ..circuit.norms import LayerNorms, layer_norms
from ..models.loading import ModelInfo, model_info
from . import engine
from . import steps_attack as attack_steps
from . import steps_circuit as circuit_steps
from . import steps_patch as patch_steps
from .engine import Context, ScanOptions, Step, pipeline


def model_step(ctx: Context) -> ModelInfo:
    return model_info(ctx.lm)


def layer_norms_step(ctx: Context) -> LayerNorms:
    return layer_norms(ctx.lm)


PIPELINE = pipeline([
    Step("model", model_step, "model metadata", ModelInfo),
    Step("layer_norms", layer_norms_step, "first-token vs typical hidden-state norm per layer", LayerNorms),
    Step("circuit", circuit_steps.circuit_step, "sink layers, causally verified sink neurons, the circuit's roles",
         Circuit),
    Step("first_token_detector", circuit_steps.detector_step, "first-token detector neuron and direction (Figure 4)",
         FirstTokenDetector),
    Step("convergence", circuit_steps.convergence_step,
         "layer-0 convergence of repeated tokens to a first token (Figure 5, Theorem 4.1)",
         circuit_steps.ConvergenceResult),
    Step("attention_sinks", circuit_steps.attention_step,
         "attention mass on position 0, sink rate, attention maps (Figure 1)", AttentionSinks),
    Step("norm_curves", circuit_steps.norm_curves_step,
         "norm vs repetitions at the sink layers, repeats needed (Figure 2, Table 1)", circuit_steps.NormCurves),
    Step("divergence", attack_steps.divergence_step, "divergence by greedy decoding (run judge and garak-style judge)",
         DivergenceResult),
    Step("memorization", attack_steps.memorization_step,
         "verbatim spans of the divergent continuations in a reference corpus (the shipped texts), with a control",
         MemorizationResult),
    Step("min_reps", attack_steps.min_reps_step,
         "repetitions needed to diverge, by behaviour (doubling and bisection with greedy_check)", MinRepsResult),
    Step("sweep", attack_steps.sweep_step, "vocabulary sweep: repetitions needed to induce a sink (generation-free)",
         attack_steps.SweepSummary),
    Step("cluster", attack_steps.cluster_step, "cluster attack: non-repeating sequences that induce a sink",
         attack_steps.ClusterResult),
    Step("patch", patch_steps.patch_step, "search, verify and export a patch (before/after)",
         patch_steps.PatchResult, only_with="patch"),
])

# the steps of ``sinkhole circuit`` (the circuit analyses of the paper's sections 3-4)
CIRCUIT_STEPS = ["model", "circuit", "first_token_detector", "convergence", "attention_sinks", "norm_curves"]


def step_types() -> dict[str, type]:
    """Step name -> result type, for loading a results document."""
    return engine.step_types(PIPELINE)


def selected_steps(options: ScanOptions | dict, names: list[str] | None = None) -> list[Step]:
    """The steps a scan with ``options`` runs (all, or those named), in pipeline order."""
    return engine.selected_steps(PIPELINE, options, names)


def run_scan(lm, options: ScanOptions | dict, out: Path | None = None, resume: bool = False,
             log: Callable[[str], None] = print, steps: list[str] | None = None, command: str = "scan") -> dict:
    """:func:`engine.run_scan` on this pipeline."""
    return engine.run_scan(PIPELINE, lm, options, out, resume=resume, log=log, steps=steps, command=command)


def load_document(doc: dict) -> dict:
    """:func:`engine.load_document` with this pipeline's result types."""
    return engine.load_document(PIPELINE, doc)
