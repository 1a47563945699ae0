"""The LiteLLM proxy config ``sinkhole guard`` writes: the upstream under the exposed model name, the master key
read from ``LITELLM_MASTER_KEY`` (the proxy refuses to start without one) and the sinkhole guard on every
request, pointed at the folder that holds the model's guard profile and tokenizer.

The guard is registered one of two ways (``hook``): as a guardrail (``guardrails:``, the default: LiteLLM lists
it among the proxy's guardrails), or as a plain callback (``litellm_settings.callbacks``, an instance made in a
small module written beside the config, the way LiteLLM loads custom callbacks). The hooks are the same; LiteLLM
1.110 takes every stream off its fast relay while any guardrail is registered, and not for a callback."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlparse

from ..errors import SinkholeError
from ..results import write_atomic

GUARDRAIL_CLASS = "sinkhole.guard.proxy.SinkholeGuardrail"
CALLBACK_CLASS = "sinkhole.guard.proxy.SinkholeCallback"
HOOKS = ("guardrail", "callback")


def check_upstream(url: str) -> str:
    """The upstream's OpenAI base URL (``.../v1``), or a one-line error."""
    u = urlparse(url or "")
    if u.scheme not in ("http", "https") or not u.netloc:
        raise SinkholeError(f"--upstream must be the OpenAI-compatible server's URL, like http://127.0.0.1:8080/v1 "
                            f"(got {url!r})")
    return url.rstrip("/") if u.path.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"


def callback_module(path: Path) -> Path:
    """Where the callback's module goes for the config ``path``: beside it, named after it."""
    return path.with_name(re.sub(r"\W", "_", path.stem) + "_sinkhole.py")


def callback_source(folder: Path, mode: str, output: str, upstream_kind: str) -> str:
    """The module LiteLLM loads the callback instance (``guard``) from."""
    q = json.dumps
    module, cls = CALLBACK_CLASS.rsplit(".", 1)
    return "\n".join([
        "# written by sinkhole guard: the sinkhole guard as a LiteLLM callback (litellm_settings.callbacks)",
        f"from {module} import {cls}",
        "",
        f"guard = {cls}(sinkhole_folder={q(str(folder.resolve()))}, "
        f"sinkhole_mode={q(mode)}, sinkhole_output={q(output)}, sinkhole_upstream={q(upstream_kind)})",
        "",
    ])


def litellm_config(path: Path, folder: Path, upstream: str, model_name: str, upstream_model: str, mode: str,
                   output: str, upstream_kind: str, hook: str = "guardrail") -> str:
    """The config's text (YAML; every string is written as a JSON string, which YAML reads as is). With ``hook``
    ``callback`` the config names the instance in :func:`callback_module`, which the caller writes too."""
    if hook not in HOOKS:
        raise SinkholeError(f"unknown hook {hook!r}; use one of {', '.join(HOOKS)}")
    q = json.dumps
    provider = "hosted_vllm" if upstream_kind == "vllm" else "openai"
    head = [
        "# written by sinkhole guard: start the proxy with",
        "#   LITELLM_MASTER_KEY=sk-... LITELLM_LOCAL_MODEL_COST_MAP=True litellm --config " + str(path),
        "model_list:",
        f"  - model_name: {q(model_name)}",
        "    litellm_params:",
        f"      model: {q(provider + '/' + upstream_model)}",
        f"      api_base: {q(upstream)}",
        "      api_key: \"none\"  # the upstream's key, if it needs one (os.environ/NAME reads it from NAME)",
        "general_settings:",
        "  master_key: os.environ/LITELLM_MASTER_KEY",
    ]
    if hook == "callback":
        return "\n".join(head + ["litellm_settings:",
                                 f"  callbacks: [{q(callback_module(path).stem + '.guard')}]", ""])
    return "\n".join(head + [
        "guardrails:",
        "  - guardrail_name: sinkhole",
        "    litellm_params:",
        f"      guardrail: {GUARDRAIL_CLASS}",
        "      mode: " + ("[pre_call, post_call]" if output != "off" else "[pre_call]"),
        "      default_on: true",
        f"      sinkhole_folder: {q(str(folder.resolve()))}",
        # quoted: YAML reads a bare off as false
        f"      sinkhole_mode: {q(mode)}",
        f"      sinkhole_output: {q(output)}",
        f"      sinkhole_upstream: {q(upstream_kind)}",
        "",
    ])


def write_config(path: Path, text: str) -> Path:
    write_atomic(path, text)
    return path
