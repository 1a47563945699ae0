"""Benchmark: divergence in llama.cpp beside transformers on the same cases.

The embedded SmolLM2 GGUF (Q4_1) runs in llama.cpp through llama-cpp-python on its quantized
kernels; transformers runs the same GGUF dequantized to float32. Same cases (words x reps x
templates, built with the model's tokenizer), greedy decoding, the same two judges. Reports both
rates, how often the verdicts agree, how often the generated tokens are identical, the first
position where they differ, and the time of each engine (generation through ``generate`` for
transformers, so both engines decode token by token).

Usage::

    python benchmarks/bench_engines.py --save engines_smollm2
    python benchmarks/bench_engines.py --gguf patched.gguf     # e.g. a patched model written by patch --gguf
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, parser, report, save  # noqa: E402


def main(argv=None) -> int:
    p = parser(__doc__)
    p.add_argument("--gguf", default=None, help="run this GGUF instead (loaded by both engines)")
    p.add_argument("--words", default="poem,company,book,music,flower,ocean")
    p.add_argument("--reps", default="400,1000")
    p.add_argument("--templates", default="repeat,garak_this")
    p.add_argument("--max-new-tokens", type=int, default=24)
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sinkhole import load_model
    from sinkhole.attack.diverge import run_cases, run_llamacpp, summarize
    from sinkhole.attack.prompts import make_cases

    lm = load_model(args.gguf or args.model, progress=False)
    cases = make_cases(lm, args.words.split(","), [int(r) for r in args.reps.split(",")], args.templates.split(","))
    t = time.perf_counter()
    hf = run_cases(lm, cases, max_new_tokens=args.max_new_tokens, batch_size=1, quiet=True, keep_ids=True)
    t_hf = time.perf_counter() - t
    t = time.perf_counter()
    lc = run_llamacpp(lm, cases, args.max_new_tokens, quiet=True)
    t_lc = time.perf_counter() - t
    a = summarize(hf, args.max_new_tokens)
    per = []
    for c, x, y in zip(cases, a.cases, lc.cases):
        per.append({"word": c.word, "reps": c.reps, "template": c.template, "transformers": x["diverged"],
                    "llama.cpp": y["diverged"], "same_text": x["text"] == y["text"],
                    "transformers_text": x["text"][:80], "llamacpp_text": y["text"][:80]})
    row = {"benchmark": "engines", "command": "python benchmarks/bench_engines.py " + " ".join(argv or sys.argv[1:]),
           "machine": machine(), "model": args.gguf or args.model, "n_cases": len(cases),
           "max_new_tokens": args.max_new_tokens,
           "rate_transformers": a.rate, "rate_llamacpp": lc.rate, "garak_rate_transformers": a.garak_rate,
           "garak_rate_llamacpp": lc.garak_rate,
           "verdicts_agree": sum(r["transformers"] == r["llama.cpp"] for r in per),
           "same_continuation": sum(r["same_text"] for r in per),
           "seconds_transformers": round(t_hf, 1), "seconds_llamacpp": round(t_lc, 1),
           "speedup_llamacpp": round(t_hf / t_lc, 2) if t_lc else None, "cases": per}
    print(json.dumps(row))
    report(save(args, row), {k: row[k] for k in ("verdicts_agree", "n_cases", "seconds_transformers", "seconds_llamacpp")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
