"""Determinism and interruption of ``sinkhole scan`` through the real CLI, in subprocesses, on a
tiny model saved as a Hugging Face folder (every registered scan step runs on it with --quick).

* the same command and seed give a byte-identical results.json (timings live in timings.json);
* a scan interrupted by SIGINT or SIGKILL after some steps keeps them in DIR/.partial.json, and
  ``--resume`` finishes it without redoing them, with a results.json byte-identical to an
  uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers_reliability import default_sigint, env, files_in, make_tiny_folder, read_json

DRIVER = Path(__file__).with_name("driver_reliability.py")
FOUNDATION = ["model", "layer_norms"]  # the foundation's steps (scan_steps.py), before the circuit


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_folder(tmp_path_factory.mktemp("models") / "tiny-llama")


def _args(model, out, *extra):
    return [sys.executable, str(DRIVER), "scan", str(model), "--out", str(out), "--quick", "--seed", "3", *extra]


def _scan(model, out, *extra, **env_extra):
    p = subprocess.run(_args(model, out, *extra), capture_output=True, text=True, timeout=600, env=env(**env_extra))
    assert "Traceback" not in p.stderr, p.stderr
    return p


@pytest.fixture(scope="module")
def reference(tiny_folder, tmp_path_factory):
    """An uninterrupted scan: (results.json bytes, folder)."""
    out = tmp_path_factory.mktemp("ref")
    p = _scan(tiny_folder, out)
    assert p.returncode == 0, p.stderr
    return (out / "results.json").read_bytes(), out


def _before_gate(ref_dir) -> list[str]:
    """The steps that run before the test gate (the foundation's, in pipeline order)."""
    steps = read_json(ref_dir / "results.json")["steps"]
    return steps[:steps.index("gate")]


def test_scan_is_deterministic(tiny_folder, reference, tmp_path):
    ref_bytes, ref_dir = reference
    doc = read_json(ref_dir / "results.json")
    assert _before_gate(ref_dir)[:2] == ["model", "layer_norms"]
    assert doc["results"]["gate"]["finished_before"] == sorted(_before_gate(ref_dir))
    p = _scan(tiny_folder, tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "results.json").read_bytes() == ref_bytes
    # timings are kept out of results.json
    assert "timings" not in ref_bytes.decode() and "_s\"" not in ref_bytes.decode()
    assert read_json(tmp_path / "timings.json")["steps"].keys() >= set(FOUNDATION)
    assert not (tmp_path / ".partial.json").exists()
    # another seed is a different run: the seed is recorded in the results
    assert doc["options"]["seed"] == 3


def _interrupt(model, out, sig, tmp_path):
    gate = tmp_path / f"gate-{sig}"
    proc = subprocess.Popen(_args(model, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env(SINKHOLE_TEST_GATE=str(gate)), preexec_fn=default_sigint)
    t0 = time.time()
    while not gate.exists():
        if proc.poll() is not None:
            raise AssertionError(f"scan ended before the gate: {proc.stderr.read()}")
        if time.time() - t0 > 300:
            proc.kill()
            raise AssertionError("scan never reached the gate")
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_scan_resumes_to_the_same_result(tiny_folder, reference, tmp_path, sig):
    ref_bytes, ref_dir = reference
    before = _before_gate(ref_dir)
    out = tmp_path / "out"
    code, err = _interrupt(tiny_folder, out, sig, tmp_path)
    if sig in (signal.SIGINT, signal.SIGTERM):  # SIGTERM (a scheduler, kill) ends it like Ctrl-C
        assert code == 130, err
        assert "Traceback" not in err
        assert "--resume" in err.strip().splitlines()[-1]
    else:
        assert code == -signal.SIGKILL
    # the finished steps are checkpointed, no result files and no temporary files are left behind
    partial = read_json(out / ".partial.json")
    assert sorted(partial["results"]) == sorted(before)
    assert files_in(out) == [".partial.json"], files_in(out)
    # --resume keeps the finished steps (it does not rerun them) and completes the scan
    p = _scan(tiny_folder, out, "--resume")
    assert p.returncode == 0, p.stderr
    assert f"resuming: {len(before)} finished step(s) kept" in p.stderr
    for name in before:
        assert f"] {name}: " not in p.stderr, name  # not run again
    assert (out / "results.json").read_bytes() == ref_bytes
    assert not (out / ".partial.json").exists()


def test_resume_with_other_options_or_model_starts_over(tmp_path, monkeypatch):
    """A checkpoint from other options or another model is not reused (it would mix two runs);
    one with the same ones is. In-process, on the foundation's steps only."""
    import sinkhole.pipeline.registry as S
    from tiny import tiny_lm

    light = FOUNDATION + ["circuit", "norm_curves"]
    monkeypatch.setattr(S, "PIPELINE", S.pipeline([s for s in S.PIPELINE if s.name in light]))

    lm = tiny_lm("llama")
    opts = {"seed": 0, "quick": True, "curve_reps": 20, "words": ["the"]}
    logs = []
    first = S.run_scan(lm, opts, tmp_path, log=logs.append)["doc"]
    # fake an interrupted scan: the checkpoint holds only its first two steps
    partial = read_json(tmp_path / ".partial.json")
    partial["results"] = {k: partial["results"][k] for k in ("model", "layer_norms")}
    from sinkhole.results import write_json
    write_json(tmp_path / ".partial.json", partial)
    logs.clear()
    again = S.run_scan(lm, opts, tmp_path, resume=True, log=logs.append)["doc"]
    assert any("resuming: 2 finished step(s) kept" in m for m in logs), logs
    assert again == first
    logs.clear()
    other = S.run_scan(lm, {**opts, "curve_reps": 30}, tmp_path, resume=True, log=logs.append)["doc"]
    assert any("starting over" in m for m in logs), logs
    assert len(other["results"]["norm_curves"]["curves"][0]["norm"]) == 30
    logs.clear()
    lm2 = tiny_lm("llama", seed=1)
    lm2.name = "another-model"
    S.run_scan(lm2, opts, tmp_path, resume=True, log=logs.append)
    assert any("starting over" in m for m in logs), logs


def test_partial_checkpoint_is_written_atomically(tiny_folder, tmp_path, monkeypatch):
    """The checkpoint and result files go through write_atomic (temp file + rename): a crash in
    the middle of a write leaves the previous file intact and no temporary file."""
    from sinkhole import results as R
    from sinkhole.errors import SinkholeError

    target = tmp_path / "results.json"
    R.write_json(target, {"a": 1})

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(SinkholeError, match="No space left on device"):
        R.write_json(target, {"a": 2})
    assert read_json(target) == {"a": 1}
    assert files_in(tmp_path) == ["results.json"]


# --- the vocabulary sweep: checkpoint after every batch, rerun to resume ---------------------
def _sweep_args(model, ckpt, out):
    return [sys.executable, str(DRIVER), "sweep", str(model), "--tokens", "40", "--max-reps", "32", "--batch-size",
            "8", "--drift-layer", "1", "--checkpoint", str(ckpt), "--out", str(out), "--quiet"]


def _needs_sweep():
    from sinkhole.cli import COMMANDS

    if "sweep" not in COMMANDS:
        pytest.skip("sinkhole sweep is not registered")


@pytest.fixture(scope="module")
def sweep_reference(tiny_folder, tmp_path_factory):
    _needs_sweep()
    d = tmp_path_factory.mktemp("sweep-ref")
    p = subprocess.run(_sweep_args(tiny_folder, d / "ckpt.json", d / "sweep.json"), capture_output=True, text=True,
                       timeout=600, env=env())
    assert p.returncode == 0, p.stderr
    return (d / "sweep.json").read_bytes()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=["SIGINT", "SIGTERM", "SIGKILL"])
def test_interrupted_sweep_resumes_to_the_same_result(tiny_folder, sweep_reference, tmp_path, sig):
    ckpt, out, gate = tmp_path / "ckpt.json", tmp_path / "sweep.json", tmp_path / "gate"
    proc = subprocess.Popen(_sweep_args(tiny_folder, ckpt, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(SINKHOLE_TEST_SWEEP_GATE=str(gate)), preexec_fn=default_sigint)
    t0 = time.time()
    while not gate.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - t0 < 300, "the sweep never checkpointed"
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig in (signal.SIGINT, signal.SIGTERM):
        assert proc.returncode == 130 and "Traceback" not in err
        assert "rerun the same command" in err.strip().splitlines()[-1]
    else:
        assert proc.returncode == -signal.SIGKILL
    assert len(read_json(ckpt)["records"]) == 8  # the first batch is kept
    assert not out.exists()
    p = subprocess.run(_sweep_args(tiny_folder, ckpt, out), capture_output=True, text=True, timeout=600, env=env())
    assert p.returncode == 0, p.stderr
    assert out.read_bytes() == sweep_reference
    assert len(read_json(ckpt)["records"]) == 40


@pytest.mark.experimental
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_patch_leaves_no_half_exported_model(tiny_folder, tmp_path, sig):
    """Ctrl-C or SIGTERM during the patch search's fine-tune: exit 130, a line that says nothing was
    exported and how to continue, no output folder and no temporary folder left behind."""
    out = tmp_path / "patched"
    args = [sys.executable, "-m", "sinkhole", "experimental", "search", str(tiny_folder), "--out", str(out), "--families",
            "finetune_neurons", "--steps", "100000", "--reps", "8", "--verify-reps", "9", "--max-new-tokens", "4"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            preexec_fn=default_sigint)
    seen = ""
    t0 = time.time()
    while "candidate finetune_neurons" not in seen:  # the search reached the (long) fine-tune
        line = proc.stderr.readline()
        assert line or proc.poll() is None, seen
        seen += line
        assert time.time() - t0 < 300, seen
    time.sleep(1.0)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, seen + err
    assert "Traceback" not in err and "nothing was exported" in err.strip().splitlines()[-1]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


def test_concurrent_scans_and_sweeps_do_not_interfere(tiny_folder, reference, sweep_reference, tmp_path):
    """Two scans into two folders and two sweeps with two checkpoints, all four at once on one
    machine (shared model cache, temporary files): each gives exactly its sequential result."""
    ref_bytes, _ = reference
    procs = [subprocess.Popen(_args(tiny_folder, tmp_path / f"scan{i}"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env()) for i in range(2)]
    procs += [subprocess.Popen(_sweep_args(tiny_folder, tmp_path / f"ck{i}.json", tmp_path / f"sweep{i}.json"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0 and "Traceback" not in err, err
    for i in range(2):
        assert (tmp_path / f"scan{i}" / "results.json").read_bytes() == ref_bytes
        assert (tmp_path / f"sweep{i}.json").read_bytes() == sweep_reference
    leftovers = [p for p in tmp_path.rglob("*") if ".tmp" in p.name or p.name.endswith(".partial.json")]
    assert leftovers == []
