"""Built-in report sections, in page order. Later features register more with @section."""

from __future__ import annotations

from .figures import Figure, new
from .markup import esc, fmt


def _fallback_line(name: str, r: dict) -> tuple[str, str | None] | None:
    """The patch step carries a ``summary`` instead of a ``headline``."""
    if name == "patch" and isinstance(r.get("summary"), str) and r["summary"]:
        met = ((r.get("verification") or {}).get("targets") or {}).get("all")
        return r["summary"], ("good" if met else "bad") if met is not None else None
    return None


def verdict_lines(doc: dict) -> list[tuple[str, str, str | None]]:
    """(step, sentence, status) in pipeline order, from every step result's ``headline`` (plain
    text) and ``status`` ("bad" = vulnerable / not fixed, "good" = not vulnerable / fixed, else
    neutral), or from the patch's ``summary``."""
    res = doc.get("results", {}) or {}
    steps = list(doc.get("steps") or [])
    out = []
    for name in steps + [k for k in res if k not in steps]:
        r = res.get(name)
        if not isinstance(r, dict):
            continue
        if isinstance(r.get("headline"), str) and r["headline"].strip():
            st = r.get("status")
            out.append((name, r["headline"].strip(), st if st in ("bad", "good") else None))
        else:
            fb = _fallback_line(name, r)
            if fb:
                out.append((name, *fb))
    return out


def verdict(doc: dict):
    """The top-line answer: vulnerable or not (from the divergence steps' status), at how many
    repetitions and the patch result (from their headlines), then the first-token norm."""
    res = doc.get("results", {}) or {}
    heads = verdict_lines(doc)
    # the patch's status says whether the fix worked, not whether the model is vulnerable
    vuln = [st for name, _, st in heads if not name.startswith("patch")]
    if "bad" in vuln:
        cls, head = "bad", "Vulnerable to repeated-token divergence"
    elif "good" in vuln:
        cls, head = "good", "Not vulnerable in the tested cases"
    else:
        cls, head = "unknown", "Divergence not measured in this scan"
    lines = [esc(h) for _, h, _ in heads]
    ln = res.get("layer_norms")
    if ln and ln.get("ratio"):
        r = [x if x is not None else 0 for x in ln["ratio"]]
        i = max(range(len(r)), key=lambda k: r[k])
        lines.append(f"The first token's hidden-state norm reaches {fmt(r[i])}× the typical norm "
                     f"(layer {i}: {fmt(ln['first_token_norm'][i])} vs {fmt(ln['typical_norm'][i])}).")
    items = "".join(f"<li>{x}</li>" for x in lines)
    return f'<div class="verdict {cls}"><b>{esc(head)}.</b>' + (f"<ul>{items}</ul>" if items else "") + "</div>", []


def model_section(doc: dict):
    m = doc.get("model")
    if not m:
        return None
    keys = [("name", "name"), ("hf_name", "weights"), ("family", "family"), ("model_class", "class"),
            ("n_params", "parameters"), ("n_layers", "layers"), ("d_model", "d_model"), ("d_mlp", "d_mlp"),
            ("n_heads", "heads"), ("vocab_size", "vocabulary"), ("n_ctx", "context (tokens)"), ("bos_id", "BOS id"),
            ("dtype", "dtype"), ("quantization", "source quantization"), ("device", "device")]
    cells = "".join(f"<div><span>{esc(label)}</span><b>{fmt(m[k])}</b></div>" for k, label in keys if k in m)
    return f"<h2>Model</h2><div class='facts'>{cells}</div>", []


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
    f = Figure("fig2_norm_vs_reps", "Figure 2: norm of the repeated token at the massive layer; a curve that climbs "
               "to the first-token line means the repetition is treated as a first token.", fig)
    return f"<h2>Norm vs repetitions (layer {esc(nc['layer'])})</h2>", [f]
