"""The package's layering, checked on the source: the CLI is an adapter (nothing outside ``cli/``
imports it), no module imports another module's private names, and the benchmarks use only the
library's public names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "sinkhole"


def _imports(path: Path):
    """(module, names) of every import in a file, relative imports resolved to sinkhole.*."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    pkg = ["sinkhole", *path.relative_to(SRC).parent.parts] if path.is_relative_to(SRC) else []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[:len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, []


def test_nothing_outside_cli_imports_cli():
    library = [p for p in SRC.rglob("*.py") if "cli" not in p.relative_to(SRC).parts and p.name != "__main__.py"]
    bad = [(str(p.relative_to(SRC)), mod) for p in library
           for mod, _ in _imports(p) if mod == "sinkhole.cli" or mod.startswith("sinkhole.cli.")]
    assert bad == []


def test_no_module_imports_private_names_of_another():
    bad = []
    for p in list(SRC.rglob("*.py")) + list((ROOT / "benchmarks").glob("*.py")):
        for mod, names in _imports(p):
            if mod.startswith("sinkhole"):
                bad += [(p.name, mod, n) for n in names if n.startswith("_") and n != "__version__"]
    assert bad == []


def test_the_checker_sees_relative_imports():
    f = SRC / "attack" / "steps.py"  # imports ..scan and .diverge relatively
    mods = {m for m, _ in _imports(f)}
    assert "sinkhole.scan" in mods and "sinkhole.attack.diverge" in mods
