"""Study: benchmarks and a chat sanity check of the trained stock model beside the source model.

* **lm-evaluation-harness**: the offline multiple-choice task the project runs (``write_local_task``: the true next
  line of held-out Shakespeare among four; ``--items`` of them), through sinkhole's lm-eval adapter, for the source
  model and for the stock model (the adapter scores whatever model the wrapper holds);
* **chat sanity**: greedy answers (48 tokens) to held-out chat prompts (other wordings than the fidelity study's
  generated text): how many are token for token the source model's, where the first differs, and whether
  the stock model's answer is fluent by the source model's own perplexity.

    python studies/experimental/study_stock_evals.py --keep trained.pt --save stock_evals     # ~6 min on the 2-core CPU
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import machine, parser, report, save  # noqa: E402

PROMPTS = ("What are the main differences between a violin and a viola?", "Give me a recipe for lentil soup.",
           "Why do cats purr?", "Explain what a prime number is to a child.", "Write a haiku about autumn rain.",
           "How does a refrigerator keep food cold?", "Suggest three names for a bakery.",
           "What should I pack for a weekend hiking trip?", "Translate 'good morning' into French and Spanish.",
           "Describe the water cycle in two sentences.", "What is the capital of Australia?",
           "List four planets of the solar system.")


def main(argv=None) -> int:
    p = parser(__doc__, study=True)
    p.add_argument("--keep", required=True, help="a trained state (torch.save of train_stock's result)")
    p.add_argument("--items", type=int, default=200)
    a = p.parse_args(argv)

    import torch

    from sinkhole import load_model
    from sinkhole.attack.prompts import chat_ids
    from sinkhole.integrations.lm_eval import run_tasks, write_local_task
    from sinkhole.experimental.stock import stock_model

    lm = load_model(a.model, progress=False)
    stock = copy.copy(lm)
    stock.model = stock_model(lm, torch.load(a.keep))
    res: dict = {"model": lm.name, "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        task = write_local_task(Path(tmp) / "task", n=a.items, seed=7)
        res["lm_eval"] = {name: run_tasks(m, None, [str(task)]) for name, m in (("source", lm), ("stock", stock))}
    print(res["lm_eval"], flush=True)
    chats = []
    for q in PROMPTS:
        ids = chat_ids(lm, q)
        outs = {}
        for name, m in (("source", lm.model), ("stock", stock.model)):
            with torch.no_grad():
                g = m.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False,
                               pad_token_id=lm.tokenizer.pad_token_id)
            outs[name] = g[0, len(ids):].tolist()
        a_, b_ = outs["source"], outs["stock"]
        first = next((i for i, (x, y) in enumerate(zip(a_, b_)) if x != y), None if len(a_) == len(b_) else
                     min(len(a_), len(b_)))
        with torch.no_grad():
            row = torch.tensor([ids + b_])
            lp = lm.model(input_ids=row).logits[0, len(ids) - 1:-1].float().log_softmax(-1)
            nll = -lp.gather(1, torch.tensor(b_)[:, None]).mean().item()
        chats.append({"prompt": q, "identical": a_ == b_, "first_difference": first,
                      "stock_ppl_under_source": round(math.exp(nll), 2),
                      "source": lm.tokenizer.decode(a_, skip_special_tokens=True),
                      "stock": lm.tokenizer.decode(b_, skip_special_tokens=True)})
        print(chats[-1]["identical"], first, chats[-1]["stock_ppl_under_source"], repr(chats[-1]["stock"][:70]),
              flush=True)
    res["chat"] = chats
    res["chat_identical"] = sum(c["identical"] for c in chats)
    report(save(a, res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
