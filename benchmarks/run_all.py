"""Run every benchmark in sequence, side by side on one machine, and write a summary.

Order: matmul peak, core (norm curve + position-0 attention mass, all contenders interleaved),
the norm curve alone, the 4,000-token memory run, model load, vocabulary sweep, circuit
discovery, the predictor against generation (80 cases) and the exact check / cascade on the same
cases, the sinkhole path in bfloat16 against float32, and the matmul peak again (the load drifts
on a shared machine; both peaks are kept). Results: benchmarks/results/*.json and summary.md.
The predictor's case set comes from studies/experimental/study_predictor.py. Not in it (separate
commands in docs/benchmarks.md): the other benchmarks and every study.

Usage::

    python benchmarks/run_all.py --threads 1 --tl-python TLVENV/bin/python
    SINKHOLE_BENCH_RESULTS=QUICK_DIR python benchmarks/run_all.py --quick   # small sizes
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import RESULTS_DIR, machine, parser, report, save  # noqa: E402


def sh(argv: list[str], log, env=None) -> int:
    t = time.time()
    print("$ " + " ".join(argv), file=sys.stderr, flush=True)
    rc = subprocess.call(argv, env=env)
    log.append({"argv": argv, "rc": rc, "seconds": round(time.time() - t, 1)})
    return rc


def main(argv=None):
    p = parser(__doc__, model=None, save=False)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tl-python", default=None)
    p.add_argument("--reps", type=int, default=2000)
    p.add_argument("--memory-reps", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip", default="", help="comma list of: core,curve,memory,load,sweep,circuit,predictor,bf16")
    args = p.parse_args(argv)
    py = sys.executable
    th = ["--threads", str(args.threads)]
    skip = set(args.skip.split(","))
    if args.quick:
        args.reps, args.memory_reps, args.rounds = 100, 200, 1
    log: list = []
    sh([py, str(HERE / "bench_peak.py"), *th, "--name", "peak_before"], log)
    if "core" not in skip:
        cmd = [py, str(HERE / "bench_core.py"), "--reps", str(args.reps), "--rounds", str(args.rounds),
               "--repeats", "2", *th]
        if args.tl_python:
            cmd += ["--tl-python", args.tl_python]
        else:
            cmd += ["--contenders", "sinkhole,sinkhole_pattern,hf"]
        sh(cmd, log)
    if "curve" not in skip:
        sh([py, str(HERE / "bench_core.py"), "--reps", str(args.reps), "--rounds", str(args.rounds), "--repeats", "2",
            "--contenders", "sinkhole_curve,hf_hidden,hf", "--baseline", "sinkhole_curve",
            "--name", f"curve_{args.reps}", *th], log)
    if "memory" not in skip:
        sh([py, str(HERE / "bench_core.py"), "--reps", str(args.memory_reps), "--rounds", "1", "--repeats", "1",
            "--contenders", "sinkhole", "--name", f"memory_{args.memory_reps}", *th], log)
    if "load" not in skip:
        sh([py, str(HERE / "bench_load.py"), "--rounds", "1" if args.quick else "3",
            "--first-rounds", "1" if args.quick else "2", *th], log)
    if "sweep" not in skip:
        sh([py, str(HERE / "bench_sweep.py"), *th] + (["--sample", "16", "--batch", "8", "--n-reps", "32", "--rounds", "1"] if args.quick else []),
           log)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads)) if args.threads else None
    if "circuit" not in skip:
        sh([py, str(HERE / "bench_circuit.py"), "--save", "circuit", "--rounds", "1" if args.quick else "3"], log, env=env)
    if "predictor" not in skip:  # the 80-case set of docs/benchmarks.md section 4, then the exact check on it
        pred = str(RESULTS_DIR / "predictor_48_large.json")
        sh([py, str(HERE.parent / "studies" / "experimental" / "study_predictor.py"), "--templates", "repeat", "--out", pred,
            *(["--reps", "30,100", "--max-new-tokens", "16", "--words-per-split", "2"] if args.quick else
              ["--reps", "30,100,200,400", "--max-new-tokens", "48", "--words-per-split", "10"])], log, env=env)
        sh([py, str(HERE / "bench_greedy_check.py"), pred,
            "--save", "predictor_exact_check", "--peak", str(RESULTS_DIR / "peak_before.json"),
            *(["--subset", "4", "--rounds", "1"] if args.quick else [])], log, env=env)
    if "bf16" not in skip:
        sh([py, str(HERE / "bench_core.py"), "--reps", str(args.reps), "--rounds", str(args.rounds), "--repeats", "2",
            "--contenders", "sinkhole,sinkhole_bf16", "--name", f"bf16_{args.reps}", *th], log)
    sh([py, str(HERE / "bench_peak.py"), *th, "--name", "peak_after"], log)
    path = save("run_all", {"machine": machine(), "steps": log, "args": vars(args)})
    from summarize import summarize

    md = summarize(RESULTS_DIR)
    (RESULTS_DIR / "summary.md").write_text(md)
    print(md)
    report(path, {"steps": len(log), "failed": sum(s["rc"] != 0 for s in log)})
    failed = [s for s in log if s["rc"] != 0]
    if failed:
        print(json.dumps(failed, indent=1), file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
