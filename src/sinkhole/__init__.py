"""sinkhole: find, explain and fix the repeated-token divergence of language models.

The public names below load on first use (PEP 562), so ``import sinkhole`` and the command line's start do not
import torch until a command needs a model."""

from importlib import import_module

from .errors import SinkholeError
from .version import __version__

_WHERE = {
    "Edit": "capture", "Hooks": "capture", "run": "capture",
    "SUPPORTED": "models.adapters", "get_adapter": "models.adapters",
    "DEFAULT_MODEL": "models.loading", "EMBEDDED": "models.loading", "LoadedModel": "models.loading",
    "from_pretrained_model": "models.loading", "load_model": "models.loading",
    "Patch": "patch", "PatchOp": "patch", "load_patched": "patch",
    "analyze": "pipeline.analyze",
}

__all__ = [
    "__version__", "Edit", "Hooks", "run", "SinkholeError", "SUPPORTED", "get_adapter", "DEFAULT_MODEL",
    "EMBEDDED", "LoadedModel", "from_pretrained_model", "load_model", "Patch", "PatchOp", "load_patched", "analyze",
]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
