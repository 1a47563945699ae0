"""Patches: data (JSON), application as hooks, candidate search, fine-tuning, export/reload."""

from .core import Patch, PatchOp, apply_patch, attach_patch, model_signature  # noqa: F401
from .export import export_patched, load_patched  # noqa: F401

__all__ = ["Patch", "PatchOp", "apply_patch", "attach_patch", "model_signature", "export_patched", "load_patched"]
