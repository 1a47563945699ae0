"""Study: the run gate's ``hold`` (how many excess tokens a run may reach before the gate hides any).

The gate with ``hold=0`` hides a run's repetitions as soon as its 32-token window is low-diversity.
That also shortens a loop the model writes into ordinary text (the seed-3 generated text of the broad
set: a 21-token stretch, KL 0.012, perplexity +2 %). A larger ``hold`` leaves such loops alone and
lets runs grow to ``window + hold`` tokens before cutting them back, which can let a model that breaks
after a few dozen repetitions of its own run diverge. This script measures both sides.

* **Tuning set** (decides the default, before any held-out number is read): the search's and the
  fine-tune's training words (disjoint from every held-out word), ``Repeat:`` and the chat assistant
  turn, 24 / 40 / 64 repetitions, 200 greedy tokens: the run the model goes on writing itself. The
  default is the largest ``hold`` whose gated divergence there is no higher than ``hold=0``'s.
* **Held-out**: the broad set's attacks for seeds 0-4; the broad set's text settings (a shipped play
  and the model's own sampled text, with and without BOS, windows 64 / 512 / 2,048) for seeds 0-9;
  and section 3.4's held-out self-written runs (8 held-out words, 40 repetitions, 1,200 tokens).

Every gated run goes through ``engines.TorchGate`` (the same tokens as the hooks; tests).

Usage::

    python studies/fix/study_gate_hold.py --save gate_hold            # ~25 min on the 2-core CPU
    python studies/fix/study_gate_hold.py --holds 0,32 --text-seeds 3 --attack-seeds 0 --no-tuning
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import machine, parser, report, result_path, save  # noqa: E402

SELF_WRITTEN_WORDS = ["ocean", "cherry", "forest", "letter", "lamp", "violet", "harbor", "meadow"]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def tuning_words() -> list[str]:
    from sinkhole.attack.families import family_words
    from sinkhole.experimental.finetune import TRAIN_WORDS
    from sinkhole.patch.search import SEARCH_WORDS, VERIFY_WORDS

    held = family_words() | {w.lower() for w in VERIFY_WORDS} | set(SELF_WRITTEN_WORDS)
    words = [w for w in dict.fromkeys(SEARCH_WORDS + TRAIN_WORDS) if w.lower() not in held]
    return words[:8]


def gated_runs(lm, cases, gate, n: int) -> list[dict]:
    from sinkhole.attack.diverge import judge_case
    from sinkhole.decoding.tokens import stop_ids
    from sinkhole.decoding.engines import TorchGate

    eng, stops = TorchGate(lm, gate), stop_ids(lm)
    out = []
    for c in cases:
        r = judge_case(lm, c, eng.greedy(c.ids, n, stops), stops)
        out.append({"word": c.word, "reps": c.reps, "template": c.template, "diverged": bool(r.diverged),
                    "garak": bool(r.garak_diverged), "tokens_until": r.tokens_until_divergence,
                    "text": r.text[:160]})
    return out


def main(argv=None) -> int:
    p = parser(__doc__, study=True)
    p.add_argument("--holds", default="0,16,32,64")
    p.add_argument("--text-seeds", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--attack-seeds", default="0,1,2,3,4")
    p.add_argument("--no-tuning", action="store_true")
    p.add_argument("--no-self-written", action="store_true")
    args = p.parse_args(argv)

    from sinkhole import load_model
    from sinkhole.attack.diverge import run_judged
    from sinkhole.attack.prompts import make_cases
    from sinkhole.attack.families import broad_cases, family_rates, judge_cases
    from sinkhole.patch.fidelity import fidelity
    from sinkhole.patch.core import Patch
    from sinkhole.decoding.engines import TorchGate
    from sinkhole.decoding.gate import RunGate

    holds = _ints(args.holds)
    lm = load_model(args.model)
    res: dict = {"machine": machine(), "holds": holds, "gate": RunGate().to_dict()}

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def flush():
        if args.save or args.out:
            save(args, res)

    if not args.no_tuning:
        words = tuning_words()
        cases = make_cases(lm, words, [24, 40, 64], ["repeat", "chat_assistant"])
        un = run_judged(lm, cases, max_new_tokens=200, quiet=True, complete=False)
        tun = {"words": words, "reps": [24, 40, 64], "templates": ["repeat", "chat_assistant"],
               "max_new_tokens": 200, "unpatched": sum(bool(c["diverged"]) for c in un.cases), "n": len(cases),
               "gate": {}}
        for h in holds:
            t = time.perf_counter()
            runs = gated_runs(lm, cases, RunGate(hold=h), 200)
            tun["gate"][str(h)] = {"diverged": sum(r["diverged"] for r in runs), "runs": runs,
                                   "seconds": round(time.perf_counter() - t, 1)}
            log(f"tuning hold={h}: {tun['gate'][str(h)]['diverged']}/{len(cases)} (unpatched {tun['unpatched']})")
        base = tun["gate"][str(holds[0])]["diverged"]
        tun["chosen"] = max(h for h in holds if tun["gate"][str(h)]["diverged"] <= base)
        res["tuning"] = tun
        log(f"tuning chooses hold={tun['chosen']}")
        flush()

    if not args.no_self_written:
        cases = make_cases(lm, SELF_WRITTEN_WORDS, [40], ["repeat", "chat_assistant"])
        sw = {}
        for h in holds:
            runs = gated_runs(lm, cases, RunGate(hold=h), 1200)
            sw[str(h)] = {"diverged": sum(r["diverged"] for r in runs), "n": len(runs), "runs": runs}
            log(f"self-written hold={h}: {sw[str(h)]['diverged']}/{len(runs)}")
        res["self_written"] = sw
        flush()

    res["attacks"] = {}
    for seed in _ints(args.attack_seeds):
        cases = broad_cases(lm, seed=seed)
        per = {}
        for h in holds:
            recs = judge_cases(lm, cases, engine=TorchGate(lm, RunGate(hold=h)), quiet=True)
            rates = family_rates(recs)
            per[str(h)] = {"diverged": sum(v["diverged"] for v in rates.values()), "rates": rates}
            log(f"attacks seed {seed} hold={h}: {per[str(h)]['diverged']}/{len(cases)}")
        res["attacks"][str(seed)] = per
        flush()

    res["text"] = {}
    for seed in _ints(args.text_seeds):
        methods = {str(h): (Patch(gate=RunGate(hold=h)), None) for h in holds}
        fid = fidelity(lm, methods, seed=seed, quiet=True)
        res["text"][str(seed)] = fid
        worst = {h: min(r["top1_agreement"] for r in fid[h]) for h in fid}
        kl = {h: max(r["mean_kl_nats"] for r in fid[h]) for h in fid}
        hidden = {h: max(r["gated_tokens"] for r in fid[h]) for h in fid}
        log(f"text seed {seed}: worst top-1 {worst}, worst KL {kl}, most hidden {hidden}")
        flush()
    print(json.dumps({k: v for k, v in res.items() if k not in ("machine",)}, default=str)[:2000])
    report(result_path(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
