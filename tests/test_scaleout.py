"""The scale-out paths, tested for real on the CPU: a sweep sharded by torchrun (two processes)
merges to exactly the one-process sweep, and a model split by accelerate's device_map with some
layers offloaded to disk gives the same circuit, the same edited activations and the same
patched logits as the model held whole in memory."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers_reliability import env, make_tiny_folder


def _sinkhole(*args, cwd):
    return subprocess.run([sys.executable, "-m", "sinkhole", *args], cwd=cwd, env=env(), capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun is not installed beside this Python")
def test_torchrun_sharded_sweep_merges_to_the_one_process_sweep(tmp_path):
    folder = make_tiny_folder(tmp_path / "tiny")
    common = [str(folder), "--tokens", "24", "--max-reps", "24", "--batch-size", "4", "--quiet"]
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    p = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "sinkhole", "sweep", *common,
                        "--checkpoint", "ck.json"], cwd=tmp_path, env=env(), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    shards = sorted(tmp_path.glob("ck.json.shard*of2"))
    assert [s.name for s in shards] == ["ck.json.shard0of2", "ck.json.shard1of2"]
    per = [json.loads(s.read_text())["records"] for s in shards]
    assert per[0] and per[1] and not set(per[0]) & set(per[1])  # each process swept its own tokens
    merged = _sinkhole("sweep", "--merge", *map(str, shards), "--json", cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr[-2000:]
    one = _sinkhole("sweep", *common, "--checkpoint", "one.json", "--json", cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    m = json.loads(merged.stdout)["results"]["sweep"]
    o = json.loads(one.stdout)["results"]["sweep"]
    assert m["n_tokens"] == o["n_tokens"] == 24
    for key in ("top", "safest", "frac_sink_within_max_reps", "median_reps_to_sink"):
        assert m[key] == o[key], key


def test_accelerate_offloaded_model_gives_the_same_numbers(tmp_path):
    pytest.importorskip("accelerate")
    import transformers as T

    from sinkhole import Edit, Hooks
    from sinkhole.circuit import discover
    from sinkhole.models.loading import from_pretrained_model
    from sinkhole.patch import Patch, PatchOp
    from sinkhole.patch.core import apply_patch

    folder = make_tiny_folder(tmp_path / "tiny")
    tok = T.AutoTokenizer.from_pretrained(folder)
    whole = from_pretrained_model(T.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager"), tok,
                                  name="whole")
    dmap = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    split_model = T.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", device_map=dmap,
                                                         offload_folder=str(tmp_path / "offload"))
    # layers 1-2 really live on disk: their parameters are meta tensors that accelerate loads per call
    assert split_model.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    assert split_model.model.layers[0].mlp.down_proj.weight.device.type == "cpu"
    split = from_pretrained_model(split_model, tok, name="split")
    # the circuit
    a, b = discover(whole), discover(split)
    for key in ("sink_layers", "massive_layer", "marking_layers", "drift_layer", "sink_kind"):
        assert getattr(a, key) == getattr(b, key), key
    assert b.first_token_norm == pytest.approx(a.first_token_norm, rel=1e-5)
    # reads and edits through the hook engine, on an offloaded layer
    ids = torch.tensor([whole.encode("the poem company and of to in my thy", bos=True)])
    got = {}
    for name, lm in (("whole", whole), ("split", split)):
        with Hooks(lm) as h:
            h.read("neurons", 1)
            h.read("resid_post", 2)
            h.edit(Edit("neurons", 1, neurons=[3, 40], positions="nonfirst", op="zero"))
            with torch.no_grad():
                out = h.forward(ids, use_cache=False)
        got[name] = (h.cache["neurons.1"], h.cache["resid_post.2"], out.logits)
    for x, y in zip(got["whole"], got["split"]):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-5)
    # a patch applied as hooks
    patch = Patch([PatchOp(1, "scale", None, values=0.5), PatchOp(2, "cap", None, values=0.1)], "t")
    logits = {}
    for name, lm in (("whole", whole), ("split", split)):
        with torch.no_grad(), apply_patch(lm, patch):
            logits[name] = lm.model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(logits["split"], logits["whole"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits["whole"], got["whole"][2])  # the patch changed something
