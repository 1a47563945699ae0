"""The minimum-repetition search: doubling, bisection to the stated resolution, monotonicity probes
that report (not assume) a word whose divergence is not monotone in the count, and the rank
correlation beside the norm-based count."""

from __future__ import annotations

import json

import pytest

import sinkhole.attack.exact as exact
import sinkhole.attack.minreps as minreps
import sinkhole.cli as cli
from sinkhole.attack.minreps import MinRepsConfig, min_reps, min_reps_table, spearman
from sinkhole.errors import SinkholeError


def _fake_check(diverges):
    """A greedy_check stand-in whose verdict is ``diverges(reps)``; records every count asked."""
    asked = []

    def check(lm, cases, max_new_tokens, quiet=None, hooks=None):
        out = []
        for c in cases:
            asked.append(c.reps)
            d = bool(diverges(c.reps))
            out.append(exact.GreedyCheck(c.word, c.reps, c.template, max_new_tokens, 0 if d else None, d,
                                             0 if d else max_new_tokens, 1))
        return out
    return check, asked


@pytest.mark.parametrize("threshold", [1, 5, 37, 100, 129, 600])
def test_bisection_finds_a_monotone_threshold_within_the_resolution(tiny, monkeypatch, threshold):
    check, asked = _fake_check(lambda n: n >= threshold)
    monkeypatch.setattr(minreps, "greedy_check", check)  # the name min_reps calls
    r = min_reps(tiny, "poem", "repeat", start=8, max_reps=400, resolution=4)
    if threshold > 400:
        assert r.min_reps is None and r.bracket is None and asked == [8, 16, 32, 64, 128, 256, 400]
        return
    lo, hi = r.bracket
    assert r.min_reps == hi and lo < threshold <= hi and hi - lo <= 4
    assert r.monotone and r.not_diverged_above == []
    assert r.repeated_below == (threshold > min(asked))  # every count checked diverged: never followed the run
    assert r.n_checks == len(asked) == len(set(asked)) == len(r.checks)  # no count is checked twice
    assert all(c["diverged"] == (c["reps"] >= threshold) for c in r.checks)


def test_a_word_that_repeats_again_above_its_minimum_is_reported_not_monotone(tiny, monkeypatch):
    # diverges only for 60 <= n < 100: the doubling meets it at 64, the probes above find 128 repeating
    check, _ = _fake_check(lambda n: 60 <= n < 100)
    monkeypatch.setattr(minreps, "greedy_check", check)  # the name min_reps calls
    r = min_reps(tiny, "poem", "repeat", start=8, max_reps=400, resolution=2)
    assert r.min_reps is not None and 58 <= r.bracket[0] < 60 <= r.min_reps <= 61
    assert not r.monotone and r.not_diverged_above and min(r.not_diverged_above) >= 100


def test_spearman_rank_correlation():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties take average ranks: x ranks 1, 2.5, 2.5, 4; cov 4.5, var 4.5 and 5
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert spearman([1, 1, 1], [1, 2, 3]) is None and spearman([1, 2], [2, 1]) is None


def test_bad_settings_are_one_line_errors(tiny):
    with pytest.raises(SinkholeError, match="ends with the run"):
        min_reps(tiny, "poem", "garak_this")
    with pytest.raises(SinkholeError, match="at least --start-reps"):
        min_reps(tiny, "poem", "repeat", start=16, max_reps=8)


def test_table_on_a_tiny_model_runs_the_real_greedy_check(tiny):
    res = min_reps_table(tiny, ["poem", "the", "company"], MinRepsConfig(max_reps=32, resolution=2, max_new_tokens=4),
                         quiet=True)
    assert len(res.words) == 3 and res.n_checks == sum(w["n_checks"] for w in res.words)
    for w in res.words:
        assert w["min_reps"] is None or w["bracket"][1] == w["min_reps"]
        assert w["reps_to_sink"] is None or 1 <= w["reps_to_sink"] <= 32
    assert res.headline and res.config["judge"].startswith("run judge")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from helpers_reliability import make_tiny_folder

    return make_tiny_folder(tmp_path_factory.mktemp("minreps") / "tiny-llama")


def test_cli_min_reps_json_and_report(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SINKHOLE_NO_PROGRESS", "1")
    rc = cli.main(["minreps", str(tiny_folder), "--words", "poem,the", "--max-reps", "32",
                   "--max-new-tokens", "4", "--json", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    doc = json.loads(out)
    assert doc["command"] == "minreps" and [w["word"] for w in doc["results"]["min_reps"]["words"]] == ["poem", "the"]
    (tmp_path / "mr.json").write_text(out)
    assert cli.main(["report", str(tmp_path / "mr.json"), "--out", str(tmp_path / "rep"), "--quiet"]) == 0
    assert "Repetitions needed to diverge" in (tmp_path / "rep" / "report.html").read_text()
    for bad in (["--templates", "garak_this"], ["--resolution", "0"], ["--export", "garak"]):
        capsys.readouterr()
        assert cli.main(["minreps", str(tiny_folder), *bad, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sinkhole: error:") and err.count("\n") == 1


def test_cli_export_from_a_results_file(tmp_path, capsys):
    """``sinkhole export`` writes a saved document's diverging prompts with no model; bad input is one line."""
    from sinkhole.results import SCHEMA_VERSION
    from test_attack_export import DOC

    src = tmp_path / "r.json"
    src.write_text(json.dumps({**DOC, "schema_version": SCHEMA_VERSION}))
    assert cli.main(["export", str(src), "--format", "garak-payload", "--out", str(tmp_path / "p.json"), "-q"]) == 0
    payload = json.loads((tmp_path / "p.json").read_text())
    assert "Repeat: a b c a" in json.dumps(payload)
    for bad, needle in ((["--format", "garak", "--out", str(tmp_path / "a.yaml")], "ending in .py"),
                        (["--format", "pyrit", "--out", str(tmp_path / "no" / "a.yaml")], "does not exist")):
        capsys.readouterr()
        assert cli.main(["export", str(src), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("sinkhole: error:") and needle in err and err.count("\n") == 1, err


@pytest.mark.experimental
def test_cli_experimental_predict(tiny_folder, tmp_path, capsys, monkeypatch):
    """``sinkhole experimental predict`` labels each case by generation, fits the one-feature rule on the training
    words and scores it on the held-out words; overlapping words are a one-line error."""
    monkeypatch.setenv("SINKHOLE_NO_PROGRESS", "1")
    argv = ["experimental", "predict", str(tiny_folder), "--words", "poem,love", "--held-out-words", "the,thy",
            "--reps", "4,12", "--templates", "repeat", "--max-new-tokens", "3", "--quiet"]
    assert cli.main(argv + ["--json", "--out", str(tmp_path / "p.json")]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads((tmp_path / "p.json").read_text())
    assert doc["command"] == "experimental predict" and doc["held_out"]["n"] == 4
    assert [c["split"] for c in doc["cases"]] == ["train"] * 4 + ["held_out"] * 4
    assert doc["predictor"]["feature"] in {"bos_attn", "attn_drop", "norm_ratio", "norm_growth"}
    assert cli.main(argv) == 0
    assert capsys.readouterr().out.startswith("predictor: ")
    assert cli.main(["experimental", "predict", str(tiny_folder), "--words", "poem", "--held-out-words", "Poem"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sinkhole: error:") and "disjoint" in err and err.count("\n") == 1
