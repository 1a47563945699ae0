"""Memorisation check: the index finds planted strings (and only what is there), and a tiny model
fine-tuned for a few steps to emit a planted string after a repeated-word prompt is caught."""

from __future__ import annotations

import json
import random

import pytest
import torch

from sinkhole.errors import SinkholeError
from sinkhole.attack.memorization import MIN_BYTES, STRIDE, WINDOW, build_index


def _corpus(tmp_path, planted: str):
    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text(" ".join(rng.choice(words) for _ in range(5000)) + " " + planted + " omega")
    lines = [json.dumps({"text": " ".join(rng.choice(words) for _ in range(50))}) for _ in range(20)]
    (d / "b.jsonl").write_text("\n".join(lines) + "\n")
    (d / "skip.bin").write_bytes(b"\x00" * 10)
    return d


def test_every_planted_span_of_at_least_min_bytes_is_found_and_nothing_else(tmp_path):
    assert WINDOW + STRIDE - 1 <= MIN_BYTES  # the guarantee the index is built on
    planted = "".join(random.Random(5).choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(400))
    idx = build_index(_corpus(tmp_path, planted), folder=tmp_path / "idx", quiet=True)
    assert idx.info.n_files == 2 and idx.info.n_windows > 0
    rng = random.Random(1)
    for length in (MIN_BYTES, MIN_BYTES + 7, 120, 400):
        for _ in range(10):
            a = rng.randrange(0, len(planted) - length + 1)
            span = planted[a:a + length]
            q = "QQ#" * 5 + span + "#ZZ" * 5
            found = idx.spans(q)
            assert found and found[0]["text"] == span, (length, a)
    assert idx.spans("QQ#" * 5 + planted[:MIN_BYTES - 2] + "#ZZ") == []  # shorter than min_bytes
    assert idx.spans("nothing of this text is in the corpus, not one window of it at all.") == []
    # reused, not rebuilt, when the corpus is unchanged
    assert build_index(tmp_path / "corpus", folder=tmp_path / "idx").info.build_seconds == idx.info.build_seconds


def test_bad_corpus_is_a_one_line_error(tmp_path):
    with pytest.raises(SinkholeError, match="does not exist"):
        build_index(tmp_path / "none")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "x.csv").write_text("a")
    with pytest.raises(SinkholeError, match="no .txt or .jsonl"):
        build_index(tmp_path / "e")
    (tmp_path / "j").mkdir()
    (tmp_path / "j" / "x.jsonl").write_text("[1, 2]\n")
    with pytest.raises(SinkholeError, match="x.jsonl:1 is not a JSON object"):
        build_index(tmp_path / "j", folder=tmp_path / "jidx")


def test_a_model_trained_to_emit_a_planted_string_is_caught(tmp_path):
    """A tiny Llama fine-tuned for a few steps to continue 'Repeat: poem x6' with a planted string:
    its divergent tokens lie in the corpus span; the check reports them, and the control (ordinary
    prompts) is measured the same way."""
    from helpers_reliability import WORDS, make_tiny_folder
    from sinkhole.attack.diverge import DivergeConfig, diverge
    from sinkhole.attack.memorization import memorization_check
    from sinkhole.models.loading import load_model

    planted = " ".join(random.Random(3).choice(WORDS[5:]) for _ in range(24))
    lm = load_model(str(make_tiny_folder(tmp_path / "m")), progress=False)
    prompt = lm.encode("Repeat:", bos=True) + lm.word_ids("poem") * 6
    target = lm.tokenizer(" " + planted, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + target])
    labels = ids.clone()
    labels[0, :len(prompt)] = -100
    model = lm.model
    model.train()
    for p in model.parameters():  # sinkhole loads models frozen
        p.requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(150):
        opt.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
    model.eval()
    res = diverge(lm, ["poem"], [6], ["repeat"], DivergeConfig(max_new_tokens=len(target)), quiet=True)
    assert res.cases[0]["diverged"] and planted[:40] in res.cases[0]["text"]
    m = memorization_check(lm, res, _corpus(tmp_path, planted), n_control=4, index_folder=tmp_path / "idx",
                           quiet=True)
    assert m.divergent["n_continuations"] == 1 and m.divergent["share"] > 0.8
    assert any(s["source"] == "divergent" and planted[:50] in s["text"] for s in m.spans)
    assert m.control["n_continuations"] == 4 and m.control["share"] is not None
    assert m.headline.startswith("Memorisation:")
