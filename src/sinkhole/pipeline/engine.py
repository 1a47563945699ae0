"""The pipeline engine: runs an ordered list of named steps it is handed.

The list is ``sinkhole.pipeline.registry.PIPELINE`` (the one place that names the steps and their
order); the registry hands it to these functions. Each step takes the shared :class:`Context` and returns a typed result (a dataclass with
``to_dict``/``from_dict``, :class:`sinkhole.results.StepResult`) stored under its name in
``results.json``. Finished steps are checkpointed to ``DIR/.partial.json`` after each step, so an
interrupted scan (Ctrl-C, a crash, a killed job) continues with ``--resume``. Timings go to
``DIR/timings.json`` (not ``results.json``), so the same command and seed give a byte-identical
``results.json``.

Writing a step: the analysis in the module of its area, a few lines of adapter ``fn(ctx) -> StepResult``
in ``pipeline/steps_*.py``, and one ``Step(name, fn, title, ResultType)`` line in ``registry.PIPELINE``; options it needs are fields
of :class:`ScanOptions` (with a quick value where ``--quick`` differs). A step that raises (other
than Ctrl-C or a user error) is recorded in ``results.json`` under ``errors`` and the scan goes
on with the next step; ``SINKHOLE_DEBUG=1`` makes it raise instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..circuit.circuit import discover
from ..errors import SinkholeError
from ..progress import progress as _progress
from ..results import SCHEMA_VERSION, StepResult, check_unique, clean, write_json
from ..version import __version__

PARTIAL = ".partial.json"


def _opt(default, help: str, kind: str, quick=None, full=None):
    """A ScanOptions field: ``kind`` says how its flag parses (int, float, ints, words, families,
    bool, layer, layers); ``quick``/``full`` are the values a ``None`` default takes with and without --quick."""
    return field(default=default, metadata={"help": help, "kind": kind, "quick": quick, "full": full})


@dataclass
class ScanOptions(StepResult):
    """Every option of a scan, with its default and its --quick value (one flag each; also
    settable from a JSON file with ``sinkhole scan --config FILE``)."""

    seed: int = _opt(0, "random seed", "int")
    quick: bool = _opt(False, "a small, fast scan (fewer cases, shorter runs): a first look, tests, CI", "bool")
    patch: bool = _opt(False, "also search, verify and export a patch", "bool")
    words: list = _opt(None, "words for norm curves, convergence, attention and divergence", "words",
                       ["the", "poem"], ["the", "poem"])
    curve_reps: int = _opt(None, "repetitions for the norm curves and sink-neuron firing", "int", 300, 1000)
    conv_reps: int = _opt(None, "repetitions for layer-0 convergence (default: curve reps, at most 500)", "int")
    attn_reps: list = _opt(None, "repetition counts for the attention-sink metrics (at most curve reps)", "ints",
                           [16, 64], [16, 64, 256])
    frac: float = _opt(0.5, "'repeats needed' threshold as a fraction of the first-token norm", "float")
    top_k: int = _opt(8, "candidate neurons per sink layer before ablation", "int")
    firing: bool = _opt(True, "circuit step: measure whether the sink neurons fire on long repetitions", "bool")
    drift_layer: int = _opt(None, "override the circuit's drift layer (sweep and cluster steps)", "layer")
    massive_layer: int = _opt(None, "override the circuit's massive layer (norm curves, paper patch)", "layer")
    marking_layers: list = _opt(None, "override the circuit's marking layers (patch caps and fine-tune)", "layers")
    diverge_reps: list = _opt(None, "repetition counts of the divergence step", "ints", [200], [100, 400])
    diverge_tokens: int = _opt(None, "tokens generated per divergence case", "int", 12, 16)
    explain: bool = _opt(True, "divergence step: say per case whether the sink did it (the circuit's readings, and a "
                         "causal test for every diverged case)", "bool")
    min_reps_words: int = _opt(None, "words (the first of --words, then frequent one-token words) whose minimum "
                               "repetitions to diverge the min_reps step searches", "int", 2, 4)
    min_reps_max: int = _opt(None, "largest repetition count the min_reps step tries", "int", 512, 2048)
    sweep_tokens: int = _opt(None, "most frequent tokens the sweep step measures", "int", 48, 128)
    sweep_reps: int = _opt(None, "repetitions per token in the sweep step", "int", 128, 256)
    cluster_length: int = _opt(None, "sequence length of the cluster step", "int", 128, 256)
    patch_words: list = _opt(None, "search words of the patch step (default: the patch command's)", "words")
    patch_families: list = _opt(None, "candidate families of the patch step (default: the patch command's)",
                                "families")

    def resolved(self) -> "ScanOptions":
        """A copy where every ``None`` takes its --quick or full value."""
        vals = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None:
                v = f.metadata.get("quick" if self.quick else "full")
            vals[f.name] = list(v) if isinstance(v, (list, tuple)) else v
        if vals["conv_reps"] is None:
            vals["conv_reps"] = min(500, vals["curve_reps"])
        vals["attn_reps"] = [n for n in vals["attn_reps"] if n <= vals["curve_reps"]] or [min(16, vals["curve_reps"])]
        return ScanOptions(**vals)


class ScanInterrupted(KeyboardInterrupt):
    """Ctrl-C during a scan: ``step`` was running, ``done`` steps are saved in ``partial``."""

    def __init__(self, step: str, done: list[str], partial: Path):
        super().__init__(step)
        self.step, self.done, self.partial = step, done, partial


@dataclass
class Context:
    lm: Any
    options: ScanOptions
    results: dict = field(default_factory=dict)  # step name -> typed result
    out: Path | None = None
    _circuit: Any = None

    @property
    def quick(self) -> bool:
        return bool(self.options.quick)

    @property
    def circuit(self):
        """The model's circuit: the ``circuit`` step's result when it ran, else found once here."""
        if "circuit" in self.results:
            return self.results["circuit"]
        if self._circuit is None:
            self._circuit = find_circuit(self.lm, self.options)
        return self._circuit

    @staticmethod
    def progress(iterable=None, desc: str = "", total: int | None = None, **kw):
        """A progress bar with ETA on stderr (silenced by --quiet)."""
        return _progress(iterable, desc=desc, total=total, **kw)


def find_circuit(lm, options: ScanOptions):
    """The model's circuit with the roles the options override (``None`` keeps the circuit's)."""
    return discover(lm, k=options.top_k).with_roles(
        lm.adapter.n_layers, drift_layer=options.drift_layer, massive_layer=options.massive_layer,
        marking_layers=options.marking_layers)


@dataclass(frozen=True)
class Step:
    name: str
    fn: Callable[[Context], StepResult]
    title: str
    result: type  # the StepResult subclass the step returns (the report loads it with from_dict)
    only_with: str | None = None  # option that must be true for the step to run (e.g. "patch")


def pipeline(steps: list[Step]) -> tuple[Step, ...]:
    """An ordered, checked list of steps: a duplicate name is an error."""
    check_unique((s.name for s in steps), "scan step")
    return tuple(steps)


def step_types(steps: Sequence[Step]) -> dict[str, type]:
    """Step name -> result type, for loading a results document."""
    return {s.name: s.result for s in steps}


def selected_steps(steps: Sequence[Step], options: ScanOptions | dict, names: list[str] | None = None) -> list[Step]:
    if isinstance(options, dict):
        options = ScanOptions.from_dict(options)
    return [s for s in steps if (names is None or s.name in names)
            and (not s.only_with or getattr(options, s.only_with))]


def _resume_key(steps: Sequence[Step], options: dict) -> dict:
    """Options that must match for finished steps to be reused: all but the on/off switches of
    optional steps (adding --patch to a finished scan reuses everything and runs the patch)."""
    gates = {s.only_with for s in steps if s.only_with}
    return {k: v for k, v in clean(options).items() if k not in gates}


def _typed(steps: Sequence[Step], saved: dict, log) -> dict:
    """Saved step results (JSON) as typed results; a step whose saved shape no longer loads is
    run again."""
    types, out = step_types(steps), {}
    for name, value in saved.items():
        if name not in types:
            continue
        try:
            out[name] = types[name].from_dict(value)
        except SinkholeError as err:
            log(f"--resume: the saved '{name}' result does not load ({err}); running it again")
    return out


def _saved_state(steps: Sequence[Step], out: Path, lm, options: dict, log) -> tuple[dict, dict]:
    """Finished results and timings of an earlier scan in ``out`` with the same model and options:
    from the checkpoint of an interrupted scan, else from a finished scan's results.json."""
    key = _resume_key(steps, options)
    partial = out / PARTIAL
    if partial.exists():
        try:
            saved = json.loads(partial.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log(f"--resume: {partial} is unreadable; starting over")
            return {}, {}
        if (isinstance(saved, dict) and saved.get("schema_version") == SCHEMA_VERSION
                and saved.get("model") == lm.name and _resume_key(steps, saved.get("options", {})) == key):
            return _typed(steps, dict(saved.get("results", {})), log), dict(saved.get("timings", {}))
        log("--resume: the interrupted scan in this folder used another model, other options or another "
            "sinkhole version; starting over")
        return {}, {}
    final = out / "results.json"
    if final.exists():
        try:
            doc = json.loads(final.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}, {}
        if (isinstance(doc, dict) and doc.get("schema_version") == SCHEMA_VERSION
                and doc.get("model", {}).get("name") == lm.name and _resume_key(steps, doc.get("options", {})) == key):
            results = _typed(steps, {"model": doc["model"], **doc.get("results", {})}, log)
            timings = {}
            try:
                timings = json.loads((out / "timings.json").read_text(encoding="utf-8")).get("steps", {})
            except (OSError, ValueError, AttributeError):
                pass
            return results, {k: v for k, v in timings.items() if k in results}
        log("--resume: the scan in this folder used another model or other options; starting over")
    return {}, {}


def _fmt_s(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


def run_scan(pipeline: Sequence[Step], lm, options: ScanOptions, out: Path | None = None, resume: bool = False,
             log: Callable[[str], None] = print, steps: list[str] | None = None, command: str = "scan") -> dict:
    """Run the selected steps of ``pipeline`` (all, or those named in ``steps``) in pipeline order;
    returns ``{"doc": results document, "timings": {step: seconds}, "results": {step: typed result}}``.

    With ``out`` the finished steps are checkpointed there after each step (``resume=True``
    continues an interrupted run); Ctrl-C (KeyboardInterrupt) propagates after that.
    """
    if isinstance(options, dict):
        options = ScanOptions.from_dict(options)
    options = options.resolved()
    opts = options.to_dict()
    chosen = selected_steps(pipeline, options, steps)
    partial_path = None
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        partial_path = out / PARTIAL
    results, timings = _saved_state(pipeline, out, lm, opts, log) if (resume and out is not None) else ({}, {})
    results = {k: v for k, v in results.items() if k in {s.name for s in chosen}}
    if results:
        log(f"resuming: {len(results)} finished step(s) kept ({', '.join(results)})")
    errors: dict = {}
    ctx = Context(lm=lm, options=options, results=results, out=out)
    todo = [s for s in chosen if s.name not in results]
    t_scan = time.perf_counter()
    for i, s in enumerate(todo, 1):
        torch.manual_seed(int(options.seed))
        t0 = time.perf_counter()
        log(f"[{i}/{len(todo)}] {s.name}: {s.title} ...")
        try:
            value = s.fn(ctx)
            if not isinstance(value, s.result):
                raise TypeError(f"step {s.name} returned {type(value).__name__}, not {s.result.__name__}")
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
        results[s.name] = value
        timings[s.name] = round(time.perf_counter() - t0, 2)
        log(f"[{i}/{len(todo)}] {s.name} done in {_fmt_s(timings[s.name])} "
            f"(scan so far {_fmt_s(time.perf_counter() - t_scan)})" + (f": {value.log_line()}" if value.log_line() else ""))
        if partial_path is not None:
            write_json(partial_path, {"schema_version": SCHEMA_VERSION, "model": lm.name, "options": opts,
                                      "results": results, "timings": timings})
    doc = document(results.get("model") or {"name": lm.name},
                   {s.name: results[s.name] for s in chosen if s.name in results}, command, opts,
                   steps=[s.name for s in chosen], errors=errors)
    return {"doc": doc, "timings": {s.name: timings[s.name] for s in chosen if s.name in timings},
            "results": results}


def document(model, results: dict, command: str, options: dict | None = None, steps: list | None = None,
             errors: dict | None = None) -> dict:
    """A results document (``results.json``; the ``--json`` of every analysis command): the model,
    the options and each step's result under its step name. ``sinkhole report`` renders any of them."""
    doc = {
        "schema_version": SCHEMA_VERSION,
        "sinkhole_version": __version__,
        "command": command,
        "model": clean(model),
        "options": clean(options or {}),
        "steps": list(steps) if steps is not None else [k for k in results if k != "model"],
        "results": {k: clean(v) for k, v in results.items() if k != "model"},
    }
    if errors:
        doc["errors"] = errors
    return doc


def load_document(steps: Sequence[Step], doc: dict) -> dict:
    """Every step result of a results document as its typed object (``from_dict``): a renamed or
    missing field is a one-line error here, not a silently empty report section."""
    types = step_types(steps)
    out = {}
    for name, value in (doc.get("results") or {}).items():
        if name not in types:
            raise SinkholeError(f"results: unknown step {name!r}; the file was written by another sinkhole "
                                "version: rerun the command that wrote it")
        try:
            out[name] = types[name].from_dict(value)
        except SinkholeError as err:
            raise SinkholeError(f"results: step {name!r}: {err}") from None
    if isinstance(doc.get("model"), dict) and "model" in types and "n_layers" in doc["model"]:
        out["model"] = types["model"].from_dict(doc["model"])
    return out
