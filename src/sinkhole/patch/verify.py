"""The broad held-out verification of a patch: every attack family, every text setting, side by side.

**Attacks**: the families of :mod:`sinkhole.attack.families` (exact runs after several wordings, runs
with separators, multi-token phrases, a raw run, cluster sequences), each with its own held-out words,
repetition counts from 100 to 2,000 and its short-run rate (the unpatched model at 16 repetitions: no
sink fix goes below it). **Text**: :func:`sinkhole.patch.fidelity.fidelity`, two sources with and without
BOS in windows of 64, 512 and 2,048 tokens.

**Methods** (:func:`verify_broad`): the patch, beside the unpatched model, the paper's neuron patch
and the input-side collapse of long runs (:func:`sinkhole.decoding.gate.collapse`, applied once to
the prompt, as a serving stack would); in transformers or in llama.cpp.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..attack.families import (BROAD_REPS, CATALOGUE, MAX_NEW_TOKENS, SHORT_REPS, broad_cases, family_rates,
                               judge_cases)
from ..decoding.engines import LlamaCpp, TorchGate, gate_feed_exact, gguf_of
from ..decoding.gate import RunGate, collapse
from ..decoding.state_check import read_state
from ..errors import SinkholeError
from ..progress import progress
from .core import apply_patch, llamacpp_gate
from .fidelity import TEXT_TOKENS, WINDOWS, fidelity


class Collapse:
    """The input-side baseline as a prompt transform (with its rule, for the position map)."""

    def __init__(self, gate=None, lm=None):
        self.gate, self.lm = gate or RunGate(), lm

    def __call__(self, ids):
        return collapse(ids, self.gate, read_state(self.lm, ids, self.gate))


@dataclass(frozen=True)
class Fix:
    """What the broad verification runs as the fix, and where: ``patch`` (a :class:`sinkhole.patch.Patch`: its run
    gate or its hooks), on ``engine`` ``"transformers"`` or ``"llama.cpp"`` (every method there, the reference
    too); ``gguf``, in llama.cpp, a weight patch's patched GGUF (then ``patch`` may be None); ``model``, in
    transformers, another model over the same tokenizer that *is* the fix (a stock rewrite,
    :mod:`sinkhole.experimental.stock`), verified in place of a patch."""

    patch: Any = None
    engine: str = "transformers"
    gguf: Any = None
    model: Any = None

    @classmethod
    def of(cls, fix) -> "Fix":
        """A :class:`Fix` as it is; a patch (or None) as the patch run in transformers."""
        return fix if isinstance(fix, Fix) else cls(patch=fix)

    def check(self) -> None:
        if self.engine not in ("transformers", "llama.cpp"):
            raise SinkholeError(f"unknown engine {self.engine!r}; use transformers or llama.cpp")
        if self.gguf is not None and self.engine != "llama.cpp":
            raise SinkholeError("a patched GGUF is verified with engine llama.cpp")
        if self.model is not None and (self.engine != "transformers" or self.patch is not None):
            raise SinkholeError("another model is verified alone, in transformers")


# the quick slice (tests, --quick): three families, one text source, short windows
QUICK = {"families": ("repeat", "chat_assistant", "cluster"), "reps": (100, 1000), "sources": ("twelfth_night",),
         "windows": (64, 512), "total": 512}

TARGETS = {"divergence": "at most 1/10 of the unpatched rate (or 0) in every family",
           "top1": 0.98, "kl": 0.005, "ppl": 1.0}


def verify_broad(lm, fix, baselines: dict | None = None, seed: int = 0, families=None, reps=BROAD_REPS,
                 sources=("twelfth_night", "generated"), windows=WINDOWS, total: int = TEXT_TOKENS,
                 log=print, quiet: bool | None = None) -> dict:
    """The broad verification of ``fix`` (a :class:`Fix`, or a patch run in transformers) beside ``baselines``
    (name -> patch, or the string ``"collapse"`` for the input-side baseline). Returns per-family divergence,
    per-setting fidelity, the worst setting and the targets, for every method.

    In llama.cpp every method runs on the model's GGUF (the reference too: top-1 and KL come from llama.cpp's
    own logits); a run-gate patch runs as the gate there (:class:`sinkhole.decoding.engines.LlamaCpp`), a weight
    patch as its patched GGUF (``Fix.gguf``, written by ``sinkhole experimental search --gguf``)."""
    fix = Fix.of(fix)
    fix.check()
    patch, engine, gguf, model = fix.patch, fix.engine, fix.gguf, fix.model
    t0 = time.perf_counter()
    cases = broad_cases(lm, reps, families, seed=seed)
    short = broad_cases(lm, reps, families, seed=seed, short=True)
    if not cases:
        raise SinkholeError("no broad verification case fits this model's context; verify with --no-broad")
    if lm.n_ctx:
        windows = [w for w in windows if w <= lm.n_ctx] or [min(windows[0], lm.n_ctx)]
    if engine == "llama.cpp":
        methods, ref, make = _llama_methods(lm, patch, gguf, baselines, cases, windows)
    else:
        methods = {"patch": (patch if model is None else TorchGate(lm, None, model=model), None)}
        for name, b in (baselines or {}).items():
            methods[name] = (None, Collapse()) if isinstance(b, str) and b == "collapse" else (b, None)
        ref, make = (None, None), None
    log(f"broad verification ({engine}): {len(cases)} attack cases in {len({c.family for c in cases})} families "
        f"(repetitions {sorted({c.reps for c in cases})}), {MAX_NEW_TOKENS} tokens; methods: unpatched, "
        + ", ".join(methods))

    def attacks(cs, method):
        spec, tf = method
        if make is not None:  # llama.cpp: an engine per method, freed after its cases
            return judge_cases(lm, cs, transform=tf, quiet=quiet, engine=make(spec, False))

        if isinstance(spec, TorchGate):  # another model: decoded on its own
            return judge_cases(lm, cs, transform=tf, quiet=quiet, engine=spec)
        if spec is not None and fed_gate(lm, spec):
            return judge_cases(lm, cs, transform=tf, quiet=quiet, engine=TorchGate(lm, spec.gate))
        hooks = None if spec is None else (lambda p=spec: apply_patch(lm, p, validate=False))
        return judge_cases(lm, cs, hooks=hooks, transform=tf, quiet=quiet)

    timing = {}
    t = time.perf_counter()
    recs = {"unpatched": attacks(cases, ref)}
    recs["short_run"] = attacks(short, ref)
    timing["unpatched_s"] = round(time.perf_counter() - t, 1)
    for name, m in progress(list(methods.items()), desc="broad attacks", disable=quiet):
        t = time.perf_counter()
        recs[name] = attacks(cases, m)
        timing[f"{name}_attacks_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    if make is not None:  # text engines keep every position's logits
        engines: dict = {}

        def text(spec):  # one engine per (GGUF, gate): the reference and the collapse share theirs
            key = (spec[0], id(spec[1]))
            if key not in engines:
                engines[key] = make(spec, True)
            return engines[key]

        fid = fidelity(lm, {n: (text(sp), tf) for n, (sp, tf) in methods.items()}, sources=sources,
                       windows=windows, total=total, seed=seed, quiet=quiet, base=(text(ref[0]), None))
        engines.clear()
    else:
        fid = fidelity(lm, methods, sources=sources, windows=windows, total=total, seed=seed, quiet=quiet)
    timing["fidelity_s"] = round(time.perf_counter() - t, 1)
    rates = {name: family_rates(r) for name, r in recs.items()}
    out = {"families": {f: CATALOGUE[f].description for f in rates["unpatched"]}, "rates": rates, "fidelity": fid,
           "records": recs, "methods": list(methods), "timing": timing, "engine": engine,
           "settings": {"reps": list(reps), "short_reps": SHORT_REPS, "max_new_tokens": MAX_NEW_TOKENS,
                        "sources": list(sources), "windows": list(windows), "tokens_per_setting": total,
                        "seed": seed,
                        "gate_attacks": ("llama.cpp" if engine == "llama.cpp" else
                                         "collapse fed (engines.TorchGate)" if any(
                                             sp is not None and fed_gate(lm, sp) for sp, _ in methods.values())
                                         else "hooks")}}
    out["targets"] = {name: broad_targets(rates["unpatched"], rates[name], fid[name]) for name in methods}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def fed_gate(lm, patch) -> bool:
    """Whether the attacks of ``patch`` run through :class:`sinkhole.decoding.engines.TorchGate` rather than
    its hooks: a patch that is only a run gate, on a model where that is exact. Both give the same
    tokens (tests: tiny models; SmolLM2 in ``tests/test_patch_real.py``); the fed run reads a long
    run's prompt collapsed and each distinct collapsed history once, so the gate's 24 attacks take
    ~20 s instead of ~95 s on the 2-core CPU."""
    return getattr(patch, "kind", None) == "gate" and gate_feed_exact(lm)


def _llama_methods(lm, patch, gguf, baselines, cases, windows):
    """The methods of a llama.cpp verification as (engine spec, input transform) pairs, the
    reference's pair, and the factory of engines: a spec is (GGUF path, gate or None)."""
    from pathlib import Path

    src = gguf_of(lm)

    def spec_of(p, what):
        gate = llamacpp_gate(p, what=what)
        if gate is None:
            raise SinkholeError(f"{what} does nothing")
        return (str(src), gate)

    if gguf is not None:
        if not Path(gguf).is_file():
            raise SinkholeError(f"no GGUF file at {gguf}")
        methods = {"patch": ((str(gguf), llamacpp_gate(patch, patched_gguf=True)), None)}
    else:
        if patch is None:
            raise SinkholeError("nothing to verify: pass a patch or a patched GGUF")
        methods = {"patch": (spec_of(patch, "the patch"), None)}
    for name, b in (baselines or {}).items():
        methods[name] = (((str(src), None), Collapse()) if isinstance(b, str) and b == "collapse"
                         else (spec_of(b, f"baseline {name}"), None))
    longest = max(len(c.ids) for c in cases) + MAX_NEW_TOKENS + 8

    def make(spec, logits_all):
        path, gate = spec
        return LlamaCpp(path, n_ctx=max(windows) + 8 if logits_all else longest, gate=gate, logits_all=logits_all,
                        lm=lm)

    return methods, ((str(src), None), None), make


STOCK_TARGETS = {"divergence": "at most max(the 16-repetition floor, 1/10 of the unpatched rate) in every family",
                 "top1": 0.99, "kl": 0.005}


def _families_met(before: dict, after: dict, floor: dict | None = None) -> dict[str, bool]:
    """Per family: the fix's divergence is 0 or at most a tenth of the unpatched rate, or (with ``floor``, the
    16-repetition rates) at most the floor's rate where that is higher."""
    def rate(d):
        return d["diverged"] / max(d["n"], 1)

    out = {}
    for f, b in before.items():
        a = after.get(f, {"diverged": 0, "n": 0})
        fl = rate(floor[f]) if floor and f in floor else 0.0
        out[f] = a["diverged"] == 0 or rate(a) <= max(fl, 0.1 * rate(b))
    return out


def _targets(fam: dict[str, bool], fid: list[dict], targets: dict) -> dict:
    """The checks of ``fam`` (per family: target met) and of the text settings ``fid`` against ``targets``'
    top-1, KL and (when it has one) perplexity lines, with the worst setting of each."""
    out = {"divergence_every_family": all(fam.values()), "families_failed": [f for f, ok in fam.items() if not ok]}
    if not fid:  # no text source was scored (sources=()): the text targets are not decided
        return {**out, "text": "not measured", "all": None}
    # (target, metric, higher is better, the check's name)
    lines = [("top1", "top1_agreement", True, f"top1_ge_{targets['top1'] * 100:.0f}pct_every_setting"),
             ("kl", "mean_kl_nats", False, f"kl_le_{targets['kl']}_every_setting")]
    if "ppl" in targets:
        lines.append(("ppl", "ppl_change_pct", False, f"ppl_le_{targets['ppl']:.0f}pct_every_setting"))
    worst = {}
    for name, metric, higher, check in lines:
        worst[name] = (min if higher else max)(fid, key=lambda r: r[metric])
        v = worst[name][metric]
        out[check] = v >= targets[name] if higher else v <= targets[name]
    for name, metric, _, _ in lines:
        out[f"worst_{name}"] = {k: worst[name][k] for k in ("source", "bos", "window", metric)}
    out["all"] = all(v for k, v in out.items() if k.endswith("setting") or k == "divergence_every_family")
    return out


def stock_targets(ver: dict, name: str = "patch") -> dict:
    """The stock route's targets for ``ver`` (a :func:`verify_broad` result): every family within
    max(floor, a tenth of unpatched), and top-1 >= 99 % and KL <= 0.005 in every text setting."""
    rates = ver["rates"]
    fam = _families_met(rates["unpatched"], rates[name], rates.get("short_run"))
    return _targets(fam, ver["fidelity"][name], STOCK_TARGETS)


def broad_targets(before: dict, after: dict, fid: list[dict]) -> dict:
    """The issue's targets, per family and per text setting, with the worst of each."""
    return _targets(_families_met(before, after), fid, TARGETS)
