"""Study: did the sink do it? The per-case explanation on every family of the broad held-out set.

For each model and draw (``broad_cases(seed=draw)``: the families' held-out words at rotating repetition counts,
random builds of the evasion and cluster families), every case is judged as ``verify_broad`` judges it (either judge;
the token-set judge for clusters and evasions), then explained by :class:`sinkhole.attack.explain.Explainer`: the
circuit's readings over the run's last 32 tokens and, for every diverged case, the causal test (the run's drift-layer
state cut back to its 16-repetition state, judged again the same way). Results per draw and per family, never
pooled across draws.

Usage::

    python studies/circuit/study_explain.py --save explain                         # SmolLM2, draws 0-2
    python studies/circuit/study_explain.py --model gemma3-270m --save explain_gemma
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import machine, parser, report, save  # noqa: E402


def main(argv=None) -> int:
    p = parser(__doc__, study=True)
    p.add_argument("--draws", default="0,1,2", help="comma-separated draws (broad_cases seeds; default 0,1,2)")
    p.add_argument("--families", default=None, help="comma-separated families (default: all of the catalogue)")
    a = p.parse_args(argv)

    from sinkhole import load_model
    from sinkhole.attack.explain import Explainer, summarize_explanations
    from sinkhole.attack.families import CATALOGUE, broad_cases, judge_cases
    from sinkhole.circuit import discover

    lm = load_model(a.model, progress=False)
    circ = discover(lm)
    ex = Explainer(lm, circ)
    fams = a.families.split(",") if a.families else list(CATALOGUE)
    draws = []
    t0 = time.perf_counter()
    for d in [int(x) for x in a.draws.split(",")]:
        cases = broad_cases(lm, families=fams, seed=d)
        recs = judge_cases(lm, cases, quiet=True)
        for c, r in zip(cases, recs):
            def rerun(hooks, c=c):
                return bool(judge_cases(lm, [c], hooks=hooks, quiet=True)[0]["either"])
            r["explain"] = ex.explain(c.ids, c.unit, bool(r["either"]), rerun, c.allowed)
            e = r["explain"]
            print(f"draw {d} {c.family:15s} {c.word[:22]:22s} x{c.reps:<5d} diverged={str(r['either']):5s} "
                  f"verdict={str(e.get('verdict')):22s} L{circ.drift_layer} {e.get('ratio_drift')} "
                  f"16:{e.get('ratio_drift_16')} attn0 {e.get('attn0_late')} l0 {e.get('l0_distance')} "
                  f"{e.get('causal')}", flush=True)
        s = summarize_explanations(recs, "family")
        print(f"draw {d}: {s['headline']}", flush=True)
        draws.append({"draw": d, "summary": s, "cases": [{k: r[k] for k in ("family", "word", "reps", "either",
                                                                              "text", "explain")} for r in recs]})
    result = {"model": lm.name, "sink_kind": circ.sink_kind, "drift_layer": circ.drift_layer,
              "marking_layers": circ.marking_layers, "massive_layer": circ.massive_layer, "late_layers": ex.late,
              "families": fams, "draws": draws, "seconds": round(time.perf_counter() - t0, 1), "machine": machine()}
    report(save(a, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
