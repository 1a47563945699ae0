"""Report section for the patch step: before/after table, candidates tried, sink attention."""

from __future__ import annotations

from ..patch.tables import CANDIDATE_HEADER, broad_attack_table, broad_text_table, candidate_rows, verification_rows
from .figures import Figure, new
from .markup import esc, table


def _pct(x):
    return None if x is None else f"{100 * x:.1f}%"


def patch_section(doc: dict):
    p = doc.get("results", {}).get("patch")
    if not p:
        return None
    parts = ["<h2>Patch: before / after</h2>", f"<p>{esc(p.get('summary', ''))}</p>"]
    v = p.get("verification")
    figs = []
    if v:
        s = v["sink_attention"]
        parts.append(table(["measure", "unpatched", "patched"], verification_rows(v)))
        parts.append("<p>Held-out words: " + esc(", ".join(v["words"])) + "; repetitions: "
                     + esc(", ".join(str(r) for r in v["reps"])) + ". Targets: "
                     + esc(", ".join(f"{k}: {'yes' if ok else 'no'}" for k, ok in v.get("targets", {}).items()))
                     + "</p>")
        fig, ax = new(7, 3.2)
        ax = ax[0][0]
        xs = list(range(len(s["before"])))
        ax.plot(xs, s["before"], marker="o", ms=3, label="unpatched, repeated word")
        ax.plot(xs, s["after"], marker="s", ms=3, label="patched, repeated word")
        ax.plot(xs, s["text_reference"], ls="--", color="gray", label="unpatched, ordinary text")
        ax.set_xlabel("layer")
        ax.set_ylabel("attention mass on position 0 (fraction)")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
        figs.append(Figure("patch_sink_attention",
                           f"Attention on the first token from the last {s['last_queries']} positions of "
                           f"'{s['word']}' x{s['reps']}: a patch that restores the sink lifts the solid patched curve "
                           "toward the dashed ordinary-text curve.", fig))
    if v and v.get("broad"):
        parts_b, fig_b = _broad(v["broad"])
        parts += parts_b
        figs += fig_b
    tried = p.get("search", {}).get("tried", [])
    if tried:
        rows = candidate_rows(tried, p.get("chosen"))
        base = p["search"].get("baseline_search", {})
        parts.append(f"<p>Candidates on the search cases (unpatched: {_pct(base.get('rate'))} run judge / "
                     f"{_pct(base.get('garak_rate'))} garak judge):</p>")
        parts.append(table(CANDIDATE_HEADER, rows))
    if p.get("exported_to"):
        parts.append(f"<p>Patched model exported to <code>{esc(p['exported_to'])}/</code>; reload with "
                     f"<code>sinkhole.load_patched()</code>.</p>")
    return "".join(parts), figs


def _broad(b: dict):
    """The broad verification: per-family and per-text-setting tables, and the front of every
    method (all-family divergence against its worst top-1 agreement)."""
    parts = ["<h3>Broad held-out verification</h3>",
             "<p>Every attack family (held-out words, repetitions 100 to 2,000, "
             f"{b['settings']['max_new_tokens']} generated tokens) and every text setting, the patch beside the "
             "unpatched model and the baselines. 'short run' is the unpatched model on the same prompts with 16 "
             "repetitions: the model's own answer when there is no long run.</p>"]
    h, r = broad_attack_table(b)
    parts.append(table(h, r))
    h, r = broad_text_table(b)
    parts.append(table(h, r))
    fig, ax = new(6, 3.4)
    ax = ax[0][0]
    for m in ["unpatched"] + list(b["methods"]):
        rates = b["rates"][m]
        div = sum(v["diverged"] for v in rates.values()) / max(1, sum(v["n"] for v in rates.values()))
        top1 = 1.0 if m == "unpatched" else min(x["top1_agreement"] for x in b["fidelity"][m])
        ax.scatter([100 * top1], [100 * div], s=40)
        ax.annotate(m, (100 * top1, 100 * div), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.axvline(98, ls="--", color="gray", lw=0.8)
    ax.set_xlabel("worst top-1 agreement over text settings (%)")
    ax.set_ylabel("divergence, all attack families (%)")
    return parts, [Figure("patch_front", "Each method's divergence over every attack family against its worst top-1 "
                          "agreement on held-out text (with and without BOS, every window): lower right is better; "
                          "the dashed line is the 98 % target.", fig)]
