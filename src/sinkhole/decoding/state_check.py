"""The run gate's state check, a research variant of the gate (``RunGate(confirm=...)``; docs/experimental.md says
why it falls short): a stretch of excess tokens is shortened only once the model's own layer-0 state reads
first-token-like there.

For every excess token the check reads its layer-0 state in the gated model and keeps its distance to its unit's
state at the start of a sequence (the layer-0 output of the last token of the run's unit, period p, fed alone:
for a one-token run, the token's singleton state, which the paper's Theorem 4.1 says a long run converges to). A
stretch is confirmed at the first token where the mean distance over its last ``span`` tokens is at most
``confirm`` (:func:`sinkhole.decoding.gate.confirmed_at`), and the gate's rule then hides from the first block that
starts after it. A token's reading depends on the tokens before it only, so a prompt is gated as it would be
token by token.

* :func:`gate_hooks` attaches the gate with the check to a model (:class:`StateCheck` reads the state as the gated
  model computes it: a forward hook on layer 0 for a call of one token; probe passes stopped after layer 0 for a
  call that brings several excess tokens, again after each new confirmation);
* :func:`read_state` (:func:`distances`) reads a whole sequence, for the functions of :mod:`sinkhole.decoding.gate`
  that take ``dist`` (``collapse``, ``hidden_mask``, ``gate_expiry``);
* :class:`StateReader` keeps the reading from step to step in the engines' feeding loops.
"""

from __future__ import annotations

import torch

from ..capture import StopForward
from ..errors import SinkholeError
from .cache import cache_argument, common_prefix, new_cache
from .gate import GateHooks, RunGate, collapse, confirmed_at, excess_mask, expiry, hidden_before, run_unit, stretches

# The state check's default distance (``RunGate(confirm=STATE_CONFIRM)``): chosen on SmolLM2 beside the broad
# set's draws 0 and 1 and the six documents of studies/circuit/study_sink_state.py (docs/experimental.md).
STATE_CONFIRM = 0.2


def gate_hooks(lm, gate: RunGate) -> GateHooks:
    """The gate's hooks for ``lm``, with the state check attached when ``gate.confirm`` is set."""
    if gate.confirm is None:
        return GateHooks(lm, gate)
    check = StateCheck(lm, gate)
    check.hooks = GateHooks(lm, gate, check)
    return check.hooks


def read_state(lm, ids, gate: RunGate) -> torch.Tensor | None:
    """The state check's reading of ``ids`` (:func:`distances`) when ``gate`` has the check, else None: what the
    gate's ``collapse``, ``hidden_mask`` and ``gate_expiry`` take as ``dist``."""
    if gate.confirm is None:
        return None
    if lm is None:
        raise SinkholeError("a run gate with the state check (confirm) needs the model to say what it hides")
    return distances(lm, ids, gate)


def unconfirmed(ex: torch.Tensor, dist: torch.Tensor, gate: RunGate) -> torch.Tensor:
    """Boolean (B, n): the excess tokens of ``ex`` whose state the check still needs: those of stretches
    not confirmed by ``dist``, and of a confirmed stretch up to its confirmation (after it the stretch
    stays confirmed whatever its state: nothing there is read)."""
    out = ex.clone()
    for b in range(ex.shape[0]):
        for r0, r1 in stretches(ex[b]):
            c = confirmed_at(dist[b], r0, r1, gate)
            if c is not None:
                out[b, c + 1:r1 + 1] = False
    return out



def distances(lm, ids, gate: RunGate, known: torch.Tensor | None = None) -> torch.Tensor:
    """(B, n) float: each excess token's layer-0 distance to its unit's state at the start of a sequence,
    in the gated model (NaN for tokens the state check does not read: not excess, or after their
    stretch's confirmation); the state check's input. ``known``: the distances of a prefix of ``ids``
    (B, m <= n) from an earlier call; a token's distance depends on the tokens before it only, so they
    are kept and only the rest is read."""
    t = torch.as_tensor(ids, dtype=torch.long)
    t = t.unsqueeze(0) if t.dim() == 1 else t
    d = torch.full(t.shape, float("nan"), dtype=torch.float64)
    if known is not None:
        known = known.unsqueeze(0) if known.dim() == 1 else known
        d[:, :known.shape[1]] = known[:, :t.shape[1]].cpu()
    ex = excess_mask(t, gate)
    if not bool((unconfirmed(ex, d, gate) & torch.isnan(d)).any()):
        return d
    with gate_hooks(lm, gate) as h:
        h.hist = t.to(lm.device)
        h.dist = d.to(lm.device)
        h.check.settle(ex.to(lm.device))
        return h.dist.cpu()


def state_distance(states: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """The state check's distance: relative distance of layer-0 ``states`` (k, d) to the ``refs`` (k, d)."""
    states, refs = states.float(), refs.float()
    return ((states - refs).norm(dim=-1) / refs.norm(dim=-1).clamp_min(1e-6)).double()


class StateCheck:
    """The state check's reading inside :class:`sinkhole.decoding.gate.GateHooks` (made by :func:`gate_hooks`):
    it fills the hooks' ``dist`` for every new excess token as the gated model computes its state."""

    def __init__(self, lm, gate: RunGate):
        self.lm, self.gate = lm, gate
        self.adapter = lm.adapter
        self.hooks: GateHooks | None = None
        self.ex: torch.Tensor | None = None  # (B, n) excess tokens of the history
        self._states: torch.Tensor | None = None
        self._refs: dict[tuple, torch.Tensor] = {}
        self._cache_kw: str | None = None  # the name of the base model's KV cache argument, once a probe needs it

    def attach(self, hooks: GateHooks):
        """The forward hook on layer 0 (its handle)."""
        self.hooks = hooks
        return self.adapter.layer(0).register_forward_hook(self._layer0)

    def track(self, hooks: GateHooks, ex: torch.Tensor, past: int, q: int, fresh: bool) -> None:
        """A call brings ``q`` new tokens after ``past``: keep the distances already read, read a prompt's."""
        h = hooks
        known = None if fresh or h.dist is None or h.dist.shape[1] < past else h.dist[:, :past]
        h.dist = torch.full(h.hist.shape, float("nan"), dtype=torch.float64, device=h.hist.device)
        if known is not None:
            h.dist[:, :past] = known
        self.ex = ex
        if q > 1 and bool(ex[:, -q:].any()):
            self.settle(ex)

    def _layer0(self, module, args, out):
        h = self.hooks
        x = out[0] if isinstance(out, tuple) else out
        if h.probing:
            self._states = x.detach()
            raise StopForward
        if self.ex is None or h.dist is None or h.hist is None:
            return None
        q = x.shape[1]
        n = h.hist.shape[1]
        todo = (unconfirmed(self.ex, h.dist, self.gate) & torch.isnan(h.dist))[:, n - q:]
        if bool(todo.any()):
            mask = torch.zeros_like(self.ex)
            mask[:, n - q:] = todo
            self._read(x.detach(), mask, n - q)
        return None

    def ref(self, unit: tuple) -> torch.Tensor:
        """Layer-0 output of the last token of ``unit`` fed alone (a run's limit at the start of a sequence)."""
        if unit not in self._refs:
            self._refs[unit] = self.probe(torch.tensor([unit], device=self.hooks.hist.device), None)[0, -1].float()
        return self._refs[unit]

    def _read(self, states: torch.Tensor, mask: torch.Tensor, offset: int) -> None:
        """Fill ``dist`` at the tokens of ``mask`` (B, n) from their layer-0 ``states`` (B, n - offset, d:
        the history's tokens from ``offset`` on)."""
        h = self.hooks
        for b in range(mask.shape[0]):
            if not bool(mask[b].any()):
                continue
            row = h.hist[b]
            for r0, r1 in stretches(self.ex[b]):
                ts = (torch.nonzero(mask[b, r0:r1 + 1]).flatten() + r0).tolist()
                if ts:
                    refs = torch.stack([self.ref(run_unit(row, r0, t, self.gate)) for t in ts])
                    h.dist[b, ts] = state_distance(states[b, [t - offset for t in ts]], refs)

    def probe(self, ids: torch.Tensor, exp: torch.Tensor | None, past=None, start: int = 0) -> torch.Tensor:
        """Layer-0 output (B, n, d) of ``ids`` (-1: padding) from position 0, with the tokens ``exp``
        hides masked and not counted in the positions; or, with a KV cache ``past`` that holds the
        ``start`` tokens before ``ids`` (no padding, nothing hidden), of ``ids`` after them."""
        h = self.hooks
        base = self.adapter.base_model or self.lm.model
        real = ids >= 0
        hb = hidden_before(exp) if exp is not None else 0
        pos = (real.long().cumsum(1) - 1 - hb).clamp_min(0) + start
        saved = (h.exp, h.q)
        h.exp, h.q, h.probing, self._states = exp, ids.shape[1], True, None
        if past is None:
            kw = {"use_cache": False, "attention_mask": real.long()}
        else:
            if self._cache_kw is None:
                self._cache_kw = cache_argument(base)
            kw = {"use_cache": True, self._cache_kw: past}
        try:
            with torch.no_grad():
                base(input_ids=ids.clamp_min(0), position_ids=pos, **kw)
        except StopForward:
            pass
        finally:
            h.exp, h.q = saved
            h.probing = False
        if self._states is None:
            raise SinkholeError("the run gate's state check could not read layer 0 of this model")
        return self._states

    def settle(self, ex: torch.Tensor) -> None:
        """Read the state of the history's unread excess tokens by probe passes: under the stretches
        confirmed so far; after a new confirmation, again from the first token it hides from."""
        h = self.hooks
        self.ex = ex
        for _ in range(64):
            exp = expiry(h.hist, self.gate, ex, h.dist)
            todo = unconfirmed(ex, h.dist, self.gate) & torch.isnan(h.dist)
            if not bool(todo.any()):
                return
            self._read(self.probe(h.hist, exp), todo, 0)
            new = expiry(h.hist, self.gate, ex, h.dist)
            changed = new != exp
            if not bool(changed.any()):
                return
            # queries from the first newly hidden position on were read under the old masks: read them again
            first = int(new[changed].min())
            again = todo.clone()
            again[:, :first] = False
            h.dist[again] = float("nan")
            if not bool(again.any()):
                return


class StateReader:
    """The state check for a loop that grows the history one token at a time and feeds the model its
    collapse (:class:`sinkhole.decoding.engines.LlamaCpp` and ``TorchGate``): :meth:`read` gives
    :func:`distances` of the history.

    In the gated model a token sees what the plain model sees at the last token of the collapsed history
    up to it, and a confirmation at that token hides nothing it sees. So a new token's state is the
    layer-0 output of the last token of :func:`collapse` of the history, under the distances of the tokens
    before it: one pass of layer 0 with its own KV cache, which keeps the longest common prefix with the
    previous collapse (a run not yet confirmed adds one token; a confirmed one-token run swaps the last).
    A history that did not grow by exactly one token is read with :func:`distances`."""

    def __init__(self, lm, gate: RunGate):
        self.lm, self.gate = lm, gate
        self.dist: torch.Tensor | None = None  # (1, n) distances of the history read so far
        self._hooks = gate_hooks(lm, gate)  # its probe and its cache of start-of-sequence states
        self._cached: list[int] = []
        self._past = None

    def read(self, hist) -> torch.Tensor:
        hist = list(hist)
        n = len(hist)
        if self.dist is None or self.dist.shape[1] != n - 1:
            self.dist = distances(self.lm, hist, self.gate, known=self.dist)
            return self.dist
        t = torch.as_tensor([hist], dtype=torch.long)
        d = torch.cat([self.dist, torch.full((1, 1), float("nan"), dtype=torch.float64)], 1)
        ex = excess_mask(t, self.gate)
        if bool(ex[0, -1]) and bool(unconfirmed(ex, d, self.gate)[0, -1]):
            key = collapse(hist, self.gate, dist=d)
            r0 = stretches(ex[0])[-1][0]
            with self._hooks as h:
                h.hist = t.to(self.lm.device)
                ref = h.check.ref(run_unit(t[0], r0, n - 1, self.gate))
                d[0, -1] = state_distance(self._last(h.check, key)[None], ref[None])[0]
        self.dist = d
        return d

    def _last(self, check: "StateCheck", key: list[int]) -> torch.Tensor:
        """Layer-0 output of the last token of ``key`` read from position 0, evaluating only what differs
        from the previous call's ``key``."""
        p = min(common_prefix(self._cached, key), len(key) - 1)
        if self._past is None or p == 0:
            self._past, p = new_cache(self.lm.model), 0
        elif p < len(self._cached):
            self._past.crop(p - len(self._cached))
        ids = torch.tensor([key[p:]], device=self.lm.device)
        out = check.probe(ids, None, past=self._past, start=p)
        self._cached = list(key)
        return out[0, -1]
