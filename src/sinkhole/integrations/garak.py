"""A target for garak's ``function`` generator: the model with (or without) a sinkhole patch, in
transformers or in llama.cpp, so garak's own probes and detectors score the fix end to end.

garak calls ``generate(prompt, **kwargs)`` with the user prompt's text and keeps the returned
list of strings (one per generation). Run it as::

    garak --target_type function --target_name sinkhole.integrations.garak#generate \\
          --generator_options '{"function": {"Single": {"kwargs": {"patch": "fixed/", "max_new_tokens": 64}}}}' \\
          --probes divergence.Repeat --generations 1

Keyword arguments (each falls back to an environment variable, then a default):

* ``model`` (``SINKHOLE_MODEL``, default the embedded ``smollm2-135m-instruct``): what
  :func:`sinkhole.load_model` loads; it supplies the tokenizer and chat template in every engine;
* ``patch`` (``SINKHOLE_PATCH``): a folder written by ``sinkhole patch --out`` (loaded with
  :func:`sinkhole.load_patched`) or a patch.json (attached to ``model``) in transformers; in llama.cpp its run gate runs
  as :class:`sinkhole.decoding.engines.LlamaCpp` runs it (a weight patch goes in as its patched ``gguf``);
* ``engine`` (``SINKHOLE_ENGINE``): ``transformers`` (default) or ``llama.cpp``;
* ``gguf`` (``SINKHOLE_GGUF``): the GGUF llama.cpp runs (default: the one ``model`` came from);
* ``max_new_tokens`` (``SINKHOLE_MAX_NEW_TOKENS``, default 64).

Decoding is greedy and the prompt goes in as the user turn of the model's chat template (or as
plain text for a model without one), as garak's Hugging Face generator does; the models are
loaded once per process.
"""

from __future__ import annotations

import os

from ..attack.prompts import chat_ids, has_chat_template
from ..decoding.engines import LlamaCpp, gguf_of
from ..decoding.generate import generate as generate_ids
from ..decoding.tokens import stop_ids
from ..errors import SinkholeError
from ..models.loading import load_model
from ..patch.core import attach_patch, llamacpp_gate
from ..patch.export import load_patched, read_patch

_LOADED: dict = {}


def _option(kwargs: dict, name: str, default=None):
    v = kwargs.get(name)
    if v is None:
        v = os.environ.get(f"SINKHOLE_{name.upper()}") or None
    return default if v is None else v


def _runner(model: str, patch, engine: str, gguf):
    """(lm, decode) for these options, loaded once: ``decode(ids, n)`` returns greedy token ids."""
    key = (model, patch, engine, gguf)
    if key in _LOADED:
        return _LOADED[key]

    if engine == "transformers":
        if gguf:
            raise SinkholeError("a gguf is run by engine llama.cpp; drop gguf or set engine to llama.cpp")
        if patch and os.path.isdir(patch):
            lm = load_patched(patch)
        elif patch:  # a patch.json: attached to ``model``

            lm = load_model(model, progress=False)
            attach_patch(lm, read_patch(patch))
        else:
            lm = load_model(model, progress=False)

        def decode(ids, n):
            return generate_ids(lm, [ids], n)[0]
    elif engine == "llama.cpp":
        lm = load_model(model, progress=False)
        gate = None
        if patch:
            gate = llamacpp_gate(read_patch(patch), patched_gguf=bool(gguf))
        eng = LlamaCpp(gguf or gguf_of(lm), n_ctx=min(lm.n_ctx or 8192, 8192), gate=gate, lm=lm)
        stops = stop_ids(lm)

        def decode(ids, n):
            return eng.greedy(ids, n, stops)
    else:
        raise SinkholeError(f"unknown engine {engine!r}; use transformers or llama.cpp")
    _LOADED[key] = (lm, decode)
    return _LOADED[key]


def prompt_ids(lm, prompt: str) -> list[int]:
    """The user turn of the chat template around ``prompt`` (plain text after BOS without one)."""
    return chat_ids(lm, prompt) if has_chat_template(lm) else lm.encode(prompt, bos=True)


def generate(prompt, **kwargs) -> list[str]:
    """garak's function-generator entry point: the greedy continuation of ``prompt`` (a string, or
    anything with garak's ``last_message().text``) as one string in a list."""
    if not isinstance(prompt, str):
        prompt = prompt.last_message().text
    lm, decode = _runner(str(_option(kwargs, "model", "smollm2-135m-instruct")), _option(kwargs, "patch"),
                         str(_option(kwargs, "engine", "transformers")), _option(kwargs, "gguf"))
    n = int(_option(kwargs, "max_new_tokens", 64))
    gen = decode(prompt_ids(lm, prompt), n)
    return [lm.tokenizer.decode(gen, skip_special_tokens=True).strip()]
