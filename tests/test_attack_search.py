"""Sweep (checkpoint, resume, shards, merge), cluster attack and predictor on tiny models."""

import json
import random

import pytest

from sinkhole.attack.cluster import ClusterConfig, _max_run, cluster_attack, clusters_for, sequence, token_features
from sinkhole.experimental.predictor import Predictor, auc, case_features
from sinkhole.attack.prompts import make_cases
from sinkhole.attack.sweep import SweepConfig, frequent_tokens, merge, rank, summarize, sweep_tokens
from sinkhole.errors import SinkholeError


def test_frequent_tokens_excludes_specials_and_is_deterministic(tiny):
    toks = frequent_tokens(tiny, 20)
    assert len(toks) == 20 and len(set(toks)) == 20
    assert not {0, 1, 2} & set(toks)
    assert toks == frequent_tokens(tiny, 20)
    assert len(frequent_tokens(tiny, None)) == 125


def test_sweep_records_and_resume(tiny, tmp_path):
    ck = tmp_path / "ck.json"
    toks = frequent_tokens(tiny, 10)
    part = sweep_tokens(tiny, toks[:4], SweepConfig(max_reps=24, batch_size=3), checkpoint=ck, quiet=True)
    assert set(part["records"]) == {str(t) for t in toks[:4]}
    saved = json.loads(ck.read_text())
    assert len(saved["records"]) == 4
    # resume: the 4 finished tokens are not recomputed (we poison them to prove it)
    saved["records"][str(toks[0])]["final_norm_ratio"] = -123.0
    ck.write_text(json.dumps(saved))
    full = sweep_tokens(tiny, toks, SweepConfig(max_reps=24, batch_size=3), checkpoint=ck, quiet=True)
    assert len(full["records"]) == 10
    assert full["records"][str(toks[0])]["final_norm_ratio"] == -123.0
    fresh = sweep_tokens(tiny, toks, SweepConfig(max_reps=24, batch_size=5), quiet=True)
    for t in toks[1:]:
        a, b = fresh["records"][str(t)], full["records"][str(t)]
        assert a["reps_to_sink"] == b["reps_to_sink"]
        assert abs(a["final_norm_ratio"] - b["final_norm_ratio"]) < 1e-3
    with pytest.raises(SinkholeError):  # other settings, same checkpoint
        sweep_tokens(tiny, toks, SweepConfig(max_reps=30), checkpoint=ck, quiet=True)


def test_sweep_reps_to_sink_is_first_crossing(tiny):
    res = sweep_tokens(tiny, frequent_tokens(tiny, 6), SweepConfig(max_reps=20, threshold=0.0), quiet=True)
    assert all(r["reps_to_sink"] == 1 for r in res["records"].values())
    res = sweep_tokens(tiny, frequent_tokens(tiny, 6), SweepConfig(max_reps=20, threshold=1e9), quiet=True)
    assert all(r["reps_to_sink"] is None for r in res["records"].values())
    s = summarize(res)
    assert s["frac_sink_within_max_reps"] == 0.0 and s["n_tokens"] == 6


def test_sweep_shards_merge_equal_single_run(tiny, tmp_path):
    toks = frequent_tokens(tiny, 9)
    paths = []
    for i in range(3):
        p = tmp_path / f"s{i}.json"
        sweep_tokens(tiny, toks[i::3], SweepConfig(max_reps=16), checkpoint=p, quiet=True,
                     extra={"shard": i, "num_shards": 3})
        paths.append(p)
    merged = merge(paths)
    single = sweep_tokens(tiny, toks, SweepConfig(max_reps=16), quiet=True)
    assert set(merged["records"]) == set(single["records"])
    assert [r["token_id"] for r in rank(merged["records"])] == [r["token_id"] for r in rank(single["records"])]
    other = tmp_path / "other.json"
    sweep_tokens(tiny, toks[:2], SweepConfig(max_reps=17), checkpoint=other, quiet=True)
    with pytest.raises(SinkholeError):
        merge(paths + [other])


def test_sweep_with_generation(tiny):
    res = sweep_tokens(tiny, frequent_tokens(tiny, 3), SweepConfig(max_reps=12, generate_tokens=3), quiet=True)
    assert all("diverged" in r and isinstance(r["text"], str) for r in res["records"].values())


def test_cluster_building_blocks(tiny):
    pool = frequent_tokens(tiny, 40)
    f = token_features(tiny, pool, "layer0", batch_size=16)
    assert f.shape == (40, tiny.adapter.d_model)
    cl = clusters_for(f, pool, pool[:3], 5)
    assert all(len(c) == 5 and len(set(c)) == 5 and c[0] == s for c, s in zip(cl, pool[:3]))
    seq = sequence(cl[0], 200, random.Random(0))
    assert _max_run(seq) == 1 and set(seq) <= set(cl[0])
    e = token_features(tiny, pool[:4], "embedding")
    assert e.shape == (4, tiny.adapter.d_model)


def test_cluster_attack_runs_on_tiny(tiny):
    r = cluster_attack(tiny, ClusterConfig(pool_size=60, n_seeds=3, size=4, length=40, seqs_per_cluster=2,
                                           n_examples=1, max_new_tokens=4), quiet=True)
    assert r["method"]["n_clusters"] == 3
    assert len([x for x in r["rows"] if x["kind"] == "cluster"]) == 6
    assert len([x for x in r["rows"] if x["kind"] == "random"]) == 6
    assert all(x["max_run"] == 1 for x in r["rows"])
    assert 0.0 <= r["sink_rate_cluster"] <= 1.0 and len(r["examples"]) == 2


@pytest.mark.experimental
def test_auc_and_predictor_fit():
    assert auc([0.9, 0.8, 0.1], [True, True, False]) == 1.0
    assert auc([0.1, 0.9], [True, False]) == 0.0
    assert auc([0.5, 0.5], [True, False]) == 0.5
    assert auc([1.0], [True]) is None

    class F:
        def __init__(self, a, b):
            self.attn_drop, self.norm_ratio, self.norm_growth = a, b, 0.0

    feats = [F(0.9, 0.1), F(0.8, 0.2), F(0.2, 0.9), F(0.1, 0.8)]
    labels = [True, True, False, False]
    p = Predictor.fit(feats, labels)
    assert p.train_balanced_accuracy == 1.0
    ev = p.evaluate(feats, labels)
    assert ev["accuracy"] == 1.0 and ev["auc"] == 1.0
    assert ev["auc_per_feature"]["norm_ratio"] == 0.0  # inverse relation is visible per feature


@pytest.mark.experimental
def test_case_features_batched_equals_single(tiny):
    cases = make_cases(tiny, "poem,a,company", "3,11", ["raw", "repeat"])
    batched = case_features(tiny, cases, drift_layer=1, k=2, batch_size=4, quiet=True)
    single = case_features(tiny, cases, drift_layer=1, k=2, batch_size=1, quiet=True)
    for a, b in zip(batched, single):
        assert (a.word, a.reps, a.template) == (b.word, b.reps, b.template)
        assert abs(a.attn_drop - b.attn_drop) < 1e-4
        assert abs(a.norm_ratio - b.norm_ratio) < 1e-3
        assert 0.0 <= a.attn_drop <= 1.0


def test_sink_probe_attention_equals_full_patterns_with_left_padding(tiny):
    """The probe reads the fused attn_first site; it must equal the weight on each row's first real
    token taken from full eager patterns."""
    import torch

    from sinkhole.experimental.predictor import sink_probe
    from sinkhole.capture import Hooks

    rows = [[5, 9, 9, 9, 9, 9, 9, 9, 9, 9], [5, 7, 7, 7, 7, 7]]
    w = max(map(len, rows))
    ids = torch.zeros((2, w), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, w - len(r):] = torch.as_tensor(r)
        mask[i, w - len(r):] = 1
    k = 3
    _, att = sink_probe(tiny, ids, 0, 1, 2, k, attention_mask=mask)
    h = Hooks(tiny)
    for L in (1, 2):
        h.read("attn_pattern", L)
    h.stop_after(2)
    with torch.no_grad(), h:
        h.forward(ids, attention_mask=mask, use_cache=False)
    want = torch.stack([torch.stack([h.cache[f"attn_pattern.{L}"][i, :, -k:, w - len(r)].mean(0)
                                     for i, r in enumerate(rows)]) for L in (1, 2)]).mean(0)
    assert att.shape == (2, k)
    assert torch.allclose(att, want.float(), atol=1e-5)
    assert (att > 0).all()
