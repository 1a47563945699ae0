"""The rows of the patch tables, built once for both formats (SUMMARY.md and the HTML report)."""

from __future__ import annotations


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
    lines = markdown_table(["measure (held-out)", "unpatched", "patched"], verification_rows(verification))
    tg = verification.get("targets", {})
    lines.append("")
    lines.append("Targets: " + ", ".join(f"{k} {'yes' if ok else 'NO'}" for k, ok in tg.items()))
    if tried:
        lines += [""] + markdown_table(CANDIDATE_HEADER, candidate_rows(tried, chosen))
    return "\n".join(lines)
