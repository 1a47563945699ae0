"""sinkhole: find, explain and fix the repeated-token divergence of language models."""

from .capture import Edit, Hooks, run
from .errors import SinkholeError
from .models.adapters import SUPPORTED, get_adapter
from .models.loading import DEFAULT_MODEL, EMBEDDED, LoadedModel, from_pretrained_model, load_model
from .patch import Patch, PatchOp, load_patched
from .pipeline.analyze import analyze
from .version import __version__

__all__ = [
    "__version__", "Edit", "Hooks", "run", "SinkholeError", "SUPPORTED", "get_adapter", "DEFAULT_MODEL",
    "EMBEDDED", "LoadedModel", "from_pretrained_model", "load_model", "Patch", "PatchOp", "load_patched", "analyze",
]
