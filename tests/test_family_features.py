"""Each architecture family's own features, where they change what sinkhole reads and edits.

* post-norms (Gemma-2, Gemma-3, OLMo-2): ``mlp_out``/``attn_out`` are the outputs of the
  post-feedforward / post-attention norms, and neuron edits act before the norm;
* GPT-NeoX's parallel attention and MLP: the MLP reads ``resid_pre``, not ``resid_pre + attn_out``;
* QK-norm (Qwen-3 per head, OLMo-2 over the whole projection): the read ``attn_pattern`` is the
  one computed with the norms;
* models with and without a BOS token: the divergence prompts start with exactly one BOS, or none.

Every expected value is computed by hand from the module weights (a hand-written RMSNorm, the
attention scores from q/k projections), never by calling the function under test again.
"""

from __future__ import annotations

import importlib
import json
import shutil

import pytest
import torch

from helpers_reliability import make_tiny_folder
from sinkhole import Edit, Hooks
from tiny import tiny_config, tiny_lm

POST_NORM = ["gemma2", "gemma3_text", "olmo2"]
GEN = torch.Generator().manual_seed(1234)
IDS = torch.randint(3, 128, (2, 7), generator=GEN)


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module, gemma: bool) -> torch.Tensor:
    """RMSNorm by hand in float64: Gemma scales by (1 + w), Llama-style (OLMo-2, Qwen-3) by w."""
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    assert eps is not None
    x = x.double()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    w = norm.weight.detach().double()
    return y * ((1.0 + w) if gemma else w)


def _randomize_norms(lm, gen: torch.Generator) -> None:
    """Non-trivial norm weights, so a wrong norm (or none) cannot pass by accident."""
    gemma = lm.adapter.family.startswith("gemma")
    with torch.no_grad():
        for name, p in lm.model.named_parameters():
            if "norm" in name and p.dim() == 1:
                r = torch.randn(p.shape, generator=gen) * 0.5
                p.copy_(r if gemma else 1.0 + r)


def _forward(lm, ids, reads=(), edits=(), extra_hooks=()):
    """One pass with sinkhole reads/edits plus plain forward hooks ``(module, key)`` that record
    the module's first output into the returned dict."""
    got, handles = {}, []
    for mod, key in extra_hooks:
        handles.append(mod.register_forward_hook(
            lambda m, a, o, key=key: got.__setitem__(key, (o[0] if isinstance(o, tuple) else o).detach().clone())))
    h = Hooks(lm)  # declared before entering: reads see edited values whatever the order
    for site, layer in reads:
        h.read(site, layer)
    for e in edits:
        h.edit(e)
    try:
        with torch.no_grad(), h:
            h.forward(ids, use_cache=False)
    finally:
        for hd in handles:
            hd.remove()
    return h.cache, got


# --- 1. post-norms ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", POST_NORM)
def test_post_norm_sites_are_the_norm_outputs(family):
    lm = tiny_lm(family)
    _randomize_norms(lm, torch.Generator().manual_seed(7))
    gemma = family.startswith("gemma")
    L = 1
    block = lm.adapter.layer(L)
    o_proj = lm.adapter.attn(L).o_proj
    down = lm.adapter.down_proj(L)
    hooks = [(down, "down"), (o_proj, "o_proj")]
    reads = [("mlp_out", L), ("attn_out", L), ("neurons", L)]
    base, got = _forward(lm, IDS, reads, extra_hooks=hooks)

    # mlp_out = post_feedforward_layernorm(down_proj(...)), not the raw projection
    want_mlp = _rms_norm(got["down"], block.post_feedforward_layernorm, gemma)
    torch.testing.assert_close(base[f"mlp_out.{L}"].double(), want_mlp, atol=1e-5, rtol=1e-5)
    assert (base[f"mlp_out.{L}"] - got["down"]).abs().max() > 0.1
    # attn_out = post_attention_layernorm(o_proj(...)), not the raw projection
    want_attn = _rms_norm(got["o_proj"], block.post_attention_layernorm, gemma)
    torch.testing.assert_close(base[f"attn_out.{L}"].double(), want_attn, atol=1e-5, rtol=1e-5)
    assert (base[f"attn_out.{L}"] - got["o_proj"]).abs().max() > 0.1

    # a neuron zero-edit at the first position acts on the down projection, before the post-norm
    neurons = [3, 17, 90]
    e = Edit("neurons", L, neurons=neurons, positions="first", op="zero")
    new, got_e = _forward(lm, IDS, reads, edits=[e], extra_hooks=hooks)
    acts = base[f"neurons.{L}"].double()
    w_out = down.weight.detach().double()  # (d_model, d_mlp)
    removed = torch.zeros_like(got["down"], dtype=torch.float64)
    removed[:, 0] = acts[:, 0, neurons] @ w_out[:, neurons].T
    want_down = got["down"].double() - removed
    torch.testing.assert_close(got_e["down"].double(), want_down, atol=1e-6, rtol=1e-5)
    delta = new[f"mlp_out.{L}"].double() - base[f"mlp_out.{L}"].double()
    want_delta = _rms_norm(want_down, block.post_feedforward_layernorm, gemma) - want_mlp
    torch.testing.assert_close(delta, want_delta, atol=1e-5, rtol=1e-5)
    assert delta[:, 0].abs().max() > 1e-3  # the edit did something at position 0 ...
    assert torch.equal(new[f"mlp_out.{L}"][:, 1:], base[f"mlp_out.{L}"][:, 1:])  # ... and nowhere else
    # ... and that something is not the raw projection's change (it went through the norm)
    assert (delta[:, 0] + removed[:, 0]).abs().max() > 1e-3
    # the attention branch of the edited layer is untouched
    assert torch.equal(new[f"attn_out.{L}"], base[f"attn_out.{L}"])


# --- 2. parallel attention and MLP (GPT-NeoX) ------------------------------------------------
def _neox(parallel: bool):
    import transformers as T

    from sinkhole.models.loading import from_pretrained_model
    from tiny import TinyTokenizer

    torch.manual_seed(0)
    cfg = tiny_config("gpt_neox")
    cfg.use_parallel_residual = parallel
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return from_pretrained_model(model, TinyTokenizer(), name="tiny-gpt_neox-sequential")


@pytest.mark.parametrize("family", ["gpt_neox", "gpt_neox_sequential", "llama"])
def test_attn_edit_reaches_the_mlp_only_in_sequential_blocks(family):
    if family == "gpt_neox":
        lm = tiny_lm("gpt_neox")
        assert lm.model.config.use_parallel_residual is True  # the default, and what Pythia uses
        parallel = True
    elif family == "gpt_neox_sequential":
        lm, parallel = _neox(parallel=False), False
    else:
        lm, parallel = tiny_lm("llama"), False
    lm.model.double()
    L = 1
    reads = [(s, L) for s in ("resid_pre", "attn_out", "mlp_out", "resid_post")]
    base, _ = _forward(lm, IDS, reads)
    e = Edit("attn_out", L, positions="all", op="zero")
    new, _ = _forward(lm, IDS, reads, edits=[e])

    assert torch.equal(new[f"resid_pre.{L}"], base[f"resid_pre.{L}"])
    assert torch.count_nonzero(new[f"attn_out.{L}"]) == 0  # the edit took
    assert base[f"attn_out.{L}"].abs().max() > 1e-3
    if parallel:  # the MLP reads resid_pre, which the edit does not touch
        assert torch.equal(new[f"mlp_out.{L}"], base[f"mlp_out.{L}"])
        # by hand: mlp_out = W_out gelu(W_in LayerNorm(resid_pre) + b_in) + b_out
        block = lm.adapter.layer(L)
        ln, mlp = block.post_attention_layernorm, block.mlp
        assert lm.model.config.hidden_act == "gelu"
        x = torch.nn.functional.layer_norm(base[f"resid_pre.{L}"], ln.normalized_shape, ln.weight, ln.bias, ln.eps)
        hid = torch.nn.functional.gelu(x @ mlp.dense_h_to_4h.weight.T + mlp.dense_h_to_4h.bias)
        want = hid @ mlp.dense_4h_to_h.weight.T + mlp.dense_4h_to_h.bias
        torch.testing.assert_close(base[f"mlp_out.{L}"], want, atol=1e-12, rtol=1e-12)
    else:  # the MLP reads resid_pre + attn_out
        assert (new[f"mlp_out.{L}"] - base[f"mlp_out.{L}"]).abs().max() > 1e-4
    for c in (base, new):  # the block's output is the sum of its two branches, edited or not
        total = c[f"resid_pre.{L}"] + c[f"attn_out.{L}"] + c[f"mlp_out.{L}"]
        torch.testing.assert_close(c[f"resid_post.{L}"], total, atol=1e-12, rtol=1e-12)
    if parallel:  # so zeroing attention moves the block's output by exactly -attn_out
        torch.testing.assert_close(new[f"resid_post.{L}"] - base[f"resid_post.{L}"], -base[f"attn_out.{L}"],
                                   atol=1e-12, rtol=1e-12)


# --- 3. QK-norm ------------------------------------------------------------------------------
def _qk_norm(y: torch.Tensor, norm: torch.nn.Module, n_heads: int, d_head: int, over: str) -> torch.Tensor:
    """RMSNorm of a (B, T, n_heads * d_head) projection, by hand: ``over="head"`` normalizes each
    head's d_head values (Qwen-3), ``over="all"`` the whole projection (OLMo-2). ``over="head_wrong"``
    normalizes per head but scales by a whole-projection weight (a wrong reading of OLMo-2)."""
    B, T_, _ = y.shape
    if over == "all":
        return _rms_norm(y, norm, False)
    if over == "head":
        return _rms_norm(y.view(B, T_, n_heads, d_head), norm, False).view(B, T_, -1)
    y = y.double().view(B, T_, n_heads, d_head)
    y = (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)).view(B, T_, -1)
    return y * norm.weight.detach().double()


def _pattern_by_hand(lm, x: torch.Tensor, family: str, norms: str | None) -> torch.Tensor:
    """Causal softmax attention of layer 0 computed from its weights (float64); ``norms`` is
    how q_norm/k_norm are applied (see _qk_norm), None for not at all."""
    attn = lm.adapter.attn(0)
    cfg = lm.model.config
    B, T_, _ = x.shape
    H, KV, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    xd = x.double()
    q = xd @ attn.q_proj.weight.detach().double().T
    k = xd @ attn.k_proj.weight.detach().double().T
    if norms is not None:
        q = _qk_norm(q, attn.q_norm, H, D, norms)
        k = _qk_norm(k, attn.k_norm, KV, D, norms)
    q = q.view(B, T_, H, D).transpose(1, 2)
    k = k.view(B, T_, KV, D).transpose(1, 2)
    pos = torch.arange(T_).unsqueeze(0).expand(B, T_)
    cos, sin = lm.model.model.rotary_emb(xd, pos)
    mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    q, k = mod.apply_rotary_pos_emb(q, k, cos.double(), sin.double())
    k = k.repeat_interleave(H // KV, dim=1)  # GQA: query head h uses kv head h // (H // KV)
    scores = (q @ k.transpose(-1, -2)) * D ** -0.5
    causal = torch.ones(T_, T_, dtype=torch.bool).triu(1)
    scores = scores.masked_fill(causal, float("-inf"))
    return scores.softmax(-1)


@pytest.mark.parametrize("family,per_head", [("qwen3", True), ("olmo2", False)])
def test_attn_pattern_includes_the_qk_norm(family, per_head):
    lm = tiny_lm(family)
    attn = lm.adapter.attn(0)
    assert attn.q_norm.weight.numel() == (lm.model.config.head_dim if per_head
                                          else lm.model.config.num_attention_heads * lm.model.config.head_dim)
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for n in (attn.q_norm, attn.k_norm):
            n.weight.copy_(1.0 + 0.5 * torch.randn(n.weight.shape, generator=g))
    got = {}

    def pre(m, args, kwargs):
        got["x"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    hd = attn.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        cache, _ = _forward(lm, IDS, [("attn_pattern", 0)])
    finally:
        hd.remove()
    read = cache["attn_pattern.0"].double()
    want = _pattern_by_hand(lm, got["x"], family, "head" if per_head else "all")
    assert read.shape == want.shape == (2, lm.model.config.num_attention_heads, 7, 7)
    torch.testing.assert_close(read, want, atol=1e-5, rtol=1e-4)
    # the norms matter: without them (or normalizing the wrong way) the pattern is another one
    no_norm = _pattern_by_hand(lm, got["x"], family, None)
    assert (read - no_norm).abs().max() > 0.05
    if not per_head:
        wrong = _pattern_by_hand(lm, got["x"], family, "head_wrong")
        assert (read - wrong).abs().max() > 1e-3


# --- 4. with and without BOS -----------------------------------------------------------------
@pytest.fixture(scope="module")
def bos_folders(tmp_path_factory):
    """The same tiny Llama saved three ways: with BOS; a tokenizer without BOS and a config
    without bos_token_id (a model that has no BOS at all); a tokenizer without BOS but a config
    that still names one (as Qwen-2/3 checkpoints do)."""
    root = tmp_path_factory.mktemp("bos")
    with_bos = make_tiny_folder(root / "with-bos", "llama")

    def variant(name: str, drop_config_bos: bool):
        p = root / name
        shutil.copytree(with_bos, p)
        tc = json.loads((p / "tokenizer_config.json").read_text())
        tc.pop("bos_token", None)
        tc["add_bos_token"] = False
        (p / "tokenizer_config.json").write_text(json.dumps(tc))
        if drop_config_bos:
            for f in ("config.json", "generation_config.json"):
                if (p / f).exists():
                    c = json.loads((p / f).read_text())
                    c["bos_token_id"] = None
                    (p / f).write_text(json.dumps(c))
        return p

    return {"with": with_bos, "none": variant("no-bos", True), "tok_only": variant("no-bos-tokenizer", False)}


def _load(folder):
    from sinkhole.models.loading import load_model

    return load_model(str(folder), progress=False)


def _diverge_json(folder, capsys) -> dict:
    from sinkhole.cli import main

    rc = main(["diverge", str(folder), "--words", "poem", "--reps", "6", "--templates", "raw", "--max-new-tokens",
               "4", "--exact", "--json", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return json.loads(out)


def _greedy(lm, ids: list[int], n: int) -> list[int]:
    """Greedy continuation by plain argmax over full forward passes (no cache, no sinkhole)."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits = lm.model(torch.tensor([ids]), use_cache=False).logits[0, -1]
            t = int(logits.argmax())
            out.append(t)
            ids.append(t)
    return out


def test_model_without_bos_gets_no_bos(bos_folders, monkeypatch, capsys):
    from sinkhole.attack.prompts import make_cases

    monkeypatch.setenv("SINKHOLE_NO_PROGRESS", "1")
    lm = _load(bos_folders["none"])
    assert lm.tokenizer.bos_token_id is None and lm.bos_id is None
    poem = lm.tokenizer("poem", add_special_tokens=False)["input_ids"]
    assert len(poem) == 1 and poem[0] != 1
    for c in make_cases(lm, "poem", [6], "raw,repeat,garak_this"):
        assert 1 not in c.ids, (c.template, c.ids)  # "<s>" (id 1) appears nowhere
        if c.template == "raw":
            assert c.ids == poem * 6
    assert lm.encode("poem poem", bos=True) == poem * 2

    doc = _diverge_json(bos_folders["none"], capsys)
    assert doc["model"]["bos_id"] is None
    (case,) = doc["results"]["divergence"]["cases"]
    assert case["prompt_tokens"] == 6
    # the continuation is the model's greedy one after the six words alone, not after "<s>" + six words
    want = _greedy(lm, poem * 6, 4)
    assert case["text"] == lm.tokenizer.decode(want)
    assert want != _greedy(lm, [1] + poem * 6, 4)  # (so the check above can tell the two apart)


def test_model_with_bos_gets_exactly_one(bos_folders, monkeypatch, capsys):
    from sinkhole.attack.prompts import make_cases

    monkeypatch.setenv("SINKHOLE_NO_PROGRESS", "1")
    lm = _load(bos_folders["with"])
    assert lm.tokenizer.bos_token_id == 1 and lm.bos_id == 1
    poem = lm.tokenizer("poem", add_special_tokens=False)["input_ids"]
    for c in make_cases(lm, "poem", [6], "raw,repeat,garak_this"):
        assert c.ids[0] == 1 and c.ids.count(1) == 1, (c.template, c.ids)
        if c.template == "raw":
            assert c.ids == [1] + poem * 6
    assert lm.encode("poem", bos=True) == [1] + poem
    assert lm.encode("<s> poem", bos=True) == [1] + poem  # a text that already starts with BOS: still one

    doc = _diverge_json(bos_folders["with"], capsys)
    assert doc["model"]["bos_id"] == 1
    (case,) = doc["results"]["divergence"]["cases"]
    assert case["prompt_tokens"] == 7
    assert case["text"] == lm.tokenizer.decode(_greedy(lm, [1] + poem * 6, 4))


def test_tokenizer_without_bos_gets_no_bos_even_if_config_names_one(bos_folders):
    """Qwen-2/3 style: the tokenizer has no BOS (and adds none), the config still has a
    bos_token_id. The model is used without a BOS, so sinkhole's prompts must not start with one."""
    from sinkhole.attack.prompts import make_cases

    lm = _load(bos_folders["tok_only"])
    assert lm.tokenizer.bos_token_id is None and lm.model.config.bos_token_id == 1
    poem = lm.tokenizer("poem", add_special_tokens=False)["input_ids"]
    (case,) = make_cases(lm, "poem", [6], "raw")
    assert case.ids == poem * 6
