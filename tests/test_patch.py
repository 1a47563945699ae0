"""Patch data, application (full forward, KV cache, left padding), round trips, export/reload."""

from __future__ import annotations

import json

import pytest
import torch

from sinkhole.capture import run
from sinkhole.errors import SinkholeError
from sinkhole.patch import Patch, PatchOp, apply_patch, attach_patch, export_patched, load_patched, model_signature

NEURONS = [3, 17, 40]


def _neurons(lm, ids, patch=None, layer=1, mask=None):
    with apply_patch(lm, patch):
        return run(lm, ids, reads=[("neurons", layer)], attention_mask=mask)


def test_first_position_untouched_others_changed_exactly(tiny):
    ids = torch.tensor([[1, 5, 9, 9, 9, 9, 9]])
    base = _neurons(tiny, ids)["neurons.1"]
    p = Patch([PatchOp(1, "set", NEURONS, values=[0.5, -1.0, 2.0])], model=model_signature(tiny))
    after = _neurons(tiny, ids, p)
    a = after["neurons.1"]
    assert torch.equal(a[:, 0], base[:, 0])  # first position keeps every value
    assert torch.allclose(a[0, 1:, NEURONS], torch.tensor([0.5, -1.0, 2.0]).expand(6, 3))
    others = [j for j in range(a.shape[-1]) if j not in NEURONS]
    assert torch.equal(a[0, 1:, others], base[0, 1:, others])  # other neurons of this layer untouched
    assert torch.allclose(after["logits"][0, 0], run(tiny, ids)["logits"][0, 0])  # position 0 output unchanged


@pytest.mark.parametrize("mode,kw", [("zero", {}), ("clamp", {"lo": -0.01, "hi": 0.01}), ("cap", {"values": 0.02}),
                                     ("scale", {"values": 0.5})])
def test_modes(tiny, mode, kw):
    ids = torch.tensor([[1, 5, 9, 12, 9]])
    base = _neurons(tiny, ids)["neurons.1"][0, 1:, NEURONS]
    p = Patch([PatchOp(1, mode, NEURONS, **kw)])
    a = _neurons(tiny, ids, p)["neurons.1"][0, 1:, NEURONS]
    expect = {"zero": torch.zeros_like(base), "clamp": base.clamp(-0.01, 0.01), "cap": base.clamp(-0.02, 0.02),
              "scale": base * 0.5}[mode]
    assert torch.allclose(a, expect, atol=1e-6)


def test_norm_cap_on_mlp_out(tiny):
    ids = torch.tensor([[1, 5, 9, 12, 9]])
    with apply_patch(tiny, None):
        base = run(tiny, ids, reads=[("mlp_out", 0)])["mlp_out.0"][0]
    cap = float(base[1:].norm(dim=-1).min()) * 0.5
    p = Patch([PatchOp(0, "norm_cap", site="mlp_out", values=cap)])
    with apply_patch(tiny, p):
        a = run(tiny, ids, reads=[("mlp_out", 0)])["mlp_out.0"][0]
    assert torch.equal(a[0], base[0])
    assert torch.allclose(a[1:].norm(dim=-1), torch.full((4,), cap), rtol=1e-5)


def test_patch_changes_logits_only_when_applied_and_cleans_up(tiny):
    ids = torch.tensor([[1, 5, 9, 9, 9]])
    before = run(tiny, ids)["logits"]
    p = Patch([PatchOp(1, "zero", None)])
    with apply_patch(tiny, p):
        patched = run(tiny, ids)["logits"]
    after = run(tiny, ids)["logits"]
    assert torch.equal(before, after)
    assert torch.equal(patched[:, 0], before[:, 0])  # causal: position 0 sees only itself, untouched
    assert not torch.allclose(patched[:, 1:], before[:, 1:])


def test_cached_decoding_equals_full_forward(tiny_family):
    lm = tiny_family
    p = Patch([PatchOp(1, "scale", [1, 2, 3, 4, 5], values=3.0), PatchOp(0, "zero", [6, 7])])
    ids = torch.tensor([[1, 5, 9, 9, 9, 9]])
    with torch.no_grad(), apply_patch(lm, p):
        gen = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                pad_token_id=0, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
        full = lm.model(gen.sequences, use_cache=False).logits
    cached = torch.stack(gen.scores, 1)  # logits of each generated step
    n0 = ids.shape[1]
    assert torch.allclose(cached[0], full[0, n0 - 1:-1], atol=1e-4)


def test_left_padding_matches_unpadded(tiny):
    p = Patch([PatchOp(1, "set", NEURONS, values=1.5), PatchOp(2, "zero", [0, 1])])
    a = [1, 5, 9, 9]
    b = [1, 7, 7, 7, 7, 7, 7]
    ids = torch.tensor([[0, 0, 0] + a, b])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1] * 7])
    with apply_patch(tiny, p):
        batched = run(tiny, ids, attention_mask=mask)["logits"]
        la = run(tiny, torch.tensor([a]))["logits"]
        lb = run(tiny, torch.tensor([b]))["logits"]
    assert torch.allclose(batched[0, 3:], la[0], atol=1e-4)
    assert torch.allclose(batched[1], lb[0], atol=1e-4)


def test_json_round_trip_and_weights(tiny, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    w = dict(tiny.model.named_parameters())[name].detach().clone() * 0.9
    p = Patch([PatchOp(1, "clamp", NEURONS, lo=[-1, -2, -3], hi=[1, 2, 3], positions=[1, 2, 5])],
              name="t", model=model_signature(tiny), weights={name: w}, meta={"x": 1})
    path = p.save(tmp_path / "p.json")
    assert (tmp_path / "p.safetensors").exists()
    d = json.loads(path.read_text())
    assert d["format"] == "sinkhole-patch" and d["kind"] == "weights+activation"
    q = Patch.load(path)
    assert q.ops[0].to_dict() == p.ops[0].to_dict()
    assert torch.equal(q.weights[name], w) and q.meta == {"x": 1}
    q.validate(tiny)
    ids = torch.tensor([[1, 5, 9, 9, 9, 9]])
    with apply_patch(tiny, p):
        lp = run(tiny, ids)["logits"]
    with apply_patch(tiny, q):
        lq = run(tiny, ids)["logits"]
    assert torch.equal(lp, lq)
    # weights restored after the with block
    assert not torch.equal(dict(tiny.model.named_parameters())[name], w)


def test_validation_errors(tiny, tmp_path):
    with pytest.raises(SinkholeError, match="out of range"):
        Patch([PatchOp(7, "zero", [1])]).validate(tiny)
    with pytest.raises(SinkholeError, match="outside"):
        Patch([PatchOp(1, "zero", [10_000])]).validate(tiny)
    with pytest.raises(SinkholeError, match="d_mlp"):
        Patch([], model={"d_mlp": 999}).validate(tiny)
    with pytest.raises(SinkholeError, match="needs 'values'"):
        Patch([PatchOp(1, "cap", [1])]).validate(tiny)
    with pytest.raises(SinkholeError, match="mode"):
        Patch([PatchOp(1, "explode", [1])]).validate(tiny)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SinkholeError, match="not valid JSON"):
        Patch.load(bad)
    bad.write_text('{"a": 1}')
    with pytest.raises(SinkholeError, match="not a sinkhole patch"):
        Patch.load(bad)
    with pytest.raises(SinkholeError, match="not found"):
        Patch.load(tmp_path / "missing.json")


@pytest.mark.parametrize("with_ops", [False, True])
def test_export_and_load_patched(tiny, tmp_path, with_ops):
    from transformers import AutoModelForCausalLM

    names = [n for n, _ in tiny.adapter.mlp_parameters([1])]
    params = dict(tiny.model.named_parameters())
    torch.manual_seed(3)
    weights = {n: params[n].detach() + 0.05 * torch.randn_like(params[n]) for n in names}
    ops = [PatchOp(2, "zero", [1, 2, 3])] if with_ops else []
    p = Patch(ops, model=model_signature(tiny), weights=weights)
    ids = torch.tensor([[1, 5, 9, 9, 9, 9], [1, 4, 4, 8, 8, 3]])
    with apply_patch(tiny, p):
        mem = run(tiny, ids)["logits"]
    out = export_patched(tiny, p, tmp_path / "fixed", summary={"ok": True})
    assert (out / "model.safetensors").exists() and (out / "patch.json").exists()
    assert json.loads((out / "summary.json").read_text()) == {"ok": True}
    re = load_patched(out, tokenizer=tiny.tokenizer)
    got = run(re, ids)["logits"]
    assert (got - mem).abs().max() <= 1e-5
    plain = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager")
    with torch.no_grad():
        lp = plain(ids).logits
    if with_ops:  # plain transformers has the weights but not the position-gated ops
        assert (lp - mem).abs().max() > 1e-4
    else:
        assert (lp - mem).abs().max() <= 1e-5
    # the in-memory model is unchanged
    assert all(torch.equal(params[n], tiny.model.get_parameter(n)) for n in names)


def test_attach_patch_stays(tiny):
    ids = torch.tensor([[1, 5, 9, 9]])
    base = run(tiny, ids)["logits"]
    h = attach_patch(tiny, Patch([PatchOp(1, "zero", None)]))
    assert not torch.allclose(run(tiny, ids)["logits"], base)
    h.remove()
    assert torch.equal(run(tiny, ids)["logits"], base)


def test_load_patched_rejects_plain_folder(tmp_path):
    with pytest.raises(SinkholeError, match="patch.json"):
        load_patched(tmp_path)
