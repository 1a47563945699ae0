"""Shared by the report tests (a helper module, not a test file): one full quick scan of a tiny
random model, rendered once."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

TINY_OPTIONS = {"seed": 0, "quick": True, "patch": True, "words": ["the", "poem"],
                "curve_reps": 40}


@functools.lru_cache(maxsize=1)
def tiny_scan() -> tuple[dict, Path, tuple]:
    """(results document, folder with report.html + figures/, rendered figures) of a full quick scan
    (with --patch, so every section has data) of a tiny random Llama."""
    from sinkhole.report.html import write_report, render
    from sinkhole.results import write_json
    from sinkhole.pipeline.registry import run_scan
    from tiny import tiny_lm

    out = Path(tempfile.mkdtemp(prefix="sinkhole-tiny-report-"))
    doc = run_scan(tiny_lm("llama", n_layers=3), TINY_OPTIONS, out, log=lambda m: None)["doc"]
    write_json(out / "results.json", doc)
    write_report(doc, out)
    _, figs = render(doc)
    return doc, out, tuple(figs)
