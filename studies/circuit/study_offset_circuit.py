"""Study: the circuit on the one attack family the state check leaves over its target (a phrase begun mid-way).

For every case of the family in the held-out draws (2-6) and its 16-repetition floor, reads the circuit at
the prompt's last 32 tokens, on the full prompt and on what the gated model sees (the state check's
collapse of it): the norm ratio to the first token at the drift layer and the attention on position 0 in
the four layers after the massive-activation layer (the readings of study_gate_documents.py), and the state
check's layer-0 distance (mean of the last 32 excess tokens it read).

    python studies/circuit/study_offset_circuit.py --save offset_circuit     # about a minute on the 2-core CPU
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import circuit_reader, machine, parser, report, save  # noqa: E402


def main(argv=None) -> int:
    p = parser(__doc__, study=True)
    p.add_argument("--seeds", default="2,3,4,5,6")
    p.add_argument("--family", default="offset")
    a = p.parse_args(argv)

    import torch

    from sinkhole import load_model
    from sinkhole.attack.families import BROAD_REPS, broad_cases
    from sinkhole.decoding.gate import RunGate, collapse, excess_mask, stretches
    from sinkhole.decoding.state_check import STATE_CONFIRM, distances

    lm = load_model(a.model, progress=False)
    gate = RunGate(confirm=STATE_CONFIRM)
    reader, drift, late = circuit_reader(lm)

    def read(ids):
        return reader(ids, len(ids) - 32, len(ids) - 1)

    rows, seen = [], set()
    for seed in [int(s) for s in a.seeds.split(",")]:
        for short in (False, True):
            for case in broad_cases(lm, BROAD_REPS, [a.family], seed=seed, short=short):
                if (case.word, case.reps) in seen:
                    continue
                seen.add((case.word, case.reps))
                ids = list(case.ids)
                d = distances(lm, ids, gate)
                ex = excess_mask(torch.tensor([ids]), gate)[0]
                dist, st = None, stretches(ex)
                if st:
                    r0, r1 = st[-1]
                    x = d[0, r0:r1 + 1]
                    x = x[~torch.isnan(x)]
                    dist = round(float(x[-32:].mean()), 3) if len(x) else None
                view = collapse(ids, gate, dist=d)
                (rf, af), (rv, av) = read(ids), read(view)
                rows.append({"word": case.word, "reps": case.reps, "tokens": len(ids), "view_tokens": len(view),
                             "layer0_distance": dist, "full": {"drift_norm_ratio": rf, "attn_first_late": af},
                             "view": {"drift_norm_ratio": rv, "attn_first_late": av}})
                print(f"{case.word:24s} x{case.reps:<5d} tokens {len(ids):5d} view {len(view):5d} distance {dist} "
                      f"full ratio {rf} attn0 {af} | view ratio {rv} attn0 {av}", flush=True)
    report(save(a, {"model": lm.name, "family": a.family, "drift_layer": drift, "late_layers": late,
                  "confirm": STATE_CONFIRM, "rows": rows, "machine": machine()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
