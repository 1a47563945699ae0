"""Architecture adapters: every supported family names its sites, and a neuron's edit moves the
MLP output exactly along that neuron's output-projection column."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from sinkhole import Edit, Hooks
from sinkhole.errors import SinkholeError, UnsupportedArchitecture
from sinkhole.models import adapters as A
from sinkhole.models.loading import from_pretrained_model
from tiny import FAMILIES, TinyTokenizer, tiny_lm

POST_NORM = {"gemma2", "gemma3_text", "olmo2"}  # mlp_out is a norm of the down projection's output
IDS = torch.tensor([[1, 17, 40, 40, 40, 9, 77, 5]])


def as_double(lm):
    """float64 for exact sums; MoE families then need transformers' eager experts loop (its default
    grouped matmul has no float64 kernel on CPU)."""
    lm.model.double()
    if lm.adapter.spec.moe:
        lm.model.set_experts_implementation("eager")
    return lm


def test_every_family_is_supported_and_tested():
    assert sorted(FAMILIES) == sorted(A.SUPPORTED)


def test_sites_are_found(tiny_family):
    lm = tiny_family
    a = lm.adapter
    assert a.n_layers == 3
    assert a.d_model == 64
    assert a.d_mlp == (256 if a.family == "gpt2" else 128)
    assert a.w_out(0).shape == (a.d_model, a.d_mlp)
    with Hooks(lm) as h:
        for i in range(a.n_layers):
            for site in ("resid_pre", "resid_post", "attn_out", "mlp_out", "neurons"):
                h.read(site, i)
        for i in a.attention_layers:
            h.read("attn_pattern", i)
        with torch.no_grad():
            out = h.forward(IDS, use_cache=False)
    T_ = IDS.shape[1]
    for i in range(a.n_layers):
        for site in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
            assert tuple(h.cache[f"{site}.{i}"].shape) == (1, T_, a.d_model), (site, i)
        assert tuple(h.cache[f"neurons.{i}"].shape) == (1, T_, a.d_mlp)
        if i not in a.attention_layers:  # a hybrid's linear-attention layer
            assert a.family == "qwen3_5_text" and f"attn_pattern.{i}" not in h.cache
            continue
        pat = h.cache[f"attn_pattern.{i}"]
        assert pat.shape[0] == 1 and pat.shape[-2:] == (T_, T_)
        assert torch.allclose(pat.sum(-1), torch.ones(()), atol=1e-5)  # rows of attention weights
        if i + 1 < a.n_layers:  # resid_post of L is resid_pre of L+1
            assert torch.equal(h.cache[f"resid_post.{i}"], h.cache[f"resid_pre.{i + 1}"])
    # the residual stream before the last layer, when the pass is complete, feeds the logits
    assert out is not None and out.logits.shape == (1, T_, 128)


def test_residual_decomposition(tiny_family):
    """resid_post = resid_pre + attn_out + mlp_out in every family: the
    adapter's attn_out and mlp_out are the branches' residual contributions (also for GPT-NeoX's
    parallel residual)."""
    lm = tiny_family
    as_double(lm)
    with Hooks(lm) as h:
        for site in ("resid_pre", "attn_out", "mlp_out", "resid_post"):
            h.read(site, 1)
        with torch.no_grad():
            h.forward(IDS, use_cache=False)
    c = h.cache
    total = c["resid_pre.1"] + c["attn_out.1"] + c["mlp_out.1"]
    torch.testing.assert_close(total, c["resid_post.1"], rtol=1e-9, atol=1e-9)


def _down_out(lm, layer, edits):
    """Output of the MLP output projection at ``layer`` (and mlp_out), with ``edits`` applied."""
    got = {}
    hd = lm.adapter.down_proj(layer).register_forward_hook(lambda m, a, o: got.__setitem__("down", o.detach()))
    try:
        with Hooks(lm) as h:
            h.read("mlp_out", layer)
            for e in edits:
                h.edit(e)
            with torch.no_grad():
                h.forward(IDS, use_cache=False)
    finally:
        hd.remove()
    down = got["down"]
    if down.dim() == 2:  # OPT runs its MLP on (B*T, D)
        down = down.view(IDS.shape[0], IDS.shape[1], -1)
    return down, h.cache[f"mlp_out.{layer}"]


@pytest.mark.parametrize("neuron", [0, 37])
def test_neuron_edit_moves_output_along_its_column(tiny_family, neuron):
    """Adding d to neuron j's activation adds exactly d * W_out[:, j] to the down projection's
    output (and to mlp_out where the MLP writes directly into the residual stream)."""
    lm = tiny_family
    as_double(lm)
    layer, d = 1, 2.5
    base_down, base_mlp = _down_out(lm, layer, [])
    e = Edit("neurons", layer, neurons=[neuron], positions="nonfirst", op="add", value=d)
    new_down, new_mlp = _down_out(lm, layer, [e])
    col = lm.adapter.w_out(layer)[:, neuron]
    want = torch.zeros_like(base_down)
    want[:, 1:, :] = d * col
    torch.testing.assert_close(new_down - base_down, want, rtol=1e-9, atol=1e-9)
    if lm.adapter.family not in POST_NORM:
        torch.testing.assert_close(new_mlp - base_mlp, want, rtol=1e-9, atol=1e-9)
    else:  # after the post-MLP norm: the first position is untouched, the others move
        assert torch.equal(new_mlp[:, 0], base_mlp[:, 0])
        assert (new_mlp[:, 1:] - base_mlp[:, 1:]).abs().max() > 1e-6


def test_zeroing_all_neurons_leaves_only_the_bias(tiny_family):
    lm = tiny_family
    as_double(lm)
    e = Edit("neurons", 0, op="zero")
    down, _ = _down_out(lm, 0, [e])
    bias = lm.adapter.w_out_bias(0)
    want = torch.zeros_like(down) if bias is None else bias.expand_as(down)
    torch.testing.assert_close(down, want, rtol=0, atol=1e-12)


def test_mlp_parameters_and_names(tiny_family):
    a = tiny_family.adapter
    named = dict(tiny_family.model.named_parameters())
    params = a.mlp_parameters([0, 2])
    assert params, "no MLP parameters found"
    for name, p in params:
        assert name in named and named[name] is p
    if a.spec.moe:  # the experts' fused weights, never the router
        assert {n.rsplit(".", 1)[-1] for n, _ in params} == {"gate_up_proj", "down_proj"}
    else:
        assert any(p is a.down_proj(0).weight for _, p in params)


def test_moe_neurons_are_expert_neurons_weighted_by_the_router():
    """Neuron e * I + j of an MoE layer is neuron j of expert e times the router's weight for e:
    zero for the experts the router did not pick, and mlp_out = W_out @ neurons exactly."""
    for family in ("mixtral", "olmoe"):
        lm = tiny_lm(family)
        a = lm.adapter
        experts = a.down_proj(1)
        n_exp, _, inner = experts.down_proj.shape
        with Hooks(lm) as h:
            h.read("neurons", 1)
            h.read("mlp_out", 1)
            h.read("resid_pre", 1)
            with torch.no_grad():
                h.forward(IDS, use_cache=False)
        acts = h.cache["neurons.1"][0].view(IDS.shape[1], n_exp, inner)
        # the router's choice, recomputed from its weights on the post-attention normed input
        layer = a.layer(1)
        with torch.no_grad():
            x = h.cache["resid_pre.1"][0]
            attn_in = layer.input_layernorm(x)
            pos = torch.arange(IDS.shape[1])[None]
            rope = lm.model.model.rotary_emb(attn_in[None], pos)
            mask = torch.full((IDS.shape[1],) * 2, float("-inf")).triu(1)[None, None]
            attn = layer.self_attn(attn_in[None], position_embeddings=rope, attention_mask=mask)[0][0]
            mlp_in = layer.post_attention_layernorm(x + attn)
            logits = layer.mlp.gate(mlp_in)[0]
            picked = logits.topk(2, dim=-1).indices
        used = (acts.abs().sum(-1) > 0)  # (T, E)
        want = torch.zeros_like(used)
        want.scatter_(1, picked, True)
        assert torch.equal(used, want), family
        torch.testing.assert_close(h.cache["neurons.1"] @ a.w_out(1).T, h.cache["mlp_out.1"])
        assert a.d_mlp == n_exp * inner


def test_moe_neuron_masks_address_one_expert():
    lm = tiny_lm("mixtral")
    a = lm.adapter
    inner = a.down_proj(0).down_proj.shape[2]
    (gname, g, gm), (dname, d, dm) = a.neuron_masks(0, [inner + 5])  # neuron 5 of expert 1
    assert gname.endswith("mlp.experts.gate_up_proj") and dname.endswith("mlp.experts.down_proj")
    assert gm.sum() == 2 * g.shape[2] and gm[1, 5].all() and gm[1, inner + 5].all()
    assert dm.sum() == d.shape[1] and dm[1, :, 5].all()


def test_unsupported_architecture_names_it_and_the_supported_ones():
    cfg = T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=64)
    model = T.AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(UnsupportedArchitecture) as ei:
        from_pretrained_model(model, TinyTokenizer())
    msg = str(ei.value)
    assert "\n" not in msg
    assert "'bloom'" in msg
    for fam in A.SUPPORTED:
        assert fam in msg
    assert isinstance(ei.value, SinkholeError)


def test_model_without_mlp_output_projection():
    lm = tiny_lm("llama")
    for layer in lm.model.model.layers:
        layer.mlp.out = layer.mlp.down_proj
        del layer.mlp.down_proj
    with pytest.raises(UnsupportedArchitecture) as ei:
        A.get_adapter(lm.model)
    msg = str(ei.value)
    assert "\n" not in msg and "llama" in msg and "down_proj" in msg


def test_gemma3_alias_and_smollm3_share_layouts():
    assert A.SPECS["gemma3"] is A.SPECS["gemma3_text"]
    assert A.SPECS["smollm3"].down == A.SPECS["llama"].down


def test_hybrid_linear_attention_layers_have_no_weights_to_read():
    """Qwen3.5 mixes gated softmax attention with Gated DeltaNet linear attention: the adapter knows
    which layers have attention weights, reading them elsewhere is a one-line error, and the other
    sites exist at every layer (attn_out is the linear attention's output there)."""
    lm = tiny_lm("qwen3_5_text")
    a = lm.adapter
    assert a.attention_layers == [1] and a.attention_in(range(3)) == [1]
    assert type(a.attn(0)).__name__.endswith("GatedDeltaNet") and type(a.attn(1)).__name__.endswith("Attention")
    for site in ("attn_pattern", "attn_first"):
        with pytest.raises(SinkholeError) as ei:
            Hooks(lm).read(site, 0)
        assert "linear attention" in str(ei.value) and "[1]" in str(ei.value) and "\n" not in str(ei.value)
