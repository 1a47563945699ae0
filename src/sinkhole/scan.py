"""``sinkhole scan``: the whole pipeline as a list of named steps.

Each step takes the shared :class:`Context` and returns a JSON-ready dict stored under its
name in ``results.json``. Finished steps are checkpointed to ``DIR/.partial.json`` after each
step, so an interrupted scan continues with ``--resume``. Timings go to ``DIR/timings.json``
(not ``results.json``), so the same command and seed give a byte-identical ``results.json``.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__
from .results import SCHEMA_VERSION, _clean, write_json

PARTIAL = ".partial.json"


@dataclass
class Context:
    lm: Any
    options: dict
    results: dict = field(default_factory=dict)
    out: Path | None = None

    def get(self, step: str, key: str | None = None, default=None):
        r = self.results.get(step)
        if r is None:
            return default
        return r if key is None else r.get(key, default)


@dataclass
class Step:
    name: str
    fn: Callable[[Context], dict]
    title: str = ""
    only_with: str | None = None  # option that must be true for the step to run (e.g. "patch")


STEPS: list[Step] = []

# Modules that register steps, in pipeline order. Each appends to STEPS via @step.
STEP_MODULES = [
    "sinkhole.scan_steps",
]


def step(name: str, title: str = "", only_with: str | None = None):
    def deco(fn):
        STEPS[:] = [s for s in STEPS if s.name != name]
        STEPS.append(Step(name, fn, title or name, only_with))
        return fn

    return deco


def load_steps() -> list[Step]:
    for mod in STEP_MODULES:
        importlib.import_module(mod)
    return list(STEPS)


def main_sink_layer(ctx: Context) -> int:
    """The sink layer later steps should look at: the circuit's answer when it ran, else the
    first layer where the first token's norm is at least 5x the typical norm, else the layer
    of the largest ratio."""
    layer = ctx.get("circuit", "main_sink_layer")
    if layer is not None:
        return int(layer)
    ratio = ctx.get("layer_norms", "ratio") or []
    for i, r in enumerate(ratio):
        if r is not None and r >= 5.0:
            return i
    return int(max(range(len(ratio)), key=lambda i: ratio[i] or 0)) if ratio else 1


def run_scan(lm, options: dict, out: Path, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    steps = [s for s in load_steps() if not s.only_with or options.get(s.only_with)]
    partial_path = out / PARTIAL
    results: dict = {}
    timings: dict = {}
    if resume and partial_path.exists():
        saved = json.loads(partial_path.read_text())
        if saved.get("options") == _clean(options) and saved.get("model") == lm.name:
            results, timings = saved["results"], saved.get("timings", {})
            log(f"resuming: {len(results)} finished step(s) kept ({', '.join(results)})")
        else:
            log("--resume: the saved partial scan used other options or another model; starting over")
    ctx = Context(lm=lm, options=options, results=results, out=out)
    for s in steps:
        if s.name in results:
            continue
        torch.manual_seed(int(options.get("seed", 0)))
        t0 = time.perf_counter()
        log(f"[{s.name}] {s.title} ...")
        results[s.name] = _clean(s.fn(ctx))
        timings[s.name] = round(time.perf_counter() - t0, 2)
        log(f"[{s.name}] done in {timings[s.name]:.1f}s")
        write_json(partial_path, {"model": lm.name, "options": _clean(options), "results": results,
                                  "timings": timings})
    doc = {
        "schema_version": SCHEMA_VERSION,
        "sinkhole_version": __version__,
        "model": results.get("model", {}),
        "options": _clean(options),
        "steps": [s.name for s in steps],
        "results": {k: v for k, v in results.items() if k != "model"},
    }
    return {"doc": doc, "timings": timings}
