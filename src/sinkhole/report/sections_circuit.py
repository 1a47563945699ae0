"""Report sections of the sink-circuit analyses (paper Figures 1, 3, 4, 5, attention mass on
position 0, sink layers and neurons, repeats needed). Built only from results.json."""

from __future__ import annotations

from .figures import Figure, new
from .markup import esc, fmt, note, table


def _res(doc: dict, key: str):
    return doc.get("results", {}).get(key)


def circuit_section(doc: dict):
    c = _res(doc, "circuit")
    if not c:
        return None
    lay = c.get("layers", {})
    rows = []
    for r in c.get("neurons", []):
        sel = ", ".join(str(j) for j in r["selected"]) or "none collapses the norm"
        joint = r["cumulative"][len(r["selected"]) - 1]["norm_after"] if r["selected"] else None
        i = r["layer"]
        rows.append([i, fmt(lay["first_token_norm"][i]), fmt(lay["typical_norm"][i]), fmt(lay["mlp_ratio"][i]),
                     fmt(lay["growth"][i]), sel, fmt(r["norm_before"]), fmt(joint)])
    roles = c.get("roles", {})
    role_rows = [[name, esc(c[key]), roles.get(key, {}).get("source", ""), roles.get(key, {}).get("rule", "")]
                 for key, name in (("marking_layers", "marking layers"), ("massive_layer", "massive layer"),
                                   ("drift_layer", "drift layer"))]
    html = (f"<h2>Sink circuit</h2><p>Sink layers (robust rule): <b>{esc(c['sink_layers'] or 'none')}</b>; "
            f"marking layers <b>{esc(c['marking_layers'])}</b>, massive layer <b>{esc(c['massive_layer'])}</b>, "
            f"drift layer <b>{esc(c['drift_layer'])}</b>; the paper's rule (BOS alone, MLP-output norm above "
            f"mean + 2 std of the first {esc(lay.get('paper_max_layer'))} layers) gives "
            f"<b>{esc(c.get('paper_sink_layer'))}</b>. "
            "Sink neurons are the smallest set of the top candidates (by activation × output-column norm at "
            "position 0) whose zeroing at position 0 collapses the first token's norm at that layer.</p>"
            + table(["layer", "first-token norm", "typical norm", "MLP write ratio (pos 0 / typical)",
                     "norm growth through block", "sink neurons", "norm before", "norm after ablation"], rows)
            + "<p>Each role is the layer the rest of sinkhole uses for one purpose:</p>"
            + table(["role", "layer(s)", "source", "rule"], role_rows))
    figs = []
    abl = c.get("ablation") or []
    if abl:
        fig, axes = new(10, 3.6, ncols=2)
        ax1, ax2 = axes[0]
        x = list(range(len(abl[0]["first_norm_before"])))
        ax1.semilogy(x, abl[0]["first_norm_before"], "k-o", ms=3, label="control")
        ax2.plot(x, abl[0]["attn_to_first_before"], "k-o", ms=3, label="control")
        for a in abl:
            lab = f"L{a['layer']} neurons {','.join(map(str, a['neurons']))} zeroed"
            ax1.semilogy(x, a["first_norm_after"], "-s", ms=3, label=lab)
            ax2.plot(x, a["attn_to_first_after"], "-s", ms=3, label=lab)
        ax1.semilogy(x, abl[0]["typical_norm_before"], ":", color="#5f6368", label="typical token (control)")
        ax1.set_xlabel("layer (0-based)")
        ax1.set_ylabel("first-token hidden-state norm (log)")
        ax2.set_xlabel("layer (0-based)")
        ax2.set_ylabel("attention mass on position 0")
        ax1.legend(fontsize=7)
        ax2.legend(fontsize=7)
        figs.append(Figure("fig3_sink_neuron_ablation",
                           "Figure 3: zeroing each sink layer's neurons at position 0 on ordinary text; look for the "
                           "first-token norm falling to the typical level and later layers attending less to "
                           "position 0.", fig))
    firing = c.get("repetition_firing") or []
    if firing:
        rows = []
        for f in firing:
            for j, n in enumerate(f["neurons"]):
                rows.append([f["layer"], n, f"'{f['word']}'", f["n_reps"], fmt(f["first_activation"][j]),
                             fmt(f["max_ratio"][j]), f["fires_at"][j] if f["fires_at"][j] is not None else "never",
                             ", ".join(map(str, f["repeat_top"]))])
        html += ("<h3>Do the sink neurons fire on repetitions?</h3><p>A neuron fires at repetition n when its "
                 "activation on the n-th repeated token reaches half of its first-token activation.</p>"
                 + table(["layer", "neuron", "word", "repetitions", "first-token act", "max act / first",
                          "fires at repetition", "top neurons at the last repetition"], rows))
    html += _controls_html(c.get("controls") or {})
    return html, figs


def _controls_html(ctl: dict) -> str:
    if not ctl.get("ablation"):
        return ""
    names = {"zero": "zero", "mean_typical": "mean over ordinary tokens", "mean_first": "mean at position 0"}
    rows = [[a["layer"], ", ".join(map(str, a["neurons"])), names.get(a["replacement"], a["replacement"]),
             f"{fmt(a['first_norm_before'])} → {fmt(a['first_norm_after'])}",
             f"{fmt(a['later_attn_before'])} → {fmt(a['later_attn_after'])}", f"{fmt(a['ppl_change_pct'])}%"]
            for a in ctl["ablation"]]
    html = ("<h3>Controls: mean-ablation beside zero-ablation</h3><p>The sink neurons' activations at position 0 "
            "replaced three ways on ordinary text. The causal claim survives when the mean over ordinary tokens "
            "does what zero does while the mean at position 0 (the massive value kept, Sun et al.'s harmless "
            "control) changes nothing.</p>"
            + table(["layer", "neurons", "set to", "first-token norm", "later attention on position 0",
                     "perplexity change"], rows))
    sw = ctl.get("super_weights") or []
    if sw:
        rows = [[s["layer"], s["neuron"], ", ".join(f"{t['row']}: {fmt(t['value'])} ({fmt(t['ratio_to_median'])}×)"
                                                    for t in s["top"]),
                 f"{fmt(s['first_norm_before'])} → {fmt(s['first_norm_after'])}", f"{fmt(s['ppl_change_pct'])}%"]
                for s in sw]
        html += ("<h3>The weight behind each sink neuron</h3><p>The largest entries of its output column (residual "
                 "dimension: value, and its size against the column's median), and what zeroing the largest one "
                 "alone does (Yu et al.'s super weight).</p>"
                 + table(["layer", "neuron", "largest entries", "first-token norm, largest zeroed",
                          "perplexity change"], rows))
    return html


def attention_section(doc: dict):
    a = _res(doc, "attention_sinks")
    if not a:
        return None
    figs = []
    fig, axes = new(10, 3.6, ncols=2)
    ax1, ax2 = axes[0]
    x = a["text"]["layers"]
    ax1.plot(x, a["text"]["mass_first"], "k-o", ms=3, label="ordinary text")
    for p in a["repetitions"]:
        ax1.plot(x, p["mass_first"], "-", lw=1.2, label=p["label"])
        ax2.plot(x, p["mass_run"], "-", lw=1.2, label=p["label"])
    ax1.set_xlabel("layer (0-based)")
    ax1.set_ylabel("attention mass on position 0")
    ax2.set_xlabel("layer (0-based)")
    ax2.set_ylabel("attention mass on the repeated run")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    figs.append(Figure("attention_mass_position0",
                       "Attention mass on position 0 (left) and on the repeated tokens (right) per layer; look for "
                       "the mass on position 0 shrinking as the repetition grows, i.e. the run taking over the sink.",
                       fig))
    m = a.get("fig1") or {}
    if m.get("layers"):
        k = len(m["layers"])
        fig, axes = new(2.6 * k, 5.4, ncols=k, nrows=2)
        for row, key, title in ((0, "text", "text"), (1, "repeat", f"'{m['word']}' repeated")):
            for col, layer in enumerate(m["layers"]):
                ax = axes[row][col]
                im = ax.imshow(m[key][col], cmap="coolwarm", vmin=0, vmax=1)
                ax.set_title(f"{title}, layer {layer}", fontsize=8)
                ax.set_xlabel("key position", fontsize=7)
                ax.set_ylabel("query position", fontsize=7)
        fig.colorbar(im, ax=[axes[r][c] for r in range(2) for c in range(k)], shrink=0.6,
                     label="attention probability")
        figs.append(Figure("fig1_attention_maps",
                           "Figure 1: mean attention maps (first tokens) for text and for a repeated token; look for "
                           "repeated positions drawing attention like column 0 does on text.", fig))
    sp = a.get("split") or {}
    if sp.get("layers"):
        keep = [i for i, f in enumerate(sp["first"]) if f is not None]
        xs = [sp["layers"][i] for i in keep]
        parts = [[sp[k][i] for i in keep] for k in ("first", "run", "other")]
        fig, ax = new(6.5, 3.2)
        ax = ax[0][0]
        ax.stackplot(xs, *parts, labels=["position 0", "the run", "everything else"],
                     colors=["#d93025", "#1a73e8", "#bdc1c6"])
        ax.set_xlabel("layer (0-based)")
        ax.set_ylabel("attention of the run's tokens")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="lower right")
        figs.append(Figure("attention_split_run", f"Where a long run's tokens attend ({esc(sp['label'])}), per layer: "
                           "position 0, the run itself, everything else. Look for the layers where the run takes "
                           "the share position 0 holds on text.", fig))
    html = (f"<h2>Attention sinks</h2><p>Sink rate (Gu et al., share of heads whose mean attention on the first "
            f"token exceeds {fmt(a['eps'])}, T = {esc(a['T'])} tokens): ordinary text <b>{fmt(a['sink_rate_text'])}</b>, "
            f"repeated token <b>{fmt(a['sink_rate_repeat'])}</b>.</p>")
    hs = a.get("head_shares") or []
    if hs:
        by = {}
        for r in hs:
            by.setdefault((r["input"], r["bos"]), {})[r["eps"]] = r["share"]
        eps = sorted({r["eps"] for r in hs})
        html += table(["input", "BOS first"] + [f"share of heads > {fmt(e)}" for e in eps],
                      [[k[0], "yes" if k[1] else "no"] + [v.get(e) for e in eps] for k, v in by.items()])
        html += note("Share of (layer, head) pairs whose mean attention on position 0 exceeds the threshold: 0.3 "
                     "is Gu et al.'s epsilon, 0.8 Barbero et al.'s. Without BOS, position 0 is an ordinary word.")
    return html, figs


def detector_section(doc: dict):
    d = _res(doc, "first_token_detector")
    if not d:
        return None
    h = d["histogram"]
    fig, ax = new(7, 3.4)
    ax = ax[0][0]
    edges = h["edges"]
    mids = [(edges[i] + edges[i + 1]) / 2 for i in range(len(edges) - 1)]
    width = edges[1] - edges[0]
    for name, counts in h["counts"].items():
        ax.bar(mids, counts, width=width, alpha=0.5, label=name)
    ax.set_xlabel(f"activation of layer {d['detector_layer']} neuron {d['detector_neuron']}")
    ax.set_ylabel("number of snippets")
    ax.legend(fontsize=8)
    f = Figure("fig4_first_token_detector",
               "Figure 4: the detector neuron's activation at positions 0, 1 and 2 of short text snippets without BOS; "
               "look for position 0 forming its own, non-overlapping group.", fig)
    rows = [[layer, n, fmt(a), fmt(da)] for layer, n, a, da in
            zip(d["layers"], d["best_neuron"], d["best_auc"], d["direction_auc"])]
    html = ("<h2>First-token detector</h2><p>AUC of position 0 vs positions 1-2 (0.5 = no separation; 0 or 1 = "
            f"perfect) on {esc(d['n_snippets'])} snippets without BOS. Perfect split by the detector neuron: "
            f"<b>{esc(d['perfect'])}</b>.</p>"
            + table(["layer", "best neuron", "neuron AUC", "held-out direction AUC"], rows))
    return html, [f]


def convergence_section(doc: dict):
    c = _res(doc, "convergence")
    if not c:
        return None
    fig, ax = new(7, 3.4)
    ax = ax[0][0]
    for cv in c["curves"]:
        ax.loglog(cv["reps"], [max(v, 1e-6) for v in cv["distance"]], "-", label=f"'{cv['word']}'")
    ax.set_xlabel("number of repetitions after the prefix")
    ax.set_ylabel("L2 distance to the token-alone output")
    ax.legend(fontsize=8)
    layer = c["curves"][0]["layer"] if c["curves"] else 0
    f = Figure("fig5_layer0_convergence",
               f"Figure 5: distance between the layer-{layer} output of a repeated token and of the same token alone; "
               "look for the curve falling toward 0 as the run grows (Theorem 4.1).", fig)
    idt = c.get("identity") or {}
    html = (f"<h2>Layer-0 convergence</h2><p>Prefix '{esc(c['curves'][0]['prefix'] if c['curves'] else '')}' "
            "(after BOS) followed by the repeated word. Identity check (no BOS, pure repetition of "
            f"'{esc(idt.get('word'))}', {esc(idt.get('n_tokens'))} tokens): largest relative deviation of any position "
            f"from position 0 over all layers {fmt(max(idt.get('max_relative_deviation') or [0.0]))}; identical: "
            f"<b>{esc(idt.get('identical'))}</b>.</p>")
    return html, [f]


def repeats_section(doc: dict):
    nc = _res(doc, "norm_curves")
    if not nc or not nc.get("repeats_needed"):
        return None
    def _n(v):
        return v if v is not None else "not reached"

    rows = [[r["word"], r["layer"], _n(r["repeats_needed"]), _n(r.get("repeats_needed_sustained")),
             fmt(r["max_norm"]), fmt(r["first_token_norm"])] for r in nc["repeats_needed"]]
    figs = []
    curves = nc.get("all_curves") or []
    layers = sorted({c["layer"] for c in curves})
    if len(layers) > 1:
        import math

        fig, axes = new(3.4 * len(layers), 3.2, ncols=len(layers))
        for k, layer in enumerate(layers):
            ax = axes[0][k]
            cs = [c for c in curves if c["layer"] == layer]
            for c in cs:
                ax.plot(c["reps"], [math.log(max(v, 1e-9)) for v in c["norm"]], lw=1, label=f"'{c['word']}'")
            ax.axhline(math.log(max(cs[0]["first_token_norm"], 1e-9)), color="#d93025", ls="--", label="first token")
            if cs[0].get("typical_norm"):
                ax.axhline(math.log(cs[0]["typical_norm"]), color="#5f6368", ls=":", label="typical")
            ax.set_title(f"layer {layer}", fontsize=9)
            ax.set_xlabel("number of repetitions")
            ax.set_ylabel("ln ‖hidden state‖")
        axes[0][0].legend(fontsize=7)
        figs.append(Figure("fig2_norm_vs_reps_all_sink_layers",
                           "Figure 2 at every candidate sink layer: look for the layers where a repeated word climbs "
                           "to the first-token line and the ones where it never does.", fig))
    return ("<h2>Repetitions needed to induce a sink</h2><p>" + esc(nc.get("repeats_rule", "")) + ".</p>"
            + table(["word", "layer", "repeats needed (first crossing)", "repeats needed (sustained)",
                     "max norm of a repetition", "first-token norm"], rows)), figs
