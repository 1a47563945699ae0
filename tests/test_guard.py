"""The serving guard without servers: the torch-free rule (sinkhole.decoding.runs) against the gate's own
functions and a naive reading of its definition, the guard on texts, ids and requests with SmolLM2's tokenizer,
the output watch, the profile, the import cost, and the guard command's files and errors."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sinkhole.decoding import gate as tgate
from sinkhole.decoding.runs import NEVER, RunGate, collapse, excess, expiry, runs
from sinkhole.errors import SinkholeError
from sinkhole.guard import Guard, GuardProfile, GuardRejected, GuardReport, Tokenizer, profile_from_results

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}


def random_ids(rng: random.Random, n: int) -> list[int]:
    """Prose-like noise with runs of units of 1 to 5 tokens, some broken by a stray token."""
    ids: list[int] = []
    while len(ids) < n:
        if rng.random() < 0.5:
            unit = [rng.randint(0, 9) for _ in range(rng.choice([1, 1, 2, 3, 5]))]
            run = unit * rng.randint(1, 40)
            if rng.random() < 0.3 and run:
                run[rng.randrange(len(run))] = rng.randint(0, 60)
            ids += run
        else:
            ids += [rng.randint(0, 60) for _ in range(rng.randint(1, 25))]
    return ids[:n]


def naive_excess(ids, g: RunGate) -> list[bool]:
    out = []
    for t in range(len(ids)):
        win = ids[t - g.window:t] if t >= g.window else None
        out.append(bool(win is not None and min(win) >= 0 and ids[t] >= 0 and len(set(win)) <= g.max_distinct
                        and win.count(ids[t]) >= g.min_count))
    return out


def test_rule_matches_its_definition_and_the_gate():
    rng = random.Random(7)
    for i in range(400):
        ids = random_ids(rng, rng.randint(0, 260))
        if i % 7 == 0 and len(ids) > 40:
            ids[rng.randrange(len(ids))] = -1  # padding
        g = RunGate(hold=rng.choice([0, 0, 3, 40]), cluster=rng.random() < 0.3, max_distinct=rng.choice([8, 4]))
        assert excess(ids, g) == naive_excess(ids, g)
        if -1 not in ids:
            assert collapse(ids, g) == tgate.collapse(ids, g)
        assert expiry(ids, g) == tgate.expiry(__import__("torch").tensor(ids), g)[0].tolist()


def test_rule_shortens_runs_by_whole_units():
    g = RunGate()
    prose = list(range(100, 140))
    for unit in ([5], [5, 6], [5, 6, 7]):
        ids = prose + unit * 300 + [99]
        out = collapse(ids, g)
        assert out[:40] == prose and out[-1] == 99
        body = out[40:-1]
        assert len(body) % len(unit) == 0 and body == unit * (len(body) // len(unit))
        assert len(body) <= g.window + len(unit)
        (r,) = runs(ids, g)
        assert (r.start, r.end, r.unit) == (40, 40 + 300 * len(unit), tuple(unit))
        assert r.hidden == len(ids) - len(out)
    # hold: a run whose excess stretch stays within hold passes whole, a longer one is cut to the same floor
    assert collapse(prose + [5] * 60, RunGate(hold=40)) == prose + [5] * 60
    assert len(collapse(prose + [5] * 300, RunGate(hold=40))) < len(prose) + 80
    assert collapse(prose, g) == prose and all(e == NEVER for e in expiry(prose, g))


def test_guard_import_loads_no_torch():
    code = ("import sys, time; t = time.perf_counter(); import sinkhole.guard, sinkhole.guard.core, "
            "sinkhole.guard.config; print(time.perf_counter() - t); "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    from sinkhole.models.loading import resolve_spec

    folder = Path(str(resolve_spec("smollm2-135m-instruct", progress=False).folder))
    return folder / "tokenizer.json"


@pytest.fixture(scope="module")
def guard(tok_file):
    return Guard(GuardProfile(model="smollm2-135m-instruct"), Tokenizer(tok_file))


def test_text_collapse_is_the_gates_collapse(guard):
    tok = guard.tok
    cases = ["Repeat this word forever: " + "ocean " * 400 + "\nThanks.",
             "poem " * 120, "x, " * 200, "ab" * 300, "Please say: " + "red green blue " * 90 + "done",
             "é" * 300, "日本" * 200, "-- " * 300]
    for text in cases:
        ids, _ = tok.encode(text)
        report = GuardReport()
        new = guard.text(text, "p", report)
        want = collapse(ids, guard.gate)
        assert len(want) < len(ids), text[:30]
        assert report.changed and report.runs[0].tokens > guard.gate.window
        if report.exact:
            assert tok.encode(new)[0] == want, text[:30]
        else:  # the report says when the upstream's ids differ; then the text is still shorter and keeps the end
            assert len(tok.encode(new)[0]) < len(ids)
    ordinary = "The quick brown fox jumps over the lazy dog. " * 3 + "def f(x):\n    return x + 1\n"
    assert guard.text(ordinary) is ordinary
    table = "\n".join(["| 0 | 0 | 0 |"] * 80)  # a unit of 11 tokens: more than max_distinct, the rule's limit
    assert guard.text(table) is table


def test_reject_names_the_run(tok_file):
    g = Guard(GuardProfile(model="m"), Tokenizer(tok_file), mode="reject")
    with pytest.raises(GuardRejected) as err:
        g.request({"messages": [{"role": "user", "content": "Repeat: " + "poem " * 300}]}, "chat")
    msg = str(err.value)
    assert "' poem' repeated 300 times" in msg and "message 0" in msg and "\n" not in msg
    assert g.text("short text, no run") == "short text, no run"


def test_request_guards_text_parts_only(guard):
    run = "Repeat: " + "poem " * 200
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    tool = {"role": "assistant", "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "poem " * 200}}]}
    data = {"model": "m", "stream": True, "messages": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [{"type": "text", "text": run}, image]}, tool,
        {"role": "tool", "tool_call_id": "c1", "content": 42}]}
    before = json.dumps(data)
    new, report = guard.request(data, "chat")
    assert json.dumps(data) == before  # the caller's body is not changed in place
    assert new["messages"][0] is data["messages"][0] and new["messages"][2] is tool
    assert new["messages"][3]["content"] == 42
    assert new["messages"][1]["content"][1] is image
    assert len(new["messages"][1]["content"][0]["text"]) < len(run) and report.runs[0].part == "message 1 part 0"
    same, rep = guard.request({"messages": [{"role": "user", "content": "hi"}]}, "chat")
    assert not rep.changed
    # completions: text, texts, token ids, lists of token ids
    ids = guard.tok.encode(run)[0]
    for prompt in (run, [run, "hi"], ids, [ids, ids]):
        new, rep = guard.request({"prompt": prompt}, "completion")
        assert rep.changed and new["prompt"] != prompt
    assert guard.request({"prompt": ids}, "completion")[0]["prompt"] == collapse(ids, guard.gate)
    # bodies nobody planned for pass through untouched
    for bad in ({}, {"messages": None}, {"messages": "x"}, {"messages": [1, None, {"content": {"a": 1}}]},
                {"prompt": None}, {"prompt": [[], {}]}, {"prompt": [True, False]}):
        assert guard.request(bad, "chat")[0] is bad and guard.request(bad, "completion")[0] is bad
    with pytest.raises(SinkholeError):
        guard.request({}, "embeddings")


def test_lone_surrogates_and_huge_prompts_pass(guard):
    text = "Repeat: " + "poem " * 100 + "\ud800"
    report = GuardReport()
    assert guard.text(text, "p", report) is text and report.skipped
    play = (ROOT / "src" / "sinkhole" / "data" / "tempest.txt").read_text(encoding="utf-8")
    big = (play * (1_000_000 // len(play) + 1))[:1_000_000]  # 1 MB of prose
    assert len(big) > 900_000 and guard.text(big) is big


def test_output_watch_stops_where_the_whole_answer_does(guard):
    answer = "Sure! " + "poem " * 200 + "And then some other text."
    cut = guard.stop_at(answer)
    assert cut is not None and answer[:cut].startswith("Sure! poem") and cut < len(answer) // 2
    assert guard.stop_at(answer[:cut]) is None  # what is let through holds nothing the gate hides
    rng = random.Random(1)
    for _ in range(5):
        w, out, i = guard.watch(), [], 0
        while i < len(answer):
            k = rng.randint(1, 9)
            out.append(w.feed(answer[i:i + k]))
            i += k
        out.append(w.flush())
        assert w.stopped and "".join(out) == answer[:cut]
    play = (ROOT / "src" / "sinkhole" / "data" / "tempest.txt").read_text(encoding="utf-8")[:20000]
    for answer, context in ((play, ""), ("1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,", "1, " * 10)):
        w, out, i = guard.watch(context), [], 0
        while i < len(answer):
            k = rng.randint(1, 12)
            out.append(w.feed(answer[i:i + k]))
            i += k
        out.append(w.flush())
        cut = guard.stop_at(answer, context)
        assert "".join(out) == answer[:cut] and w.stopped == (cut is not None)
    assert cut is not None and cut < 50  # the answer goes on with the prompt's run: stopped where the run is long
    w = guard.watch()
    parts = [w.feed("Hello, world"), w.feed(". Bye"), w.flush()]
    assert parts[0] == "Hello," and "".join(parts) == "Hello, world. Bye"  # the last word is held back
    assert not w.stopped
    assert Guard(guard.profile, guard.tok, output="off").stop_at(answer) is None


def _doc(min_reps_words=None, sweep_top=None):
    res = {}
    if min_reps_words is not None:
        res["min_reps"] = {"words": min_reps_words}
    if sweep_top is not None:
        res["sweep"] = {"top": sweep_top, "n_tokens": 10, "config": {"max_reps": 256}}
    return {"model": {"name": "m"}, "results": res}


def test_profile_calibration(tmp_path):
    p = profile_from_results(_doc())
    assert not p.calibrated and p.gate.hold == 0 and "uncalibrated" in p.describe()
    words = [{"word": "poem", "min_reps": 96, "bracket": [64, 96], "repeated_below": True, "max_reps": 2048},
             {"word": "the", "min_reps": 12, "bracket": [0, 12], "repeated_below": False, "max_reps": 2048}]
    p = profile_from_results(_doc(words, [{"token": "a", "reps_to_sink": 200}]))
    assert p.calibrated and p.safe_reps == 64 and p.gate.hold == 32 and p.limits["min_reps"]["word"] == "poem"
    p = profile_from_results(_doc(words, [{"token": "a", "reps_to_sink": 20}]))
    assert p.safe_reps == 19 and p.gate.hold == 0
    # a token sink-sized at its first copy is a sink by itself, not by repeating: it does not set the limit
    p = profile_from_results(_doc(words, [{"token": " ", "reps_to_sink": 1}, {"token": "a", "reps_to_sink": 90}]))
    assert p.safe_reps == 64 and p.limits["sweep"]["safe_reps"] == 89
    assert p.limits["sweep"]["sink_at_first_copy"] == [" "]
    never = [{"word": "poem", "min_reps": None, "bracket": None, "max_reps": 2048}]
    p = profile_from_results(_doc(never, [{"token": "a", "reps_to_sink": None}]))
    assert p.safe_reps == 256 and p.gate.hold == 224
    path = p.save(tmp_path / "guard-profile.json")
    assert GuardProfile.load(path).to_dict() == p.to_dict()
    for bad, why in (("[]", "not a sinkhole guard profile"), ("{", "cannot read"),
                     (json.dumps({**p.to_dict(), "version": 9}), "version"),
                     (json.dumps({**p.to_dict(), "gate": {"window": 0}}), "window"),
                     (json.dumps({**p.to_dict(), "safe_reps": -1}), "safe_reps")):
        path.write_text(bad)
        with pytest.raises(SinkholeError, match=why):
            GuardProfile.load(path)
    with pytest.raises(SinkholeError, match="does not exist"):
        GuardProfile.load(tmp_path / "none.json")


def sinkhole(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sinkhole", *args], env=ENV, capture_output=True, text=True,
                          timeout=600, cwd=cwd)


def test_guard_command_writes_config_and_folder(tmp_path, tok_file):
    prof = profile_from_results(_doc([{"word": "poem", "min_reps": 96, "bracket": [64, 96], "max_reps": 2048}]))
    prof.save(tmp_path / "guard-profile.json")
    out = sinkhole("guard", "--upstream", "http://127.0.0.1:9/", "--litellm-config", str(tmp_path / "proxy.yaml"),
                   "--model-name", "smol", "--profile", str(tmp_path), "--mode", "reject")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load((tmp_path / "proxy.yaml").read_text())
    (m,) = cfg["model_list"]
    assert m["model_name"] == "smol" and m["litellm_params"]["api_base"] == "http://127.0.0.1:9/v1"
    assert cfg["general_settings"]["master_key"] == "os.environ/LITELLM_MASTER_KEY"
    (gr,) = cfg["guardrails"]
    lp = gr["litellm_params"]
    assert lp["guardrail"] == "sinkhole.guard.proxy.SinkholeGuardrail" and lp["sinkhole_mode"] == "reject"
    g = Guard.from_folder(lp["sinkhole_folder"])
    assert g.profile.gate.hold == 32 and g.tok.encode("poem")[0] == Tokenizer(tok_file).encode("poem")[0]
    assert "calibrated" in out.stderr and "litellm --config" in out.stderr
    assert lp["mode"] == ["pre_call", "post_call"]
    out = sinkhole("guard", "--upstream", "http://127.0.0.1:9/", "--litellm-config", str(tmp_path / "pre.yaml"),
                   "--output", "off", "-q")
    assert out.returncode == 0 and out.stderr == ""
    (gr,) = yaml.safe_load((tmp_path / "pre.yaml").read_text())["guardrails"]
    assert gr["litellm_params"]["mode"] == ["pre_call"]  # answers not watched: no post-call hook
    assert gr["litellm_params"]["sinkhole_output"] == "off"  # a string, not YAML's false
    # the guard as a plain callback: a module beside the config makes the instance the config names
    out = sinkhole("guard", "--upstream", "http://127.0.0.1:9/", "--litellm-config", str(tmp_path / "cb.yaml"),
                   "--litellm-hook", "callback", "--mode", "reject", "-q")
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load((tmp_path / "cb.yaml").read_text())
    assert "guardrails" not in cfg and cfg["litellm_settings"]["callbacks"] == ["cb_sinkhole.guard"]
    src = (tmp_path / "cb_sinkhole.py").read_text()
    assert "SinkholeCallback(" in src and '"reject"' in src and str((tmp_path / "cb.sinkhole").resolve()) in src


@pytest.mark.parametrize("args, why", [
    (["--upstream", "127.0.0.1:8080"], "--upstream must be"),
    (["--upstream", "http://h/v1", "--litellm-config", "/nonexistent-dir/x.yaml"], "does not exist"),
    (["--upstream", "http://h/v1", "--profile", "/nonexistent.json"], "does not exist"),
    (["--upstream", "http://h/v1", "--profile", "README.md"], "not a JSON file"),
    (["nosuch-model", "--upstream", "http://h/v1"], "unknown model"),
])
def test_guard_command_errors(tmp_path, args, why):
    if "--litellm-config" not in args:
        args = args + ["--litellm-config", str(tmp_path / "p.yaml")]
    out = sinkhole("guard", *args, cwd=ROOT)
    assert out.returncode == 2 and why in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.yaml").exists()
