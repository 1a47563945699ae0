"""Benchmark 6 (the limit): the machine's float32 matmul FLOP/s, the yardstick for every forward pass.

Square float32 matmuls of a few sizes, several timed runs each after a warm-up; the peak is the
best median over sizes. Run in its own process with the same thread count as the forwards.

Usage::

    python benchmarks/bench_peak.py --threads 1
"""

from __future__ import annotations

import argparse  # noqa: F401  (argparse.SUPPRESS)
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, parser, python_for, report, run_child, save, smoke_out  # noqa: E402

SMOKE = True


def measure(sizes=(512, 1024, 2048), runs: int = 7) -> dict:
    import torch

    out = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            a @ b
            ts.append(time.perf_counter() - t)
        out[str(n)] = {"median_gflop_per_s": 2 * n**3 / statistics.median(ts) / 1e9,
                       "best_gflop_per_s": 2 * n**3 / min(ts) / 1e9}
    return out


def peak(threads: int = 0) -> dict:
    """Run the micro-benchmark in a child process; returns per-size and peak GFLOP/s."""
    argv = [python_for(None), str(Path(__file__).resolve()), "--child", "--threads", str(threads)]
    res = run_child(argv, timeout=600)
    if "error" in res:
        return res
    sizes = res["sizes"]
    res["peak_gflop_per_s"] = max(v["median_gflop_per_s"] for v in sizes.values())
    res["best_gflop_per_s"] = max(v["best_gflop_per_s"] for v in sizes.values())
    return res


def main(argv=None):
    p = parser(__doc__, model=None, smoke=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        emit({"sizes": measure(), "torch_threads": torch.get_num_threads()})
        return
    if args.smoke:  # small sizes, in this process
        smoke_out(args, "peak")
        sizes = measure(sizes=(64, 128), runs=2)
        res = {"sizes": sizes, "peak_gflop_per_s": max(v["median_gflop_per_s"] for v in sizes.values())}
    else:
        res = peak(args.threads)
    payload = {"benchmark": "peak float32 matmul FLOP/s", "command": " ".join(["python"] + sys.argv),
               "machine": machine(), "result": res}
    report(save(args.out or args.save or f"peak_t{args.threads}", payload),
           {"peak_gflop_per_s": res.get("peak_gflop_per_s")})


if __name__ == "__main__":
    main()
