"""The conformance matrix (issue 19 item 1): for every supported family, a tiny random model saved
as a local Hugging Face folder with a real tokenizer goes through every command in its quick
form, loaded the way a user's checkpoint is. Each must exit 0 with no step error.

The family x command table in docs/architecture.md is this test's result.
"""

from __future__ import annotations

import json

import pytest

import sinkhole.cli as cli
from helpers_reliability import make_tiny_folder
from tiny import FAMILIES


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance")
    return {f: make_tiny_folder(root / f"tiny-{f}", family=f) for f in FAMILIES}


def ok(capsys, argv) -> tuple[str, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, f"{argv}: {err[-1500:]}"
    assert "Traceback" not in err and "internal error" not in err, err
    return out, err


DECLINED: set[str] = set()  # families whose random weights did not diverge on the patch's search cases


@pytest.mark.parametrize("family", FAMILIES)
def test_every_command_on_every_family(family, folders, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SINKHOLE_NO_PROGRESS", "1")
    monkeypatch.chdir(tmp_path)
    model = folders[family]
    q = "--quiet"
    if family == "qwen2":
        # transformers 5 loads a qwen2 folder's tokenizer as Qwen2Tokenizer whatever tokenizer_config.json
        # says, and that class cannot read this test's word-level tokenizer.json: every word encodes to
        # nothing. sinkhole must refuse in one line (the in-process tiny-model tests cover qwen2).
        capsys.readouterr()
        assert cli.main(["diverge", str(model), "--words", "poem", "--reps", "4", q]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sinkhole: error: the word 'poem' encodes to no tokens") and err.count("\n") == 1
        return
    # scan --quick (every step, the patch step too) and report
    ok(capsys, ["scan", model, "--quick", "--patch", "--curve-reps", "40", "--out", "scan", q])
    doc = json.loads((tmp_path / "scan" / "results.json").read_text())
    assert not doc.get("errors"), doc.get("errors")
    assert set(doc["results"]) >= {"circuit", "norm_curves", "divergence", "sweep", "cluster", "patch"}
    ok(capsys, ["report", "scan", "--out", "report", q])
    assert "section-error" not in (tmp_path / "report" / "report.html").read_text().split("</style>", 1)[-1]
    # circuit --fast: the circuit and its roles
    out, _ = ok(capsys, ["circuit", model, "--fast", "--json", q])
    c = json.loads(out)["results"]["circuit"]
    n = doc["model"]["n_layers"]
    assert 0 <= c["drift_layer"] < n and 0 <= c["massive_layer"] < n and c["marking_layers"]
    # diverge, by generation and by the exact check
    out, _ = ok(capsys, ["diverge", model, "--words", "poem", "--reps", "6", "--templates", "raw,repeat",
                         "--max-new-tokens", "4", "--json", q])
    gen = json.loads(out)["results"]["divergence"]
    out, _ = ok(capsys, ["diverge", model, "--words", "poem", "--reps", "6", "--templates", "raw,repeat",
                         "--max-new-tokens", "4", "--exact", "--json", q])
    exact = json.loads(out)["results"]["divergence"]
    assert exact["method"] == "exact" and exact["n_cases"] == gen["n_cases"] == 2
    # sweep and cluster at the drift layer
    out, _ = ok(capsys, ["sweep", model, "--tokens", "8", "--max-reps", "16", "--batch-size", "4", "--json", q])
    assert json.loads(out)["results"]["sweep"]["config"]["drift_layer"] == c["drift_layer"]
    out, _ = ok(capsys, ["cluster", model, "--pool", "40", "--clusters", "2", "--size", "3", "--length", "24",
                         "--seqs", "1", "--examples", "1", "--max-new-tokens", "2", "--json", q])
    assert json.loads(out)["results"]["cluster"]["method"]["drift_layer"] == c["drift_layer"]
    # patch with one forced candidate (or the documented refusal of a model that does not diverge on
    # the search cases), then eval of the exported folder (or of a hand-built patch)
    capsys.readouterr()
    rc = cli.main([str(a) for a in ["experimental", "search", model, "--quick", "--families", "paper_zero", "--reps", "6",
                                    "--verify-reps", "7", "--max-new-tokens", "4", "--ppl-budget", "1000",
                                    "--out", "patched", q]])
    err = capsys.readouterr().err
    if rc == 0:
        assert (tmp_path / "patched" / "patch.json").exists()
        patch = "patched"
        DECLINED.discard(family)
    else:
        assert rc == 1 and err.startswith("sinkhole: error: the model did not diverge on the search cases: "
                                          "nothing to patch") and err.count("\n") == 1, err
        assert not (tmp_path / "patched").exists()
        DECLINED.add(family)
        from sinkhole.patch import Patch, PatchOp

        patch = Patch([PatchOp(1, "scale", None, values=0.5)], "half").save(tmp_path / "half.json")
    out, _ = ok(capsys, ["eval", model, "--patch", patch, "--verify-reps", "7", "--max-new-tokens", "4",
                         "--json", q])
    assert json.loads(out)["verification"]["divergence_before"]["n_cases"] > 0


def test_readme_lists_exactly_the_families_the_matrix_tests():
    import re
    from pathlib import Path

    from sinkhole.models.adapters import SUPPORTED

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Supported architectures", 1)[1].split("\n## ", 1)[0]
    listed = re.sub(r"\([^)]*\)", "", section.split("values:", 1)[1]).split(".", 1)[0]  # drop "(incl. ...)"
    names = {x.strip() for x in listed.split(",")}
    assert names == set(FAMILIES) == set(SUPPORTED)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_runs_longer_than_a_learned_position_table_are_refused_in_one_line(family, folders, capsys, tmp_path):
    """GPT-2 and OPT learn absolute positions (512 in the tiny configs): a 2,000-token run cannot be
    embedded, and every command says so before any work."""
    model = str(folders[family])
    for argv in (["diverge", model, "--words", "poem", "--reps", "2000"],
                 ["circuit", model, "--reps", "2000"],
                 ["sweep", model, "--max-reps", "2000", "--checkpoint", str(tmp_path / "c.json")],
                 ["cluster", model, "--length", "2000"],
                 ["scan", model, "--curve-reps", "2000", "--out", str(tmp_path / "s")]):
        capsys.readouterr()
        assert cli.main(argv + ["--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("sinkhole: error:") and err.count("\n") == 1 and "512" in err, (argv, err)
