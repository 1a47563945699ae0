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

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, parser, report, save, smoke_model, smoke_out  # noqa: E402

SMOKE = True


def main(argv=None) -> int:
    p = parser(__doc__, smoke=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--analyze", action="store_true", help="also time one full analyze() (norm curves, etc.)")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.rounds = smoke_model(), 1
        smoke_out(args, "circuit")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from sinkhole import load_model
    from sinkhole.circuit import discover
    from sinkhole.pipeline.analyze import analyze

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
    report(save(args, row), {"discover_median_s": row["discover_median_s"], "sink_layers": c.sink_layers})
    return 0


if __name__ == "__main__":
    sys.exit(main())
