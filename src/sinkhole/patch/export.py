"""Export a patched model to a folder and load it back.

``DIR`` after :func:`export_patched`:

* ``config.json`` + ``model.safetensors`` (``save_pretrained`` layout) and the tokenizer files:
  the model **with the patch's weights written in** (a fine-tuning patch), so plain
  ``transformers.AutoModelForCausalLM.from_pretrained(DIR)`` loads the fixed model without
  sinkhole. Activation ops (position-gated clamps) cannot be written into weights: for them the
  saved weights are the original ones and only :func:`load_patched` re-attaches the ops.
* ``patch.json``: the patch (its weights already live in the model files);
* ``summary.json`` and ``SUMMARY.md``: the before/after measurements, if given.

:func:`load_patched` loads ``DIR`` with sinkhole and attaches the activation ops as hooks, so
forward passes and ``generate`` behave as the in-memory patched model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import SinkholeError
from ..models.loading import from_pretrained_model, load_model, quiet_hf
from ..results import dumps, write_atomic
from .core import Patch, attach_patch, swap_weights

README = """# Patched model (sinkhole)

Patch: {describe}

Kind: **{kind}**.
{how}
Reload with sinkhole (all of the patch):

    import sinkhole
    lm = sinkhole.load_patched("{dir}")

"""


def _how(patch: Patch) -> str:
    if patch.weights_only:
        return ("The fix is in the weights: plain `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads the "
                "patched model without sinkhole; every behavior of the patch is preserved.\n")
    if patch.weights:
        return ("The weight part of the fix is in the saved weights (plain transformers loads it); the hook part "
                "in patch.json (position-gated edits, the run gate) applies only through `sinkhole.load_patched`.\n")
    if patch.gate is not None:
        return ("The fix is **the run gate** in patch.json: tokens deep inside a long run of one token or a short unit "
                "are hidden from attention and positions are renumbered, so the model reads the run as a short one; "
                "ordinary text is bit-identical. It stops exact runs down to the model's own 16-repetition floor; it "
                "leaves runs broken by a different token at random gaps (filler words, random separators). The saved "
                "weights are the ORIGINAL model's: plain transformers loads the unpatched model. Run the gate with "
                "`sinkhole.load_patched` (transformers) or `sinkhole diverge MODEL.gguf --engine llama.cpp --patch "
                "DIR` (llama.cpp through llama-cpp-python).\n")
    return ("The saved weights are the ORIGINAL model's: plain transformers loads the unpatched model. The fix is the "
            "activation ops in patch.json (position-gated edits), attached by `sinkhole.load_patched`.\n")


def export_patched(lm, patch: Patch, out: str | os.PathLike, summary: dict | None = None,
                   summary_md: str | None = None) -> Path:
    """Write the patched model, patch.json and the summary to ``out`` (atomically: a temp
    folder renamed into place)."""
    patch.validate(lm)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SinkholeError(f"--out {out} exists and is not a folder; choose a folder path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    old = None
    try:
        if patch.weights:
            old = swap_weights(lm, patch.weights)

        try:
            with quiet_hf():
                lm.model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if old:
                swap_weights(lm, old)
        if hasattr(lm.tokenizer, "save_pretrained"):
            with quiet_hf():
                lm.tokenizer.save_pretrained(tmp)
        d = patch.to_dict()
        d["weights_in_model"] = bool(patch.weights)
        write_atomic(tmp / "patch.json", dumps(d))
        if summary is not None:
            write_atomic(tmp / "summary.json", dumps(summary))
        text = README.format(describe=patch.describe(), kind=patch.kind, how=_how(patch), dir=out)
        if summary_md:
            text += "## Before / after\n\n" + summary_md + "\n"
        write_atomic(tmp / "SUMMARY.md", text)
        if out.exists():
            keep = out.with_name(f".{out.name}.old")
            if keep.exists():
                shutil.rmtree(keep)
            os.replace(out, keep)
            os.replace(tmp, out)
            shutil.rmtree(keep, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_patched(path: str | os.PathLike, tokenizer=None, **load_kwargs):
    """Load a folder written by ``sinkhole patch --out DIR`` (or :func:`export_patched`) with
    its patch attached. ``tokenizer`` overrides the saved one (for models without tokenizer
    files); other keyword arguments go to :func:`sinkhole.load_model`."""
    path = Path(path)
    pj = path / "patch.json"
    if not path.is_dir() or not pj.exists():
        raise SinkholeError(f"{path} is not a patched-model folder (no patch.json); create one with "
                            "'sinkhole patch --out DIR'")
    try:
        d = json.loads(pj.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SinkholeError(f"{pj} is not valid JSON ({err})") from None
    in_model = bool(d.pop("weights_in_model", False))
    if in_model:
        d.pop("weights_file", None)
    patch = Patch.from_dict(d, base=path)
    if tokenizer is None:
        lm = load_model(str(path), progress=False, **load_kwargs)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager",
                                                     **{k: v for k, v in load_kwargs.items() if k == "dtype"})
        model.requires_grad_(False)
        lm = from_pretrained_model(model, tokenizer, name=path.name)
    attach_patch(lm, patch)
    lm.info["patch"] = patch.describe()
    return lm


def read_patch(path: str | os.PathLike) -> Patch:
    """A patch from a patch JSON file or from a folder written by :func:`export_patched` (its
    weights are then read back from the folder's model files)."""
    path = Path(path)
    if path.is_dir():
        pj = path / "patch.json"
        if not pj.exists():
            raise SinkholeError(f"{path} has no patch.json; pass a patch file or a folder from 'sinkhole patch'")
        try:
            d = json.loads(pj.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise SinkholeError(f"{pj} is not valid JSON ({err})") from None
        if d.pop("weights_in_model", False):
            names = list(d.get("weights", []))
            patch = Patch.from_dict(d, base=path)
            patch.weights = _read_tensors(path, names) if names else None
            return patch
        return Patch.from_dict(d, base=path)
    return Patch.load(path)


def _read_tensors(folder: Path, names: list[str]) -> dict:
    from safetensors import safe_open

    want, got = set(names), {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if k in want:
                    got[k] = st.get_tensor(k)
    missing = want - set(got)
    if missing:
        raise SinkholeError(f"the model files in {folder} lack the patch's weights {sorted(missing)[:3]}")
    return got
