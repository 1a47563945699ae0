"""The patched-GGUF writer on the embedded SmolLM2 GGUF: metadata and every untouched tensor copied
byte for byte, the patched tensor exactly (F32), close (Q8_0) or re-quantized (Q4_1), and the file
loads in transformers with the patched weight in place."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sinkhole.errors import SinkholeError
from sinkhole.patch import Patch, PatchOp
from sinkhole.experimental.gguf_export import gguf_name, patch_to_gguf, write_patched_gguf

pytestmark = [pytest.mark.real, pytest.mark.experimental]
NAME = "model.layers.1.mlp.down_proj.weight"


def test_names():
    assert gguf_name(NAME) == "blk.1.ffn_down.weight"
    assert gguf_name("model.layers.12.mlp.gate_proj.weight") == "blk.12.ffn_gate.weight"
    assert gguf_name("model.layers.1.self_attn.q_proj.weight") is None


def test_patched_gguf_round_trip(smollm2, tmp_path, monkeypatch):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    from sinkhole.decoding.engines import gguf_of

    src = gguf_of(smollm2)
    w = dict(smollm2.model.named_parameters())[NAME].detach().float().clone()
    w[:, 5] += 0.05
    patch = Patch([], "ft", weights={NAME: w})
    a = GGUFReader(str(src))
    ta = {t.name: t for t in a.tensors}
    for kind in ("F32", "Q8_0", "source"):
        out = tmp_path / f"p-{kind}.gguf"
        rep = patch_to_gguf(smollm2, patch, out, kind)
        b = GGUFReader(str(out))
        tb = {t.name: t for t in b.tensors}
        assert set(tb) == set(ta) and rep["copied"] == len(ta) - 1
        assert all(np.array_equal(ta[n].data, tb[n].data) and ta[n].tensor_type == tb[n].tensor_type
                   for n in ta if n != "blk.1.ffn_down.weight")
        assert {k: str(f.contents()) for k, f in a.fields.items() if not k.startswith("GGUF.")} == \
               {k: str(f.contents()) for k, f in b.fields.items() if not k.startswith("GGUF.")}
        t = tb["blk.1.ffn_down.weight"]
        got = dequantize(t.data, t.tensor_type).reshape(w.shape)
        want = w.numpy()
        if kind == "F32":
            assert np.array_equal(got, want)
        elif kind == "Q8_0":
            assert np.abs(got - want).max() < 0.02 and t.tensor_type.name == "Q8_0"
        else:
            assert t.tensor_type.name == "Q4_1" and rep["patched"]["blk.1.ffn_down.weight"] == "Q4_1"
    # the F32 file loads in transformers with the patched weight, and everything else as before
    monkeypatch.setenv("SINKHOLE_CACHE", str(tmp_path / "cache"))
    from sinkhole.models.loading import load_model

    lm2 = load_model(str(tmp_path / "p-F32.gguf"), progress=False)
    assert torch.equal(dict(lm2.model.named_parameters())[NAME].detach(), w)
    other = "model.layers.2.mlp.up_proj.weight"
    assert torch.equal(dict(lm2.model.named_parameters())[other], dict(smollm2.model.named_parameters())[other])


def test_refusals(smollm2, tmp_path):
    with pytest.raises(SinkholeError, match="through hooks"):
        patch_to_gguf(smollm2, Patch([PatchOp(1, "zero", [3])], "paper"), tmp_path / "a.gguf")
    with pytest.raises(SinkholeError, match="does not map"):
        patch_to_gguf(smollm2, Patch([], "ft", weights={"model.layers.1.self_attn.q_proj.weight": torch.zeros(1)}),
                      tmp_path / "a.gguf")
    with pytest.raises(SinkholeError, match="end in .gguf"):
        write_patched_gguf("x.gguf", {}, tmp_path / "a.bin")


def test_gemma_k_quant_source_type_is_refused_with_the_nearest_writable(tmp_path):
    from sinkhole.models.loading import load_model

    lm = load_model("gemma3-270m", progress=False)
    w = dict(lm.model.named_parameters())[NAME].detach().float().clone()
    with pytest.raises(SinkholeError, match="cannot write Q.*_K.*Q8_0"):
        patch_to_gguf(lm, Patch([], "ft", weights={NAME: w}), tmp_path / "g.gguf", "source")
    assert not list(tmp_path.iterdir())  # nothing half-written
