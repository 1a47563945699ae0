"""A patch is data: JSON-serializable edits (and optionally new weights) that fix a model.

A :class:`Patch` holds

* ``ops``: activation edits (:class:`PatchOp`): a site (``neurons`` by default, or
  ``mlp_out`` / ``resid_post`` / ...), a layer, optional neuron indices, the real positions they
  act on (``nonfirst`` by default: the first token keeps its value so the normal attention sink
  survives) and a mode with its values:

  ============ =================================================================
  mode         effect on the selected activations
  ============ =================================================================
  ``zero``     set to 0 (the paper's variant A)
  ``set``      set to ``values`` (one per neuron, or one scalar)
  ``clamp``    clip into [``lo``, ``hi``] (the paper's variant B, "no-sink level")
  ``cap``      clip into [-``values``, ``values``]
  ``scale``    multiply by ``values``
  ``norm_cap`` rescale each position's vector so its L2 norm is at most ``values``
  ============ =================================================================

* ``weights``: optional replacement parameters (a fine-tuning patch), stored in a
  safetensors file beside the JSON (``weights_file``) and keyed by parameter name.
* ``gate``: an optional :class:`~sinkhole.decoding.gate.RunGate` (the run gate: tokens deep inside a
  long low-diversity run are hidden from attention and do not advance the position; ordinary
  text is untouched).

``Patch.save(path)`` / ``Patch.load(path)`` round-trip the JSON (and the weights file);
``patch.validate(lm)`` checks it against a model; ``apply_patch(lm, patch)`` applies it as hooks
(and swapped weights) inside a ``with`` block; ``attach_patch`` attaches it for good.
Positions are real positions (see :mod:`sinkhole.capture`), so a patch is correct for full
forward passes, KV-cache decoding and left-padded batches alike.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..capture import SITES, Edit, Hooks
from ..decoding.gate import RunGate
from ..decoding.state_check import gate_hooks
from ..errors import SinkholeError
from ..results import dumps, read_json_file, write_atomic

FORMAT = "sinkhole-patch"
FORMAT_VERSION = 1
MODES = ("zero", "set", "clamp", "cap", "scale", "norm_cap")
EDIT_SITES = tuple(s for s in SITES if s != "attn_pattern")


def _num_list(v):
    if v is None:
        return None
    if isinstance(v, torch.Tensor):
        v = v.detach().cpu().tolist()
    if isinstance(v, (list, tuple)):
        return [float(x) for x in v]
    return float(v)


@dataclass
class PatchOp:
    """One activation edit (see the module docstring)."""

    layer: int
    mode: str = "zero"
    neurons: list[int] | None = None
    site: str = "neurons"
    positions: Any = "nonfirst"
    values: Any = None
    lo: Any = None
    hi: Any = None

    def __post_init__(self):
        self.layer = int(self.layer)
        if self.neurons is not None:
            self.neurons = [int(n) for n in self.neurons]
        self.values, self.lo, self.hi = _num_list(self.values), _num_list(self.lo), _num_list(self.hi)
        if isinstance(self.positions, tuple):
            self.positions = list(self.positions)

    def check(self) -> None:
        if self.mode not in MODES:
            raise SinkholeError(f"patch op mode {self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if self.site not in EDIT_SITES:
            raise SinkholeError(f"patch op site {self.site!r} is unknown; use one of {', '.join(EDIT_SITES)}")
        pos = self.positions
        if not (pos in ("all", "first", "nonfirst") or isinstance(pos, int)
                or (isinstance(pos, list) and all(isinstance(p, int) for p in pos))):
            raise SinkholeError(f"patch op positions {pos!r} is invalid; use all, first, nonfirst or a list of ints")
        if self.mode in ("set", "cap", "scale", "norm_cap") and self.values is None:
            raise SinkholeError(f"patch op mode {self.mode!r} needs 'values'")
        if self.mode == "clamp" and self.lo is None and self.hi is None:
            raise SinkholeError("patch op mode 'clamp' needs 'lo' and/or 'hi'")
        if self.mode == "norm_cap" and isinstance(self.values, list):
            raise SinkholeError("patch op mode 'norm_cap' takes one scalar value (the largest allowed norm)")
        n = len(self.neurons) if self.neurons is not None else None
        for key in ("values", "lo", "hi"):
            v = getattr(self, key)
            if isinstance(v, list) and n is not None and len(v) not in (1, n):
                raise SinkholeError(f"patch op at layer {self.layer}: {key} has {len(v)} entries for {n} neurons")

    def to_edit(self) -> Edit:
        pos = self.positions
        if self.mode == "norm_cap":
            cap = float(self.values)

            def fn(x, cap=cap):
                norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                return x * torch.clamp(cap / norm, max=1.0)

            return Edit(self.site, self.layer, self.neurons, pos, op="fn", fn=fn)
        op = {"zero": "zero", "set": "set", "clamp": "clamp", "cap": "cap", "scale": "scale"}[self.mode]
        return Edit(self.site, self.layer, self.neurons, pos, op=op, value=self.values, lo=self.lo, hi=self.hi)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if v is not None}

    def describe(self) -> str:
        what = f"{len(self.neurons)} neuron(s) {self.neurons[:6]}{'...' if len(self.neurons) > 6 else ''}" \
            if self.neurons is not None else "all units"
        return f"{self.mode} {self.site} L{self.layer} {what} at {self.positions} positions"


@dataclass
class Patch:
    """A fix for one model: activation ops and/or replacement weights, plus provenance."""

    ops: list[PatchOp] = field(default_factory=list)
    name: str = "patch"
    model: dict = field(default_factory=dict)  # name, family, n_layers, d_model, d_mlp of the target
    notes: str = ""
    meta: dict = field(default_factory=dict)  # how it was found, measured effect ...
    weights: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    gate: Any = None  # a RunGate, or None

    # --- description ------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """``weights``, ``activation``, ``gate`` or a ``+``-joined mix of them."""
        parts = [name for name, on in (("weights", self.weights), ("activation", self.ops), ("gate", self.gate)) if on]
        return "+".join(parts) if parts else "activation"

    @property
    def weights_only(self) -> bool:
        return bool(self.weights) and not self.ops and self.gate is None

    def describe(self) -> str:
        parts = [op.describe() for op in self.ops]
        if self.gate is not None:
            parts.append(self.gate.describe())
        if self.weights:
            n = sum(int(t.numel()) for t in self.weights.values())
            trained = self.meta.get("trained_numbers")
            parts.append(f"new weights for {len(self.weights)} tensor(s) ("
                         + (f"{trained:,} of {n:,} numbers trained)" if trained and trained < n else f"{n:,} numbers)"))
        return "; ".join(parts) if parts else "empty patch (no change)"

    def n_numbers(self) -> int:
        """Size of the patch: neurons edited plus weights changed (the trained entries where the
        fine-tune masked the rest, else every number of the replaced tensors)."""
        n = sum(len(op.neurons) if op.neurons is not None else 1 for op in self.ops)
        if self.weights:
            n += int(self.meta.get("trained_numbers") or sum(int(t.numel()) for t in self.weights.values()))
        return n

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "kind": self.kind,
            "model": self.model,
            "ops": [op.to_dict() for op in self.ops],
            "weights": sorted(self.weights) if self.weights else [],
            **({"gate": self.gate.to_dict()} if self.gate is not None else {}),
            "notes": self.notes,
            "meta": self.meta,
        }

    # --- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the JSON (and ``<stem>.safetensors`` beside it when the patch has weights)."""
        path = Path(path)
        if path.suffix != ".json":
            raise SinkholeError(f"a patch file must end in .json (got {path.name})")
        path.parent.mkdir(parents=True, exist_ok=True)
        d = self.to_dict()
        if self.weights:
            from safetensors.torch import save_file

            wpath = path.with_suffix(".safetensors")
            tmp = wpath.with_name("." + wpath.name + ".tmp")
            save_file({k: v.detach().to("cpu").contiguous() for k, v in self.weights.items()}, str(tmp))
            tmp.replace(wpath)
            d["weights_file"] = wpath.name
        write_atomic(path, dumps(d))
        return path

    @classmethod
    def from_dict(cls, d: dict, base: Path | None = None) -> "Patch":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise SinkholeError("not a sinkhole patch file (no 'format': 'sinkhole-patch'); "
                                "create one with 'sinkhole patch --out DIR'")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise SinkholeError(f"patch format version {d.get('format_version')} is newer than this sinkhole reads "
                                f"({FORMAT_VERSION}); upgrade sinkhole")
        try:
            ops = [PatchOp(**op) for op in d.get("ops", [])]
        except (TypeError, ValueError) as err:
            raise SinkholeError(f"invalid patch op in patch file: {err}") from None
        for op in ops:
            op.check()
        gate = None
        if d.get("gate") is not None:
            gate = RunGate.from_dict(d["gate"])
        weights = None
        if d.get("weights_file"):
            wpath = (base or Path(".")) / d["weights_file"]
            if not wpath.exists():
                raise SinkholeError(f"the patch's weights file {wpath} is missing; copy it beside the patch JSON")
            from safetensors.torch import load_file

            try:
                weights = load_file(str(wpath))
            except Exception as err:  # safetensors raises several kinds
                raise SinkholeError(f"the patch's weights file {wpath} is unreadable ({err})") from None
            missing = set(d.get("weights", [])) - set(weights)
            if missing:
                raise SinkholeError(f"the patch's weights file {wpath} lacks {sorted(missing)[:3]}")
        return cls(ops=ops, name=d.get("name", "patch"), model=d.get("model", {}), notes=d.get("notes", ""),
                   meta=d.get("meta", {}), weights=weights, gate=gate)

    @classmethod
    def load(cls, path: str | Path) -> "Patch":
        path, d = read_json_file(path, "patch.json",
                                 missing="patch file {path} not found; pass the patch.json written by 'sinkhole patch'",
                                 invalid="patch file {path} is not valid JSON ({err})")
        return cls.from_dict(d, base=path.parent)

    # --- checks -----------------------------------------------------------------------------
    def applied(self, lm, validate: bool = True):
        """This patch on ``lm`` for the duration of a ``with`` block (:func:`apply_patch`): the one way
        lower layers (text metrics, decoding) hold a patch without importing this package."""
        return apply_patch(lm, self, validate=validate)

    def validate(self, lm) -> None:
        """Raise a SinkholeError if the patch does not fit ``lm`` (layers, neurons, weights)."""
        ad = lm.adapter
        for key, have in (("family", ad.family), ("n_layers", ad.n_layers), ("d_model", ad.d_model),
                          ("d_mlp", ad.d_mlp)):
            want = self.model.get(key)
            if want is not None and want != have:
                raise SinkholeError(f"this patch was made for a model with {key}={want}, but the loaded model has "
                                    f"{key}={have}; use the model the patch was made for")
        for op in self.ops:
            op.check()
            if not 0 <= op.layer < ad.n_layers:
                raise SinkholeError(f"patch op layer {op.layer} is out of range: the model has layers "
                                    f"0..{ad.n_layers - 1}")
            if op.neurons is not None:
                width = ad.d_mlp if op.site == "neurons" else ad.d_model
                bad = [n for n in op.neurons if not 0 <= n < width]
                if bad:
                    raise SinkholeError(f"patch op at layer {op.layer} names unit(s) {bad[:5]} outside 0..{width - 1}")
        if self.weights:
            params = dict(lm.model.named_parameters())
            for k, v in self.weights.items():
                if k not in params:
                    raise SinkholeError(f"the patch replaces parameter {k!r}, which this model does not have")
                if tuple(params[k].shape) != tuple(v.shape):
                    raise SinkholeError(f"the patch's {k} has shape {tuple(v.shape)}, the model's has "
                                        f"{tuple(params[k].shape)}")


def model_signature(lm) -> dict:
    ad = lm.adapter
    return {"name": lm.name, "family": ad.family, "n_layers": ad.n_layers, "d_model": ad.d_model, "d_mlp": ad.d_mlp}


# ------------------------------------------------------------------------------------------
def swap_weights(lm, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy ``weights`` into the model in place; return the old values."""
    params = dict(lm.model.named_parameters())
    old = {}
    with torch.no_grad():
        for k, v in weights.items():
            p = params[k]
            old[k] = p.detach().clone()
            p.copy_(v.to(device=p.device, dtype=p.dtype))
    return old


def patch_hooks(lm, patch: Patch) -> Hooks:
    """A :class:`~sinkhole.capture.Hooks` holding the patch's activation edits (not yet attached)."""
    h = Hooks(lm, check_finite=False)
    for op in patch.ops:
        h.edit(op.to_edit())
    return h


@contextlib.contextmanager
def apply_patch(lm, patch: Patch | None, validate: bool = True):
    """Apply ``patch`` to ``lm`` for the duration of a ``with`` block (weights restored, hooks
    removed on exit, also after an exception). Works for forward passes and ``generate``.
    ``patch=None`` applies nothing (handy for before/after loops)."""
    if patch is None:
        yield lm
        return
    if validate:
        patch.validate(lm)
    old = swap_weights(lm, patch.weights) if patch.weights else None
    h = patch_hooks(lm, patch)
    try:
        with h, _gate_hooks(lm, patch):
            yield lm
    finally:
        if old:
            swap_weights(lm, old)


def attach_patch(lm, patch: Patch, validate: bool = True):
    """Apply ``patch`` to ``lm`` for good (weights written, hooks kept attached).
    Returns the attached :class:`Hooks` (call ``.remove()`` to take the hooks off)."""
    if validate:
        patch.validate(lm)
    if patch.weights:
        swap_weights(lm, patch.weights)
    h = patch_hooks(lm, patch)
    h.__enter__()
    if patch.gate is not None:
        g = _gate_hooks(lm, patch)
        g.__enter__()
        h._handles.extend(g._handles)  # h.remove() takes the gate off too
    lm.patch = patch
    lm.patch_hooks = h
    return h


def _gate_hooks(lm, patch: Patch):
    """The patch's run gate as a context manager (a no-op without a gate)."""
    if patch.gate is None:
        return contextlib.nullcontext()
    if patch.gate.confirm is not None and patch.ops:
        # the state check reads layer 0 by a probe pass, which would also move the ops' position tracking
        raise SinkholeError("a run gate with the state check (confirm) cannot be combined with activation ops; "
                            "ship it as a gate-only patch")
    return gate_hooks(lm, patch.gate)


def llamacpp_gate(patch, patched_gguf: bool = False, what: str = "the patch"):
    """What llama.cpp runs of ``patch``: its run gate (None for no patch or no gate). llama.cpp
    cannot run hooks, so a patch with activation edits is refused, and one with weights too unless
    its patched GGUF is what llama.cpp loads (``patched_gguf``)."""
    if patch is None:
        return None
    if patch.ops or (patch.weights and not patched_gguf):
        raise SinkholeError(f"{what} changes weights or hooks that llama.cpp cannot run; run its patched GGUF "
                            "instead (sinkhole experimental search --gguf writes one)")
    return patch.gate
