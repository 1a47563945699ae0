"""The package's layering, checked on the source over the AST (imports inside functions included).

The layers and their order are read from docs/architecture.md (the ```layers block), so the drawing
there is what this test enforces: every import points down or stays in its layer, nothing forms a
circle, nothing outside ``cli/`` imports inside a function, and no module is a shim left at an old import
path. ``python tests/test_structure.py`` prints the four numbers that
docs/architecture.md quotes."""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "sinkhole"
LAZY = "# lazy:"  # the mark of an import inside a function that buys start-up time (CLI only)


def layers(doc: Path = ROOT / "docs" / "architecture.md") -> list[tuple[str, list[str]]]:
    """[(layer name, module prefixes)] from the ```layers block, lowest layer first."""
    m = re.search(r"```layers\n(.*?)```", doc.read_text(encoding="utf-8"), re.S)
    assert m, "docs/architecture.md has no ```layers block"
    out = []
    for line in m.group(1).splitlines():
        if ":" in line:
            name, mods = line.split(":", 1)
            out.append((name.strip(), mods.split("#")[0].split()))
    return out


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """(module, names, line, inside a function, source line) of every import in a file, relative imports
    resolved to sinkhole.*; an imported submodule counts as that module."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    tree = ast.parse(text)
    pkg = module_name(path).split(".") if path.is_relative_to(SRC) else []
    if path.is_relative_to(SRC) and path.name != "__init__.py":
        pkg = pkg[:-1]
    known = {module_name(p) for p in SRC.rglob("*.py")}

    def walk(node, local):
        for ch in ast.iter_child_nodes(node):
            inner = local or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(ch, ast.ImportFrom):
                if ch.level:
                    mod = ".".join(pkg[:len(pkg) - ch.level + 1] + ([ch.module] if ch.module else []))
                else:
                    mod = ch.module or ""
                names = [a.name for a in ch.names]
                subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in known]
                for target in subs or [mod]:
                    yield target, names, ch.lineno, local, " ".join(lines[ch.lineno - 1:ch.end_lineno])
            elif isinstance(ch, ast.Import):
                for a in ch.names:
                    yield a.name, [], ch.lineno, local, " ".join(lines[ch.lineno - 1:ch.end_lineno])
            yield from walk(ch, inner)

    yield from walk(tree, False)


def library_files():
    return sorted(p for p in SRC.rglob("*.py"))


def layer_of(module: str, order) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(order):
        for pre in prefixes:
            if (module == pre or module.startswith(pre + ".")) and len(pre) > best:
                best, rank = len(pre), i
    return rank


def edges():
    """(importer, imported, file, line, local, source) for every sinkhole import in the package."""
    out = []
    for p in library_files():
        me = module_name(p)
        for mod, _, line, local, src in _imports(p):
            if mod == "sinkhole" or mod.startswith("sinkhole."):
                out.append((me, mod, p, line, local, src))
    return out


def upward(order=None):
    order = order or layers()
    bad = []
    for me, mod, p, line, _, src in edges():
        a, b = layer_of(me, order), layer_of(mod, order)
        if a is None or b is None or b > a:
            bad.append(f"{p.relative_to(ROOT)}:{line}: {me} ({order[a][0] if a is not None else '?'}) imports "
                       f"{mod} ({order[b][0] if b is not None else 'no layer'}): {src.strip()}")
    return bad


def circles():
    """Strongly connected components of more than one module (or a module importing itself)."""
    graph = defaultdict(set)
    for me, mod, *_ in edges():
        graph[me].add(mod)
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def local_imports(cli: bool = False):
    """Imports of sinkhole modules inside functions: in the library (``cli=False``) or in ``cli/``."""
    return [(p, line, src) for me, _, p, line, local, src in edges()
            if local and me.startswith("sinkhole.cli") == cli]


def test_every_module_has_a_layer():
    order = layers()
    missing = [module_name(p) for p in library_files() if layer_of(module_name(p), order) is None]
    assert missing == []


def test_every_import_points_down():
    bad = upward()
    assert bad == [], "imports that point up a layer:\n" + "\n".join(bad)


def test_no_import_circle():
    assert circles() == []


def test_the_library_imports_nothing_of_its_own_inside_functions():
    bad = [f"{p.relative_to(ROOT)}:{line}: {src.strip()}" for p, line, src in local_imports()]
    assert bad == [], "function-local imports in the library:\n" + "\n".join(bad)


def test_the_cli_marks_its_lazy_imports():
    bad = [f"{p.relative_to(ROOT)}:{line}: {src.strip()}" for p, line, src in local_imports(cli=True)
           if LAZY not in src]
    assert bad == [], f"CLI imports inside functions without the '{LAZY}' mark:\n" + "\n".join(bad)


def test_no_module_is_a_shim():
    """A module that only re-exports another under an old path (``sys.modules[__name__] = ...`` or a docstring
    that says it moved) is an arrow back up the folder graph: the package has none."""
    bad = []
    for p in library_files():
        text = p.read_text(encoding="utf-8")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if "sys.modules[__name__]" in text or doc.startswith("Moved to") or "is a shim" in doc:
            bad.append(str(p.relative_to(ROOT)))
    assert bad == []


def test_every_name_in_all_imports():
    """What a package says it exports (``__all__``) can be imported from it."""
    import importlib

    bad = []
    for p in library_files():
        mod = importlib.import_module(module_name(p))
        bad += [f"{mod.__name__}.{n}" for n in getattr(mod, "__all__", ()) if not hasattr(mod, n)]
    assert bad == []


def test_importing_the_package_and_its_command_line_loads_no_torch():
    """The package's public names load on first use: ``import sinkhole`` (and the command line's module) stay free
    of torch, which a model-free path (the start of every command, a serving guard) needs."""
    import subprocess

    code = ("import sys, sinkhole, sinkhole.cli, sinkhole.errors, sinkhole.version; "
            "print('torch' in sys.modules, sinkhole.__version__); "
            "from sinkhole import load_model, SinkholeError; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False" and out[2] == "True", out
    import sinkhole

    assert set(sinkhole.__all__) <= set(dir(sinkhole))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        sinkhole.nope  # noqa: B018


def test_the_checker_sees_upward_and_local_imports(tmp_path):
    """The checks can fail: a fake layer order in which circuit sits below capture flags circuit's imports."""
    order = layers()
    names = [n for n, _ in order]
    swapped = list(order)
    i, j = names.index("capture"), names.index("circuit")
    swapped[i], swapped[j] = swapped[j], swapped[i]
    assert any("sinkhole.circuit" in b and "imports sinkhole.capture" in b for b in upward(swapped))
    f = SRC / "report" / "html.py"
    assert ("sinkhole.pipeline.registry", True) not in {(m, loc) for m, _, _, loc, _ in _imports(f)}
    assert "sinkhole.pipeline.registry" in {m for m, *_ in _imports(f)}


def test_nothing_outside_cli_imports_cli():
    bad = [(str(p.relative_to(SRC)), mod) for me, mod, p, *_ in edges()
           if not me.startswith("sinkhole.cli") and me != "sinkhole.__main__" and mod.startswith("sinkhole.cli")]
    assert bad == []


def test_no_module_imports_private_names_of_another():
    bad = []
    for p in list(SRC.rglob("*.py")) + list((ROOT / "benchmarks").glob("*.py")) + list((ROOT / "studies").rglob("*.py")):
        for mod, names, *_ in _imports(p):
            if mod.startswith("sinkhole"):
                bad += [(p.name, mod, n) for n in names if n.startswith("_") and n != "__version__"]
    assert bad == []


def metrics() -> dict:
    return {"import circles": len(circles()), "upward imports": len(upward()),
            "function-local imports in the library": len(local_imports())}


if __name__ == "__main__":
    for k, v in metrics().items():
        print(f"{k}: {v}")
    for b in upward():
        print("  up:", b)
    for c in circles():
        print("  circle:", c)
