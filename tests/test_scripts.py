"""Every script in benchmarks/ and studies/ imports, answers ``--help``, and, where it declares
``SMOKE = True``, runs end to end on a tiny random model and writes a JSON result (``--smoke --out``).

The scripts are found by glob, so a new one is covered without touching this file (modules whose name
starts with an underscore are shared helpers, not scripts). The smoke runs happen in this process, one
after another, on the tiny model of ``benchmarks/_common.smoke_model`` (made once)."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("SINKHOLE_NO_PROGRESS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in list((ROOT / "benchmarks").glob("*.py")) + list((ROOT / "studies").rglob("*.py"))
                 if not p.name.startswith("_"))


def _id(p: Path) -> str:
    return str(p.relative_to(ROOT))


def load(path: Path):
    name = "script_" + "_".join(path.relative_to(ROOT).with_suffix("").parts)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    argv = sys.argv
    try:
        sys.argv = [str(path)]
        spec.loader.exec_module(mod)
    finally:
        sys.argv = argv
    return mod


def test_scripts_are_found():
    assert len(SCRIPTS) >= 20
    assert any(p.parent.name == "benchmarks" for p in SCRIPTS) and any("studies" in p.parts for p in SCRIPTS)


@pytest.mark.parametrize("path", SCRIPTS, ids=_id)
def test_help(path, capsys):
    mod = load(path)
    assert callable(getattr(mod, "main", None)), f"{_id(path)} has no main(argv=None)"
    with pytest.raises(SystemExit) as e:
        mod.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    if getattr(mod, "SMOKE", False):
        assert "--smoke" in out and "--out" in out


def _smoke_scripts():
    out = []
    for p in SCRIPTS:
        text = p.read_text(encoding="utf-8")
        if "\nSMOKE = True" in text:
            out.append(p)
    return out


@pytest.mark.parametrize("path", _smoke_scripts(), ids=_id)
def test_smoke(path, tmp_path, monkeypatch):
    monkeypatch.setenv("SINKHOLE_CACHE", str(tmp_path / "cache"))
    mod = load(path)
    assert mod.SMOKE is True
    out = tmp_path / "result.json"
    argv = sys.argv
    try:
        sys.argv = [str(path)]
        rc = mod.main(["--smoke", "--out", str(out)])
    finally:
        sys.argv = argv
    assert rc in (None, 0)
    assert out.exists(), f"{_id(path)} --smoke wrote no {out}"
    assert isinstance(json.loads(out.read_text()), dict)


def test_no_absolute_paths_or_machine_paths_in_scripts():
    bad = []
    for p in SCRIPTS + [ROOT / "benchmarks" / "_common.py"]:
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if "/work/" in line or "/home/" in line:
                bad.append(f"{_id(p)}:{i}")
    assert bad == []
