"""The run gate: a patch that acts only inside long low-diversity runs, so ordinary text is untouched.

A long run of one token (or of a few tokens: a phrase, ``w, w, w``, a cluster sequence) is what
breaks the attention sink (the paper's Theorem 4.1: attention over many identical keys returns
the same value as a first token attending to itself). A serving stack's defence is to collapse
such runs in the prompt. The gate does the same *inside* the model, for the prompt and for every
token the model generates, with the KV cache intact:

* **which tokens are excess** (:func:`excess_mask`): token ``t`` is excess when the ``window``
  tokens before it hold at most ``max_distinct`` distinct tokens and token ``t`` is already among
  them at least ``min_count`` times. So a run keeps its first tokens (about ``window`` minus the
  few other tokens still in the window); the token that ends a run (a closing quote, a new word)
  is not excess, because it is not among the run's tokens.
* **which are hidden, and from whom** (:func:`expiry`): a stretch of excess tokens is cut into
  blocks of the run's period (one repetition of its unit: 1 token for ``w w w``, 3 for a
  three-token phrase). A stretch with no exact repeating unit (a cluster sequence; the digits of a
  column of close numbers, which SmolLM2 writes one token each) is left alone unless ``cluster``
  is set (then it is cut token by token: hiding digits changes the numbers the model reads, the
  finding of docs/fix.md); a stretch of at most ``hold`` excess tokens is left whole. A block is
  hidden from every query from the start of the next block of its stretch on; the stretch's last
  block is never hidden. So each query
  sees the run's first tokens and then the repetition it is in (after the run: the run's last
  repetition) whole: the run is shortened by whole repetitions, never cut inside one.
* **what the gate does**: hidden tokens are masked out of attention and do not advance the
  position counter (``pos(t) = t - #tokens hidden from t``). So every token sees exactly what it
  would see if the hidden tokens had been deleted from the input: the gated model on a prompt
  equals the plain model on :func:`collapse` of it at the prompt's last token (test: tiny models of
  every family); every token it generates sees its run shortened the same way.

On text with no excess token the hooks return without touching anything, so ordinary text is
bit-identical. Unlike the input-side collapse, the gate also collapses a run the model builds
itself while generating (a chat model asked to repeat a word writes the run), and it needs no
change to the prompt; like every hook patch it needs ``sinkhole.load_patched`` (plain
transformers loads the original model, and a GGUF cannot hold it); llama.cpp runs it through
:class:`sinkhole.decoding.engines.LlamaCpp`, which feeds llama.cpp the collapsed history each step.

The state check (``RunGate(confirm=...)``, a research variant that shortens a run only once the model's own
layer-0 state reads first-token-like) lives in :mod:`sinkhole.decoding.state_check`: it reads the state and hands
this module's functions the distances (``dist``); :func:`sinkhole.decoding.state_check.gate_hooks` attaches it.

Limits: hybrid models' linear-attention layers (Qwen3.5 Gated DeltaNet) cannot hide a token, so
there the gate compresses positions only; sliding-window layers count the window in raw tokens,
so on them the equivalence with ``collapse`` holds only while the run fits the window.
"""

from __future__ import annotations

import torch

from ..capture import past_length
from ..errors import SinkholeError
from .runs import NEVER, RunGate, excess
from .runs import expiry as _expiry
from .runs import run_period as _run_period
from .runs import stretches as _stretches


def _rows(ids) -> list[list[int]]:
    t = torch.as_tensor(ids)
    return (t.unsqueeze(0) if t.dim() == 1 else t).tolist()


def excess_mask(ids: torch.Tensor, gate: RunGate) -> torch.Tensor:
    """Boolean (B, n): which tokens of ``ids`` (B, n; -1 marks padding) are excess (:func:`runs.excess`)."""
    rows = _rows(ids)
    dev = ids.device if isinstance(ids, torch.Tensor) else None
    return torch.tensor([excess(r, gate) for r in rows], dtype=torch.bool, device=dev).reshape(len(rows), -1)


def run_period(ids, r0: int, most: int) -> int:
    """:func:`sinkhole.decoding.runs.run_period` of a tensor or list of ids."""
    return _run_period(_rows(ids)[0], r0, most)


def run_unit(row: torch.Tensor, r0: int, t: int, gate: RunGate) -> tuple:
    """The unit whose state at the start of a sequence token ``t`` of the stretch starting at ``r0`` is
    compared with: the last p tokens up to ``t`` (p: the run's period, 1 for a run with no exact unit)."""
    p = run_period(row, r0, gate.max_distinct) or 1
    return tuple(row[t - p + 1:t + 1].tolist())


def confirmed_at(d: torch.Tensor | None, r0: int, r1: int, gate: RunGate) -> int | None:
    """The state check on one stretch (tokens ``r0..r1``): the first token at which the mean of the
    distances ``d`` over the stretch's last ``span`` tokens is at most ``confirm``; None if there is none
    (or ``d`` is unknown there: NaN)."""
    if d is None or r1 - r0 + 1 < gate.span:
        return None
    x = d[r0:r1 + 1].double()
    x = torch.where(torch.isnan(x), torch.full_like(x, 1e9), x)
    c = torch.cat([x.new_zeros(1), x.cumsum(0)])
    mean = (c[gate.span:] - c[:-gate.span]) / gate.span  # window k covers r0+k .. r0+k+span-1
    hit = torch.nonzero(mean <= gate.confirm).flatten()
    return None if len(hit) == 0 else r0 + int(hit[0]) + gate.span - 1


def stretches(row) -> list[tuple[int, int]]:
    """(start, end) of every stretch of consecutive True in the boolean vector ``row``."""
    return _stretches(torch.as_tensor(row).tolist())


def expiry(ids: torch.Tensor, gate: RunGate, ex: torch.Tensor | None = None,
           dist: torch.Tensor | None = None) -> torch.Tensor:
    """Long (B, n): from which position on each token is hidden (``NEVER`` for tokens never hidden): the
    rule of :func:`sinkhole.decoding.runs.expiry` on every row.

    With the state check (``gate.confirm``), ``dist`` (B, n; NaN where unknown) holds each excess
    token's layer-0 distance to its unit's state at the start of a sequence (:class:`GateHooks`): a
    stretch is shortened only from the first of its blocks that starts after the token where it is
    confirmed (:func:`confirmed_at`), and a stretch with no exact unit is then cut token by token."""
    rows = _rows(ids)
    dev = ids.device if isinstance(ids, torch.Tensor) else None
    if dist is not None and dist.dim() == 1:
        dist = dist.unsqueeze(0)
    exs = [None] * len(rows) if ex is None else (ex.unsqueeze(0) if ex.dim() == 1 else ex).tolist()
    out = []
    for b, row in enumerate(rows):
        def confirm(r0, r1, b=b):
            return confirmed_at(None if dist is None else dist[b], r0, r1, gate)
        out.append(_expiry(row, gate, exs[b], confirm))
    return torch.tensor(out, dtype=torch.long, device=dev).reshape(len(rows), -1)


def hidden_mask(ids, gate: RunGate, dist: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean (B, n): which tokens of ``ids`` the gate hides from some later token (excess tokens
    of a stretch that passed ``hold``, except the stretch's last block). A gate with the state check
    needs its reading ``dist`` (:func:`sinkhole.decoding.state_check.read_state`)."""
    t = torch.as_tensor(ids, dtype=torch.long)
    return gate_expiry(t, gate, dist) < NEVER


def gate_expiry(ids: torch.Tensor, gate: RunGate, dist: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`expiry` of ``ids`` (B, n); a gate with the state check needs its reading ``dist``."""
    t = ids.unsqueeze(0) if ids.dim() == 1 else ids
    if gate.confirm is not None and dist is None and bool(excess_mask(t, gate).any()):
        raise SinkholeError("a run gate with the state check (confirm) needs the model to say what it hides "
                            "(read it with sinkhole.decoding.state_check.read_state)")
    return expiry(t, gate, dist=dist)


def hidden_before(exp: torch.Tensor) -> torch.Tensor:
    """Long (B, n): how many tokens before each position are hidden from it (its position shift)."""
    b, n = exp.shape
    cnt = torch.zeros(b, n + 1, dtype=torch.long, device=exp.device)
    fin = exp < n
    cnt.scatter_add_(1, torch.where(fin, exp, torch.full_like(exp, n)), fin.long())
    return cnt[:, :n].cumsum(1)


def collapse(ids, gate: RunGate, dist: torch.Tensor | None = None) -> list[int]:
    """The input-side baseline: ``ids`` without the tokens the gate hides from the end of the
    prompt (what a serving stack that shortens long runs, by whole repetitions, before the model
    sees them would send). A gate with the state check needs the state read
    (``dist``, :func:`sinkhole.decoding.state_check.read_state`)."""
    t = torch.as_tensor(list(ids), dtype=torch.long)
    keep = gate_expiry(t, gate, dist)[0] >= len(t)
    return t[keep].tolist()


class GateHooks:
    """The gate attached to a loaded model for the duration of a ``with`` block.

    A pre-hook on the module that takes ``input_ids`` keeps the token history of the current
    sequence (reset when a call starts at position 0, cut back when a cache was cropped), computes
    the excess tokens and replaces ``position_ids``; a pre-hook on every softmax-attention module
    adds the hidden keys to its attention mask. On a call with nothing to hide the hooks return
    without touching anything, so the call is bit-identical.

    ``check``: the state check's reader (:class:`sinkhole.decoding.state_check.StateCheck`; attach both with
    :func:`sinkhole.decoding.state_check.gate_hooks`), which keeps ``dist``, the distances the gate's rule reads
    when ``gate.confirm`` is set."""

    def __init__(self, lm, gate: RunGate, check=None):
        if gate.confirm is not None and check is None:
            raise SinkholeError("a run gate with the state check (confirm) reads the model's layer 0: attach it "
                                "with sinkhole.decoding.state_check.gate_hooks")
        self.lm, self.gate, self.check = lm, gate, check
        self.adapter = lm.adapter
        self._handles: list = []
        self.hist: torch.Tensor | None = None
        self.exp: torch.Tensor | None = None  # (B, n) expiry of every token of the history, or None
        self.q = 0  # how many of the history's tokens the current call brings
        self.dist: torch.Tensor | None = None  # (B, n) the state check's distances (NaN: not read)
        self.probing = False  # a probe pass of the state check runs: it passes its own positions and mask

    # --- the token history ----------------------------------------------------------------
    def _track(self, module, args, kwargs):
        if self.probing:
            return None
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
            ids = args[0]
        self.exp = None
        if not isinstance(ids, torch.Tensor):  # inputs_embeds: the tokens are unknown, nothing is gated
            self.hist = None
            return None
        q = ids.shape[1]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            past = mask.shape[1] - q
            new = torch.where(mask[:, -q:] > 0, ids, torch.full_like(ids, -1))
        else:
            past = past_length(kwargs)
            new = ids
        fresh = past == 0 or self.hist is None or self.hist.shape[0] != ids.shape[0] or self.hist.shape[1] < past
        if fresh:  # a new sequence (or history this gate never saw): start over from what is known
            prefix = torch.full((ids.shape[0], past), -1, dtype=ids.dtype, device=ids.device)
            self.hist = torch.cat([prefix, new], 1)
        else:
            self.hist = torch.cat([self.hist[:, :past], new], 1)
        ex = excess_mask(self.hist, self.gate)
        if self.check is not None:
            self.check.track(self, ex, past, q, fresh)
        exp = expiry(self.hist, self.gate, ex, self.dist) if bool(ex.any()) else None
        if exp is None or not bool((exp < NEVER).any()):
            return None  # nothing to gate: the call runs untouched (bit-identical)
        self.exp, self.q = exp, q
        real = self.hist >= 0
        pos = (real.long().cumsum(1) - 1 - hidden_before(exp)).clamp_min(0)
        kwargs = dict(kwargs)
        kwargs["position_ids"] = pos[:, -q:]
        if kwargs.get("attention_mask") is None:  # no packed-sequence guess from repeated position ids
            kwargs["attention_mask"] = torch.ones(self.hist.shape, dtype=torch.long, device=ids.device)
        return args, kwargs

    # --- the attention mask -----------------------------------------------------------------
    def _attn(self, module, args, kwargs):
        if self.exp is None or "attention_mask" not in kwargs:
            return None  # nothing to gate, or a module that takes its mask positionally (positions only)
        mask = kwargs["attention_mask"]
        q = self.q
        n = self.exp.shape[1]
        kv = n if mask is None else mask.shape[-1]
        exp = self.exp[:, -kv:] if kv <= n else torch.nn.functional.pad(self.exp, (kv - n, 0), value=NEVER)
        qpos = torch.arange(n - q, n, device=exp.device)  # query positions in the history
        hidden = exp[:, None, :] <= qpos[None, :, None]  # (B, q, kv)
        if not bool(hidden.any()):
            return None
        if mask is None:
            kpos = torch.arange(n - kv, n, device=exp.device)
            allowed = (kpos[None, :] <= qpos[:, None])[None, None].expand(exp.shape[0], 1, q, kv)
            new = allowed & ~hidden[:, None]
        elif mask.dtype == torch.bool:
            new = mask & ~hidden[:, None]
        else:
            new = mask.masked_fill(hidden[:, None], torch.finfo(mask.dtype).min)
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = new
        return args, kwargs

    # --- attach / detach --------------------------------------------------------------------
    def __enter__(self):
        base = self.adapter.base_model or self.lm.model
        try:
            if self.check is not None:
                self._handles.append(self.check.attach(self))
            self._handles.append(base.register_forward_pre_hook(self._track, with_kwargs=True))
            for i in self.adapter.attention_layers:
                self._handles.append(self.adapter.attn(i).register_forward_pre_hook(self._attn, with_kwargs=True))
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.hist = None
        self.exp = None
        self.dist = None
        if self.check is not None:
            self.check.ex = None
