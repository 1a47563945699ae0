"""The run gate (sinkhole.decoding.gate): which tokens it hides, and that the gated model equals the
plain model on the collapsed input, untouched on ordinary text, and consistent under a KV cache."""

from __future__ import annotations

import pytest
import torch

from sinkhole.errors import SinkholeError
from sinkhole.patch.core import Patch, apply_patch
from sinkhole.decoding.gate import NEVER, RunGate, collapse, excess_mask, expiry, hidden_mask

G = RunGate(window=8, max_distinct=3, min_count=2)


def _ids(lm, seed=0, n_pre=6, run=(0, 1), reps=30, n_post=4):
    V = lm.model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(5, V, (n_pre + 2 + n_post,), generator=g).tolist()
    pre, unit, post = toks[:n_pre], [toks[n_pre + i] for i in run], toks[n_pre + 2:]
    return pre + unit * reps + post


def test_excess_rule():
    a, b, q = 11, 12, 13
    ids = [1, 2, 3] + [a] * 20 + [q, 4]
    ex = excess_mask(torch.tensor(ids), G)[0].tolist()
    # the first tokens of the run are seen; once the 8 tokens before hold <= 3 distinct ones (at
    # t = 9 they are 2, 3 and six a's) and the token is already there twice, it is excess
    assert ex[:9] == [False] * 9
    assert all(ex[9:3 + 20])
    assert ex[-2:] == [False, False]  # the closing token is new: not hidden, nor is what follows
    # a cluster sequence (3 tokens, no exact repetition) is hidden too; ordinary varied text never
    cl = [a, b, q] * 10
    assert sum(excess_mask(torch.tensor([5, 6] + cl), G)[0].tolist()) > 15
    assert not excess_mask(torch.arange(100, 160), G).any()
    # padding (-1) never counts as part of a run
    assert not excess_mask(torch.tensor([-1] * 10 + [a] * 5), G).any()
    # the input-side collapse keeps what is not excess plus the run's last repetition (period 1 here)
    assert collapse(ids, G) == [1, 2, 3] + [a] * 7 + [q, 4]
    # a three-token unit is shortened by whole repetitions: what is kept of the run is still periodic
    # (a window of 12: the period is read from three repetitions before the first excess token)
    g12 = RunGate(window=12, max_distinct=3, min_count=2)
    run = [21, 22, 23] * 20
    kept = collapse([1, 2] + run + [q], g12)
    assert kept[-4:] == [21, 22, 23, q] and len(kept) < 30
    body = kept[2:-1]
    assert body == run[:len(body)] and len(body) % 3 == 0
    # the stretch is cut in blocks of 3 and only its last (partial or whole) block is never hidden
    seq = torch.tensor([7, 8, 9] + run)
    exc = excess_mask(seq, g12)[0]
    n_ex = int(exc.sum())
    never = (expiry(seq, g12)[0] == NEVER) & exc
    assert int(never.sum()) == (n_ex % 3 or 3) and bool(never[-1])
    # a stretch with no exact unit (a cluster sequence in random order; the digits of close numbers)
    # is excess but left alone, unless the gate is told to cut clusters too
    g4 = RunGate(window=8, max_distinct=4, min_count=2)
    cl_seq = [5, 6] + [30 + int(i * 1.6180339887) % 4 for i in range(60)]  # aperiodic (a Beatty sequence)
    assert excess_mask(torch.tensor(cl_seq), g4).any()
    assert not hidden_mask([cl_seq], g4).any() and collapse(cl_seq, g4) == cl_seq
    assert hidden_mask([cl_seq], RunGate(window=8, max_distinct=4, min_count=2, cluster=True)).any()


def test_gate_checks_its_fields():
    with pytest.raises(SinkholeError, match="positive integer"):
        RunGate.from_dict({"window": 0, "max_distinct": 2, "min_count": 2})
    with pytest.raises(SinkholeError, match="unknown field"):
        RunGate.from_dict({"window": 8, "threshold": 2})
    with pytest.raises(SinkholeError, match="must not exceed"):
        RunGate.from_dict({"window": 4, "max_distinct": 8, "min_count": 2})


def test_gated_model_equals_collapsed_input(tiny_family):
    lm = tiny_family
    ids = _ids(lm)
    p = Patch(gate=G)
    with torch.no_grad():
        with apply_patch(lm, p, validate=False):
            gated = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
        ref = lm.model(input_ids=torch.tensor([collapse(ids, G)])).logits[0, -1]
        plain = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert len(collapse(ids, G)) < len(ids) - 40
    assert (plain - ref).abs().max() > 1e-3  # the run matters to the plain model
    if lm.adapter.family == "qwen3_5_text":
        # linear-attention layers cannot hide a token: only positions are compressed there
        assert (gated - ref).abs().max() < (plain - ref).abs().max()
    else:
        torch.testing.assert_close(gated, ref, atol=1e-4, rtol=1e-4)


def test_gate_leaves_text_without_runs_bit_identical(tiny_family):
    lm = tiny_family
    V = lm.model.config.vocab_size
    ids = torch.randint(5, V, (2, 40), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        before = lm.model(input_ids=ids, attention_mask=mask).logits
        with apply_patch(lm, Patch(gate=G), validate=False):
            after = lm.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2"])
def test_gate_under_kv_cache_equals_one_pass(family):
    from tiny import tiny_lm
    from transformers import DynamicCache

    lm = tiny_lm(family)
    ids = _ids(lm, seed=2, reps=20)
    with torch.no_grad(), apply_patch(lm, Patch(gate=G), validate=False):
        full = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
        cache = DynamicCache(config=lm.model.config)
        kw = "cache" if "cache" in __import__("inspect").signature(lm.model.forward).parameters else "past_key_values"
        out = lm.model(input_ids=torch.tensor([ids[:20]]), use_cache=True, **{kw: cache})
        for t in ids[20:]:
            out = lm.model(input_ids=torch.tensor([[t]]), use_cache=True, **{kw: cache})
        step = out.logits[0, -1]
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)


def test_gate_in_the_exact_check_equals_generation(tiny):
    """greedy_check crops the cache back after a rejected draft: the gate's history follows it."""
    from sinkhole.decoding.generate import generate
    from sinkhole.attack.exact import greedy_check
    from sinkhole.attack.prompts import make_cases

    cases = make_cases(tiny, ["poem", "cat"], [30], ["raw"])
    p = Patch(gate=G)
    hooks = lambda: apply_patch(tiny, p, validate=False)  # noqa: E731
    checks = greedy_check(tiny, cases, 12, quiet=True, hooks=hooks)
    with hooks():
        gens = [generate(tiny, [c.ids], 12)[0] for c in cases]
    for k, g in zip(checks, gens):
        got = list(k.generated_ids) + ([k.stop_token] if k.stop_token is not None else [])
        assert got == g[:len(got)]
        assert len(got) > 0


def test_gate_patch_round_trip_and_export(tiny, tmp_path):
    from sinkhole.patch.export import export_patched, load_patched

    p = Patch(gate=RunGate(window=8, max_distinct=3, min_count=2), name="run_gate", meta={"family": "run_gate"})
    assert p.kind == "gate" and "run gate" in p.describe() and p.n_numbers() == 0
    p.save(tmp_path / "p.json")
    q = Patch.load(tmp_path / "p.json")
    assert q.gate == p.gate
    ids = torch.tensor([_ids(tiny)])
    with torch.no_grad(), apply_patch(tiny, p):
        want = tiny.model(input_ids=ids).logits
    out = export_patched(tiny, p, tmp_path / "out")
    assert "ORIGINAL model" in (out / "SUMMARY.md").read_text()
    lm2 = load_patched(out, tokenizer=tiny.tokenizer)
    with torch.no_grad():
        got = lm2.model(input_ids=ids).logits
    torch.testing.assert_close(got, want)


@pytest.mark.experimental
def test_gguf_export_refuses_a_gate(tiny, tmp_path):
    from sinkhole.experimental.gguf_export import patch_to_gguf

    tiny.info["gguf"] = str(tmp_path / "x.gguf")
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    with pytest.raises(SinkholeError, match="hooks, which a GGUF file cannot hold"):
        patch_to_gguf(tiny, Patch(gate=G), tmp_path / "y.gguf")


def test_hold_keeps_short_stretches_whole_and_cuts_long_ones_as_before():
    """``hold``: a stretch of at most ``hold`` excess tokens is never hidden; a longer one is hidden
    from its ``hold``-th excess token on exactly as without ``hold`` (the same collapse at the end)."""
    import dataclasses

    a, q = 11, 13
    held = dataclasses.replace(G, hold=12)
    short = [1, 2, 3] + [a] * 18 + [q, 4]  # 12 excess tokens (the run's tokens 7..18)
    assert int(excess_mask(torch.tensor(short), G).sum()) == 12
    assert not hidden_mask([short], held).any() and collapse(short, held) == short
    assert hidden_mask([short], G).any() and len(collapse(short, G)) < len(short)
    long = [1, 2, 3] + [a] * 40 + [q, 4]
    assert collapse(long, held) == collapse(long, G)
    e0, e1 = expiry(torch.tensor(long), G)[0], expiry(torch.tensor(long), held)[0]
    r0 = int(torch.nonzero(excess_mask(torch.tensor(long), G)[0])[0])
    fin = e0 < NEVER
    assert torch.equal(e1[fin], e0[fin].clamp_min(r0 + 12)) and torch.equal(e1 < NEVER, fin)
    with pytest.raises(SinkholeError, match="non-negative"):
        RunGate.from_dict({"window": 8, "hold": -1})
    assert RunGate.from_dict(held.to_dict()) == held


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hold_gate_equals_collapse_and_is_untouched_below_hold(family):
    """With ``hold`` the gated model still equals the plain model on the collapsed input (and under
    a KV cache, token by token), and a run too short to pass ``hold`` leaves it bit-identical."""
    import dataclasses

    from tiny import tiny_lm
    from sinkhole.decoding.generate import generate
    from sinkhole.decoding.tokens import stop_ids

    lm = tiny_lm(family)
    held = dataclasses.replace(G, hold=10)
    ids = _ids(lm)
    with torch.no_grad():
        with apply_patch(lm, Patch(gate=held), validate=False):
            gated = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
        ref = lm.model(input_ids=torch.tensor([collapse(ids, held)])).logits[0, -1]
    torch.testing.assert_close(gated, ref, atol=1e-4, rtol=1e-4)
    short = ids[:4] + [ids[5]] * 16 + ids[-3:]  # at most 10 excess tokens: held whole
    assert not hidden_mask([short], held).any() and hidden_mask([short], G).any()
    with torch.no_grad():
        plain = lm.model(input_ids=torch.tensor([short])).logits
        with apply_patch(lm, Patch(gate=held), validate=False):
            same = lm.model(input_ids=torch.tensor([short])).logits
    assert torch.equal(plain, same)
    # a run the model goes on writing crosses ``hold`` while decoding: hooks and the fed engine agree
    from sinkhole.decoding.engines import TorchGate

    prompt = ids[:4] + [ids[5]] * 14
    with apply_patch(lm, Patch(gate=held), validate=False):
        want = generate(lm, [prompt], 20)[0]
    assert TorchGate(lm, held).greedy(prompt, 20, stop_ids(lm)) == want
