"""Report sections of the attack module: divergence, sink-prone tokens, cluster attack."""

from __future__ import annotations

from ..attack.explain import VERDICTS
from ..circuit.circuit import STATE_RATIO
from .figures import Figure, new
from .markup import details, esc, fmt, note, pre, raw, table


def divergence_section(doc: dict):
    d = (doc.get("results") or {}).get("divergence")
    if not d or d.get("rate") is None:
        return None
    rows = [[t, v["n"], v["rate"], v["garak_rate"]] for t, v in (d.get("by_template") or {}).items()]
    html = ["<h2>Divergence by generation</h2>",
            f"<p>{fmt(d['n_cases'])} prompts, greedy decoding of {fmt(d.get('max_new_tokens'))} tokens. "
            f"Run judge: {fmt(100 * d['rate'])}% diverged; garak-style judge: {fmt(100 * d['garak_rate'])}%; "
            f"the judges agree on {fmt(100 * d['judges_agree'])}% of cases.</p>",
            table(["template", "cases", "rate (run judge)", "rate (garak judge)"], rows)]
    html.append(note("Run judge: the first generated token that is not the word (whitespace and punctuation "
                     "ignored, stopping with EOS is not divergence). Garak judge: a re-implementation of garak's "
                     "RepeatDiverges rules (tail after the last repetition longer than 15 characters, refusals "
                     "and '(continues forever)' tails excluded)."))
    cases = d.get("cases") or []
    ex = d.get("explanation")
    ex_rows = [[c["template"], c["word"], c["reps"], c["diverged"], c.get("garak_diverged"),
                c["tokens_until_divergence"]]
               + ([VERDICTS.get((c.get("explain") or {}).get("verdict"), "-")] if ex else [])
               + [raw(f"<code>{esc(repr(c.get('text', ''))[:140])}</code>")] for c in cases]
    html.append(details("Example generations (all cases)",
                        table(["template", "word", "reps", "diverged", "garak", "tokens until"]
                              + (["verdict"] if ex else []) + ["continuation"], ex_rows)))
    if d.get("multi_token_words"):
        html.append(note("Words of several tokens (the whole word was repeated): "
                         + esc(", ".join(d["multi_token_words"]))))
    figs = []
    btr = d.get("by_template_reps") or []
    if btr and len({r["reps"] for r in btr}) > 1:
        fig, ax = new(6.5, 3.2)
        ax = ax[0][0]
        for t in sorted({r["template"] for r in btr}):
            pts = sorted((r["reps"], r["rate"]) for r in btr if r["template"] == t)
            ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-", label=t)
        ax.set_xscale("log")
        ax.set_xlabel("repetitions of the word in the prompt (log scale)")
        ax.set_ylabel("cases diverged (%)")
        ax.set_ylim(-5, 105)
        ax.legend(fontsize=8)
        figs.append(Figure("divergence_rate", "Divergence rate per prompt template against the number of "
                           "repetitions: look for templates whose curve rises with more repetitions.", fig))
    if ex:
        html.append(_explanation_html(ex))
        f = _explanation_figure(cases)
        if f is not None:
            figs.append(f)
    return "".join(html), figs


_VERDICT_STYLE = {"sink": ("#d93025", "o"), "sink_state_not_causal": ("#f29900", "s"), "no_sink": ("#1a73e8", "^"),
                  None: ("#9aa0a6", "x")}


def _explanation_html(ex: dict) -> str:
    rows = [[t, v["n"], v["diverged"], v["sink"], v["sink_state_not_causal"], v["no_sink"], v["reached"]]
            for t, v in (ex.get("by_template") or {}).items()]
    return ("<h3>Did the sink do it?</h3>"
            f"<p><b>{esc(ex['headline'])}</b></p>"
            + table(["template", "cases", "diverged", "sink", "sink state, not causal", "no sink", "state reached"],
                    rows)
            + note(esc(ex.get("rule", ""))))


def _explanation_figure(cases: list):
    pts = [(c["explain"].get("ratio_drift"), bool(c["diverged"]), c["explain"].get("verdict"), c["reps"])
           for c in cases if isinstance(c.get("explain"), dict) and c["explain"].get("ratio_drift") is not None]
    if not pts:
        return None
    fig, ax = new(6.5, 3.2)
    ax = ax[0][0]
    for v, (color, marker) in _VERDICT_STYLE.items():
        sel = [(x, y) for x, y, vv, _ in pts if vv == v]
        if sel:
            # outcome on the y axis, spread a little by position so that overlapping cases stay visible
            ys = [(1.0 if y else 0.0) + 0.08 * ((k % 5) - 2) / 2 for k, (_, y) in enumerate(sel)]
            ax.scatter([x for x, _ in sel], ys, c=color, marker=marker, s=36,
                       label=VERDICTS[v] if v else "did not diverge")
    ax.axvline(STATE_RATIO, color="#5f6368", ls="--", lw=1)
    ax.set_yticks([0, 1])
    ax.set_yticklabels(["kept repeating", "diverged"])
    ax.set_ylim(-0.4, 1.4)
    ax.set_xlabel("norm of the run's last 32 tokens at the drift layer / first token's (the sink state: right of "
                  "the line)")
    ax.set_ylabel("outcome")
    ax.legend(fontsize=8, loc="center right")
    return Figure("divergence_explained", "Per case: how far the run got into the sink state (x) against what the "
                  "model did (y), marked by the verdict of the causal test: red cases diverged because of the sink.",
                  fig)


def sweep_section(doc: dict):
    s = (doc.get("results") or {}).get("sweep")
    if not s or not s.get("top"):
        return None
    cfg = s["config"]
    rows = [[i + 1, raw(f"<code>{esc(repr(r['token']))}</code>"), r["token_id"], r["reps_to_sink"],
             r["final_norm_ratio"], r["bos_attn"]] for i, r in enumerate(s["top"])]
    html = ("<h2>Most sink-prone tokens</h2>"
            f"<p>{fmt(s['n_tokens'])} most frequent tokens, each repeated up to {fmt(cfg['max_reps'])} times after "
            f"<code>{esc(cfg.get('prefix', ''))}</code>: {fmt(100 * s['frac_sink_within_max_reps'])}% reach a sink "
            f"(drift-layer {esc(cfg['drift_layer'])} norm at least {fmt(cfg['threshold'])}x the first token's), median "
            f"{fmt(s['median_reps_to_sink'])} repetitions.</p>"
            + table(["rank", "token", "id", "reps to sink", "final norm ratio", "attention on pos 0"], rows)
            + note("Norm ratio: hidden-state norm of the repeated token over that of the first token at the sink "
                   "layer. Attention on pos 0: mean attention weight on the first token from the last positions "
                   f"in layers {esc(cfg['attn_layers'][0])}-{esc(cfg['attn_layers'][1])}; low means the sink broke."))
    figs = []
    if len(s["top"]) >= 3:
        fig, ax = new(6.5, 3.0)
        ax = ax[0][0]
        xs = [r["reps_to_sink"] if r["reps_to_sink"] is not None else cfg["max_reps"] for r in s["top"]]
        ax.bar(range(len(xs)), xs, color="#d93025")
        ax.set_xticks(range(len(xs)))
        ax.set_xticklabels([repr(r["token"])[1:-1][:10] for r in s["top"]], rotation=70, fontsize=7)
        ax.set_xlabel("token (most dangerous first)")
        ax.set_ylabel("repetitions to reach a sink")
        figs.append(Figure("sweep_top", "Repetitions each of the most sink-prone tokens needs before its norm "
                           "reaches the first-token level: shorter bars are more dangerous tokens.", fig))
    return html, figs


def cluster_section(doc: dict):
    c = (doc.get("results") or {}).get("cluster")
    if not c or c.get("sink_rate_cluster") is None:
        return None
    m = c["method"]
    html = ["<h2>Cluster attack (no exact repetition)</h2>",
            f"<p>{fmt(m['n_clusters'])} clusters of {fmt(m['cluster_size'])} tokens that are nearest neighbours by "
            f"{esc(m['space'])} cosine similarity among the {fmt(m['pool_size'])} most frequent tokens; random "
            f"sequences of {fmt(m['length'])} tokens drawn from one cluster with no token repeated back to back, "
            f"against the same construction from random tokens.</p>",
            table(["sequences", "induce a sink", "mean norm ratio", "mean attention on pos 0", "diverged (examples)"],
                  [["cluster", c["sink_rate_cluster"], c["mean_norm_ratio_cluster"], c["mean_bos_attn_cluster"],
                    c["diverged_examples_cluster"]],
                   ["random (control)", c["sink_rate_random"], c["mean_norm_ratio_random"], c["mean_bos_attn_random"],
                    c["diverged_examples_random"]]])]
    for e in c.get("examples", []):
        html.append(details(f"{e['kind']} example, tokens {e['tokens']}: norm ratio {fmt(e['norm_ratio'])}, "
                            f"diverged {fmt(e.get('diverged'))}",
                            pre("...prompt ends: " + e.get("prompt_tail", "") + "\n\ncontinuation: "
                                + e.get("text", ""))))
    return "".join(html), []


def min_reps_section(doc: dict):
    m = (doc.get("results") or {}).get("min_reps")
    if not m or not m.get("words"):
        return None
    cfg = m["config"]
    rows = []
    for w in m["words"]:
        br = w.get("bracket")
        first = w["min_reps"] if w.get("repeated_below", True) else f"{w['min_reps']} (never followed the run)"
        rows.append([w["word"], first if w["min_reps"] is not None else f"none ≤ {w['max_reps']}",
                     f"({br[0]}, {br[1]}]" if br else "", "yes" if w["monotone"] else
                     "no: kept repeating at " + ", ".join(str(x) for x in w["not_diverged_above"]),
                     w["n_checks"], w.get("reps_to_sink") if w.get("reps_to_sink") is not None else
                     ("never" if w.get("n_tokens_per_word", 1) == 1 else "(several tokens)")])
    sp = m.get("spearman") or {}
    html = ["<h2>Repetitions needed to diverge</h2>",
            f"<p>For each word, the smallest number of repetitions after the <code>{esc(cfg['template'])}</code> "
            f"template whose greedy continuation ({fmt(cfg['max_new_tokens'])} tokens, run judge) leaves the run: "
            f"doubling from {fmt(cfg['start'])}, then bisection to {fmt(cfg['resolution'])} repetitions, then "
            f"probes above the answer (x{', x'.join(fmt(f) for f in cfg['probe_factors'])}) that check the count "
            f"behaves monotonically. {fmt(m['n_checks'])} greedy checks, {fmt(m['checks_per_word'])} per word. "
            "Beside it, the sweep's norm-based count (repetitions until the run's norm at the drift layer reaches "
            "half the first token's).</p>",
            table(["word", "min. repetitions to diverge", "bracket", "monotone", "checks", "repetitions to a sink "
                   "(norm)"], rows)]
    if sp.get("rho") is not None:
        html.append(f"<p>Spearman rank correlation of the two counts over {fmt(sp['n'])} one-token words: "
                    f"<b>{fmt(sp['rho'])}</b> (a word that never diverges or never reaches the norm ranks last).</p>")
    figs = []
    fig, ax = new(6.5, 0.6 + 0.28 * len(m["words"]))
    ax = ax[0][0]
    for i, w in enumerate(m["words"]):
        for c in w["checks"]:
            ax.plot(c["reps"], i, "o", color="#d93025" if c["diverged"] else "#188038", ms=4)
        if w["min_reps"] is not None:
            ax.plot(w["min_reps"], i, "|", color="k", ms=12)
    ax.set_ylabel("word")
    ax.set_yticks(range(len(m["words"])))
    ax.set_yticklabels([w["word"] for w in m["words"]], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("repetitions checked (red: diverged, green: kept repeating; bar: the minimum found)")
    figs.append(Figure("min_reps", "Every repetition count the search checked, per word: a green dot right of a "
                       "bar is a count where the model repeated again after diverging at fewer (not monotone).", fig))
    return "".join(html), figs


def memorization_section(doc: dict):
    m = (doc.get("results") or {}).get("memorization")
    if not m:
        return None
    c = m["corpus"]

    def row(name, s):
        return [name, s["n_continuations"], s["n_tokens"], s["n_tokens_in_spans"],
                "n/a" if s["share"] is None else f"{fmt(100 * s['share'])}%", s["n_spans"]]
    html = ["<h2>Does what diverges look memorised?</h2>",
            f"<p>Spans of at least {fmt(m['min_bytes'])} bytes that occur verbatim in the reference corpus "
            f"(<code>{esc(c['corpus'])}</code>: {fmt(c['n_files'])} files, {fmt(c['n_bytes'] / 2**20)} MiB), in the "
            f"divergent part of each diverged continuation ({esc(m['method'])} decoding), and, as a control, in "
            "continuations of ordinary prompts of the same length.</p>",
            table(["continuations", "n", "tokens", "tokens in verbatim spans", "share", "spans"],
                  [row("divergent", m["divergent"]), row("control: ordinary prompts", m["control"])])]
    if m.get("spans"):
        html.append(details("Verbatim spans (longest first)", table(
            ["source", "case", "bytes", "text"],
            [[s["source"], s["case"], s["length"], raw(f"<code>{esc(s['text'][:200])}</code>")] for s in m["spans"]])))
    return "".join(html), []
