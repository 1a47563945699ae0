"""The scan pipeline: the one ordered list of steps (``PIPELINE``), and the foundation's steps.

Each area keeps its step functions and result types beside its analyses (``circuit/steps.py``,
``attack/steps.py``, ``patch/steps.py``); this list is the only place that names the steps and
fixes their order. A duplicate name is an error (``scan.pipeline``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .attack import steps as attack_steps
from .attack.diverge import DivergenceResult
from .attack.minreps import MinRepsResult
from .memorization import MemorizationResult
from .circuit import steps as circuit_steps
from .circuit.attention import AttentionSinks
from .circuit.circuit import Circuit
from .circuit.detector import FirstTokenDetector
from .circuit.norms import LayerNorms, layer_norms
from .patch import steps as patch_steps
from .results import StepResult
from .scan import Context, Step, pipeline


@dataclass
class ModelInfo(StepResult):
    """What was scanned (``results.json`` ``model``); machine-specific paths stay out."""

    name: str
    source: str
    family: str
    model_class: str
    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int | None
    vocab_size: int | None
    n_ctx: int | None
    bos_id: int | None
    dtype: str
    n_params: int
    embedded: bool | None = None
    quantization: str | None = None
    hf_name: str | None = None
    hub_id: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in super().to_dict().items() if v is not None or k in {
            f.name for f in fields(self) if f.name in ("n_heads", "vocab_size", "n_ctx", "bos_id")}}


def model_info(lm) -> ModelInfo:
    meta = lm.metadata()
    meta.pop("gguf", None)  # machine-specific paths stay out of results.json
    return ModelInfo.from_dict(meta)


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
