"""Built-in report sections, in page order. Later features register more with @section."""

from __future__ import annotations

import math

from .figures import Figure, new
from .html import esc, fmt, section, table


@section("verdict")
def verdict(doc: dict):
    """The top-line answer. Uses divergence results when present, else says what is known."""
    res = doc.get("results", {})
    div = res.get("divergence")
    lines = []
    if div and div.get("rate") is not None:
        rate = div["rate"]
        cls = "bad" if rate > 0 else "good"
        where = div.get("min_reps_diverged")
        lines.append(
            f"<b>{'Vulnerable' if rate > 0 else 'Not vulnerable in the tested cases'}</b>: "
            f"{fmt(100 * rate, 3)}% of {len(div.get('cases', []))} repetition prompts diverged"
            + (f"; the earliest at {esc(where)} repetitions" if where else "")
            + "."
        )
    else:
        cls = "unknown"
        lines.append("<b>Divergence not measured in this scan.</b>")
    ln = res.get("layer_norms")
    if ln:
        i = max(range(len(ln["ratio"])), key=lambda k: ln["ratio"][k] or 0)
        lines.append(
            f"The first token's hidden-state norm peaks at {fmt(ln['ratio'][i])}× the typical norm "
            f"(layer {i}: {fmt(ln['first_token_norm'][i])} vs {fmt(ln['typical_norm'][i])})."
        )
    patch = res.get("patch")
    if patch and patch.get("summary"):
        lines.append(esc(patch["summary"]))
    return f'<div class="verdict {cls}">' + "<br>".join(lines) + "</div>", []


@section("model")
def model_section(doc: dict):
    m = doc.get("model")
    if not m:
        return None
    keys = ["name", "family", "model_class", "n_layers", "d_model", "d_mlp", "n_heads", "vocab_size", "n_ctx",
            "bos_id", "dtype", "n_params", "quantization", "hf_name"]
    rows = [[k, m[k]] for k in keys if k in m]
    return "<h2>Model</h2>" + table(["field", "value"], rows), []


@section("layer_norms")
def layer_norms_section(doc: dict):
    ln = doc.get("results", {}).get("layer_norms")
    if not ln:
        return None
    fig, ax = new(7, 3.4)
    ax = ax[0][0]
    ax.semilogy(ln["layers"], ln["first_token_norm"], "o-", label="first token (position 0)", color="#d93025")
    ax.semilogy(ln["layers"], ln["typical_norm"], "s-", label="mean of later tokens", color="#1a73e8")
    ax.set_xlabel("layer (0-based, output of block)")
    ax.set_ylabel("hidden-state L2 norm (log scale)")
    ax.legend()
    f = Figure("layer_norms", "Hidden-state norm per layer on ordinary text: look for the layer where the "
               "first token's norm jumps far above the typical norm (the sink layer).", fig)
    return (f"<h2>First-token norm by layer</h2><p>{ln['n_texts']} snippets of public-domain text, "
            f"{ln['n_tokens']} tokens.</p>"), [f]


@section("norm_curves")
def norm_curves_section(doc: dict):
    nc = doc.get("results", {}).get("norm_curves")
    if not nc or not nc.get("curves"):
        return None
    fig, ax = new(7, 3.6)
    ax = ax[0][0]
    c0 = nc["curves"][0]
    for c in nc["curves"]:
        ax.plot(c["reps"], [math.log(max(v, 1e-9)) for v in c["norm"]], lw=1, label=f"'{c['word']}' repeated")
    ax.axhline(math.log(c0["first_token_norm"]), color="#d93025", ls="--", label="first-token norm")
    if c0.get("typical_norm"):
        ax.axhline(math.log(c0["typical_norm"]), color="#5f6368", ls=":", label="typical norm")
    ax.set_xlabel("number of repetitions")
    ax.set_ylabel(f"ln ‖hidden state‖ at layer {nc['layer']}")
    ax.legend(fontsize=8)
    f = Figure("fig2_norm_vs_reps", "Figure 2: norm of the repeated token at the sink layer; a curve that climbs "
               "to the first-token line means the repetition is treated as a first token.", fig)
    return f"<h2>Norm vs repetitions (layer {esc(nc['layer'])})</h2>", [f]
