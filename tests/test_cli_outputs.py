"""Every command's every output mode: the human-readable default, ``--json``, ``--out`` and
``--quiet``, on a tiny random Llama (``sinkhole.cli.load_from_args`` is swapped for it); plus
``sinkhole report`` on each kind of results document and its one-line refusal of anything else.

The ``real`` tests run the same commands on the embedded SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest
import torch

import sinkhole.cli as cli
from sinkhole import progress
from tiny import tiny_lm

TINY = ("llama", 3)
ANALYSIS_KEYS = {"schema_version", "sinkhole_version", "command", "model", "options", "steps", "results"}
CASE_KEYS = {"word", "reps", "template", "diverged", "garak_diverged", "tokens_until_divergence", "text"}
CIRCUIT_FULL = {"circuit", "first_token_detector", "convergence", "attention_sinks", "norm_curves"}

DIVERGE = ["diverge", "--words", "a", "--reps", "5", "--max-new-tokens", "4"]
CIRCUIT_FULL_ARGS = ["circuit", "--reps", "30", "--conv-reps", "20", "--attn-reps", "8", "--words", "cat"]
CLUSTER = ["cluster", "--pool", "40", "--clusters", "2", "--size", "3", "--length", "24", "--seqs", "1",
           "--examples", "1", "--max-new-tokens", "4"]
PATCH = ["patch", "--quick", "--method", "paper", "--reps", "5", "--verify-reps", "6", "--baselines", "collapse"]
SCAN = ["scan", "--quick", "--curve-reps", "30"]


def sweep_args(ck) -> list[str]:
    return ["sweep", "--tokens", "8", "--max-reps", "16", "--batch-size", "4", "--checkpoint", str(ck)]


# ------------------------------------------------------------------------------------------
# fixtures and helpers
@pytest.fixture(autouse=True)
def _fresh_quiet(monkeypatch):
    """``--quiet`` sets a process-wide flag (sinkhole.progress); each test starts without it."""
    monkeypatch.setattr(progress, "_QUIET", False)


@pytest.fixture
def tiny_cli(monkeypatch):
    """Make the CLI load a fresh tiny random model whatever MODEL says; no progress bars."""
    monkeypatch.setattr(cli, "load_from_args", lambda args: tiny_lm(*TINY))
    monkeypatch.setenv("SINKHOLE_NO_PROGRESS", "1")


@pytest.fixture
def bars_on(tiny_cli, monkeypatch):
    """Progress bars enabled (as in a terminal), so --quiet has something to silence."""
    monkeypatch.delenv("SINKHOLE_NO_PROGRESS", raising=False)


def parrot_lm():
    """A tiny model that repeats its last input token forever (attention and MLP outputs zeroed,
    unembedding tied to the embedding): it never diverges."""
    lm = tiny_lm(*TINY)
    m = lm.model
    with torch.no_grad():
        for layer in m.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        m.lm_head.weight.copy_(m.model.embed_tokens.weight)
    return lm


def run(capsys, argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def run_ok(capsys, argv) -> tuple[str, str]:
    rc, out, err = run(capsys, argv)
    assert rc == 0, err
    assert "Traceback" not in err and "internal error" not in err, err
    return out, err


def run_captured(argv) -> tuple[int, str, str]:
    """cli.main with stdout/stderr captured without capsys (for module-scoped fixtures)."""
    o, e = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
        rc = cli.main([str(a) for a in argv])
    return rc, o.getvalue(), e.getvalue()


def analysis_doc(text: str, command: str, results: set[str]) -> dict:
    """Parse an analysis command's --json: a results document with exactly ``results``."""
    doc = json.loads(text)
    assert ANALYSIS_KEYS <= set(doc), sorted(doc)
    assert doc["command"] == command
    assert doc["model"]["name"] == "tiny-llama" and doc["model"]["n_layers"] == 3
    assert isinstance(doc["options"], dict) and isinstance(doc["schema_version"], int)
    assert set(doc["results"]) == results
    assert set(doc["steps"]) >= results
    assert not doc.get("errors")
    return doc


def write_tiny_patch(path: Path) -> Path:
    """A hand-built patch for the tiny model: zero two neurons of layer 2 at non-first positions."""
    from sinkhole.patch.core import Patch, PatchOp

    patch = Patch(ops=[PatchOp(layer=2, mode="zero", neurons=[3, 5])], name="test-zero",
                  model={"family": "llama", "n_layers": 3, "d_model": 64, "d_mlp": 128}, notes="hand-built")
    return patch.save(path)


def no_section_errors(html: str) -> None:
    assert "section-error" not in html.split("</style>", 1)[-1], "a report section failed to render"


# ------------------------------------------------------------------------------------------
# models (no model is loaded; it has only the human and --json modes)
def test_models_human_and_json(capsys):
    from sinkhole.models.adapters import SUPPORTED
    from sinkhole.models.loading import EMBEDDED

    out, err = run_ok(capsys, ["models"])
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == "Embedded models:"
    for name, e in EMBEDDED.items():
        row = next(ln for ln in lines if ln.split()[:1] == [name])
        assert e["hf_name"] in row and ("installed" in row or "missing: pip install" in row)
    assert lines[-1] == "Supported architectures (model_type): " + ", ".join(SUPPORTED)

    out, err = run_ok(capsys, ["models", "--json"])
    assert err == ""
    doc = json.loads(out)
    assert set(doc) == {"embedded", "architectures"}
    assert doc["architectures"] == list(SUPPORTED) and "llama" in doc["architectures"]
    assert [r["name"] for r in doc["embedded"]] == list(EMBEDDED)
    for r in doc["embedded"]:
        assert {"name", "hf_name", "quantization", "installed", "install"} <= set(r)
        assert isinstance(r["installed"], bool) and r["install"].startswith("pip install")
        # the human listing says the same as the JSON
        row = next(ln for ln in lines if ln.split()[:1] == [r["name"]])
        assert row.endswith("installed") == r["installed"]


# ------------------------------------------------------------------------------------------
# circuit
def test_circuit_fast_human(tiny_cli, capsys):
    out, err = run_ok(capsys, ["circuit", "--fast"])
    doc = analysis_doc(run_ok(capsys, ["circuit", "--fast", "--json"])[0], "circuit", {"circuit"})
    c = doc["results"]["circuit"]
    lines = out.splitlines()
    assert lines[0] == "model tiny-llama"
    assert lines[1].startswith("sink layers (robust rule): ")
    assert f"roles: marking layers {c['marking_layers']}, massive layer {c['massive_layer']}, drift layer " \
           f"{c['drift_layer']}" in lines
    assert "sink neurons (zeroed at position 0):" in lines
    # --fast: none of the slower analyses
    for absent in ("first-token detector", "layer-0 convergence", "identity check", "sink rate (Gu", "repeats needed"):
        assert absent not in out
    assert "circuit: finding sink layers, sink neurons and the circuit's roles in tiny-llama" in err
    assert "[2/2] circuit" in err


def test_circuit_full_human(tiny_cli, capsys):
    out, err = run_ok(capsys, CIRCUIT_FULL_ARGS)
    assert out.startswith("model tiny-llama\n")
    assert "roles: marking layers [" in out
    assert re.search(r"^first-token detector: layer \d+ neuron \d+ AUC [0-9.]+ \(perfect split: (True|False)\)$",
                     out, re.M)
    assert re.search(r"^layer-0 convergence 'cat': distance [0-9.]+ -> [0-9.]+ after 20 repetitions$", out, re.M)
    assert "identity check (no BOS, pure repeat): max relative deviation" in out
    assert re.search(r"^sink rate \(Gu, eps [0-9.]+, T \d+\): text [0-9.]+, repeated token [0-9.]+$", out, re.M)
    assert re.search(r"^repeats needed 'cat' layer \d+: ", out, re.M)
    assert "[6/6] norm_curves" in err


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "full"])
def test_circuit_json_and_out(tiny_cli, capsys, tmp_path, fast):
    argv = ["circuit", "--fast"] if fast else CIRCUIT_FULL_ARGS
    out_file = tmp_path / "circuit.json"
    out, _ = run_ok(capsys, argv + ["--json", "--out", out_file])
    doc = analysis_doc(out, "circuit", {"circuit"} if fast else CIRCUIT_FULL)
    c = doc["results"]["circuit"]
    assert {"sink_layers", "sink_neurons", "marking_layers", "massive_layer", "drift_layer", "roles",
            "first_token_norm", "typical_norm"} <= set(c)
    assert 0 <= c["massive_layer"] < 3 and 0 <= c["drift_layer"] < 3
    assert doc["options"]["firing"] is (not fast)
    if not fast:
        assert doc["options"]["words"] == ["cat"] and doc["options"]["curve_reps"] == 30
        assert [cv["word"] for cv in doc["results"]["convergence"]["curves"]] == ["cat"]
    assert out_file.read_text() == out  # --out holds exactly what --json prints
    # --out alone (human mode) writes the same document and still prints the summary
    out2, _ = run_ok(capsys, argv + ["--out", tmp_path / "c2.json"])
    assert out2.startswith("model tiny-llama\n")
    assert json.loads((tmp_path / "c2.json").read_text())["results"] == doc["results"]


# ------------------------------------------------------------------------------------------
# diverge
def test_diverge_human_matches_json(tiny_cli, capsys):
    out, err = run_ok(capsys, DIVERGE)
    doc = analysis_doc(run_ok(capsys, DIVERGE + ["--json"])[0], "diverge", {"divergence"})
    d = doc["results"]["divergence"]
    lines = out.splitlines()
    assert lines[0].split() == ["template", "word", "reps", "diverged", "garak", "until", "non-word", "continuation"]
    rows = lines[1:1 + d["n_cases"]]
    assert len(rows) == d["n_cases"] == 3  # raw, repeat, garak_this (the tiny tokenizer has no chat template)
    for row, c in zip(rows, d["cases"]):
        assert row.split()[:6] == [c["template"], c["word"], str(c["reps"]), str(c["diverged"]),
                                   str(c["garak_diverged"]), str(c["tokens_until_divergence"])]
    assert (f"divergence rate: {d['rate']:.2f} (run judge), {d['garak_rate']:.2f} (garak-style judge), "
            f"{d['either_rate']:.2f} (either); judges agree on") in out
    assert f"of {d['n_cases']} cases" in out and "exact check" not in out
    for t in ("raw", "repeat", "garak_this"):
        assert re.search(rf"^  {t}\s+rate [0-9.]+  garak [0-9.]+  \(n=1\)$", out, re.M)
    assert err == ""  # no bars (SINKHOLE_NO_PROGRESS), no --out


def test_diverge_json_and_out(tiny_cli, capsys, tmp_path):
    out_file = tmp_path / "d.json"
    out, err = run_ok(capsys, DIVERGE + ["--json", "--out", out_file])
    doc = analysis_doc(out, "diverge", {"divergence"})
    assert doc["steps"] == ["divergence"]
    d = doc["results"]["divergence"]
    assert {"n_cases", "rate", "garak_rate", "either_rate", "cases"} <= set(d)
    assert d["n_cases"] == len(d["cases"]) == 3 and d["method"] == "generate"
    for c in d["cases"]:
        assert CASE_KEYS <= set(c)
        assert c["word"] == "a" and c["reps"] == 5 and isinstance(c["diverged"], bool)
        assert c["tokens_until_divergence"] <= 4
    assert 0 <= d["rate"] <= d["either_rate"] <= 1 and 0 <= d["garak_rate"] <= d["either_rate"]
    assert doc["options"]["max_new_tokens"] == 4
    assert out_file.read_text() == out
    assert "wrote" not in err
    # human mode with --out: the table on stdout, the file written, and said so on stderr
    f2 = tmp_path / "d2.json"
    out2, err2 = run_ok(capsys, DIVERGE + ["--out", f2])
    assert out2.startswith("template ") and f"wrote {f2}" in err2
    assert json.loads(f2.read_text())["results"] == doc["results"]


def test_diverge_exact(tiny_cli, capsys):
    argv = ["diverge", "--exact", "--templates", "repeat", "--words", "a,poem", "--reps", "5,9",
            "--max-new-tokens", "4"]
    out, _ = run_ok(capsys, argv)
    doc = analysis_doc(run_ok(capsys, argv + ["--json"])[0], "diverge", {"divergence"})
    d = doc["results"]["divergence"]
    assert d["method"] != "generate" and d["n_cases"] == 4
    assert {c["template"] for c in d["cases"]} == {"repeat"}
    assert {(c["word"], c["reps"]) for c in d["cases"]} == {("a", 5), ("a", 9), ("poem", 5), ("poem", 9)}
    assert "(greedy tokens from the exact check)" in out
    assert len([ln for ln in out.splitlines() if ln.startswith("repeat ")]) == 4


# ------------------------------------------------------------------------------------------
# sweep
def test_sweep_human_matches_json(tiny_cli, capsys, tmp_path):
    out, err = run_ok(capsys, sweep_args(tmp_path / "ck.json"))
    assert (tmp_path / "ck.json").exists()
    doc = analysis_doc(run_ok(capsys, sweep_args(tmp_path / "ck2.json") + ["--json"])[0], "sweep", {"sweep"})
    s = doc["results"]["sweep"]
    lines = out.splitlines()
    assert re.match(rf"^8 tokens, drift layer {s['config']['drift_layer']}, up to 16 repetitions: \d+% reach a sink "
                    rf"\(norm ratio >= 0.5\), median ", lines[0])
    assert lines[1].split() == ["rank", "token", "id", "reps", "ratio", "bos-attn"]
    assert len(lines) == 2 + 8
    for i, (row, r) in enumerate(zip(lines[2:], s["top"]), 1):
        f = row.split()
        assert f[0] == str(i) and f[2] == str(r["token_id"]) and f[3] == str(r["reps_to_sink"])
    assert f"sweep: drift layer {s['config']['drift_layer']}" in err
    assert f"sweeping 8 tokens (shard 0/1) at layer {s['config']['drift_layer']}, checkpoint {tmp_path / 'ck.json'}" \
        in err


def test_sweep_json_and_out(tiny_cli, capsys, tmp_path):
    out_file = tmp_path / "s.json"
    out, _ = run_ok(capsys, sweep_args(tmp_path / "ck.json") + ["--json", "--out", out_file])
    doc = analysis_doc(out, "sweep", {"sweep"})
    s = doc["results"]["sweep"]
    assert {"n_tokens", "top", "config", "frac_sink_within_max_reps", "median_reps_to_sink"} <= set(s)
    assert s["n_tokens"] == 8 and len(s["top"]) == 8
    assert s["config"]["max_reps"] == 16 and s["config"]["threshold"] == 0.5
    assert 0 <= s["frac_sink_within_max_reps"] <= 1
    for r in s["top"]:
        assert {"token", "token_id", "reps_to_sink", "final_norm_ratio", "bos_attn"} <= set(r)
    assert out_file.read_text() == out
    # human mode with --out writes the same document
    out2, _ = run_ok(capsys, sweep_args(tmp_path / "ck3.json") + ["--out", tmp_path / "s2.json"])
    assert out2.startswith("8 tokens, drift layer ")
    assert json.loads((tmp_path / "s2.json").read_text())["results"] == doc["results"]
    # merging the checkpoint (no model) gives the same summary
    out3, _ = run_ok(capsys, ["sweep", "--merge", tmp_path / "ck.json", "--json"])
    merged = json.loads(out3)
    assert merged["command"] == "sweep" and merged["results"]["sweep"]["n_tokens"] == 8
    assert merged["results"]["sweep"]["top"] == s["top"]


# ------------------------------------------------------------------------------------------
# cluster
def test_cluster_human_matches_json(tiny_cli, capsys):
    out, err = run_ok(capsys, CLUSTER)
    doc = analysis_doc(run_ok(capsys, CLUSTER + ["--json"])[0], "cluster", {"cluster"})
    r = doc["results"]["cluster"]
    m = r["method"]
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[0] == (f"2 clusters of 3 tokens (layer0 cosine), sequences of 24 tokens, sink = norm ratio >= 0.5 at "
                        f"drift layer {m['drift_layer']}")
    assert lines[1] == (f"sink rate: cluster {r['sink_rate_cluster']:.2f} vs random {r['sink_rate_random']:.2f}; mean "
                        f"norm ratio {r['mean_norm_ratio_cluster']:.2f} vs {r['mean_norm_ratio_random']:.2f}")
    assert lines[2] == (f"diverged on generation: cluster {r['diverged_examples_cluster']}, random "
                        f"{r['diverged_examples_random']}")
    assert f"cluster: drift layer {m['drift_layer']}" in err
    assert "  [cluster] " in err and "  [random] " in err  # the generated examples go to stderr


def test_cluster_json_and_out(tiny_cli, capsys, tmp_path):
    out_file = tmp_path / "cl.json"
    out, _ = run_ok(capsys, CLUSTER + ["--json", "--out", out_file])
    doc = analysis_doc(out, "cluster", {"cluster"})
    r = doc["results"]["cluster"]
    assert r["method"]["n_clusters"] == 2 and r["method"]["cluster_size"] == 3 and r["method"]["length"] == 24
    assert len(r["rows"]) == 4 and len(r["examples"]) == 2
    assert {e["kind"] for e in r["examples"]} == {"cluster", "random"}
    for k in ("sink_rate_cluster", "sink_rate_random"):
        assert 0 <= r[k] <= 1
    assert out_file.read_text() == out
    out2, _ = run_ok(capsys, CLUSTER + ["--out", tmp_path / "cl2.json"])
    assert out2.startswith("2 clusters of 3 tokens")
    assert json.loads((tmp_path / "cl2.json").read_text())["results"] == doc["results"]


# ------------------------------------------------------------------------------------------
# scan (one human-mode scan shared by the module; --json/--quiet run a second one)
@pytest.fixture(scope="module")
def scan_human(tmp_path_factory):
    out = tmp_path_factory.mktemp("scan") / "scan"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "load_from_args", lambda args: tiny_lm(*TINY))
        mp.setenv("SINKHOLE_NO_PROGRESS", "1")
        mp.setattr(progress, "_QUIET", False)
        rc, stdout, stderr = run_captured(SCAN + ["--out", out])
    assert rc == 0, stderr
    return out, stdout, stderr


def test_scan_human(scan_human):
    out, stdout, stderr = scan_human
    assert stdout == ""  # the human output of scan is its stderr log and the files
    doc = json.loads((out / "results.json").read_text())
    n = len(doc["steps"])
    for i, step in enumerate(doc["steps"], 1):
        assert f"[{i}/{n}] {step} done in " in stderr
    assert "step timings:" in stderr and re.search(r"^  load model\s+[0-9.]+s$", stderr, re.M)
    assert re.search(r"^  total\s+[0-9.]+s$", stderr, re.M)
    assert f"wrote {out / 'results.json'}, {out / 'report.html'}, {out / 'figures'}/ and {out / 'guard-profile.json'}" \
        in stderr


def test_scan_out_folder(scan_human):
    out, _, _ = scan_human
    doc = json.loads((out / "results.json").read_text())
    assert ANALYSIS_KEYS <= set(doc) and doc["command"] == "scan" and not doc.get("errors")
    assert doc["options"]["quick"] is True and doc["options"]["curve_reps"] == 30
    assert {"circuit", "divergence", "sweep", "cluster"} <= set(doc["results"])
    timings = json.loads((out / "timings.json").read_text())
    assert set(timings["steps"]) == set(doc["steps"]) and timings["total_s"] >= timings["load_model_s"] >= 0
    html = (out / "report.html").read_text()
    for title in ("Sink circuit", "Divergence by generation", "Most sink-prone tokens", "Cluster attack"):
        assert f"<h2>{title}" in html, title
    no_section_errors(html)
    figs = sorted((out / "figures").iterdir())
    assert figs and {p.suffix for p in figs} == {".png", ".svg"}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no partial/temp files left


def test_scan_json_and_quiet(tiny_cli, capsys, tmp_path, scan_human, monkeypatch):
    monkeypatch.delenv("SINKHOLE_NO_PROGRESS")
    out = tmp_path / "scan"
    stdout, stderr = run_ok(capsys, SCAN + ["--out", out, "--json", "--quiet"])
    assert stderr == ""
    doc = json.loads(stdout)
    assert ANALYSIS_KEYS <= set(doc) and doc["command"] == "scan"
    assert (out / "results.json").read_text() == stdout  # --json prints exactly results.json
    # same options and seed as the human-mode scan: the same results
    assert (out / "results.json").read_bytes() == (scan_human[0] / "results.json").read_bytes()
    assert (out / "report.html").exists() and (out / "timings.json").exists()


# ------------------------------------------------------------------------------------------
# patch
def test_patch_builds_the_run_gate_by_default(tiny_cli, capsys, tmp_path):
    """The default ``sinkhole patch`` builds the run gate: its log names only the gate (never the paper's neurons),
    SUMMARY.md opens with what the gate stops, leaves and where it runs, and patch.json holds the gate."""
    out = tmp_path / "gated"
    stdout, stderr = run_ok(capsys, ["patch", "--quick", "--reps", "5", "--verify-reps", "6", "--no-broad",
                                     "--out", out])
    assert stderr.splitlines()[0] == "candidates: run_gate", stderr
    assert "paper" not in stderr and "massive layer" not in stderr
    card = (out / "SUMMARY.md").read_text()
    assert card.startswith("# Patched model (sinkhole)") and "The fix is **the run gate**" in card
    assert "16-repetition floor" in card and "--engine llama.cpp --patch DIR" in card
    pj = json.loads((out / "patch.json").read_text())
    assert pj["gate"] is not None and pj["ops"] == []
    with pytest.raises(SystemExit):
        cli.main(["patch", "--help"])
    assert "Build the run gate" in capsys.readouterr().out


def test_patch_human_and_out_folder(tiny_cli, capsys, tmp_path):
    out = tmp_path / "patched"
    stdout, stderr = run_ok(capsys, PATCH + ["--out", out])
    # the before/after table is the command's output (stdout); the log and the folder line are on stderr
    assert "| measure (held-out) | unpatched | patched |" in stdout
    # the quick broad slice runs too: its targets are the patch's, the narrow set's are kept beside them
    assert "Targets on the narrow set: divergence_le_tenth " in stdout
    assert "Targets on the broad set (the patch's targets): divergence_every_family " in stdout
    assert "| attack family | repetitions | short run (16) | unpatched | patch | input_collapse |" in stdout
    assert "patch: massive layer " in stderr and "candidates: paper_clamp, paper_zero" in stderr
    assert "unpatched search divergence: run judge " in stderr
    assert "candidate paper_clamp: " in stderr
    assert "| measure" not in stderr
    assert f"wrote {out} (patched model, patch.json, summary.json, SUMMARY.md); reload with " \
           f"sinkhole.load_patched('{out}')" in stderr
    files = {p.name for p in out.iterdir()}
    assert {"patch.json", "summary.json", "SUMMARY.md", "config.json", "model.safetensors"} <= files
    pj = json.loads((out / "patch.json").read_text())
    assert pj["format"] == "sinkhole-patch" and pj["kind"] == "activation" and pj["weights_in_model"] is False
    assert [op["mode"] for op in pj["ops"]] == ["clamp"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"model", "patch", "search", "verification", "timing"}
    assert {"search_s", "verification_s", "broad_verification_s"} <= set(summary["timing"])
    assert summary["patch"]["ops"] == pj["ops"] and summary["search"]["chosen"] == "paper_clamp"
    md = (out / "SUMMARY.md").read_text()
    assert md.startswith("# Patched model (sinkhole)") and "## Before / after" in md
    assert "| measure (held-out) | unpatched | patched |" in md
    # the folder works as eval's --patch
    o2, _ = run_ok(capsys, ["eval", "--patch", out, "--no-divergence", "--json"])
    assert json.loads(o2)["patch"].startswith("clamp neurons L2 ")


def test_patch_json(tiny_cli, capsys, tmp_path):
    out = tmp_path / "patched"
    stdout, stderr = run_ok(capsys, PATCH + ["--out", out, "--json"])
    summary = json.loads(stdout)
    assert set(summary) == {"model", "patch", "search", "verification", "timing"}
    assert summary["model"]["name"] == "tiny-llama"
    assert summary["patch"]["format"] == "sinkhole-patch"
    v = summary["verification"]
    assert {"divergence_before", "divergence_after", "text", "targets", "sink_attention"} <= set(v)
    assert v["reps"] == [6]
    assert (out / "summary.json").read_text() == stdout  # --json prints exactly summary.json
    assert "wrote" not in stderr and "| measure" not in stderr  # --json replaces the human summary


def test_patch_refuses_a_model_that_does_not_diverge(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli, "load_from_args", lambda args: parrot_lm())
    monkeypatch.setenv("SINKHOLE_NO_PROGRESS", "1")
    out = tmp_path / "patched"
    rc, stdout, stderr = run(capsys, PATCH + ["--out", out, "--quiet"])
    assert rc == 1 and stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sinkhole: error: ") and "nothing to patch" in lines[0], stderr
    assert not out.exists()  # the refused run leaves no (empty) output folder behind
    out.mkdir()  # a folder the user made is kept
    assert run(capsys, PATCH + ["--out", out, "--quiet"])[0] == 1 and out.is_dir()
    # without --quiet the log explains why, and the error is still the last line
    rc, _, stderr = run(capsys, PATCH + ["--out", out])
    lines = stderr.strip().splitlines()
    assert rc == 1 and "unpatched search divergence: run judge 0%, garak judge 0%, either 0%" in stderr
    assert lines[-1].startswith("sinkhole: error: ") and "nothing to patch" in lines[-1]
    assert "Traceback" not in stderr


def test_patch_with_patch_file(tiny_cli, capsys, tmp_path):
    pfile = write_tiny_patch(tmp_path / "p.json")
    out = tmp_path / "patched"
    stdout, stderr = run_ok(capsys, PATCH + ["--patch-file", pfile, "--out", out, "--json"])
    summary = json.loads(stdout)
    assert summary["search"] is None  # no search: the given patch is verified and exported
    assert summary["patch"]["ops"] == json.loads(pfile.read_text())["ops"]
    assert summary["patch"]["name"] == "test-zero"
    assert "candidate " not in stderr and "unpatched search divergence" not in stderr
    pj = json.loads((out / "patch.json").read_text())
    assert pj["ops"][0]["mode"] == "zero" and pj["ops"][0]["neurons"] == [3, 5] and pj["ops"][0]["layer"] == 2
    assert (out / "summary.json").read_text() == stdout and (out / "SUMMARY.md").exists()


def test_patch_quiet(bars_on, capsys, tmp_path):
    out = tmp_path / "patched"
    stdout, stderr = run_ok(capsys, PATCH + ["--out", out, "--quiet"])
    assert stdout == "" and stderr == ""
    assert {"patch.json", "summary.json", "SUMMARY.md"} <= {p.name for p in out.iterdir()}


# ------------------------------------------------------------------------------------------
# eval
EVAL_DIV = ["--verify-reps", "6", "--max-new-tokens", "4"]


def test_eval_no_divergence_human_json_out(tiny_cli, capsys, tmp_path):
    pfile = write_tiny_patch(tmp_path / "p.json")
    stdout, stderr = run_ok(capsys, ["eval", "--patch", pfile, "--no-divergence"])
    assert stderr == ""  # the human output of eval is its result: on stdout
    out_file = tmp_path / "e.json"
    js, _ = run_ok(capsys, ["eval", "--patch", pfile, "--no-divergence", "--json", "--out", out_file])
    res = json.loads(js)
    assert set(res) == {"model", "patch", "text"}
    assert res["model"] == "tiny-llama" and res["patch"].startswith("zero neurons L2")
    t = res["text"]
    assert {"ppl_before", "ppl_after", "ppl_change_pct", "top1_agreement", "mean_kl_nats"} <= set(t)
    assert t["ppl_before"] > 0 and 0 <= t["top1_agreement"] <= 1 and t["mean_kl_nats"] >= 0
    assert stdout.strip() == (f"held-out text: ppl {t['ppl_before']:.3f} -> {t['ppl_after']:.3f} "
                              f"({t['ppl_change_pct']:+.2f}%), top-1 {t['top1_agreement']:.2%}, "
                              f"KL {t['mean_kl_nats']:.5f} nats/token")
    assert out_file.read_text() == js


def test_eval_divergence_human_json_out(tiny_cli, capsys, tmp_path):
    pfile = write_tiny_patch(tmp_path / "p.json")
    stdout, stderr = run_ok(capsys, ["eval", "--patch", pfile] + EVAL_DIV)
    assert "held-out divergence (either judge) " in stderr  # the log
    assert "| measure (held-out) | unpatched | patched |" in stdout  # the result
    assert "| divergence rate, either judge (the target) |" in stdout
    assert "Targets: divergence_le_tenth " in stdout
    human = stdout
    out_file = tmp_path / "e.json"
    js, err = run_ok(capsys, ["eval", "--patch", pfile, "--json", "--out", out_file] + EVAL_DIV)
    res = json.loads(js)
    assert set(res) == {"model", "patch", "verification"}
    v = res["verification"]
    assert {"divergence_before", "divergence_after", "text", "targets", "sink_attention"} <= set(v)
    assert v["reps"] == [6]
    before, after = v["divergence_before"], v["divergence_after"]
    assert before["n_cases"] == after["n_cases"] == len(before["cases"]) > 0
    assert all(c["reps"] == 6 and CASE_KEYS <= set(c) for c in before["cases"])
    assert f"| divergence rate, either judge (the target) | {before['either_rate']:.1%} | " \
           f"{after['either_rate']:.1%} |" in human
    assert out_file.read_text() == js
    assert "| measure" not in err  # --json replaces the human summary


def test_eval_quiet(bars_on, capsys, tmp_path):
    pfile = write_tiny_patch(tmp_path / "p.json")
    rc, stdout, stderr = run(capsys, ["eval", "--patch", pfile, "--quiet"] + EVAL_DIV)
    assert rc == 0 and stderr == "" and "| measure (held-out) |" in stdout  # --quiet keeps the result
    # --quiet with --json: the results still come out, nothing on stderr
    rc, stdout, stderr = run(capsys, ["eval", "--patch", pfile, "--quiet", "--json"] + EVAL_DIV)
    assert rc == 0 and stderr == "" and "verification" in json.loads(stdout)


# ------------------------------------------------------------------------------------------
# --quiet, with progress bars enabled: --quiet changes stderr only (empty), never stdout
QUIET_CASES = {
    "circuit_fast": ["circuit", "--fast"],
    "circuit_full": CIRCUIT_FULL_ARGS,
    "diverge": DIVERGE,
    "diverge_out": DIVERGE + ["--out", "{tmp}/d.json"],
    "diverge_json": DIVERGE + ["--json"],
    "sweep": sweep_args("{tmp}/ck.json"),
    "sweep_json": sweep_args("{tmp}/ck.json") + ["--json"],
    "cluster": CLUSTER,
    "cluster_json": CLUSTER + ["--json"],
}


@pytest.mark.parametrize("name", list(QUIET_CASES))
def test_quiet_silences_stderr_only(bars_on, capsys, tmp_path, name):
    loud_dir, quiet_dir = tmp_path / "loud", tmp_path / "quiet"
    loud_dir.mkdir()
    quiet_dir.mkdir()
    argv = lambda d: [a.replace("{tmp}", str(d)) if isinstance(a, str) else a for a in QUIET_CASES[name]]  # noqa
    loud_out, loud_err = run_ok(capsys, argv(loud_dir))
    assert loud_err.strip(), "without --quiet the command reports progress on stderr"
    quiet_out, quiet_err = run_ok(capsys, argv(quiet_dir) + ["--quiet"])
    assert quiet_err == ""
    assert quiet_out == loud_out.replace(str(loud_dir), str(quiet_dir)) and quiet_out.strip()
    for f in loud_dir.iterdir():  # --quiet writes the same files
        assert (quiet_dir / f.name).exists()


def test_diverge_progress_bar_without_quiet(bars_on, capsys):
    """Without --quiet (and SINKHOLE_NO_PROGRESS) diverge draws a generation bar on stderr."""
    _, err = run_ok(capsys, DIVERGE)
    assert "generating" in err


# ------------------------------------------------------------------------------------------
# report: renders each results document, refuses anything else in one line
def _render(capsys, src: Path, out: Path | None = None, quiet: bool = False) -> str:
    argv = ["report", src] + (["--out", out] if out else []) + (["--quiet"] if quiet else [])
    stdout, stderr = run_ok(capsys, argv)
    target = (out or (src if src.is_dir() else src.parent)) / "report.html"
    assert stderr == ""
    assert stdout == ("" if quiet else f"{target}\n")
    html = target.read_text()
    no_section_errors(html)
    return html


def test_report_renders_a_scan_folder(scan_human, capsys, tmp_path):
    src = scan_human[0]
    html = _render(capsys, src, tmp_path / "r")
    for title in ("Model", "Sink circuit", "Divergence by generation", "Most sink-prone tokens", "Cluster attack"):
        assert f"<h2>{title}" in html, title
    assert (tmp_path / "r" / "figures").is_dir() and any((tmp_path / "r" / "figures").iterdir())
    # the results.json file itself, --quiet: nothing printed
    html2 = _render(capsys, src / "results.json", tmp_path / "r2", quiet=True)
    assert "<h2>Sink circuit" in html2


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "full"])
def test_report_renders_circuit_json(tiny_cli, capsys, tmp_path, fast):
    src = tmp_path / "circuit" / "circuit.json"
    src.parent.mkdir()
    stdout, _ = run_ok(capsys, (["circuit", "--fast"] if fast else CIRCUIT_FULL_ARGS) + ["--json"])
    src.write_text(stdout)
    html = _render(capsys, src)
    assert "<h2>Sink circuit</h2>" in html
    full = ("First-token detector", "Layer-0 convergence", "Attention sinks", "Repetitions needed to induce a sink")
    for title in full:
        assert (f"<h2>{title}" in html) is (not fast), title
    assert "<h2>Divergence by generation" not in html


def test_report_renders_diverge_json(tiny_cli, capsys, tmp_path):
    src = tmp_path / "diverge" / "d.json"
    src.parent.mkdir()
    src.write_text(run_ok(capsys, DIVERGE + ["--json"])[0])
    html = _render(capsys, src)
    assert "<h2>Divergence by generation</h2>" in html
    assert "<h2>Sink circuit" not in html
    assert "garak_this" in html  # the cases' templates are shown


def test_report_renders_sweep_and_cluster_json(tiny_cli, capsys, tmp_path):
    for name, argv, title in (("sweep", sweep_args(tmp_path / "ck.json"), "Most sink-prone tokens"),
                              ("cluster", CLUSTER, "Cluster attack (no exact repetition)")):
        src = tmp_path / name / f"{name}.json"
        src.parent.mkdir()
        run_ok(capsys, argv + ["--quiet", "--out", src])
        html = _render(capsys, src)
        assert f"<h2>{title}</h2>" in html, name


def _refuse(capsys, path: Path):
    rc, stdout, stderr = run(capsys, ["report", path])
    assert rc != 0 and stdout == ""
    assert stderr.startswith("sinkhole: error:") and len(stderr.strip().splitlines()) == 1, stderr
    assert "Traceback" not in stderr and "internal error" not in stderr
    assert "not a results document" in stderr
    assert not (path.parent / "report.html").exists()


def test_report_refuses_empty_json(capsys, tmp_path):
    (tmp_path / "empty.json").write_text("{}")
    _refuse(capsys, tmp_path / "empty.json")


def test_report_refuses_patch_summary(tiny_cli, capsys, tmp_path):
    out = tmp_path / "patched"
    run_ok(capsys, PATCH + ["--out", out, "--quiet"])
    _refuse(capsys, out / "summary.json")
    _refuse(capsys, out / "patch.json")


def test_report_refuses_eval_json(tiny_cli, capsys, tmp_path):
    pfile = write_tiny_patch(tmp_path / "p.json")
    out = tmp_path / "ev" / "e.json"
    out.parent.mkdir()
    run_ok(capsys, ["eval", "--patch", pfile, "--no-divergence", "--quiet", "--out", out])
    _refuse(capsys, out)


# ------------------------------------------------------------------------------------------
# the real SmolLM2-135M-Instruct
@pytest.fixture
def real_cli(monkeypatch, smollm2):
    monkeypatch.setattr(cli, "load_from_args", lambda args: smollm2)
    monkeypatch.setenv("SINKHOLE_NO_PROGRESS", "1")
    return smollm2


@pytest.mark.real
def test_real_circuit_fast_default_model(monkeypatch, capsys):
    """Through the real loader (the default embedded model)."""
    monkeypatch.setenv("SINKHOLE_NO_PROGRESS", "1")
    out, err = run_ok(capsys, ["circuit", "--fast"])
    assert "roles: marking layers [1, 2], massive layer 11, drift layer 2" in out
    assert out.startswith("model ") and "sink neurons (zeroed at position 0):" in out
    js, _ = run_ok(capsys, ["circuit", "--fast", "--json", "--quiet"])
    c = json.loads(js)["results"]["circuit"]
    assert (c["marking_layers"], c["massive_layer"], c["drift_layer"]) == ([1, 2], 11, 2)


@pytest.mark.real
def test_real_diverge_human_and_json(real_cli, capsys):
    argv = ["diverge", "--words", "poem", "--reps", "100", "--max-new-tokens", "8"]
    out, _ = run_ok(capsys, argv)
    js, _ = run_ok(capsys, argv + ["--json", "--quiet"])
    doc = json.loads(js)
    assert ANALYSIS_KEYS <= set(doc) and doc["command"] == "diverge" and set(doc["results"]) == {"divergence"}
    d = doc["results"]["divergence"]
    assert {"raw", "repeat", "garak_this"} <= {c["template"] for c in d["cases"]}
    assert d["n_cases"] == len(d["cases"]) >= 3
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["template", "word", "reps"]
    for row, c in zip(lines[1:1 + d["n_cases"]], d["cases"]):
        assert CASE_KEYS <= set(c) and c["word"] == "poem" and c["reps"] == 100
        assert row.split()[:6] == [c["template"], "poem", "100", str(c["diverged"]), str(c["garak_diverged"]),
                                   str(c["tokens_until_divergence"])]
    assert f"divergence rate: {d['rate']:.2f} (run judge), {d['garak_rate']:.2f} (garak-style judge)" in out


@pytest.mark.real
def test_real_sweep_names_the_drift_layer(real_cli, capsys, tmp_path):
    out, err = run_ok(capsys, ["sweep", "--tokens", "8", "--max-reps", "64", "--checkpoint", tmp_path / "x.json"])
    assert out.startswith("8 tokens, drift layer 2, up to 64 repetitions: ")
    assert "sweep: drift layer 2" in err
    assert len(out.splitlines()) == 2 + 8
