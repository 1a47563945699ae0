"""The stock model file (issue 28), parity first: a Llama model rewritten as ``granite_swa`` with every attention
sink at NO_SINK is the same model, in transformers (loaded by a process that never imports sinkhole) and as a
GGUF whose tensors are the source's, byte for byte, plus the sinks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from sinkhole.errors import SinkholeError
from sinkhole.experimental.stock import NO_SINK, parity, stock_gguf, to_granite_swa

pytestmark = pytest.mark.experimental


def test_tiny_llama_converts_exactly_and_loads_without_sinkhole(tmp_path):
    from tiny import tiny_lm

    lm = tiny_lm("llama")
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(0))
    model = to_granite_swa(lm)
    assert parity(lm, model, ids) == 0.0
    model.save_pretrained(tmp_path / "stock")
    want = lm.model(input_ids=ids).logits.detach()
    np.save(tmp_path / "ids.npy", ids.numpy())
    code = ("import sys, numpy, torch\n"
            "from transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'stock')!r})\n"
            f"ids = torch.tensor(numpy.load({str(tmp_path / 'ids.npy')!r}))\n"
            "with torch.no_grad():\n"
            f"    numpy.save({str(tmp_path / 'got.npy')!r}, m(input_ids=ids).logits.numpy())\n"
            "assert 'sinkhole' not in sys.modules\n"
            "print(type(m).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "GraniteSWAForCausalLM"
    assert np.abs(np.load(tmp_path / "got.npy") - want.numpy()).max() == 0.0


def test_a_sink_changes_the_model_and_only_where_it_is_set():
    from tiny import tiny_lm

    lm = tiny_lm("llama")
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(1))
    s = torch.full((3, 4), NO_SINK)
    s[2, 1] = 0.0
    assert parity(lm, to_granite_swa(lm, s), ids) > 1e-3  # the sink acts
    s[2, 1] = NO_SINK
    assert parity(lm, to_granite_swa(lm, s), ids) == 0.0


def test_other_architectures_and_bad_sinks_are_refused():
    from tiny import tiny_lm

    with pytest.raises(SinkholeError, match="Llama-architecture"):
        to_granite_swa(tiny_lm("gpt2"))
    with pytest.raises(SinkholeError, match="layers x heads"):
        to_granite_swa(tiny_lm("llama"), torch.zeros(2, 4))
    with pytest.raises(SinkholeError, match="layers x heads"):
        stock_gguf(tiny_lm("llama"), torch.zeros(2, 4), "unused.gguf")


@pytest.mark.real
def test_smollm2_converts_exactly_and_its_gguf_keeps_every_tensor(smollm2, tmp_path):
    from gguf import GGUFReader

    from sinkhole.decoding.engines import gguf_of

    ids = smollm2.tokenizer("Shall I compare thee to a summer's day? Thou art more lovely.")["input_ids"]
    assert parity(smollm2, to_granite_swa(smollm2), ids) == 0.0
    sinks = torch.full((30, 9), NO_SINK)
    sinks[0, 3] = 1.5
    stock_gguf(smollm2, sinks, tmp_path / "stock.gguf")
    a, b = GGUFReader(str(gguf_of(smollm2))), GGUFReader(str(tmp_path / "stock.gguf"))
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    assert set(tb) - set(ta) == {f"blk.{i}.attn_sinks.weight" for i in range(30)}
    assert all(np.array_equal(ta[n].data, tb[n].data) and ta[n].tensor_type == tb[n].tensor_type for n in ta)
    got = tb["blk.0.attn_sinks.weight"]
    assert got.tensor_type.name == "F32" and got.data.tolist()[3] == 1.5
    assert b.fields["general.architecture"].contents() == "granite_swa"
    assert b.fields["granite_swa.block_count"].contents() == 30
    assert b.fields["granite_swa.attention.sliding_window_pattern"].contents() == [True] + [False] * 29
    assert b.fields["granite_swa.attention.sliding_window"].contents() == 8192  # the whole training context
    assert b.fields["tokenizer.ggml.model"].contents() == a.fields["tokenizer.ggml.model"].contents()


def _llama_cpp_with_granite_swa() -> bool:
    try:
        import llama_cpp
    except ImportError:
        return False
    parts = tuple(int(x) for x in llama_cpp.__version__.split(".")[:3] if x.isdigit())
    return parts >= (0, 3, 36)  # the first llama-cpp-python whose llama.cpp has granite_swa


@pytest.mark.real
@pytest.mark.skipif(not _llama_cpp_with_granite_swa(), reason="needs llama-cpp-python >= 0.3.36 (granite_swa)")
def test_the_stock_gguf_equals_the_source_in_llama_cpp(smollm2, tmp_path):
    """llama.cpp reads the rewritten file as the same model (every sink at NO_SINK), and reads its sinks."""
    from llama_cpp import Llama

    from sinkhole.data import load_text
    from sinkhole.decoding.engines import gguf_of

    ids = smollm2.encode(load_text("sonnets")[:1500], bos=False)[:128]

    def logits(path):
        m = Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, seed=0)
        m.eval(ids)
        return np.array(m.scores[:len(ids)], dtype=np.float32)

    src = logits(gguf_of(smollm2))
    sinks = torch.full((30, 9), NO_SINK)
    stock_gguf(smollm2, sinks, tmp_path / "same.gguf")
    assert np.abs(logits(tmp_path / "same.gguf") - src).max() == 0.0
    sinks[0] = 0.0
    stock_gguf(smollm2, sinks, tmp_path / "sunk.gguf")
    assert np.abs(logits(tmp_path / "sunk.gguf") - src).max() > 0.1


# ------------------------------------------------------------------------------------------
# training the stock model, its engine, its folder

def test_occurrence_targets_point_each_late_copy_at_the_anchor_copy():
    from sinkhole.experimental.stock import occurrence_targets

    ids = [9, 5, 5, 7, 5, 5, 5, 7]
    # 5 occurs at 1, 2, 4, 5, 6: from its 4th copy on (min_count 3) each points at its 2nd copy (position 2)
    assert occurrence_targets(ids, anchor=2, min_count=3) == [(5, 2), (6, 2)]
    assert occurrence_targets(ids, anchor=1, min_count=1) == [(2, 1), (4, 1), (5, 1), (6, 1), (7, 3)]
    assert occurrence_targets([1, 2, 3], anchor=1, min_count=1) == []


def test_train_stock_leaves_the_model_alone_and_trains_only_what_it_says():
    from tiny import tiny_lm

    from sinkhole.experimental.stock import StockConfig, stock_model, train_stock

    lm = tiny_lm("llama")
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    cfg = StockConfig(steps=4, reps=(20,), n_text_rows=8, text_window=32, mlp_layers=(0, 1), stop=2)
    tr = train_stock(lm, cfg)
    assert all(torch.equal(before[k], v) for k, v in lm.model.state_dict().items())
    names = {f"model.layers.{i}.mlp.{p}_proj.weight" for i in (0, 1) for p in ("gate", "up", "down")}
    assert set(tr["weights"]) == names
    assert torch.isfinite(tr["sinks"][0]).all() and (tr["sinks"][0] > NO_SINK / 2).all()
    assert (tr["sinks"][1:] == NO_SINK).all()  # only layer 0 has sinks
    assert any(not torch.equal(w, before[k]) for k, w in tr["weights"].items())  # the MLPs moved
    ids = torch.randint(3, 128, (1, 24), generator=torch.Generator().manual_seed(2))
    m = stock_model(lm, tr)
    assert parity(lm, m, ids) > 0  # a different model
    assert m.model.layers[0].mlp.up_proj.weight.data_ptr() != lm.model.model.layers[0].mlp.up_proj.weight.data_ptr()
    with pytest.raises(SinkholeError, match="before the comparison layer"):
        train_stock(lm, StockConfig(steps=1, mlp_layers=(2,), stop=2))


def test_torchgate_runs_another_model_as_an_engine():
    """A stock rewrite decodes and scores through the engine interface the broad verification uses: with every
    sink at NO_SINK it gives the source model's tokens and logits."""
    from tiny import tiny_lm

    from sinkhole.decoding.engines import TorchGate
    from sinkhole.decoding.generate import generate

    lm = tiny_lm("llama")
    eng = TorchGate(lm, None, model=to_granite_swa(lm))
    prompt = [1, 5, 9, 9, 9, 9, 9, 9, 9, 9]
    assert eng.greedy(prompt, 8, set()) == generate(lm, [prompt], 8)[0]
    want = lm.model(input_ids=torch.tensor([prompt])).logits[0].detach().numpy()
    assert np.abs(eng.logits(prompt) - want).max() < 1e-5
    with pytest.raises(SinkholeError, match="without a gate"):
        from sinkhole.decoding.gate import RunGate

        TorchGate(lm, RunGate()).logits(prompt)


def test_patch_stock_refuses_what_it_cannot_rewrite(tmp_path, capsys):
    """A model that is not a Llama-architecture GGUF is declined in one line before any work; the stock route wants
    a new folder; ``sinkhole patch`` without --out says what to give."""
    from helpers_reliability import make_tiny_folder
    from test_cli_errors import _main, clean

    tiny, gpt2 = make_tiny_folder(tmp_path / "tiny"), make_tiny_folder(tmp_path / "g", "gpt2")
    capsys.readouterr()
    clean(*_main(["experimental", "stock", tiny, tmp_path / "s"], capsys), "stock route", "gguf")
    assert not (tmp_path / "s").exists()
    clean(*_main(["experimental", "stock", gpt2, tmp_path / "s"], capsys), "llama")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    clean(*_main(["experimental", "stock", tiny, tmp_path / "full"], capsys), "empty folder")
    clean(*_main(["patch", tiny], capsys), "--out")


STOCK_CHECK = """
import json, sys
import numpy, torch
from transformers import AutoModelForCausalLM
folder, ids_path = sys.argv[1], sys.argv[2]
m = AutoModelForCausalLM.from_pretrained(folder)
rows = json.load(open(ids_path))
with torch.no_grad():
    run = m.generate(torch.tensor([rows["run"]]), max_new_tokens=16, do_sample=False, pad_token_id=0)
    text = m(input_ids=torch.tensor([rows["text"]])).logits[0].argmax(-1).tolist()
out = {"run": run[0, len(rows["run"]):].tolist(), "text_top1": text, "class": type(m).__name__,
       "sinkhole": any(k.split(".")[0] == "sinkhole" for k in sys.modules)}
try:
    from llama_cpp import Llama
    import glob
    g = sorted(glob.glob(folder + "/*.gguf"))[0]
    llm = Llama(model_path=g, n_ctx=1024, verbose=False, seed=0)
    llm.eval(rows["run"])
    toks = []
    for _ in range(16):
        t = int(numpy.argmax(llm.scores[llm.n_tokens - 1]))
        toks.append(t)
        llm.eval([t])
    out["llama_cpp_run"] = toks
except Exception as err:
    out["llama_cpp_error"] = type(err).__name__
print(json.dumps(out))
"""


@pytest.mark.real
def test_the_stock_folder_runs_without_sinkhole(smollm2, tmp_path, capsys):
    """``sinkhole experimental stock`` end to end on SmolLM2 (the default training, about 4 minutes): the folder loads in a
    process that never imports sinkhole, keeps repeating a held-out run that the source model leaves, and reads
    a held-out text window as the source does at the top-1 level measured in docs/experimental.md, "The shipped
    point on the broad set and the evasion families"."""
    import json

    from sinkhole.attack.families import build_case
    from sinkhole.attack.judge import judge_text
    from sinkhole.cli import main
    from sinkhole.data import load_text
    from sinkhole.decoding.generate import generate

    out = tmp_path / "stock"
    rc = main(["experimental", "stock", "smollm2-135m-instruct", str(out), "--no-broad", "--quiet"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engines"]["transformers"]["verified"]
    card = (out / "SUMMARY.md").read_text()
    assert card.startswith("# Stock model file") and f"Written in {summary['seconds']:.0f} s" in card
    assert {"summary.json", "SUMMARY.md", "config.json"} <= set(summary["files"])
    run = build_case(smollm2, "repeat", "flower", 400).ids  # a held-out word of the broad set
    text = smollm2.encode(load_text("twelfth_night")[30000:34000], bos=False)[:256]
    (tmp_path / "ids.json").write_text(json.dumps({"run": run, "text": text}))
    proc = subprocess.run([sys.executable, "-c", STOCK_CHECK, str(out), str(tmp_path / "ids.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["class"] == "GraniteSWAForCausalLM" and not got["sinkhole"]
    said = smollm2.tokenizer.decode(got["run"], skip_special_tokens=True)
    before = smollm2.tokenizer.decode(generate(smollm2, [run], 16)[0], skip_special_tokens=True)
    assert judge_text(before, "flower") and not judge_text(said, "flower"), (before, said)
    with torch.no_grad():
        ref = smollm2.model(input_ids=torch.tensor([text])).logits[0].argmax(-1).tolist()
    assert np.mean(np.array(ref) == np.array(got["text_top1"])) >= 0.85
    if "llama_cpp_run" in got:  # llama-cpp-python 0.3.36+: the GGUF in the folder keeps repeating too
        assert not judge_text(smollm2.tokenizer.decode(got["llama_cpp_run"], skip_special_tokens=True), "flower")


@pytest.mark.real
def test_the_gemma_control_is_declined(tmp_path, capsys):
    """Gemma-3-270M, the model that does not diverge, is not a Llama architecture: the stock route declines it in one line
    before any training, and writes nothing."""
    from test_cli_errors import _main, clean

    clean(*_main(["experimental", "stock", "gemma3-270m", tmp_path / "s", "--quiet"], capsys), "llama-architecture",
          "gemma3")
    assert not (tmp_path / "s").exists()


def test_the_patch_card_shows_the_floor_and_the_issue_targets():
    from sinkhole.experimental.stock_export import stock_summary_md

    def r(k):
        return {"diverged": k, "n": 2}

    fid = [{"source": "twelfth_night", "bos": False, "window": 64, "top1_agreement": 0.995, "mean_kl_nats": 0.004}]
    ver = {"rates": {"unpatched": {"repeat": r(2), "raw": r(2)}, "short_run": {"repeat": r(0), "raw": r(2)},
                     "patch": {"repeat": r(1), "raw": r(2)}}, "fidelity": {"patch": fid}}
    card = stock_summary_md({"model": {"name": "m"}, "verification": ver, "seconds": 301.4,
                             "engines": {"transformers": {"verified": False, "error": "no transformers"}}})
    assert "| repeat | 2/2 | 0/2 | 1/2 |" in card and "| raw | 2/2 | 2/2 | 2/2 |" in card
    assert "met: **no** (families failed: repeat)" in card  # raw stays within its floor
    assert "Written in 301 s" in card and "**not verified**: no transformers" in card
