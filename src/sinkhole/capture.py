"""The hook engine: read, replace, scale or clamp any site, and stop the forward pass early.

Sites (0-based layer ``L``):

=============== ============================================================ ==============
site            tensor                                                       shape
=============== ============================================================ ==============
``resid_pre``   residual stream entering block L                             (B, T, d_model)
``resid_post``  residual stream leaving block L                              (B, T, d_model)
``attn_out``    attention branch's write into the residual stream            (B, T, d_model)
``mlp_out``     MLP branch's write into the residual stream                  (B, T, d_model)
``neurons``     MLP neuron activations (input of the output projection)      (B, T, d_mlp)
``attn_pattern`` attention weights (read only; needs eager attention)        (B, H, T, T_k)
``attn_first``  attention weight on the real first token (read only; fused,  (B, H, T)
                no T x T pattern built when no attn_pattern is read; see attn_first.py)
=============== ============================================================ ==============

Positions are *real* positions: position 0 is the first non-padding token of each row, even
with left padding, and a KV-cache decoding step's new token has its true position (never 0
after the first step). Padding positions are -1 and are never edited.

Everything attaches inside a ``with Hooks(lm) as h:`` block and is removed on exit, also
after an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .attn_first import first_column, switch_off, switch_on
from .errors import NumericalError
from .models.adapters import get_adapter

SITES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "neurons", "attn_pattern")
READ_SITES = SITES + ("attn_first",)  # attn_first: read only, see attn_first.py


class StopForward(Exception):
    """Raised by a hook to stop the forward pass after the last layer needed."""


PosSpec = Any  # "all" | "first" | "nonfirst" | int | Sequence[int] | slice


@dataclass
class Edit:
    """One intervention on a site.

    ``op`` is one of ``zero``, ``set`` (to ``value``), ``add``, ``scale`` (multiply by
    ``value``), ``clamp`` (to [``lo``, ``hi``]), ``cap`` (``|x| <= value``) or ``fn``
    (``fn(x) -> x`` on the selected slice). ``value`` may be a scalar or one value per
    selected neuron. ``positions`` selects real positions: ``"all"``, ``"first"``,
    ``"nonfirst"``, an int, a list of ints or a slice.
    """

    site: str
    layer: int
    neurons: Sequence[int] | None = None
    positions: PosSpec = "all"
    op: str = "zero"
    value: Any = None
    lo: Any = None
    hi: Any = None
    fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    def apply(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        flat = _is_flat(x, pos)
        if flat:  # OPT computes its MLP on (B*T, D)
            return self.apply(x.view(*pos.shape, x.shape[-1]), pos).view(x.shape)
        idx = None if self.neurons is None else torch.as_tensor(list(self.neurons), device=x.device, dtype=torch.long)
        sub = x if idx is None else x.index_select(-1, idx)
        new = _apply_op(self, sub)
        mask = position_mask(self.positions, pos, x.shape[:-1], x.device)
        if mask is not None:
            new = torch.where(mask.unsqueeze(-1), new, sub)
        if idx is None:
            return new
        out = x.clone()
        out[..., idx] = new
        return out


def _is_flat(x: torch.Tensor, pos: torch.Tensor | None) -> bool:
    return pos is not None and x.dim() == 2 and pos.dim() == 2 and x.shape[0] == pos.numel()


def _val(v, like: torch.Tensor):
    if v is None:
        return None
    return torch.as_tensor(v, dtype=like.dtype, device=like.device)


def _apply_op(e: Edit, sub: torch.Tensor) -> torch.Tensor:
    op = e.op
    if op == "zero":
        return torch.zeros_like(sub)
    if op == "set":
        return torch.zeros_like(sub) + _val(e.value, sub)
    if op == "add":
        return sub + _val(e.value, sub)
    if op == "scale":
        return sub * _val(e.value, sub)
    if op == "clamp":
        lo, hi = _val(e.lo, sub), _val(e.hi, sub)
        out = sub
        if lo is not None:
            out = torch.maximum(out, lo.expand_as(out))
        if hi is not None:
            out = torch.minimum(out, hi.expand_as(out))
        return out
    if op == "cap":
        v = _val(e.value, sub).abs()
        return torch.maximum(torch.minimum(sub, v.expand_as(sub)), (-v).expand_as(sub))
    if op == "fn":
        return e.fn(sub)
    raise ValueError(f"unknown edit op {op!r}; use zero, set, add, scale, clamp, cap or fn")


def position_mask(spec: PosSpec, pos: torch.Tensor | None, shape, device) -> torch.Tensor | None:
    """Boolean mask (B, T) of the real positions selected by ``spec``; None means all."""
    if pos is None:
        pos = torch.arange(shape[-1], device=device).expand(*shape)
    elif tuple(pos.shape) != tuple(shape):
        raise RuntimeError(f"the positions of this forward call ({tuple(pos.shape)}) do not match the edited "
                           f"tensor ({tuple(shape)}); call the model (or its base model) inside the Hooks block")
    valid = pos >= 0
    if spec is None or (isinstance(spec, str) and spec == "all"):
        return valid
    if isinstance(spec, str):
        if spec == "first":
            return pos == 0
        if spec == "nonfirst":
            return pos > 0
        raise ValueError(f"unknown positions {spec!r}; use all, first, nonfirst or indices")
    if isinstance(spec, slice):
        start = spec.start or 0
        stop = spec.stop if spec.stop is not None else torch.iinfo(torch.long).max
        m = (pos >= start) & (pos < stop)
        if spec.step not in (None, 1):
            m &= (pos - start) % spec.step == 0
        return m & valid
    if isinstance(spec, int):
        return (pos == spec) & valid
    wanted = torch.as_tensor(list(spec), device=pos.device, dtype=pos.dtype)
    return torch.isin(pos, wanted) & valid


def real_positions(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """Real positions (B, T) of the tokens of one forward call; -1 marks padding."""
    ids = kwargs.get("input_ids")
    if ids is None and args:
        ids = args[0]
    emb = kwargs.get("inputs_embeds")
    ref = ids if isinstance(ids, torch.Tensor) else emb
    if ref is None:
        return None
    bsz, q = ref.shape[0], ref.shape[1]
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[-1] >= q:
        m = mask.to(torch.long)
        pos = (m.cumsum(-1) - 1)[:, -q:]
        return torch.where(m[:, -q:] > 0, pos, torch.full_like(pos, -1))
    return (torch.arange(q, device=ref.device) + past_length(kwargs)).expand(bsz, q)


def past_length(kwargs: dict) -> int:
    """How many tokens a forward call's KV cache already holds (0 without one), read from the cache
    (``past_key_values``, or ``cache`` in transformers >= 5.2x) or from ``cache_position``."""
    cache = kwargs.get("past_key_values", kwargs.get("cache"))
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    if isinstance(kwargs.get("cache_position"), torch.Tensor):
        return int(kwargs["cache_position"][0])
    return 0


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, new):
    if isinstance(out, tuple):
        return (new,) + tuple(out[1:])
    return new


@dataclass
class _Read:
    name: str
    site: str
    layer: int
    reduce: Callable | None
    accumulate: bool


class Hooks:
    """Context manager that attaches reads, edits and an early stop to a model.

    >>> with Hooks(lm) as h:
    ...     h.read("resid_post", 3)
    ...     h.edit(Edit("neurons", 1, neurons=[42], positions="nonfirst", op="zero"))
    ...     h.stop_after(3)
    ...     h.forward(input_ids)
    >>> h.cache["resid_post.3"]
    """

    def __init__(self, lm, adapter=None, check_finite: bool = True):
        self.model = getattr(lm, "model", lm)
        self.adapter = adapter or getattr(lm, "adapter", None)
        if self.adapter is None:
            self.adapter = get_adapter(self.model)
        self.check_finite = check_finite
        self.cache: dict[str, Any] = {}
        self._reads: list[_Read] = []
        self._edits: list[Edit] = []
        self._stop: int | None = None
        self._handles: list = []
        self._active = False
        self._in_top = False
        self.pos: torch.Tensor | None = None
        self._attn_undo: list = []

    # --- declaration ------------------------------------------------------------------------
    def read(self, site: str, layer: int, reduce: Callable | None = None, name: str | None = None,
             accumulate: bool = False) -> str:
        """Record ``site`` at ``layer`` (optionally reduced by ``reduce(tensor, pos)``)."""
        self._check_site(site, layer)
        name = name or f"{site}.{layer}"
        self._reads.append(_Read(name, site, layer, reduce, accumulate))
        if self._active:
            self._attach_read(self._reads[-1])
        return name

    def edit(self, e: Edit) -> None:
        if e.site in ("attn_pattern", "attn_first"):
            raise ValueError(f"{e.site} can be read but not edited")
        self._check_site(e.site, e.layer)
        self._edits.append(e)
        if self._active:  # re-attach everything: edits first, whatever order they were declared in
            self.remove()
            self.__enter__()

    def stop_after(self, layer: int) -> None:
        self._check_site("resid_post", layer)
        self._stop = layer
        if self._active:
            self._attach_stop()

    def _check_site(self, site: str, layer: int) -> None:
        if site not in READ_SITES:
            raise ValueError(f"unknown site {site!r}; sites are {', '.join(READ_SITES)}")
        n = self.adapter.n_layers
        if not (0 <= int(layer) < n):
            raise ValueError(f"layer {layer} is out of range: the model has layers 0..{n - 1}")
        if site in ("attn_pattern", "attn_first"):
            self.adapter.module_for("attn_pattern", int(layer))  # a linear-attention layer: one-line error

    # --- running ----------------------------------------------------------------------------
    def forward(self, input_ids=None, **kwargs):
        """Run the model; returns its output, or None if the pass was stopped early."""
        try:
            return self.model(input_ids=input_ids, **kwargs)
        except StopForward:
            return None

    # --- attach / detach --------------------------------------------------------------------
    def __enter__(self):
        self._active = True
        try:
            # Positions come from the outermost call: the top model's (logits) forward, or the base
            # model (the module holding the blocks) when an analysis calls it directly.
            self._handles.append(self.model.register_forward_pre_hook(self._track_top, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._leave_top, always_call=True))
            base = getattr(self.adapter, "base_model", None)
            if base is not None and base is not self.model:
                self._handles.append(base.register_forward_pre_hook(self._track_base, with_kwargs=True))
            for e in self._edits:  # edits first, so reads see edited values
                self._attach_edit(e)
            for r in self._reads:
                self._attach_read(r)
            if self._stop is not None:
                self._attach_stop()
            self._switch_attention()
        except BaseException:  # __exit__ does not run when __enter__ fails: detach here
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
        self._in_top = False
        if self._attn_undo:
            switch_off(self._attn_undo)
            self._attn_undo = []
        self._active = False

    def _switch_attention(self):
        """attn_first reads without attn_pattern reads: fused attention, no T x T pattern."""
        sites = {r.site for r in self._reads}
        if "attn_first" in sites and "attn_pattern" not in sites:
            mods = [self.adapter.attn(r.layer) for r in self._reads if r.site == "attn_first"]
            self._attn_undo = switch_on(self.model, mods)

    def _track_top(self, module, args, kwargs):
        self._in_top = True
        self.pos = real_positions(args, kwargs)

    def _leave_top(self, module, args, out):
        self._in_top = False

    def _track_base(self, module, args, kwargs):
        if not self._in_top:
            self.pos = real_positions(args, kwargs)

    def _attach_stop(self):
        layer = self.adapter.layer(self._stop)

        def hook(mod, args, out):
            raise StopForward()

        self._handles.append(layer.register_forward_hook(hook))

    def _store(self, r: _Read, x: torch.Tensor):
        if self.check_finite and x.is_floating_point() and not torch.isfinite(x).all():
            raise NumericalError(
                f"non-finite values (NaN/inf) in {r.site} at layer {r.layer}; "
                "the model overflowed in this dtype: rerun with --dtype float32"
            )
        if _is_flat(x, self.pos):
            x = x.view(*self.pos.shape, x.shape[-1])
        val = r.reduce(x, self.pos) if r.reduce is not None else x.detach()
        if r.accumulate:
            self.cache.setdefault(r.name, []).append(val)
        else:
            self.cache[r.name] = val

    def _attach_read(self, r: _Read):
        if r.site == "attn_first":
            def fhook(m, a, out):
                w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
                if w is None:
                    raise RuntimeError("attention weights are not available: load the model with "
                                       "attn_implementation='eager'")
                self._store(r, first_column(w, self.pos))
            self._handles.append(self.adapter.module_for("attn_pattern", r.layer).register_forward_hook(fhook))
            return
        site, mod = r.site, self.adapter.module_for(r.site, r.layer)
        if site == "neurons":
            h = mod.register_forward_pre_hook(lambda m, a: self._store(r, a[0]))
        elif site == "resid_pre":
            def pre(m, args, kwargs):
                x = args[0] if args else kwargs.get("hidden_states")
                self._store(r, x)
            h = mod.register_forward_pre_hook(pre, with_kwargs=True)
        elif site == "attn_pattern":
            def ahook(m, a, out):
                w = out[1] if isinstance(out, tuple) and len(out) > 1 else None
                if w is None:
                    raise RuntimeError("attention weights are not available: load the model with "
                                       "attn_implementation='eager'")
                self._store(r, w)
            h = mod.register_forward_hook(ahook)
        else:
            h = mod.register_forward_hook(lambda m, a, out: self._store(r, _first(out)))
        self._handles.append(h)

    def _attach_edit(self, e: Edit):
        mod = self.adapter.module_for(e.site, e.layer)
        if e.site == "neurons":
            def pre(m, args):
                return (e.apply(args[0], self.pos),) + tuple(args[1:])
            h = mod.register_forward_pre_hook(pre)
        elif e.site == "resid_pre":
            def pre_kw(m, args, kwargs):
                if args:
                    return (e.apply(args[0], self.pos),) + tuple(args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = e.apply(kwargs["hidden_states"], self.pos)
                return args, kwargs
            h = mod.register_forward_pre_hook(pre_kw, with_kwargs=True)
        else:
            def post(m, a, out):
                return _replace_first(out, e.apply(_first(out), self.pos))
            h = mod.register_forward_hook(post)
        self._handles.append(h)


def run(lm, input_ids, reads: Sequence[tuple] = (), edits: Sequence[Edit] = (), stop_after: int | None = None,
        attention_mask=None, check_finite: bool = True) -> dict:
    """One forward pass with reads and edits; returns the cache dict (plus ``logits`` if the
    pass ran to the end). ``reads`` holds ``(site, layer)`` or ``(site, layer, reduce)``."""
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    device = next(getattr(lm, "model", lm).parameters()).device
    input_ids = input_ids.to(device)
    kw = {}
    if attention_mask is not None:
        kw["attention_mask"] = torch.as_tensor(attention_mask).to(device)
    h = Hooks(lm, check_finite=check_finite)
    for r in reads:
        h.read(*r)
    for e in edits:
        h.edit(e)
    if stop_after is not None:
        h.stop_after(stop_after)
    with torch.no_grad(), h:
        out = h.forward(input_ids, use_cache=False, **kw)
    cache = dict(h.cache)
    if out is not None:
        cache["logits"] = out.logits
    return cache
