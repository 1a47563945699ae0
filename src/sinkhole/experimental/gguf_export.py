"""Write a weights-only patched model as a GGUF that llama.cpp loads.

The source GGUF's metadata (architecture, tokenizer, chat template, everything) is copied, and every
tensor the patch did not change is copied byte for byte in its original quantization. The changed
MLP tensors (a fine-tuning patch's ``gate_proj``/``up_proj``/``down_proj`` of some layers) are
written in ``tensor_type``:

* ``F32`` (default) or ``F16``: the patched weights as they are (F16 rounds them);
* ``Q8_0``: 8-bit blocks, about a quarter of F32;
* ``source``: the source tensor's own type where the ``gguf`` library can write it (Q4_1 for
  SmolLM2). A fine-tuning patch's change can be smaller than one quantization step, so this may
  lose the fix: measure it (docs/experimental.md) before shipping it.

A source type the library cannot write (k-quants such as Gemma-3-270M's Q4_K_M) is refused for
``source`` with the nearest writable type named.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ..decoding.engines import gguf_of
from ..errors import SinkholeError

TENSOR_TYPES = ("F32", "F16", "Q8_0", "source")
_MLP = {"gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
_HF = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$")
WRITABLE = ("F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def gguf_name(hf_name: str) -> str | None:
    """The GGUF tensor name of a Llama/Gemma-style MLP weight (``blk.N.ffn_*.weight``), else None."""
    m = _HF.match(hf_name)
    return f"blk.{m.group(1)}.{_MLP[m.group(2)]}.weight" if m else None


def gguf_weights(weights: dict, who: str) -> dict[str, np.ndarray]:
    """``weights`` (Hugging Face names -> tensors) as float32 arrays under their GGUF names; a tensor the writer
    cannot map is refused in one line (``who``: what changed it, e.g. "the patch changes")."""
    out = {}
    for name, w in weights.items():
        g = gguf_name(name)
        if g is None:
            raise SinkholeError(f"{who} {name}, which the GGUF writer does not map yet: only MLP "
                                "gate/up/down weights of Llama/Gemma-style models can be written")
        out[g] = w.detach().float().cpu().numpy().astype(np.float32)
    return out


def write_patched_gguf(source: str | os.PathLike, changed: dict[str, np.ndarray], out: str | os.PathLike,
                       tensor_type: str = "F32", arch: str | None = None, extra_kv: dict | None = None,
                       added: dict[str, np.ndarray] | None = None, retype: str | None = None) -> dict:
    """Copy ``source`` to ``out`` with the ``changed`` tensors replaced (module docstring).

    ``arch``: write the model as this architecture instead (its ``<arch>.*`` keys renamed); ``extra_kv``:
    more ``<arch>.*`` keys, ``{name: (value, GGUFValueType, sub_type or None)}``; ``added``: new tensors,
    written in F32 (one-dimensional tensors such as attention sinks; llama-quantize keeps those F32); ``retype``
    (``F16`` or ``Q8_0``): every other matrix is rewritten in that type from its dequantized values instead of
    copied (one-dimensional tensors stay as they are)."""
    import gguf
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    if retype not in (None, "F16", "Q8_0"):
        raise SinkholeError(f"cannot rewrite a whole GGUF as {retype!r}; use F16 or Q8_0")
    if tensor_type not in TENSOR_TYPES:
        raise SinkholeError(f"unknown GGUF tensor type {tensor_type!r}; use one of {', '.join(TENSOR_TYPES)}")
    out = Path(out)
    if out.suffix.lower() != ".gguf":
        raise SinkholeError("the patched GGUF path must end in .gguf")
    reader = GGUFReader(str(source))
    src_arch = reader.fields["general.architecture"].contents()
    arch = arch or src_arch
    names = {t.name for t in reader.tensors}
    missing = sorted(set(changed) - names)
    if missing:
        raise SinkholeError(f"the source GGUF has no tensor {missing[0]}; is it the model the patch was made for?")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    writer = GGUFWriter(str(tmp), arch=arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        if key.startswith(src_arch + "."):
            key = arch + key[len(src_arch):]
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    for key, (value, vtype, sub) in (extra_kv or {}).items():
        writer.add_key_value(f"{arch}.{key}", value, vtype, sub_type=sub)
    report = {"copied": 0, "patched": {}, "retyped": {}, "added": sorted(added or {}), "bytes_source": 0,
              "bytes_out": 0}
    for t in reader.tensors:
        report["bytes_source"] += int(t.n_bytes)
        if t.name not in changed and (retype is None or len(t.shape) < 2 or t.tensor_type.name == retype):
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
            report["copied"] += 1
            report["bytes_out"] += int(t.n_bytes)
            continue
        if t.name in changed:
            data = changed[t.name]
            want = t.tensor_type.name if tensor_type == "source" else tensor_type
        else:
            data, want = gguf.quants.dequantize(t.data, t.tensor_type), retype
        if want not in WRITABLE:
            raise SinkholeError(f"the gguf library cannot write {want} (the source's type of {t.name}); "
                                "use --gguf-type Q8_0 (the nearest it can), F16 or F32")
        qtype = gguf.GGMLQuantizationType[want]
        if want == "F32":
            arr = data.astype(np.float32)
        elif want == "F16":
            arr = data.astype(np.float16)
        else:
            arr = gguf.quants.quantize(data.astype(np.float32), qtype)
        writer.add_tensor(t.name, arr, raw_dtype=qtype)
        report["patched" if t.name in changed else "retyped"][t.name] = want
        report["bytes_out"] += int(arr.nbytes)
    for name, data in (added or {}).items():
        arr = np.ascontiguousarray(data, dtype=np.float32)
        writer.add_tensor(name, arr, raw_dtype=gguf.GGMLQuantizationType.F32)
        report["bytes_out"] += int(arr.nbytes)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return report


def patch_to_gguf(lm, patch, out: str | os.PathLike, tensor_type: str = "F32") -> dict:
    """The weights of ``patch`` (a fine-tuning patch) written into a copy of the GGUF ``lm`` was loaded
    from. A patch that acts through hooks cannot live in a GGUF and is refused."""
    source = gguf_of(lm)
    if patch.ops or patch.gate is not None:
        raise SinkholeError("this patch edits activations through hooks, which a GGUF file cannot hold; only a "
                            "weight patch (the fine-tuning families) can be written with --gguf (a run gate runs "
                            "in llama.cpp with --engine llama.cpp --patch DIR)")
    if not patch.weights:
        raise SinkholeError("the patch has no weights to write")
    return write_patched_gguf(source, gguf_weights(patch.weights, "the patch changes"), out, tensor_type)
