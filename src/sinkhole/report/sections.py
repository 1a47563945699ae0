"""Built-in report sections, in page order. Later features register more with @section."""

from __future__ import annotations

from .figures import Figure, new
from .html import esc, fmt, section, table


def _headlines(doc: dict) -> list[tuple[str, str, str | None]]:
    """(step, sentence, status) for every step result that carries a ``headline`` (plain text) and
    optionally a ``status`` ("bad" = vulnerable / failed, "good" = safe / fixed, else neutral)."""
    res = doc.get("results", {}) or {}
    order = list(doc.get("steps") or []) + [k for k in res if k not in (doc.get("steps") or [])]
    out = []
    for name in order:
        r = res.get(name)
        if isinstance(r, dict) and isinstance(r.get("headline"), str) and r["headline"].strip():
            out.append((name, r["headline"].strip(), r.get("status")))
    return out


@section("verdict")
def verdict(doc: dict):
    """The top-line answer, from the steps' ``headline``/``status`` fields; falls back to the
    divergence rate, the norm ratio and the patch summary when no step gives a headline."""
    res = doc.get("results", {}) or {}
    heads = _headlines(doc)
    statuses = [st for _, _, st in heads]
    div = res.get("divergence") if isinstance(res.get("divergence"), dict) else None
    lines = []
    if heads:
        lines = [esc(h) for _, h, _ in heads]
    elif div and div.get("rate") is not None:
        rate = float(div["rate"])
        statuses.append("bad" if rate > 0 else "good")
        where = div.get("min_reps_diverged")
        n = div.get("n_cases", len(div.get("cases", []) or []))
        lines.append(f"{fmt(100 * rate, 3)}% of {fmt(n)} repetition prompts diverged"
                     + (f"; the earliest at {fmt(where)} repetitions" if where else "") + ".")
    if "bad" in statuses:
        cls, head = "bad", "Vulnerable to repeated-token divergence"
    elif "good" in statuses:
        cls, head = "good", "Not vulnerable in the tested cases"
    else:
        cls, head = "unknown", "Divergence not measured in this scan"
    patch = res.get("patch")
    if not heads and isinstance(patch, dict) and patch.get("summary"):
        lines.append(esc(patch["summary"]))
    ln = res.get("layer_norms")
    if ln and ln.get("ratio"):
        r = [x if x is not None else 0 for x in ln["ratio"]]
        i = max(range(len(r)), key=lambda k: r[k])
        lines.append(f"The first token's hidden-state norm reaches {fmt(r[i])}× the typical norm "
                     f"(layer {i}: {fmt(ln['first_token_norm'][i])} vs {fmt(ln['typical_norm'][i])}).")
    items = "".join(f"<li>{x}</li>" for x in lines)
    return f'<div class="verdict {cls}"><b>{esc(head)}.</b>' + (f"<ul>{items}</ul>" if items else "") + "</div>", []


@section("model")
def model_section(doc: dict):
    m = doc.get("model")
    if not m:
        return None
    keys = ["name", "hf_name", "family", "model_class", "n_layers", "d_model", "d_mlp", "n_heads", "vocab_size",
            "n_ctx", "bos_id", "dtype", "n_params", "quantization", "device"]
    cells = "".join(f"<div><span>{esc(k)}</span><b>{fmt(m[k])}</b></div>" for k in keys if k in m)
    return f"<h2>Model</h2><div class='facts'>{cells}</div>", []


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
        ax.plot(c["reps"], [max(v, 1e-9) for v in c["norm"]], lw=1, label=f"'{c['word']}' repeated")
    ax.set_yscale("log")
    ax.axhline(c0["first_token_norm"], color="#d93025", ls="--", label="first-token norm")
    if c0.get("typical_norm"):
        ax.axhline(c0["typical_norm"], color="#5f6368", ls=":", label="typical norm (text)")
    ax.set_xlabel("number of repetitions of the word")
    ax.set_ylabel(f"hidden-state L2 norm at layer {nc['layer']} (log)")
    ax.legend(fontsize=8)
    f = Figure("fig2_norm_vs_reps", "Figure 2: norm of the repeated token at the sink layer; a curve that climbs "
               "to the first-token line means the repetition is treated as a first token.", fig)
    return f"<h2>Norm vs repetitions (layer {esc(nc['layer'])})</h2>", [f]
