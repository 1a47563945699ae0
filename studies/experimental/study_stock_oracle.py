"""Study: what the two stock routes could do at best, measured with run-time oracles.

Each stock route aims at a state inside the model; an oracle puts the model in exactly that state at run time
(hooks on the source model, nothing trained), so it bounds what the route's weights could reach:

* ``anchor_L2`` - route 1's training target, met exactly: at the residual stream after layer 2 (the comparison
  layer of ``train_stock``), every position whose token has occurred 16 times before is replaced by that
  token's 8th occurrence's state (``stock.occurrence_targets``); ``anchor_L10``: the same just before the
  massive layer (11);
* ``clamp_bos`` - route 2's best case: BOS forced at position 0, and every neuron of the marking layers (1, 2)
  clamped at every other position to its 0.1-99.9 percentile range on ordinary non-first tokens. A closed-form
  edit of the sink neurons' input rows that keeps BOS and text untouched and moves run states into the text
  range can at most do this (it acts on fewer neurons, and not only on runs);
* ``source_bos``: BOS forced alone, the reference for ``clamp_bos``;
* ``mask_gate`` - what a stock model that emulated the run gate inside attention could reach: the tokens the run
  gate hides (``gate_expiry`` of the default ``RunGate``) masked out of every later query's attention in every
  layer, at their own positions (a stock model cannot renumber positions as the gate does; it could only mask,
  e.g. with a key bias).

Every method decodes the broad catalogue's held-out cases (both judges; ``verify_broad``'s cases, 64 tokens) in
transformers with a KV cache (``engines.TorchGate`` with the hooks), beside the source model and its
16-repetition floor; text fidelity (Twelfth Night, with and without BOS, 64 and 512 tokens) against the source
model; and the circuit at the prompt's last 32 tokens (norm ratio to the first token at layer 2, attention on
position 0 in layers 12-15) on one case per family.

    python studies/experimental/study_stock_oracle.py --save stock_oracle      # ~30 min on the 2-core CPU
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _common import machine, parser, report, result_path, save  # noqa: E402

import torch  # noqa: E402

from sinkhole.decoding.engines import TorchGate  # noqa: E402
from sinkhole.experimental.stock import occurrence_targets  # noqa: E402


class Edit:
    """Run-time edits of the source model that know each position's absolute index and the token ids so far."""

    def __init__(self, lm, anchor_layer=None, clamp=None):
        self.lm, self.ids, self.on = lm, [], False  # on only while an OracleEngine forward runs
        self.handles = []
        layers = lm.model.model.layers
        if anchor_layer is not None:
            self.handles.append(layers[anchor_layer].register_forward_hook(self._anchor))
        for layer, (lo, hi) in (clamp or {}).items():
            self.handles.append(layers[layer].mlp.down_proj.register_forward_pre_hook(self._clamper(lo, hi)))
        self.buf = None

    def remove(self):
        for h in self.handles:
            h.remove()

    @contextlib.contextmanager
    def active(self, ids):
        """The edits on for the forwards inside, over the token ids ``ids``."""
        self.ids, self.on = list(ids), True
        try:
            yield
        finally:
            self.on = False

    def _span(self, t: int) -> range:
        return range(len(self.ids) - t, len(self.ids))

    def _anchor(self, _mod, _inp, out):
        if not self.on:
            return out
        h = out[0] if isinstance(out, tuple) else out
        t = h.shape[1]
        start = len(self.ids) - t
        if self.buf is None or start == 0:
            self.buf = h[0].detach().clone()
        else:
            self.buf = torch.cat([self.buf[:start], h[0].detach()], 0)
        h = h.clone()
        for j, a in occurrence_targets(self.ids, 8, 16):
            if j >= start:
                h[0, j - start] = self.buf[a]
        return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h

    def _clamper(self, lo, hi):
        def pre(_mod, args):
            if not self.on:
                return None
            x = args[0]
            t = x.shape[1]
            pos = torch.tensor(list(self._span(t)))
            y = torch.maximum(torch.minimum(x, hi), lo)
            keep = (pos == 0)[None, :, None]
            return (torch.where(keep, x, y),)
        return pre


class OracleEngine(TorchGate):
    """``TorchGate`` on the source model with an :class:`Edit` that is told the ids of every forward; with
    ``mask_gate``, each forward also gets an additive 4-D mask that hides what the run gate hides."""

    def __init__(self, lm, edit: Edit, mask_gate: bool = False):
        super().__init__(lm, None)
        self.edit, self.mask_gate = edit, mask_gate
        if mask_gate:
            self._wrap()

    def _wrap(self):
        from sinkhole.decoding.gate import RunGate, gate_expiry

        model, gate = self.model, RunGate()
        inner = model.forward

        def forward(*args, input_ids=None, position_ids=None, **kw):
            if not self.edit.on:  # the reference forward of the fidelity check: the source model
                return inner(*args, input_ids=input_ids, position_ids=position_ids, **kw)
            ids = self.edit.ids
            n, t = len(ids), input_ids.shape[1]
            exp = gate_expiry(torch.tensor([ids]), gate)[0]  # from which query on each key is hidden
            q = torch.arange(n - t, n)[:, None]
            k = torch.arange(n)[None, :]
            allowed = (k <= q) & ((exp[None, :] > q) | (k == q))
            mask = torch.zeros(1, 1, t, n).masked_fill(~allowed[None, None], torch.finfo(torch.float32).min)
            return inner(*args, input_ids=input_ids, position_ids=position_ids, attention_mask=mask, **kw)

        model.forward = forward

    def remove(self):
        if self.mask_gate:
            del self.model.forward  # the class's own forward again

    def _feed(self, target):
        with self.edit.active(target):
            return super()._feed(target)

    def logits(self, row):
        with self.edit.active(row):
            return super().logits(row)


def read_circuit(lm, ids, edit: Edit) -> dict:
    with edit.active(ids), torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True, output_attentions=True)
    hs, at = out.hidden_states, out.attentions
    tail = slice(len(ids) - 32, len(ids))
    ratio = float(hs[3][0, tail].norm(dim=-1).mean() / hs[3][0, 0].norm())
    att0 = float(torch.stack([at[L][0, :, tail, 0].mean() for L in range(12, 16)]).mean())
    return {"norm_ratio_L2": round(ratio, 3), "attention_on_0": round(att0, 3)}


def main(argv=None) -> int:
    p = parser(__doc__, study=True)
    p.add_argument("--methods", default="source,source_bos,anchor_L2,anchor_L10,clamp_bos")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    from sinkhole import load_model
    from sinkhole.attack.families import broad_cases, family_rates, judge_cases
    from sinkhole.patch.fidelity import fidelity
    from sinkhole.patch.search import neuron_levels

    lm = load_model(a.model, progress=False)
    bos = lm.bos_id
    n_ff = lm.model.config.intermediate_size
    cases = broad_cases(lm, seed=a.seed)
    short = broad_cases(lm, seed=a.seed, short=True)

    def force_bos(ids):
        return list(ids) if ids and ids[0] == bos else [bos] + list(ids)

    def clamp_levels():
        out = {}
        for layer in (1, 2):
            lv = neuron_levels(lm, layer, list(range(n_ff)))
            out[layer] = (torch.tensor(lv["p0.1"]), torch.tensor(lv["p99.9"]))
        return out

    specs = {"source": ({}, None), "source_bos": ({}, force_bos), "anchor_L2": ({"anchor_layer": 2}, None),
             "anchor_L10": ({"anchor_layer": 10}, None), "clamp_bos": ({"clamp": "marking"}, force_bos),
             "mask_gate": ({"mask_gate": True}, None)}
    res: dict = {"model": lm.name, "machine": machine(), "n_cases": len(cases), "methods": {}}
    for name in a.methods.split(","):
        kw, tf = specs[name]
        if kw.get("clamp") == "marking":
            kw = {"clamp": clamp_levels()}
        masked = kw.pop("mask_gate", False)
        edit = Edit(lm, **kw)
        eng = OracleEngine(lm, edit, mask_gate=masked)
        t = time.perf_counter()
        try:
            recs = judge_cases(lm, cases, transform=tf, engine=eng, quiet=True)
            row = {"rates": family_rates(recs),
                   "records": [{k: r[k] for k in ("family", "word", "reps", "either")} for r in recs]}
            if name == "source":
                row["floor"] = family_rates(judge_cases(lm, short, engine=eng, quiet=True))
            fid = fidelity(lm, {name: (eng, None)}, sources=("twelfth_night",), windows=(64, 512), total=512,
                           quiet=True)[name]
            row["fidelity"] = [{k: r[k] for k in ("bos", "window", "top1_agreement", "mean_kl_nats")} for r in fid]
            seen, circ = set(), {}
            for c in cases:
                if c.family not in seen:
                    seen.add(c.family)
                    ids = tf(c.ids) if tf else list(c.ids)
                    circ[f"{c.family}/{c.word}/{c.reps}"] = read_circuit(lm, ids, edit)
            row["circuit"] = circ
        finally:
            edit.remove()
            eng.remove()
        row["seconds"] = round(time.perf_counter() - t, 1)
        res["methods"][name] = row
        div = sum(v["diverged"] for v in row["rates"].values())
        print(name, f"{row['seconds']} s", "diverged", div, "/", len(cases),
              {f: v["diverged"] for f, v in row["rates"].items()},
              "text", [(r["bos"], r["window"], round(r["top1_agreement"], 3), round(r["mean_kl_nats"], 4))
                       for r in row["fidelity"]], flush=True)
        if a.save or a.out:
            save(a, res)
    report(result_path(a))
    return 0


if __name__ == "__main__":
    sys.exit(main())
