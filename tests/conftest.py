"""Shared fixtures: tiny random models of every supported family, and the real SmolLM2."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # LiteLLM would fetch its price map from the internet
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("SINKHOLE_NO_PROGRESS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tiny import FAMILIES, tiny_lm  # noqa: E402


@pytest.fixture(params=FAMILIES)
def tiny_family(request):
    """A tiny random LoadedModel of each supported family (parametrized)."""
    return tiny_lm(request.param)


@pytest.fixture
def tiny():
    """One tiny random Llama-family LoadedModel."""
    return tiny_lm("llama")


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded SmolLM2-135M-Instruct (float32, CPU), loaded once per session."""
    from sinkhole import load_model

    torch.manual_seed(0)
    return load_model("smollm2-135m-instruct", progress=False)


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run on one torch thread (threading only adds overhead at that size, and
    oversubscribed cores make it dramatically slower); real-model tests keep all cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(n if request.node.get_closest_marker("real") else 1)
    yield
    torch.set_num_threads(n)
