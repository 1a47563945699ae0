"""Scan step ``patch`` (runs with ``sinkhole scan --patch``): search, verify, export."""

from __future__ import annotations

from ..patch.export import export_patched
from ..patch.search import SearchConfig, search_patch, verify_patch
from ..patch.tables import PatchResult, summary_markdown
from .engine import Context


def _trim_cases(div: dict, keep: int = 12) -> dict:
    d = dict(div)
    d["cases"] = [{k: c[k] for k in ("word", "reps", "template", "diverged", "garak_diverged",
                                     "tokens_until_divergence", "text")} for c in d.get("cases", [])[:keep]]
    return d


def patch_step(ctx: Context) -> PatchResult:
    o = ctx.options
    cfg = SearchConfig()
    if o.patch_words:
        cfg.search_words = tuple(o.patch_words)
    if o.patch_families:
        cfg.families = tuple(o.patch_families)
    if ctx.quick:
        cfg = cfg.as_quick()
    res = search_patch(ctx.lm, cfg, circuit=ctx.circuit, log=lambda m: None)
    out = PatchResult(search={k: v for k, v in res.to_dict().items() if k != "patch"}, chosen=res.chosen,
                      config=cfg.to_dict(), summary="")
    if res.patch is None:
        out.summary = ("Patch: the model did not diverge on the search cases; nothing to patch."
                       if not res.baseline_search.get("either_rate") else
                       "Patch: no candidate stayed within the perplexity budget.")
        return out
    v = verify_patch(ctx.lm, res.patch, cfg, sink_reps=120 if ctx.quick else 400, log=lambda m: None,
                     circuit=ctx.circuit, quiet=True)
    if v.get("broad"):  # results.json is byte-identical across runs: wall times live in timings.json
        v["broad"] = {k: x for k, x in v["broad"].items() if k not in ("seconds", "timing")}
    out.patch = res.patch.to_dict()
    out.verification = {**v, "divergence_before": _trim_cases(v["divergence_before"]),
                        "divergence_after": _trim_cases(v["divergence_after"])}
    b, a, t = v["divergence_before"]["either_rate"], v["divergence_after"]["either_rate"], v["text"]
    out.summary = (f"Patch ({res.chosen}): held-out divergence (either judge) {b:.0%} -> {a:.0%}, perplexity "
                   f"{t['ppl_change_pct']:+.2f}%, top-1 agreement {t['top1_agreement']:.1%}, KL "
                   f"{t['mean_kl_nats']:.4f} nats/token; targets {'met' if v['targets']['all'] else 'not all met'}"
                   + (" (broad verification: every attack family and text setting)." if v.get("broad") else "."))
    if ctx.out is not None:
        export_patched(ctx.lm, res.patch, ctx.out / "patched-model",
                       summary={"patch": res.patch.to_dict(), "verification": v},
                       summary_md=summary_markdown(v, res.tried, res.chosen))
        out.exported_to = "patched-model"
    return out
