"""Study: what the trained stock model does inside, on runs it repairs and runs it does not.

For held-out cases of several families (the broad set's words), in the source model and in the stock model: the
hidden-state norm ratio of the run's last 32 tokens to the first token's at the marking layers (1, 2), at the
comparison layer of the training (after layer 2) and at the massive layer (11), and the mean attention on
position 0 over layers 12-15 from those tokens; and the greedy continuation (16 tokens), judged. Read straight from
each model's own hidden states and eager attention weights (the stock model is not a sinkhole model).

    python studies/experimental/study_stock_circuit.py --keep trained.pt --save stock_circuit     # ~4 min, 2-core CPU
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import machine, parser, report, save  # noqa: E402

CASES = (("repeat", "flower", 400), ("repeat", "ocean", 1000), ("chat_assistant", "letter", 400),
         ("raw", "table", 400), ("phrase", "see you later", 300), ("mixture", "pigeon walnut", 400),
         ("offset", "purple mountain breeze", 300), ("filler", "compass", 400))


def reading(model, ids, layers=(1, 2, 3, 11), attn_layers=range(12, 16)) -> dict:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
    hs, at = out.hidden_states, out.attentions  # hidden_states[L + 1] is the output of layer L
    tail = slice(len(ids) - 32, len(ids))
    norm = {f"L{L}": round(float(hs[L + 1][0, tail].norm(dim=-1).mean() / hs[L + 1][0, 0].norm()), 3) for L in layers}
    att0 = round(float(torch.stack([at[L][0, :, tail, 0].mean() for L in attn_layers]).mean()), 3)
    return {"norm_ratio": norm, "attention_on_0": att0}


def main(argv=None) -> int:
    p = parser(__doc__, study=True)
    p.add_argument("--keep", required=True)
    a = p.parse_args(argv)

    import torch

    from sinkhole import load_model
    from sinkhole.attack.families import build_case
    from sinkhole.attack.judge import judge_text
    from sinkhole.experimental.stock import stock_model, to_granite_swa

    lm = load_model(a.model, progress=False)
    models = {"source": to_granite_swa(lm), "stock": stock_model(lm, torch.load(a.keep))}
    for m in models.values():
        m.config.output_attentions = True
    rng = random.Random(3)
    rows = []
    for fam, word, reps in CASES:
        c = build_case(lm, fam, word, reps, rng)
        row = {"family": fam, "word": word, "reps": reps}
        for name, m in models.items():
            with torch.no_grad():
                g = m.generate(torch.tensor([c.ids]), max_new_tokens=16, do_sample=False,
                               pad_token_id=lm.tokenizer.pad_token_id)
            said = lm.tokenizer.decode(g[0, len(c.ids):], skip_special_tokens=True)
            ok = not judge_text(said, word.split()[0]) if c.allowed is None else \
                set(g[0, len(c.ids):].tolist()) <= set(c.allowed) | {lm.tokenizer.eos_token_id}
            row[name] = {**reading(m, c.ids), "repeats": bool(ok), "text": said[:60]}
        rows.append(row)
        print(fam, word, reps, {k: (row[k]["repeats"], row[k]["norm_ratio"], row[k]["attention_on_0"])
                                for k in models}, flush=True)
    report(save(a, {"model": lm.name, "rows": rows, "machine": machine()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
