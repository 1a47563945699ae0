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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UnsupportedArchitecture


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
# Aliases: model_type values that share a layout.
SPECS["gemma3"] = SPECS["gemma3_text"]
SPECS["smollm3"] = ArchSpec("smollm3", **_LLAMA_LIKE)

SUPPORTED = sorted(k for k in SPECS if k not in ("gemma3", "smollm3"))


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
            for part in (spec.attn, spec.down, spec.mlp_out, spec.attn_out):
                where = f"{spec.layers}.0.{part}"
                _get(self._layers[0], part)
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
        return _get(self._layers[i], self.spec.attn)

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
            return _get(self._layers[i], self.spec.attn_out)
        if site in ("neurons", "attn_pattern"):
            return self.down_proj(i) if site == "neurons" else self.attn(i)
        raise ValueError(f"unknown site {site!r}")

    def w_out(self, i: int) -> torch.Tensor:
        """Output-projection weight as (d_model, d_mlp): column j is neuron j's write."""
        w = self.down_proj(i).weight
        return w.t() if self.spec.conv1d else w

    def w_out_bias(self, i: int) -> torch.Tensor | None:
        return getattr(self.down_proj(i), "bias", None)

    def param_name(self, i: int, part: str = "down") -> str:
        base = f"{self.spec.layers}.{i}"
        return f"{base}.{self.spec.down}" if part == "down" else f"{base}.{self.spec.mlp}"

    def mlp_parameters(self, layers) -> list[tuple[str, torch.nn.Parameter]]:
        out = []
        for i in layers:
            for name, p in self.mlp(i).named_parameters():
                out.append((f"{self.spec.layers}.{i}.{self.spec.mlp}.{name}", p))
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
