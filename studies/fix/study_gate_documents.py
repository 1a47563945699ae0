"""Study: documents that repeat, counting tasks, and what the run gate and its state check do to them.

A document can repeat without putting the model anywhere near the sink: a chorus, a zero-initialised
array, a duplicated record, a separator line, progress dots. The run gate (token ids only) shortens any
long low-diversity run it finds; the state check (``RunGate(confirm=...)``) shortens a run only once its
layer-0 state is first-token-like. For every document, with and without BOS, this reports

* the circuit's own reading of the stretch in the unpatched model: the state check's distance (the
  smallest mean over 32 tokens of the layer-0 distance to the unit's state at the start of a sequence,
  up to the confirmation where there is one; small = first-token-like), the norm ratio to the first
  token at the drift layer (mean over the stretch's last 32 tokens) and attention on position 0 in the
  four layers after the massive layer;
* for each method, how many tokens it hides, and top-1 agreement and mean KL (nats/token) against the
  unpatched model over the 100 tokens after the stretch (a following paragraph of shipped prose), and
  the mean NLL of those tokens (unpatched and per method: whether a change is a repair or damage);

and, for counting tasks in the chat template ("write the word W exactly K times", K = 10 to 100), whether
each method's greedy answer is token for token the unpatched model's.

Two document sets: ``tuning`` (the documents ``studies/circuit/study_sink_state.py`` measured, which the state check's
default distance was chosen beside) and ``heldout`` (documents written after the default was fixed: other
formats, units and lengths).

Usage::

    python studies/fix/study_gate_documents.py --save gate_documents     # about 5 minutes on the 2-core CPU
    # the serving guard, calibrated by each model's scan (sinkhole scan MODEL --out DIR writes the profile):
    python studies/fix/study_gate_documents.py --model MODEL --profile DIR/guard-profile.json --no-state-check \
        --counting "" --save guard_documents_MODEL
"""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import circuit_reader, machine, parser, report, save  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "circuit"))
from study_sink_state import documents as tuning_documents  # noqa: E402

AFTER = 100  # scored tokens after the stretch


def heldout_documents() -> dict[str, tuple[str, str]]:
    """name -> (text before the repetitive stretch, the stretch); none of these was looked at while tuning."""
    return {
        "JS array of 400 zeros, no spaces": ("const grid = [", ",".join(["0"] * 400) + "];\n"),
        "JSON list of 200 'pending'": ('{"jobs": [', ", ".join(['"pending"'] * 200) + "]}\n"),
        "song refrain 'la' x200": ("Chorus (everyone):\n", " ".join(["la"] * 200) + "\n"),
        "chat laughter 'ha' x300": ("User: that was the funniest thing ever\nAssistant: ", "ha" * 300 + "\n"),
        "CSV of short records '0,0,0,1' x150": ("a,b,c,flag\n", "0,0,0,1\n" * 150),
        "markdown table '| ok | ok |' x100": ("| check | result |\n|---|---|\n", "| ok | ok |\n" * 100),
        "separator line of 500 dashes": ("Section 2\n", "-" * 500 + "\n"),
        "progress dots x400": ("Downloading", "." * 400 + " done\n"),
        "DNA 'AT' x300": (">seq1\n", "AT" * 300 + "\n"),
        "hex dump '00 ' x400": ("0000: ", "00 " * 400 + "\n"),
        "YAML list of 120 '- null'": ("values:\n", "  - null\n" * 120),
        "repeated sentence x40": ("Notes:\n", "The build passed. " * 40 + "\n"),
    }


def counting_prompts(lm, words, ks) -> list[tuple[str, int, list[int]]]:
    from sinkhole.attack.prompts import chat_ids

    return [(w, k, chat_ids(lm, f'Write the word "{w}" exactly {k} times, separated by spaces, and nothing else.'))
            for w in words for k in ks]


def main(argv=None) -> int:
    p = parser(__doc__, study=True)
    p.add_argument("--confirm", type=float, default=None, help="the state check's distance (default: the gate's)")
    p.add_argument("--counting", default="10,25,50,75,100", help="K values of the counting tasks ('' to skip)")
    p.add_argument("--profile", help="a guard profile (guard-profile.json of a scan): adds the method 'guard', the gate "
                                     "with the profile's calibrated hold (what the serving guard does to the text)")
    p.add_argument("--no-state-check", action="store_true", help="leave out the state check (the research variant)")
    a = p.parse_args(argv)

    import torch

    from sinkhole import load_model
    from sinkhole.data import snippets
    from sinkhole.decoding.gate import RunGate, excess_mask, hidden_mask, stretches
    from sinkhole.decoding.state_check import STATE_CONFIRM, distances, read_state
    from sinkhole.decoding.generate import generate
    from sinkhole.patch.core import Patch, apply_patch

    lm = load_model(a.model, progress=False)
    read, drift, late = circuit_reader(lm)
    confirm = STATE_CONFIRM if a.confirm is None else a.confirm
    methods = {"run gate": RunGate(), "state check": RunGate(confirm=confirm)}
    if a.no_state_check:
        del methods["state check"]
    profile = None
    if a.profile:
        from sinkhole.guard.profile import GuardProfile

        profile = GuardProfile.load(a.profile)
        methods["guard"] = profile.gate
    follow = " ".join(snippets("tempest", n=1, n_words=160, seed=7))

    def circuit_at(ids, r0, r1):  # the drift-layer norm ratio and late attention on position 0, last 32 tokens
        return read(ids, max(r0, r1 - 31), r1)

    rows = []
    sets = {"tuning": tuning_documents(random.Random(0)), "heldout": heldout_documents()}
    for set_name, docs in sets.items():
        for name, (before, stretch) in docs.items():
            for bos in (False, True):
                head = lm.encode(before, bos=bos)
                body = lm.encode(stretch, bos=False)
                tail = lm.encode(" " + follow, bos=False)[:AFTER + 1]
                ids = head + body + tail
                s0, s1 = len(head) + len(body), len(head) + len(body) + AFTER
                ex = excess_mask(torch.tensor([ids]), RunGate(confirm=confirm))[0]
                runs = [(r0, r1) for r0, r1 in stretches(ex) if r0 < s0]
                d = distances(lm, ids, RunGate(confirm=confirm))[0]
                dmin = None
                if runs:
                    r0, r1 = max(runs, key=lambda r: r[1] - r[0])
                    x = d[r0:r1 + 1]
                    if len(x) >= 32:  # windows of read tokens (after a confirmation nothing more is read)
                        w = x.unfold(0, 32, 1).mean(-1)
                        w = w[~torch.isnan(w)]
                        dmin = round(float(w.min()), 3) if len(w) else None
                    ratio, att0 = circuit_at(ids, r0, r1)
                else:
                    ratio, att0 = circuit_at(ids, len(head), s0 - 1)
                with torch.no_grad():
                    ref = lm.model(input_ids=torch.tensor([ids], device=lm.device)).logits[0].float()
                tgt = torch.tensor(ids[s0:s1], device=lm.device)

                def nll(lg):  # mean NLL (nats) of the following prose: lower = the model reads it better
                    return round(float(torch.nn.functional.cross_entropy(lg[s0 - 1:s1 - 1], tgt)), 4)

                row = {"set": set_name, "document": name, "bos": bos, "tokens": len(ids), "stretch_tokens": len(body),
                       "excess": int(ex.sum()), "state_distance": dmin, "drift_norm_ratio": ratio,
                       "late_attn0": att0, "nll_after": nll(ref), "methods": {}}
                for m, g in methods.items():
                    hidden = int(hidden_mask([ids], g, read_state(lm, [ids], g)).sum())
                    if hidden == 0:
                        row["methods"][m] = {"hidden": 0, "top1": 1.0, "kl": 0.0, "nll_after": row["nll_after"]}
                        continue
                    with torch.no_grad(), apply_patch(lm, Patch(gate=g), validate=False):
                        got = lm.model(input_ids=torch.tensor([ids], device=lm.device)).logits[0].float()
                    r, q = ref[s0 - 1:s1 - 1], got[s0 - 1:s1 - 1]  # predictions of the AFTER tokens
                    kl = (r.log_softmax(-1).exp() * (r.log_softmax(-1) - q.log_softmax(-1))).sum(-1).mean()
                    top1 = float((r.argmax(-1) == q.argmax(-1)).float().mean())
                    row["methods"][m] = {"hidden": hidden, "top1": round(top1, 4), "kl": round(float(kl), 5),
                                         "nll_after": nll(got)}
                rows.append(row)
                print(f"{set_name:8s} {name[:38]:38s} bos={bos!s:5s} dist={dmin!s:6s} ratio={ratio:.3f} "
                      f"nll={row['nll_after']:.3f} "
                      f"att0={att0:.2f} " + "  ".join(f"{m}: hid {v['hidden']:4d} top1 {v['top1']:.3f} "
                                                      f"kl {v['kl']:.4f} nll {v['nll_after']:.3f}"
                                                      for m, v in row["methods"].items()), flush=True)

    counting = []
    ks = [int(k) for k in a.counting.split(",") if k.strip()]
    if ks:
        for w, k, ids in counting_prompts(lm, ("basil", "tulip"), ks):
            base = generate(lm, [ids], 2 * k + 16)[0]
            text = lm.tokenizer.decode(base, skip_special_tokens=True)
            rec = {"word": w, "k": k, "unpatched_count": len(re.findall(w, text, flags=re.IGNORECASE)),
                   "unpatched_text": text[:160], "same": {}}
            for m, g in methods.items():
                with apply_patch(lm, Patch(gate=g), validate=False):
                    got = generate(lm, [ids], 2 * k + 16)[0]
                rec["same"][m] = got == base
            counting.append(rec)
            print(f"count {w} x{k}: unpatched wrote {rec['unpatched_count']}; same: {rec['same']}", flush=True)
    result = {"model": lm.name, "profile": None if profile is None else profile.to_dict(), "confirm": confirm,
              "drift_layer": drift, "late_layers": late, "after_tokens": AFTER,
              "rows": rows, "counting": counting, "machine": machine()}
    report(save(a, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
