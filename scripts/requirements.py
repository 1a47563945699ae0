"""The versions sinkhole is installed and tested with.

    python scripts/requirements.py newest [--cpu]   pip requirement lines: every dependency of pyproject.toml
        (runtime and the test extra) at its newest release within the major version constraints.txt pins,
        pyproject's tested upper bound lifted. The drift check: a new release that breaks the suite shows
        up here before users get it.
    python scripts/requirements.py oldest [--cpu]   every dependency at the lower bound of its range: the floor.
    python scripts/requirements.py lock             write constraints.txt from what ./.venv has installed (run
        it once the suite passed there).

pyproject.toml's ranges are the versions the suite has passed on; constraints.txt pins the exact set that CI
tested and that scripts/setup.sh installs. ``--cpu`` (a machine without a GPU): torch stays at
constraints.txt's pin, the one CPU build the set-up can install (PyPI serves CUDA builds of the others).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "constraints.txt"
_REQ = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$")
HEADER = """\
# The exact versions the test suite last passed on (CI installs these: scripts/setup.sh -c constraints.txt).
# Regenerate after a green run: python scripts/requirements.py lock
# The package's own ranges (pyproject.toml) are the versions the suite passed on at both ends:
# bash scripts/check-versions.sh oldest | newest
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependencies() -> list[str]:
    """pyproject's runtime dependencies and the ``test`` extra, as written there."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return list(project["dependencies"]) + list(project["optional-dependencies"]["test"])


def pinned_version(name: str) -> str:
    """constraints.txt's version of ``name``."""
    for row in LOCK.read_text().splitlines():
        m = _REQ.match(row)
        if m and _norm(m.group(1)) == _norm(name) and m.group(2).startswith("=="):
            return m.group(2)[2:].strip()
    raise SystemExit(f"requirements.py: constraints.txt pins no version of {name}; run: python scripts/requirements.py lock")


def line(req: str, mode: str, cpu: bool) -> str:
    m = _REQ.match(req)
    name, spec = m.group(1), m.group(2)
    if cpu and _norm(name) == "torch":
        return f"torch=={pinned_version('torch')}"
    low = re.search(r">=\s*([0-9][0-9A-Za-z.]*)", spec)
    if low is None:
        raise SystemExit(f"requirements.py: {req!r} in pyproject.toml has no lower bound (>=X): give it one")
    if mode == "oldest":
        return f"{name}=={low.group(1)}"
    major = int(pinned_version(name).split(".")[0])
    return f"{name}>={low.group(1)},<{major + 1}"


def lock() -> None:
    """constraints.txt from ./.venv: every installed distribution but sinkhole itself, local version labels
    dropped (``torch==2.13.0+cpu`` -> ``torch==2.13.0``: a GPU machine gets the CUDA build of that version)."""
    py = ROOT / ".venv" / "bin" / "python"
    if not py.exists():
        raise SystemExit("requirements.py: no ./.venv; run: bash scripts/setup.sh --test")
    out = subprocess.run([str(py), "-m", "pip", "freeze", "--exclude-editable", "--disable-pip-version-check"],
                         capture_output=True, text=True, check=True).stdout
    rows = {re.sub(r"\+[0-9A-Za-z.]+$", "", r.strip()) for r in out.splitlines() if "==" in r}
    rows = sorted((r for r in rows if _norm(r.split("==")[0]) != "sinkhole"), key=str.lower)
    LOCK.write_text(HEADER + "\n".join(rows) + "\n")
    print(f"wrote {LOCK.name}: {len(rows)} pins")


def main(argv: list[str]) -> int:
    cpu = "--cpu" in argv
    args = [a for a in argv if a != "--cpu"]
    if args == ["lock"]:
        lock()
        return 0
    if len(args) != 1 or args[0] not in ("newest", "oldest"):
        print("usage: python scripts/requirements.py newest|oldest [--cpu] | lock", file=sys.stderr)
        return 2
    for req in dependencies():
        print(line(req, args[0], cpu))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
