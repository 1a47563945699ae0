"""Architecture adapters: the one place that knows where each family keeps its parts.

Every analysis names *sites* (``resid_post``, ``mlp_out``, ``neurons`` ...) and asks the
adapter for the module that produces them. Nothing else in sinkhole spells out a module path.

Conventions (TransformerLens-like, 0-based layers):

* ``neurons`` of layer L: the input of the MLP's output projection (``down_proj`` and
  equivalents), i.e. the per-neuron activations. Neuron j writes ``act_j * W_out[:, j]``.
* ``mlp_out`` of layer L: what the MLP branch adds to the residual stream (after any
  post-MLP norm, as in Gemma-2/3 and OLMo-2).
* ``attn_out`` of layer L: what the attention branch adds to the residual stream.
* ``resid_post`` of layer L: the residual stream after block L (``resid_pre`` of L+1).

Mixture-of-experts families (Mixtral, OLMoE) keep every expert's weights fused in one module
(``gate_up_proj`` of shape (E, 2I, D), ``down_proj`` of shape (E, D, I)). There, neuron
``e * I + j`` is neuron j of expert e, and its activation at a token is the router's weight for
expert e times the expert's activation (0 where the router did not pick e), so the identity
``mlp_out = W_out @ neurons`` holds with ``W_out`` the experts' output projections side by side
(d_model, E * I). To read or edit neurons, sinkhole gives each experts module a parameter-free
``sinkhole_neurons`` tap: while a hook sits on the tap, every expert also runs densely on every
token (weighted by the router) so the tap sees the (tokens, E * I) activations; the layer's output
stays the model's own sparse forward, plus exactly the change an edit made times its columns. The router is never edited: an edit of
neuron (e, j) acts only where the router sends the token to expert e, and the patch's
fine-tune trains only experts (the selected neurons' rows and columns), never the router.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SinkholeError, UnsupportedArchitecture


@dataclass(frozen=True)
class ArchSpec:
    family: str
    layers: str  # path from the top model to the ModuleList of blocks
    embed: str  # token embedding module
    final_norm: str
    attn: str  # attention module, relative to a block
    mlp: str  # MLP module (or block for OPT), relative to a block
    down: str  # output projection of the MLP, relative to a block
    mlp_out: str  # module whose output is the MLP branch's residual contribution
    attn_out: str  # module whose output is the attention branch's residual contribution
    conv1d: bool = False  # GPT-2 style Conv1D: weight is (in, out)
    gated: bool = True
    moe: bool = False  # ``down`` names a fused experts module (gate_up_proj, down_proj as 3-D parameters)
    linear_attn: str | None = None  # hybrid models: a block without ``attn`` has this (e.g. Gated DeltaNet)


_LLAMA_LIKE = dict(
    layers="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    attn="self_attn",
    mlp="mlp",
    down="mlp.down_proj",
    mlp_out="mlp",
    attn_out="self_attn",
)
_POST_NORM = dict(_LLAMA_LIKE, mlp_out="post_feedforward_layernorm", attn_out="post_attention_layernorm")

SPECS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", **_LLAMA_LIKE),
    "mistral": ArchSpec("mistral", **_LLAMA_LIKE),
    "qwen2": ArchSpec("qwen2", **_LLAMA_LIKE),
    "qwen3": ArchSpec("qwen3", **_LLAMA_LIKE),
    "gemma": ArchSpec("gemma", **_LLAMA_LIKE),
    "gemma2": ArchSpec("gemma2", **_POST_NORM),
    "gemma3_text": ArchSpec("gemma3_text", **_POST_NORM),
    "phi3": ArchSpec("phi3", **_LLAMA_LIKE),
    "olmo": ArchSpec("olmo", **_LLAMA_LIKE),
    "olmo2": ArchSpec("olmo2", **_POST_NORM),
    "gpt2": ArchSpec(
        "gpt2",
        layers="transformer.h",
        embed="transformer.wte",
        final_norm="transformer.ln_f",
        attn="attn",
        mlp="mlp",
        down="mlp.c_proj",
        mlp_out="mlp",
        attn_out="attn",
        conv1d=True,
        gated=False,
    ),
    "gpt_neox": ArchSpec(
        "gpt_neox",
        layers="gpt_neox.layers",
        embed="gpt_neox.embed_in",
        final_norm="gpt_neox.final_layer_norm",
        attn="attention",
        mlp="mlp",
        down="mlp.dense_4h_to_h",
        mlp_out="mlp",
        attn_out="attention",
        gated=False,
    ),
    "opt": ArchSpec(
        "opt",
        layers="model.decoder.layers",
        embed="model.decoder.embed_tokens",
        final_norm="model.decoder.final_layer_norm",
        attn="self_attn",
        mlp="fc2",
        down="fc2",
        mlp_out="fc2",
        attn_out="self_attn",
        gated=False,
    ),
}
_MOE = dict(_LLAMA_LIKE, down="mlp.experts", moe=True)
# Qwen3.5: gated softmax attention (its output scaled by a sigmoid gate of the input, designed so a
# head can write nothing without parking on a sink) in some blocks, Gated DeltaNet linear
# attention in the others; a dense gated MLP everywhere.
SPECS["qwen3_5_text"] = ArchSpec("qwen3_5_text", **_LLAMA_LIKE, linear_attn="linear_attn")
SPECS["mixtral"] = ArchSpec("mixtral", **_MOE)
SPECS["olmoe"] = ArchSpec("olmoe", **_MOE)
# Aliases: model_type values that share a layout.
SPECS["gemma3"] = SPECS["gemma3_text"]
SPECS["smollm3"] = ArchSpec("smollm3", **_LLAMA_LIKE)

SUPPORTED = sorted(k for k in SPECS if k not in ("gemma3", "smollm3"))


class NeuronTap(torch.nn.Module):
    """Identity module whose input is an MoE layer's (tokens, E * I) neuron activations."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _dense_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """A fused experts module's forward that passes every neuron through ``self.sinkhole_neurons``
    when a hook sits there. The output is always the module's own (sparse) forward, plus, when a
    hook changed some neurons, exactly their change times their output columns: reads leave the
    output bit-identical, and an edit moves only the tokens it touched."""
    base = type(self).forward(self, hidden_states, top_k_index, top_k_weights)
    tap = self.sinkhole_neurons
    if not (tap._forward_pre_hooks or tap._forward_hooks):
        return base
    n_exp, d, inner = self.down_proj.shape
    gate_up = torch.nn.functional.linear(hidden_states, self.gate_up_proj.reshape(n_exp * 2 * inner, d))
    gate, up = gate_up.view(-1, n_exp, 2 * inner).chunk(2, dim=-1)
    act = self.act_fn(gate) * up  # (N, E, I)
    route = torch.zeros(act.shape[0], n_exp + 1, dtype=act.dtype, device=act.device)
    route.scatter_add_(1, top_k_index.long(), top_k_weights.to(act.dtype))  # index E: padding, dropped
    neurons = (act * route[:, :n_exp, None]).reshape(act.shape[0], n_exp * inner)
    tapped = tap(neurons)
    if tapped is neurons:
        return base
    w_out = self.down_proj.permute(1, 0, 2).reshape(d, n_exp * inner)
    return base + torch.nn.functional.linear(tapped - neurons, w_out).to(base.dtype)


def _install_tap(experts: torch.nn.Module) -> None:
    import types

    if "sinkhole_neurons" not in experts._modules:
        experts.add_module("sinkhole_neurons", NeuronTap())
        experts.forward = types.MethodType(_dense_experts_forward, experts)


def _has(root: torch.nn.Module, path: str) -> bool:
    try:
        _get(root, path)
        return True
    except AttributeError:
        return False


def _get(root: torch.nn.Module, path: str) -> torch.nn.Module:
    mod = root
    for part in path.split("."):
        mod = getattr(mod, part)
    return mod


class Adapter:
    """Names the sites of one loaded model."""

    def __init__(self, model: torch.nn.Module, spec: ArchSpec):
        self.model = model
        self.spec = spec
        where = spec.layers
        try:
            self._layers = _get(model, spec.layers)
            where = spec.embed
            self._embed = _get(model, spec.embed)
            where = spec.final_norm
            self._norm = _get(model, spec.final_norm)
            for part in (spec.down, spec.mlp_out):
                where = f"{spec.layers}.0.{part}"
                _get(self._layers[0], part)
            where = f"{spec.layers}.0.{spec.attn}"
            self.attn(0)
            self._attention = tuple(i for i in range(len(self._layers)) if _has(self._layers[i], spec.attn))
            if not self._attention:
                raise AttributeError(where)
            if spec.moe:
                for i in range(len(self._layers)):
                    where = f"{spec.layers}.{i}.{spec.down}.down_proj (a fused experts module)"
                    experts = _get(self._layers[i], spec.down)
                    if getattr(experts, "down_proj", None) is None or experts.down_proj.dim() != 3 \
                            or getattr(experts, "gate_up_proj", None) is None:
                        raise AttributeError(where)
                    _install_tap(experts)
        except (AttributeError, IndexError, TypeError):
            raise UnsupportedArchitecture(
                f"model of type {type(model).__name__} does not have the {spec.family} layout sinkhole expects "
                f"(no module {where}, e.g. no MLP output projection); this variant is not supported yet: "
                "'sinkhole models' lists the supported architectures"
            ) from None

    # --- structure -------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return self.spec.family

    @property
    def n_layers(self) -> int:
        return len(self._layers)

    @property
    def d_model(self) -> int:
        return int(self.embed.weight.shape[1])

    @property
    def d_mlp(self) -> int:
        return int(self.w_out(0).shape[1])

    @property
    def embed(self) -> torch.nn.Module:
        return self._embed

    @property
    def final_norm(self) -> torch.nn.Module:
        return self._norm

    @property
    def base_model(self) -> torch.nn.Module | None:
        """The module that holds the blocks and takes ``input_ids`` (e.g. ``model.model``)."""
        parent = self.spec.layers.rsplit(".", 1)[0] if "." in self.spec.layers else ""
        try:
            return _get(self.model, parent) if parent else self.model
        except AttributeError:
            return None

    def layer(self, i: int) -> torch.nn.Module:
        return self._layers[i]

    def attn(self, i: int) -> torch.nn.Module:
        """The attention module of block i (the linear-attention module in a hybrid's linear blocks)."""
        try:
            return _get(self._layers[i], self.spec.attn)
        except AttributeError:
            if self.spec.linear_attn is None:
                raise
            return _get(self._layers[i], self.spec.linear_attn)

    @property
    def attention_layers(self) -> list[int]:
        """The layers with softmax attention, whose attention weights can be read (every layer but a
        hybrid's linear-attention ones)."""
        return list(self._attention)

    def attention_in(self, layers) -> list[int]:
        """The softmax-attention layers among ``layers``."""
        return [i for i in layers if i in self._attention]

    def mlp(self, i: int) -> torch.nn.Module:
        return _get(self._layers[i], self.spec.mlp)

    def down_proj(self, i: int) -> torch.nn.Module:
        return _get(self._layers[i], self.spec.down)

    def module_for(self, site: str, i: int) -> torch.nn.Module:
        """Module whose output (or input, for ``neurons``) is the given site at layer i."""
        if site in ("resid_post", "resid_pre"):
            return self._layers[i]
        if site == "mlp_out":
            return _get(self._layers[i], self.spec.mlp_out)
        if site == "attn_out":
            return self.attn(i) if self.spec.attn_out == self.spec.attn else _get(self._layers[i], self.spec.attn_out)
        if site == "neurons":
            return self.down_proj(i).sinkhole_neurons if self.spec.moe else self.down_proj(i)
        if site == "attn_pattern":
            if i not in self._attention:
                raise SinkholeError(f"layer {i} of this {self.family} model uses linear attention, which has no "
                                    f"attention weights; softmax-attention layers: {self.attention_layers}")
            return self.attn(i)
        raise ValueError(f"unknown site {site!r}")

    def w_out(self, i: int) -> torch.Tensor:
        """Output-projection weight as (d_model, d_mlp): column j is neuron j's write (for MoE, a
        copy of the experts' output projections side by side)."""
        if self.spec.moe:
            w = self.down_proj(i).down_proj  # (E, D, I)
            return w.permute(1, 0, 2).reshape(w.shape[1], -1)
        w = self.down_proj(i).weight
        return w.t() if self.spec.conv1d else w

    def w_out_bias(self, i: int) -> torch.Tensor | None:
        if self.spec.moe:
            return None
        return getattr(self.down_proj(i), "bias", None)

    def mlp_parameters(self, layers) -> list[tuple[str, torch.nn.Parameter]]:
        """Every trainable MLP parameter of ``layers`` (for MoE: the experts, not the router)."""
        part = self.spec.down if self.spec.moe else self.spec.mlp
        out = []
        for i in layers:
            for name, p in _get(self._layers[i], part).named_parameters():
                out.append((f"{self.spec.layers}.{i}.{part}.{name}", p))
        return out

    def neuron_masks(self, layer: int, neurons) -> list[tuple[str, torch.nn.Parameter, torch.Tensor]]:
        """(name, parameter, boolean mask) for every MLP parameter entry that belongs to ``neurons``
        of ``layer``: their input rows (gate/up), output columns and biases. The router of an MoE
        layer belongs to no neuron and is never included."""
        idx = torch.as_tensor([int(n) for n in neurons], dtype=torch.long)
        down = self.down_proj(layer)
        if self.spec.moe:
            inner = down.down_proj.shape[2]
            e, j = idx // inner, idx % inner
            m = torch.zeros_like(down.down_proj, dtype=torch.bool)
            m[e, :, j] = True
            g = torch.zeros_like(down.gate_up_proj, dtype=torch.bool)
            g[e, j, :] = True
            g[e, inner + j, :] = True
            base = f"{self.spec.layers}.{layer}.{self.spec.down}"
            return [(f"{base}.gate_up_proj", down.gate_up_proj, g), (f"{base}.down_proj", down.down_proj, m)]
        d_mlp, d_model, out = self.d_mlp, self.d_model, []
        for name, p in self.mlp_parameters([layer]):
            m = torch.zeros_like(p, dtype=torch.bool)
            if p is down.weight:
                if self.spec.conv1d:
                    m[idx, :] = True
                else:
                    m[:, idx] = True
            elif p.dim() == 2 and p.shape[0] == d_mlp and p.shape[1] == d_model:
                m[idx, :] = True  # gate/up rows (Linear weight is out x in)
            elif p.dim() == 2 and p.shape == (d_model, d_mlp) and self.spec.conv1d:
                m[:, idx] = True  # GPT-2 c_fc (in x out)
            elif p.dim() == 1 and p.shape[0] == d_mlp:
                m[idx] = True
            else:
                continue
            out.append((name, p, m))
        return out


def model_type_of(model: torch.nn.Module) -> str:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None) or type(model).__name__
    # Gemma3ForConditionalGeneration holds a text config; we support the text part only.
    return str(mt)


def get_adapter(model: torch.nn.Module) -> Adapter:
    mt = model_type_of(model)
    spec = SPECS.get(mt)
    if spec is None:
        raise UnsupportedArchitecture(
            f"unsupported architecture '{mt}'; sinkhole supports: {', '.join(SUPPORTED)}"
        )
    return Adapter(model, spec)
