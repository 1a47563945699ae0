"""Benchmark: circuit discovery time after load on SmolLM2 (sink layers + causally verified sink
neurons, i.e. ``sinkhole.circuit.circuit.discover``), and the full ``analyze`` once.

The model is loaded once (not timed); ``discover`` runs ``--rounds`` times after one warm-up
and the median is reported. Prints one JSON row: command, machine (cores, CPU model, threads,
load average), versions, per-round times, median, and the circuit found (so a timing is never
reported for a wrong answer).

Usage::

    python benchmarks/bench_circuit.py --rounds 5            # default: torch threads as set
    OMP_NUM_THREADS=1 python benchmarks/bench_circuit.py     # a busy 2-core machine
    python benchmarks/bench_circuit.py --analyze             # also time the full analysis once
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, save  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--analyze", action="store_true", help="also time one full analyze() (norm curves, etc.)")
    p.add_argument("--save", default=None, help="also save the row as benchmarks/results/<name>.json")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from sinkhole import load_model
    from sinkhole.pipeline.analyze import analyze
    from sinkhole.circuit import discover

    t0 = time.perf_counter()
    lm = load_model(args.model, progress=False)
    load_s = time.perf_counter() - t0
    torch.manual_seed(0)
    discover(lm)  # warm-up (allocator, kernels)
    times, c = [], None
    for _ in range(args.rounds):
        t = time.perf_counter()
        c = discover(lm)
        times.append(time.perf_counter() - t)
    row = {
        "benchmark": "circuit_discovery",
        "command": "python " + " ".join([Path(__file__).name] + (argv if argv is not None else sys.argv[1:])),
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS",) if k in os.environ},
        "model": args.model,
        "machine": machine(),
        "load_s": round(load_s, 2),
        "discover_s": [round(x, 3) for x in times],
        "discover_median_s": round(median(times), 3),
        "result": {"sink_layers": c.sink_layers, "massive_layer": c.massive_layer,
                   "marking_layers": c.marking_layers, "drift_layer": c.drift_layer,
                   "sink_neurons": [[s["layer"], s["neuron"]] for s in c.sink_neurons]},
    }
    if args.analyze:
        t = time.perf_counter()
        analyze(lm)
        row["analyze_s"] = round(time.perf_counter() - t, 2)
    print(json.dumps(row))
    if args.save:
        save(args.save, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
