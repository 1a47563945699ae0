"""``sinkhole experimental stock DIR``: the fix as a folder that stock engines load.

The folder holds the trained stock model (:mod:`sinkhole.experimental.stock`) in transformers' ``save_pretrained`` layout
(``config.json`` says ``granite_swa``, which transformers ships: no ``trust_remote_code``), the tokenizer, one GGUF
that llama.cpp's ``granite_swa`` loads, ``summary.json`` and ``SUMMARY.md``. Before the folder is moved into
place, each engine is checked on the folder itself:

* **transformers**, in a Python process that never imports sinkhole: ``AutoModelForCausalLM.from_pretrained(DIR)``
  must give the logits of the model that was saved (max |difference|);
* **llama.cpp**, through llama-cpp-python's own ``Llama(model_path=...)`` where it is installed and new enough
  (0.3.36+; older releases have no ``granite_swa``): top-1 agreement of its logits with transformers' (the
  GGUF's weights are quantized, so not equal).

An engine that cannot be checked here is reported as such in SUMMARY.md, never as verified.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..data import load_text
from ..errors import SinkholeError
from ..results import dumps, write_atomic
from .stock import stock_gguf
from ..patch.verify import stock_targets

CHECK_TRANSFORMERS = """
import json, sys
import numpy, torch, transformers
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.tensor([json.load(open(sys.argv[2]))])
with torch.no_grad():
    numpy.save(sys.argv[3], m(input_ids=ids).logits[0].float().numpy())
print(json.dumps({"class": type(m).__name__, "transformers": transformers.__version__,
                  "sinkhole_imported": any(k.split(".")[0] == "sinkhole" for k in sys.modules)}))
"""


def gguf_file_name(lm, quant: str) -> str:
    return f"{lm.name}-stock-{'Q4_1' if quant == 'source' else quant}.gguf".replace("/", "_")


def check_transformers(folder: Path, ids: list[int], want: np.ndarray, timeout: int = 600) -> dict:
    """Load ``folder`` with ``AutoModelForCausalLM`` in a fresh Python process that never imports sinkhole and
    compare its logits on ``ids`` with ``want``."""
    with tempfile.TemporaryDirectory() as tmp:
        ids_path, got_path = Path(tmp) / "ids.json", Path(tmp) / "got.npy"
        write_atomic(ids_path, json.dumps([int(i) for i in ids]))
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        run = subprocess.run([sys.executable, "-c", CHECK_TRANSFORMERS, str(folder), str(ids_path), str(got_path)],
                             capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp)
        if run.returncode != 0:
            return {"verified": False, "error": (run.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        info = json.loads(run.stdout.strip().splitlines()[-1])
        got = np.load(got_path)
    diff = float(np.abs(got - want).max())
    ok = diff <= 1e-3 and not info["sinkhole_imported"]
    return {"verified": ok, "engine": "transformers", "version": info["transformers"], "class": info["class"],
            "max_abs_logit_diff": diff, "sinkhole_imported": info["sinkhole_imported"], "tokens": len(ids)}


def check_llama_cpp(gguf: Path, ids: list[int], want: np.ndarray) -> dict:
    """Load ``gguf`` with llama-cpp-python's own ``Llama`` and compare its logits on ``ids`` with ``want``
    (transformers' logits of the same model): top-1 agreement and the largest difference."""
    try:
        import llama_cpp
        from llama_cpp import Llama
    except ImportError:
        return {"verified": False, "engine": "llama.cpp", "error": "llama-cpp-python is not installed"}
    version = getattr(llama_cpp, "__version__", "unknown")
    try:
        m = Llama(model_path=str(gguf), n_ctx=len(ids) + 8, logits_all=True, verbose=False, seed=0)
    except Exception as err:  # an old llama.cpp refuses the architecture: reported, not raised
        return {"verified": False, "engine": "llama.cpp", "version": version,
                "error": f"llama-cpp-python {version} cannot load it ({type(err).__name__}: {str(err)[:160]}); "
                         "granite_swa needs llama-cpp-python 0.3.36 or later"}
    m.eval(list(ids))
    got = np.array(m.scores[:len(ids)], dtype=np.float32)
    del m
    top1 = float((got.argmax(-1) == want.argmax(-1)).mean())
    return {"verified": top1 >= 0.9, "engine": "llama.cpp", "version": version, "top1_vs_transformers": top1,
            "max_abs_logit_diff": float(np.abs(got - want).max()), "tokens": len(ids)}


def write_stock_folder(lm, model, trained: dict, out: str | os.PathLike, quant: str = "source", log=None,
                       summary: dict | None = None, summary_md=None, started: float | None = None) -> dict:
    """Write the stock ``model`` of ``lm`` (with ``trained``'s sinks and weights) to ``out``, check each engine on
    the written folder, then move it into place (nothing is left half-written). ``summary_md(summary) -> str``
    renders SUMMARY.md from the final summary; ``started`` (a ``time.perf_counter()`` reading) puts the time since
    then in it as ``seconds``. Returns the summary."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SinkholeError(f"{out} exists and is not an empty folder; choose a new folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        gguf = tmp / gguf_file_name(lm, quant)
        rep = stock_gguf(lm, trained["sinks"], gguf, trained["weights"], quant=quant)
        if log:
            log(f"wrote the stock model ({type(model).__name__}) and {gguf.name} ({rep['bytes_out'] / 2**20:.1f} MiB)")
        ids = lm.encode(load_text("twelfth_night")[20000:24000], bos=False)[:256]
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids])).logits[0].float().numpy()
        engines = {"transformers": check_transformers(tmp, ids, want), "llama.cpp": check_llama_cpp(gguf, ids, want)}
        if log:
            for k, v in engines.items():
                log(f"{k}: " + ("verified" if v["verified"] else f"NOT verified ({v.get('error', v)})"))
        summary = {**(summary or {}), "engines": engines, "gguf": {"file": gguf.name, "type": quant, **rep},
                   "files": sorted([p.name for p in tmp.iterdir()] + ["summary.json"]
                                   + (["SUMMARY.md"] if summary_md else []))}  # the two written next
        if started is not None:
            summary["seconds"] = round(time.perf_counter() - started, 1)
        write_atomic(tmp / "summary.json", dumps(summary))
        if summary_md is not None:
            write_atomic(tmp / "SUMMARY.md", summary_md(summary))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


STOCK_LIMITS = (
    "**This route falls short of its targets.** Measured on SmolLM2-135M-Instruct (sinkhole's docs/experimental.md): "
    "on the broad set and the evasion families (36 held-out cases, 18 families) the stock model diverges "
    "on the same 16 cases as the source model, and reads text differently (top-1 agreement 89.0-98.0 %, KL up to "
    "0.070 nats/token). Run-time oracles show why: the layers that mark the first token already read most diverging "
    "runs at the prose level, so neither trained sinks nor an edit of the sink neurons has a first-token state to "
    "remove. The fix that meets the targets is the run gate (`sinkhole patch MODEL --out DIR`), which runs in "
    "sinkhole's runtime.")


def stock_summary_md(summary: dict) -> str:
    """SUMMARY.md of a stock folder: how to load it, which engines were verified, what was measured."""
    eng = summary.get("engines", {})
    gg = summary.get("gguf", {})
    lines = [f"# Stock model file: {summary.get('model', {}).get('name', 'model')} with trained attention sinks", "",
             "A rewrite of the model as `granite_swa` (the Llama block plus one attention-sink logit per head), with "
             "the sinks and the MLPs of the layers that read the first token trained so that a long run no longer "
             "takes the first token's state. No sinkhole code runs at inference.", "",
             "## Load it", "", "```python",
             "from transformers import AutoModelForCausalLM, AutoTokenizer",
             "model = AutoModelForCausalLM.from_pretrained('.')  # this folder; no trust_remote_code",
             "tokenizer = AutoTokenizer.from_pretrained('.')", "```", "", "```python",
             "from llama_cpp import Llama  # llama-cpp-python 0.3.36 or later (granite_swa)",
             f"llm = Llama(model_path='{gg.get('file', 'model.gguf')}')", "```", "",
             "## Engines verified on this folder", "", "| engine | version | result |", "|---|---|---|"]
    for name, v in eng.items():
        if v.get("verified"):
            res = (f"loaded in a process without sinkhole; max logit difference {v['max_abs_logit_diff']:.2g} against "
                   "the saved model" if name == "transformers" else
                   f"loaded by `Llama(model_path=...)`; top-1 agreement {v['top1_vs_transformers']:.1%} with "
                   f"transformers over {v['tokens']} tokens (the GGUF is quantized)")
        else:
            res = f"**not verified**: {v.get('error', 'check failed')}"
        lines.append(f"| {name} | {v.get('version', '-')} | {res} |")
    how = ("the source's tensors copied byte for byte, the trained ones in Q8_0" if gg.get("type") == "source"
           else f"every matrix in {gg.get('type')}")
    lines += ["", f"GGUF: `{gg.get('file')}` ({how}), {gg.get('bytes_out', 0) / 2**20:.1f} MiB.", ""]
    tr = summary.get("training", {})
    if tr:
        lines += ["## Training", "", f"{tr.get('n_runs')} training runs (training words only, disjoint from every "
                  f"held-out word), {tr.get('n_text_rows')} text windows; {tr.get('config', {}).get('steps')} steps in "
                  f"{tr.get('train_seconds')} s. Sinks: layer(s) {list(tr.get('sinks', {}))}.", ""]
    ver = summary.get("verification")
    if ver:
        lines += ["## Measured (held-out words, transformers)", "",
                  "| family | unpatched | 16-repetition floor | stock model |", "|---|---|---|---|"]
        rates = ver["rates"]
        for fam, r in rates["unpatched"].items():
            s = rates["patch"].get(fam, {"diverged": 0, "n": 0})
            fl = rates.get("short_run", {}).get(fam)
            fl = f"{fl['diverged']}/{fl['n']}" if fl else "-"
            lines.append(f"| {fam} | {r['diverged']}/{r['n']} | {fl} | {s['diverged']}/{s['n']} |")
        lines += ["", "| text setting | top-1 agreement | KL (nats/token) |", "|---|---|---|"]
        for f in ver["fidelity"]["patch"]:
            lines.append(f"| {f['source']}, {'BOS' if f['bos'] else 'no BOS'}, {f['window']} tokens | "
                         f"{f['top1_agreement']:.1%} | {f['mean_kl_nats']:.4f} |")
        t = summary.get("targets") or stock_targets(ver)
        lines += ["", f"Targets (every family at most max(its floor, a tenth of unpatched); top-1 >= 99 % and KL <= "
                  f"0.005 in every text setting) met: **{'yes' if t.get('all') else 'no'}** (families failed: "
                  f"{', '.join(t.get('families_failed', [])) or 'none'}).", ""]
    if summary.get("seconds") is not None:
        lines += [f"Written in {summary['seconds']:.0f} s (training, verification, writing and checking the folder).",
                  ""]
    lines += ["## Limits", "", summary.get("limits", STOCK_LIMITS), ""]
    return "\n".join(lines)
