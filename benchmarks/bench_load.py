"""Benchmark 3: model load, first (empty cache: GGUF dequantized to safetensors) and cached.

Each load runs in a fresh child process. ``first``: ``SINKHOLE_CACHE`` points at a new empty
temporary folder, so ``load_model`` assembles/dequantizes the GGUF and writes the safetensors
cache. ``cached``: the same folder again (the OS file cache is warm, as it is for a user who
loaded the model before). Reported: seconds inside ``load_model`` and of the whole process
(interpreter start + ``import torch, transformers``), median over rounds.

Usage::

    python benchmarks/bench_load.py --rounds 3 --models smollm2-135m-instruct,gemma3-270m
"""

from __future__ import annotations

import argparse  # noqa: F401  (argparse.SUPPRESS)
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, median, parser, python_for, report, run_child, save  # noqa: E402

TARGET_CACHED_S = {"smollm2-135m-instruct": 5.0}


def child(args):
    t0 = time.perf_counter()
    import torch  # noqa: F401

    from sinkhole import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    t_import = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), time.process_time()
    lm = load_model(args.model, progress=False)
    load_s, load_cpu_s = time.perf_counter() - t1, time.process_time() - c1
    emit({"model": args.model, "load_s": load_s, "load_cpu_s": load_cpu_s, "import_s": t_import,
          "n_params": sum(p.numel() for p in lm.model.parameters())})


def main(argv=None):
    p = parser(__doc__, model=None)
    p.add_argument("--models", default="smollm2-135m-instruct,gemma3-270m")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--first-rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return
    me = str(Path(__file__).resolve())
    out = {}
    for model in [m for m in args.models.split(",") if m]:
        first, cached = [], []
        for r in range(args.first_rounds):
            cache = tempfile.mkdtemp(prefix="sinkhole-loadbench-")
            try:
                argv_ = [python_for(None), me, "--child", "--model", model, "--threads", str(args.threads)]
                first.append(run_child(argv_, env={"SINKHOLE_CACHE": cache}))
                if r == 0:
                    for _ in range(args.rounds):
                        cached.append(run_child(argv_, env={"SINKHOLE_CACHE": cache}))
            finally:
                shutil.rmtree(cache, ignore_errors=True)
        rows = {}
        for kind, rs in (("first", first), ("cached", cached)):
            ok = [x for x in rs if "error" not in x]
            rows[kind] = {
                "median_load_s": median([x["load_s"] for x in ok]),
                "median_process_s": median([x["process_wall_s"] for x in ok]),
                "median_import_s": median([x["import_s"] for x in ok]),
                "median_load_cpu_s": median([x.get("load_cpu_s") for x in ok]),
                "peak_rss_mib": median([x["peak_rss_mib"] for x in ok]),
                "runs": rs,
            }
            print(f"{model:24s} {kind:6s} load {rows[kind]['median_load_s']} s  "
                  f"process {rows[kind]['median_process_s']} s", file=sys.stderr)
        if model in TARGET_CACHED_S and rows["cached"]["median_load_s"] is not None:
            rows["target_cached_s"] = TARGET_CACHED_S[model]
            rows["target_met"] = rows["cached"]["median_load_s"] < TARGET_CACHED_S[model]
        out[model] = rows
    payload = {"benchmark": "model load", "command": " ".join(["python"] + sys.argv), "machine": machine(),
               "threads": args.threads or "torch default", "results": out}
    report(save(args.out or args.save or "load", payload),
           {m: r["cached"]["median_load_s"] for m, r in out.items()})


if __name__ == "__main__":
    main()
