"""docs/results-schema.md cannot drift from the code: each step's field table names exactly the
fields of the step's result dataclass, and the options table names exactly ScanOptions' fields."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from sinkhole.pipeline.engine import ScanOptions
from sinkhole.pipeline.registry import PIPELINE

DOC = Path(__file__).resolve().parents[1] / "docs" / "results-schema.md"


def _section(text: str, heading: str) -> str:
    m = re.search(rf"^#+ `{re.escape(heading)}`.*?$(.*?)(?=^#+ |\Z)", text, re.M | re.S)
    assert m, f"docs/results-schema.md has no section for `{heading}`"
    return m.group(1)


def _keys(section: str) -> set[str]:
    """Backticked names in the first column of the section's table rows (``a[]`` -> ``a``; rows
    of nested keys, written ``…curves[].word``, are skipped)."""
    keys = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        for name in re.findall(r"`([^`]+)`", first):
            if not name.startswith("…"):
                keys.add(name.rstrip("[]"))
    return keys


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("step", [s for s in PIPELINE], ids=lambda s: s.name)
def test_every_step_table_matches_its_dataclass(step):
    text = DOC.read_text(encoding="utf-8")
    assert _keys(_section(text, step.name)) == _fields(step.result), step.name


def test_options_table_matches_scan_options():
    assert _keys(_section(DOC.read_text(encoding="utf-8"), "options")) == _fields(ScanOptions)


def test_step_names_are_unique_and_typed():
    steps = PIPELINE
    assert len({s.name for s in steps}) == len(steps)
    from sinkhole.results import StepResult

    assert all(issubclass(s.result, StepResult) for s in steps)
    from sinkhole.pipeline.engine import Step, pipeline

    with pytest.raises(ValueError, match="duplicate scan step"):
        pipeline([steps[0], Step(steps[0].name, steps[0].fn, "again", steps[0].result)])
    from sinkhole.report.layout import SECTIONS, ordered

    with pytest.raises(ValueError, match="duplicate report section"):
        ordered(list(SECTIONS) + [SECTIONS[0]])
