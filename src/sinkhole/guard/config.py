"""The LiteLLM proxy config ``sinkhole guard`` writes: the upstream under the exposed model name, the master key
read from ``LITELLM_MASTER_KEY`` (the proxy refuses to start without one) and the sinkhole guardrail on every
request, pointed at the folder that holds the model's guard profile and tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

from ..errors import SinkholeError
from ..results import write_atomic

GUARDRAIL_CLASS = "sinkhole.guard.proxy.SinkholeGuardrail"


def check_upstream(url: str) -> str:
    """The upstream's OpenAI base URL (``.../v1``), or a one-line error."""
    u = urlparse(url or "")
    if u.scheme not in ("http", "https") or not u.netloc:
        raise SinkholeError(f"--upstream must be the OpenAI-compatible server's URL, like http://127.0.0.1:8080/v1 "
                            f"(got {url!r})")
    return url.rstrip("/") if u.path.rstrip("/").endswith("/v1") else url.rstrip("/") + "/v1"


def litellm_config(path: Path, folder: Path, upstream: str, model_name: str, upstream_model: str, mode: str,
                   output: str, upstream_kind: str) -> str:
    """The config's text (YAML; every string is written as a JSON string, which YAML reads as is)."""
    q = json.dumps
    provider = "hosted_vllm" if upstream_kind == "vllm" else "openai"
    return "\n".join([
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
        "guardrails:",
        "  - guardrail_name: sinkhole",
        "    litellm_params:",
        f"      guardrail: {GUARDRAIL_CLASS}",
        # post_call only where answers are watched: a streaming post-call hook takes LiteLLM off its fast relay
        "      mode: " + ("[pre_call, post_call]" if output != "off" else "[pre_call]"),
        "      default_on: true",
        f"      sinkhole_folder: {q(str(folder.resolve()))}",
        f"      sinkhole_mode: {mode}",
        f"      sinkhole_output: {output}",
        f"      sinkhole_upstream: {upstream_kind}",
        "",
    ])


def write_config(path: Path, text: str) -> Path:
    write_atomic(path, text)
    return path
