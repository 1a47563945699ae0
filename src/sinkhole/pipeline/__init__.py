"""The pipeline: the engine (handed its steps), the step adapters, the registry (the one ordered list of steps) and
analyze."""

from .analyze import analyze
from .registry import PIPELINE, load_document, run_scan

__all__ = ["PIPELINE", "analyze", "load_document", "run_scan"]
