"""The per-case explanation (attack/explain.py) on tiny models built so that the answer is known, and on SmolLM2.

The planted models are 2-layer Llamas whose weights are set by hand in an orthonormal basis:

* layer 0's attention is uniform (no queries) and reads only BOS into its value (along ``u``), so a token at
  position i carries ``c / (i + 1)`` of ``u``: a deep run of a word, like the word at position 0 without BOS, is
  the word's embedding alone (its first-token state), a short run is not;
* the **sink model** plants a first-token detector in layer 1's MLP: a neuron that fires when the residual is the
  word without ``u`` (a word at position 0, a run past about 50 copies) and writes a massive vector ``o``, which the
  unembedding reads as a different token: the run diverges through the sink state, and only through it;
* the **other model** has no detector; its unembedding reads ``u`` as a different token: it leaves short runs
  because they are near the start of the text, never reaching the first-token state.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sinkhole.attack.diverge import DivergeConfig, diverge
from sinkhole.attack.explain import Explainer, run_span, summarize_explanations
from sinkhole.circuit.circuit import Circuit
from tiny import tiny_lm

WORD = "poem"
C = 50.0  # u's weight at position 0, in units of the word's embedding


def _planted(detector: bool):
    torch.manual_seed(0)
    lm = tiny_lm("llama", n_layers=2)
    m = lm.model
    d = m.config.hidden_size
    basis, _ = torch.linalg.qr(torch.randn(d, d))
    b = basis.T  # rows: orthonormal directions
    e_bos, e_w, u, o, e_rep = b[0], b[1], b[2], b[3], b[4]
    w = lm.word_ids(WORD)[0]
    rep = lm.encode("Repeat:", bos=False)[0]
    bos = lm.bos_id
    div = 3 if 3 not in (w, rep, bos) else 4  # the token a divergence writes
    with torch.no_grad():
        emb = m.model.embed_tokens.weight
        emb.copy_(torch.randn(emb.shape) @ b[5:].T @ b[5:] * 0.3)  # other tokens: away from every named direction
        emb[bos], emb[w], emb[rep] = e_bos, e_w, e_rep
        for layer in m.model.layers:
            for p in layer.parameters():
                if p.dim() == 2:
                    p.zero_()
        a0 = m.model.layers[0].self_attn
        a0.v_proj.weight[0] = e_bos * (C / 8)  # RMSNorm scales a unit direction to norm 8: BOS's value is C
        a0.o_proj.weight[:, 0] = u
        if detector:
            mlp = m.model.layers[1].mlp
            mlp.gate_proj.weight[0] = 2.0 * (e_w - u)  # > 0 once the word outweighs u
            mlp.up_proj.weight[0] = 2.0 * e_w
            mlp.down_proj.weight[:, 0] = o
        head = m.lm_head.weight
        head.zero_()
        head[w] = 4.0 * e_w
        head[div] = 40.0 * o if detector else 4.0 * u  # without the detector: u outweighs the word up to ~50
    circ = Circuit(model=lm.name, sink_layers=[1], massive_layer=1, marking_layers=[1], drift_layer=1,
                   paper_sink_layer=None, first_token_norm=0.0, typical_norm=0.0, sink_neurons=[], layers={},
                   neurons=[], ablation=[], roles={}, sink_kind="any_token")
    return lm, circ, w


def _norm_at_layer1(lm, ids):
    from sinkhole.capture import run

    return run(lm, [ids], reads=[("resid_post", 1, lambda x, pos: x.float().norm(dim=-1))], stop_after=1)[
        "resid_post.1"][0]


def test_the_planted_detector_makes_any_word_at_position_0_and_a_deep_run_a_sink():
    lm, _, w = _planted(True)
    alone = _norm_at_layer1(lm, [w, w])  # the word at position 0, no BOS
    run = _norm_at_layer1(lm, lm.encode("Repeat:" + f" {WORD}" * 200))
    short = _norm_at_layer1(lm, lm.encode("Repeat:" + f" {WORD}" * 16))
    assert alone[0] > 20  # the first token's massive state
    assert run[-1] > 0.5 * alone[0]  # deep in the run: the same state
    assert short[-1] < 0.2 * run[-1]  # 16 copies: not yet


def test_a_run_that_diverges_through_a_planted_sink_is_explained_as_sink():
    lm, circ, _ = _planted(True)
    res = diverge(lm, [WORD], [200, 16], ["repeat"], DivergeConfig(max_new_tokens=8), explain=True, circ=circ,
                  quiet=True)
    long, short = res.cases
    assert long["diverged"] and long["tokens_until_divergence"] == 0
    e = long["explain"]
    assert e["state_reached"] and e["ratio_drift"] >= 0.5 and e["ratio_drift_16"] < 0.2
    assert e["causal"] == {"diverged_without_state": False, "stopped": True}
    assert e["verdict"] == "sink"
    # 16 copies: far from the state, and the model repeats (8 tokens are not enough to reach it)
    assert not short["diverged"] and short["explain"]["verdict"] is None and not short["explain"]["state_reached"]
    assert res.explanation["caused_by_sink"] == 1 and res.explanation["answer"] == "mostly"
    assert "1 of 1 divergences are caused by the sink" in res.headline


def test_a_model_that_leaves_runs_for_another_reason_is_explained_as_no_sink():
    lm, circ, _ = _planted(False)
    res = diverge(lm, [WORD], [30, 400], ["repeat"], DivergeConfig(max_new_tokens=8), explain=True, circ=circ,
                  quiet=True)
    short, long = res.cases
    assert short["diverged"] and not long["diverged"]  # near the start it leaves the run; deep in it, it repeats
    e = short["explain"]
    assert not e["state_reached"] and e["ratio_drift"] < 0.5
    assert e["causal"]["diverged_without_state"]  # cut back to the 16th copy, it still leaves
    assert e["verdict"] == "no_sink"
    s = res.explanation
    assert s["caused_by_sink"] == 0 and s["counts"]["no_sink"] == 1 and s["answer"] == "not"


def test_a_reached_state_whose_removal_does_not_help_is_not_causal():
    # the sink model with its unembedding reading the word's own direction as the divergent token too: the run
    # diverges after the state is reached, but cut back to the 16th copy it still diverges
    lm, circ, w = _planted(True)
    with torch.no_grad():
        lm.model.lm_head.weight[w] = 0.0  # the word is never predicted: every case leaves the run at once
    res = diverge(lm, [WORD], [200], ["repeat"], DivergeConfig(max_new_tokens=4), explain=True, circ=circ, quiet=True)
    e = res.cases[0]["explain"]
    assert res.cases[0]["diverged"] and e["state_reached"]
    assert e["verdict"] == "sink_state_not_causal" and e["causal"]["diverged_without_state"]


def test_bos_only_sink_makes_a_run_without_bos_no_sink():
    lm, circ, w = _planted(True)
    ex = Explainer(lm, dataclasses.replace(circ, sink_kind="bos_only"))
    ids = [w] * 100  # a raw run: its first token is the word, not BOS
    out = ex.explain(ids, [w], True, lambda hooks: True)
    assert out["ratio_drift"] > 0.5 and not out["first_is_sink"] and out["verdict"] == "no_sink"
    ex_none = Explainer(lm, dataclasses.replace(circ, sink_kind="none"))
    assert ex_none.explain(ids, [w], True, lambda hooks: True)["verdict"] == "no_sink"


def test_run_span_finds_the_longest_stretch():
    assert run_span([9, 5, 5, 5, 7, 5, 5], [5]) == (1, 4)
    assert run_span([9, 1, 2, 1, 2, 1, 2, 3], [1, 2]) == (1, 7)
    assert run_span([9, 8], [5]) is None
    assert run_span([9, 4, 5, 4, 4, 9], [4], allowed=[4, 5]) == (1, 5)
    assert run_span([1, 2], []) is None


def test_summary_counts_per_key_and_answers():
    recs = [{"template": "a", "explain": {"verdict": "sink", "state_reached": True}},
            {"template": "a", "explain": {"verdict": "no_sink", "state_reached": False}},
            {"template": "b", "explain": {"verdict": "sink_state_not_causal", "state_reached": True}},
            {"template": "b", "explain": {"verdict": None, "state_reached": False}}]
    s = summarize_explanations(recs)
    assert s["n_diverged"] == 3 and s["caused_by_sink"] == 1 and s["answer"] == "partly"
    assert s["by_template"]["a"] == {"diverged": 2, "sink": 1, "sink_state_not_causal": 0, "no_sink": 1,
                                     "no_sink_stopped": 0, "reached": 1, "n": 2}
    assert summarize_explanations(recs[3:])["answer"] is None
    assert summarize_explanations(recs[:1])["answer"] == "mostly"
    assert summarize_explanations(recs[1:3])["answer"] == "not"


@pytest.mark.real
def test_smollm2_answers_and_refusals_at_16_repetitions_are_no_sink(smollm2):
    res = diverge(smollm2, ["ocean", "poem"], [16], ["garak_this", "chat_user"], DivergeConfig(max_new_tokens=24),
                  explain=True, quiet=True)
    div = [c for c in res.cases if c["diverged"]]
    assert len(div) >= 3  # the model answers the question about the word, or says what it is
    for c in div:
        assert c["explain"]["verdict"] == "no_sink", c
        assert c["explain"]["ratio_drift"] < 0.2


def test_the_report_shows_the_verdicts_and_their_figure():
    from sinkhole.report.sections_attack import divergence_section

    lm, circ, _ = _planted(True)
    res = diverge(lm, [WORD], [200, 16], ["repeat"], DivergeConfig(max_new_tokens=8), explain=True, circ=circ,
                  quiet=True)
    html, figs = divergence_section({"results": {"divergence": res.to_dict()}})
    assert "Did the sink do it?" in html and "1 of 1 divergences are caused by the sink" in html
    fig = next(f for f in figs if f.name == "divergence_explained")
    assert all(a["xlabel"] and a["ylabel"] and a["has_data"] for a in fig.axes)
    plain = diverge(lm, [WORD], [16], ["repeat"], DivergeConfig(max_new_tokens=8), quiet=True)
    html, figs = divergence_section({"results": {"divergence": plain.to_dict()}})
    assert plain.explanation is None and "Did the sink do it?" not in html
    assert not any(f.name == "divergence_explained" for f in figs)


def test_diverge_explain_on_the_command_line(tmp_path, capsys):
    import json

    from helpers_reliability import make_tiny_folder
    from sinkhole.cli import main

    folder = make_tiny_folder(tmp_path / "tiny")
    out = tmp_path / "res.json"
    rc = main(["diverge", str(folder), "--words", "poem", "--reps", "40", "--templates", "raw,repeat",
               "--max-new-tokens", "4", "--explain", "--quiet", "--out", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "verdict" in text.splitlines()[0]
    doc = json.loads(out.read_text())
    ex = doc["results"]["divergence"]["explanation"]
    n = ex["n_diverged"]
    assert n == sum(c["diverged"] for c in doc["results"]["divergence"]["cases"])
    assert (f"of {n} divergences are caused by the sink" in text) if n else ("No case diverged" in text)
    for c in doc["results"]["divergence"]["cases"]:
        e = c["explain"]
        assert e["verdict"] in (("sink", "sink_state_not_causal", "no_sink") if c["diverged"] else (None,))
        assert {"ratio_drift", "ratio_marking", "attn0_late", "l0_distance", "state_reached"} <= set(e)
