"""Divergence machinery on tiny random models (fast)."""

import pytest
import torch

from sinkhole.decoding.tokens import decode_pieces
from sinkhole.decoding.generate import generate
from sinkhole.attack.diverge import run_cases, summarize
from sinkhole.attack.prompts import build_ids, make_cases, resolve_templates
from sinkhole.capture import Edit
from sinkhole.errors import SinkholeError


def test_make_cases_templates_and_ids(tiny):
    cases = make_cases(tiny, "poem,company", "3,5", ["raw", "repeat", "garak_this"])
    assert len(cases) == 12
    unit = tiny.word_ids("poem")
    raw = [c for c in cases if c.template == "raw" and c.word == "poem" and c.reps == 5][0]
    assert raw.ids == [tiny.bos_id] + unit * 5
    rep = [c for c in cases if c.template == "repeat" and c.word == "poem" and c.reps == 3][0]
    assert rep.ids[-3:] == unit * 3 and rep.ids[0] == tiny.bos_id


def test_templates_without_chat_template(tiny):
    assert "chat_user" not in resolve_templates(tiny, "all")
    with pytest.raises(SinkholeError):
        resolve_templates(tiny, ["chat_user"])
    with pytest.raises(SinkholeError):
        resolve_templates(tiny, ["nope"])


def test_bad_input_errors(tiny):
    with pytest.raises(SinkholeError):
        make_cases(tiny, "poem", "0", ["raw"])
    with pytest.raises(SinkholeError):
        make_cases(tiny, "poem", "x", ["raw"])
    with pytest.raises(SinkholeError):
        make_cases(tiny, " , ", "3", ["raw"])
    with pytest.raises(SinkholeError):  # longer than the tiny model's 512-token context
        make_cases(tiny, "poem", "600", ["raw"])


def test_run_cases_matches_unbatched_greedy(tiny):
    cases = make_cases(tiny, "poem,a,company", "2,7", ["raw", "repeat"])
    res = run_cases(tiny, cases, max_new_tokens=6, batch_size=4, keep_ids=True)
    assert [(r.word, r.reps, r.template) for r in res] == [(c.word, c.reps, c.template) for c in cases]
    for c, r in zip(cases, res):
        ids = torch.tensor([c.ids])
        with torch.no_grad():
            ref = tiny.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                      pad_token_id=0, eos_token_id=2)[0, len(c.ids):].tolist()
        if 2 in ref:
            ref = ref[:ref.index(2) + 1]
        assert r.generated_ids == ref
        assert 0 <= r.tokens_until_divergence <= r.n_generated
        assert r.diverged == (r.tokens_until_divergence < r.n_generated) or r.stopped


def test_judge_on_tiny_generation_uses_decoded_word(tiny):
    # force the model to emit the word's token: the run judge must then say "not diverged"
    unit = tiny.word_ids("poem")
    case = make_cases(tiny, "poem", "3", ["raw"])[0]

    def force(x):
        out = torch.full_like(x, -1e4)
        out[..., unit[0]] = 1e4
        return out

    h = lambda: _LogitForce(tiny, force)  # noqa: E731
    r = run_cases(tiny, [case], max_new_tokens=5, hooks=h)[0]
    assert r.n_generated == 5 and not r.diverged and r.frac_not_word == 0.0


class _LogitForce:
    """Context manager replacing the LM head output (a test-only 'patch')."""

    def __init__(self, lm, fn):
        self.head, self.fn = lm.model.get_output_embeddings(), fn

    def __enter__(self):
        self.h = self.head.register_forward_hook(lambda m, a, o: self.fn(o))
        return self

    def __exit__(self, *e):
        self.h.remove()


def test_edits_change_generation_and_detach(tiny):
    cases = make_cases(tiny, "poem,book", "4", ["raw"])
    base = run_cases(tiny, cases, max_new_tokens=6, keep_ids=True)
    e = Edit("resid_post", 2, None, "nonfirst", "scale", value=0.0)
    patched = run_cases(tiny, cases, max_new_tokens=6, edits=[e], keep_ids=True)
    assert [r.generated_ids for r in base] != [r.generated_ids for r in patched]
    again = run_cases(tiny, cases, max_new_tokens=6, keep_ids=True)  # hooks were removed
    assert [r.generated_ids for r in base] == [r.generated_ids for r in again]


def test_summarize_and_decode_pieces(tiny):
    ids = tiny.word_ids("poem") * 3
    assert "".join(decode_pieces(tiny, ids)) == tiny.tokenizer.decode(ids)
    cases = make_cases(tiny, "poem", "2,3", ["raw", "repeat"])
    s = summarize(run_cases(tiny, cases, max_new_tokens=4), 4)
    assert s.n_cases == 4 and 0.0 <= s.rate <= 1.0 and s.method == "generate"
    assert set(s.by_template) == {"raw", "repeat"}
    assert len(s.by_template_reps) == 4
    assert type(s).from_dict(s.to_dict()) == s


def test_generate_left_padding_batch_equals_single(tiny):
    a = build_ids(tiny, "poem", 2, "raw")
    b = build_ids(tiny, "company", 9, "repeat")
    both = generate(tiny, [a, b], 5)
    assert both[0] == generate(tiny, [a], 5)[0]
    assert both[1] == generate(tiny, [b], 5)[0]


def test_greedy_check_equals_generation(tiny_family):
    from sinkhole.attack.exact import greedy_check

    lm = tiny_family  # every supported family
    cases = make_cases(lm, ["a", "b", "c d"], [3, 9], ["raw", "repeat"])
    checks = greedy_check(lm, cases, max_new_tokens=8, quiet=True)
    gens = run_cases(lm, cases, max_new_tokens=8, batch_size=1, quiet=True, keep_ids=True)
    for c, k, g in zip(cases, checks, gens):
        assert k.generated_ids == g.generated_ids[:len(k.generated_ids)]  # exactly the greedy tokens
        assert k.diverged == g.diverged
        if k.diverged:
            assert k.tokens_until_divergence == g.tokens_until_divergence
        cont = [c.unit[j % len(c.unit)] for j in range(8)]
        miss = [j for j, (a, b) in enumerate(zip(g.generated_ids, cont)) if a != b]
        if miss and miss[0] < len(k.generated_ids):
            assert k.leaves_at == miss[0]
        assert 1 <= k.passes <= 8


def test_greedy_check_one_pass_for_a_repeating_model_and_bad_templates(tiny):
    from sinkhole.attack.exact import greedy_check

    cases = make_cases(tiny, ["a"], [5], ["raw"])
    unit = cases[0].unit[0]

    def favour(mod, args, out):  # the model always predicts the word's token: greedy decoding repeats it
        out = out.clone()
        out[..., unit] += 1e4
        return out

    tiny.model.get_output_embeddings().register_forward_hook(favour)
    k = greedy_check(tiny, cases, max_new_tokens=5, quiet=True)[0]
    g = run_cases(tiny, cases, max_new_tokens=5, batch_size=1, quiet=True)[0]
    assert k.leaves_at is None and not k.diverged and not g.diverged
    assert k.passes == 1 and k.generated_ids == [unit] * 5
    with pytest.raises(SinkholeError, match="end with the run"):
        greedy_check(tiny, make_cases(tiny, ["a"], [5], ["garak_this"]), 4)


def test_run_judged_gives_one_record_with_or_without_the_exact_check(tiny_family):
    """The one divergence path: the exact check (templates that end with the run) and generation
    give the same judged cases, with a patch attached too; other templates fall back to generation."""
    from sinkhole.attack.diverge import run_judged
    from sinkhole.patch import Patch, PatchOp, apply_patch

    lm = tiny_family
    cases = make_cases(lm, ["a", "c d"], [3, 9], ["raw", "repeat"])
    patch = Patch([PatchOp(1, "scale", None, values=0.5)])
    for hooks in (None, lambda: apply_patch(lm, patch, validate=False)):
        exact = run_judged(lm, cases, max_new_tokens=8, hooks=hooks, exact=True)
        gen = run_judged(lm, cases, max_new_tokens=8, hooks=hooks, exact=False, batch_size=1)
        assert (exact.method, gen.method) == ("exact", "generate")
        assert exact.cases == gen.cases  # the same record field by field: tokens, text, both judges
        assert (exact.rate, exact.garak_rate, exact.either_rate) == (gen.rate, gen.garak_rate, gen.either_rate)
    mixed = run_judged(lm, make_cases(lm, ["a"], [3], ["repeat", "garak_this"]), max_new_tokens=4)
    assert mixed.method == "exact+generate" and [c["template"] for c in mixed.cases] == ["repeat", "garak_this"]
    with pytest.raises(SinkholeError, match="end with the run"):
        run_judged(lm, make_cases(lm, ["a"], [3], ["garak_this"]), max_new_tokens=4, exact=True)


@pytest.mark.parametrize("family", ["gemma3_text", "mistral"])
def test_the_exact_check_can_cut_a_sliding_window_cache_back(family):
    """greedy_check cuts the KV cache back after a departure from its draft. Beyond a sliding
    window transformers refuses that unless the cache records its past; sinkhole's cache does, and
    the continued pass then gives exactly the logits of a fresh pass."""
    import inspect

    import transformers as T

    from sinkhole.decoding.cache import new_cache, rollback
    from tiny import tiny_config

    torch.manual_seed(0)
    cfg = tiny_config(family)
    cfg.sliding_window = 4
    if family == "gemma3_text":
        cfg.layer_types = ["sliding_attention", "sliding_attention", "full_attention"]
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        plain = model(input_ids=ids[:, :10], use_cache=True)
        with pytest.raises(RuntimeError):  # transformers' own cache, beyond the window
            (getattr(plain, "cache", None) or plain.past_key_values).crop(-3)
        past = new_cache(model)
        out = model(input_ids=ids[:, :10], use_cache=True, **{kw: past})
        past = rollback(getattr(out, "cache", None) or out.past_key_values, 3)  # keep 7 tokens
        assert past is not None
        cont = model(input_ids=ids[:, 7:12], use_cache=True, **{kw: past}).logits
        full = model(input_ids=ids, use_cache=False).logits[:, 7:12]
    torch.testing.assert_close(cont, full, atol=1e-5, rtol=1e-4)


def test_the_exact_check_cuts_a_linear_attention_cache_back_exactly_or_not_at_all():
    """Qwen3.5's Gated DeltaNet layers carry a recurrent state that cannot forget a token. From
    transformers 5.25 the cache keeps the states a rollback needs when asked before the pass
    (keep_for_rollback); the cut cache then continues exactly like a fresh pass. Before 5.25 it
    keeps none, and rollback must decline rather than hand back a cache with a stale state."""
    import inspect

    import transformers as T
    from transformers import cache_utils

    from sinkhole.decoding.cache import keep_for_rollback, new_cache, rollback
    from tiny import tiny_config

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_config("qwen3_5_text"), attn_implementation="eager").eval()
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    mixin = getattr(cache_utils, "LinearAttentionCacheLayerMixin", None)
    keeps = mixin is not None and "recurrent_states_to_keep" in inspect.signature(mixin.activate_past_recording).parameters
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        past = new_cache(model)
        model(input_ids=ids[:, :4], use_cache=True, **{kw: past})  # a prompt, then a pass of a 6-token draft
        keep_for_rollback(past, 6)
        out = model(input_ids=ids[:, 4:10], use_cache=True, **{kw: past})
        past = rollback(getattr(out, "cache", None) or out.past_key_values, 3)  # keep 7 tokens
        if not keeps:
            assert past is None
            return
        assert past is not None
        cont = model(input_ids=ids[:, 7:12], use_cache=True, **{kw: past}).logits
        full = model(input_ids=ids, use_cache=False).logits[:, 7:12]
    torch.testing.assert_close(cont, full, atol=1e-5, rtol=1e-4)
