"""Study (the stock route's first step): untrained attention sinks in the stock granite_swa rewrite of SmolLM2.

The Llama model is rewritten as granite_swa (``sinkhole.experimental.stock.to_granite_swa``) with one sink logit
``c`` on every head of some layers (every other sink at NO_SINK: the model unchanged), and measured on
what the fix must do and keep: three exact runs after ``Repeat:`` (400 repetitions, no BOS, 24 greedy
tokens, judged by the text judge: anything besides the word and separators) and 512 tokens of the
sonnets (top-1 agreement and KL against the source model at every position). No training: this is
where the sinks start from.

    python studies/experimental/study_stock_sinks.py --save stock_sinks      # about 3 minutes on the 2-core CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import machine, parser, report, save  # noqa: E402

SETTINGS = [("none", None, None), ("layer 0", [0], -4.0), ("layer 0", [0], 0.0), ("layer 0", [0], 4.0),
            ("layer 0", [0], 8.0), ("layers 0-2", [0, 1, 2], 0.0), ("every layer", "all", 4.0)]


def main(argv=None) -> int:
    p = parser(__doc__, study=True)
    p.add_argument("--words", default="flower,letter,lamp")
    a = p.parse_args(argv)

    import torch

    from sinkhole import load_model
    from sinkhole.attack.judge import judge_text
    from sinkhole.attack.prompts import make_cases
    from sinkhole.data import load_text
    from sinkhole.experimental.stock import NO_SINK, to_granite_swa

    lm = load_model(a.model, progress=False)
    cases = make_cases(lm, a.words.split(","), [400], ["repeat"])
    text = lm.encode(load_text("sonnets")[:3000], bos=False)[:512]
    with torch.no_grad():
        ref = lm.model(input_ids=torch.tensor([text])).logits[0].float()
    n, h = lm.adapter.n_layers, lm.model.config.num_attention_heads
    rows = []
    for name, layers, c in SETTINGS:
        s = torch.full((n, h), NO_SINK)
        for L in (range(n) if layers == "all" else layers or []):
            s[L] = c
        m = to_granite_swa(lm, s)
        with torch.no_grad():
            lo = m(input_ids=torch.tensor([text])).logits[0].float()
            kl = torch.nn.functional.kl_div(lo.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                            reduction="none").sum(-1).mean()
        top1 = float((lo.argmax(-1) == ref.argmax(-1)).float().mean())
        diverged, outs = 0, []
        for case in cases:
            with torch.no_grad():
                out = m.generate(torch.tensor([case.ids]), max_new_tokens=24, do_sample=False,
                                 pad_token_id=lm.tokenizer.pad_token_id)
            gen = out[0, len(case.ids):].tolist()
            said = lm.tokenizer.decode(gen, skip_special_tokens=True)
            diverged += judge_text(said, case.word)
            outs.append(said[:40])
        rows.append({"layers": name, "sink": c, "text_top1": round(top1, 4), "text_kl": round(float(kl), 4),
                     "diverged": diverged, "n": len(cases), "outputs": outs})
        print(f"{name:12s} sink {c!s:5s} text top-1 {top1:.3f} KL {float(kl):.4f} diverged {diverged}/{len(cases)} "
              f"{outs}", flush=True)
    report(save(a, {"model": lm.name, "rows": rows, "machine": machine()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
