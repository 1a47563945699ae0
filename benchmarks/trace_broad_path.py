"""The path of the model through the broad verification, counted from the calls themselves.

Runs ``verify_broad`` on a tiny random Llama (a gate-only patch beside the input-side collapse, every
family, both text sources, short settings) under ``sys.setprofile`` and counts the distinct call edges (caller function ->
callee function) that cross from one sinkhole module into another, so loops do not inflate them:

* ``module changes``: every such edge;
* ``climbs up a layer``: edges from a module into one of a higher layer (docs/architecture.md's order;
  a callback handed down, e.g. a hooks factory, counts here too);
* ``re-entries``: edges into a module already on the stack below the caller (A -> B -> A);
* ``entries of`` the verification's own module (``patch/verify.py``; ``patch/broad.py`` before the move).

Usage: ``python benchmarks/trace_broad_path.py [--json]`` (about 20 s). The same script runs on the code
before the layered move (it finds ``verify_broad`` at either path), which is how docs/architecture.md's
before/after numbers were made.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

# the layer of each module, old paths included (the order of docs/architecture.md)
LAYERS = [
    ("ground", ["errors", "progress", "version", "results", "data"]),
    ("models", ["models"]),
    ("capture", ["capture", "attn_first"]),
    ("decoding", ["decoding", "engines", "patch.gate"]),
    ("circuit", ["circuit"]),
    ("evaluate", ["evaluate"]),
    ("attack", ["attack", "memorization"]),
    ("patch", ["patch"]),
    ("integrations", ["integrations", "garak_target", "evaluate.harness", "attack.export"]),
    ("pipeline", ["pipeline", "scan", "scan_steps", "circuit.steps", "attack.steps", "patch.steps"]),
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="list the climbs and re-entries")
    args = ap.parse_args()
    import torch

    from tiny import tiny_lm

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from sinkhole.patch.verify import verify_broad
            own = "sinkhole.patch.verify"
        except ImportError:
            from sinkhole.patch.broad import verify_broad
            own = "sinkhole.patch.broad"
    from sinkhole.patch.core import Patch
    try:
        from sinkhole.decoding.gate import RunGate
    except ImportError:  # before the move
        from sinkhole.patch.gate import RunGate

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
