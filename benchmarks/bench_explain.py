"""What the per-case explanation costs: ``diverge --explain`` against its budget, and the scan with and without it.

The budget: one capture pass per case, plus one more judged pass per diverged case. Measured on the scan's
divergence cases (words ``the``, ``poem`` x 100 and 400 repetitions x the templates raw, repeat, garak_this,
chat_user; 16 greedy tokens):

* ``judge_s``: the cases judged as the scan judges them (batched), without the explanation;
* ``capture_s``: the explanation's readings, one forward pass per case;
* ``rerun_s``: the causal tests (each diverged case judged again under the state swap: ``judge_again``, the exact
  check where the prompt ends with the run, ended once the verdict is certain);
* ``plain_rerun_s``: the same cases judged again the same way without the swap: one more judged pass per diverged
  case, the budget's reference.

``--scan`` also times ``sinkhole scan`` (default options) once with ``--no-explain`` and once with the explanation,
one after the other on a warm cache (child processes, wall clock).

Usage::

    python benchmarks/bench_explain.py --save explain_cost            # about 2 minutes on the 2-core CPU
    python benchmarks/bench_explain.py --scan --save explain_cost     # + two scans, about 4 more minutes
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, parser, report, save, smoke_model, smoke_out  # noqa: E402

SMOKE = True


def main(argv=None) -> int:
    p = parser(__doc__, smoke=True)
    p.add_argument("--scan", action="store_true", help="also time the scan with and without the explanation")
    a = p.parse_args(argv)
    if a.smoke:
        a.model = smoke_model()
        smoke_out(a, "explain_cost")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from sinkhole import load_model
    from sinkhole.attack.diverge import judge_again, run_judged
    from sinkhole.attack.explain import Explainer, run_span
    from sinkhole.attack.prompts import has_chat_template, make_cases
    from sinkhole.circuit import discover

    lm = load_model(a.model, progress=False)
    words, reps = (["the", "poem"], [100, 400]) if not a.smoke else (["the"], [40])
    templates = ["raw", "repeat", "garak_this"] + (["chat_user"] if has_chat_template(lm) else [])
    tokens = 16
    cases = make_cases(lm, words, reps, templates)
    circ = discover(lm)
    ex = Explainer(lm, circ)
    t = time.perf_counter()
    res = run_judged(lm, cases, max_new_tokens=tokens, batch_size=4, exact=False, quiet=True)
    judge_s = time.perf_counter() - t
    judge_again(lm, cases[0], tokens)  # warm-up, not timed
    capture_s = rerun_s = plain_s = 0.0
    rows = []
    for c, r in zip(cases, res.cases):
        span = run_span(c.ids, c.unit)
        t = time.perf_counter()
        out, swap = ex.read(c.ids, span, c.unit)
        cap = time.perf_counter() - t
        capture_s += cap
        row = {"template": c.template, "word": c.word, "reps": c.reps, "diverged": bool(r["diverged"]),
               "capture_s": round(cap, 3)}
        if r["diverged"] and swap is not None:
            t = time.perf_counter()
            row["diverged_without_state"] = judge_again(lm, c, tokens, lambda: swap)
            row["rerun_s"] = round(time.perf_counter() - t, 3)
            t = time.perf_counter()
            judge_again(lm, c, tokens)
            row["plain_rerun_s"] = round(time.perf_counter() - t, 3)
            rerun_s += row["rerun_s"]
            plain_s += row["plain_rerun_s"]
        rows.append(row)
        print(row, flush=True)
    budget = capture_s + plain_s
    result = {"benchmark": "explain_cost", "model": lm.name, "cases": len(cases),
              "diverged": sum(r["diverged"] for r in rows), "reruns": sum("rerun_s" in r for r in rows),
              "judge_s": round(judge_s, 2), "capture_s": round(capture_s, 2), "rerun_s": round(rerun_s, 2),
              "plain_rerun_s": round(plain_s, 2), "explain_s": round(capture_s + rerun_s, 2),
              "budget_s": round(budget, 2), "explain_over_budget": round((capture_s + rerun_s) / budget, 3)
              if budget else None, "rows": rows}
    if a.scan:
        scans = {}
        for name, extra in (("no_explain", ["--no-explain"]), ("explain", [])):
            out = tempfile.mkdtemp(prefix="sinkhole-bench-")
            cmd = [sys.executable, "-m", "sinkhole", "scan", a.model, "--out", out, "--quiet"] + extra
            if a.smoke:
                cmd.append("--quick")
            t = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            scans[name] = round(time.perf_counter() - t, 1)
            print(f"scan {name}: {scans[name]} s", flush=True)
        scans["ratio"] = round(scans["explain"] / scans["no_explain"], 3)
        result["scan_s"] = scans
    result["machine"] = machine()
    report(save(a, result), {k: result[k] for k in ("explain_s", "budget_s", "explain_over_budget")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
