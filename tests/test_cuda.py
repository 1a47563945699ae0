"""The CUDA path: every scan step (with --patch) on a tiny random model moved to the GPU, in float32
and bfloat16. Skipped where no CUDA device is present (CI has none; run it on a GPU machine)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from tiny import tiny_lm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_scan_step_runs_on_cuda(dtype):
    from sinkhole.pipeline.registry import run_scan, selected_steps
    from helpers_report import TINY_OPTIONS

    lm = tiny_lm("llama", n_layers=3)
    lm.model.to(device="cuda", dtype=dtype)
    assert lm.device.type == "cuda"
    out = Path(tempfile.mkdtemp(prefix="sinkhole-cuda-"))
    doc = run_scan(lm, TINY_OPTIONS, out, log=lambda m: None)["doc"]
    assert not doc.get("errors"), doc.get("errors")
    assert doc["steps"] == [s.name for s in selected_steps(TINY_OPTIONS)]


@pytest.mark.experimental
def test_patch_and_finetune_match_between_cpu_and_cuda():
    from sinkhole.evaluate.metrics import text_metrics
    from sinkhole.patch import Patch, PatchOp
    from sinkhole.experimental.finetune import FinetuneConfig, finetune_patch

    cpu, gpu = tiny_lm("llama"), tiny_lm("llama")
    gpu.model.to("cuda")
    p = Patch([PatchOp(1, "scale", None, values=3.0)])
    texts = ["one two three four five six seven", "a b c d e f g h i j"]
    a, b = text_metrics(cpu, p, texts), text_metrics(gpu, p, texts)
    assert a.mean_kl_nats == pytest.approx(b.mean_kl_nats, rel=1e-3, abs=1e-6)
    cfg = FinetuneConfig(neurons={1: [5, 9]}, words=("a",), reps=(8,), templates=("raw",), steps=2, min_reps=2,
                         n_texts=4, text_words=12, objective="local", keep_at="logits")
    w = finetune_patch(gpu, cfg).weights
    assert all(t.device.type == "cuda" for t in w.values())
