"""The shared shell of every script in benchmarks/ and studies/: the common flags, the machine
description, the atomic JSON save, the one-line report, the tiny model of ``--smoke``; and the plumbing of
the timing benchmarks (child processes with peak RSS, FLOP counts).

A script in ``studies/<topic>/`` reaches this module with
``sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))``.

Every contender of a timing benchmark runs in its own child process (``python <script> --child ...``) so
that its peak resident memory is its own: the parent reads it from ``os.wait4`` (``ru_maxrss`` of exactly
that child). The child prints one JSON line (prefixed ``RESULT``) with its timings.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(os.environ.get("SINKHOLE_BENCH_RESULTS") or ROOT / "benchmarks" / "results")
STUDY_RESULTS_DIR = Path(os.environ.get("SINKHOLE_STUDY_RESULTS") or ROOT / "studies" / "results")
DEFAULT_MODEL = "smollm2-135m-instruct"
MARK = "RESULT "


# --- the shell: flags, save, report, smoke model ---------------------------------------------
def parser(doc: str | None, *, model: str | None = DEFAULT_MODEL, smoke: bool = False, save: bool = True,
           study: bool = False) -> argparse.ArgumentParser:
    """An ArgumentParser with the common flags: ``--model`` (unless ``model`` is None), ``--save NAME``
    (alias ``--name``: the result as ``benchmarks/results/NAME.json``, ``studies/results/NAME.json`` when
    ``study``), ``--out PATH`` (the result JSON at exactly this path) and, where the script supports it,
    ``--smoke`` (a tiny random model and the smallest sizes: seconds, for CI). The description is the
    docstring's first line; the rest of the docstring is the epilog."""
    first, _, rest = (doc or "").strip().partition("\n")
    p = argparse.ArgumentParser(description=first, epilog=rest.strip() or None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    if model is not None:
        p.add_argument("--model", default=model, help=f"a model name or folder for sinkhole.load_model (default {model})")
    if save:
        where = "studies/results" if study else "benchmarks/results"
        p.add_argument("--save", "--name", dest="save", default=None, metavar="NAME",
                       help=f"save the result as {where}/NAME.json")
        p.add_argument("--out", default=None, metavar="PATH", help="save the result JSON at this path (wins over --save)")
    if smoke:
        p.add_argument("--smoke", action="store_true",
                       help="run on a tiny random model with the smallest sizes (seconds; a check that the script runs)")
    p.set_defaults(results_dir=str(STUDY_RESULTS_DIR if study else RESULTS_DIR))
    return p


def result_path(args, default: str | None = None) -> Path | None:
    """Where the result goes: ``--out``, else ``--save NAME`` (or ``default``) in the results folder;
    None when neither is given."""
    if getattr(args, "out", None):
        return Path(args.out)
    name = getattr(args, "save", None) or default
    if not name:
        return None
    return Path(getattr(args, "results_dir", RESULTS_DIR)) / f"{name}.json"


def save(target, payload: dict) -> Path | None:
    """Write ``payload`` atomically (``sinkhole.results.write_json``). ``target``: parsed args (see
    :func:`result_path`), a path, or a bare name (``benchmarks/results/NAME.json``). Returns the path
    (None when args ask for no file)."""
    from sinkhole.results import write_json

    if isinstance(target, argparse.Namespace):
        path = result_path(target)
    elif isinstance(target, Path) or (isinstance(target, str) and (os.sep in target or target.endswith(".json"))):
        path = Path(target)
    else:
        path = RESULTS_DIR / f"{target}.json"
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, payload)
    return path


def report(path: Path | None, summary: dict | None = None) -> None:
    """The one line a script prints at its end: what it found (a few key numbers) and where it saved it."""
    script = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "script"
    items = " ".join(f"{k}={v}" for k, v in (summary or {}).items())
    print(f"{script}: {items}{' ' if items else ''}-> {path if path else '(not saved: pass --save NAME or --out PATH)'}",
          flush=True)


@functools.lru_cache(maxsize=None)
def smoke_model(family: str = "llama", n_layers: int = 3) -> str:
    """A tiny random model saved as a folder that ``sinkhole.load_model`` reads (tests/helpers_reliability's
    ``make_tiny_folder``: a word-level tokenizer, 64-wide layers); made once per process."""
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_reliability import make_tiny_folder

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(tempfile.mkdtemp(prefix="sinkhole-smoke-")) / f"tiny-{family}"
    return str(make_tiny_folder(folder, family=family, n_layers=n_layers))


def smoke_out(args, name: str) -> None:
    """Under ``--smoke`` the result goes to ``--out`` or a temporary file, never into the results folders."""
    if not getattr(args, "out", None):
        args.out = str(Path(tempfile.mkdtemp(prefix="sinkhole-smoke-")) / f"{name}.json")
    args.save = None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    import torch
    import transformers

    info = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "os": platform.platform(),
    }
    try:
        import sinkhole

        info["sinkhole"] = sinkhole.__version__
    except ImportError:
        pass
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True).stdout.strip()
    except OSError:
        pass
    try:
        info["load_avg_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return info


def run_child(argv: list[str], timeout: float = 1800, env: dict | None = None) -> dict:
    """Run ``argv`` as a child process; return its RESULT json plus ``peak_rss_mib`` of exactly
    that child (``ru_maxrss`` from ``os.wait4``) and ``process_wall_s``. A failed child gives
    ``{"error": ...}``."""
    import tempfile
    import threading

    full_env = dict(os.environ)
    full_env.setdefault("HF_HUB_OFFLINE", "1")
    full_env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    with tempfile.TemporaryFile("w+") as fout, tempfile.TemporaryFile("w+") as ferr:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=fout, stderr=ferr, env=full_env, text=True)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        fout.seek(0)
        ferr.seek(0)
        out, err = fout.read(), ferr.read()
    res: dict = {}
    for line in out.splitlines():
        if line.startswith(MARK):
            res = json.loads(line[len(MARK):])
    if proc.returncode != 0 or not res:
        tail = (err or out).strip().splitlines()[-3:]
        why = "killed (timeout or out of memory)" if proc.returncode < 0 else f"exit {proc.returncode}"
        return {"error": f"{why}: " + " | ".join(tail), "argv": argv}
    res["peak_rss_mib"] = ru.ru_maxrss / 1024  # KiB on Linux
    res["process_wall_s"] = wall
    return res


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB), from /proc (VmHWM) or getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def emit(result: dict) -> None:
    """Child side: print the result line the parent looks for."""
    result.setdefault("peak_rss_mib", peak_rss_mib())
    print(MARK + json.dumps(result), flush=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# --- FLOP counts ------------------------------------------------------------------------------
def llama_layer_flops(T: int, d: int, n_heads: int, n_kv: int, head_dim: int, d_mlp: int,
                      causal_only: bool = True) -> float:
    """Multiply-add FLOPs (2 per MAC) of one Llama block on T tokens (batch 1, no KV cache).

    Attention scores and the weighted sum count only the causal half (T(T+1)/2 query-key pairs)
    when ``causal_only``; eager attention really computes the full T x T square."""
    linear = 2 * T * (d * n_heads * head_dim + 2 * d * n_kv * head_dim + n_heads * head_dim * d + 3 * d * d_mlp)
    pairs = T * (T + 1) / 2 if causal_only else T * T
    attn = 2 * 2 * n_heads * head_dim * pairs
    return float(linear + attn)


def model_flops(cfg, T: int, n_layers: int | None = None, lm_head: bool = False, causal_only: bool = True) -> float:
    n_layers = cfg.num_hidden_layers if n_layers is None else n_layers
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    f = n_layers * llama_layer_flops(T, cfg.hidden_size, cfg.num_attention_heads,
                                     getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
                                     head_dim, cfg.intermediate_size, causal_only)
    if lm_head:
        f += 2 * T * cfg.hidden_size * cfg.vocab_size
    return f


def python_for(venv: str | None) -> str:
    return str(Path(venv) / "bin" / "python") if venv else sys.executable


def circuit_reader(lm):
    """The circuit's readings of a token row, as the studies of the run gate's state check report them: ``read(ids, lo, hi)`` gives
    the mean over tokens ``lo..hi`` of the norm ratio to the first token at the drift layer and of the
    attention paid to position 0 in the four attention layers after the massive-activation layer. Returns
    ``(read, drift_layer, late_layers)``."""
    import torch

    from sinkhole.capture import Hooks
    from sinkhole.circuit import discover

    c = discover(lm)
    drift, massive = c.drift_layer, c.massive_layer
    late = lm.adapter.attention_in(range(massive + 1, min(lm.adapter.n_layers, massive + 5))) or [massive]

    def read(ids, lo: int, hi: int) -> tuple[float, float]:
        h = Hooks(lm)
        h.read("resid_post", drift, reduce=lambda x, pos: x.detach().float().norm(dim=-1))
        for L in late:
            h.read("attn_first", L, reduce=lambda w, pos: w.detach().float().mean(1))
        h.stop_after(max([drift, *late]))
        with torch.no_grad(), h:
            h.forward(torch.tensor([list(ids)], device=lm.device), use_cache=False)
        norms = h.cache[f"resid_post.{drift}"][0].cpu()
        att = torch.stack([h.cache[f"attn_first.{L}"][0].cpu() for L in late]).mean(0)
        return (round(float((norms[lo:hi + 1] / norms[0]).mean()), 3), round(float(att[lo:hi + 1].mean()), 3))

    return read, drift, late
