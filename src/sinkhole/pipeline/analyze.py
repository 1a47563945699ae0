"""Every analysis of the paper's sections 3-4 in one call, through the pipeline."""

from __future__ import annotations

from .engine import ScanOptions
from .registry import CIRCUIT_STEPS, run_scan


def analyze(lm, **options) -> dict:
    """``discover`` plus every analysis of the paper's sections 3-4: the steps of ``sinkhole
    circuit`` (``registry.CIRCUIT_STEPS``) run through the scan pipeline with ``options``
    (fields of :class:`sinkhole.pipeline.engine.ScanOptions`); returns ``{step name: typed result}``."""
    res = run_scan(lm, ScanOptions(**options), steps=CIRCUIT_STEPS, log=lambda m: None, command="circuit")
    errors = res["doc"].get("errors")
    if errors:
        name, msg = next(iter(errors.items()))
        raise RuntimeError(f"circuit step {name} failed: {msg}")
    return res["results"]
