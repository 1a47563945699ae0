"""The llama.cpp engine for divergence: its plumbing against a stand-in of llama-cpp-python's Llama
(greedy settings, the case's exact token ids in, tokens judged by the same judges, stop tokens), the
one-line errors, and, where llama-cpp-python is installed, the embedded SmolLM2 GGUF in llama.cpp
beside transformers on the same cases."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest

import sinkhole.cli as cli
from sinkhole.attack.prompts import make_cases
from sinkhole.engines import LlamaCpp, gguf_of, run_llamacpp
from sinkhole.errors import SinkholeError


class FakeLlama:
    """Records what it was given; continues every prompt with its own last token, then a 7."""
    calls: list = []

    def __init__(self, model_path, n_ctx, **kw):
        self.model_path, self._n_ctx = model_path, n_ctx

    def n_ctx(self):
        return self._n_ctx

    def reset(self):
        pass

    def generate(self, tokens, **kw):
        FakeLlama.calls.append((list(tokens), kw))
        yield tokens[-1]
        yield tokens[-1]
        while True:
            yield 7


@pytest.fixture
def fake_llama(monkeypatch):
    mod = types.ModuleType("llama_cpp")
    mod.Llama = FakeLlama
    FakeLlama.calls = []
    monkeypatch.setitem(sys.modules, "llama_cpp", mod)
    return FakeLlama


def test_cases_go_to_llamacpp_greedily_and_come_back_judged(tiny, fake_llama, tmp_path):
    cases = make_cases(tiny, ["poem"], [5, 9], ["raw", "repeat"])
    eng = LlamaCpp(tmp_path / "m.gguf", n_ctx=64)
    res = run_llamacpp(tiny, cases, max_new_tokens=4, engine=eng, quiet=True)
    assert [c for c, _ in fake_llama.calls] == [c.ids for c in cases]  # the same token ids as transformers
    kw = fake_llama.calls[0][1]
    assert kw["temp"] == 0.0 and kw["top_k"] == 1 and kw["repeat_penalty"] == 1.0  # greedy
    assert res.method == "llama.cpp" and res.n_cases == 4
    for c in res.cases:  # two repetitions of the word, then token 7: diverged after 2 tokens
        assert c["diverged"] and c["tokens_until_divergence"] == 2 and c["n_generated"] == 4


def test_errors_are_one_line(tiny, monkeypatch, tmp_path):
    with pytest.raises(SinkholeError, match="runs a GGUF file"):
        gguf_of(tiny)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not installed
    with pytest.raises(SinkholeError, match="needs llama-cpp-python"):
        LlamaCpp(tmp_path / "m.gguf")


def test_cli_refuses_engine_combinations(capsys):
    for extra in (["--exact"], ["--samples", "2", "--temperature", "1"]):
        capsys.readouterr()
        assert cli.main(["diverge", "--engine", "llama.cpp", *extra, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sinkhole: error:") and err.count("\n") == 1


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_smollm2_gguf_in_llamacpp_beside_transformers(smollm2):
    """The same cases in both engines: Q4_1 kernels and dequantized float32 weights need not give
    identical tokens, but the divergence verdicts should mostly agree (measured: docs/findings.md)."""
    from sinkhole.attack.diverge import run_judged

    cases = make_cases(smollm2, ["poem", "company"], [100, 400], ["raw", "repeat"])
    a = run_judged(smollm2, cases, max_new_tokens=24)
    b = run_llamacpp(smollm2, cases, max_new_tokens=24, quiet=True)
    agree = sum(x["diverged"] == y["diverged"] for x, y in zip(a.cases, b.cases))
    assert agree >= 6, (a.cases, b.cases)
