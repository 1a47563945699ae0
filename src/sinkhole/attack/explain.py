"""Did the attention sink do it? A causal answer for every judged case.

For each case the model's state is read over the run's last ``EXPLAIN_TOKENS`` tokens, from the circuit's own
layers (:class:`sinkhole.circuit.Circuit`), in one forward pass stopped after the last layer read:

* ``ratio_marking`` / ``ratio_drift``: the hidden-state norm after each marking layer and after the drift layer, as a
  share of the first token's norm there (mean over the tokens read);
* ``attn0_late``: the attention paid to position 0 (mean over heads and tokens) in the attention layers after the
  massive layer, where later layers park on the sink;
* ``l0_distance``: the layer-0 distance of the run's copies to the unit's state at the start of a sequence (the last
  token of the unit fed alone: Theorem 4.1's limit), the run gate's state check's distance.

The run **reached the sink state** when its drift-layer ratio is at least :data:`sinkhole.circuit.circuit.STATE_RATIO`
(the sweep's "repetitions to a sink" threshold) and the first token of its prompt is a sink (every first token on an
``any_token`` model; only BOS on a ``bos_only`` one; none without a sink).

Every diverged case then gets a **causal test**: the case is decoded again with the run's state taken away at the
drift layer. Every copy past the run's first ``SHORT_REPS`` (16) repetitions gets, at the drift layer's output, the
state of the same token at its last place among those 16 (for a one-token run: the 16th copy's state), so the layers
above see a long run whose state is the short run's, at the run's own positions; the tokens the model writes are
computed as usual. Verdicts (``VERDICTS``):

``sink``                  the state was reached, and without it the model keeps repeating;
``sink_state_not_causal`` the state was reached, but the model diverges without it (for a run whose 16th copy already
                          holds the state, as a raw run from position 0 does, ``ratio_drift_16`` says so: the test
                          cannot take it away there, and the short run diverges as well);
``no_sink``               the run never reached the state: the model left it for another reason.

Cost: one capture pass per case, and per diverged case one more judged decoding and one pass to the drift layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import torch

from ..capture import Hooks, real_positions
from ..circuit.circuit import STATE_RATIO, Circuit, discover
from ..decoding.state_check import state_distance
from ..progress import progress
from .prompts import SHORT_REPS

EXPLAIN_TOKENS = 32  # the run's last tokens read
LATE_LAYERS = 4  # attention layers after the massive layer read for the attention on position 0
VERDICTS = {
    "sink": "sink",
    "sink_state_not_causal": "sink state, not causal",
    "no_sink": "no sink",
}
VERDICT_RULE = (f"state reached: the drift layer's norm over the run's last {EXPLAIN_TOKENS} tokens is at least "
                f"{STATE_RATIO:g} of the first token's, and the prompt's first token is a sink; causal test: the "
                f"case decoded again with every copy past the run's first {SHORT_REPS} given, at the drift layer, "
                f"the state of the same token at its last place among those {SHORT_REPS}. sink: reached, and "
                "without it the model keeps repeating; sink state, not causal: reached, and it still diverges; "
                "no sink: not reached")
# how much of a model's divergence the sink explains (share of diverged cases with the verdict ``sink``)
ANSWERS = (("mostly", 0.5), ("partly", 0.0))  # share > 0.5: mostly; > 0: partly; else not


def run_span(ids: Sequence[int], unit: Sequence[int], allowed: Sequence[int] | None = None) -> tuple[int, int] | None:
    """[start, end) of the case's run: the longest stretch of back-to-back copies of ``unit``; with ``allowed`` (a
    run without an exact unit: clusters, evasions), the longest stretch of tokens from ``allowed``. None when the
    prompt holds neither."""
    ids = list(ids)
    if allowed is not None:
        ok = set(int(t) for t in allowed)
        step, last = 1, len(ids) - 1

        def match(i):
            return ids[i] in ok
    else:
        unit = list(unit)
        step, last = len(unit), len(ids) - len(unit)
        if not step:
            return None

        def match(i):
            return ids[i:i + step] == unit
    best: tuple[int, int] | None = None
    i = 0
    while i <= last:
        if not match(i):
            i += 1
            continue
        j = i
        while j <= last and match(j):
            j += step
        if best is None or j - i > best[1] - best[0]:
            best = (i, j)
        i = j
    return best


def late_layers(lm, circ: Circuit) -> list[int]:
    """The attention layers after the massive layer whose attention on position 0 is read (at most LATE_LAYERS)."""
    n = lm.adapter.n_layers
    m = circ.massive_layer
    later = lm.adapter.attention_in(range(m + 1, n))[:LATE_LAYERS]
    return later or lm.adapter.attention_in(range(n))[-LATE_LAYERS:]


@dataclass
class Explainer:
    """The per-case explanation on one model: its circuit and the layers read."""

    lm: object
    circ: Circuit
    tokens: int = EXPLAIN_TOKENS
    late: list = field(default_factory=list)
    _refs: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.late = self.late or late_layers(self.lm, self.circ)

    # -- readings ------------------------------------------------------------------------------
    def first_is_sink(self, ids: Sequence[int]) -> bool:
        """Whether the prompt's first token is a sink on this model (the circuit's ``sink_kind``)."""
        kind = self.circ.sink_kind
        bos = getattr(self.lm, "bos_id", None)
        return kind == "any_token" or (kind == "bos_only" and bos is not None and len(ids) > 0 and ids[0] == bos)

    @staticmethod
    def sources(ids: Sequence[int], span: tuple[int, int], unit: Sequence[int]) -> tuple[int, dict[int, int]]:
        """(cut, {token: place}): the first position past the run's first SHORT_REPS copies, and the last place of
        each of the run's tokens among those copies."""
        start, end = span
        cut = min(end, start + SHORT_REPS * max(1, len(unit)))
        return cut, {int(ids[s]): s for s in range(max(start, 1), cut)}

    def _ref(self, unit: tuple) -> torch.Tensor:
        if unit not in self._refs:
            h = Hooks(self.lm)
            h.read("resid_post", 0, reduce=lambda x, pos: x.detach()[0, -1].float())
            h.stop_after(0)
            with torch.no_grad(), h:
                h.forward(torch.tensor([list(unit)], device=self.lm.device), use_cache=False)
            self._refs[unit] = h.cache["resid_post.0"].cpu()
        return self._refs[unit]

    def read(self, ids: Sequence[int], span: tuple[int, int], unit: Sequence[int]) -> tuple[dict, "StateSwap | None"]:
        """The circuit's readings over the run's last ``tokens`` tokens, and the causal test's hooks (None for a run
        of at most SHORT_REPS copies): one forward pass."""
        lm, c = self.lm, self.circ
        start, end = span
        lo = max(start, end - self.tokens, 1)
        sel = list(range(lo, end))
        unit = tuple(int(t) for t in unit)
        copies = [t for t in sel if unit and ids[t] == unit[-1]]
        norm_layers = sorted({*c.marking_layers, c.drift_layer})
        h = Hooks(lm)
        for L in norm_layers:
            h.read("resid_post", L, reduce=lambda x, pos: x.detach().float().norm(dim=-1)[0].cpu())
        if copies:
            idx = torch.tensor(copies)
            h.read("resid_post", 0, reduce=lambda x, pos: x.detach()[0, idx.to(x.device)].float().cpu(), name="l0")
        cut, src = self.sources(ids, span, unit)
        uniq = sorted(src.values()) if cut < end else []
        if uniq:
            at = torch.tensor(uniq)
            h.read("resid_post", c.drift_layer, reduce=lambda x, p: x.detach()[0, at.to(x.device)].clone(), name="src")
        for L in self.late:
            h.read("attn_first", L, reduce=lambda w, pos: w.detach().float().mean(1)[0].cpu())
        h.stop_after(max([*norm_layers, *self.late, 0]))
        with torch.no_grad(), h:
            h.forward(torch.tensor([list(ids)], device=lm.device), use_cache=False)

        def ratio(L, at=sel):  # mean norm at the positions ``at`` as a share of the first token's, layer L
            n = h.cache[f"resid_post.{L}"]
            return round(float(n[at].mean() / n[0].clamp_min(1e-12)), 4) if at else None

        att = torch.stack([h.cache[f"attn_first.{L}"][sel] for L in self.late]).mean() if sel else None
        dist = None
        if copies:
            ref = self._ref(unit)
            dist = round(float(state_distance(h.cache["l0"], ref.expand(len(copies), -1)).mean()), 4)
        out = {"run": [int(start), int(end)], "tokens_read": len(sel),
               "ratio_marking": {str(L): ratio(L) for L in c.marking_layers}, "ratio_drift": ratio(c.drift_layer),
               "attn0_late": round(float(att), 4) if att is not None else None, "l0_distance": dist,
               "first_is_sink": self.first_is_sink(ids)}
        out["state_reached"] = bool(out["first_is_sink"] and out["ratio_drift"] is not None
                                    and out["ratio_drift"] >= STATE_RATIO)
        swap = None
        if uniq:
            out["ratio_drift_16"] = ratio(c.drift_layer, uniq)
            row = {s: i for i, s in enumerate(uniq)}
            swap = StateSwap(lm, c.drift_layer, cut, {t: h.cache["src"][row[s]] for t, s in src.items()})
        return out, swap

    # -- one case ------------------------------------------------------------------------------
    def explain(self, ids: Sequence[int], unit: Sequence[int], diverged: bool,
                rerun: Callable[[Callable[[], ContextManager]], bool], allowed: Sequence[int] | None = None) -> dict:
        """Readings, and for a diverged case the causal test and the verdict. ``rerun(hooks)`` decodes the case
        again under ``hooks`` and says whether it diverged (by the same judge as ``diverged``)."""
        span = run_span(ids, unit, allowed)
        if span is None:
            return {"verdict": "no_sink" if diverged else None, "state_reached": False,
                    "note": "no run found in the prompt"}
        out, swap = self.read(ids, span, unit)
        out["verdict"] = None
        if diverged:
            still = True
            if swap is not None:  # a run of at most SHORT_REPS copies has no state to take away: it diverges as is
                still = bool(rerun(lambda: swap))
            out["causal"] = {"diverged_without_state": still, "stopped": not still}
            out["verdict"] = ("no_sink" if not out["state_reached"] else
                              "sink_state_not_causal" if still else "sink")
        return out


class StateSwap:
    """The causal test's hooks: at the output of ``layer``, every token at a position from ``cut`` on whose id has a
    stored state (the run's tokens, in the prompt and among those the model writes) gets that state."""

    def __init__(self, lm, layer: int, cut: int, states: dict[int, torch.Tensor]):
        self.lm, self.layer, self.cut = lm, int(layer), int(cut)
        self.keys = torch.tensor(sorted(states))
        self.states = torch.stack([states[int(t)] for t in self.keys])
        self._ids = self._pos = None
        self._handles: list = []

    def _top(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._ids = ids if isinstance(ids, torch.Tensor) else None
        self._pos = real_positions(args, kwargs) if self._ids is not None else None

    def _out(self, module, args, out):
        x = out[0] if isinstance(out, tuple) else out
        if self._ids is None or self._pos is None or tuple(self._pos.shape) != tuple(x.shape[:2]):
            return None
        keys = self.keys.to(x.device)
        hit = (self._pos >= self.cut) & torch.isin(self._ids, keys)
        if not bool(hit.any()):
            return None
        x = x.clone()
        x[hit] = self.states.to(x.device, x.dtype)[torch.searchsorted(keys, self._ids[hit])]
        return (x,) + tuple(out[1:]) if isinstance(out, tuple) else x

    def __enter__(self):
        self._handles = [self.lm.model.register_forward_pre_hook(self._top, with_kwargs=True),
                         self.lm.adapter.layer(self.layer).register_forward_hook(self._out)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        return False


def summarize_explanations(records: Sequence[dict], key: str = "template") -> dict:
    """The share of divergences the sink caused, overall and per ``key`` (records: one dict per case with ``key``
    and ``explain``), the answer (mostly / partly / not) and the headline sentence."""
    def count(rs):
        ex = [r["explain"] for r in rs if r.get("explain") and r["explain"].get("verdict")]
        d = {v: sum(e["verdict"] == v for e in ex) for v in VERDICTS}
        d["no_sink_stopped"] = sum(e["verdict"] == "no_sink" and bool(e.get("causal", {}).get("stopped")) for e in ex)
        return {"diverged": len(ex), **d,
                "reached": sum(bool(r.get("explain", {}).get("state_reached")) for r in rs), "n": len(rs)}
    by: dict[str, list] = {}
    for r in records:
        by.setdefault(str(r[key]), []).append(r)
    total = count(records)
    k, n = total["sink"], total["diverged"]
    share = k / n if n else None
    answer = None if share is None else next((a for a, t in ANSWERS if share > t), "not")
    if n == 0:
        head = "No case diverged: there is no divergence for the sink to explain."
    else:
        worded = {"mostly": "mostly explains", "partly": "partly explains", "not": "does not explain"}[answer]
        more = total["no_sink_stopped"]
        head = (f"{k} of {n} divergences are caused by the sink ({total['sink_state_not_causal']} reached its state "
                f"without it being the cause, {total['no_sink']} never reached it"
                + (f"; in {more} of these the run's drift below the state still mattered: cut back to 16 "
                   "repetitions, they keep repeating" if more else "")
                + f"): the paper's mechanism {worded} this model's divergence.")
    return {"n_diverged": n, "caused_by_sink": k, "share": None if share is None else round(share, 4),
            "answer": answer, "counts": {v: total[v] for v in (*VERDICTS, "no_sink_stopped")},
            f"by_{key}": {t: count(rs) for t, rs in by.items()}, "headline": head, "rule": VERDICT_RULE}


def explain_records(lm, items: Sequence[tuple], circ: Circuit | None = None, quiet: bool | None = None,
                    explainer: Explainer | None = None) -> list[dict]:
    """``items``: (ids, unit, diverged, rerun, allowed) per case -> one ``explain`` dict per case."""
    if explainer is None:
        explainer = Explainer(lm, circ or discover(lm))
    return [explainer.explain(ids, unit, div, rerun, allowed)
            for ids, unit, div, rerun, allowed in progress(list(items), desc="explaining", disable=quiet)]
