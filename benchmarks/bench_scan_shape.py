"""The scan at a large model's shape, with no download: a randomly initialised Llama of Llama-2-7B's
shape, time and peak memory per scan step.

The weights are random (no sink forms, so the circuit finds no roles and the later steps run on
their fallbacks): what it measures is the cost of every step at that scale, not what the steps
find. The SmolLM2 tokenizer supplies the token ids (so the vocabulary is 49,152 rows instead of
Llama-2's 32,000: 140 M more parameters in the embedding and the head). Peak memory is
``torch.cuda.max_memory_allocated`` per step (reset at each step's start); on a CPU only the times
are recorded (``--shape tiny`` checks the script on a CPU in under a minute).

Usage (one GPU, bfloat16, the quick scan)::

    python benchmarks/bench_scan_shape.py --device cuda --dtype bfloat16 --save scan_llama2_7b_shape
    python benchmarks/bench_scan_shape.py --shape tiny                      # CPU smoke run
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, parser, report, save, smoke_model, smoke_out  # noqa: E402

SMOKE = True

SHAPES = {
    # Llama-2-7B: d 4096, d_mlp 11008, 32 layers, 32 heads (no GQA), RMSNorm eps 1e-5, 4,096 positions
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5),
}


def build(shape: str, device: str, dtype: str, tokenizer_model: str = "smollm2-135m-instruct"):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sinkhole import load_model
    from sinkhole.models.loading import from_pretrained_model

    tok = load_model(tokenizer_model, progress=False).tokenizer
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      attn_implementation="eager", **SHAPES[shape])
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dt)  # initialise straight in the target precision (7B in float32 is 27 GB)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    model.requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())
    return from_pretrained_model(model, tok, name=f"random-{shape}-shape"), n


def main(argv=None) -> int:
    p = parser(__doc__, smoke=True)
    p.add_argument("--shape", default="llama2-7b", choices=sorted(SHAPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--full", action="store_true", help="the full scan's options instead of --quick")
    args = p.parse_args(argv)
    if args.smoke:  # the tiny shape with the tiny model's tokenizer, float32 on the CPU
        args.model, args.shape, args.device, args.dtype = smoke_model(), "tiny", "cpu", "float32"
        smoke_out(args, "scan_shape")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from sinkhole.pipeline.engine import ScanOptions
    from sinkhole.pipeline.registry import run_scan

    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device; run on a GPU machine or pass --device cpu")
    t = time.perf_counter()
    lm, n_params = build(args.shape, args.device, args.dtype, args.model)
    t_build = time.perf_counter() - t
    peaks: dict = {}
    current = {"step": None}

    def log(msg: str) -> None:  # the scan's progress lines mark where each step starts and ends
        print(msg, flush=True)
        if msg.startswith("[") and "] " in msg:
            name = msg.split("] ", 1)[1].split(":")[0].split(" ")[0]
            if msg.rstrip().endswith("..."):
                current["step"] = name
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
            elif current["step"] == name and cuda:
                torch.cuda.synchronize()
                peaks[name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    opts = ScanOptions(quick=not args.full)
    t = time.perf_counter()
    res = run_scan(lm, opts, log=log)
    total = time.perf_counter() - t
    row = {"benchmark": "scan_shape", "command": "python benchmarks/bench_scan_shape.py " + " ".join(argv or sys.argv[1:]),
           "machine": machine(), "shape": args.shape, "config": SHAPES[args.shape], "parameters": n_params,
           "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": args.dtype,
           "quick": not args.full, "build_s": round(t_build, 1), "scan_s": round(total, 1),
           "step_s": res["timings"], "step_peak_gib": peaks, "errors": res["doc"].get("errors") or {}}
    print(json.dumps({k: row[k] for k in ("parameters", "build_s", "scan_s", "step_s", "step_peak_gib", "errors")},
                     indent=1))
    report(save(args, row), {"parameters": n_params, "scan_s": row["scan_s"]})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
