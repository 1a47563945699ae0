"""The rows of the patch tables, built once for both formats (SUMMARY.md and the HTML report)."""

from __future__ import annotations

from dataclasses import dataclass

from ..results import StepResult


def _pct(x, nd: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{nd}f}%"


def verification_rows(v: dict) -> list[list[str]]:
    """[measure, unpatched, patched] rows of a verification result (held-out cases and text)."""
    b, a, t, s = v["divergence_before"], v["divergence_after"], v["text"], v["sink_attention"]
    return [
        ["divergence rate, run judge (held-out cases)", _pct(b["rate"]), _pct(a["rate"])],
        ["divergence rate, garak judge (held-out cases)", _pct(b["garak_rate"]), _pct(a["garak_rate"])],
        ["divergence rate, either judge (the target)", _pct(b["either_rate"]), _pct(a["either_rate"])],
        ["mean tokens until divergence", f"{b['mean_tokens_until_divergence']:.1f}",
         f"{a['mean_tokens_until_divergence']:.1f}"],
        [f"perplexity on {v['heldout_text']}", f"{t['ppl_before']:.3f}",
         f"{t['ppl_after']:.3f} ({t['ppl_change_pct']:+.2f}%)"],
        ["top-1 agreement with unpatched", "100%", _pct(t["top1_agreement"], 2)],
        ["mean KL to unpatched (nats/token)", "0", f"{t['mean_kl_nats']:.5f}"],
        [f"attention on position 0, {s['word']} x{s['reps']} (layers >= {s['mean_over_layers_from']})",
         f"{s['mean_before']:.3f}", f"{s['mean_after']:.3f} (ordinary text: {s['mean_text_reference']:.3f})"],
    ]


def _frac(d: dict | None) -> str:
    return "–" if not d else f"{d['diverged']}/{d['n']}"


def broad_attack_table(b: dict) -> tuple[list[str], list[list[str]]]:
    """Per attack family: the short-run rate, unpatched, the patch and every baseline (diverged/cases)."""
    methods = b["methods"]
    header = ["attack family", "repetitions", "short run (16)", "unpatched"] + methods
    rows = []
    for fam, desc in b["families"].items():
        reps = sorted({r["reps"] for r in b["records"]["unpatched"] if r["family"] == fam})
        rows.append([f"{fam}: {desc}", ", ".join(str(r) for r in reps), _frac(b["rates"]["short_run"].get(fam)),
                     _frac(b["rates"]["unpatched"].get(fam))] + [_frac(b["rates"][m].get(fam)) for m in methods])
    tot = lambda m: {"diverged": sum(v["diverged"] for v in b["rates"][m].values()),  # noqa: E731
                     "n": sum(v["n"] for v in b["rates"][m].values())}
    rows.append(["all families", "", _frac(tot("short_run")), _frac(tot("unpatched"))] + [_frac(tot(m)) for m in methods])
    return header, rows


def broad_text_table(b: dict) -> tuple[list[str], list[list[str]]]:
    """Per text setting (source, BOS, window): top-1 / KL / perplexity change of every method."""
    methods = b["methods"]
    header = ["text setting"] + [f"{m}: top-1 / KL / ppl" for m in methods]
    rows = []
    for i, r in enumerate(b["fidelity"][methods[0]]):
        name = (f"{r['source']}, {'BOS' if r['bos'] else 'no BOS'}, {r['window']}-token windows "
                f"({r['n_tokens']} tokens{', ' + str(r['gated_tokens']) + ' in long runs' if r['gated_tokens'] else ''})")
        cells = []
        for m in methods:
            x = b["fidelity"][m][i]
            cells.append(f"{100 * x['top1_agreement']:.2f}% / {x['mean_kl_nats']:.4f} / {x['ppl_change_pct']:+.2f}%")
        rows.append([name] + cells)
    return header, rows


def broad_markdown(b: dict) -> list[str]:
    h, r = broad_attack_table(b)
    lines = ["", f"Broad held-out verification ({b['settings']['max_new_tokens']} generated tokens; a case counts when "
             "either judge calls it diverged; 'short run' is the unpatched model on the same prompts with 16 "
             "repetitions, the model's own answer without a long run):", ""] + markdown_table(h, r)
    h, r = broad_text_table(b)
    lines += ["", "Held-out text, every setting (agreement with the unpatched model):", ""] + markdown_table(h, r)
    for m in b["methods"]:
        t = b["targets"][m]
        fails = t["families_failed"]
        lines.append(f"\n{m}: divergence target in every family {'met' if not fails else 'missed in ' + ', '.join(fails)}; "
                     f"worst top-1 {100 * t['worst_top1']['top1_agreement']:.2f}% ({_where(t['worst_top1'])}), "
                     f"worst KL {t['worst_kl']['mean_kl_nats']:.4f} ({_where(t['worst_kl'])}), worst perplexity change "
                     f"{t['worst_ppl']['ppl_change_pct']:+.2f}% ({_where(t['worst_ppl'])})")
    return lines


def _where(r: dict) -> str:
    return f"{r['source']}, {'BOS' if r['bos'] else 'no BOS'}, {r['window']}"


CANDIDATE_HEADER = ["candidate", "size (numbers)", "search divergence run / garak", "train-text ppl change",
                    "top-1", "KL (nats/token)"]


def candidate_rows(tried: list, chosen: str | None = None) -> list[list[str]]:
    """One row per candidate the search tried (errors and skipped candidates included)."""
    rows = []
    for r in tried:
        if "error" in r or "skipped" in r:
            rows.append([r["family"], "–", r.get("skipped") or "error: " + r["error"], "", "", ""])
            continue
        d, tt = r["search_divergence"], r["train_text"]
        name = f"{r['family']}: {r['description']}" if r.get("description") else r["family"]
        rows.append([name + (" (chosen)" if chosen and r["family"] == chosen else ""), f"{r['size']:,}",
                     f"{_pct(d['rate'], 0)} / {_pct(d['garak_rate'], 0)}", f"{tt['ppl_change_pct']:+.2f}%",
                     _pct(tt["top1_agreement"], 2), f"{tt['mean_kl_nats']:.4f}"])
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]


def summary_markdown(verification: dict, tried: list | None = None, chosen: str | None = None) -> str:
    """SUMMARY.md of an exported patch (and ``sinkhole patch``/``eval``'s text output): the
    before/after table, the targets and the candidates the search tried."""
    lines = ["Narrow held-out set (the search's held-out words and counts):", ""] + markdown_table(
        ["measure (held-out)", "unpatched", "patched"], verification_rows(verification))
    tg = verification.get("targets", {})
    lines.append("")
    if verification.get("narrow_targets"):
        lines.append("Targets on the narrow set: " + ", ".join(
            f"{k} {'yes' if ok else 'NO'}" for k, ok in verification["narrow_targets"].items()))
        lines.append("")
    lines.append(("Targets on the broad set (the patch's targets): " if verification.get("broad") else "Targets: ")
                 + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in tg.items()))
    if verification.get("broad"):
        lines += broad_markdown(verification["broad"])
    if tried:
        lines += [""] + markdown_table(CANDIDATE_HEADER, candidate_rows(tried, chosen))
    return "\n".join(lines)


@dataclass
class PatchResult(StepResult):
    search: dict  # SearchResult.to_dict() without the patch
    chosen: str | None
    config: dict  # SearchConfig.to_dict()
    summary: str
    patch: dict | None = None
    verification: dict | None = None
    exported_to: str | None = None
