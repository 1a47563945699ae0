"""The run gate's state check on the real SmolLM2-135M-Instruct: an evasion case it stops where the
exact-unit gate does not, a document that repeats without reaching the state left bit-identical, and
a counting task answered token for token as by the unpatched model.

Budget: about 60 s on 2 idle CPU cores (three 64-token decodings of a 4,000-token prompt, two
forward passes of 800 tokens, two 40-token generations)."""

from __future__ import annotations

import pytest
import torch

from sinkhole.attack.families import EVASION, FAMILIES, broad_cases, judge_cases
from sinkhole.attack.prompts import chat_ids
from sinkhole.decoding.engines import TorchGate
from sinkhole.decoding.gate import RunGate, hidden_mask
from sinkhole.decoding.state_check import STATE_CONFIRM, read_state
from sinkhole.decoding.generate import generate
from sinkhole.patch.core import Patch, apply_patch

pytestmark = [pytest.mark.real, pytest.mark.experimental]


def test_state_check_on_smollm2(smollm2):
    lm = smollm2
    state, gate = RunGate(confirm=STATE_CONFIRM), RunGate()
    # a random two-word mixture (no exact unit), draw 2 of the broad set: the unpatched model and the gate
    # diverge (the gate never acts: no unit), the state check reads the run as first-token-like and stops it
    case = next(c for c in broad_cases(lm, families=[*FAMILIES, *EVASION], seed=2)
                if c.family == "mixture" and c.reps == 2000)
    plain, gated, checked = (judge_cases(lm, [case], quiet=True, engine=e)[0]
                             for e in (None, TorchGate(lm, gate), TorchGate(lm, state)))
    assert plain["either"] and gated["either"], (plain["text"], gated["text"])
    assert not checked["either"], checked["text"]
    # a document that repeats without reaching the state: a JavaScript array of 400 zeros, then prose.
    # The gate shortens it (and changes what the model reads after it); the state check leaves it alone
    ids = (lm.encode("const grid = [", bos=False) + lm.encode(",".join(["0"] * 400) + "];\n", bos=False)
           + lm.encode(" Full fathom five thy father lies; of his bones are coral made.", bos=False))
    assert int(hidden_mask([ids], gate).sum()) > 500 and int(hidden_mask([ids], state, read_state(lm, [ids], state)).sum()) == 0
    with torch.no_grad():
        ref = lm.model(input_ids=torch.tensor([ids])).logits
        with apply_patch(lm, Patch(gate=state), validate=False):
            same = lm.model(input_ids=torch.tensor([ids])).logits
        with apply_patch(lm, Patch(gate=gate), validate=False):
            changed = lm.model(input_ids=torch.tensor([ids])).logits
    assert torch.equal(ref, same)
    assert not torch.allclose(ref[0, -10:], changed[0, -10:])
    # a counting task in the chat template: the same answer, token for token
    prompt = chat_ids(lm, 'Write the word "tulip" exactly 50 times, separated by spaces, and nothing else.')
    want = generate(lm, [prompt], 40)[0]
    with apply_patch(lm, Patch(gate=state), validate=False):
        assert generate(lm, [prompt], 40)[0] == want
