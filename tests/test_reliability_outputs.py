"""Trustworthy outputs: with --json, stdout is exactly one JSON document (logs and progress go
to stderr), and it equals the file the command wrote."""

from __future__ import annotations

import json

import pytest

from helpers_reliability import make_tiny_folder
from sinkhole.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("models") / "tiny-llama")


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_scan_json_stdout_is_the_results_file(tiny_folder, tmp_path, capsys):
    out = tmp_path / "o"
    rc, so, se = _run(["scan", tiny_folder, "--quick", "--curve-reps", "20", "--json", "--out", out], capsys)
    assert rc in (0, 1), se  # 1: a step failed (recorded in results.json 'errors'), still a valid document
    assert so == (out / "results.json").read_text()
    doc = json.loads(so)
    assert doc["schema_version"] == 2 and doc["model"]["name"] == "tiny-llama" and doc["command"] == "scan"
    assert "[1/" in se  # the step log went to stderr


def test_diverge_json_stdout(tiny_folder, tmp_path, capsys):
    f = tmp_path / "d.json"
    rc, so, se = _run(["diverge", tiny_folder, "--words", "poem", "--reps", "4", "--templates", "raw",
                       "--max-new-tokens", "3", "--json", "--out", f], capsys)
    assert rc == 0, se
    doc = json.loads(so)
    assert doc == json.loads(f.read_text())
    div = doc["results"]["divergence"]
    assert div["n_cases"] == 1 and len(div["cases"]) == 1


def test_models_json_stdout(capsys):
    rc, so, se = _run(["models", "--json"], capsys)
    assert rc == 0
    doc = json.loads(so)
    assert "llama" in doc["architectures"] and doc["embedded"][0]["name"] == "smollm2-135m-instruct"


def test_result_files_are_written_atomically():
    """Static check over src/sinkhole: files are written through results.write_atomic/write_json
    (temporary file, fsync, rename) or into a temporary folder that is renamed into place. Direct
    writes are allowed only where listed here, with the reason."""
    import re
    from pathlib import Path

    allowed = {
        "results.py": "write_atomic itself",
        "models/gguf_cache.py": "writes inside a temporary cache folder, renamed into place by _publish",
        "integrations/lm_eval.py": "scratch task files for lm-eval in a temporary folder, not results",
        "attack/memorization.py": "builds the corpus index inside a temporary folder, renamed into place (os.replace)",
        "guard/stack.py": "a test server's log, streamed as the server runs, not a result",
    }
    src = Path(__file__).resolve().parents[1] / "src" / "sinkhole"
    direct = re.compile(r"\.write_text\(|\.write_bytes\(|\bopen\([^)]*[\"'][wax]b?\+?[\"']|savefig\((?!buf|pbuf)")
    offenders = []
    for py in sorted(src.rglob("*.py")):
        rel = py.relative_to(src).as_posix()
        if rel in allowed:
            continue
        for i, line in enumerate(py.read_text(encoding="utf-8").splitlines(), 1):
            if direct.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{rel}:{i}: {line.strip()}")
    assert offenders == [], "non-atomic writes (use sinkhole.results.write_atomic):\n" + "\n".join(offenders)
