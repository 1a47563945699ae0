"""A second inference engine for divergence: llama.cpp through ``llama-cpp-python``.

``sinkhole diverge MODEL.gguf --engine llama.cpp`` builds the same cases as the transformers path
(the model's tokenizer, read from the GGUF by transformers), lets llama.cpp decode them greedily on
its own quantized kernels, and judges the tokens with the same two judges. The GGUF must be the one
the model was loaded from (an embedded model or a ``.gguf`` path).

``llama-cpp-python`` is an optional extra (``pip install 'sinkhole[llamacpp]'``); PyPI has it as
source only, so installing it compiles llama.cpp: 3 min 15 s alone on the 2-core CPU (190% CPU,
680 MiB peak). Build it with ``CMAKE_ARGS='-DGGML_NATIVE=OFF'``: the default native build (AVX-512,
AMX) segfaulted in its first decode on this machine's Xeon; the generic AVX2 build works.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from ..errors import SinkholeError
from ..models.attention import fast_attention
from .cache import cache_argument, common_prefix, new_cache
from .gate import collapse, hidden_mask
from .state_check import StateReader, read_state

ENGINES = ("transformers", "llama.cpp")
INSTALL = ("CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install llama-cpp-python (source only on PyPI: it compiles "
           "llama.cpp, about 3 min on 2 CPU cores; the native build crashed on an AVX-512/AMX CPU)")


def gguf_of(lm) -> Path:
    """The GGUF file ``lm`` was loaded from; a one-line error for a model that is not a GGUF."""
    p = (getattr(lm, "info", None) or {}).get("gguf")
    if not p:
        raise SinkholeError("--engine llama.cpp runs a GGUF file: pass an embedded model or a .gguf path "
                            f"(this model came from {getattr(lm, 'source', 'elsewhere')})")
    return Path(p)


class _Fed:
    """Greedy decoding by feeding an engine the (collapsed) history each step: subclasses hold a KV
    cache of the tokens in ``_cached`` and implement ``_feed(target) -> logits after target``.

    With a gate, a run the model keeps writing leaves the collapsed history unchanged (a one-token
    run: the new token replaces the last visible one) or cycling through its unit's ``p`` phases,
    and the logits after a token list do not depend on when it is fed: each distinct collapsed
    history is fed once and its argmax reused, so a repeating continuation costs ``p + 1`` passes."""

    gate = None
    lm = None  # the torch model that reads the state, for a gate with the state check
    _cached: list[int]

    def n_ctx(self) -> int | None:
        return None

    def greedy(self, prompt: Sequence[int], max_new_tokens: int, stops: set[int]) -> list[int]:
        """The greedy continuation of ``prompt`` (cut after the first stop token), gated if the
        engine has a gate."""
        hist, gen = list(prompt), []
        limit = self.n_ctx()
        if limit is not None and len(hist) + int(max_new_tokens) > limit:
            raise SinkholeError(f"a prompt of {len(hist)} tokens plus {max_new_tokens} new ones exceeds the "
                                f"llama.cpp context of {limit}; use fewer --reps")
        self._reset()  # every prompt is read from an empty cache: results do not depend on case order
        seen: dict[tuple, int] = {}  # collapsed history -> its argmax (a gated run revisits the same few)
        reader = StateReader(self.lm, self.gate) if self.gate is not None and self.gate.confirm is not None else None
        dist = None
        with self._session():
            while len(gen) < int(max_new_tokens):
                if self.gate is None:
                    t = int(self._feed(hist).argmax())
                else:
                    if reader is not None:
                        dist = reader.read(hist)
                    key = tuple(collapse(hist, self.gate, dist))
                    if key not in seen:
                        if len(seen) >= 4 * self.gate.max_distinct:
                            seen.clear()
                        seen[key] = int(self._feed(list(key)).argmax())
                    t = seen[key]
                gen.append(t)
                hist.append(t)
                if t in stops:
                    break
        return gen

    def _session(self):
        """Held open around one greedy decoding (an engine's per-call setup)."""
        import contextlib

        return contextlib.nullcontext()

    def _reset(self) -> None:
        self._cached = []


class LlamaCpp(_Fed):
    """Greedy decoding, and logits, in llama.cpp of prompts given as token ids; with ``gate`` (a
    :class:`~sinkhole.decoding.gate.RunGate`), the run gate in llama.cpp.

    **The gate in llama.cpp.** The gated model equals the plain model on the tokens the gate has
    not hidden, at consecutive positions (:mod:`sinkhole.decoding.gate`). So every step feeds
    llama.cpp :func:`~sinkhole.decoding.gate.collapse` of the history: the KV cache keeps its longest
    common prefix with it and only the rest is evaluated. A run is shortened by dropping the
    previous block of the run from the end of the cache when the next one starts, which is one
    token per step, as in plain decoding; the prompt is read once, collapsed. No kernel of llama.cpp
    changes: the same loop runs on any GGUF llama.cpp loads.

    ``logits_all`` keeps the logits of every position (for :meth:`logits`; it costs n_ctx x vocab
    floats of memory)."""

    def __init__(self, gguf: str | os.PathLike, n_ctx: int = 4096, threads: int | None = None, gate=None,
                 logits_all: bool = False, lm=None):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise SinkholeError(f"--engine llama.cpp needs llama-cpp-python: {INSTALL}") from None
        self.path = Path(gguf)
        if not self.path.is_file():
            raise SinkholeError(f"no GGUF file at {self.path}; pass the path of a .gguf file")
        self.gate, self.logits_all, self.lm = gate, bool(logits_all), lm
        if gate is not None and gate.confirm is not None and lm is None:
            raise SinkholeError("the run gate's state check reads layer 0 of the model: give LlamaCpp the torch "
                                "model of the same GGUF (lm=...)")
        self.llm = Llama(model_path=str(self.path), n_ctx=int(n_ctx), n_threads=threads or os.cpu_count() or 1,
                         n_batch=512, logits_all=bool(logits_all), verbose=False, seed=0)
        self._cached: list[int] = []  # the tokens whose keys and values the cache holds, in order

    def n_ctx(self) -> int:
        return int(self.llm.n_ctx())

    def _feed(self, target: list[int]):
        """Make the cache hold exactly ``target`` (keeping its longest common prefix with what it
        holds, evaluating the rest; at least the last token) and return the logits after it."""
        import numpy as np

        p = min(common_prefix(self._cached, target), len(target) - 1)
        self.llm.n_tokens = p  # eval() drops every cache entry from position p on
        self.llm.eval(list(target[p:]))
        self._cached = list(target)
        return np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1), shape=(self.llm.n_vocab(),))

    def logits(self, row: Sequence[int]):
        """(len(row), vocab) float32 logits of every position of ``row`` read from an empty cache;
        with a gate, each position's logits are those of the gated model (the collapsed prefix)."""
        import numpy as np

        row = list(row)
        if self.gate is not None:
            dist = read_state(self.lm, [row], self.gate)  # a token's reading depends on the tokens before it only
            if bool(hidden_mask([row], self.gate, dist).any()):
                self._cached = []
                return np.stack([np.array(self._feed(collapse(row[:i + 1], self.gate,
                                                              None if dist is None else dist[:, :i + 1])))
                                 for i in range(len(row))])
        if not self.logits_all:
            raise SinkholeError("LlamaCpp.logits needs an engine made with logits_all=True")
        self.llm.n_tokens = 0
        self.llm.eval(row)
        self._cached = list(row)
        return np.array(self.llm.scores[:len(row)], dtype=np.float32)


class TorchGate(_Fed):
    """The run gate the way :class:`LlamaCpp` runs it, in transformers: each step feeds the model
    :func:`~sinkhole.decoding.gate.collapse` of the history, keeping the KV cache's longest common
    prefix with it. It gives the tokens of the gate's hooks (``apply_patch(lm, Patch(gate=...))``;
    test: tiny models, and SmolLM2 on the broad set) but reads a long run's prompt collapsed, so a
    prompt of thousands of repeated tokens costs what its first ~30 cost. Exact only where every
    layer is full softmax attention (:func:`gate_feed_exact`): a sliding-window layer counts its
    window in raw tokens, and a linear-attention layer cannot forget a token."""

    def __init__(self, lm, gate, model=None):
        import inspect

        self.lm, self.gate = lm, gate
        self.model = model = lm.model if model is None else model
        self._cache_kw = cache_argument(model)
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._past = None
        self._cached = []

    def _reset(self) -> None:
        self._cached, self._past = [], None

    def _session(self):
        import contextlib

        if self.model is not self.lm.model:  # another model (a stock rewrite) runs with its own attention
            return contextlib.nullcontext()
        return fast_attention(self.lm)  # SDPA switched on once per decoding, not once per step

    def logits(self, row: Sequence[int]):
        """(len(row), vocab) float32 logits of every position of ``row`` (ungated: a model's own logits)."""
        import torch

        if self.gate is not None:
            raise SinkholeError("TorchGate.logits reads a model's own logits: make the engine without a gate")
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([list(row)], device=self.lm.device), use_cache=False)
        return out.logits[0].float().cpu().numpy()

    def _feed(self, target: list[int]):
        import torch

        p = min(common_prefix(self._cached, target), len(target) - 1)
        if self._past is None or p == 0:
            self._past, p = new_cache(self.model), 0
        elif p < len(self._cached):
            self._past.crop(p - len(self._cached))  # negative: drop that many from the end
        pos = torch.arange(p, len(target), device=self.lm.device)
        kw = {"input_ids": torch.tensor([target[p:]], device=self.lm.device), "position_ids": pos[None],
              "use_cache": True, self._cache_kw: self._past}
        if self._keep:
            kw["logits_to_keep"] = 1
        with torch.no_grad():
            res = self.model(**kw)
        self._past = getattr(res, "cache", None) or res.past_key_values
        self._cached = list(target)
        return res.logits[0, -1].float()


def gate_feed_exact(lm) -> bool:
    """Whether :class:`TorchGate` runs the gate exactly on ``lm``: every layer full softmax
    attention (no sliding window, no linear attention)."""
    cfg = getattr(lm.model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    types = set(getattr(cfg, "layer_types", None) or [])
    if types - {"full_attention"}:
        return False
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) is not False \
            and not types:
        return False
    return len(list(lm.adapter.attention_layers)) == lm.adapter.n_layers


