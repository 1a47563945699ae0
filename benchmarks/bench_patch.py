"""Benchmark: `sinkhole patch` end to end (search, narrow and broad verification, export), as a user runs it.

Runs the command in a child process on the embedded model and reads the time breakdown that the
command writes into ``DIR/summary.json`` (``timing``: search, verification, of which the broad
verification, export), plus the wall time and peak RSS of the child. Target: at most 5 minutes on the
2-core CPU. ``--command experimental-search`` times ``sinkhole experimental search`` instead, the
patch search over the research candidate families (it writes the same ``summary.json``); ``--args``
passes extra arguments to whichever command runs.

Usage::

    python benchmarks/bench_patch.py --save patch_e2e                                # sinkhole patch (the run gate)
    python benchmarks/bench_patch.py --args "--method paper"                         # the paper's neuron patch
    python benchmarks/bench_patch.py --command experimental-search --args "--families state_gate"
    python benchmarks/bench_patch.py --command experimental-search --args "--families finetune_neurons"
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, parser, report, save  # noqa: E402


COMMANDS = {"patch": ["patch"], "experimental-search": ["experimental", "search"]}
# options only `sinkhole experimental search` takes: given to `sinkhole patch`, the child would fail after start-up
RESEARCH_OPTIONS = {"--families", "--templates", "--finetune-layers", "--steps", "--max-new-tokens", "--ppl-budget",
                    "--neurons", "--gguf", "--gguf-type", "--marking-layers"}


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--command", choices=sorted(COMMANDS), default="patch",
                   help="the command timed: patch (sinkhole patch, default) or experimental-search (sinkhole "
                        "experimental search, the research candidate families)")
    p.add_argument("--args", default="", help="extra arguments for the command, e.g. \"--families state_gate\"")
    args = p.parse_args(argv)
    extra = shlex.split(args.args)
    research = sorted({a.split("=", 1)[0] for a in extra} & RESEARCH_OPTIONS)
    if args.command == "patch" and research:
        p.error(f"{', '.join(research)}: options of 'sinkhole experimental search'; "
                "add --command experimental-search")
    env = dict(os.environ, HF_HUB_OFFLINE="1", SINKHOLE_NO_PROGRESS="1")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "patched"
        cmd = [sys.executable, "-m", "sinkhole", *COMMANDS[args.command], args.model, "--out", str(out),
               "--quiet", *extra]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        err = proc.stderr.read() if proc.stderr else ""
        if os.waitstatus_to_exitcode(status) != 0:
            print(err[-2000:], file=sys.stderr)
            return 1
        summary = json.loads((out / "summary.json").read_text())
    t = summary.get("timing", {})
    v = summary["verification"]
    res = {"machine": machine(), "command": " ".join(cmd[2:]), "wall_s": round(wall, 1),
           "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "timing": t,
           "broad_timing": (v.get("broad") or {}).get("timing"),
           "gate_attacks": ((v.get("broad") or {}).get("settings") or {}).get("gate_attacks"),
           "chosen": (summary.get("search") or {}).get("chosen"), "targets": v.get("targets")}
    print(json.dumps(res, indent=2))
    report(save(args, res), {"wall_s": res["wall_s"], "peak_rss_mib": res["peak_rss_mib"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
