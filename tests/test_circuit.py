"""Sink-circuit analyses on tiny random models: shapes, determinism, ablations that provably
change the norm, and the exact-identity property of pure repetitions."""

from __future__ import annotations

import json

import pytest
import torch

from sinkhole.capture import Edit, run
from sinkhole.circuit.attention import attention_sinks
from sinkhole.pipeline.analyze import analyze
from sinkhole.circuit import discover
from sinkhole.circuit.common import auc, histogram
from sinkhole.circuit.convergence import convergence_curve, identity_check
from sinkhole.circuit.detector import first_token_detector
from sinkhole.circuit.neurons import ablation_effect, rank_and_filter, repetition_firing
from sinkhole.circuit.norms import NormCurve, norm_curves, repeats_needed
from sinkhole.circuit.sink_layers import find_sink_layers
from sinkhole.results import dumps
from tiny import tiny_lm


def _plant_sink(lm, layer: int = 1, neuron: int = 7, gain: float = 3.0, scale: float = 20.0) -> int:
    """Plant a BOS-specific sink neuron in a tiny Llama: its gate and up rows point along the BOS
    embedding (which dominates the residual stream of a random tiny model), and its output
    column is ``scale`` times larger. Returns the neuron index."""
    mlp = lm.adapter.mlp(layer)
    e = lm.adapter.embed.weight[lm.bos_id].detach()
    d = e / e.norm()
    with torch.no_grad():
        mlp.gate_proj.weight[neuron] = gain * d
        mlp.up_proj.weight[neuron] = gain * d
        mlp.down_proj.weight[:, neuron] *= scale
    return neuron


def test_sink_layers_shapes_and_determinism(tiny_family):
    a = find_sink_layers(tiny_family, n_texts=3, n_tokens=8)
    b = find_sink_layers(tiny_family, n_texts=3, n_tokens=8)
    n = tiny_family.adapter.n_layers
    assert a.to_dict() == b.to_dict()
    for key in ("first_mlp_out_norm", "typical_mlp_out_norm", "first_token_norm", "typical_norm", "growth"):
        assert len(getattr(a, key)) == n
    assert 0 <= a.strongest_layer < n
    assert all(0 <= i < n for i in a.sink_layers)
    json.loads(dumps(a))


def test_planted_sink_neuron_is_found_and_its_ablation_collapses_the_norm():
    lm = tiny_lm("llama", n_layers=3)
    j = _plant_sink(lm, layer=1)
    sl = find_sink_layers(lm, n_texts=4, n_tokens=8)
    assert sl.sink_layers == [1] and sl.strongest_layer == 1
    r = rank_and_filter(lm, 1, k=4)
    assert r.candidates[0]["neuron"] == j
    assert r.collapsed and r.selected[0] == j
    assert r.candidates[0]["norm_after"] < 0.2 * r.norm_before
    # the same ablation through the public hook engine changes position 0 only
    ids = [[lm.bos_id, 5, 6, 7]]
    n = lambda x, p: x.float().norm(dim=-1)  # noqa: E731
    before = run(lm, ids, reads=[("resid_post", 1, n)], stop_after=1)["resid_post.1"][0]
    after = run(lm, ids, reads=[("resid_post", 1, n)], stop_after=1,
                edits=[Edit("neurons", 1, neurons=[j], positions="first", op="zero")])["resid_post.1"][0]
    assert after[0] < 0.2 * before[0]
    c = discover(lm, k=4, n_texts=4, n_tokens=8)
    assert {"layer": 1, "neuron": j} in [{"layer": s["layer"], "neuron": s["neuron"]} for s in c.sink_neurons]
    e = ablation_effect(lm, 1, [j], n_texts=3, n_tokens=8)
    assert e.first_norm_after[1] < 0.2 * e.first_norm_before[1]
    assert e.first_norm_after[0] == pytest.approx(e.first_norm_before[0])  # layer 0 is upstream
    assert all(0 <= v <= 1 for v in e.attn_to_first_before + e.attn_to_first_after)


def test_rank_and_filter_every_family(tiny_family):
    r = rank_and_filter(tiny_family, 1, k=3)
    assert len(r.candidates) == 3 and len(r.cumulative) == 3
    assert all(c["score"] >= 0 for c in r.candidates)
    assert r.candidates == sorted(r.candidates, key=lambda c: -c["score"])
    # ablating the strongest writer of a random model changes the first token's norm
    assert any(abs(c["norm_after"] - r.norm_before) > 1e-4 for c in r.candidates)


def test_repetition_firing_shapes():
    lm = tiny_lm("llama", n_layers=3)
    j = _plant_sink(lm, layer=1)
    f = repetition_firing(lm, 1, [j], "cat", 40, n_samples=10)
    assert f.neurons == [j] and len(f.activation[0]) == len(f.reps) and f.reps[-1] == 40
    assert f.fires_at[0] is None or 1 <= f.fires_at[0] <= 40
    assert len(f.repeat_top) == 5


def test_detector(tiny_family):
    d = first_token_detector(tiny_family, n_snippets=32)
    assert d.layers == [0, 1] and len(d.best_auc) == 2
    assert all(0 <= a <= 1 for a in d.best_auc + d.direction_auc)
    counts = d.histogram["counts"]
    assert set(counts) == {"position 0", "position 1", "position 2"}
    assert all(sum(v) == d.n_snippets for v in counts.values())
    assert len(d.histogram["edges"]) == len(counts["position 0"]) + 1


def test_auc_and_histogram_helpers():
    assert auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auc(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])) == 0.0
    assert auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5
    h = histogram({"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.5])}, bins=4)
    assert sum(h["counts"]["a"]) == 2 and sum(h["counts"]["b"]) == 1


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt_neox", "qwen2"])
def test_identity_holds_for_relative_positions(family):
    r = identity_check(tiny_lm(family), "cat", n_tokens=12)
    assert r.identical, r.max_relative_deviation
    assert len(r.max_relative_deviation) == 3


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_identity_fails_with_learned_absolute_positions(family):
    # learned absolute position embeddings make every position different: the check must say so
    assert not identity_check(tiny_lm(family), "cat", n_tokens=12).identical


def test_convergence_curve_shapes():
    lm = tiny_lm("llama")
    c = convergence_curve(lm, "cat", 50, n_samples=10)
    assert c.reps[0] == 1 and c.reps[-1] == 50 and len(c.distance) == len(c.reps) == len(c.relative)
    assert all(d >= 0 for d in c.distance) and c.singleton_norm > 0


def test_attention_sinks_shapes(tiny_family):
    maps = tiny_family.adapter.attention_in([0, 1, 2])[:2]  # a hybrid's linear layers have no pattern
    a = attention_sinks(tiny_family, words=["cat"], reps=[4, 12], T=16, n_texts=2, map_layers=maps, map_tokens=6)
    n = tiny_family.adapter.n_layers
    att = set(tiny_family.adapter.attention_layers)
    assert len(a.text.mass_first) == n and a.text.mass_run is None
    assert len(a.repetitions) == 2 and len(a.repetitions[1].mass_run) == n
    for p in [a.text] + a.repetitions:
        assert [i for i, v in enumerate(p.mass_first) if v is not None] == sorted(att)
        assert all(-1e-6 <= v <= 1 + 1e-6 for v in p.mass_first if v is not None)
    for p in a.repetitions:
        assert all(m + r <= 1 + 1e-4 for m, r in zip(p.mass_first, p.mass_run) if m is not None)
    assert 0 <= a.sink_rate_text <= 1 and 0 <= a.sink_rate_repeat <= 1
    assert len(a.fig1["text"]) == len(maps) and len(a.fig1["text"][0]) == 6 and len(a.fig1["text"][0][0]) == 6


def test_repeats_needed_rule():
    c = NormCurve(word="w", layer=1, n_tokens_per_word=1, reps=[1, 2, 3, 4], norm=[1.0, 2.0, 6.0, 3.0],
                  first_token_norm=10.0)
    assert repeats_needed(c, 0.5) == 3
    assert repeats_needed(c, 0.2) == 2
    assert repeats_needed(c, 0.7) is None
    spiky = NormCurve(word="w", layer=1, n_tokens_per_word=1, reps=list(range(1, 9)),
                      norm=[1.0, 9.0, 1.0, 1.0, 6.0, 7.0, 8.0, 9.0], first_token_norm=10.0)
    assert repeats_needed(spiky, 0.5) == 2  # the isolated spike
    assert repeats_needed(spiky, 0.5, window=3) == 6  # median of repetitions 4..6 is 6 >= 5


def test_norm_curves_multi_layer_matches_single_layer():
    from sinkhole.circuit.norms import norm_curve

    lm = tiny_lm("llama")
    cs = norm_curves(lm, ["cat", "dog"], 20, [0, 2])
    assert [(c.word, c.layer) for c in cs] == [("cat", 0), ("cat", 2), ("dog", 0), ("dog", 2)]
    one = norm_curve(lm, "cat", 20, 2)
    assert cs[1].norm == pytest.approx(one.norm, rel=1e-4)


def test_analyze_on_tiny_is_json_and_deterministic():
    lm = tiny_lm("llama")
    _plant_sink(lm, 1)
    a = analyze(lm, words=["cat"], curve_reps=30, conv_reps=20, attn_reps=[8])
    b = analyze(lm, words=["cat"], curve_reps=30, conv_reps=20, attn_reps=[8])
    assert dumps(a) == dumps(b)
    d = json.loads(dumps(a))
    assert set(d) == {"model", "circuit", "first_token_detector", "convergence", "attention_sinks", "norm_curves"}
    for key in ("sink_layers", "sink_neurons", "first_token_norm", "typical_norm", "massive_layer",
                "marking_layers", "drift_layer", "roles", "repetition_firing"):
        assert key in d["circuit"]
    assert d["circuit"]["massive_layer"] == 1 and d["norm_curves"]["layer"] == 1
    assert all(isinstance(s["layer"], int) and isinstance(s["neuron"], int) for s in d["circuit"]["sink_neurons"])


def test_cli_rejects_bad_input(capsys):
    from sinkhole.cli import main

    assert main(["circuit", "--reps", "0", "--quiet"]) == 2
    assert "--reps" in capsys.readouterr().err
    assert main(["circuit", "--attn-reps", "a,b", "--quiet"]) == 2
    assert main(["circuit", "--frac", "2", "--quiet"]) == 2
    assert main(["circuit", "--words", "a,,b", "--quiet"]) == 2


def test_scan_steps_and_report_sections_on_tiny(tmp_path):
    from sinkhole.report.html import render
    from sinkhole.pipeline.registry import run_scan

    lm = tiny_lm("llama")
    _plant_sink(lm, 1)
    opts = {"seed": 0, "curve_reps": 40, "words": ["cat"], "patch": False}
    doc = run_scan(lm, opts, tmp_path, log=lambda m: None)["doc"]
    res = doc["results"]
    for key in ("circuit", "first_token_detector", "convergence", "attention_sinks", "norm_curves"):
        assert key in res, key
    assert doc["steps"].index("circuit") < doc["steps"].index("norm_curves")
    assert res["norm_curves"]["layer"] == res["circuit"]["massive_layer"] == 1
    assert res["circuit"]["sink_neurons"][0]["neuron"] == 7
    page, figs = render(doc)
    names = {f.name for f in figs}
    for name in ("fig1_attention_maps", "fig3_sink_neuron_ablation", "fig4_first_token_detector",
                 "fig5_layer0_convergence", "attention_mass_position0", "fig2_norm_vs_reps"):
        assert name in names, name
    assert "Sink circuit" in page and "Repetitions needed" in page


def test_first_layer_over_rule():
    from sinkhole.circuit.common import first_layer_over

    assert first_layer_over([1.0, 6.0, 30.0]) == 1  # first layer at or over 5
    assert first_layer_over([1.0, 2.0, 3.0, 2.5]) == 2  # none over 5: the largest
    assert first_layer_over([None, 2.0, None]) == 1  # missing ratios count as 0
    assert first_layer_over([], default=7) == 7
    assert first_layer_over([1.0, 6.0, 30.0], float("inf")) == 2  # the massive-activation layer


def test_circuit_roles_and_overrides():
    from sinkhole.errors import SinkholeError

    lm = tiny_lm("llama")
    _plant_sink(lm, 1)
    c = discover(lm, k=4, n_texts=4, n_tokens=8)
    assert c.massive_layer == 1 and c.marking_layers == [1]  # no earlier candidate: the massive layer itself
    assert c.drift_layer == 1  # the first layer whose first-token norm is >= 5x typical
    assert set(c.roles) == {"massive_layer", "marking_layers", "drift_layer"}
    assert all(r["source"] == "circuit" for r in c.roles.values())
    o = c.with_roles(3, drift_layer=0, marking_layers=[2, 0])
    assert (o.drift_layer, o.marking_layers, o.massive_layer) == (0, [0, 2], 1)
    assert o.roles["drift_layer"]["source"] == "override" and o.roles["massive_layer"]["source"] == "circuit"
    assert "set by you" in o.describe("drift_layer") and "from the circuit" in o.describe("massive_layer")
    with pytest.raises(SinkholeError, match="--drift-layer"):
        c.with_roles(3, drift_layer=3)
    assert type(c).from_dict(c.to_dict()) == c
    with pytest.raises(SinkholeError, match="unknown field"):
        type(c).from_dict({**c.to_dict(), "main_sink_layer": 1})


def test_random_weights_have_no_classical_sink(tiny_family):
    """Tiny random models (gated-attention Qwen3.5 and MoE ones included) have neither a massive
    first-token norm nor concentrated attention: the circuit says so instead of inventing a sink,
    and still names (nominal) layers for the commands."""
    from sinkhole.circuit import discover

    c = discover(tiny_family)
    assert c.sink_kind == "none" and not c.has_sink
    assert c.headline.startswith("No classical sink") and "nominal" in c.log_line()
    for setting in ("bos", "no_bos"):
        e = c.sink_evidence[setting]
        assert e["norm_ratio"] < 5 and e["attn_first"] < 0.3 and e["sink"] is False
    assert 0 <= c.drift_layer < tiny_family.adapter.n_layers


def test_sink_classification_rule():
    """A setting counts only with both a massive norm and concentrated attention."""
    from sinkhole.circuit.circuit import _setting

    assert _setting([1.0, 60.0], [1.0, 1.0], [0.9, 0.5])["sink"]
    assert not _setting([1.0, 60.0], [1.0, 1.0], [0.9, 0.1])["sink"]  # attention not concentrated
    assert not _setting([1.0, 2.0], [1.0, 1.0], [0.9, 0.8])["sink"]  # no massive norm
    e = _setting([1.0, 60.0, 3.0], [1.0, 2.0, 1.0], [None, 0.4, None])  # a hybrid's linear layers
    assert e["layer"] == 1 and e["norm_ratio"] == 30.0 and e["attn_first"] == 0.4


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_ablation_controls_and_super_weights(family):
    """mean_first writes BOS's own activation back (every text starts with BOS): exactly no effect;
    zero and mean_typical move the first token; the super weight is the column's largest entry and
    zeroing it edits the real parameter (dense, Conv1D or fused experts) and restores it."""
    from sinkhole.circuit.common import text_batch
    from sinkhole.circuit.controls import ablation_controls, super_weights, zeroed_entry
    from tiny import tiny_lm

    lm = tiny_lm(family)
    ids = text_batch(lm, n=3, n_tokens=12, bos=True)
    ns = [5, 77]
    by = {c.replacement: c for c in ablation_controls(lm, 1, ns, ids)}
    assert by["mean_first"].first_norm_after == pytest.approx(by["mean_first"].first_norm_before, rel=1e-5)
    assert abs(by["mean_first"].ppl_change_pct) < 1e-3
    assert by["zero"].values == [0.0, 0.0] and by["zero"].first_norm_after != by["zero"].first_norm_before
    assert by["mean_typical"].values != by["mean_first"].values
    w = lm.adapter.w_out(1).detach().clone()
    (s,) = super_weights(lm, 1, [77], ids, top=2)
    col = w[:, 77]
    assert s.top[0]["row"] == int(col.abs().argmax()) and abs(s.top[0]["value"] - float(col[s.top[0]["row"]])) < 1e-4
    with zeroed_entry(lm, 1, s.top[0]["row"], 77):
        assert float(lm.adapter.w_out(1).detach()[s.top[0]["row"], 77]) == 0.0
    assert torch.equal(lm.adapter.w_out(1), w)
