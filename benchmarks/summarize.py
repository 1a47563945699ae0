"""Markdown tables from benchmarks/results/*.json (used by run_all.py and docs/benchmarks.md).

Usage::

    python benchmarks/summarize.py [results_dir]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(d: Path, name: str):
    p = d / f"{name}.json"
    return json.loads(p.read_text()) if p.exists() else None


def _f(x, nd=2):
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{nd}f}"
    return str(x)


def _machine_line(m: dict) -> str:
    return (f"{m.get('cpu_model')}, {m.get('cores')} cores, {m.get('ram_gib')} GiB; Python {m.get('python')}, "
            f"torch {m.get('torch')}, transformers {m.get('transformers')}, sinkhole {m.get('sinkhole')} "
            f"(git {m.get('git_commit')}); load average at start {m.get('load_avg_at_start')}")


def peak_gflops(d: Path):
    vals = []
    for name in ("peak_before", "peak_after"):
        r = _load(d, name)
        if r and "peak_gflop_per_s" in r.get("result", {}):
            vals.append(r["result"]["peak_gflop_per_s"])
    return (max(vals) if vals else None), vals


def _core_table(core: dict, title: str, peak) -> list[str]:
    out = [f"\n### {title}, {core['tokens']} tokens (`{core['command']}`)\n"]
    out.append(f"Machine: {_machine_line(core['machine'])}. Threads per child: {core.get('threads')}. "
               f"{core['rounds']} child processes per contender x {core['repeats_per_child']} timed passes; "
               "median over all passes; ratios are relative to "
               f"`{core.get('baseline', 'sinkhole')}`, measured side by side in this one run.\n")
    out.append("| contender | median s | time vs base | peak RSS MiB | RSS vs base | GFLOP executed | GFLOP/s | "
               f"share of peak | max diff vs {core.get('agreement_reference') or 'hf'} (norm rel / mass abs) |")
    out.append("|---|---|---|---|---|---|---|---|---|")
    agree = core.get("agreement_vs_hf", {})
    for c, v in core["summary"].items():
        if "error" in v:
            out.append(f"| {c} | failed: {v['error'][:80]} | | | | | | | |")
            continue
        a = agree.get(c)
        if a:
            diff = f"{a['norm_max_rel_diff']:.1e}" + (f" / {a['mass_max_abs_diff']:.1e}" if "mass_max_abs_diff" in a else "")
        else:
            diff = "reference" if c == (core.get("agreement_reference") or "hf") else "n/a"
        share = v["gflop_per_s"] / peak if peak else None
        out.append(f"| {c} | {_f(v['median_s'])} | {_f(v.get('time_ratio_vs_sinkhole', 1.0))}x | {_f(v['peak_rss_mib'])} | "
                   f"{_f(v.get('rss_ratio_vs_sinkhole', 1.0))}x | {_f(v['gflops_executed'], 0)} | {_f(v['gflop_per_s'], 1)} | "
                   f"{_f(100 * share, 0) + '%' if share else 'n/a'} | {diff} |")
    out.append(f"\nWhat `output_attentions` + `output_hidden_states` return at this length (float32): "
               f"{_f(core['hf_output_floor_gib'])} GiB.\n")
    return out


def summarize(d) -> str:
    d = Path(d)
    out = []
    peak, peaks = peak_gflops(d)
    out.append("### Machine peak (float32 matmul)\n")
    if peak:
        out.append(f"Median GFLOP/s of the best matrix size, before and after the other runs: "
                   f"{', '.join(_f(p, 1) for p in peaks)}; the share-of-peak columns use the higher, {_f(peak, 1)} GFLOP/s.\n")
    for pattern, title in (("core_*.json", "1. Norm curve + attention mass on position 0 at every layer"),
                           ("curve_*.json", "1a. The norm curve alone (Figure 2)"),
                           ("bf16_*.json", "1c. The sinkhole path in bfloat16 against float32")):
        for p in sorted(d.glob(pattern)):
            out.extend(_core_table(json.loads(p.read_text()), title, peak))
    for p in sorted(d.glob("memory_*.json")):
        m = json.loads(p.read_text())
        s = m["summary"].get("sinkhole", {})
        if "peak_rss_mib" not in s:
            continue
        share = s["gflop_per_s"] / peak if peak else None
        out.append(f"\n### 1b. Memory at {m['tokens']} tokens (`{m['command']}`)\n")
        out.append(f"sinkhole: peak RSS {_f(s['peak_rss_mib'])} MiB ({_f(s['peak_rss_mib'] / 1024)} GiB; target < 2 GiB: "
                   f"{'met' if s['peak_rss_mib'] < 2048 else 'missed'}), of which {_f(s['rss_after_load_mib'])} MiB after "
                   f"loading; {_f(s['median_s'])} s per pass, {_f(s['gflop_per_s'], 1)} GFLOP/s"
                   f"{f' ({100 * share:.0f}% of peak)' if share else ''}. Plain transformers would have to return "
                   f"{_f(m['hf_output_floor_gib'])} GiB of attention weights and hidden states alone (computed from the "
                   f"shapes, not run" + (": it does not fit beside the other jobs on this 24 GiB machine" if m['hf_output_floor_gib'] > 8 else "") + ").\n")
    old = _load(d, "mem4000_eager")
    if old and "sinkhole" in old.get("summary", {}):
        s = old["summary"]["sinkhole"]
        out.append(f"Before `attn_first` (full eager patterns reduced in the hook) the same run peaked at "
                   f"{_f(s['peak_rss_mib'])} MiB.\n")
    c = _load(d, "circuit")
    if c and "discover_median_s" in c:
        out.append(f"\n### 2. Circuit discovery after load (`{c['command']}`, bench_circuit.py)\n")
        out.append(f"`discover()` median {_f(c['discover_median_s'])} s over {len(c['discover_s'])} runs "
                   f"({', '.join(_f(x) for x in c['discover_s'])}); load {_f(c['load_s'])} s; found: {c['result']}. "
                   f"Environment {c.get('env')}; load average at start {c['machine'].get('load_avg_at_start')}.\n")
    for lp in sorted(d.glob("load*.json")):
        load = json.loads(lp.read_text())
        out.append(f"\n### 3. Model load (`{load['command']}`)\n")
        out.append(f"Threads: {load.get('threads')}; load average at start {load['machine'].get('load_avg_at_start')}.\n")
        out.append("| model | first load s (empty cache) | cached load s (wall) | cached load CPU s | cached: whole process s | peak RSS MiB (cached) | target (wall) |")
        out.append("|---|---|---|---|---|---|---|")
        for model, r in load["results"].items():
            tgt = f"< {r['target_cached_s']} s: {'met' if r['target_met'] else 'missed'}" if "target_cached_s" in r else ""
            out.append(f"| {model} | {_f(r['first']['median_load_s'])} | {_f(r['cached']['median_load_s'])} | "
                       f"{_f(r['cached'].get('median_load_cpu_s'))} | {_f(r['cached']['median_process_s'])} | {_f(r['cached']['peak_rss_mib'])} | {tgt} |")
    sw = _load(d, "sweep")
    if sw:
        r = sw["result"]
        proj = r["llama7b_projection"]
        share = r["gflop_per_s"] / peak if peak else None
        out.append(f"\n### 5. Vocabulary sweep (`{sw['command']}`)\n")
        out.append(f"`sweep_tokens` (no generation; sink layer {r['layer']}, pass stopped after {r.get('blocks_run')} "
                   f"blocks, {r['n_reps']} repetitions, {r.get('seq_len')} tokens per run, batch {r['batch']}), "
                   f"{r['sample']} randomly sampled vocabulary tokens: **{_f(r['tokens_per_s'], 1)} candidate tokens/s** "
                   f"({_f(r['gflop_per_s'], 1)} GFLOP/s{f', {100 * share:.0f}% of peak' if share else ''}). Whole SmolLM2 "
                   f"vocabulary ({r['smollm2_vocab']:,} tokens) at that rate: {_f(r['smollm2_whole_vocab_s'] / 60, 1)} min. "
                   f"Projection for a 7B Llama on one GPU: {_f(proj['projected_seconds'], 1)} s "
                   f"({proj['total_flops'] / 1e15:.2f} PFLOP); assumptions: {proj['assumptions']}.\n")
    for name in ("predictor",) if c and "discover_median_s" in c else ("circuit", "predictor"):
        r = _load(d, name)
        if r:
            out.append(f"\n### {name} (from bench_{name}.py)\n")
            out.append("```\n" + json.dumps(r.get("summary", r), indent=1)[:3000] + "\n```\n")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(summarize(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"))
