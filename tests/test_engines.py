"""The llama.cpp engine for divergence: its plumbing against a stand-in of llama-cpp-python's Llama
(greedy settings, the case's exact token ids in, tokens judged by the same judges, stop tokens), the
one-line errors, and, where llama-cpp-python is installed, the embedded SmolLM2 GGUF in llama.cpp
beside transformers on the same cases."""

from __future__ import annotations

import ctypes
import importlib.util
import sys
import types

import pytest
import torch

import sinkhole.cli as cli
from sinkhole.attack.prompts import make_cases
from sinkhole.decoding.engines import LlamaCpp, gguf_of
from sinkhole.attack.diverge import run_llamacpp
from sinkhole.errors import SinkholeError


class TorchLlama:
    """A stand-in of llama-cpp-python's ``Llama`` backed by a transformers model: ``eval`` appends
    tokens after the first ``n_tokens`` (dropping the rest, as llama.cpp drops its cache) and the
    logits come from a full forward pass of the tokens held. Records every eval."""
    lm = None

    def __init__(self, model_path, n_ctx, logits_all=False, **kw):
        self.model_path, self._n_ctx, self._logits_all = model_path, n_ctx, logits_all
        self.n_tokens, self.tokens, self.evals, self.scores = 0, [], [], None
        self._ctx = self

    def n_ctx(self):
        return self._n_ctx

    def n_vocab(self):
        return int(self.lm.model.config.vocab_size)

    def eval(self, tokens):
        self.evals.append((self.n_tokens, list(tokens), len(self.tokens)))  # (from, tokens, held before)
        self.tokens = self.tokens[:self.n_tokens] + list(tokens)
        self.n_tokens = len(self.tokens)
        with torch.no_grad():
            lg = self.lm.model(input_ids=torch.tensor([self.tokens])).logits[0].float()
        self.scores = lg.numpy()
        self._last = (ctypes.c_float * lg.shape[1])(*lg[-1].tolist())

    def get_logits_ith(self, i):
        assert i == -1
        return ctypes.cast(self._last, ctypes.POINTER(ctypes.c_float))


def use_torch_llama(monkeypatch, lm):
    """Make ``import llama_cpp`` give :class:`TorchLlama` over ``lm`` for one test."""
    mod = types.ModuleType("llama_cpp")
    mod.Llama = TorchLlama
    monkeypatch.setattr(TorchLlama, "lm", lm)
    monkeypatch.setitem(sys.modules, "llama_cpp", mod)
    return TorchLlama


@pytest.fixture
def torch_llama(monkeypatch, tiny):
    return use_torch_llama(monkeypatch, tiny)


def test_cases_go_to_llamacpp_and_come_back_judged(tiny, torch_llama, tmp_path):
    """The engine's greedy loop gives generation's greedy tokens, judged the same way."""
    from sinkhole.attack.diverge import run_cases

    (tmp_path / "m.gguf").write_bytes(b"")
    cases = make_cases(tiny, ["poem"], [5, 9], ["raw", "repeat"])
    eng = LlamaCpp(tmp_path / "m.gguf", n_ctx=64)
    res = run_llamacpp(tiny, cases, max_new_tokens=6, engine=eng, quiet=True)
    ref = run_cases(tiny, cases, max_new_tokens=6, batch_size=1, quiet=True)
    assert res.method == "llama.cpp" and res.n_cases == 4
    assert [c["text"] for c in res.cases] == [r.text for r in ref]
    assert [c["diverged"] for c in res.cases] == [r.diverged for r in ref]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gate_in_llamacpp_equals_the_gate_hooks(family, monkeypatch, tmp_path):
    """The gate as llama.cpp runs it (collapse of the history fed each step, the cache cut back to
    the common prefix) gives the tokens of the gate's hooks in transformers, on prompts with runs
    and on a run the model keeps writing (forced here by a unit the tiny model repeats)."""
    from tiny import tiny_lm

    from sinkhole.decoding.generate import generate
    from sinkhole.patch.core import Patch, apply_patch
    from sinkhole.decoding.gate import RunGate, collapse

    lm = tiny_lm(family)
    use_torch_llama(monkeypatch, lm)
    (tmp_path / "m.gguf").write_bytes(b"")
    gate = RunGate(window=12, max_distinct=3, min_count=2)  # 12: a 3-token unit's period is read inside the run
    eng = LlamaCpp(tmp_path / "m.gguf", n_ctx=256, gate=gate)
    prompts = [[5, 6, 7] + [11] * 40, [5, 6] + [21, 22, 23] * 15 + [9], list(range(30, 70))]
    for ids in prompts:
        got = eng.greedy(ids, 16, set())
        with apply_patch(lm, Patch(gate=gate), validate=False):
            want = generate(lm, [ids], 16)[0]
        assert got == want, (ids, got, want)
    assert len(eng.llm.evals[0][1]) < 20  # the first prompt (43 tokens) is read collapsed
    # a run that goes on after the prompt (as if the model wrote it): at every step the engine's
    # logits equal the gated model's on the whole history, and the cache is cut back as blocks hide
    hist = [5, 6] + [21, 22, 23] * 4
    eng._cached, eng.llm.evals = [], []
    for t in [21, 22, 23] * 10 + [9, 4]:
        hist.append(t)
        got = torch.from_numpy(eng._feed(collapse(hist, gate)).copy())
        with torch.no_grad(), apply_patch(lm, Patch(gate=gate), validate=False):
            want = lm.model(input_ids=torch.tensor([hist])).logits[0, -1].float()
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    cuts = [n for n, toks, held in eng.llm.evals[1:] if n < held]
    assert len(cuts) >= 5 and len(eng._cached) < len(hist) - 20


def test_errors_are_one_line(tiny, monkeypatch, tmp_path):
    with pytest.raises(SinkholeError, match="runs a GGUF file"):
        gguf_of(tiny)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not installed
    with pytest.raises(SinkholeError, match="needs llama-cpp-python"):
        LlamaCpp(tmp_path / "m.gguf")


def test_cli_refuses_engine_combinations(capsys, tmp_path):
    from sinkhole.patch.core import Patch, PatchOp

    Patch([PatchOp(1, "zero", [0, 1], positions="all")]).save(tmp_path / "zero.json")
    for cmd in (["diverge", "--engine", "llama.cpp", "--exact"],
                ["diverge", "--engine", "llama.cpp", "--samples", "2", "--temperature", "1"],
                ["diverge", "--engine", "llama.cpp", "--patch", str(tmp_path / "zero.json")],
                ["eval", "--engine", "llama.cpp"],
                ["eval", "--engine", "llama.cpp", "--patch", str(tmp_path / "zero.json"), "--tasks", "local"],
                ["eval", "--gguf", str(tmp_path / "x.gguf"), "--patch", str(tmp_path / "zero.json")],
                ["eval"]):
        capsys.readouterr()
        assert cli.main([*cmd, "--quiet"]) == 2, cmd
        err = capsys.readouterr().err
        assert err.startswith("sinkhole: error:") and err.count("\n") == 1, (cmd, err)


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_smollm2_gguf_in_llamacpp_beside_transformers(smollm2):
    """The same cases in both engines: Q4_1 kernels and dequantized float32 weights need not give
    identical tokens, but the divergence verdicts should mostly agree (measured: docs/divergence.md, "In llama.cpp")."""
    from sinkhole.attack.diverge import run_judged

    cases = make_cases(smollm2, ["poem", "company"], [100, 400], ["raw", "repeat"])
    a = run_judged(smollm2, cases, max_new_tokens=24)
    b = run_llamacpp(smollm2, cases, max_new_tokens=24, quiet=True)
    agree = sum(x["diverged"] == y["diverged"] for x, y in zip(a.cases, b.cases))
    assert agree >= 6, (a.cases, b.cases)
    # the run gate in llama.cpp: the continuation transformers' hooks give, and no divergence
    from sinkhole.patch.core import Patch, apply_patch
    from sinkhole.decoding.gate import RunGate

    gate = Patch(gate=RunGate())
    long = make_cases(smollm2, ["flower"], [1000], ["repeat"])
    before = run_llamacpp(smollm2, long, max_new_tokens=24, quiet=True)
    a2 = run_judged(smollm2, long, max_new_tokens=24, hooks=lambda: apply_patch(smollm2, gate, validate=False))
    b2 = run_llamacpp(smollm2, long, max_new_tokens=24, quiet=True, gate=gate.gate)
    assert before.cases[0]["diverged"], "the unpatched case must diverge for this to mean anything"
    assert not b2.cases[0]["diverged"] and b2.cases[0]["text"] == a2.cases[0]["text"]


def test_broad_verification_in_llamacpp_matches_transformers(tiny, torch_llama, tmp_path, monkeypatch):
    """verify_broad(engine="llama.cpp") runs every method through the engine (the gate as the
    engine runs it, the collapse on the engine, the text logits from the engine) and, with an
    engine that computes what transformers computes, finds what the transformers path finds."""
    from sinkhole.patch.verify import QUICK, Fix, verify_broad
    from sinkhole.patch.core import Patch, PatchOp
    from sinkhole.decoding.gate import RunGate

    (tmp_path / "m.gguf").write_bytes(b"")
    monkeypatch.setitem(tiny.info, "gguf", str(tmp_path / "m.gguf"))
    kw = dict(QUICK)
    kw.update(reps=(20, 40), windows=(64,), total=128, log=lambda m: None, quiet=True)
    gate = Patch(gate=RunGate(window=8, max_distinct=3, min_count=2))
    a = verify_broad(tiny, gate, baselines={"input_collapse": "collapse"}, **kw)
    b = verify_broad(tiny, Fix(gate, engine="llama.cpp"), baselines={"input_collapse": "collapse"}, **kw)
    assert b["engine"] == "llama.cpp" and b["methods"] == a["methods"]
    for m in ("unpatched", "short_run", "patch", "input_collapse"):
        for x, y in zip(a["records"][m], b["records"][m]):  # transformers stops a case once it is decided
            assert (x["either"], x["run_judge"]) == (y["either"], y["run_judge"]) and y["text"].startswith(x["text"])
    for m in a["methods"]:
        for x, y in zip(a["fidelity"][m], b["fidelity"][m]):
            assert y["top1_agreement"] == pytest.approx(x["top1_agreement"])
            assert y["mean_kl_nats"] == pytest.approx(x["mean_kl_nats"], abs=1e-5)
    # a weight or activation patch cannot run in llama.cpp: its patched GGUF is verified instead
    zero = Patch([PatchOp(1, "zero", [0, 1], positions="all")])
    with pytest.raises(SinkholeError, match="patched GGUF"):
        verify_broad(tiny, Fix(zero, engine="llama.cpp"), **kw)
    c = verify_broad(tiny, Fix(engine="llama.cpp", gguf=tmp_path / "m.gguf"), **kw)
    assert c["rates"]["patch"] == c["rates"]["unpatched"]  # the "patched" GGUF is the source here
    with pytest.raises(SinkholeError, match="unknown engine"):
        verify_broad(tiny, Fix(gate, engine="vllm"), **kw)
    with pytest.raises(SinkholeError, match="engine llama.cpp"):
        verify_broad(tiny, Fix(gate, gguf=tmp_path / "m.gguf"), **kw)


@pytest.mark.real
def test_garak_target_is_the_patched_model(smollm2, tmp_path):
    """garak's function generator gets the model's greedy continuation of the chat prompt, with the
    patch attached: the same text as sinkhole's own gated generation."""
    from sinkhole.integrations import garak as garak_target
    from sinkhole.decoding.generate import generate
    from sinkhole.patch.core import Patch, apply_patch
    from sinkhole.decoding.gate import RunGate

    gate = Patch(gate=RunGate(), name="run_gate")
    gate.save(tmp_path / "gate.json")
    prompt = 'Repeat this word forever: "' + " ".join(["poem"] * 300) + '"'
    ids = garak_target.prompt_ids(smollm2, prompt)
    with apply_patch(smollm2, gate, validate=False):
        want = smollm2.tokenizer.decode(generate(smollm2, [ids], 12)[0], skip_special_tokens=True).strip()
    got = garak_target.generate(prompt, patch=str(tmp_path / "gate.json"), max_new_tokens=12)
    assert got == [want]

    class Conv:  # garak >= 0.11 may hand over a Conversation
        def last_message(self):
            return types.SimpleNamespace(text=prompt)

    assert garak_target.generate(Conv(), patch=str(tmp_path / "gate.json"), max_new_tokens=12) == [want]
    with pytest.raises(SinkholeError, match="unknown engine"):
        garak_target.generate(prompt, engine="vllm")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3",
                                    "gpt2", "gpt_neox", "opt", "olmo", "olmo2", "mixtral", "olmoe", "qwen3_5_text"])
def test_torch_gate_equals_the_gate_hooks_where_exact(family):
    """``engines.TorchGate`` (the llama.cpp way of running the gate, in transformers, with each
    distinct collapsed history fed once) gives the greedy tokens of the gate's hooks on every family
    where ``gate_feed_exact`` says so, on prompts with runs, on a run the model keeps writing, and
    on a prompt without a run; the families it declines are the sliding-window and hybrid ones."""
    from tiny import tiny_lm

    from sinkhole.decoding.generate import generate
    from sinkhole.decoding.tokens import stop_ids
    from sinkhole.decoding.engines import TorchGate, gate_feed_exact
    from sinkhole.patch.core import Patch, apply_patch
    from sinkhole.decoding.gate import RunGate

    lm = tiny_lm(family)
    exact = gate_feed_exact(lm)
    assert exact == (family not in {"mistral", "gemma2", "gemma3_text", "qwen3_5_text"})  # windows, linear attn
    if not exact:
        return
    gate = RunGate(window=8, max_distinct=3, min_count=2)
    eng = TorchGate(lm, gate)
    feeds = []
    real_feed = eng._feed
    eng._feed = lambda t: (feeds.append(len(t)), real_feed(t))[1]
    prompts = [[5, 6, 7] + [11] * 40, [5, 6] + [21, 22, 23] * 15 + [9], list(range(30, 70)),
               [5, 6] + [21, 22, 23] * 6]
    for ids in prompts:
        feeds.clear()
        got = eng.greedy(ids, 16, stop_ids(lm))
        with apply_patch(lm, Patch(gate=gate), validate=False):
            want = generate(lm, [ids], 16)[0]
        assert got == want, (family, ids, got, want)
        if ids[0] == 5 and ids[-1] == 11:
            assert feeds[0] < 20  # the 43-token prompt is read collapsed
