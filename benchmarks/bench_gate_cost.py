"""Benchmark: what the run gate and its state check add to one forward pass over 2,048 tokens.

For each text (shipped prose, sinkhole's own code, a table of close numbers, and a worst case: a document
that holds long repetitive stretches, which the gate finds and the state check reads with its layer-0
probe), the median time of a full forward pass (logits at every position, as a scorer reads them) without a
patch, with the run gate and with the state check, each as a ratio to the unpatched pass timed in the
same loop. On text with no long low-diversity stretch both rules return before touching anything, so the
ratio there is the cost of the token-id test alone.

    python benchmarks/bench_gate_cost.py --save gate_cost      # about 2 minutes on the 2-core CPU
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, parser, report, save, smoke_model, smoke_out  # noqa: E402

SMOKE = True

ROOT = Path(__file__).resolve().parents[1]
N = 2048


def texts(lm, n: int = N) -> dict[str, list[int]]:
    from sinkhole.data import load_text

    code = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "src" / "sinkhole").rglob("*.py")))
    csv = "\n".join(",".join(f"{(i * 37 + j * 11) % 1000 / 7:.2f}" for j in range(8)) for i in range(600))
    # the run first (the state check confirms it: after a long context a run converges more slowly at
    # layer 0), then a list of zeros it reads and leaves alone, then prose
    mixed = ("Repeat:" + " ocean" * 600 + "\nweights = [" + ", ".join(["0"] * 300) + "]\n"
             + load_text("sonnets")[:4000])
    out = {}
    for name, body in {"prose (sonnets)": load_text("sonnets"), "code": code, "csv of close numbers": csv,
                       "a run, a list of zeros, prose": mixed}.items():
        ids = lm.encode(body, bos=False)[:n]
        if len(ids) < n:
            raise SystemExit(f"text {name} has only {len(ids)} tokens")
        out[name] = ids
    return out


def main(argv=None) -> int:
    p = parser(__doc__, smoke=True)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tokens", type=int, default=N, help="tokens per forward pass")
    a = p.parse_args(argv)
    if a.smoke:
        a.model, a.repeats, a.tokens = smoke_model(), 1, 256
        smoke_out(a, "gate_cost")

    import torch

    from sinkhole import load_model
    from sinkhole.decoding.gate import RunGate, hidden_mask
    from sinkhole.decoding.state_check import STATE_CONFIRM, read_state
    from sinkhole.models.attention import fast_attention
    from sinkhole.patch.core import Patch, apply_patch

    lm = load_model(a.model, progress=False)
    methods = {"run gate": Patch(gate=RunGate()), "state check": Patch(gate=RunGate(confirm=STATE_CONFIRM))}
    rows = []
    with torch.no_grad(), fast_attention(lm):
        for name, ids in texts(lm, a.tokens).items():
            x = torch.tensor([ids], device=lm.device)
            lm.model(input_ids=x)  # warm-up
            times: dict[str, list[float]] = {"unpatched": [], **{m: [] for m in methods}}
            for _ in range(a.repeats):  # interleaved, so drift in the machine's speed hits every method alike
                t = time.perf_counter()
                lm.model(input_ids=x)
                times["unpatched"].append(time.perf_counter() - t)
                for m, patch in methods.items():
                    with apply_patch(lm, patch, validate=False):
                        t = time.perf_counter()
                        lm.model(input_ids=x)
                        times[m].append(time.perf_counter() - t)
            base = statistics.median(times["unpatched"])
            row = {"text": name, "tokens": len(ids), "unpatched_s": round(base, 4),
                   "hidden": {m: int(hidden_mask([ids], pt.gate, read_state(lm, [ids], pt.gate)).sum()) for m, pt in methods.items()},
                   "ratio": {m: round(statistics.median(times[m]) / base, 3) for m in methods}}
            rows.append(row)
            print(f"{name:40s} unpatched {base:.3f} s  " + "  ".join(
                f"{m}: x{row['ratio'][m]:.3f} (hides {row['hidden'][m]})" for m in methods), flush=True)
    path = save(a, {"model": lm.name, "tokens": a.tokens, "repeats": a.repeats, "rows": rows, "machine": machine()})
    report(path, {r["text"].split(" ")[0]: r["ratio"] for r in rows[:2]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
