"""Tiny random models built from configs (no download), wrapped as sinkhole LoadedModels."""

from __future__ import annotations

import torch
import transformers as T

from sinkhole.models.loading import from_pretrained_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "gpt2", "gpt_neox",
            "opt", "olmo", "olmo2", "mixtral", "olmoe", "qwen3_5_text"]
MOE = {"mixtral", "olmoe"}  # 4 experts x 32 neurons, 2 per token: d_mlp 128 like the dense families

VOCAB = 128


def tiny_config(family: str, n_layers: int = 3):
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if family in ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "phi3"):
        cls = {"llama": T.LlamaConfig, "mistral": T.MistralConfig, "qwen2": T.Qwen2Config, "qwen3": T.Qwen3Config,
               "olmo": T.OlmoConfig, "olmo2": T.Olmo2Config, "phi3": T.Phi3Config}[family]
        return cls(head_dim=16, **common)
    if family in ("gemma", "gemma2", "gemma3_text"):
        cls = {"gemma": T.GemmaConfig, "gemma2": T.Gemma2Config, "gemma3_text": T.Gemma3TextConfig}[family]
        return cls(head_dim=16, **common)
    if family in MOE:
        cls = {"mixtral": T.MixtralConfig, "olmoe": T.OlmoeConfig}[family]
        moe = dict(common, intermediate_size=32, num_experts_per_tok=2)
        moe["num_local_experts" if family == "mixtral" else "num_experts"] = 4
        return cls(head_dim=16, **moe)
    if family == "qwen3_5_text":  # gated attention in layer 1, Gated DeltaNet linear attention in 0 and 2
        return T.Qwen3_5TextConfig(head_dim=16, full_attention_interval=2, linear_num_value_heads=4,
                                   linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                                   **common)
    if family == "gpt2":
        return T.GPT2Config(n_embd=64, n_layer=n_layers, n_head=4, vocab_size=VOCAB, n_positions=512, bos_token_id=1,
                            eos_token_id=2)
    if family == "gpt_neox":
        return T.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                               num_attention_heads=4, vocab_size=VOCAB, max_position_embeddings=512,
                               bos_token_id=1, eos_token_id=2)
    if family == "opt":
        return T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=n_layers, num_attention_heads=4,
                           vocab_size=VOCAB, word_embed_proj_dim=64, max_position_embeddings=512, bos_token_id=1,
                           eos_token_id=2, pad_token_id=0)
    raise ValueError(family)


class TinyTokenizer:
    """A deterministic word-level tokenizer over a 128-token vocabulary (no files needed)."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0
    bos_token = "<s>"
    eos_token = "</s>"
    pad_token = "<pad>"
    chat_template = None
    padding_side = "left"

    def _tok(self, word: str) -> int:
        h = 0
        for ch in word:
            h = (h * 131 + ord(ch)) % 1_000_003
        return 3 + h % (VOCAB - 3)

    def __call__(self, text, add_special_tokens=False, **kw):
        if isinstance(text, list):
            return {"input_ids": [self(t, add_special_tokens)["input_ids"] for t in text]}
        ids = [self._tok(w) for w in text.split()]
        if add_special_tokens:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids}

    def encode(self, text, add_special_tokens=False):
        return self(text, add_special_tokens)["input_ids"]

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"t{int(i)}" for i in ids)

    def convert_ids_to_tokens(self, ids):
        return [f"t{int(i)}" for i in ids]


def tiny_lm(family: str = "llama", n_layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    cfg = tiny_config(family, n_layers)
    model = T.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model.eval()
    return from_pretrained_model(model, TinyTokenizer(), name=f"tiny-{family}")
