"""Benchmark 1: norm curve over N repetitions + attention mass on position 0 at every layer.

The measurement (identical for every contender, checked numerically): the input is
``[BOS] the the ... the`` (N repetitions of one token). Outputs:

* the norm curve: the L2 norm of the residual stream after layer ``--layer`` at every position;
* the attention mass on position 0 per layer: attention weight on position 0, averaged over
  heads and over query positions 1..T-1, for every layer.

Contenders, each in its own child process (so peak RSS is its own):

* ``sinkhole``: the capture engine (``Hooks``): the norm read at the layer (reduced in the hook)
  and the ``attn_first`` site at every layer (fused attention kernel; the weight on position 0
  from its log-sum-exp; no T x T pattern), the pass stopped after the last layer (no final norm,
  no LM head).
* ``sinkhole_pattern``: the same engine reading the full eager ``attn_pattern`` and reducing it
  inside the hook (the path before ``attn_first`` existed).
* ``hf``: plain transformers as a user would write it:
  ``model(ids, output_hidden_states=True, output_attentions=True)`` on the full model.
* ``tl``: TransformerLens 4 ``TransformerBridge.boot_transformers(<local folder>)`` then
  ``run_with_cache(ids, names_filter=...)`` keeping only the patterns and one residual stream
  (the cheapest way a TransformerLens user would write it). Runs in a separate venv
  (``--tl-python``), since TransformerLens is not a sinkhole dependency.

All contenders run under ``torch.no_grad()`` on the same float32 weights (the dequantized
SmolLM2 folder in the sinkhole cache).

Usage::

    python benchmarks/bench_core.py --reps 2000 --rounds 3 --tl-python TLVENV/bin/python
    python benchmarks/bench_core.py --memory-only --reps 4000      # the 2 GiB target
    python benchmarks/bench_core.py --contenders sinkhole_curve,hf_hidden,hf --baseline sinkhole_curve \
        --name curve_2000                                          # the norm curve alone
"""

from __future__ import annotations

import argparse  # noqa: F401  (argparse.SUPPRESS)
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, median, model_flops, parser, python_for, report, rss_mib, run_child, save  # noqa: E402

WORD_ID = 260  # SmolLM2's " the" (one token)
DEFAULT_LAYER = 11  # SmolLM2's sink layer: the first-token norm jumps to ~185x typical there


def model_folder() -> str:
    from sinkhole.models import loading

    return str(loading.model_folder("smollm2-135m-instruct", progress=False))


# --- child side -----------------------------------------------------------------------------
def _ids(reps: int):
    import torch

    return torch.tensor([[1] + [WORD_ID] * reps])


def child_sinkhole(args, site: str = "attn_first", dtype: str = "float32"):
    import torch

    from sinkhole import Hooks, load_model

    t0 = time.perf_counter()
    lm = load_model("smollm2-135m-instruct", dtype=dtype)
    load_s = time.perf_counter() - t0
    n = lm.adapter.n_layers

    def norm(x, pos):
        return x.float().norm(dim=-1)[0]

    if site == "attn_first":
        def mass0(w, pos):  # (B, H, T): weight on the real first token
            return w[0, :, 1:].float().mean()
    else:
        def mass0(w, pos):  # (B, H, T, Tk) -> mean over heads and queries 1.. of the weight on key 0
            return w[0, :, 1:, 0].float().mean()

    def once():
        ids = _ids(args.reps)
        h = Hooks(lm)
        h.read("resid_post", args.layer, reduce=norm)
        for i in range(n):
            h.read(site, i, reduce=mass0)
        h.stop_after(n - 1)
        with torch.no_grad(), h:
            h.forward(ids, use_cache=False)
        return h.cache[f"resid_post.{args.layer}"], torch.stack([h.cache[f"{site}.{i}"] for i in range(n)])

    # attn_first runs the fused kernel, which skips the masked half of the attention square
    return load_s, once, lambda T: model_flops(lm.model.config, T, causal_only=site == "attn_first")


def child_sinkhole_bf16(args):
    """The sinkhole path in bfloat16 (a different precision: compare its numbers before using it)."""
    return child_sinkhole(args, dtype="bfloat16")


def child_sinkhole_pattern(args):
    """The same engine reading full eager patterns (reduced in the hook): the path before attn_first."""
    return child_sinkhole(args, site="attn_pattern")


def child_hf(args):
    import torch
    from transformers import AutoModelForCausalLM

    folder = args.folder
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    load_s = time.perf_counter() - t0

    def once():
        ids = _ids(args.reps)
        with torch.no_grad():
            out = model(ids, output_hidden_states=True, output_attentions=True)
        norms = out.hidden_states[args.layer + 1][0].norm(dim=-1)
        mass = torch.stack([a[0, :, 1:, 0].mean() for a in out.attentions])
        return norms, mass

    cfg = model.config
    return load_s, once, lambda T: model_flops(cfg, T, lm_head=True, causal_only=False)


def child_tl(args):
    import torch
    from transformer_lens.model_bridge import TransformerBridge

    t0 = time.perf_counter()
    bridge = TransformerBridge.boot_transformers(args.folder, device="cpu")
    load_s = time.perf_counter() - t0
    n = bridge.cfg.n_layers
    keep = f"blocks.{args.layer}.hook_resid_post"

    def names(name):
        return name == keep or name.endswith("attn.hook_pattern")

    def once():
        ids = _ids(args.reps)
        with torch.no_grad():
            _, cache = bridge.run_with_cache(ids, names_filter=names)
        norms = cache[keep][0].norm(dim=-1)
        mass = torch.stack([cache[f"blocks.{i}.attn.hook_pattern"][0, :, 1:, 0].mean() for i in range(n)])
        return norms, mass

    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(args.folder)
    return load_s, once, lambda T: model_flops(cfg, T, lm_head=True, causal_only=False)


def child_sinkhole_curve(args):
    """Only the norm curve, through the library call (``norm_curves``, what the circuit analysis
    uses: stops after the layer, SDPA attention since no pattern is read)."""
    import torch

    from sinkhole import load_model
    from sinkhole.circuit.norms import norm_curves

    t0 = time.perf_counter()
    lm = load_model("smollm2-135m-instruct")
    load_s = time.perf_counter() - t0

    def once():
        with torch.no_grad():
            c = norm_curves(lm, ["the"], args.reps, [args.layer], quiet=True)[0]
        return torch.tensor([c.first_token_norm] + c.norm), None

    return load_s, once, lambda T: model_flops(lm.model.config, T, n_layers=args.layer + 1, causal_only=True)


def child_hf_hidden(args):
    """Plain transformers, only ``output_hidden_states=True`` (what the norm curve alone needs)."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    load_s = time.perf_counter() - t0

    def once():
        ids = _ids(args.reps)
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        return out.hidden_states[args.layer + 1][0].norm(dim=-1), None

    return load_s, once, lambda T: model_flops(model.config, T, lm_head=True, causal_only=False)


CHILDREN = {"sinkhole": child_sinkhole, "sinkhole_pattern": child_sinkhole_pattern, "hf": child_hf, "tl": child_tl,
            "sinkhole_curve": child_sinkhole_curve, "hf_hidden": child_hf_hidden, "sinkhole_bf16": child_sinkhole_bf16}


def child_main(args):
    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rss0 = rss_mib()
    load_s, once, flops = CHILDREN[args.child](args)
    reps = args.reps
    args.reps = 31  # warm-up pass on a short input (first-call kernel setup), not timed
    once()
    args.reps = reps
    rss_loaded = rss_mib()
    times = []
    norms = mass = None
    for _ in range(args.repeats):
        t = time.perf_counter()
        norms, mass = once()
        times.append(time.perf_counter() - t)
        del t
    if args.dump:
        arrays = {"norms": norms.detach().float().numpy()}
        if mass is not None:
            arrays["mass"] = mass.detach().float().numpy()
        np.savez(args.dump, **arrays)
    emit({"contender": args.child, "reps": args.reps, "tokens": args.reps + 1, "load_s": load_s,
          "times_s": times, "rss_start_mib": rss0, "rss_after_load_mib": rss_loaded,
          "torch_threads": torch.get_num_threads(), "flops": flops(args.reps + 1)})


# --- parent side ----------------------------------------------------------------------------
def hf_output_bytes(cfg, T: int) -> int:
    """Bytes of what output_attentions + output_hidden_states return (float32), a hard floor."""
    attn = cfg.num_hidden_layers * cfg.num_attention_heads * T * T * 4
    hidden = (cfg.num_hidden_layers + 1) * T * cfg.hidden_size * 4
    return attn + hidden


def compare(dumps: dict) -> dict:
    import numpy as np

    ref_name = next((n for n in ("hf", "hf_hidden", "sinkhole") if n in dumps), None)
    base = dumps.get(ref_name) if ref_name else None
    if base is None:
        return {}
    ref = np.load(base)
    out = {}
    for name, path in dumps.items():
        if name == ref_name or path is None:
            continue
        d = np.load(path)
        out[name] = {
            "norm_max_rel_diff": float(np.max(np.abs(d["norms"] - ref["norms"]) / np.maximum(np.abs(ref["norms"]), 1e-6))),
        }
        if "mass" in d and "mass" in ref:
            out[name]["mass_max_abs_diff"] = float(np.max(np.abs(d["mass"] - ref["mass"])))
    if "mass" in ref:
        out["reference_mass_per_layer"] = [round(float(x), 4) for x in ref["mass"]]
    return out


def parent(args):
    import tempfile

    folder = model_folder()
    contenders = [c for c in args.contenders.split(",") if c]
    if "tl" in contenders and not args.tl_python:
        print("tl skipped: pass --tl-python <venv python with transformer-lens>", file=sys.stderr)
        contenders.remove("tl")
    me = Path(__file__).resolve()
    runs: dict = {c: [] for c in contenders}
    dumps: dict = {}
    tmp = Path(tempfile.mkdtemp(prefix="sinkhole-bench-"))
    for r in range(args.rounds):
        order = contenders if r % 2 == 0 else contenders[::-1]  # alternate to spread load drift
        for c in order:
            py = args.tl_python if c == "tl" else python_for(None)
            dump = tmp / f"{c}.npz"
            argv = [py, str(me), "--child", c, "--reps", str(args.reps), "--layer", str(args.layer),
                    "--repeats", str(args.repeats), "--threads", str(args.threads), "--folder", folder, "--dump", str(dump)]
            res = run_child(argv, timeout=args.timeout)
            res["round"] = r
            runs[c].append(res)
            if "error" not in res:
                dumps[c] = str(dump)
                print(f"[round {r}] {c:9s} median {median(res['times_s']):7.2f} s  peak RSS "
                      f"{res['peak_rss_mib']:7.0f} MiB  load {res['load_s']:.1f} s", file=sys.stderr)
            else:
                print(f"[round {r}] {c:9s} FAILED: {res['error']}", file=sys.stderr)
    summary = {}
    for c, rs in runs.items():
        ok = [x for x in rs if "error" not in x]
        if not ok:
            summary[c] = {"error": rs[0].get("error") if rs else "not run"}
            continue
        t_all = [t for x in ok for t in x["times_s"]]
        med = median(t_all)
        summary[c] = {
            "median_s": med,
            "min_s": min(t_all),
            "n_runs": len(t_all),
            "peak_rss_mib": median([x["peak_rss_mib"] for x in ok]),
            "rss_after_load_mib": median([x["rss_after_load_mib"] for x in ok]),
            "load_s": median([x["load_s"] for x in ok]),
            "gflops_executed": ok[0]["flops"] / 1e9,
            "gflop_per_s": ok[0]["flops"] / med / 1e9,
        }
    base = args.baseline
    if base in summary and "median_s" in summary[base]:
        s = summary[base]
        for c, v in summary.items():
            if c != base and "median_s" in v:
                v["time_ratio_vs_sinkhole"] = v["median_s"] / s["median_s"]
                v["rss_ratio_vs_sinkhole"] = v["peak_rss_mib"] / s["peak_rss_mib"]
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    payload = {
        "benchmark": "core: norm curve + attention mass on position 0 per layer",
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "machine": machine(),
        "baseline": args.baseline, "reps": args.reps, "tokens": args.reps + 1, "layer": args.layer, "rounds": args.rounds,
        "repeats_per_child": args.repeats, "threads": args.threads or "torch default",
        "summary": summary,
        "agreement_vs_hf": compare(dumps),
        "agreement_reference": next((n for n in ("hf", "hf_hidden", "sinkhole") if n in dumps), None),
        "hf_output_floor_gib": hf_output_bytes(cfg, args.reps + 1) / 2**30,
        "runs": runs,
    }
    name = args.save or f"core_{args.reps}"
    path = save(args.out or name, payload)
    print(json.dumps({k: payload[k] for k in ("summary", "agreement_vs_hf", "hf_output_floor_gib")}, indent=1))
    report(path, {c: round(v["median_s"], 2) for c, v in summary.items() if "median_s" in v})


def main(argv=None):
    p = parser(__doc__, model=None)
    p.add_argument("--reps", type=int, default=2000)
    p.add_argument("--layer", type=int, default=DEFAULT_LAYER)
    p.add_argument("--rounds", type=int, default=3, help="child processes per contender")
    p.add_argument("--repeats", type=int, default=2, help="timed passes inside each child")
    p.add_argument("--contenders", default="sinkhole,sinkhole_pattern,hf,tl")
    p.add_argument("--tl-python", default=None, help="python of a venv with transformer-lens 4")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--baseline", default="sinkhole", help="contender the ratios are relative to")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each child (0: torch's default)")
    p.add_argument("--memory-only", action="store_true", help="only sinkhole, one round (memory target)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(args)
        return
    if args.memory_only:
        args.contenders, args.rounds = "sinkhole", 1
        args.save = args.save or f"memory_{args.reps}"
    parent(args)


if __name__ == "__main__":
    main()
