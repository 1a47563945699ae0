"""The research candidate families of the patch search, off every default path (``sinkhole experimental
search``): the run gate's state check, neuron caps and MLP-output norm caps in the marking layers, and
targeted fine-tunes of the marking layers (the only families a GGUF can hold: ``--gguf``).

None of them meets the broad held-out targets on SmolLM2 (docs/experimental.md says by how much and
why); they stay here so that the figures can be reproduced and a model where one works can be tried.
They extend the product's search (:func:`sinkhole.patch.search.search_patch`) through its ``extra``
candidates, so they are measured and verified exactly as the run gate is.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..attack.families import family_words
from ..capture import run
from ..data import snippets
from ..decoding.gate import RunGate
from ..decoding.state_check import STATE_CONFIRM
from ..evaluate.metrics import encode_batch
from ..patch.core import Patch, PatchOp, model_signature
from ..patch.search import FAMILIES, SearchConfig, SearchResult, neuron_levels, rank_sink_neurons, search_patch
from .finetune import TRAIN_WORDS, FinetuneConfig, finetune_patch

# the research families, in the order the search tries them; finetune_mlp (the full-model objective) is
# about 15 s a step on a 2-core CPU
EXPERIMENTAL_FAMILIES = ("state_gate", "detector_cap", "norm_cap", "finetune_neurons", "finetune_local",
                         "finetune_mlp")
ALL_FAMILIES = FAMILIES + EXPERIMENTAL_FAMILIES
WEIGHT_FAMILIES = ("finetune_neurons", "finetune_local", "finetune_mlp")  # the families a GGUF can hold


@dataclass
class ExperimentalConfig(SearchConfig):
    families: tuple = EXPERIMENTAL_FAMILIES[:-1]
    finetune_steps: int = 400
    finetune_neurons: int = 128  # finetune_neurons: first-token neurons per marking layer
    cap_neurons: int = 32  # detector_cap: first-token neurons clamped per marking layer
    finetune_layers: tuple | None = None

    def as_quick(self) -> "ExperimentalConfig":
        """:meth:`SearchConfig.as_quick` with at most 8 fine-tuning steps."""
        return dataclasses.replace(super().as_quick(), finetune_steps=min(self.finetune_steps, 8))


def search_experimental(lm, cfg: ExperimentalConfig | None = None, circuit=None, log=print) -> SearchResult:
    """The patch search over ``cfg.families``, any of :data:`ALL_FAMILIES`."""
    return search_patch(lm, cfg or ExperimentalConfig(), circuit=circuit, log=log, extra=experimental_candidates,
                        known=ALL_FAMILIES)


def experimental_candidates(lm, circ, cfg: ExperimentalConfig) -> dict:
    """{family: (description, builder)} for the research families (the ``extra`` of
    :func:`sinkhole.patch.search.candidates`)."""
    sig = model_signature(lm)
    marking = list(circ.marking_layers)

    def state_gate():
        g = RunGate(confirm=STATE_CONFIRM)
        return Patch([], "state_gate", sig, "the run gate with the state check: a long low-diversity run is shortened "
                     "(hidden from attention, positions not advanced) only once its layer-0 state is first-token-like "
                     "(the circuit's own reading; documents that repeat without reaching it are untouched)",
                     {"family": "state_gate"}, gate=g)

    def detector_cap():
        ops = []
        for layer in marking:
            top = [n["neuron"] for n in rank_sink_neurons(lm, layer, max(cfg.cap_neurons, cfg.n_neurons))]
            lv = neuron_levels(lm, layer, top)
            ops.append(PatchOp(layer, "clamp", top, lo=lv["p0.1"], hi=lv["p99.9"]))
        return Patch(ops, "detector_cap", sig, "top first-token neurons of the detector layers clamped to their "
                     "range on ordinary non-first tokens", {"family": "detector_cap"})

    def norm_cap():
        typ = mlp_out_typical(lm, marking)
        ops = [PatchOp(i, "norm_cap", site="mlp_out", values=typ[i]) for i in marking]
        return Patch(ops, "norm_cap", sig, "MLP-output norm capped at its 99.9th percentile on text at non-first "
                     "positions of the detector layers", {"family": "norm_cap", "caps": typ})

    def finetune_mlp():
        layers = list(cfg.finetune_layers) if cfg.finetune_layers else marking[:2]
        return finetune_patch(lm, finetune_config(lm, circ, cfg, layers, objective="logits", keep_weight=20.0,
                                                  rep_batch=2, n_texts=32, max_examples=120))

    def finetune_local():
        return finetune_patch(lm, finetune_config(lm, circ, cfg, _local_layers(lm, circ, cfg)))

    def finetune_neurons():
        layers = _local_layers(lm, circ, cfg)
        neurons = {i: [n["neuron"] for n in rank_sink_neurons(lm, i, cfg.finetune_neurons)] for i in layers}
        return finetune_patch(lm, finetune_config(lm, circ, cfg, layers, neurons=neurons, lr=1e-3, keep_weight=200.0))

    table = {"state_gate": ("the run gate, acting only once a run's layer-0 state is first-token-like", state_gate),
             "detector_cap": (f"clamp the top {max(cfg.cap_neurons, cfg.n_neurons)} first-token neurons of the "
                              f"marking layers {marking}", detector_cap),
             "norm_cap": (f"cap MLP-output norm of the marking layers {marking}", norm_cap),
             "finetune_local": ("fine-tune the marking-layer MLPs, local objective (stops after them)", finetune_local),
             "finetune_neurons": (f"fine-tune the top {cfg.finetune_neurons} first-token neurons of the "
                                  "marking layers, local objective", finetune_neurons),
             "finetune_mlp": ("fine-tune the marking-layer MLPs", finetune_mlp)}
    assert set(table) == set(EXPERIMENTAL_FAMILIES), "EXPERIMENTAL_FAMILIES and the table must name the same families"
    return table


def mlp_out_typical(lm, layers: list[int]) -> dict[int, float]:
    """99.9th percentile of the MLP-output norm at non-first positions on text, per layer."""
    ids, mask = encode_batch(lm, snippets("sonnets", n=8, n_words=48, seed=2), 96)

    def red(x, pos):
        return x.float().norm(dim=-1)[pos > 0].cpu()

    c = run(lm, ids, reads=[("mlp_out", i, red) for i in layers], stop_after=max(layers), attention_mask=mask,
            check_finite=False)
    return {i: float(torch.quantile(c[f"mlp_out.{i}"], 0.999)) for i in layers}


def _local_layers(lm, circ, cfg: ExperimentalConfig) -> list[int]:
    """The layers the local fine-tune trains: the last two marking layers (one marking layer and
    the next when there is only one), or --finetune-layers."""
    if cfg.finetune_layers:
        return [int(x) for x in cfg.finetune_layers]
    n = lm.adapter.n_layers
    marking = list(circ.marking_layers)
    if len(marking) < 2:
        marking = marking + [marking[-1] + 1]
    return sorted({min(i, n - 2) for i in marking})[-2:]


def finetune_config(lm, circ, cfg: ExperimentalConfig, layers: list[int], **kw):
    """The measured fine-tuning setting (docs/history.md, the fine-tuning record): many training words from the
    training text (never a held-out word), repetition counts around and beyond the search ones, the
    local comparison just before the massive-activation layer, a strong keep weight on 96 snippets."""
    stop = max(max(layers) + 1, circ.massive_layer - 1)

    base = {"layers": list(layers), "words": tuple(cfg.search_words) + _extra_train_words(cfg),
            "exclude_words": tuple(cfg.verify_words) + tuple(sorted(family_words())), "corpus_words": 150,
            "max_examples": 300,
            "reps": _train_reps(lm, cfg),
            "steps": cfg.finetune_steps, "objective": "local", "lr": 3e-4, "keep_weight": 100.0, "rep_batch": 4,
            "n_texts": 96, "stop_layer": min(stop, lm.adapter.n_layers - 1)}
    base.update(kw)
    if cfg.quick:
        base.update(corpus_words=20, max_examples=24, n_texts=16)
    return FinetuneConfig(**base)


def _train_reps(lm, cfg: ExperimentalConfig) -> tuple:
    """The fine-tune's repetition counts: the search counts plus 64 and 500, never a held-out count,
    and only runs that fit the model's context (two tokens a word at most)."""
    reps = sorted(set(cfg.search_reps) | {64, 500} - set(cfg.verify_reps))
    fit = [r for r in reps if not lm.n_ctx or 2 * r + 16 <= lm.n_ctx]
    return tuple(fit or reps[:1])


def _extra_train_words(cfg: ExperimentalConfig) -> tuple:
    held = {w.lower() for w in cfg.verify_words} | family_words()
    return tuple(w for w in TRAIN_WORDS if w.lower() not in held and w not in cfg.search_words)
