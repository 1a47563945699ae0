"""Report section for the patch step: before/after table, candidates tried, sink attention."""

from __future__ import annotations

from ..patch.tables import CANDIDATE_HEADER, candidate_rows, verification_rows
from .figures import Figure, new
from .html import esc, table


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
