"""Scan step ``patch`` (runs with ``sinkhole scan --patch``): search, verify, export."""

from __future__ import annotations

from ..scan import Context, step


def _trim_cases(div: dict, keep: int = 12) -> dict:
    d = dict(div)
    d["cases"] = [{k: c[k] for k in ("word", "reps", "template", "diverged_run", "diverged_garak",
                                     "tokens_until_divergence", "output") if k in c} for c in d.get("cases", [])[:keep]]
    return d


@step("patch", "search, verify and export a patch (before/after)", only_with="patch")
def _patch(ctx: Context) -> dict:
    from ..cli.cmd_patch import summary_markdown
    from .export import export_patched
    from .search import SearchConfig, search_patch, verify_patch

    cfg = SearchConfig()
    words = ctx.options.get("patch_words")
    if words:
        cfg.search_words = tuple(words)
    fams = ctx.options.get("patch_families")
    if fams:
        cfg.families = tuple(fams)
    if ctx.quick:
        cfg.quick = True
        cfg.search_words, cfg.search_reps = cfg.search_words[:2], cfg.search_reps[:1]
        cfg.verify_words, cfg.verify_reps = cfg.verify_words[:2], cfg.verify_reps[:1]
        cfg.finetune_steps, cfg.max_new_tokens = 8, 16
    circuit = ctx.results.get("circuit")
    res = search_patch(ctx.lm, cfg, circuit=circuit, log=lambda m: None)
    out: dict = {"search": {k: v for k, v in res.to_dict().items() if k != "patch"}, "chosen": res.chosen,
                 "config": cfg.to_dict()}
    if res.patch is None:
        base = res.baseline_search.get("rate", 0)
        out["summary"] = ("Patch: the model did not diverge on the search cases; nothing to patch." if not base else
                          "Patch: no candidate stayed within the perplexity budget.")
        return out
    v = verify_patch(ctx.lm, res.patch, cfg, sink_reps=120 if ctx.quick else 400, log=lambda m: None)
    out["patch"] = res.patch.to_dict()
    out["verification"] = {**v, "divergence_before": _trim_cases(v["divergence_before"]),
                           "divergence_after": _trim_cases(v["divergence_after"])}
    b, a, t = v["divergence_before"]["rate"], v["divergence_after"]["rate"], v["text"]
    out["summary"] = (f"Patch ({res.chosen}): held-out divergence {b:.0%} -> {a:.0%}, perplexity "
                      f"{t['ppl_change_pct']:+.2f}%, top-1 agreement {t['top1_agreement']:.1%}, KL "
                      f"{t['mean_kl_nats']:.4f} nats/token; targets {'met' if v['targets']['all'] else 'not all met'}.")
    if ctx.out is not None:
        export_patched(ctx.lm, res.patch, ctx.out / "patched-model",
                       summary={"patch": res.patch.to_dict(), "verification": v},
                       summary_md=summary_markdown(v, res.tried, res.chosen))
        out["exported_to"] = "patched-model"
    return out
