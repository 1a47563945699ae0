"""The patch on the real SmolLM2-135M-Instruct: export/reload exactness and fewer divergences.

Budget: about 120 s on 2 idle CPU cores (a 12-step local fine-tune, one export, 2 x 3 generations);
338 s measured on a heavily shared machine.
"""

from __future__ import annotations

import pytest
import torch

from sinkhole.attack.prompts import make_cases
from sinkhole.attack.diverge import run_judged
from sinkhole.patch import export_patched, load_patched
from sinkhole.experimental.finetune import FinetuneConfig, finetune_patch

pytestmark = pytest.mark.real

HELD_OUT = ["ocean", "table", "silver"]  # never used for training; all diverge unpatched at 150 in "repeat"
TRAIN = ("poem", "company", "book", "music", "house", "water", "time", "light")


@pytest.fixture(scope="module")
def fixed(smollm2, tmp_path_factory):
    cfg = FinetuneConfig(layers=[1, 2], words=TRAIN, reps=(64, 100), objective="local", steps=12, lr=1e-3,
                         keep_weight=10.0, rep_batch=4, text_batch=8, n_texts=16)
    patch = finetune_patch(smollm2, cfg)
    out = export_patched(smollm2, patch, tmp_path_factory.mktemp("patched") / "smollm2-fixed")
    return patch, out


def test_export_reloads_exactly(smollm2, fixed):
    from transformers import AutoModelForCausalLM

    from sinkhole.patch import apply_patch

    patch, out = fixed
    ids = torch.tensor([smollm2.encode("Shall I compare thee to a summer's day?")[:8],
                        smollm2.encode(" poem" * 10)[:8]])
    with torch.no_grad(), apply_patch(smollm2, patch):
        mem = smollm2.model(ids).logits
    re = load_patched(out)
    with torch.no_grad():
        got = re.model(ids).logits
    assert (got - mem).abs().max() <= 1e-5
    # weights-only form: plain transformers, no sinkhole (eager attention like sinkhole's; the default sdpa
    # kernel differs from eager by ~1e-3 in the logits on its own)
    plain = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager")
    with torch.no_grad():
        assert (plain(ids).logits - mem).abs().max() <= 1e-5


def test_exported_patch_reduces_heldout_divergence(smollm2, fixed):
    _, out = fixed
    cases = make_cases(smollm2, HELD_OUT, [150], ["repeat"])
    before = run_judged(smollm2, cases, max_new_tokens=32)
    re = load_patched(out)
    after = run_judged(re, cases, max_new_tokens=32)
    assert before.method == after.method == "exact"  # 'repeat' ends with the run: the exact check
    assert before.rate > 0, "the held-out cases must diverge unpatched for this test to mean anything"
    assert after.rate < before.rate


def test_shipped_default_on_a_slice_of_the_broad_set(smollm2):
    """The default of `sinkhole patch` (the first candidate family, chosen when it meets the search
    goal) on a slice of the broad set: long runs after two wordings stop diverging, and a no-BOS
    64-token window of held-out text is unchanged."""
    from sinkhole.circuit import discover
    from sinkhole.patch.verify import verify_broad
    from sinkhole.patch.search import DEFAULT_FAMILIES, SearchConfig, candidates

    fam, _, build = next(candidates(smollm2, discover(smollm2), SearchConfig()))
    assert fam == DEFAULT_FAMILIES[0] == "run_gate"
    res = verify_broad(smollm2, build(), families=("repeat", "open_wording"), reps=(1000, 2000),
                       sources=("twelfth_night",), windows=(64,), total=256, log=lambda m: None, quiet=True)
    before, after = res["rates"]["unpatched"], res["rates"]["patch"]
    assert sum(v["diverged"] for v in before.values()) >= 2, "the slice must diverge unpatched to mean anything"
    assert sum(v["diverged"] for v in after.values()) == 0
    no_bos = [r for r in res["fidelity"]["patch"] if not r["bos"]]
    assert no_bos and all(r["top1_agreement"] == 1.0 and r["mean_kl_nats"] == 0.0 for r in no_bos)
    # the verification does not run the gated forward twice where it hides nothing: run it here on
    # the first no-BOS window of the held-out text and on the same window after a long run
    import torch

    from sinkhole.patch.fidelity import text_tokens
    from sinkhole.patch.core import apply_patch

    win = text_tokens(smollm2, "twelfth_night", need=256)[:64]
    run = smollm2.encode("Repeat:", bos=True) + smollm2.word_ids("flower") * 300 + win
    with torch.no_grad():
        plain = [smollm2.model(input_ids=torch.tensor([x])).logits for x in (win, run)]
        with apply_patch(smollm2, build(), validate=False):
            gated = [smollm2.model(input_ids=torch.tensor([x])).logits for x in (win, run)]
    assert torch.equal(plain[0], gated[0])  # bit-identical on text
    assert not torch.allclose(plain[1][0, -64:], gated[1][0, -64:])  # and it does act after a run
    # the broad check runs a gate-only patch's attacks through engines.TorchGate (the collapsed
    # history fed each step): on this slice it gives the hooks' verdicts and tokens
    from sinkhole.decoding.engines import TorchGate
    from sinkhole.attack.families import broad_cases, judge_cases

    assert res["settings"]["gate_attacks"] == "collapse fed (engines.TorchGate)"
    cases = broad_cases(smollm2, (1000, 2000), ("repeat", "garak_word", "raw"))
    hooked = judge_cases(smollm2, cases, hooks=lambda: apply_patch(smollm2, build(), validate=False), quiet=True)
    fed = {(r["family"], r["word"]): r
           for r in judge_cases(smollm2, cases, quiet=True, engine=TorchGate(smollm2, build().gate))}
    for h in hooked:
        f = fed[(h["family"], h["word"])]
        assert f["either"] == h["either"] and f["text"].startswith(h["text"]), (h, f)
