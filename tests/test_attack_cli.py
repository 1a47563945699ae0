"""sinkhole diverge / sweep / cluster commands on a tiny model (the loader is swapped for it)."""

import json

import pytest

import sinkhole.cli as cli
from sinkhole.cli import main


@pytest.fixture
def use_tiny(monkeypatch, tiny):
    monkeypatch.setattr(cli, "load_from_args", lambda args: tiny)
    return tiny


def test_diverge_json(use_tiny, capsys, tmp_path):
    out = tmp_path / "d.json"
    rc = main(["diverge", "--words", "poem,company", "--reps", "3,5", "--templates", "raw,repeat",
               "--max-new-tokens", "4", "--json", "--quiet", "--out", str(out)])
    assert rc == 0
    full = json.loads(capsys.readouterr().out)
    assert full["command"] == "diverge" and full["steps"] == ["divergence"]
    doc = full["results"]["divergence"]
    assert len(doc["cases"]) == 8 and 0.0 <= doc["rate"] <= 1.0 and doc["method"] == "generate"
    assert doc["either_rate"] >= max(doc["rate"], doc["garak_rate"])
    for c in doc["cases"]:
        assert {"word", "reps", "template", "diverged", "tokens_until_divergence", "text", "garak_diverged"} <= set(c)
    assert json.loads(out.read_text()) == full


def test_diverge_garak_set_and_table(use_tiny, capsys):
    rc = main(["diverge", "--garak", "--max-new-tokens", "2", "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "divergence rate" in text and text.count("garak_") >= 36  # 4 words x 3 reps x 3 templates


def test_diverge_exact_matches_generation(use_tiny, capsys):
    argv = ["diverge", "--words", "poem,company", "--reps", "3,5", "--max-new-tokens", "6", "--json", "--quiet"]
    assert main(argv + ["--templates", "raw,repeat"]) == 0
    gen = json.loads(capsys.readouterr().out)["results"]["divergence"]
    assert main(argv + ["--exact"]) == 0  # default templates: only those that end with the run are drafted
    exact = json.loads(capsys.readouterr().out)["results"]["divergence"]
    assert exact["method"] == "exact" and {c["template"] for c in exact["cases"]} == {"raw", "repeat"}
    key = lambda c: (c["word"], c["reps"], c["template"])  # noqa: E731
    by = {key(c): c for c in gen["cases"]}
    assert len(exact["cases"]) == len(by) == 8
    for c in exact["cases"]:  # one record: the same tokens, both judges, the same verdicts
        g = by[key(c)]
        for k in ("diverged", "garak_diverged", "tokens_until_divergence", "text", "n_generated"):
            assert c[k] == g[k], k
    assert exact["rate"] == gen["rate"] and exact["garak_rate"] == gen["garak_rate"]


@pytest.mark.parametrize("argv", [
    ["diverge", "--exact", "--templates", "garak_this"],
    ["diverge", "--exact", "--garak"],
    ["diverge", "--reps", "0"],
    ["diverge", "--words", ","],
    ["diverge", "--templates", "bogus"],
    ["diverge", "--templates", "chat_user"],  # tiny tokenizer has no chat template
    ["diverge", "--max-new-tokens", "0"],
    ["diverge", "--out", "/nonexistent/dir/x.json"],
    ["sweep", "--tokens", "0"],
    ["sweep", "--shard", "3", "--num-shards", "2"],
    ["sweep", "--merge", "/nonexistent.json"],
    ["cluster", "--size", "1"],
])
def test_bad_input_one_line(use_tiny, capsys, argv):
    rc = main(argv + ["--quiet"] if argv[0] != "sweep" or "--merge" not in argv else argv)
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("sinkhole: error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_sweep_shards_then_merge(use_tiny, capsys, tmp_path):
    ck = tmp_path / "ck.json"
    for i in range(2):
        assert main(["sweep", "--tokens", "6", "--max-reps", "12", "--drift-layer", "1", "--checkpoint", str(ck),
                     "--shard", str(i), "--num-shards", "2", "--quiet", "--json"]) == 0
        capsys.readouterr()
    shards = sorted(tmp_path.glob("ck.json.shard*of2"))
    assert len(shards) == 2
    assert main(["sweep", "--merge", *map(str, shards), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["results"]["sweep"]
    assert doc["n_tokens"] == 6 and len(doc["top"]) == 6


def test_sweep_env_shard(use_tiny, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    ck = tmp_path / "c.json"
    assert main(["sweep", "--tokens", "9", "--max-reps", "12", "--drift-layer", "1", "--checkpoint", str(ck),
                 "--quiet", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"]["sweep"]["n_tokens"] == 3
    assert (tmp_path / "c.json.shard1of3").exists()


def test_cluster_json(use_tiny, capsys):
    assert main(["cluster", "--pool", "40", "--clusters", "2", "--size", "3", "--length", "24", "--seqs", "1",
                 "--examples", "1", "--max-new-tokens", "3", "--drift-layer", "1", "--quiet", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["results"]["cluster"]
    assert doc["method"]["n_clusters"] == 2 and len(doc["rows"]) == 4 and doc["method"]["drift_layer"] == 1


def test_words_that_are_not_utf8_are_one_line(use_tiny, capsys):
    import os

    word = os.fsdecode(b"\xff\xfe")  # what Python makes of invalid UTF-8 bytes in argv
    assert main(["diverge", "--words", word, "--reps", "10", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sinkhole: error: --words holds bytes that are not UTF-8") and err.count("\n") == 1


def test_default_sweep_checkpoints_of_two_models_do_not_collide(monkeypatch, capsys, tmp_path):
    from tiny import tiny_lm

    monkeypatch.chdir(tmp_path)
    models = {"a": tiny_lm("llama"), "b": tiny_lm("qwen2")}
    models["b"].name = "tiny-other"
    for key in ("a", "b"):
        monkeypatch.setattr(cli, "load_from_args", lambda args, m=models[key]: m)
        assert main(["sweep", "--tokens", "4", "--max-reps", "12", "--quiet", "--json"]) == 0, capsys.readouterr().err
    files = sorted(p.name for p in tmp_path.glob("sweep-*.ckpt.json"))
    assert len(files) == 2 and files[0].startswith("sweep-tiny-llama-") and files[1].startswith("sweep-tiny-other-")
    capsys.readouterr()
    # the same command again resumes from its own checkpoint: nothing left to sweep, the same result
    monkeypatch.setattr(cli, "load_from_args", lambda args: models["a"])
    assert main(["sweep", "--tokens", "4", "--max-reps", "12", "--quiet", "--json"]) == 0
    assert len(list(tmp_path.glob("sweep-*.ckpt.json"))) == 2
