"""The guard as a LiteLLM proxy guardrail (``pip install 'sinkhole[serve]'``).

``sinkhole guard MODEL --upstream URL --litellm-config FILE`` writes a config whose ``guardrails`` entry loads
:class:`SinkholeGuardrail` with the folder holding the model's guard profile and tokenizer. The guardrail

* before the call (``pre_call``): guards every text the model will read (:meth:`Guard.request`): runs are
  collapsed (default) or the request is refused with status 400 and one line naming the run; for a vLLM
  upstream it also asks vLLM to stop output loops (``repetition_detection``, vLLM 0.17 and later);
* after the call (``post_call``): ends an answer where a run the model writes itself passes the gate's limit,
  streaming or not (finish reason ``stop``).

Nothing here imports torch or loads weights: the guard reads token ids with the model's ``tokenizer.json``.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncGenerator

from fastapi import HTTPException
from litellm.integrations.custom_guardrail import CustomGuardrail
from litellm.integrations.custom_logger import CustomLogger

from ..errors import SinkholeError
from .core import Guard, GuardRejected

log = logging.getLogger("sinkhole.guard")

CHAT_CALLS = {"completion", "acompletion"}
TEXT_CALLS = {"text_completion", "atext_completion"}
UPSTREAM_KINDS = ("openai", "vllm")


def vllm_repetition_detection(guard: Guard) -> dict:
    """vLLM's output-side stop (``repetition_detection``) set to the guard's limit: a unit of 1 to
    ``max_distinct`` tokens repeated as many times as the gate lets a single-token run grow before it hides
    anything (``window`` + ``hold``)."""
    g = guard.gate
    return {"max_pattern_size": g.max_distinct, "min_pattern_size": 1, "min_count": g.window + g.hold}


def _setup(self, folder, mode: str, output: str, upstream: str) -> None:
    if not folder:
        raise SinkholeError("the sinkhole guard needs its folder (sinkhole_folder: the folder sinkhole guard wrote); "
                            "write the config with sinkhole guard")
    if upstream not in UPSTREAM_KINDS:
        raise SinkholeError(f"unknown sinkhole_upstream {upstream!r}; use one of {', '.join(UPSTREAM_KINDS)}")
    self.guard = Guard.from_folder(folder, mode, output)
    self.upstream = upstream


# --- the hooks (one body, set in both classes' own namespace: LiteLLM looks for a hook in the registered class's
# own __dict__, not in its bases) ----------------------------------------------------------------------------
async def _pre_call(self, user_api_key_dict, cache, data: dict, call_type) -> Any:
    """Before the call: every text the model reads guarded (:meth:`Guard.request`); 400 on a refused run."""
    kind = "chat" if call_type in CHAT_CALLS else "completion" if call_type in TEXT_CALLS else None
    if kind is None or not isinstance(data, dict):
        return data
    try:
        new, report = self.guard.request(data, kind)
    except GuardRejected as err:
        raise HTTPException(status_code=400, detail={"error": str(err)}) from None
    if report.changed:
        log.info("sinkhole guard: %s", "; ".join(r.describe() for r in report.runs))
    if self.upstream == "vllm" and "repetition_detection" not in new:
        new = {**new, "repetition_detection": vllm_repetition_detection(self.guard)}
    return new


async def _post_call(self, data: dict, user_api_key_dict, response) -> Any:
    """After a whole answer: each choice ended where a run the model writes itself passes the limit."""
    context = _context(data)
    for choice in getattr(response, "choices", None) or []:
        msg = getattr(choice, "message", None)
        obj, name = (msg, "content") if msg is not None else (choice, "text")
        text = getattr(obj, name, None)
        if isinstance(text, str):
            cut = self.guard.stop_at(text, context)
            if cut is not None:
                setattr(obj, name, text[:cut])
                choice.finish_reason = "stop"
    return response


async def _stream(self, user_api_key_dict, response, request_data: dict) -> AsyncGenerator:
    """Passes the stream on one chunk late, each choice's text held back by its last token (which may still
    grow), so that a stopped answer ends exactly where the whole answer would (:meth:`Guard.stop_at`)."""
    if self.guard.output == "off":
        async for chunk in response:
            yield chunk
        return
    watches: dict = {}
    held = None
    async for chunk in response:
        for choice in getattr(chunk, "choices", None) or []:
            w = watches.setdefault(getattr(choice, "index", 0) or 0, self.guard.watch(_context(request_data)))
            obj, name = _text_field(choice)
            piece = getattr(obj, name, None)
            if w.stopped:
                setattr(obj, name, "")
                choice.finish_reason = None
                continue
            out = w.feed(piece) if isinstance(piece, str) else ""
            if w.stopped:
                choice.finish_reason = "stop"
            elif getattr(choice, "finish_reason", None):
                out += w.flush()
            if isinstance(piece, str) or out:
                setattr(obj, name, out)
        if held is not None:
            yield held
        held = chunk
        if watches and all(w.stopped for w in watches.values()):
            break
    if held is not None:
        for choice in getattr(held, "choices", None) or []:
            w = watches.get(getattr(choice, "index", 0) or 0)
            rest = w.flush() if w is not None else ""
            if rest:
                obj, name = _text_field(choice)
                setattr(obj, name, (getattr(obj, name, None) or "") + rest)
        yield held


class SinkholeGuardrail(CustomGuardrail):
    """LiteLLM's ``CustomGuardrail`` around a :class:`~sinkhole.guard.core.Guard` (the config's ``guardrails``
    entry). Config keys (``litellm_params`` of the guardrail): ``sinkhole_folder`` (required), ``sinkhole_mode``
    (collapse | reject), ``sinkhole_output`` (stop | off), ``sinkhole_upstream`` (openai | vllm)."""

    def __init__(self, sinkhole_folder: str | None = None, sinkhole_mode: str = "collapse",
                 sinkhole_output: str = "stop", sinkhole_upstream: str = "openai", **kwargs):
        _setup(self, sinkhole_folder, sinkhole_mode, sinkhole_output, sinkhole_upstream)
        super().__init__(**kwargs)

    async_pre_call_hook = _pre_call
    async_post_call_success_hook = _post_call
    async_post_call_streaming_iterator_hook = _stream


class SinkholeCallback(CustomLogger):
    """The same hooks as a plain LiteLLM callback (``litellm_settings.callbacks``): LiteLLM 1.110 relays a stream
    on its fast path unless a guardrail is registered, so this keeps streaming throughput where the proxy is the
    bottleneck; it does not appear among the proxy's guardrails (``sinkhole guard --litellm-hook callback``)."""

    def __init__(self, sinkhole_folder: str | None = None, sinkhole_mode: str = "collapse",
                 sinkhole_output: str = "stop", sinkhole_upstream: str = "openai"):
        _setup(self, sinkhole_folder, sinkhole_mode, sinkhole_output, sinkhole_upstream)
        super().__init__()

    async_pre_call_hook = _pre_call
    async_post_call_success_hook = _post_call
    async_post_call_streaming_iterator_hook = _stream


def _context(data) -> str:
    """The text an answer continues: a completion's prompt when it is one text (a chat answer starts after the
    chat template's assistant header, so it continues no run of the messages)."""
    p = data.get("prompt") if isinstance(data, dict) else None
    return p if isinstance(p, str) else ""


def _text_field(choice) -> tuple:
    """Where a streamed choice carries its text: the delta's content (chat) or the choice's text (completions)."""
    delta = getattr(choice, "delta", None)
    return (delta, "content") if delta is not None else (choice, "text")
