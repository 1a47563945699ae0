"""The stock model file (issue 28), parity first: a Llama model rewritten as ``granite_swa`` with every attention
sink at NO_SINK is the same model, in transformers (loaded by a process that never imports sinkhole) and as a
GGUF whose tensors are the source's, byte for byte, plus the sinks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from sinkhole.errors import SinkholeError
from sinkhole.patch.stock import NO_SINK, parity, stock_gguf, to_granite_swa


def test_tiny_llama_converts_exactly_and_loads_without_sinkhole(tmp_path):
    from tiny import tiny_lm

    lm = tiny_lm("llama")
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    model = to_granite_swa(lm)
    assert parity(lm, model, ids) == 0.0
    model.save_pretrained(tmp_path / "stock")
    want = lm.model(input_ids=ids).logits.detach()
    np.save(tmp_path / "ids.npy", ids.numpy())
    code = ("import sys, numpy, torch\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'stock')!r})\n"
            f"ids = torch.tensor(numpy.load({str(tmp_path / 'ids.npy')!r}))\n"
            "with torch.no_grad():\n"
            f"    numpy.save({str(tmp_path / 'got.npy')!r}, m(input_ids=ids).logits.numpy())\n"
            "assert 'sinkhole' not in sys.modules\n"
            "print(type(m).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "GraniteSWAForCausalLM"
    assert np.abs(np.load(tmp_path / "got.npy") - want.numpy()).max() == 0.0


def test_a_sink_changes_the_model_and_only_where_it_is_set():
    from tiny import tiny_lm

    lm = tiny_lm("llama")
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(1))
    s = torch.full((3, 4), NO_SINK)
    s[2, 1] = 0.0
    assert parity(lm, to_granite_swa(lm, s), ids) > 1e-3  # the sink acts
    s[2, 1] = NO_SINK
    assert parity(lm, to_granite_swa(lm, s), ids) == 0.0


def test_other_architectures_and_bad_sinks_are_refused():
    from tiny import tiny_lm

    with pytest.raises(SinkholeError, match="Llama-architecture"):
        to_granite_swa(tiny_lm("gpt2"))
    with pytest.raises(SinkholeError, match="layers x heads"):
        to_granite_swa(tiny_lm("llama"), torch.zeros(2, 4))
    with pytest.raises(SinkholeError, match="layers x heads"):
        stock_gguf(tiny_lm("llama"), torch.zeros(2, 4), "unused.gguf")


@pytest.mark.real
def test_smollm2_converts_exactly_and_its_gguf_keeps_every_tensor(smollm2, tmp_path):
    from gguf import GGUFReader

    from sinkhole.decoding.engines import gguf_of

    ids = smollm2.tokenizer("Shall I compare thee to a summer's day? Thou art more lovely.")["input_ids"]
    assert parity(smollm2, to_granite_swa(smollm2), ids) == 0.0
    sinks = torch.full((30, 9), NO_SINK)
    sinks[0, 3] = 1.5
    stock_gguf(smollm2, sinks, tmp_path / "stock.gguf")
    a, b = GGUFReader(str(gguf_of(smollm2))), GGUFReader(str(tmp_path / "stock.gguf"))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(tb) - set(ta) == {f"blk.{i}.attn_sinks.weight" for i in range(30)}
    assert all(np.array_equal(ta[n].data, tb[n].data) and ta[n].tensor_type == tb[n].tensor_type for n in ta)
    got = tb["blk.0.attn_sinks.weight"]
    assert got.tensor_type.name == "F32" and got.data.tolist()[3] == 1.5
    assert b.fields["general.architecture"].contents() == "granite_swa"
    assert b.fields["granite_swa.block_count"].contents() == 30
    assert b.fields["granite_swa.attention.sliding_window_pattern"].contents() == [True] + [False] * 29
    assert b.fields["granite_swa.attention.sliding_window"].contents() == 8192  # the whole training context
    assert b.fields["tokenizer.ggml.model"].contents() == a.fields["tokenizer.ggml.model"].contents()


def _llama_cpp_with_granite_swa() -> bool:
    try:
        import llama_cpp
    except ImportError:
        return False
    parts = tuple(int(x) for x in llama_cpp.__version__.split(".")[:3] if x.isdigit())
    return parts >= (0, 3, 36)  # the first llama-cpp-python whose llama.cpp has granite_swa


@pytest.mark.real
@pytest.mark.skipif(not _llama_cpp_with_granite_swa(), reason="needs llama-cpp-python >= 0.3.36 (granite_swa)")
def test_the_stock_gguf_equals_the_source_in_llama_cpp(smollm2, tmp_path):
    """llama.cpp reads the rewritten file as the same model (every sink at NO_SINK), and reads its sinks."""
    from llama_cpp import Llama

    from sinkhole.data import load_text
    from sinkhole.decoding.engines import gguf_of

    ids = smollm2.encode(load_text("sonnets")[:1500], bos=False)[:128]

    def logits(path):
        m = Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, seed=0)
        m.eval(ids)
        return np.array(m.scores[:len(ids)], dtype=np.float32)

    src = logits(gguf_of(smollm2))
    sinks = torch.full((30, 9), NO_SINK)
    stock_gguf(smollm2, sinks, tmp_path / "same.gguf")
    assert np.abs(logits(tmp_path / "same.gguf") - src).max() == 0.0
    sinks[0] = 0.0
    stock_gguf(smollm2, sinks, tmp_path / "sunk.gguf")
    assert np.abs(logits(tmp_path / "sunk.gguf") - src).max() > 0.1
