"""The path of the model through the broad verification, counted from the calls themselves.

Runs ``verify_broad`` on a tiny random Llama (a gate-only patch beside the input-side collapse, every
family, both text sources, short settings) under ``sys.setprofile`` and counts the distinct call edges (caller function ->
callee function) that cross from one sinkhole module into another, so loops do not inflate them:

* ``module changes``: every such edge;
* ``climbs up a layer``: edges from a module into one of a higher layer (docs/architecture.md's order;
  a callback handed down, e.g. a hooks factory, counts here too);
* ``re-entries``: edges into a module already on the stack below the caller (A -> B -> A);
* ``entries of`` the verification's own module (``patch/verify.py``).

Usage: ``python benchmarks/trace_broad_path.py [--verbose] [--out counts.json]`` (about 20 s on the
2-core CPU). docs/architecture.md's before/after numbers were made with it (the version of the script
from before the layered move found ``verify_broad`` at its old path as well).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import parser, report, save, smoke_out  # noqa: E402

SMOKE = True  # the script itself runs on a tiny model: --smoke only sends its counts to a temporary file

# the layer of each module (the order of docs/architecture.md)
LAYERS = [
    ("ground", ["errors", "progress", "version", "results", "data"]),
    ("models", ["models"]),
    ("capture", ["capture", "attn_first"]),
    ("decoding", ["decoding"]),
    ("circuit", ["circuit"]),
    ("evaluate", ["evaluate"]),
    ("attack", ["attack"]),
    ("patch", ["patch"]),
    ("experimental", ["experimental"]),
    ("integrations", ["integrations"]),
    ("pipeline", ["pipeline"]),
    ("report", ["report"]),
    ("cli", ["cli"]),
]


def layer(module: str) -> int:
    name = module[len("sinkhole."):] if module.startswith("sinkhole.") else module
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


def main(argv=None) -> int:
    ap = parser(__doc__, model=None, smoke=True)
    ap.add_argument("--json", action="store_true", help="print the counts as one JSON line")
    ap.add_argument("--verbose", action="store_true", help="list the climbs and re-entries")
    args = ap.parse_args(argv)
    if args.smoke:
        smoke_out(args, "trace_broad_path")
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_lm

    from sinkhole.decoding.gate import RunGate
    from sinkhole.patch.core import Patch
    from sinkhole.patch.verify import verify_broad

    own = "sinkhole.patch.verify"

    torch.manual_seed(0)
    lm = tiny_lm("llama", n_layers=3)
    patch = Patch(gate=RunGate())
    edges: dict[str, set] = {"module changes": set(), "climbs up a layer": set(), "re-entries": set(),
                             "entries of " + own: set()}
    stack: list = []

    def prof(frame, event, arg):
        if event not in ("call", "return"):
            return
        mod = frame.f_globals.get("__name__", "")
        if event == "return":
            if stack and frame.f_code is not None and stack[-1][1] is frame:
                stack.pop()
            return
        if not mod.startswith("sinkhole"):
            return
        caller = stack[-1] if stack else None
        if caller is not None and caller[0] != mod:
            edge = (caller[0], caller[1].f_code.co_name, mod, frame.f_code.co_name)
            edges["module changes"].add(edge)
            if layer(mod) > layer(caller[0]):
                edges["climbs up a layer"].add(edge)
            if mod in {m for m, _ in stack[:-1]}:
                edges["re-entries"].add(edge)
            if mod == own:
                edges["entries of " + own].add(edge)
        stack.append((mod, frame))

    sys.setprofile(prof)
    try:
        verify_broad(lm, patch, baselines={"collapse": "collapse"}, reps=(100, 400), sources=("twelfth_night", "generated"),
                     windows=(64,), total=256, log=lambda m: None, quiet=True)
    finally:
        sys.setprofile(None)
    counts = {k: len(v) for k, v in edges.items()}
    if args.verbose:
        for k in ("climbs up a layer", "re-entries"):
            for e in sorted(edges[k]):
                print(f"  {k}: {e[0]}.{e[1]} -> {e[2]}.{e[3]}")
    if args.json:
        print(json.dumps(counts))
    else:
        for k, v in counts.items():
            print(f"{k}: {v}")
    if args.out or args.save:
        report(save(args, {"counts": counts}), counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
