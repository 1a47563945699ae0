"""The run gate's state check (``RunGate.confirm``): a stretch is shortened only once its layer-0 state
is first-token-like, read as the gated model computes it, the same for a prompt read at once and token
by token; with nothing confirmed the model is untouched."""

from __future__ import annotations

import math

import pytest
import torch

from sinkhole.decoding.gate import NEVER, RunGate, collapse, confirmed_at, excess_mask, expiry, hidden_mask
from sinkhole.decoding.state_check import StateReader, distances, read_state
from sinkhole.errors import SinkholeError
from sinkhole.patch.core import Patch, apply_patch

pytestmark = pytest.mark.experimental

G = RunGate(window=8, max_distinct=3, min_count=2)


def _run(lm, seed=0, reps=60, unit=1):
    V = lm.model.config.vocab_size
    toks = torch.randint(5, V, (6 + unit + 3,), generator=torch.Generator().manual_seed(seed)).tolist()
    return toks[:6] + toks[6:6 + unit] * reps + toks[6 + unit:]


def test_state_check_fields_round_trip_and_refuse_bad_values():
    g = RunGate(confirm=0.2, span=16)
    assert RunGate.from_dict(g.to_dict()) == g
    assert "confirm" not in RunGate().to_dict()  # a gate without the check writes what it always wrote
    assert "first-token-like" in g.describe()
    for bad in (0, -1, True, "x", 11):
        with pytest.raises(SinkholeError, match="confirm"):
            RunGate.from_dict({"confirm": bad})
    with pytest.raises(SinkholeError, match="span"):
        RunGate.from_dict({"confirm": 0.2, "span": 0})


def test_confirmation_is_the_first_window_at_or_under_the_distance():
    g = RunGate(confirm=0.2, span=4)
    d = torch.tensor([0.9] * 10 + [0.1] * 10, dtype=torch.float64)
    # windows of 4: the one ending at 12 holds 0.9 and three 0.1 (mean 0.3), the one ending at 13 four 0.1
    assert confirmed_at(d, 0, 19, g) == 13
    assert confirmed_at(torch.full((20,), 0.5, dtype=torch.float64), 0, 19, g) is None
    assert confirmed_at(d, 0, 2, g) is None  # a stretch shorter than the span is never confirmed
    d_nan = d.clone()
    d_nan[12] = math.nan  # unknown state: no window holding it confirms
    assert confirmed_at(d_nan, 0, 19, g) == 16


def test_expiry_hides_nothing_before_the_confirmation_and_as_the_gate_after():
    g = RunGate(window=8, max_distinct=3, min_count=2, confirm=0.15, span=4)
    ids = torch.tensor([1, 2, 3] + [9] * 40 + [4])
    ex = excess_mask(ids, g)
    assert not (expiry(ids, g, ex) < NEVER).any()  # no state read: nothing confirmed, nothing hidden
    d = torch.full(ids.shape, math.nan, dtype=torch.float64)
    d[ex[0]] = 0.5
    assert not (expiry(ids, g, ex, d) < NEVER).any()  # the state never first-token-like: untouched
    r0 = int(torch.nonzero(ex[0])[0])
    d[r0 + 20:] = 0.1  # first-token-like from r0 + 20 on: confirmed at r0 + 23
    e = expiry(ids, g, ex, d)[0]
    plain = expiry(ids, RunGate(window=8, max_distinct=3, min_count=2), ex)[0]
    hid = e < NEVER
    assert torch.equal(hid, plain < NEVER)  # the same tokens, the same blocks ...
    assert int(e[hid].min()) == r0 + 24  # ... hidden from no query before the one after the confirmation
    assert torch.equal(e[hid], plain[hid].clamp_min(r0 + 24))


def test_state_check_needs_the_model_to_say_what_it_hides():
    g = RunGate(confirm=0.2)
    with pytest.raises(SinkholeError, match="needs the model"):
        collapse([1] * 100, g)
    with pytest.raises(SinkholeError, match="needs the model"):
        hidden_mask([[1] * 100], g)


@pytest.mark.parametrize("family,unit", [("llama", 1), ("llama", 3), ("gpt2", 3), ("gemma3_text", 1)])
def test_prompt_at_once_equals_token_by_token_and_the_collapse(family, unit):
    from tiny import tiny_lm
    from transformers import DynamicCache

    lm = tiny_lm(family)
    g = RunGate(window=8, max_distinct=3, min_count=2, confirm=9.0, span=4)  # any state confirms: the gate acts
    ids = _run(lm, reps=30 if unit == 1 else 12, unit=unit)
    kw = "cache" if "cache" in __import__("inspect").signature(lm.model.forward).parameters else "past_key_values"
    with torch.no_grad():
        with apply_patch(lm, Patch(gate=g), validate=False):
            full = lm.model(input_ids=torch.tensor([ids])).logits[0, -1]
            cache = DynamicCache(config=lm.model.config)
            out = lm.model(input_ids=torch.tensor([ids[:10]]), use_cache=True, **{kw: cache})
            for t in ids[10:]:
                out = lm.model(input_ids=torch.tensor([[t]]), use_cache=True, **{kw: cache})
            step = out.logits[0, -1]
        kept = collapse(ids, g, read_state(lm, ids, g))
        ref = lm.model(input_ids=torch.tensor([kept])).logits[0, -1]
    assert len(kept) < len(ids) - 10
    torch.testing.assert_close(step, full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(full, ref, atol=1e-4, rtol=1e-4)


def test_distances_read_prompt_and_steps_alike(tiny):
    lm = tiny
    g = RunGate(window=8, max_distinct=3, min_count=2, confirm=0.05, span=4)
    ids = _run(lm, seed=3, reps=50)
    d = distances(lm, ids, g)[0]
    ex = excess_mask(torch.tensor(ids), g)[0]
    assert torch.equal(~torch.isnan(d), ex)  # every excess token read, nothing else
    # a one-token run converges to the token's singleton state (Theorem 4.1): the distance falls
    read = d[ex]
    assert float(read[-8:].mean()) < float(read[:8].mean())


def test_nothing_confirmed_leaves_the_model_bit_identical(tiny_family):
    lm = tiny_family
    g = RunGate(window=8, max_distinct=3, min_count=2, confirm=1e-9, span=4)  # no state is that close
    ids = _run(lm, seed=1, reps=40)
    with torch.no_grad():
        before = lm.model(input_ids=torch.tensor([ids])).logits
        with apply_patch(lm, Patch(gate=g), validate=False):
            after = lm.model(input_ids=torch.tensor([ids])).logits
    assert torch.equal(before, after)
    assert collapse(ids, g, read_state(lm, ids, g)) == ids


def test_state_check_refuses_activation_ops_beside_it(tiny):
    from sinkhole.patch.core import PatchOp

    p = Patch(ops=[PatchOp(layer=1, mode="zero", neurons=[3])], gate=RunGate(confirm=0.2))
    with pytest.raises(SinkholeError, match="gate-only"):
        with apply_patch(tiny, p, validate=False):
            pass


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_state_check_in_llamacpp_and_torchgate_gives_the_hooks_tokens(family, monkeypatch, tmp_path):
    """llama.cpp runs the state check as it runs the gate (the collapsed history fed each step); the
    state is read by the torch model of the same weights (``lm``), kept from step to step."""
    from test_engines import use_torch_llama
    from tiny import tiny_lm

    from sinkhole.decoding.engines import LlamaCpp, TorchGate
    from sinkhole.decoding.generate import generate

    lm = tiny_lm(family)
    use_torch_llama(monkeypatch, lm)
    (tmp_path / "m.gguf").write_bytes(b"")
    gate = RunGate(window=12, max_distinct=3, min_count=2, confirm=9.0, span=6)
    with pytest.raises(SinkholeError, match="lm="):
        LlamaCpp(tmp_path / "m.gguf", n_ctx=256, gate=gate)
    engines = [LlamaCpp(tmp_path / "m.gguf", n_ctx=256, gate=gate, lm=lm), TorchGate(lm, gate)]
    prompts = [[5, 6, 7] + [11] * 40, [5, 6] + [21, 22, 23] * 15 + [9], list(range(30, 70)), [5, 6] + [21, 22, 23] * 6]
    for ids in prompts:
        with apply_patch(lm, Patch(gate=gate), validate=False):
            want = generate(lm, [ids], 16)[0]
        for eng in engines:
            got = eng.greedy(ids, 16, set())
            assert got == want, str((type(eng).__name__, got, want))


def test_state_check_follows_a_new_batch_after_a_single_sequence(tiny):
    """The hooks keep their reading per sequence: a batch after a one-sequence call starts over (found by
    `sinkhole patch --families state_gate`, whose search decodes one case, then a batch)."""
    from sinkhole.decoding.generate import generate

    g = RunGate(window=8, max_distinct=3, min_count=2, confirm=9.0, span=4)
    long, short = _run(tiny, seed=4, reps=40), _run(tiny, seed=5, reps=20)
    with apply_patch(tiny, Patch(gate=g), validate=False):
        alone = generate(tiny, [long], 8)[0]
        both = generate(tiny, [long, short], 8)
        again = generate(tiny, [short], 8)[0]
    assert both[0] == alone and both[1] == again


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("unit", [1, 3])
def test_state_reader_token_by_token_equals_distances_of_the_whole_history(family, unit):
    """The engines' incremental reading (a layer-0 pass of the collapse with its own KV cache) gives the
    distances a probe of the whole history gives, before, at and after a confirmation mid-run."""
    from tiny import tiny_lm


    lm = tiny_lm(family)
    ids = _run(lm, seed=7, reps=40 // unit, unit=unit)
    never = RunGate(window=8, max_distinct=3, min_count=2, confirm=1e-9, span=4)
    d = distances(lm, ids, never)[0]
    read = d[~torch.isnan(d)]
    assert len(read) > 20
    # a distance the run reaches about half-way: the stretch is confirmed mid-run
    gate = RunGate(window=8, max_distinct=3, min_count=2, confirm=float(read.median()), span=4)
    reader = StateReader(lm, gate)
    start, confirmed = 12, False
    reader.read(ids[:start])
    for n in range(start + 1, len(ids) + 1):
        got = reader.read(ids[:n])[0]
        want = distances(lm, ids[:n], gate)[0]
        assert torch.equal(torch.isnan(got), torch.isnan(want)), n
        ok = ~torch.isnan(want)
        assert torch.allclose(got[ok], want[ok], atol=1e-5, rtol=1e-4), n
        confirmed |= bool((expiry(torch.tensor([ids[:n]]), gate, dist=want[None]) < NEVER).any())
    ex = excess_mask(torch.tensor([ids]), gate)[0]
    # confirmed mid-run: the stretch's first excess tokens were read, its later ones are not
    assert confirmed and bool((ex & ~torch.isnan(want)).any()) and bool((ex & torch.isnan(want)).any())
