"""The attn_first site (fused attention, weight on the real first token) against eager patterns."""

import pytest
import torch

from sinkhole import Hooks
from sinkhole.attn_first import first_column


def _pattern_and_first(lm, ids, **kw):
    n = lm.adapter.n_layers
    h = Hooks(lm)
    for i in lm.adapter.attention_layers:
        h.read("attn_pattern", i)
    h.read("resid_post", n - 1, name="out")
    with torch.no_grad(), h:
        h.forward(ids, use_cache=False, **kw)
    g = Hooks(lm)
    for i in lm.adapter.attention_layers:
        g.read("attn_first", i)
    g.read("resid_post", n - 1, name="out")
    with torch.no_grad(), g:
        g.forward(ids, use_cache=False, **kw)
    return h, g


def test_attn_first_matches_eager_every_family(tiny_family):
    lm = tiny_family
    impl = lm.model.config._attn_implementation
    ids = torch.randint(3, 60, (2, 11), generator=torch.Generator().manual_seed(1))
    h, g = _pattern_and_first(lm, ids)
    for i in lm.adapter.attention_layers:
        full = h.cache[f"attn_pattern.{i}"]
        assert g.cache[f"attn_first.{i}"].shape == full.shape[:3]
        torch.testing.assert_close(g.cache[f"attn_first.{i}"], full[..., 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g.cache["out"], h.cache["out"], atol=1e-4, rtol=1e-4)
    assert lm.model.config._attn_implementation == impl  # restored on exit


def test_attn_first_left_padding_uses_real_first_token(tiny):
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :4] = 0
    h, g = _pattern_and_first(tiny, ids, attention_mask=mask)
    full = h.cache["attn_pattern.1"]
    got = g.cache["attn_first.1"]
    torch.testing.assert_close(got[0], full[0, :, :, 0])
    torch.testing.assert_close(got[1, :, 4:], full[1, :, 4:, 4])  # real position 0 is column 4
    # a query at real position 0 puts all its weight on itself
    torch.testing.assert_close(got[1, :, 4], torch.ones_like(got[1, :, 4]))


def test_attn_first_with_pattern_read_falls_back_to_full_weights(tiny):
    ids = torch.randint(3, 60, (1, 8))
    h = Hooks(tiny)
    h.read("attn_pattern", 0)
    h.read("attn_first", 0)
    with torch.no_grad(), h:
        h.forward(ids, use_cache=False)
    torch.testing.assert_close(h.cache["attn_first.0"], first_column(h.cache["attn_pattern.0"], None))


def test_attn_first_cannot_be_edited(tiny):
    from sinkhole import Edit

    with pytest.raises(ValueError, match="read but not edited"):
        Hooks(tiny).edit(Edit("attn_first", 0))


def test_attn_first_during_kv_cache_generation(tiny):
    ids = torch.randint(3, 60, (1, 6))
    h = Hooks(tiny)
    h.read("attn_first", 1, accumulate=True)
    with torch.no_grad(), h:
        out = tiny.model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    steps = h.cache["attn_first.1"]
    assert len(steps) == 3 and steps[0].shape[-1] == 6 and steps[1].shape[-1] == 1
    g = Hooks(tiny)
    g.read("attn_pattern", 1)
    with torch.no_grad(), g:
        g.forward(out[:, :-1], use_cache=False)
    full = g.cache["attn_pattern.1"][..., 0]
    torch.testing.assert_close(steps[1][..., 0], full[..., 6], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(steps[2][..., 0], full[..., 7], atol=1e-5, rtol=1e-4)


def test_attn_first_on_some_layers_of_a_soft_capped_model():
    """Gemma-2 soft-caps its attention logits, which SDPA cannot do: layers without an attn_first
    read must still compute soft-capped attention (they failed with 'sdpa attention does not
    support softcap', and so did the sweep and cluster steps on every Gemma-2 model)."""
    from tiny import tiny_lm

    from sinkhole.attack.sweep import SweepConfig, sweep_tokens

    lm = tiny_lm("gemma2")
    assert lm.model.config.attn_logit_softcapping  # the tiny config keeps Gemma-2's soft cap
    ids = torch.randint(3, 60, (2, 11), generator=torch.Generator().manual_seed(2))
    h, _ = _pattern_and_first(lm, ids)
    g = Hooks(lm)
    g.read("attn_first", 1)  # one layer only: layers 0 and 2 take the unflagged path
    g.read("resid_post", lm.adapter.n_layers - 1, name="out")
    with torch.no_grad(), g:
        g.forward(ids, use_cache=False)
    torch.testing.assert_close(g.cache["attn_first.1"], h.cache["attn_pattern.1"][..., 0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g.cache["out"], h.cache["out"], atol=1e-4, rtol=1e-4)
    res = sweep_tokens(lm, [5, 6, 7], SweepConfig(drift_layer=0, max_reps=12, batch_size=3), quiet=True)
    assert len(res["records"]) == 3


@pytest.mark.parametrize("family", ["mistral", "gemma3_text"])
def test_attn_first_with_a_sliding_window(family):
    """Sliding-window attention (Mistral, Gemma-3's local layers): a query more than the window past
    position 0 cannot see the first token, so its "attention on the first token" is 0, exactly as
    in the eager pattern; Gemma-3's global layer still sees it."""
    import transformers as T

    from sinkhole.models.loading import from_pretrained_model
    from tiny import TinyTokenizer, tiny_config

    cfg = tiny_config(family)
    cfg.sliding_window = 4
    if family == "gemma3_text":
        cfg.layer_types = ["sliding_attention", "sliding_attention", "full_attention"]
    torch.manual_seed(0)
    lm = from_pretrained_model(T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval(),
                               TinyTokenizer(), name=f"tiny-{family}-window")
    ids = torch.randint(3, 60, (2, 12), generator=torch.Generator().manual_seed(3))
    h, g = _pattern_and_first(lm, ids)
    for i in range(3):
        full, first = h.cache[f"attn_pattern.{i}"][..., 0], g.cache[f"attn_first.{i}"]
        torch.testing.assert_close(first, full, atol=1e-5, rtol=1e-4)
        late = first[..., 4:]  # queries 4.. are outside a 4-token window of position 0
        if family == "gemma3_text" and i == 2:
            assert late.min() > 0  # the global layer
        else:
            assert late.abs().max() == 0
