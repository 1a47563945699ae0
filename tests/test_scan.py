"""The scan pipeline on a tiny random model: every step, determinism, Ctrl-C + --resume, failing
steps, the CLI's options and bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest

import sinkhole.cli as cli
import sinkhole.pipeline.registry as scan
import sinkhole.pipeline.registry as scan_steps
from sinkhole.results import StepResult
from sinkhole.pipeline.engine import PARTIAL, Context, Step
from sinkhole.pipeline.registry import run_scan
from tiny import tiny_lm

QUICK = {"seed": 0, "quick": True, "patch": False, "words": ["the", "poem"],
         "curve_reps": 40}


@pytest.fixture
def lm():
    return tiny_lm("llama", n_layers=3)


@dataclasses.dataclass
class Blob(StepResult):
    """The result type of the test steps below."""

    data: dict


class Pipe:
    """Edit the scan pipeline for one test (``scan_steps.PIPELINE`` is restored afterwards)."""

    def __init__(self, monkeypatch):
        self.mp = monkeypatch

    def set(self, steps):
        self.mp.setattr(scan_steps, "PIPELINE", scan.pipeline(list(steps)))

    def add(self, name, fn, only_with=None):
        self.set(list(scan_steps.PIPELINE) + [Step(name, lambda ctx: Blob(fn(ctx)), name, Blob, only_with)])

    def replace_fns(self, make):
        """Every step's function replaced by ``make(step)``."""
        self.set([dataclasses.replace(s, fn=make(s)) for s in scan_steps.PIPELINE])


@pytest.fixture
def few_steps(monkeypatch):
    """Only the foundation's light steps (tests of the pipeline machinery stay fast however many
    steps the other areas add)."""
    pipe = Pipe(monkeypatch)
    pipe.set([s for s in scan_steps.PIPELINE if s.name in ("model", "layer_norms")])
    return pipe


@pytest.fixture
def tiny_cli(monkeypatch):
    """Make the CLI load a tiny random model whatever MODEL says."""
    monkeypatch.setattr(cli, "load_from_args", lambda args: tiny_lm("llama", n_layers=3))
    monkeypatch.setenv("SINKHOLE_NO_PROGRESS", "1")


def test_every_registered_step_runs_on_a_tiny_model():
    from helpers_report import TINY_OPTIONS, tiny_scan

    doc, out, _ = tiny_scan()  # one full quick scan (with --patch) shared with the report tests
    assert not doc.get("errors"), doc.get("errors")
    names = [s.name for s in scan.selected_steps(TINY_OPTIONS)]
    assert doc["steps"] == names
    assert set(doc["results"]) == set(names) - {"model"}
    assert doc["model"]["name"] == "tiny-llama"
    assert doc["options"]["quick"] is True
    assert doc["schema_version"] >= 1


def test_the_whole_pipeline_is_deterministic():
    """Same options and seed, a fresh model object: byte-identical results.json."""
    from helpers_report import TINY_OPTIONS, tiny_scan

    _, out, _ = tiny_scan()
    again = run_scan(tiny_lm("llama", n_layers=3), TINY_OPTIONS, out / "again", log=lambda m: None)["doc"]
    from sinkhole.results import dumps

    assert dumps(again) == (out / "results.json").read_text()


def test_ctrl_c_keeps_finished_steps_and_resume_continues(lm, tmp_path, few_steps):
    calls = []

    def _boom(ctx: Context):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return {"seen_layer_norms": ctx.results.get("layer_norms") is not None}

    few_steps.add("zz_interrupt", _boom)

    with pytest.raises(KeyboardInterrupt):
        run_scan(lm, QUICK, tmp_path, log=lambda m: None)
    saved = json.loads((tmp_path / PARTIAL).read_text())
    done = [s.name for s in scan.selected_steps(QUICK)][:-1]
    assert sorted(saved["results"]) == sorted(done)  # every step before the interrupted one is kept
    assert "zz_interrupt" not in saved["results"]

    ran = []
    few_steps.replace_fns(lambda s: (lambda ctx: (ran.append(s.name), s.fn(ctx))[1]))  # spy: which steps run
    logs = []
    doc = run_scan(lm, QUICK, tmp_path, resume=True, log=logs.append)["doc"]
    assert ran == ["zz_interrupt"]
    assert doc["results"]["zz_interrupt"] == {"data": {"seen_layer_norms": True}}
    assert any("resuming" in m for m in logs)


def test_resume_with_other_options_starts_over(lm, tmp_path, few_steps):
    run_scan(lm, QUICK, tmp_path, log=lambda m: None)
    from sinkhole.results import write_json

    # a checkpoint from another model is not reused
    write_json(tmp_path / PARTIAL, {"model": "other-model", "options": QUICK, "results": {"model": {}}, "timings": {}})
    logs = []
    run_scan(lm, QUICK, tmp_path, resume=True, log=logs.append)
    assert any("starting over" in m for m in logs)


def test_resume_of_a_finished_scan_reuses_its_results(lm, tmp_path, few_steps):
    from sinkhole.results import write_json

    doc = run_scan(lm, QUICK, tmp_path, log=lambda m: None)["doc"]
    write_json(tmp_path / "results.json", doc)
    few_steps.replace_fns(lambda s: lambda ctx: pytest.fail("a finished step ran again"))
    again = run_scan(lm, QUICK, tmp_path, resume=True, log=lambda m: None)["doc"]
    assert again == doc


def test_a_failing_step_is_recorded_and_the_scan_goes_on(lm, tmp_path, few_steps, monkeypatch):
    monkeypatch.delenv("SINKHOLE_DEBUG", raising=False)

    def _broken(ctx):
        raise ValueError("bad shape")

    few_steps.add("zz_broken", _broken)

    def _after(ctx):
        return {"ok": 1}

    few_steps.add("zz_after", _after)

    doc = run_scan(lm, QUICK, tmp_path, log=lambda m: None)["doc"]
    assert doc["errors"] == {"zz_broken": "ValueError: bad shape"}
    assert doc["results"]["zz_after"] == {"data": {"ok": 1}}
    assert "zz_broken" not in doc["results"]
    monkeypatch.setenv("SINKHOLE_DEBUG", "1")
    with pytest.raises(ValueError):
        run_scan(lm, QUICK, tmp_path / "debug", log=lambda m: None)


def test_only_with_steps_need_their_option(lm, tmp_path, few_steps):
    def _p(ctx):
        return {"ran": True}

    few_steps.add("zz_patchy", _p, only_with="patch")

    assert "zz_patchy" not in run_scan(lm, QUICK, tmp_path / "a", log=lambda m: None)["doc"]["steps"]
    doc = run_scan(lm, {**QUICK, "patch": True}, tmp_path / "b", log=lambda m: None)["doc"]
    assert doc["results"]["zz_patchy"] == {"data": {"ran": True}}


def test_resume_adds_patch_steps_to_a_finished_scan(lm, tmp_path, few_steps):
    from sinkhole.results import write_json

    ran = []

    def _p(ctx):
        ran.append("zz_patch_only")
        return {"sink_layer_seen": ctx.results.get("layer_norms") is not None}

    few_steps.add("zz_patch_only", _p, only_with="patch")

    doc = run_scan(lm, QUICK, tmp_path, log=lambda m: None)["doc"]
    write_json(tmp_path / "results.json", doc)
    few_steps.replace_fns(lambda s: s.fn if s.name == "zz_patch_only" else
                          (lambda ctx: pytest.fail("a finished step ran again")))
    again = run_scan(lm, {**QUICK, "patch": True}, tmp_path, resume=True, log=lambda m: None)["doc"]
    assert ran == ["zz_patch_only"]
    assert again["results"]["zz_patch_only"] == {"data": {"sink_layer_seen": True}}
    assert again["options"]["patch"] is True and again["steps"][-1] == "zz_patch_only"


def test_quick_is_visible_to_steps(lm, tmp_path, few_steps):
    seen = {}

    def _q(ctx):
        seen["quick"], seen["opt"] = ctx.quick, ctx.options.quick
        return {}

    few_steps.add("zz_quick", _q)

    run_scan(lm, {k: v for k, v in QUICK.items() if k != "quick"}, tmp_path, log=lambda m: None)
    assert seen == {"quick": False, "opt": False}  # default filled in


def test_cli_scan_writes_everything_and_prints_timings(tiny_cli, tmp_path, capsys, few_steps):
    out = tmp_path / "scan"
    rc = cli.main(["scan", "--quick", "--out", str(out), "--curve-reps", "30"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "step timings:" in err and "layer_norms" in err and "total" in err
    doc = json.loads((out / "results.json").read_text())
    assert doc["options"]["quick"] is True and doc["options"]["curve_reps"] == 30
    t = json.loads((out / "timings.json").read_text())
    assert set(t["steps"]) == set(doc["steps"]) and t["total_s"] >= 0
    html = (out / "report.html").read_text()
    assert "<h1>" in html
    figs = sorted(p.name for p in (out / "figures").iterdir())
    assert figs and {p.rsplit(".", 1)[1] for p in figs} == {"png", "svg"}
    for name in {p.rsplit(".", 1)[0] for p in figs}:
        assert f'data-figure="{name}"' in html
    assert not (out / PARTIAL).exists()
    # same command, same seed: byte-identical results.json
    rc = cli.main(["scan", "--quick", "--quiet", "--out", str(tmp_path / "again"), "--curve-reps", "30"])
    assert rc == 0
    assert (tmp_path / "again" / "results.json").read_bytes() == (out / "results.json").read_bytes()


def test_cli_scan_resume_after_ctrl_c(tiny_cli, tmp_path, capsys, few_steps):
    state = {"n": 0}

    def _c(ctx):
        state["n"] += 1
        if state["n"] == 1:
            raise KeyboardInterrupt
        return {"n": state["n"]}

    few_steps.add("zz_ctrl_c", _c)

    out = tmp_path / "s"
    rc = cli.main(["scan", "--quick", "--out", str(out), "--curve-reps", "30"])
    err = capsys.readouterr().err
    assert rc == 130 and "--resume" in err and "Traceback" not in err
    assert "during step 'zz_ctrl_c'" in err and "2 finished step(s) kept" in err
    assert (out / PARTIAL).exists() and not (out / "results.json").exists()
    rc = cli.main(["scan", "--quick", "--out", str(out), "--curve-reps", "30", "--resume"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "resuming" in err
    assert json.loads((out / "results.json").read_text())["results"]["zz_ctrl_c"] == {"data": {"n": 2}}


@pytest.mark.parametrize("argv, needle", [
    (["--curve-reps", "0"], "--curve-reps"),
    (["--curve-reps", "100000"], "context"),
    (["--words", " , "], "--words"),
    (["--words", "a,,b"], "--words"),
])
def test_cli_scan_bad_input_is_one_line(tiny_cli, tmp_path, capsys, argv, needle):
    out = tmp_path / "bad"
    rc = cli.main(["scan", "--quick", "--out", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert err.startswith("sinkhole: error:") and needle in err and "\n" not in err
    assert not (out / "results.json").exists() and not (out / "report.html").exists()


def test_cli_scan_out_is_a_file(tiny_cli, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert cli.main(["scan", "--out", str(f)]) != 0
    assert "not a folder" in capsys.readouterr().err


def test_cli_scan_options_from_a_config_file_and_flags(tiny_cli, tmp_path, capsys, few_steps):
    cfg = tmp_path / "options.json"
    cfg.write_text(json.dumps({"quick": True, "curve_reps": 25, "words": ["cat"], "seed": 3}))
    out = tmp_path / "c"
    assert cli.main(["scan", "--config", str(cfg), "--out", str(out), "--words", "dog", "--quiet"]) == 0
    opts = json.loads((out / "results.json").read_text())["options"]
    assert opts["quick"] is True and opts["curve_reps"] == 25 and opts["seed"] == 3  # from the file
    assert opts["words"] == ["dog"]  # the flag wins
    assert opts["diverge_tokens"] == 12 and opts["attn_reps"] == [16]  # quick values, capped by curve_reps
    # the options of a results.json are a valid config: the same scan again
    cfg.write_text(json.dumps(opts))
    assert cli.main(["scan", "--config", str(cfg), "--out", str(tmp_path / "d"), "--quiet"]) == 0
    assert (tmp_path / "d" / "results.json").read_bytes() == (out / "results.json").read_bytes()
    capsys.readouterr()
    cfg.write_text(json.dumps({"curve_words": ["x"]}))
    assert cli.main(["scan", "--config", str(cfg), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "unknown scan option(s) ['curve_words']" in err and err.count("\n") == 1


def test_every_scan_option_has_a_flag():
    from sinkhole.pipeline.engine import ScanOptions

    parser = cli.build_parser()
    scan_parser = parser._subparsers._group_actions[0].choices["scan"]
    dests = {a.dest for a in scan_parser._actions}
    assert {f.name for f in dataclasses.fields(ScanOptions)} <= dests


def test_cli_scan_role_overrides(tiny_cli, tmp_path, capsys, monkeypatch):
    import sinkhole.pipeline.registry as scan_steps

    light = [s for s in scan.PIPELINE if s.name in ("model", "circuit", "norm_curves", "sweep")]
    monkeypatch.setattr(scan_steps, "PIPELINE", scan.pipeline(light))
    out = tmp_path / "r"
    rc = cli.main(["scan", "--quick", "--out", str(out), "--curve-reps", "30", "--drift-layer", "0",
                   "--massive-layer", "2", "--marking-layers", "0,1"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "drift layer 0 (set by you)" in err and "massive layer 2 (set by you)" in err
    res = json.loads((out / "results.json").read_text())["results"]
    c = res["circuit"]
    assert (c["drift_layer"], c["massive_layer"], c["marking_layers"]) == (0, 2, [0, 1])
    assert c["roles"]["drift_layer"]["source"] == "override"
    assert res["norm_curves"]["layer"] == 2 and res["sweep"]["config"]["drift_layer"] == 0
    assert cli.main(["scan", "--quick", "--out", str(tmp_path / "bad"), "--drift-layer", "7"]) == 2
    assert "--drift-layer must be in 0..2" in capsys.readouterr().err
    assert cli.main(["scan", "--quick", "--out", str(tmp_path / "bad"), "--marking-layers", "1,,2"]) == 2
