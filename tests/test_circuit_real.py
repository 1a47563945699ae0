"""Key phenomenon checks of the sink circuit on the real SmolLM2-135M-Instruct (about 30-60 s).

Measured facts these tests pin (see docs/circuit.md, "SmolLM2-135M-Instruct"): the first token's norm is built at
layers 1-2 (~345, ~810) and turned into a massive activation at layer 11 (~25,000) by two neurons
(1229, 1487) whose joint ablation at position 0 collapses it; the detector separates position 0
from later tokens; a repeated token's layer-0 output converges to the token-alone output; with no
BOS a pure repetition is identical at every position.
"""

from __future__ import annotations

import pytest

from sinkhole.circuit import discover
from sinkhole.circuit.convergence import convergence_curve, identity_check
from sinkhole.circuit.detector import first_token_detector
from sinkhole.circuit.neurons import ablation_effect, repetition_firing

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def circuit(smollm2):
    return discover(smollm2)


def test_sink_layers_and_neurons(circuit):
    assert circuit.sink_layers == [1, 2, 11]
    assert circuit.massive_layer == 11 and circuit.marking_layers == [1, 2] and circuit.drift_layer == 2
    assert circuit.paper_sink_layer == 11
    assert circuit.first_token_norm > 100 * circuit.typical_norm
    by_layer = {r["layer"]: r for r in circuit.neurons}
    l11 = by_layer[11]
    assert l11["collapsed"] and sorted(l11["selected"]) == [1229, 1487]
    joint = l11["cumulative"][len(l11["selected"]) - 1]["norm_after"]
    assert joint < 0.05 * l11["norm_before"]  # 25,000 -> a few hundred
    assert all(r["collapsed"] for r in circuit.neurons)


def test_massive_activation_ablation_frees_later_attention(smollm2, circuit):
    e = ablation_effect(smollm2, 11, [1229, 1487], n_texts=4, n_tokens=16)
    assert e.first_norm_after[11] < 0.05 * e.first_norm_before[11]
    late = range(12, smollm2.adapter.n_layers)
    before = sum(e.attn_to_first_before[i] for i in late) / len(late)
    after = sum(e.attn_to_first_after[i] for i in late) / len(late)
    assert before > 0.5 and after < before - 0.2


def test_layer2_sink_neurons_fire_on_repeated_the(smollm2):
    f = repetition_firing(smollm2, 2, [90, 430], "the", 120)
    assert all(n is not None and n <= 100 for n in f.fires_at), f.fires_at


def test_first_token_detector_separates_position_0(smollm2):
    d = first_token_detector(smollm2, n_snippets=128)
    assert max(abs(a - 0.5) for a in d.best_auc) > 0.45  # AUC beyond 0.95 or below 0.05
    assert max(d.direction_auc) > 0.95


def test_layer0_convergence_and_identity(smollm2):
    c = convergence_curve(smollm2, "the", 300)
    assert c.distance[-1] < 0.1 * c.distance[0]
    assert identity_check(smollm2, "the", n_tokens=16).identical


def test_cli_fast_json(capsys):
    import json

    from sinkhole.cli import main

    assert main(["circuit", "--fast", "--json", "--quiet"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["command"] == "circuit" and doc["steps"] == ["model", "circuit"]
    d = doc["results"]["circuit"]
    assert d["sink_layers"] == [1, 2, 11] and d["massive_layer"] == 11
    assert isinstance(d["first_token_norm"], float) and isinstance(d["typical_norm"], float)
    pairs = {(s["layer"], s["neuron"]) for s in d["sink_neurons"]}
    assert {(11, 1229), (11, 1487)} <= pairs
    assert all("norm_after" in s and "joint_norm_after" in s for s in d["sink_neurons"])


def test_smollm2_sink_is_any_first_token(circuit):
    """The paper's precondition holds: a word at position 0 (no BOS) gets the massive norm and the
    attention, as BOS does."""
    assert circuit.sink_kind == "any_token" and circuit.has_sink
    ev = circuit.sink_evidence
    assert ev["no_bos"]["norm_ratio"] > 50 and ev["no_bos"]["attn_first"] > 0.4 and ev["no_bos"]["layer"] == 11
    assert ev["bos"]["sink"]
    assert circuit.headline.startswith("Sink: any token at position 0 becomes a sink")


def test_gemma3_sink_is_bos_only():
    """The negative control: only BOS becomes a sink, so a run of words cannot imitate it."""
    from sinkhole.models.loading import load_model

    c = discover(load_model("gemma3-270m"))
    assert c.sink_kind == "bos_only"
    ev = c.sink_evidence
    assert ev["bos"]["norm_ratio"] > 10 and ev["bos"]["attn_first"] > 0.4
    assert ev["no_bos"]["norm_ratio"] < 2 and ev["no_bos"]["attn_first"] < 0.15
    assert "does not apply" in c.headline
