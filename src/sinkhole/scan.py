"""``sinkhole scan``: the whole pipeline as a list of named steps.

Each step takes the shared :class:`Context` and returns a JSON-ready dict stored under its
name in ``results.json``. Finished steps are checkpointed to ``DIR/.partial.json`` after each
step, so an interrupted scan (Ctrl-C, a crash, a killed job) continues with ``--resume``.
Timings go to ``DIR/timings.json`` (not ``results.json``), so the same command and seed give a
byte-identical ``results.json``.

Writing a step (in a module listed in ``STEP_MODULES``)::

    @step("divergence", "divergence by generation")
    def _divergence(ctx: Context) -> dict:
        n = 4 if ctx.options["quick"] else 24           # honor --quick (CI and tests use it)
        for case in ctx.progress(cases, desc="divergence"):   # a bar with ETA
            ...
        return {...}                                     # JSON-ready, deterministic

A step that raises (other than Ctrl-C) is recorded in ``results.json`` under ``errors`` and the
scan goes on with the next step; ``SINKHOLE_DEBUG=1`` makes it raise instead.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__
from .errors import SinkholeError
from .progress import progress as _progress
from .results import SCHEMA_VERSION, _clean, write_json

PARTIAL = ".partial.json"

# Options every step can rely on (the CLI fills them; run_scan fills missing ones with these).
DEFAULT_OPTIONS: dict = {
    "seed": 0,
    "quick": False,  # a small, fast scan (CI, tests, a first look): steps use fewer cases / shorter runs
    "patch": False,  # also run the patch steps (only_with="patch")
}


class ScanInterrupted(KeyboardInterrupt):
    """Ctrl-C during a scan: ``step`` was running, ``done`` steps are saved in ``partial``."""

    def __init__(self, step: str, done: list[str], partial: Path):
        super().__init__(step)
        self.step, self.done, self.partial = step, done, partial


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

    @property
    def quick(self) -> bool:
        return bool(self.options.get("quick"))

    @staticmethod
    def progress(iterable=None, desc: str = "", total: int | None = None, **kw):
        """A progress bar with ETA on stderr (silenced by --quiet)."""
        return _progress(iterable, desc=desc, total=total, **kw)


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
    "sinkhole.circuit.steps",
    "sinkhole.attack.steps",
    "sinkhole.patch.steps",
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


def selected_steps(options: dict) -> list[Step]:
    return [s for s in load_steps() if not s.only_with or options.get(s.only_with)]


def main_sink_layer(ctx: Context) -> int:
    """The sink layer later steps should look at: the circuit's answer when it ran, else the
    first layer where the first token's norm is at least 5x the typical norm, else the layer
    of the largest ratio."""
    layer = ctx.get("circuit", "main_sink_layer")
    if layer is not None:
        return int(layer)
    from .circuit.common import first_layer_over

    return first_layer_over(ctx.get("layer_norms", "ratio") or [])


def _resume_key(options: dict) -> dict:
    """Options that must match for finished steps to be reused: all but the on/off switches of
    optional steps (adding --patch to a finished scan reuses everything and runs the patch)."""
    gates = {s.only_with for s in STEPS if s.only_with}
    return {k: v for k, v in _clean(options).items() if k not in gates}


def _saved_state(out: Path, lm, options: dict, log) -> tuple[dict, dict]:
    """Finished results and timings of an earlier scan in ``out`` with the same model and options:
    from the checkpoint of an interrupted scan, else from a finished scan's results.json."""
    key = _resume_key(options)
    partial = out / PARTIAL
    if partial.exists():
        try:
            saved = json.loads(partial.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log(f"--resume: {partial} is unreadable; starting over")
            return {}, {}
        if saved.get("model") == lm.name and _resume_key(saved.get("options", {})) == key:
            return dict(saved.get("results", {})), dict(saved.get("timings", {}))
        log("--resume: the interrupted scan in this folder used another model or other options; starting over")
        return {}, {}
    final = out / "results.json"
    if final.exists():
        try:
            doc = json.loads(final.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}, {}
        if (doc.get("schema_version") == SCHEMA_VERSION and doc.get("model", {}).get("name") == lm.name
                and _resume_key(doc.get("options", {})) == key):
            results = {"model": doc["model"], **doc.get("results", {})}
            timings = {}
            try:
                timings = json.loads((out / "timings.json").read_text(encoding="utf-8")).get("steps", {})
            except (OSError, ValueError):
                pass
            return results, {k: v for k, v in timings.items() if k in results}
        log("--resume: the scan in this folder used another model or other options; starting over")
    return {}, {}


def _fmt_s(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


def run_scan(lm, options: dict, out: Path, resume: bool = False, log: Callable[[str], None] = print) -> dict:
    """Run every selected step; returns ``{"doc": results document, "timings": {step: seconds}}``.

    Ctrl-C (KeyboardInterrupt) propagates after the finished steps are checkpointed; rerun with
    ``resume=True`` to continue.
    """
    options = {**DEFAULT_OPTIONS, **options}
    steps = selected_steps(options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    partial_path = out / PARTIAL
    results, timings = _saved_state(out, lm, options, log) if resume else ({}, {})
    results = {k: v for k, v in results.items() if k in {s.name for s in steps}}
    if results:
        log(f"resuming: {len(results)} finished step(s) kept ({', '.join(results)})")
    errors: dict = {}
    ctx = Context(lm=lm, options=options, results=results, out=out)
    todo = [s for s in steps if s.name not in results]
    t_scan = time.perf_counter()
    for i, s in enumerate(todo, 1):
        torch.manual_seed(int(options.get("seed", 0)))
        t0 = time.perf_counter()
        log(f"[{i}/{len(todo)}] {s.name}: {s.title} ...")
        try:
            value = s.fn(ctx)
        except KeyboardInterrupt:
            raise ScanInterrupted(s.name, list(results), partial_path) from None
        except SinkholeError:
            raise
        except Exception as err:  # one broken step must not lose a long scan
            if os.environ.get("SINKHOLE_DEBUG"):
                raise
            msg = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            errors[s.name] = msg
            log(f"[{i}/{len(todo)}] {s.name} FAILED after {_fmt_s(time.perf_counter() - t0)}: {msg} "
                "(set SINKHOLE_DEBUG=1 for a traceback)")
            continue
        results[s.name] = _clean(value)
        timings[s.name] = round(time.perf_counter() - t0, 2)
        log(f"[{i}/{len(todo)}] {s.name} done in {_fmt_s(timings[s.name])} "
            f"(scan so far {_fmt_s(time.perf_counter() - t_scan)})")
        write_json(partial_path, {"model": lm.name, "options": _clean(options), "results": results,
                                  "timings": timings})
    doc = {
        "schema_version": SCHEMA_VERSION,
        "sinkhole_version": __version__,
        "model": results.get("model", {}),
        "options": _clean(options),
        "steps": [s.name for s in steps],
        "results": {s.name: results[s.name] for s in steps if s.name in results and s.name != "model"},
    }
    if errors:
        doc["errors"] = errors
    return {"doc": doc, "timings": {s.name: timings[s.name] for s in steps if s.name in timings}}
