"""The hook engine: reads, edits of every op on every site, real positions under left padding
and KV-cache decoding, early stop, clean-up after exceptions, exactness and NaN detection."""

from __future__ import annotations

import pytest
import torch

from sinkhole import Edit, Hooks, run
from sinkhole.capture import SITES, position_mask, real_positions
from sinkhole.errors import NumericalError, SinkholeError
from tiny import tiny_lm

IDS = torch.tensor([[1, 17, 40, 40, 40, 9, 77, 5]])
EDIT_SITES = [s for s in SITES if s != "attn_pattern"]


def _attached_hooks(model: torch.nn.Module) -> int:
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks)
        n += len(getattr(m, "_forward_hooks_with_kwargs", {}))
    return n


def _plain_logits(lm, ids, **kw):
    with torch.no_grad():
        return lm.model(input_ids=ids, use_cache=False, **kw).logits


# --- exactness -----------------------------------------------------------------------------
def test_reads_leave_outputs_bit_identical(tiny_family):
    """The unpatched path (reads only, every site of every layer, with and without reduce) gives
    bit-identical logits to the model without hooks."""
    lm = tiny_family
    before = _attached_hooks(lm.model)
    ref = _plain_logits(lm, IDS)
    with Hooks(lm) as h:
        for i in range(lm.adapter.n_layers):
            for site in SITES:
                if site != "attn_pattern" or i in lm.adapter.attention_layers:
                    h.read(site, i)
            h.read("resid_post", i, reduce=lambda x, pos: x.norm(dim=-1), name=f"norm.{i}")
        with torch.no_grad():
            out = h.forward(IDS, use_cache=False)
    assert torch.equal(out.logits, ref)
    assert _attached_hooks(lm.model) == before
    # and the model is unchanged afterwards
    assert torch.equal(_plain_logits(lm, IDS), ref)


def test_noop_edits_leave_outputs_bit_identical(tiny_family):
    """Edits that select nothing (a position past the end) or scale by 1 change nothing."""
    lm = tiny_family
    ref = _plain_logits(lm, IDS)
    edits = [Edit("neurons", 0, neurons=[3, 4], positions=[100], op="zero"),
             Edit("resid_post", 1, positions="all", op="scale", value=1.0),
             Edit("mlp_out", 2, positions=slice(50, 60), op="set", value=7.0)]
    out = run(lm, IDS, edits=edits)
    assert torch.equal(out["logits"], ref)


# --- edits ---------------------------------------------------------------------------------
OPS = [
    (dict(op="zero"), lambda x: torch.zeros_like(x)),
    (dict(op="set", value=0.75), lambda x: torch.full_like(x, 0.75)),
    (dict(op="add", value=-1.5), lambda x: x - 1.5),
    (dict(op="scale", value=3.0), lambda x: x * 3.0),
    (dict(op="clamp", lo=-0.1, hi=0.2), lambda x: x.clamp(-0.1, 0.2)),
    (dict(op="clamp", hi=0.0), lambda x: x.clamp(max=0.0)),
    (dict(op="cap", value=0.05), lambda x: x.clamp(-0.05, 0.05)),
    (dict(op="fn", fn=lambda x: x.abs() + 1), lambda x: x.abs() + 1),
]


@pytest.mark.parametrize("site", EDIT_SITES)
@pytest.mark.parametrize("kw,expect", OPS, ids=[f"{k['op']}{i}" for i, (k, _) in enumerate(OPS)])
def test_edit_ops_on_every_site(site, kw, expect):
    """A read of the edited site sees op(x) on the selected neurons and positions, x elsewhere."""
    lm = tiny_lm("llama")
    layer, neurons, positions = 1, [2, 5, 11], [0, 3, 4]
    base = run(lm, IDS, reads=[(site, layer)], stop_after=layer)[f"{site}.{layer}"]
    e = Edit(site, layer, neurons=neurons, positions=positions, **kw)
    got = run(lm, IDS, reads=[(site, layer)], edits=[e], stop_after=layer)[f"{site}.{layer}"]
    want = base.clone()
    sel = want[:, positions][:, :, neurons]
    want[:, torch.tensor(positions)[:, None], torch.tensor(neurons)] = expect(sel)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_per_neuron_values_and_all_neurons():
    lm = tiny_lm("llama")
    base = run(lm, IDS, reads=[("neurons", 0)], stop_after=0)["neurons.0"]
    e = Edit("neurons", 0, neurons=[1, 2, 3], op="set", value=[10.0, 20.0, 30.0])
    got = run(lm, IDS, reads=[("neurons", 0)], edits=[e], stop_after=0)["neurons.0"]
    assert torch.equal(got[..., 1:4], torch.tensor([10.0, 20.0, 30.0]).expand(1, 8, 3))
    assert torch.equal(got[..., 4:], base[..., 4:]) and torch.equal(got[..., :1], base[..., :1])
    e = Edit("resid_post", 0, op="scale", value=0.0, positions="nonfirst")
    got = run(lm, IDS, reads=[("resid_post", 0)], edits=[e], stop_after=0)["resid_post.0"]
    assert got[0, 1:].abs().max() == 0 and got[0, 0].abs().max() > 0


def test_edit_changes_downstream_and_first_position_stays_bit_identical(tiny_family):
    """An edit at non-first positions leaves every layer's first position bit-identical (causal
    model) and changes later positions' logits."""
    lm = tiny_family
    ref = run(lm, IDS, reads=[("resid_post", i) for i in range(3)])
    e = Edit("neurons", 0, neurons=list(range(0, 40)), positions="nonfirst", op="scale", value=4.0)
    got = run(lm, IDS, reads=[("resid_post", i) for i in range(3)], edits=[e])
    for i in range(3):
        assert torch.equal(got[f"resid_post.{i}"][:, 0], ref[f"resid_post.{i}"][:, 0])
    assert torch.equal(got["logits"][:, 0], ref["logits"][:, 0])
    assert (got["logits"][:, 1:] - ref["logits"][:, 1:]).abs().max() > 1e-4


@pytest.mark.parametrize("spec,want", [
    ("all", [1, 1, 1, 1, 1, 1]), ("first", [1, 0, 0, 0, 0, 0]), ("nonfirst", [0, 1, 1, 1, 1, 1]),
    (2, [0, 0, 1, 0, 0, 0]), ([0, 4], [1, 0, 0, 0, 1, 0]), (slice(1, 3), [0, 1, 1, 0, 0, 0]),
    (slice(None, None, 2), [1, 0, 1, 0, 1, 0]), (slice(3, None), [0, 0, 0, 1, 1, 1]),
])
def test_position_specs(spec, want):
    pos = torch.arange(6).unsqueeze(0)
    assert position_mask(spec, pos, pos.shape, pos.device).long().tolist() == [want]


def test_padding_positions_are_never_selected():
    pos = torch.tensor([[-1, -1, 0, 1, 2]])
    for spec in ("all", "first", "nonfirst", [-1, 0], -1, slice(None), slice(-5, 2)):
        m = position_mask(spec, pos, pos.shape, pos.device)
        assert not m[0, :2].any(), spec


def test_bad_declarations_fail_clearly(tiny):
    h = Hooks(tiny)
    with pytest.raises(ValueError, match="unknown site"):
        h.read("mlp_hidden", 0)
    with pytest.raises(ValueError, match=r"layers 0\.\.2"):
        h.read("resid_post", 3)
    with pytest.raises(ValueError, match="read but not edited"):
        h.edit(Edit("attn_pattern", 0))
    with pytest.raises(ValueError, match="unknown edit op"):
        run(tiny, IDS, edits=[Edit("resid_post", 0, op="explode")], stop_after=0)
    with pytest.raises(ValueError, match="unknown positions"):
        run(tiny, IDS, edits=[Edit("resid_post", 0, positions="last")], stop_after=0)
    assert _attached_hooks(tiny.model) == 0


# --- real positions --------------------------------------------------------------------------
def _padded_batch():
    a = [1, 17, 40, 40, 40, 9, 77, 5]
    b = [1, 23, 23, 23, 60]
    ids = torch.tensor([a, [0] * 3 + b])
    mask = torch.tensor([[1] * 8, [0] * 3 + [1] * 5])
    return ids, mask, a, b


def test_left_padding_position_zero_is_first_real_token():
    lm = tiny_lm("llama")
    ids, mask, a, b = _padded_batch()
    with Hooks(lm) as h:
        h.edit(Edit("neurons", 0, op="zero", positions="first"))
        h.read("neurons", 0)
        h.stop_after(0)
        with torch.no_grad():
            h.forward(ids, attention_mask=mask, use_cache=False)
    assert h.pos.tolist() == [list(range(8)), [-1, -1, -1, 0, 1, 2, 3, 4]]
    act = h.cache["neurons.0"]
    assert act[0, 0].abs().max() == 0 and act[1, 3].abs().max() == 0  # first real tokens
    assert (act[1, :3].abs().amax(-1) > 0).all()  # padding untouched
    assert (act[:, 4:].abs().amax(-1) > 0).all()


def test_left_padded_rows_match_unpadded_runs():
    """With an edit at 'first', each padded row's real tokens equal the row run alone (RoPE model)."""
    lm = tiny_lm("llama")
    ids, mask, a, b = _padded_batch()
    e = Edit("resid_post", 0, positions="first", op="scale", value=5.0)
    both = run(lm, ids, edits=[e], attention_mask=mask)["logits"]
    solo = run(lm, torch.tensor([b]), edits=[e])["logits"]
    torch.testing.assert_close(both[1, 3:], solo[0], rtol=1e-4, atol=1e-5)
    solo_a = run(lm, torch.tensor([a]), edits=[e])["logits"]
    torch.testing.assert_close(both[0], solo_a[0], rtol=1e-4, atol=1e-5)


def test_real_positions_from_call_arguments():
    ids = torch.zeros(2, 3, dtype=torch.long)
    assert real_positions((ids,), {}).tolist() == [[0, 1, 2]] * 2
    assert real_positions((), {"input_ids": ids, "cache_position": torch.tensor([7, 8, 9])}).tolist() == [[7, 8, 9]] * 2
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert real_positions((), {"input_ids": ids, "attention_mask": mask}).tolist() == [[1, 2, 3], [2, 3, 4]]


# --- KV-cache generation ---------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "gemma3_text"])
def test_cached_decoding_with_edits_equals_full_forward(family):
    """Greedy decoding with the KV cache and hooks attached gives the same logits as one full
    forward pass over the final sequence with the same edits: a decoding step's token is never
    position 0, and the edits apply to it exactly as in the full pass."""
    lm = tiny_lm(family)
    prompt = torch.tensor([[1, 17, 40, 40, 40]])
    edits = [Edit("neurons", 0, neurons=list(range(16)), positions="nonfirst", op="scale", value=3.0),
             Edit("resid_post", 1, positions="first", op="scale", value=0.5),
             Edit("mlp_out", 2, positions=slice(4, None), op="add", value=0.25)]
    seen = []
    with Hooks(lm) as h:
        for e in edits:
            h.edit(e)
        h.read("resid_post", 0, reduce=lambda x, pos: pos.clone(), name="pos", accumulate=True)
        with torch.no_grad():
            gen = lm.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                    do_sample=False, output_logits=True, return_dict_in_generate=True,
                                    pad_token_id=0)
        seen = h.cache["pos"]
    seq = gen.sequences
    assert seq.shape[1] == prompt.shape[1] + 6
    # positions seen by the hooks: the prompt 0..4, then each decoding step's true position
    assert seen[0].tolist() == [[0, 1, 2, 3, 4]]
    assert [s.tolist() for s in seen[1:]] == [[[5 + k]] for k in range(5)]
    full = run(lm, seq, edits=edits)["logits"]
    step_logits = torch.cat([x.unsqueeze(1) for x in gen.logits], dim=1)  # (1, 6, V)
    torch.testing.assert_close(step_logits, full[:, prompt.shape[1] - 1:-1], rtol=1e-4, atol=1e-4)
    # the edits matter: without them the logits differ
    plain = run(lm, seq)["logits"]
    assert (plain[:, prompt.shape[1] - 1:-1] - step_logits).abs().max() > 1e-3


def test_left_padded_batched_generation_positions():
    lm = tiny_lm("llama")
    ids, mask, a, b = _padded_batch()
    with Hooks(lm) as h:
        h.read("resid_post", 0, reduce=lambda x, pos: pos.clone(), name="pos", accumulate=True)
        h.edit(Edit("resid_post", 0, positions="first", op="scale", value=2.0))
        with torch.no_grad():
            gen = lm.model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                    output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    seen = h.cache["pos"]
    assert seen[0].tolist() == [list(range(8)), [-1, -1, -1, 0, 1, 2, 3, 4]]
    assert [s.tolist() for s in seen[1:]] == [[[8], [5]], [[9], [6]]]
    # the padded row decodes like the same row alone
    solo = lm.model.generate(torch.tensor([b]), attention_mask=torch.ones(1, len(b), dtype=torch.long),
                             max_new_tokens=3, do_sample=False, pad_token_id=0)
    with Hooks(lm) as h2:
        h2.edit(Edit("resid_post", 0, positions="first", op="scale", value=2.0))
        with torch.no_grad():
            solo = lm.model.generate(torch.tensor([b]), attention_mask=torch.ones(1, len(b), dtype=torch.long),
                                     max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.sequences[1, 8:].tolist() == solo[0, len(b):].tolist()


# --- early stop ------------------------------------------------------------------------------
def test_stop_after_stops_the_pass(tiny):
    calls = []
    hd = tiny.adapter.layer(2).register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with Hooks(tiny) as h:
            h.read("resid_post", 0)
            h.read("resid_post", 2)
            h.stop_after(0)
            with torch.no_grad():
                out = h.forward(IDS, use_cache=False)
    finally:
        hd.remove()
    assert out is None and not calls
    assert "resid_post.0" in h.cache and "resid_post.2" not in h.cache
    res = run(tiny, IDS, reads=[("resid_post", 1)], stop_after=1)
    assert "logits" not in res and res["resid_post.1"].shape == (1, 8, 64)
    assert _attached_hooks(tiny.model) == 0


# --- clean-up --------------------------------------------------------------------------------
def test_nothing_stays_attached_after_an_exception(tiny):
    before = _attached_hooks(tiny.model)
    with pytest.raises(RuntimeError, match="boom"):
        with Hooks(tiny) as h:
            h.read("resid_post", 1)
            h.edit(Edit("neurons", 0, op="zero"))
            assert _attached_hooks(tiny.model) > before
            raise RuntimeError("boom")
    assert _attached_hooks(tiny.model) == before

    def bad(x):
        raise RuntimeError("boom inside the forward pass")

    with pytest.raises(RuntimeError, match="inside the forward"):
        run(tiny, IDS, edits=[Edit("neurons", 1, op="fn", fn=bad)])
    assert _attached_hooks(tiny.model) == before
    with pytest.raises(NumericalError):
        run(tiny, IDS, reads=[("mlp_out", 0)], edits=[Edit("neurons", 0, op="set", value=float("nan"))])
    assert _attached_hooks(tiny.model) == before
    # the model still works and matches its plain output
    assert torch.equal(run(tiny, IDS)["logits"], _plain_logits(tiny, IDS))


def test_exception_while_attaching_removes_what_was_attached(tiny, monkeypatch):
    before = _attached_hooks(tiny.model)
    h = Hooks(tiny)
    h.read("resid_post", 0)
    h.read("mlp_out", 1)
    orig = h.adapter.module_for

    def flaky(site, i):
        if site == "mlp_out":
            raise RuntimeError("cannot attach")
        return orig(site, i)

    monkeypatch.setattr(h.adapter, "module_for", flaky)
    with pytest.raises(RuntimeError, match="cannot attach"):
        with h:
            pass
    assert _attached_hooks(tiny.model) == before


def test_hooks_can_be_declared_inside_the_block(tiny):
    with Hooks(tiny) as h:
        h.read("resid_post", 1)
        h.edit(Edit("neurons", 0, op="zero", positions="nonfirst"))
        h.stop_after(1)
        with torch.no_grad():
            h.forward(IDS, use_cache=False)
    ref = run(tiny, IDS, reads=[("resid_post", 1)], edits=[Edit("neurons", 0, op="zero", positions="nonfirst")],
              stop_after=1)
    assert torch.equal(h.cache["resid_post.1"], ref["resid_post.1"])


# --- NaN / inf -------------------------------------------------------------------------------
def test_non_finite_reads_raise_numerical_error(tiny):
    with pytest.raises(NumericalError) as ei:
        run(tiny, IDS, reads=[("resid_post", 1)], edits=[Edit("resid_post", 0, op="add", value=float("inf"))],
            stop_after=1)
    msg = str(ei.value)
    assert isinstance(ei.value, SinkholeError) and ei.value.exit_code != 0
    assert "\n" not in msg and "resid_post" in msg and "float32" in msg
    # opting out returns the values as they are
    res = run(tiny, IDS, reads=[("resid_post", 1)], edits=[Edit("resid_post", 0, op="add", value=float("inf"))],
              stop_after=1, check_finite=False)
    assert not torch.isfinite(res["resid_post.1"]).all()


def test_float16_overflow_is_detected(tiny):
    """A float16 model whose residual stream overflows (as a real massive activation can) is
    reported, not propagated into results."""
    tiny.model.half()
    ok = run(tiny, IDS, reads=[("resid_post", 2)], stop_after=2)
    assert torch.isfinite(ok["resid_post.2"]).all()
    with torch.no_grad():  # a massive activation: layer 1's MLP writes ~1e5, beyond float16's 65504
        tiny.adapter.down_proj(1).weight.mul_(3.0e5)
        tiny.adapter.mlp(1).up_proj.weight.mul_(100.0)
    with pytest.raises(NumericalError, match="mlp_out at layer 1"):
        run(tiny, IDS, reads=[("mlp_out", 1), ("resid_post", 2)], stop_after=2)
    res = run(tiny, IDS, reads=[("mlp_out", 1)], stop_after=2, check_finite=False)
    assert not torch.isfinite(res["mlp_out.1"]).all()


# --- calling the base model directly, nesting --------------------------------------------------
def test_direct_base_model_call_gets_its_own_positions(tiny_family):
    """An analysis may call the module holding the blocks (model.model, transformer ...) without
    the LM head; positions then come from that call, not from an earlier one."""
    lm = tiny_family
    base = lm.adapter.base_model
    assert base is not None and base is not lm.model
    ids, mask, a, b = _padded_batch()
    e = Edit("resid_post", 0, positions="first", op="zero")
    with Hooks(lm) as h:
        h.edit(e)
        h.read("resid_post", 0)
        with torch.no_grad():
            lm.model(input_ids=ids, attention_mask=mask, use_cache=False)  # left padded: pos has -1s
            base(input_ids=torch.tensor([b]), use_cache=False)
    assert h.pos.tolist() == [[0, 1, 2, 3, 4]]
    r = h.cache["resid_post.0"]
    assert r[0, 0].abs().max() == 0 and (r[0, 1:].abs().amax(-1) > 0).all()


def test_nested_hooks_compose():
    """A patch-like outer block of edits and an inner block of reads: the reads see the edits, and
    leaving the inner block keeps the outer edits attached."""
    lm = tiny_lm("llama")
    e = Edit("neurons", 0, neurons=[1, 2], op="set", value=9.0, positions="nonfirst")
    with Hooks(lm) as outer:
        outer.edit(e)
        with Hooks(lm) as inner:
            inner.read("neurons", 0)
            inner.stop_after(0)
            with torch.no_grad():
                inner.forward(IDS, use_cache=False)
        got = inner.cache["neurons.0"]
        assert (got[0, 1:, 1:3] == 9.0).all() and (got[0, 0, 1:3] != 9.0).all()
        with torch.no_grad():
            patched = lm.model(IDS, use_cache=False).logits
    assert torch.equal(patched, run(lm, IDS, edits=[e])["logits"])
    assert _attached_hooks(lm.model) == 0


def test_edit_with_positions_of_another_call_fails_clearly():
    lm = tiny_lm("llama")
    h = Hooks(lm)
    h.edit(Edit("resid_post", 0, op="zero", positions="first"))
    with h:
        h.pos = torch.zeros(1, 3, dtype=torch.long)  # stale positions, as from a call outside the hooks
        with pytest.raises(RuntimeError, match="do not match"):
            Edit("resid_post", 0, op="zero", positions="first").apply(torch.zeros(1, 8, 64), h.pos)


def test_an_edit_declared_inside_the_block_after_a_read_still_comes_first(tiny):
    """Reads see edited values whatever order they were declared in, inside the block or before."""
    for inside in (False, True):
        h = Hooks(tiny)
        if not inside:
            h.read("attn_out", 1)
            h.edit(Edit("attn_out", 1, op="zero"))
        with torch.no_grad(), h:
            if inside:
                h.read("attn_out", 1)
                h.edit(Edit("attn_out", 1, op="zero"))
            h.forward(IDS, use_cache=False)
        assert h.cache["attn_out.1"].abs().max() == 0, inside
