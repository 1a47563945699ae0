"""Study: runs built to get around the run gate (no exact repeating unit), beside the exact run.

For each evasion family of :data:`sinkhole.attack.families.EVASION` (a filler word at random gaps, two to
four words in random order, case and format variants, random separators, a phrase started mid-way,
Unicode look-alikes and zero-width spaces) and the exact run after ``Repeat:`` as control, the broad
verification's attack half: two held-out cases per family at 100-2,000 repetitions and the same prompts at
16 repetitions (the floor), 64 greedy tokens, judged by the token-set judge (a token outside the stretch's
own tokens that is not a separator). Methods: the unpatched model, the input-side collapse and the run
gate (its default rule). Text fidelity is not part of this study (the broad verification scores it).

Usage::

    python studies/divergence/study_evasion.py --seeds 0,1 --save evasion     # a few minutes per seed on the 2-core CPU
    python studies/divergence/study_evasion.py --seeds 2 --confirm 0.2 --all-families --engine llama.cpp --save evasion_llamacpp
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import machine, parser, report, result_path, save  # noqa: E402


def main(argv=None) -> int:
    p = parser(__doc__, study=True)
    p.add_argument("--seeds", default="0")
    p.add_argument("--confirm", type=float, default=None,
                   help="also run the run gate with the state check at this distance (the patch; the plain gate "
                        "becomes a baseline)")
    p.add_argument("--all-families", action="store_true", help="every family of the broad set, not only the exact run")
    p.add_argument("--engine", default="transformers", choices=["transformers", "llama.cpp"],
                   help="decode every method in llama.cpp (the model's GGUF; needs llama-cpp-python)")
    a = p.parse_args(argv)

    from sinkhole import load_model
    from sinkhole.attack.families import EVASION, FAMILIES
    from sinkhole.decoding.gate import RunGate
    from sinkhole.patch import Patch
    from sinkhole.patch.verify import verify_broad

    lm = load_model(a.model, progress=False)
    families = [*(FAMILIES if a.all_families else ["repeat"]), *EVASION]
    methods = ["unpatched", "input_collapse", "patch", "short_run"]
    patch, baselines = Patch(gate=RunGate()), {"input_collapse": "collapse"}
    if a.confirm is not None:
        patch = Patch(gate=RunGate(confirm=a.confirm))
        baselines["run_gate"] = Patch(gate=RunGate())
        methods = ["unpatched", "input_collapse", "run_gate", "patch", "short_run"]
    runs = []
    for seed in [int(s) for s in a.seeds.split(",")]:
        t = time.perf_counter()
        res = verify_broad(lm, patch, baselines=baselines, seed=seed,
                           families=families, sources=(), log=lambda m: None, quiet=True, engine=a.engine)
        rates = res["rates"]
        print(f"seed {seed} ({time.perf_counter() - t:.0f} s)")
        print(f"  {'family':14s} " + " ".join(f"{m:>14s}" for m in methods))
        for f in families:
            row = [rates[m].get(f, {"diverged": 0, "n": 0}) for m in methods]
            print(f"  {f:14s} " + " ".join(f"{r['diverged']:>12d}/{r['n']}" for r in row))
        runs.append({"seed": seed, "rates": rates, "records": res["records"], "seconds": res["seconds"]})
        if a.save or a.out:  # after every seed, so a long run keeps what it finished
            described = {f: (EVASION.get(f) or FAMILIES[f]).description for f in families}
            save(a, {"model": lm.name, "engine": a.engine, "families": described,
                          "patch": patch.gate.to_dict(), "methods": methods, "runs": runs, "machine": machine()})
    report(result_path(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
