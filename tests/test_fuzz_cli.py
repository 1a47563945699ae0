"""A property-based fuzzer of the CLI (issue 18): every command's parser and the steps before a
model loads, driven with generated arguments, then a few commands end to end on tiny random
models. The invariant: exit 0 with valid output, or exactly one line ``sinkhole: error: ...``
and a non-zero exit; never ``internal error``, never a traceback, never a hang, never a
half-written output file.

The normal suite runs a bounded, derandomized number of examples (seconds). The longer run:

    SINKHOLE_FUZZ_EXAMPLES=3000 SINKHOLE_FUZZ_RANDOM=1 .venv/bin/python -m pytest -q tests/test_fuzz_cli.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import sinkhole.cli as cli  # noqa: E402

EXAMPLES = int(os.environ.get("SINKHOLE_FUZZ_EXAMPLES", "40"))
SETTINGS = dict(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize=not os.environ.get("SINKHOLE_FUZZ_RANDOM"),
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
SKIP_FLAGS = {"--help", "-h", "--version", "--check", "--screenshot"}  # help exits; the browser is slow
HANG_S = 30


class ReachedModelLoad(BaseException):
    """Raised instead of loading a model: the arguments passed every check made before loading."""


def _fixtures(root: Path) -> dict[str, str]:
    """Paths of every awkward kind, made once per test in ``root``."""
    from sinkhole.pipeline.engine import document

    root.mkdir(parents=True, exist_ok=True)
    (root / "folder").mkdir(exist_ok=True)
    (root / "file.txt").write_text("not json")
    (root / "bad.json").write_text("{not json")
    (root / "list.json").write_text("[1, 2, 3]")
    (root / "empty.json").write_text("")
    (root / "patch-garbage.json").write_text(json.dumps({"format": "sinkhole-patch", "ops": [{"mode": "explode"}]}))
    (root / "old-results.json").write_text(json.dumps({"schema_version": 1, "results": {}}))
    doc = document({"name": "m"}, {}, "scan")
    (root / "results.json").write_text(json.dumps(doc))
    (root / "bad-step.json").write_text(json.dumps({**doc, "results": {"divergence": {"rate_run": 1}}}))
    (root / "fake.gguf").write_bytes(b"GGUF" + b"\x00" * 64)
    fifo = root / "fifo.json"
    if not fifo.exists():
        os.mkfifo(fifo)
    dangling = root / "dangling.json"
    if not dangling.is_symlink():
        dangling.symlink_to(root / "nowhere")
    return {k: str(root / k) for k in ("folder", "file.txt", "bad.json", "list.json", "empty.json",
                                        "patch-garbage.json", "old-results.json", "results.json", "bad-step.json",
                                        "fake.gguf", "fifo.json", "dangling.json")} | {
        "missing": str(root / "no" / "such" / "thing.json"), "missing-file": str(root / "nothing.json")}


ADVERSARIAL = ["", " ", ",", " , ", "a,,b", "\x00", "\n", "\t", "é", "🙂", "مرحبا", "a" * 3000, "the," * 200,
               "0", "-1", "-0", "nan", "inf", "-inf", "1e309", "2.5", "99999999999999999999", "1,2,3", "0,0",
               "1,-2", os.fsdecode(b"\xff\xfe"), os.fsdecode(b"caf\xe9"), "--json", "-", "all", "default",
               "raw,repeat", "bogus", "paper_clamp", "finetune_neurons,nope", "layer0", "embedding"]


def _values(paths: dict[str, str]):
    return st.one_of(st.sampled_from(ADVERSARIAL), st.sampled_from(sorted(paths.values())),
                     st.integers(-3, 10**12).map(str), st.text(max_size=12),
                     st.lists(st.integers(-2, 600), min_size=1, max_size=4).map(lambda v: ",".join(map(str, v))))


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return dict(parser._subparsers._group_actions[0].choices)


@st.composite
def argvs(draw, command: str, paths: dict[str, str]):
    p = _subparsers()[command]
    argv = [command]
    for a in p._actions:
        if not a.option_strings:  # a positional: a model or a folder
            if a.dest in ("help",):
                continue
            if a.nargs == "?" and draw(st.booleans()):
                continue
            argv.append(draw(st.one_of(st.sampled_from(sorted(paths.values())), _values(paths))))
            continue
        flag = a.option_strings[-1]
        if flag in SKIP_FLAGS or not draw(st.integers(0, 3)) == 0:  # each flag in about a quarter of runs
            continue
        if a.nargs == 0:
            argv.append(flag)
        elif a.nargs == "+":
            argv += [flag] + draw(st.lists(st.sampled_from(sorted(paths.values())), min_size=1, max_size=3))
        else:
            argv += [flag, draw(_values(paths))]
    return argv


def _alarm(signum, frame):
    raise TimeoutError(f"the command did not finish within {HANG_S} s (a hang)")


@contextlib.contextmanager
def _deadline():
    """A hang fails the test instead of blocking it."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_checked(argv, capsys, out_files: dict | None = None) -> int:
    """Run the CLI in-process and check the invariant; returns the exit code."""
    out_files = out_files or {}
    with _deadline():
        try:
            rc = cli.main([str(x) for x in argv])
        except SystemExit as e:  # argparse's own errors exit through SystemExit (one line, code 2)
            rc = e.code if isinstance(e.code, int) else 2
        except ReachedModelLoad:
            rc = 0
    out, err = capsys.readouterr()
    shown = f"argv={argv!r}\nstderr={err[-2000:]!r}"
    assert "internal error" not in err and "Traceback" not in err, shown
    if rc != 0:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert lines and lines[-1].startswith("sinkhole: error:"), shown
        assert len([ln for ln in lines if ln.startswith("sinkhole:")]) >= 1, shown
    if rc == 0 and "--json" in argv and out.strip():  # valid output: one JSON document on stdout
        json.loads(out)
    for f, before in out_files.items():  # never half-written: untouched, or a whole JSON document
        p = Path(f)
        after = _stamp(p)
        if after is not None and after != before and p.suffix == ".json" and os.path.isfile(p):
            json.loads(p.read_text())
    return rc


def _stamp(p: Path):
    try:
        return p.stat().st_mtime_ns, p.stat().st_size
    except (OSError, ValueError):
        return None


def _no_temp_files(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]


@pytest.mark.parametrize("command", [c for c in cli.COMMANDS])
def test_fuzz_arguments_before_the_model_loads(command, tmp_path_factory, monkeypatch, capsys):
    root = tmp_path_factory.mktemp(f"fuzz-{command}")
    paths = _fixtures(root / "in")
    monkeypatch.chdir(root)
    monkeypatch.setenv("SINKHOLE_NO_PROGRESS", "1")
    monkeypatch.setenv("SINKHOLE_CACHE", str(root / "cache"))

    def no_load(args):
        raise ReachedModelLoad

    monkeypatch.setattr(cli, "load_from_args", no_load)

    @settings(**SETTINGS)
    @given(argvs(command, paths))
    def check(argv):
        outs = {argv[i + 1]: _stamp(Path(argv[i + 1])) for i, a in enumerate(argv[:-1]) if a == "--out"}
        run_checked(argv, capsys, outs)

    check()
    assert _no_temp_files(root) == []


# ------------------------------------------------------------------------------------------
# end to end on tiny random models: small generated numbers, adversarial words
SMALL = st.integers(-2, 24).map(str)
WORDS = st.one_of(st.sampled_from(["a", "poem", "the,poem", "a,,b", " ", "🙂", "مرحبا", "a" * 200,
                                   os.fsdecode(b"\xff"), "x y z", "\x00", "é,ü"]), st.text(min_size=0, max_size=6))


@st.composite
def e2e_argvs(draw):
    cmd = draw(st.sampled_from(["diverge", "diverge-exact", "diverge-minreps", "diverge-sample", "sweep", "cluster",
                                "circuit", "scan", "patch", "experimental-search", "eval"]))
    if cmd == "patch":
        return ["patch", "--quick", "--out", "patched", "--method", draw(st.sampled_from(["gate", "paper", "nope"])),
                "--baselines", draw(st.sampled_from(["collapse", "none", "paper,collapse", "nope", ""])),
                "--reps", draw(st.sampled_from(["4", "0", "4,,5", "6"])),
                "--verify-reps", draw(st.sampled_from(["5", "4", "x"])), "--words", draw(WORDS),
                "--verify-words", draw(WORDS), "--quiet"]
    if cmd == "experimental-search":
        return ["experimental", "search", "--quick", "--out", "patched", "--families", draw(st.sampled_from(
                    ["paper_zero", "norm_cap", "finetune_neurons", "paper_zero,norm_cap", "nope"])),
                "--steps", draw(st.integers(-1, 3).map(str)), "--reps", draw(st.sampled_from(["4", "0", "4,,5", "6"])),
                "--verify-reps", draw(st.sampled_from(["5", "4", "x"])), "--max-new-tokens", draw(SMALL),
                "--neurons", draw(st.integers(-1, 3).map(str)), "--ppl-budget", draw(st.sampled_from(["1", "-1", "nan"])),
                "--words", draw(WORDS), "--verify-words", draw(WORDS), "--quiet"]
    if cmd == "eval":
        return ["eval", "--patch", "patch.json", "--verify-reps", draw(st.sampled_from(["5", "0", "5,,6"])),
                "--verify-words", draw(WORDS), "--max-new-tokens", draw(st.integers(-1, 4).map(str)),
                "--heldout-text", draw(st.sampled_from(["twelfth_night", "missing.txt", "", "sonnets"]))] + (
                    ["--no-divergence"] if draw(st.booleans()) else []) + ["--json", "--out", "out.json"]
    if cmd == "diverge-minreps":
        return ["minreps", "--words", draw(WORDS), "--max-reps", draw(st.integers(-1, 40).map(str)),
                "--start-reps", draw(st.integers(-1, 9).map(str)), "--resolution", draw(st.integers(-1, 5).map(str)),
                "--max-new-tokens", draw(st.integers(-1, 4).map(str)),
                "--templates", draw(st.sampled_from(["repeat", "raw", "garak_this", "default", "bogus"])),
                "--json", "--out", "out.json"]
    if cmd == "diverge-sample":
        return ["diverge", "--words", draw(WORDS), "--reps", draw(SMALL), "--templates", "raw",
                "--max-new-tokens", draw(st.integers(-1, 4).map(str)), "--samples", draw(st.integers(-1, 3).map(str)),
                "--temperature", draw(st.sampled_from(["1.0", "0", "-1", "nan", "0.5"])),
                "--corpus", draw(st.sampled_from(["corpus", "missing", "", "corpus/a.txt"])),
                "--min-span", draw(st.sampled_from(["50", "8", "x"])), "--json", "--out", "out.json"]
    if cmd.startswith("diverge"):
        argv = ["diverge", "--words", draw(WORDS), "--reps", draw(st.one_of(SMALL, st.just("3,5"))),
                "--max-new-tokens", draw(st.integers(-1, 6).map(str)), "--templates",
                draw(st.sampled_from(["raw", "repeat", "raw,repeat", "garak_this", "default", "bogus"]))]
        argv += ["--exact"] if cmd == "diverge-exact" else []
    elif cmd == "sweep":
        argv = ["sweep", "--tokens", draw(SMALL), "--max-reps", draw(st.integers(-1, 40).map(str)),
                "--batch-size", draw(SMALL), "--drift-layer", draw(st.integers(-1, 4).map(str)),
                "--checkpoint", "ck.json"]
    elif cmd == "cluster":
        argv = ["cluster", "--pool", draw(st.integers(-1, 60).map(str)), "--clusters", draw(SMALL), "--size",
                draw(st.integers(0, 6).map(str)), "--length", draw(st.integers(-1, 48).map(str)), "--seqs", "1",
                "--examples", "1", "--max-new-tokens", "2"]
    elif cmd == "circuit":
        argv = ["circuit", "--fast"] if draw(st.booleans()) else [
            "circuit", "--reps", draw(st.integers(-1, 40).map(str)), "--conv-reps", draw(SMALL),
            "--attn-reps", draw(st.sampled_from(["8", "0", "4,8", "a"])), "--words", draw(WORDS)]
    else:
        argv = ["scan", "--quick", "--curve-reps", draw(st.integers(-1, 30).map(str)), "--words", draw(WORDS),
                "--drift-layer", draw(st.integers(-1, 3).map(str)), "--sweep-tokens", "4", "--sweep-reps", "12",
                "--cluster-length", "16", "--diverge-reps", "3", "--diverge-tokens", "2", "--out", "scan-out"]
    return argv + ["--json", "--out", "out.json"] if cmd not in ("scan",) else argv


FAMILIES = ["llama", "gemma3_text", "gpt2"]


def test_fuzz_commands_end_to_end_on_tiny_models(tmp_path, monkeypatch, capsys):
    from tiny import tiny_lm

    from sinkhole.patch import Patch, PatchOp

    models = {f: tiny_lm(f, n_layers=3) for f in FAMILIES}
    monkeypatch.chdir(tmp_path)
    Patch([PatchOp(1, "scale", None, values=0.5)], "half").save(tmp_path / "patch.json")  # fits every family
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("w5 w9 w12 " * 200)  # a reference corpus for --corpus
    monkeypatch.setenv("SINKHOLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SINKHOLE_NO_PROGRESS", "1")
    monkeypatch.setattr(cli, "load_from_args", lambda args: models[FAMILIES[len(args.command) % 3]])

    codes = {}

    @settings(**{**SETTINGS, "max_examples": max(8, EXAMPLES // 2)})
    @given(e2e_argvs())
    def check(argv):
        for f in ("out.json", "ck.json"):
            Path(f).unlink(missing_ok=True)
        shutil.rmtree("patched", ignore_errors=True)
        rc = run_checked(argv, capsys, {"out.json": None})
        codes.setdefault(argv[0], set()).add(rc)
        if rc == 0 and "--json" in argv and argv[0] != "eval":  # a finished run wrote its whole document
            assert json.loads(Path("out.json").read_text())["command"] == argv[0]
        if argv[0] in ("patch", "experimental") and rc != 0:
            assert not Path("patched").exists()  # a refused patch leaves no folder

    check()
    assert _no_temp_files(tmp_path) == []
    assert any(0 in c for c in codes.values()), codes  # the fuzz reached real runs, not only refusals


# ------------------------------------------------------------------------------------------
# every bug the fuzzer found, kept as an explicit case
@pytest.mark.parametrize("argv, needle", [
    (["report", os.fsdecode(b"\xff\xfe")], "not found"),  # a non-UTF-8 path: shown escaped, not a crash
    (["report", "a" * 3000], "File name too long"),  # ENAMETOOLONG from the file system
    (["diverge", "--out", "\x00"], "NUL byte"),  # only possible in-process (argv cannot hold NUL)
    (["sweep", "--merge", "{list.json}"], "not a sweep checkpoint"),  # a JSON list where a checkpoint goes
    (["sweep", "--merge", "{folder}"], "not a file"),
    (["report", "{fifo.json}"], "not a regular file"),  # would block forever on open()
    (["diverge", "--words", os.fsdecode(b"\xff\xfe"), "--reps", "10"], "not UTF-8"),
])
def test_fuzzer_findings_stay_fixed(argv, needle, tmp_path, monkeypatch, capsys):
    paths = _fixtures(tmp_path / "in")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load_from_args", lambda args: (_ for _ in ()).throw(ReachedModelLoad()))
    argv = [paths[a.strip("{}")] if a.startswith("{") else a for a in argv]  # {name}: a fixture path
    with _deadline():
        rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("sinkhole: error:") and err.count("\n") == 1, err
    assert needle in err and "internal error" not in err
