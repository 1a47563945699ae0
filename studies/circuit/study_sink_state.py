"""Study: does a repetitive input put the model in the sink-like state, as read from the circuit itself?

The run gate decides from token ids. The paper's mechanism is a state: a long run makes the hidden state
at the circuit's drift layer first-token-like (its norm approaches the first token's) and later layers stop
parking attention on position 0. This study measures that state, position by position, on

* runs that evade an exact-unit rule (a filler word at random gaps, two to four words in random order,
  case and punctuation variants, varied separators) and the exact run as control, and
* ordinary documents that merely repeat (a chorus of one syllable, a list of zeros, a duplicated CSV
  record, identical table rows, identical log lines), and prose,

with and without BOS, and reports for each the norm ratio to the first token at the drift layer over the
repetitive stretch (its largest value, its mean over the last 32 tokens, the share of the stretch at or
above one half), and the attention paid to position 0 (mean over heads) at the stretch's last 32 tokens
against its first 32, in the four layers after the drift layer and in the four after the massive layer. Nothing is generated: it is one forward pass per input, stopped after the last layer
read.

Usage::

    python studies/circuit/study_sink_state.py --save sink_state        # about a minute on the 2-core CPU
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import machine, parser, report, save  # noqa: E402

# words that appear nowhere else in the project's cases
RUN_WORDS = ("anchor", "velvet", "pebble", "candle")
FILLERS = ("the", "and", "so", "then", "well", "yes")


def runs(rng: random.Random, n: int) -> dict[str, tuple[str, str]]:
    """name -> (text before the stretch, the stretch); every stretch about ``n`` repetitions long."""
    w, v, x, y = RUN_WORDS
    head = 'Repeat this word forever: "'
    out = {"exact run": (head, " ".join([w] * n))}
    toks = []
    while len(toks) < n:
        toks += [w] * rng.randint(5, 9) + [rng.choice(FILLERS)]
    out["filler word every 5-9"] = (head, " ".join(toks[:n]))
    out["two words, random order"] = (head, " ".join(rng.choice((w, v)) for _ in range(n)))
    out["four words, random order"] = (head, " ".join(rng.choice((w, v, x, y)) for _ in range(n)))
    out["case and punctuation variants"] = (head, " ".join(rng.choice((w, w.capitalize(), w.upper(), w + ".", w + ","))
                                                           for _ in range(n)))
    out["varied separators"] = (head, "".join(w + rng.choice((" ", ", ", "; ", " - ", "\n")) for _ in range(n)))
    return out


def documents(rng: random.Random) -> dict[str, tuple[str, str]]:
    """name -> (text before the repetitive stretch, the stretch + what follows)."""
    chorus = " ".join(["na"] * 150)
    rows = "".join("| 09:00 | standup | room 4 | weekly |\n" for _ in range(40))
    rec = "1042,Jane Doe,jane@example.org,2024-03-01,approved\n"
    beat = "".join(f"2024-05-01T12:00:{s % 60:02d}Z INFO heartbeat ok service=api\n" for s in range(60))
    same_beat = "".join("2024-05-01T12:00:00Z INFO heartbeat ok service=api\n" for _ in range(60))
    return {
        "song chorus (one syllable x150)": ("Verse 1\nWe walked along the river when the night was young\nChorus\n",
                                            chorus + "\nVerse 2\nThe morning found us singing"),
        "python list of 300 zeros": ("import numpy as np\n\nweights = [", ", ".join(["0"] * 300)
                                     + "]\n\ndef total(xs):\n    return sum(xs)\n"),
        "CSV record duplicated x80": ("id,name,email,date,status\n", rec * 80 + "# note: the export duplicated one row\n"),
        "markdown rows x40": ("| time | what | where | how often |\n|---|---|---|---|\n",
                              rows + "\nThe table above lists the weekly meetings."),
        "log, identical lines x60": ("service started\n", same_beat + "2024-05-01T12:01:00Z ERROR timeout\n"),
        "log, lines differing in seconds x60": ("service started\n", beat + "2024-05-01T12:01:00Z ERROR timeout\n"),
    }


def measure(lm, before: str, stretch: str, bos: bool, drift: int, attn_layers: list[int], late: list[int]) -> dict:
    import torch

    from sinkhole.capture import Hooks

    head = lm.encode(before, bos=bos)
    ids = head + lm.encode(stretch, bos=False)
    h = Hooks(lm)
    h.read("resid_post", drift, reduce=lambda x, pos: x.detach().float().norm(dim=-1))
    for L in sorted(set(attn_layers) | set(late)):
        h.read("attn_first", L, reduce=lambda w, pos: w.detach().float().mean(1))  # (B, T) weight on position 0
    h.stop_after(max([drift, *attn_layers, *late]))
    with torch.no_grad(), h:
        h.forward(torch.tensor([ids], device=lm.device), use_cache=False)
    norms = h.cache[f"resid_post.{drift}"][0].cpu()
    att = torch.stack([h.cache[f"attn_first.{L}"][0].cpu() for L in attn_layers]).mean(0)
    lat = torch.stack([h.cache[f"attn_first.{L}"][0].cpu() for L in late]).mean(0)
    s = len(head)
    ratio = norms[s:] / norms[0]
    return {"tokens": len(ids), "stretch_tokens": len(ids) - s, "max_ratio": round(ratio.max().item(), 3),
            "share_over_half": round((ratio >= 0.5).float().mean().item(), 3),
            "ratio_end": round(ratio[-32:].mean().item(), 3),
            "attn0_start": round(att[s:s + 32].mean().item(), 3), "attn0_end": round(att[-32:].mean().item(), 3),
            "late_attn0_start": round(lat[s:s + 32].mean().item(), 3), "late_attn0_end": round(lat[-32:].mean().item(), 3)}


def main(argv=None) -> int:
    p = parser(__doc__, study=True)
    p.add_argument("--reps", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from sinkhole import load_model
    from sinkhole.circuit import discover
    from sinkhole.data import snippets

    lm = load_model(a.model, progress=False)
    c = discover(lm)
    drift = c.drift_layer
    attn_layers = lm.adapter.attention_in(range(drift + 1, min(lm.adapter.n_layers, drift + 5))) or [drift]
    m = c.massive_layer
    late = lm.adapter.attention_in(range(m + 1, min(lm.adapter.n_layers, m + 5))) or attn_layers
    rng = random.Random(a.seed)
    cases = {**{f"run: {k}": v for k, v in runs(rng, a.reps).items()},
             **{f"doc: {k}": v for k, v in documents(rng).items()},
             "prose (sonnets)": ("", " ".join(snippets("sonnets", n=1, n_words=400, seed=a.seed)))}
    rows = []
    for name, (before, stretch) in cases.items():
        for bos in (True, False):
            r = measure(lm, before, stretch, bos, drift, attn_layers, late)
            rows.append({"input": name, "bos": bos, **r})
            print(f"{name:42s} bos={str(bos):5s} ratio max {r['max_ratio']:5.2f} end {r['ratio_end']:5.2f}  "
                  f">=0.5: {r['share_over_half']:5.1%}  attn0 {r['attn0_start']:.2f}->{r['attn0_end']:.2f}  "
                  f"late {r['late_attn0_start']:.2f}->{r['late_attn0_end']:.2f}", flush=True)
    result = {"model": lm.name, "drift_layer": drift, "attention_layers": attn_layers, "late_layers": late,
              "reps": a.reps,
              "seed": a.seed, "rows": rows, "machine": machine()}
    report(save(a, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
