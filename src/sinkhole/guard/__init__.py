"""The run gate where models are served: a guard that needs no model (no torch, no weights), only the served
model's tokenizer and a guard profile a scan wrote. :class:`Guard` applies it to texts, token ids and
OpenAI-style requests; :mod:`sinkhole.guard.proxy` plugs it into LiteLLM's proxy (``pip install
'sinkhole[serve]'``); ``sinkhole guard`` writes the proxy's config."""

from .core import Guard, GuardRejected, GuardReport, OutputWatch, RunFound, Tokenizer
from .profile import GuardProfile, profile_from_results

__all__ = ["Guard", "GuardRejected", "GuardReport", "OutputWatch", "RunFound", "Tokenizer", "GuardProfile",
           "profile_from_results"]
