"""Exactness on tiny random models of every supported family:

* a patch (activation edits at non-first positions) leaves the first position's computation
  bit-identical, applies identically under KV-cache decoding, and leaves nothing behind;
* analyses leave the model bit-identical afterwards (no hook left attached, no weight changed,
  attention kernel restored). The reads-only path being bit-identical to a model without hooks
  is tested in test_capture.py::test_reads_leave_outputs_bit_identical.
"""

from __future__ import annotations

import torch

from sinkhole import run
from sinkhole.patch import Patch, PatchOp, apply_patch
from tiny import tiny_lm

IDS = torch.tensor([[1, 17, 40, 40, 40, 40, 40, 40, 9, 77, 5]])


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _snapshot(lm) -> dict:
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _same_state(lm, snap) -> bool:
    now = lm.model.state_dict()
    return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


def _patch(lm) -> Patch:
    a = lm.adapter
    return Patch(ops=[
        PatchOp(layer=0, mode="clamp", neurons=[0, 5, 9], hi=[0.0, 0.01, -0.02]),
        PatchOp(layer=1, mode="zero", neurons=list(range(8))),
        PatchOp(layer=a.n_layers - 1, mode="norm_cap", site="mlp_out", values=0.05),
    ], name="exactness")


def test_patch_keeps_first_position_bit_identical(tiny_family):
    lm = tiny_family
    n = lm.adapter.n_layers
    reads = [("resid_post", i) for i in range(n)] + [("neurons", i) for i in range(n)]
    ref = run(lm, IDS, reads=reads)
    snap = _snapshot(lm)
    with apply_patch(lm, _patch(lm)):
        got = run(lm, IDS, reads=reads)
    for k in ref:
        assert torch.equal(got[k][:, 0], ref[k][:, 0]), k
    assert (got["logits"][:, 1:] - ref["logits"][:, 1:]).abs().max() > 0  # the patch does act
    # nothing is left behind
    assert _hooks(lm.model) == 0 and _same_state(lm, snap)
    assert torch.equal(run(lm, IDS)["logits"], ref["logits"])


def test_patch_under_kv_cache_equals_full_forward(tiny_family):
    lm = tiny_family
    prompt = IDS[:, :6]
    with apply_patch(lm, _patch(lm)), torch.no_grad():
        gen = lm.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                                output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        full = lm.model(gen.sequences, use_cache=False).logits
    steps = torch.stack(list(gen.logits), dim=1)
    torch.testing.assert_close(steps, full[:, prompt.shape[1] - 1:-1], rtol=1e-4, atol=1e-4)
    assert _hooks(lm.model) == 0


def test_weight_patch_is_restored(tiny_family):
    lm = tiny_family
    a = lm.adapter
    name, p = a.mlp_parameters([1])[0]
    ref = run(lm, IDS)["logits"]
    snap = _snapshot(lm)
    patch = Patch(ops=[], name="weights", weights={name: torch.zeros_like(p)})
    try:
        with apply_patch(lm, patch):
            changed = run(lm, IDS)["logits"]
            raise KeyboardInterrupt  # interrupted while patched
    except KeyboardInterrupt:
        pass
    assert not torch.equal(changed, ref)
    assert _same_state(lm, snap) and torch.equal(run(lm, IDS)["logits"], ref)


def test_foundation_analyses_leave_the_model_unchanged(tiny_family):
    from sinkhole.circuit.norms import layer_norms, norm_curve

    lm = tiny_family
    ref = run(lm, IDS)["logits"]
    snap = _snapshot(lm)
    impl = lm.model.config._attn_implementation
    layer_norms(lm, texts=["the poem is a poem and so it goes on"], quiet=True)
    norm_curve(lm, "the", 20, 1)
    assert _hooks(lm.model) == 0 and _same_state(lm, snap)
    assert lm.model.config._attn_implementation == impl
    assert torch.equal(run(lm, IDS)["logits"], ref)


def test_every_scan_step_leaves_the_model_unchanged(tmp_path):
    """All registered scan steps (circuit, attack, patch search when asked ...) on a tiny Llama:
    afterwards the model's weights, kernel and outputs are bit-identical and no hook remains."""
    from sinkhole.pipeline.registry import run_scan

    lm = tiny_lm("llama", n_layers=4)
    ref = run(lm, IDS)["logits"]
    snap = _snapshot(lm)
    impl = lm.model.config._attn_implementation
    opts = {"seed": 0, "quick": True, "curve_reps": 40, "words": ["the"]}
    doc = run_scan(lm, opts, tmp_path, log=lambda m: None)["doc"]
    assert len(doc["results"]) >= 2
    assert _hooks(lm.model) == 0 and _same_state(lm, snap)
    assert lm.model.config._attn_implementation == impl
    assert not lm.model.training
    assert torch.equal(run(lm, IDS)["logits"], ref)
