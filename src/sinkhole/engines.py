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

from .errors import SinkholeError

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


class LlamaCpp:
    """Greedy decoding in llama.cpp of prompts given as token ids."""

    def __init__(self, gguf: str | os.PathLike, n_ctx: int = 4096, threads: int | None = None):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise SinkholeError(f"--engine llama.cpp needs llama-cpp-python: {INSTALL}") from None
        self.path = Path(gguf)
        self.llm = Llama(model_path=str(self.path), n_ctx=int(n_ctx), n_threads=threads or os.cpu_count() or 1,
                         n_batch=512, logits_all=False, verbose=False, seed=0)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, stops: set[int]) -> list[list[int]]:
        out = []
        for ids in prompts:
            if len(ids) + int(max_new_tokens) > self.llm.n_ctx():
                raise SinkholeError(f"a prompt of {len(ids)} tokens plus {max_new_tokens} new ones exceeds the "
                                    f"llama.cpp context of {self.llm.n_ctx()}; use fewer --reps")
            self.llm.reset()
            gen: list[int] = []
            for t in self.llm.generate(list(ids), top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                                       reset=True):
                gen.append(int(t))
                if int(t) in stops or len(gen) >= int(max_new_tokens):
                    break
            out.append(gen)
        return out


def run_llamacpp(lm, cases, max_new_tokens: int = 48, quiet: bool | None = None, engine: LlamaCpp | None = None):
    """The cases decoded by llama.cpp and judged like the transformers path (``method`` "llama.cpp")."""
    from .attack.diverge import judge_case, stop_ids, summarize
    from .progress import progress

    eng = engine or LlamaCpp(gguf_of(lm), n_ctx=max(len(c.ids) for c in cases) + int(max_new_tokens) + 8)
    stops = stop_ids(lm)
    results = []
    for c in progress(list(cases), desc="llama.cpp", disable=quiet):
        (gen,) = eng.generate([c.ids], max_new_tokens, stops)
        results.append(judge_case(lm, c, gen, stops))
    return summarize(results, max_new_tokens, method="llama.cpp")
