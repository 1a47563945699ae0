"""Study: the trained stock model on every attack family and every text setting, in transformers and in
llama.cpp at three quantization types.

Trains the stock model (``sinkhole.experimental.stock.train_stock``, the defaults of ``sinkhole experimental stock``; or loads a
trained state saved by ``--keep``), then runs the broad verification (``sinkhole.patch.verify.verify_broad``) over
the whole catalogue (the broad families and the evasion families, held-out words, 100-2,000 repetitions, the
16-repetition floor) beside the unpatched model, the run gate and the input collapse:

* in transformers (the saved-model path: ``TorchGate(lm, None, model=stock)``);
* in llama.cpp for each GGUF type (``source``: SmolLM2's Q4_1 tensors byte for byte, the trained ones Q8_0;
  ``Q8_0``; ``F16``): needs llama-cpp-python 0.3.36+ (``granite_swa``);

and text fidelity in the 12 settings (two sources, with and without BOS, 64 / 512 / 2,048 tokens) in each, plus
code, JSON, markdown tables and number lists (``study_gate_text.sources``) in transformers.

    python studies/experimental/study_stock.py --save stock_broad            # ~60 min on the 2-core CPU
    python studies/experimental/study_stock.py --engines transformers --keep trained.pt --save stock_broad_tf
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import machine, parser, report, save  # noqa: E402

from sinkhole.patch.verify import stock_targets  # noqa: E402


def _slim(v: dict) -> dict:
    """A verification without its per-case texts, but with each method's per-family rates."""
    out = {k: v[k] for k in ("rates", "fidelity", "targets", "timing", "engine", "settings", "seconds", "methods")}
    out["stock_targets"] = stock_targets(v)  # the stock route's targets: the floor counts, top-1 >= 99 %
    out["records"] = {m: [{k: r[k] for k in ("family", "word", "reps", "either")} for r in rs]
                      for m, rs in v["records"].items()}
    return out


def main(argv=None) -> int:
    p = parser(__doc__, study=True)
    p.add_argument("--engines", default="transformers,llama.cpp")
    p.add_argument("--quants", default="source,Q8_0,F16")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default=None, help="a trained state (torch.save of train_stock's result): loaded if it "
                                                "exists, else written after training")
    p.add_argument("--no-text-kinds", action="store_true", help="skip code / tables / number lists")
    a = p.parse_args(argv)

    import torch

    from sinkhole import load_model
    from sinkhole.attack.families import CATALOGUE
    from sinkhole.decoding.engines import TorchGate
    from sinkhole.decoding.gate import RunGate
    from sinkhole.patch.core import Patch
    from sinkhole.patch.fidelity import fidelity
    from sinkhole.experimental.stock import StockConfig, stock_gguf, stock_model, train_stock
    from sinkhole.patch.verify import Fix, verify_broad

    lm = load_model(a.model, progress=False)
    if a.keep and Path(a.keep).exists():
        trained = torch.load(a.keep)
    else:
        cfg = StockConfig()
        if a.steps:
            cfg.steps = a.steps
        trained = train_stock(lm, cfg, log=print)
        if a.keep:
            torch.save(trained, a.keep)
    model = stock_model(lm, trained)
    fams = list(CATALOGUE)
    base = {"gate": Patch(gate=RunGate()), "collapse": "collapse"}
    res: dict = {"model": lm.name, "training": trained["meta"], "machine": machine(), "families": fams}
    engines = a.engines.split(",")
    if "transformers" in engines:
        t = time.perf_counter()
        res["transformers"] = _slim(verify_broad(lm, Fix(model=model), families=fams, baselines=base, seed=a.seed))
        print(f"transformers: {time.perf_counter() - t:.0f} s", res["transformers"]["stock_targets"],
              {f: (r["diverged"], res["transformers"]["rates"]["short_run"].get(f, {}).get("diverged"),
                   res["transformers"]["rates"]["patch"][f]["diverged"])
               for f, r in res["transformers"]["rates"]["unpatched"].items()}, flush=True)
        if a.save or a.out:
            save(a, res)  # after each engine: a stopped run keeps what it finished
        if not a.no_text_kinds:
            from study_gate_text import sources

            with tempfile.TemporaryDirectory() as tmp:
                src = {k: v for k, v in sources(Path(tmp)).items() if k != "sonnets"}
                fid = fidelity(lm, {"stock": (TorchGate(lm, None, model=model), None)}, sources=tuple(src.values()),
                               seed=a.seed)
            names = {v: k for k, v in src.items()}
            res["text_kinds"] = [{**r, "source": names.get(r["source"], r["source"])} for r in fid["stock"]]
            worst = min(res["text_kinds"], key=lambda r: r["top1_agreement"])
            print("text kinds, worst:", worst, flush=True)
    if "llama.cpp" in engines:
        with tempfile.TemporaryDirectory() as tmp:
            for i, q in enumerate(a.quants.split(",")):
                path = Path(tmp) / f"stock-{q}.gguf"
                rep = stock_gguf(lm, trained["sinks"], path, trained["weights"], quant=q)
                t = time.perf_counter()
                v = verify_broad(lm, Fix(engine="llama.cpp", gguf=path), families=fams,
                                 baselines=base if i == 0 else None, seed=a.seed)
                res[f"llama.cpp/{q}"] = {**_slim(v), "bytes": rep["bytes_out"]}
                print(f"llama.cpp {q}: {time.perf_counter() - t:.0f} s", res[f"llama.cpp/{q}"]["stock_targets"],
                      {f: r["diverged"] for f, r in v["rates"]["patch"].items()}, flush=True)
                if a.save or a.out:
                    save(a, res)
    report(save(a, res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
