"""Study: what the run gate does to text other than prose (code, JSON, markdown tables, number lists).

The broad verification scores a shipped play and the model's own sampled text. A user's text can be
code, data or tables, and some of it holds long low-diversity stretches of its own (a JSON file of
model outputs that repeat a word, a table column of ``ok | ok | ok``). For each source this measures
how many tokens the gate hides and, where it hides any, top-1 agreement, KL and perplexity change
against the unpatched model in the broad verification's 12 settings (with and without BOS; windows
64 / 512 / 2,048), for several random stretches (seeds).

Sources, all built from this repository (nothing is downloaded):

* ``code``: sinkhole's own Python source;
* ``results_json``: ``benchmarks/results/*.json`` and ``studies/results/*.json`` (holds model outputs such as ``table table ...``);
* ``markdown``: ``docs/*.md`` (tables with repeated cells);
* ``csv`` and ``int_list``: deterministic number tables and a JSON list of integers;
* ``sonnets``: a shipped text (prose control).

Usage::

    python studies/fix/study_gate_text.py --save gate_text      # ~5 min on the 2-core CPU
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import machine, parser, report, result_path, save  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def sources(tmp: Path) -> dict[str, str]:
    def cat(paths) -> str:
        return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(paths))

    texts = {
        "code": cat((ROOT / "src" / "sinkhole").rglob("*.py")),
        "results_json": cat([*(ROOT / "benchmarks" / "results").glob("*.json"),
                             *(ROOT / "studies" / "results").glob("*.json")]),
        "markdown": cat((ROOT / "docs").glob("*.md")),
        "csv": "\n".join(",".join(f"{(i * 37 + j * 11) % 1000 / 7:.2f}" for j in range(8)) for i in range(3000)),
        "int_list": json.dumps([(i * 7919) % 100000 for i in range(20000)]),
    }
    out = {}
    for name, body in texts.items():
        p = tmp / f"{name}.txt"
        p.write_text(body, encoding="utf-8")
        out[name] = str(p)
    out["sonnets"] = "sonnets"
    return out


def main(argv=None) -> int:
    p = parser(__doc__, study=True)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--confirm", type=float, default=None, help="measure the gate with the state check at this distance")
    args = p.parse_args(argv)

    from sinkhole import load_model
    from sinkhole.data import TEXTS, load_text
    from sinkhole.patch.fidelity import TEXT_TOKENS, fidelity, text_tokens
    from sinkhole.patch.core import Patch
    from sinkhole.decoding.gate import RunGate, hidden_mask
    from sinkhole.decoding.state_check import read_state

    lm = load_model(args.model)
    rule = RunGate(confirm=args.confirm)
    gate = Patch(gate=rule)
    res: dict = {"machine": machine(), "gate": rule.to_dict(), "sources": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, src in sources(Path(tmp)).items():
            toks = lm.encode(load_text(src) if src in TEXTS else Path(src).read_text(encoding="utf-8"), bos=False)
            # the state check reads the model, which the whole of a source (up to 500k tokens) is too long for:
            # with it, only the scored windows are counted (in the fidelity records)
            whole = int(hidden_mask([toks], rule).sum()) if rule.confirm is None else None
            rec = {"tokens": len(toks), "hidden_whole": whole,
                   "hidden_pct": None if whole is None else round(100 * whole / len(toks), 3), "seeds": {}}
            for seed in [int(s) for s in args.seeds.split(",")]:
                scored = text_tokens(lm, src, seed=seed, need=TEXT_TOKENS)
                if not int(hidden_mask([scored], rule, read_state(lm, [scored], rule)).sum()):
                    rec["seeds"][str(seed)] = "nothing hidden: every setting bit-identical"
                    continue
                rec["seeds"][str(seed)] = fidelity(lm, {"gate": (gate, None)}, sources=(src,), seed=seed,
                                                   quiet=True)["gate"]
            worst = [r for s in rec["seeds"].values() if isinstance(s, list) for r in s]
            rec["worst"] = ({"top1": min(r["top1_agreement"] for r in worst),
                             "kl": max(r["mean_kl_nats"] for r in worst),
                             "ppl_pct": max(r["ppl_change_pct"] for r in worst)} if worst else None)
            res["sources"][name] = rec
            print(name, rec["tokens"], f"{rec['hidden_pct']}% hidden", rec["worst"], flush=True)
    if args.save or args.out:
        save(args, res)
    report(result_path(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
