"""Moved to :mod:`sinkhole.pipeline` (the engine in ``pipeline.engine``, ``run_scan`` and the other functions bound
to the steps in ``pipeline.registry``). This path is a shim for one release (0.1.x); nothing inside sinkhole uses it."""

import warnings

from .pipeline.engine import PARTIAL, Context, ScanInterrupted, ScanOptions, Step, document, find_circuit, pipeline
from .pipeline.registry import load_document, load_steps, run_scan, selected_steps, step_types

warnings.warn("sinkhole.scan moved to sinkhole.pipeline (engine, registry); import it from there", DeprecationWarning,
              stacklevel=2)
__all__ = ["PARTIAL", "Context", "ScanInterrupted", "ScanOptions", "Step", "document", "find_circuit", "pipeline",
           "load_document", "load_steps", "run_scan", "selected_steps", "step_types"]
