"""The bad-input matrix, through the command line: every case gives one line starting with
'sinkhole: error:' that says what to do, a non-zero exit, no traceback, and no result files.

Most cases call ``sinkhole.cli.main`` in-process (fast); a few run ``python -m sinkhole`` in a
subprocess to prove the real exit codes and the absence of tracebacks end to end.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from helpers_reliability import files_in, make_tiny_folder
from sinkhole.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny model folders and bad model files shared by the cases."""
    root = tmp_path_factory.mktemp("cli-models")
    m = {"tiny": make_tiny_folder(root / "tiny")}
    # a folder whose float16 forward pass overflows (massive activation in layer 1's MLP)
    over = make_tiny_folder(root / "overflow")
    from safetensors.torch import load_file, save_file

    w = load_file(over / "model.safetensors")
    w["model.layers.1.mlp.down_proj.weight"] *= 3.0e5
    w["model.layers.1.mlp.up_proj.weight"] *= 100.0
    save_file(w, over / "model.safetensors", metadata={"format": "pt"})
    m["overflow"] = over
    # an unsupported architecture with a working tokenizer
    import transformers as T

    bloom = root / "bloom"
    T.AutoModelForCausalLM.from_config(T.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=128)) \
        .save_pretrained(bloom, safe_serialization=True)
    for f in m["tiny"].glob("*token*"):
        (bloom / f.name).write_bytes(f.read_bytes())
    m["bloom"] = bloom
    # pickle-only weights
    pick = root / "pickled"
    pick.mkdir()
    for f in m["tiny"].iterdir():
        if f.suffix != ".safetensors":
            (pick / f.name).write_bytes(f.read_bytes())
    torch.save({"w": torch.zeros(2)}, pick / "pytorch_model.bin")
    m["pickled"] = pick
    foo = make_tiny_folder(root / "foobar")  # a model type transformers does not know
    cfg = json.loads((foo / "config.json").read_text())
    cfg.update(model_type="foobar", architectures=["FoobarForCausalLM"])
    (foo / "config.json").write_text(json.dumps(cfg))
    m["foobar"] = foo
    (root / "text.gguf").write_text("this is not a model\n")
    m["text_gguf"] = root / "text.gguf"
    (root / "empty.gguf").write_bytes(b"")
    m["empty_gguf"] = root / "empty.gguf"
    (root / "corrupt.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 16)
    m["corrupt_gguf"] = root / "corrupt.gguf"
    from sinkhole.models.loading import _resolve_embedded

    try:
        with open(_resolve_embedded("smollm2-135m-instruct"), "rb") as f:
            (root / "truncated.gguf").write_bytes(f.read(65536))  # a download cut short
        m["truncated_gguf"] = root / "truncated.gguf"
    except Exception:  # embedded model not installed: the truncated case is skipped
        m["truncated_gguf"] = None
    (root / "a-file").write_text("x")
    m["a_file"] = root / "a-file"
    return m


def _main(argv, capsys):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse errors
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def clean(rc, out, err, *needles):
    assert rc not in (0, None), (rc, out, err)
    assert "Traceback" not in err + out
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("sinkhole: error: "), lines[0]
    for n in needles:
        assert n.lower() in lines[0].lower(), (n, lines[0])
    return lines[0]


def _results(out_dir):
    """Result files in an output folder (the hidden --resume checkpoint is not a result)."""
    return [f for f in files_in(out_dir) if f != ".partial.json"]


# (id, argv builder, needles): {m} are model paths, {out} the output folder
SCAN_CASES = [
    ("missing-path", lambda m, o: ["scan", "/no/such/model-folder", "--out", o], ["does not exist"]),
    ("missing-gguf", lambda m, o: ["scan", "/no/such/model.gguf", "--out", o], ["does not exist"]),
    ("not-a-file-or-folder", lambda m, o: ["scan", "/dev/null", "--out", o], ["neither a file nor a folder"]),
    ("non-gguf-file", lambda m, o: ["scan", m["text_gguf"], "--out", o], ["not a GGUF file"]),
    ("empty-gguf", lambda m, o: ["scan", m["empty_gguf"], "--out", o], ["not a GGUF file"]),
    ("corrupt-gguf", lambda m, o: ["scan", m["corrupt_gguf"], "--out", o], ["corrupt or truncated"]),
    ("truncated-gguf", lambda m, o: ["scan", m["truncated_gguf"], "--out", o], ["corrupt or truncated"]),
    ("unknown-embedded-name", lambda m, o: ["scan", "smollm3-big", "--out", o],
     ["unknown model 'smollm3-big'", "smollm2-135m-instruct"]),
    ("hub-id-offline", lambda m, o: ["scan", "nobody/not-a-cached-model", "--out", o], ["HF_HUB_OFFLINE"]),
    ("unsupported-architecture", lambda m, o: ["scan", m["bloom"], "--out", o],
     ["unsupported architecture 'bloom'", "llama"]),
    ("model-type-unknown-to-transformers", lambda m, o: ["scan", m["foobar"], "--out", o],
     ["does not know the model type 'foobar'", "upgrade transformers"]),
    ("bad-cuda-index", lambda m, o: ["scan", m["tiny"], "--device", "cuda:x", "--out", o], ["cuda:N"]),
    ("pickle-only-weights", lambda m, o: ["scan", m["pickled"], "--out", o], ["pickle", "safetensors"]),
    ("empty-word-list", lambda m, o: ["scan", m["tiny"], "--words", "", "--out", o], ["--words is empty"]),
    ("only-commas", lambda m, o: ["scan", m["tiny"], "--words", " , ", "--out", o], ["--words is empty"]),
    ("whitespace-word", lambda m, o: ["scan", m["tiny"], "--words", "the,  ,poem", "--out", o],
     ["empty or whitespace-only word"]),
    ("zero-reps", lambda m, o: ["scan", m["tiny"], "--curve-reps", "0", "--out", o], ["positive integer"]),
    ("negative-reps", lambda m, o: ["scan", m["tiny"], "--curve-reps", "-3", "--out", o], ["positive integer"]),
    ("non-integer-reps", lambda m, o: ["scan", m["tiny"], "--curve-reps", "2.5", "--out", o],
     ["invalid int value", "--help"]),
    ("reps-beyond-context", lambda m, o: ["scan", m["tiny"], "--curve-reps", "100000", "--out", o],
     ["exceeds the model's context of 512"]),
    ("out-is-a-file", lambda m, o: ["scan", m["tiny"], "--out", m["a_file"]], ["not a folder"]),
    ("out-unwritable", lambda m, o: ["scan", m["tiny"], "--out", f"{m['a_file']}/sub"], ["cannot write"]),
    ("cuda-without-gpu", lambda m, o: ["scan", m["tiny"], "--device", "cuda", "--out", o], ["no CUDA GPU"]),
    ("unknown-device", lambda m, o: ["scan", m["tiny"], "--device", "tpu", "--out", o], ["unknown device"]),
    ("unknown-dtype", lambda m, o: ["scan", m["tiny"], "--dtype", "int4", "--out", o], ["unknown dtype"]),
    ("unknown-option", lambda m, o: ["scan", m["tiny"], "--frobnicate", "--out", o], ["unrecognized arguments"]),
    ("float16-overflow", lambda m, o: ["scan", m["overflow"], "--dtype", "float16", "--quick", "--out", o],
     ["non-finite", "--dtype float32"]),
]


@pytest.mark.parametrize("case", SCAN_CASES, ids=[c[0] for c in SCAN_CASES])
def test_scan_bad_input(case, models, tmp_path, capsys, monkeypatch):
    name, build, needles = case
    if name == "truncated-gguf" and models["truncated_gguf"] is None:
        pytest.skip("embedded SmolLM2 GGUF not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SINKHOLE_CACHE", str(tmp_path / "cache"))
    if name == "cuda-without-gpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    rc, so, se = _main(build(models, str(out)) + ["--quiet"], capsys)
    clean(rc, so, se, *needles)
    assert _results(out) == []
    assert files_in(tmp_path / "cache") == []  # no half-dequantized model cached either
    if name == "float16-overflow":
        assert rc == 3


def test_model_without_mlp_output_projection(models, tmp_path, capsys, monkeypatch):
    """A Llama-type checkpoint whose MLP has no module where sinkhole expects the output
    projection (a variant): simulated by pointing the llama layout at a missing module."""
    from sinkhole.models import adapters as A

    monkeypatch.setitem(A.SPECS, "llama", dataclasses.replace(A.SPECS["llama"], down="mlp.w2"))
    rc, so, se = _main(["scan", models["tiny"], "--out", tmp_path / "o", "--quiet"], capsys)
    clean(rc, so, se, "does not have the llama layout", "mlp.w2", "sinkhole models")
    assert _results(tmp_path / "o") == []


def test_full_output_folder(models, tmp_path, capsys, monkeypatch):
    """No space left while writing results: one line, nothing half-written (simulated ENOSPC)."""
    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "o"
    rc, so, se = _main(["scan", models["tiny"], "--out", out, "--quick", "--quiet"], capsys)
    clean(rc, so, se, "No space left on device", "--out")
    assert files_in(out) == []


# --- diverge: words and repetitions ----------------------------------------------------------
DIVERGE_CASES = [
    ("empty-words", ["--words", ""], ["at least one word"]),
    ("whitespace-words", ["--words", "  , "], ["at least one word"]),
    ("zero-reps", ["--reps", "0"], ["positive integers"]),
    ("negative-reps", ["--reps", "-4"], ["positive integers"]),
    ("non-integer-reps", ["--reps", "2.5"], ["positive integers"]),
    ("reps-beyond-context", ["--reps", "5000"], ["context"]),
    ("out-folder-missing", ["--out", "/no/such/dir/res.json"], ["does not exist"]),
    ("explain-llamacpp", ["--explain", "--engine", "llama.cpp"], ["llama.cpp does not expose", "drop --engine"]),
    ("explain-sampling", ["--explain", "--samples", "2", "--temperature", "1"], ["drop --patch and --samples"]),
]


@pytest.mark.parametrize("case", DIVERGE_CASES, ids=[c[0] for c in DIVERGE_CASES])
def test_diverge_bad_input(case, models, capsys):
    name, extra, needles = case
    argv = ["diverge", models["tiny"], "--templates", "raw", "--max-new-tokens", "2", "--quiet"]
    if "--reps" not in extra:
        argv += ["--reps", "2"]
    rc, so, se = _main(argv + extra, capsys)
    clean(rc, so, se, *needles)


def test_multi_token_word_works_with_a_note(models, tmp_path, capsys):
    out = tmp_path / "d.json"
    rc, so, se = _main(["diverge", models["tiny"], "--words", "the-poem", "--reps", "3", "--templates", "raw",
                        "--max-new-tokens", "2", "--out", out], capsys)
    assert rc == 0, se
    assert "note: the-poem tokenize to several tokens" in se
    doc = json.loads(out.read_text())["results"]["divergence"]
    assert doc["multi_token_words"] == ["the-poem"]


# --- report: results.json of another schema --------------------------------------------------
@pytest.mark.parametrize("content,needles", [
    (None, ["not found", "sinkhole scan"]),
    ("{not json", ["not valid JSON"]),
    (json.dumps({"results": {}}), ["no schema_version"]),
    (json.dumps({"schema_version": 0, "results": {}}), ["schema_version 0", "rerun"]),
    (json.dumps({"schema_version": 99, "results": {}}), ["schema_version 99", "rerun"]),
    (json.dumps([1, 2, 3]), ["no schema_version"]),
], ids=["missing", "not-json", "no-schema", "older-schema", "newer-schema", "not-an-object"])
def test_report_bad_results(tmp_path, capsys, content, needles):
    if content is not None:
        (tmp_path / "results.json").write_text(content)
    rc, so, se = _main(["report", tmp_path], capsys)
    clean(rc, so, se, *needles)
    assert not (tmp_path / "report.html").exists()


# --- a few end-to-end subprocess runs: real exit codes, no tracebacks ------------------------
def test_subprocess_exit_codes_and_no_tracebacks(models, tmp_path):
    """Five cases through ``python -m sinkhole`` (run side by side to save time)."""
    import subprocess
    import sys

    from helpers_reliability import env

    cases = {
        "missing": (["scan", "/no/such/model.gguf", "--out", tmp_path / "o1"], 2, ["does not exist"]),
        "hub-offline": (["scan", "nobody/not-a-cached-model", "--out", tmp_path / "o2"], 2, ["HF_HUB_OFFLINE"]),
        "argparse": (["scan", "--curve-reps", "many"], 2, ["invalid int value"]),
        "overflow": (["scan", models["overflow"], "--dtype", "float16", "--quick", "--out", tmp_path / "o3"], 3,
                     ["non-finite values", "--dtype float32"]),
    }
    if not torch.cuda.is_available():
        cases["cuda"] = (["scan", models["tiny"], "--device", "cuda", "--out", tmp_path / "o4"], 2,
                         ["no CUDA GPU", "--device cpu"])
    procs = {k: subprocess.Popen([sys.executable, "-m", "sinkhole", *map(str, argv)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env(SINKHOLE_CACHE=str(tmp_path / "c")))
             for k, (argv, _, _) in cases.items()}
    for k, proc in procs.items():
        so, se = proc.communicate(timeout=300)
        argv, code, needles = cases[k]
        assert proc.returncode == code, (k, proc.returncode, se)
        assert "Traceback" not in so + se, (k, se)
        last = se.strip().splitlines()[-1]
        assert last.startswith("sinkhole: error: "), (k, se)
        if k != "overflow":  # the overflow case prints its step progress first, then the error
            assert len(se.strip().splitlines()) == 1, (k, se)
        for n in needles:
            assert n.lower() in last.lower(), (k, n, last)
    for o in ("o1", "o2", "o3", "o4"):
        assert _results(tmp_path / o) == []
    assert files_in(tmp_path / "c") == []


# --- patch files -----------------------------------------------------------------------------
def _patch_doc(**over):
    d = {"format": "sinkhole-patch", "format_version": 1, "name": "t",
         "model": {"family": "llama", "n_layers": 3, "d_model": 64, "d_mlp": 128},
         "ops": [{"layer": 1, "mode": "zero", "neurons": [3, 4], "positions": "nonfirst"}]}
    d.update(over)
    return d


PATCH_CASES = [
    ("missing-file", None, ["not found"]),
    ("not-json", "{oops", ["not valid JSON"]),
    ("not-a-patch", json.dumps({"ops": []}), ["not a sinkhole patch file"]),
    ("newer-format", json.dumps(_patch_doc(format_version=9)), ["newer", "upgrade"]),
    ("wrong-layer-count", json.dumps(_patch_doc(model={"family": "llama", "n_layers": 30})),
     ["n_layers=30", "n_layers=3"]),
    ("wrong-model", json.dumps(_patch_doc(model={"family": "gemma", "n_layers": 3})), ["family=gemma"]),
    ("layer-out-of-range", json.dumps(_patch_doc(model={}, ops=[{"layer": 7, "mode": "zero", "neurons": [1]}])),
     ["layer 7 is out of range"]),
    ("neuron-out-of-range", json.dumps(_patch_doc(ops=[{"layer": 1, "mode": "zero", "neurons": [3, 500]}])),
     ["500", "outside 0..127"]),
    ("unknown-mode", json.dumps(_patch_doc(ops=[{"layer": 1, "mode": "explode", "neurons": [3]}])),
     ["mode 'explode' is unknown"]),
    ("bad-op-field", json.dumps(_patch_doc(ops=[{"layer": 1, "mode": "zero", "colour": "red"}])),
     ["invalid patch op"]),
    ("values-mismatch", json.dumps(_patch_doc(ops=[{"layer": 1, "mode": "set", "neurons": [1, 2, 3],
                                                    "values": [0.0, 1.0]}])), ["2 entries for 3 neurons"]),
]


@pytest.mark.parametrize("case", PATCH_CASES, ids=[c[0] for c in PATCH_CASES])
def test_patch_file_bad_input(case, models, tmp_path, capsys):
    name, content, needles = case
    pf = tmp_path / "patch.json"
    if content is not None:
        pf.write_text(content)
    out = tmp_path / "patched"
    rc, so, se = _main(["patch", models["tiny"], "--patch-file", pf, "--out", out, "--quiet"], capsys)
    clean(rc, so, se, *needles)
    assert files_in(out) == []


# --- the other commands: circuit, sweep, eval, cluster ---------------------------------------
OTHER_CASES = [
    ("circuit-zero-reps", ["circuit", "{tiny}", "--reps", "0"], ["positive integer"]),
    ("circuit-bad-frac", ["circuit", "{tiny}", "--frac", "2"], ["--frac must be in (0, 1]"]),
    ("circuit-bad-attn-reps", ["circuit", "{tiny}", "--attn-reps", "16,x"], ["positive integers"]),
    ("circuit-reps-beyond-context", ["circuit", "{tiny}", "--reps", "100000"], ["context of 512"]),
    ("circuit-out-missing-folder", ["circuit", "{tiny}", "--out", "/no/such/dir/c.json"], ["existing folder"]),
    ("sweep-zero-tokens", ["sweep", "{tiny}", "--tokens", "0", "--checkpoint", "{tmp}/s.json"], ["positive"]),
    ("sweep-drift-layer-out-of-range", ["sweep", "{tiny}", "--drift-layer", "99", "--checkpoint", "{tmp}/s.json"],
     ["--drift-layer must be in 0..2"]),
    ("sweep-checkpoint-missing-folder", ["sweep", "{tiny}", "--checkpoint", "/no/such/dir/s.json"], ["does not exist"]),
    ("sweep-checkpoint-other-settings", ["sweep", "{tiny}", "--drift-layer", "1", "--checkpoint", "{tmp}/old.json"],
     ["other settings"]),
    ("sweep-checkpoint-unreadable", ["sweep", "{tiny}", "--drift-layer", "1", "--checkpoint", "{tmp}/bad.json"],
     ["unreadable"]),
    ("eval-patch-missing", ["eval", "{tiny}", "--patch", "/no/such/patch.json"], ["not found"]),
    ("cluster-size-too-small", ["cluster", "{tiny}", "--size", "1"], ["at least 2"]),
]


@pytest.mark.parametrize("case", OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_other_commands_bad_input(case, models, tmp_path, capsys):
    from sinkhole.cli import COMMANDS

    name, argv, needles = case
    if argv[0] not in COMMANDS:
        pytest.skip(f"sinkhole {argv[0]} is not registered")
    (tmp_path / "old.json").write_text(json.dumps({"config": {"model": "other", "max_reps": 7}, "records": []}))
    (tmp_path / "bad.json").write_text("{truncated")
    argv = [a.format(tiny=models["tiny"], tmp=tmp_path) for a in argv]
    before = set(files_in(tmp_path))
    rc, so, se = _main(argv + ["--quiet"], capsys)
    clean(rc, so, se, *needles)
    assert set(files_in(tmp_path)) == before  # nothing written


def test_report_of_a_fifo_is_refused_not_a_hang(tmp_path, capsys):
    """A named pipe would block a read forever: refused in one line (regression)."""
    import os

    from sinkhole.cli import main

    fifo = tmp_path / "results.json"
    os.mkfifo(fifo)
    assert main(["report", str(fifo)]) == 2
    err = capsys.readouterr().err
    assert "not a regular file" in err and err.count("\n") == 1
    assert main(["report", str(tmp_path)]) == 2  # a folder whose results.json is a FIFO
    assert "not a regular file" in capsys.readouterr().err
