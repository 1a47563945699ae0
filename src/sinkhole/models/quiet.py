"""Loading without transformers' chatter: its warnings, log lines and progress bars."""

from __future__ import annotations

import contextlib
import io
import warnings


def quiet_hf():
    """Silence transformers' chatter (warnings, GGUF progress bars) during loading."""
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    try:
        from transformers.utils import logging as hf_logging

        prev = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        stack.callback(hf_logging.set_verbosity, prev)
        hf_logging.disable_progress_bar()
        stack.callback(hf_logging.enable_progress_bar)
    except Exception:  # pragma: no cover - transformers always has these
        pass
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack
