"""Markdown tables from benchmarks/results/*.json (used by run_all.py and docs/benchmarks.md).

The learned-probe table (4b) comes from studies/results/probe_study.json. ``--smoke`` (or ``--out``) also
writes the markdown into a JSON file, which is how CI checks that the saved results still parse.

Usage::

    python benchmarks/summarize.py [results_dir]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS_DIR, STUDY_RESULTS_DIR, parser, report, save, smoke_out  # noqa: E402

SMOKE = True


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
        share = v["gflop_per_s"] / peak if peak and "bf16" not in c else None  # the peak is a float32 rate
        out.append(f"| {c} | {_f(v['median_s'])} | {_f(v.get('time_ratio_vs_sinkhole', 1.0))}x | {_f(v['peak_rss_mib'])} | "
                   f"{_f(v.get('rss_ratio_vs_sinkhole', 1.0))}x | {_f(v['gflops_executed'], 0)} | {_f(v['gflop_per_s'], 1)} | "
                   f"{_f(100 * share, 0) + '%' if share else 'n/a'} | {diff} |")
    out.append(f"\nWhat `output_attentions` + `output_hidden_states` return at this length (float32): "
               f"{_f(core['hf_output_floor_gib'])} GiB.\n")
    return out


def _predictor_section(d: Path, peak) -> list[str]:
    """Section 4: the sink probe, the exact check and the cascade against generation, on one case set."""
    pr, ex = _load(d, "predictor_48_large"), _load(d, "predictor_exact_check")
    out = []
    if pr:
        ho = pr["held_out"]
        out.append(f"\n### 4. Divergence: predictor vs generation ({len(pr['cases'])} cases: words x reps "
                   f"{pr['reps']}, template {pr['templates']}, {pr['max_new_tokens']} generated tokens)\n")
        out.append(f"Sink probe fitted on the training words ({pr['predictor']['feature']} > "
                   f"{pr['predictor']['threshold']:.3g}); held-out {ho['n']} cases: accuracy {_f(ho['accuracy'], 3)}, "
                   f"AUC {_f(ho['auc'], 3)}, {ho['positives']} diverged. Saved run (`study_predictor.py`, batch 1, mean per "
                   f"case): generation {_f(pr['mean_time_generate_s'], 3)} s, probe {_f(pr['mean_time_predict_s'], 3)} s "
                   f"({_f(pr['speedup'], 1)}x).\n")
    if ex:
        ts = ex["timing_subset"]
        lim = ts.get("limit", {})
        out.append(f"Side by side in one process (`bench_greedy_check.py`, {ts['n_cases']} cases x {ts['rounds']} rounds; "
                   f"machine: {_machine_line(ex['machine'])}):\n")
        out.append("| method | mean s per case | median s | speedup vs generation (means) | agreement with generation "
                   "| GFLOP/s | share of peak |")
        out.append("|---|---|---|---|---|---|---|")

        def share(k):
            v = lim.get(k, {}).get("share_of_peak")
            return f"{100 * v:.0f}%" if v else "n/a"

        def rate(k):
            return _f(lim.get(k, {}).get("gflop_per_s"), 1)

        cas = ex["cascade"]
        out.append(f"| generation + run judge | {_f(ts['mean_generate_s'], 3)} | {_f(ts.get('median_generate_s'), 3)} | 1.00x "
                   f"| reference | {rate('generate')} | {share('generate')} |")
        out.append(f"| sink probe | {_f(ts['mean_probe_s'], 3)} | {_f(ts.get('median_probe_s'), 3)} | "
                   f"{_f(ts['speedup_probe'], 1)}x | {_f(100 * pr['held_out']['accuracy'], 1) if pr else 'n/a'}% held-out "
                   f"| {rate('probe')} | {share('probe')} |")
        out.append(f"| exact check (`greedy_check`) | {_f(ts['mean_check_s'], 3)} | {_f(ts.get('median_check_s'), 3)} | "
                   f"{_f(ts['speedup_check'], 1)}x | {_f(100 * ex['agreement'], 1)}% of {ex['n_cases']} (same tokens in "
                   f"{_f(100 * ex['same_tokens_as_generation'], 1)}%) | {rate('check')} | {share('check')} |")
        if "mean_cascade_s" in ts:
            out.append(f"| cascade (probe, then exact check on its negatives), timed | {_f(ts['mean_cascade_s'], 3)} | "
                       f"{_f(ts.get('median_cascade_s'), 3)} | {_f(ts['speedup_cascade_timed'], 1)}x | "
                       f"{_f(100 * ts['cascade_agreement_in_timing_runs'], 1)}% of the timed cases | | |")
        out.append(f"| cascade over all {ex['n_cases']} cases (computed from per-case times) | {_f(cas['mean_s_per_case'], 3)} "
                   f"| | {_f(cas['speedup'], 1)}x | {_f(100 * cas['agreement'], 1)}% ({cas['probe_false_positives']} "
                   f"false positives of the probe) | | |\n")
        if lim.get("note"):
            out.append(f"Share of peak against {_f(ts.get('peak_gflop_per_s'), 1)} GFLOP/s; {lim['note']}.\n")
    st = _load(d, "probe_study") or _load(STUDY_RESULTS_DIR, "probe_study")
    if st:
        best = max(st["probes"], key=lambda r: r["cv_accuracy"])
        out.append("\n### 4b. Learned probes on early residuals (`studies/experimental/study_predictor_probes.py`)\n")
        out.append(f"{st['n_cases']} new cases ({st['n_words']} words x 30/100/200/400 repetitions) labelled by the exact "
                   f"check ({st['labels_verified_with_generation']['same_label']}/{st['labels_verified_with_generation']['n']} "
                   f"labels checked against generation agree); divergence rate {_f(100 * st['divergence_rate'], 1)}% "
                   f"(by repetitions: {st['divergence_rate_by_reps']}), so always answering the majority class scores "
                   f"{_f(100 * st['majority_class_accuracy'], 1)}%. Best probe: layer {best['layer']}, look-ahead "
                   f"{best['lookahead']}, grouped cross-validated accuracy {_f(100 * best['cv_accuracy'], 1)}% (balanced "
                   f"{_f(100 * best['cv_balanced_accuracy'], 1)}%).\n")
        out.append("| look-ahead | layer | CV accuracy | CV balanced accuracy | bench held-out accuracy (40 cases) |")
        out.append("|---|---|---|---|---|")
        for r in st["probes"]:
            out.append(f"| {r['lookahead']} | {r['layer']} | {_f(100 * r['cv_accuracy'], 1)}% | "
                       f"{_f(100 * r['cv_balanced_accuracy'], 1)}% | {_f(100 * r['bench_held_out_accuracy'], 1)}% |")
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
                   f"shapes, not run), against {_f(m['machine'].get('ram_gib'))} GiB of RAM on this machine.\n")
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
                   f"Environment {c.get('env')}. Machine: {_machine_line(c['machine'])}.\n")
    for lp in sorted(d.glob("load*.json")):
        load = json.loads(lp.read_text())
        out.append(f"\n### 3. Model load (`{load['command']}`)\n")
        out.append(f"Machine: {_machine_line(load['machine'])}. Threads: {load.get('threads')}.\n")
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
                   f"({proj['total_flops'] / 1e15:.2f} PFLOP); assumptions: {proj['assumptions']}. "
                   f"Machine: {_machine_line(sw['machine'])}.\n")
    out.extend(_predictor_section(d, peak))
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    p = parser(__doc__, model=None, smoke=True)
    p.add_argument("results", nargs="?", default=str(RESULTS_DIR), help="the folder of result JSON files")
    args = p.parse_args(argv)
    if args.smoke:  # the tables of the saved results, into a temporary JSON file
        smoke_out(args, "summary")
    md = summarize(args.results)
    if args.out or args.save:
        report(save(args, {"results": str(args.results), "markdown": md}), {"lines": md.count("\n")})
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
