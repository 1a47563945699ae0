"""Search / verify / fine-tune / scan step / report / CLI of the patch on tiny random models."""

from __future__ import annotations

import json

import pytest
import torch

from sinkhole.errors import SinkholeError
from sinkhole.evaluate.metrics import text_metrics
from sinkhole.patch import Patch, PatchOp
from sinkhole.experimental.finetune import FinetuneConfig, finetune_patch
from sinkhole.experimental.search import ExperimentalConfig, search_experimental
from sinkhole.patch.search import SearchConfig, search_patch, targets, verify_patch

CFG = dict(search_words=("a", "b"), search_reps=(8,), verify_words=("c", "d"), verify_reps=(12,), max_new_tokens=6,
           finetune_steps=2, quick=True)


def test_text_metrics_identity_and_change(tiny):
    texts = ["one two three four five six seven", "a b c d e f g h i j"]
    same = text_metrics(tiny, None, texts)
    assert same.ppl_change_pct == 0 and same.top1_agreement == 1 and same.mean_kl_nats == 0
    changed = text_metrics(tiny, Patch([PatchOp(1, "scale", None, values=5.0)]), texts)
    assert changed.mean_kl_nats > 0 and changed.ppl_before == same.ppl_before
    assert changed.top1_agreement < 1 or changed.ppl_after != changed.ppl_before
    assert changed.n_tokens == same.n_tokens == sum(len(t.split()) for t in texts)


@pytest.mark.experimental
def test_finetune_trains_only_chosen_params_and_keeps_model(tiny):
    before = {k: v.detach().clone() for k, v in tiny.model.named_parameters()}
    cfg = FinetuneConfig(layers=[1], words=("a", "b"), reps=(8, 12), templates=("raw",), steps=3, min_reps=2,
                         n_texts=4, text_words=12, lr=1e-2)
    p = finetune_patch(tiny, cfg)
    assert set(p.weights) == {n for n, _ in tiny.adapter.mlp_parameters([1])}
    assert all(torch.equal(before[k], v) for k, v in tiny.model.named_parameters())  # lm left unchanged
    assert any(not torch.equal(before[k], w) for k, w in p.weights.items())
    assert p.weights_only and p.kind == "weights"


@pytest.mark.experimental
def test_finetune_neurons_changes_only_their_rows_and_columns(tiny):
    cfg = FinetuneConfig(neurons={1: [5, 9]}, words=("a",), reps=(8,), templates=("raw",), steps=2, min_reps=2,
                         n_texts=4, text_words=12, lr=1e-2)
    p = finetune_patch(tiny, cfg)
    params = dict(tiny.model.named_parameters())
    down = "model.layers.1.mlp.down_proj.weight"
    d = (p.weights[down] - params[down]).abs()
    assert d[:, [5, 9]].sum() > 0
    keep = [j for j in range(d.shape[1]) if j not in (5, 9)]
    assert d[:, keep].sum() == 0
    up = "model.layers.1.mlp.up_proj.weight"
    du = (p.weights[up] - params[up]).abs().sum(-1)
    assert du[[5, 9]].sum() > 0 and du[keep].sum() == 0
    d_model = tiny.adapter.d_model
    assert p.n_numbers() == 3 * 2 * d_model  # gate and up rows, down columns of 2 neurons
    assert f"{3 * 2 * d_model:,} of" in p.describe()


def test_corpus_training_words_never_include_excluded_words():
    from sinkhole.data import corpus_words

    cfg = FinetuneConfig(words=("poem", "ocean"), corpus_words=40, exclude_words=("ocean", "The", "and"))
    ws = cfg.train_words()
    assert ws[0] == "poem" and len(ws) == 41 and len(set(ws)) == 41
    assert not {"ocean", "the", "and"} & {w.lower() for w in ws}
    assert corpus_words("tempest", 5) == corpus_words("tempest", 5)  # deterministic
    assert all(w.isalpha() and w.islower() and len(w) >= 3 for w in corpus_words("tempest", 50))


@pytest.mark.experimental
def test_local_finetune_stop_layer_and_example_cap(tiny):
    base = dict(layers=[0], words=("a", "b", "c"), reps=(8, 12), templates=("raw",), steps=1, min_reps=2,
                n_texts=4, text_words=12, objective="local")
    p = finetune_patch(tiny, FinetuneConfig(**base, stop_layer=2, max_examples=2))
    assert p.meta["stop_layer"] == 2
    from sinkhole.experimental.finetune import _rep_examples

    assert len(_rep_examples(tiny, FinetuneConfig(**base))) == 6
    assert len(_rep_examples(tiny, FinetuneConfig(**base, max_examples=2))) == 2
    with pytest.raises(SinkholeError, match="stop_layer"):
        finetune_patch(tiny, FinetuneConfig(**{**base, "layers": [2]}, stop_layer=1))
    with pytest.raises(SinkholeError, match="objective"):
        finetune_patch(tiny, FinetuneConfig(**{**base, "objective": "nope"}))


@pytest.mark.experimental
@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_head_inputs_rebuild_the_original_logits(family):
    from sinkhole.evaluate.metrics import encode_batch
    from sinkhole.experimental.finetune import _head_inputs, _head_logits
    from tiny import tiny_lm

    lm = tiny_lm(family)
    ids, mask = encode_batch(lm, ["one two three four five", "a b c"], max_tokens=16)
    with torch.no_grad():
        want = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        got = _head_logits(lm, _head_inputs(lm, ids, mask, batch=1))
    assert torch.allclose(got[mask > 0], want[mask > 0], atol=1e-5)


@pytest.mark.experimental
def test_local_finetune_keep_at_logits(tiny):
    base = dict(layers=[0], words=("a", "b"), reps=(8,), templates=("raw",), steps=3, min_reps=2, n_texts=4,
                text_words=12, objective="local", stop_layer=1, lr=1e-2)
    before = {k: v.detach().clone() for k, v in tiny.model.named_parameters()}
    p = finetune_patch(tiny, FinetuneConfig(**base, keep_at="logits"))
    assert "next-token KL" in p.notes and p.meta["config"]["keep_at"] == "logits"
    assert all(torch.equal(before[k], v) for k, v in tiny.model.named_parameters())
    assert any(not torch.equal(before[k], w) for k, w in p.weights.items())
    first = finetune_patch(tiny, FinetuneConfig(**{**base, "steps": 1}, keep_at="logits"))
    assert first.meta["history"][0]["keep"] == pytest.approx(0, abs=1e-6)  # KL to itself before any step
    with pytest.raises(SinkholeError, match="keep_at"):
        finetune_patch(tiny, FinetuneConfig(**base, keep_at="nowhere"))


@pytest.mark.experimental
def test_search_skips_a_candidate_equal_to_an_earlier_one(tiny, monkeypatch):
    import sinkhole.patch.search as search  # the name the search calls

    class Div:  # every patch leaves half the cases diverging: the search tries every family
        rate = garak_rate = either_rate = 0.5
        n_cases = 2

        def to_dict(self):
            return {"rate": 0.5, "garak_rate": 0.5, "either_rate": 0.5, "n_cases": 2}

    monkeypatch.setattr(search, "run_judged", lambda *a, **k: Div())
    with pytest.raises(SinkholeError, match="unknown candidate family 'detector_cap'"):  # a research family
        search_patch(tiny, SearchConfig(**{k: v for k, v in CFG.items() if k != "finetune_steps"},
                                        families=("run_gate", "detector_cap")), log=lambda m: None)
    cfg = ExperimentalConfig(**CFG, families=("paper_clamp", "paper_clamp", "detector_cap"), n_neurons=2, cap_neurons=3)
    res = search_experimental(tiny, cfg, log=lambda m: None)
    fams = [(t["family"], "skipped" in t) for t in res.tried]
    assert fams == [("paper_clamp", False), ("paper_clamp", True), ("detector_cap", False)]
    assert res.tried[1]["skipped"] == "same patch as paper_clamp"
    assert sum(len(op["neurons"]) for op in res.tried[2]["ops"]) == 3 * len(res.circuit["marking_layers"])


@pytest.mark.experimental
def test_search_and_verify_on_tiny(tiny):
    cfg = ExperimentalConfig(**CFG, families=("paper_clamp", "detector_cap", "finetune_local"))
    res = search_experimental(tiny, cfg, log=lambda m: None)
    assert res.tried and all("search_divergence" in t or "error" in t for t in res.tried)
    d = res.to_dict()
    json.dumps(d)  # JSON-ready
    if res.patch is not None:
        v = verify_patch(tiny, res.patch, cfg, sink_reps=30, log=lambda m: None)
        assert v["divergence_before"]["n_cases"] == 2 and v["words"] == ["c", "d"]
        narrow = v.get("narrow_targets", v["targets"])
        assert set(narrow) >= {"divergence_le_tenth", "ppl_change_le_1pct", "top1_ge_98pct", "kl_le_0.005"}
        if cfg.broad:  # the broad verification's targets are then the patch's targets
            assert v["broad"]["methods"][0] == "patch"
            assert set(v["targets"]) >= {"divergence_every_family", "top1_ge_98pct_every_setting",
                                         "kl_le_0.005_every_setting", "ppl_le_1pct_every_setting", "all"}
        assert len(v["sink_attention"]["before"]) == tiny.adapter.n_layers
        assert all(0 <= x <= 1.0001 for x in v["sink_attention"]["before"])


def test_disjoint_sets_enforced():
    with pytest.raises(SinkholeError, match="disjoint"):
        SearchConfig(search_words=("poem",), verify_words=("Poem",)).check_disjoint()
    with pytest.raises(SinkholeError, match="disjoint"):
        SearchConfig(search_reps=(100,), verify_reps=(100,)).check_disjoint()


def test_targets_logic():
    v = {"divergence_before": {"either_rate": 0.5}, "divergence_after": {"either_rate": 0.05},
         "text": {"ppl_change_pct": 0.5, "top1_agreement": 0.99, "mean_kl_nats": 0.001}}
    assert targets(v)["all"]
    v["divergence_after"]["either_rate"] = 0.1
    assert not targets(v)["all"] and not targets(v)["divergence_le_tenth"]


def test_scan_step_and_report(tiny, tmp_path):
    from sinkhole.pipeline import steps_patch as steps
    from sinkhole.report.sections_patch import patch_section
    from sinkhole.pipeline.engine import Context, ScanOptions

    opts = ScanOptions(quick=True, patch=True, patch_words=["a", "b"], patch_families=["paper_zero"])
    ctx = Context(lm=tiny, options=opts.resolved(), out=tmp_path)
    res = steps.patch_step(ctx)
    out = res.to_dict()
    assert out["summary"].startswith("Patch")
    assert type(res).from_dict(json.loads(json.dumps(out))).to_dict() == out
    doc = {"results": {"patch": out}}
    html, figs = patch_section(doc)
    assert "Patch" in html
    if out.get("verification"):
        assert (tmp_path / "patched-model" / "patch.json").exists()
        assert figs and figs[0].axes[0]["xlabel"] and figs[0].axes[0]["ylabel"]
    assert patch_section({"results": {}}) is None


def test_lm_eval_adapter_matches_direct_scores(tiny, tmp_path):
    pytest.importorskip("lm_eval")
    from sinkhole.integrations.lm_eval import compare_tasks, make_lm_class, write_local_task

    class Req:
        def __init__(self, *args):
            self.args = args

    model = make_lm_class()(tiny, None)
    ctx, cont = "a b c", " d e"
    (ll, _), = model.loglikelihood([Req(ctx, cont)])
    ids = torch.tensor([[1] + tiny.tokenizer("a b c d e")["input_ids"]])
    with torch.no_grad():
        lp = torch.log_softmax(tiny.model(ids).logits.float(), -1)[0]
    direct = float(lp[3, ids[0, 4]] + lp[4, ids[0, 5]])
    assert abs(ll - direct) < 1e-4
    patched = make_lm_class()(tiny, Patch([PatchOp(1, "scale", None, values=4.0)]))
    (ll2, _), = patched.loglikelihood([Req(ctx, cont)])
    assert abs(ll2 - ll) > 1e-4
    folder = write_local_task(tmp_path / "task", n=4)
    table = compare_tasks(tiny, Patch([PatchOp(1, "scale", None, values=4.0)]), str(folder), limit=4)
    acc = table["sinkhole_cloze"]["acc"]
    assert 0 <= acc["before"] <= 1 and 0 <= acc["after"] <= 1


def test_cli_errors_are_one_line(capsys, tmp_path):
    from sinkhole.cli import main

    assert main(["patch", "--out", str(tmp_path / "o"), "--words", "x", "--verify-words", "x"]) == 2
    err = capsys.readouterr().err
    assert "disjoint" in err and err.count("\n") == 1
    assert main(["eval", "--patch", str(tmp_path / "none.json")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["experimental", "search", "--out", str(tmp_path / "o"), "--steps", "0"]) == 2
    assert not (tmp_path / "o").exists()


def test_summary_md_and_report_share_the_patch_rows():
    from sinkhole.patch.tables import summary_markdown
    from sinkhole.report.sections_patch import patch_section

    div = {"rate": 0.5, "garak_rate": 0.25, "either_rate": 0.5, "mean_tokens_until_divergence": 12.0}
    v = {"divergence_before": div, "divergence_after": {**div, "rate": 0.0, "garak_rate": 0.0, "either_rate": 0.0},
         "text": {"ppl_before": 10.0, "ppl_after": 10.1, "ppl_change_pct": 1.0, "top1_agreement": 0.9812,
                  "mean_kl_nats": 0.0025},
         "sink_attention": {"word": "poem", "reps": 200, "mean_over_layers_from": 3, "mean_before": 0.2,
                            "mean_after": 0.7, "mean_text_reference": 0.8, "before": [0.1], "after": [0.7],
                            "text_reference": [0.8], "last_queries": 8},
         "heldout_text": "sonnets.txt", "words": ["a"], "reps": [100], "targets": {"all": True}}
    tried = [{"family": "paper_zero", "description": "zero 3 neurons", "size": 1234,
              "search_divergence": {"rate": 0.5, "garak_rate": 0.0},
              "train_text": {"ppl_change_pct": 0.2, "top1_agreement": 0.99, "mean_kl_nats": 0.001}},
             {"family": "detector_cap", "skipped": "same patch as paper_clamp"}]
    md = summary_markdown(v, tried, "paper_zero")
    html, _ = patch_section({"results": {"patch": {"verification": v, "chosen": "paper_zero",
                                                   "search": {"tried": tried, "baseline_search": {}}}}})
    for text in ("paper_zero: zero 3 neurons (chosen)", "1,234", "50% / 0%", "same patch as paper_clamp",
                 "98.12%", "10.100 (+1.00%)", "0.700 (ordinary text: 0.800)"):
        assert text in md and text in html, text
