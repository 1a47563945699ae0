"""sinkhole: find, explain and fix the repeated-token divergence of language models."""

__version__ = "0.1.0"

from .capture import Edit, Hooks, run  # noqa: E402
from .errors import SinkholeError  # noqa: E402
from .models.adapters import SUPPORTED, get_adapter  # noqa: E402
from .models.loading import DEFAULT_MODEL, EMBEDDED, LoadedModel, from_pretrained_model, load_model  # noqa: E402
from .patch import Patch, PatchOp, load_patched  # noqa: E402

__all__ = [
    "__version__", "Edit", "Hooks", "run", "SinkholeError", "SUPPORTED", "get_adapter", "DEFAULT_MODEL",
    "EMBEDDED", "LoadedModel", "from_pretrained_model", "load_model", "Patch", "PatchOp", "load_patched",
]
