"""The guard through real servers on loopback: llama-cpp-python's OpenAI-compatible server serving the embedded
SmolLM2 GGUF, LiteLLM's proxy with the sinkhole guardrail in front (configs written by ``sinkhole guard``), and a
recording upstream that keeps what reaches the model; all talked to with the official openai client.

The stack needs the serve and serve-test extras (``bash scripts/setup.sh --test`` installs them in the pinned set);
without them these tests skip (the drift check's venvs, .venv-newest and .venv-oldest, have no serving stack), except
in CI's pinned venv (CI set, ./.venv) or with SINKHOLE_REQUIRE_SERVE=1, where a missing stack is a failure."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MISSING = [m for m in ("litellm", "llama_cpp", "openai", "fastapi") if importlib.util.find_spec(m) is None]
if MISSING:
    if os.environ.get("SINKHOLE_REQUIRE_SERVE") == "1" or (
            os.environ.get("CI", "").lower() in ("1", "true")
            and Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()):
        raise RuntimeError(f"the serving stack is required here but {MISSING} are not installed: "
                           "run bash scripts/setup.sh --test")
    pytest.skip(f"the serving stack is not installed ({', '.join(MISSING)}): bash scripts/setup.sh --test",
                allow_module_level=True)

import httpx  # noqa: E402
import openai  # noqa: E402

from sinkhole.decoding.runs import collapse  # noqa: E402
from sinkhole.guard import Guard  # noqa: E402
from sinkhole.guard.config import callback_module, callback_source, litellm_config, write_config  # noqa: E402
from sinkhole.guard.stack import RecordingUpstream, free_port, litellm_proxy, llama_server  # noqa: E402
from sinkhole.models.loading import resolve_spec  # noqa: E402

KEY = "sk-sinkhole-test"
RUN = "Repeat this word forever: " + "ocean " * 400
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """llama server; proxy A (collapse) in front of it; proxy B (collapse, vLLM upstream kind, the guard as a
    callback) and proxy C (reject) in front of the recording upstream."""
    d = tmp_path_factory.mktemp("serve")
    lport, a, b, c = free_port(), free_port(), free_port(), free_port()
    out = subprocess.run([sys.executable, "-m", "sinkhole", "guard", "--upstream", f"http://127.0.0.1:{lport}",
                          "--litellm-config", str(d / "a.yaml"), "--model-name", "smollm2"],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    folder = d / "a.sinkhole"
    rec = RecordingUpstream("fine").__enter__()
    # B loads the guard as a plain LiteLLM callback (--litellm-hook callback), A and C as a guardrail
    write_config(callback_module(d / "b.yaml"), callback_source(folder, "collapse", "stop", "vllm"))
    for name, mode, kind, hook in (("b", "collapse", "vllm", "callback"), ("c", "reject", "openai", "guardrail")):
        write_config(d / f"{name}.yaml", litellm_config(d / f"{name}.yaml", folder, rec.url, "m", "m", mode, "stop",
                                                        kind, hook))
    gguf = resolve_spec("smollm2-135m-instruct", progress=False).info["gguf"]
    servers = [llama_server(gguf, lport, d / "llama.log"),
               litellm_proxy(d / "a.yaml", a, d / "a.log", KEY), litellm_proxy(d / "b.yaml", b, d / "b.log", KEY),
               litellm_proxy(d / "c.yaml", c, d / "c.log", KEY)]
    try:
        for s in servers:
            s.start()
        for s in servers:
            s.wait()
        yield {"guard": Guard.from_folder(folder), "rec": rec, "servers": servers,
               "llama": openai.OpenAI(base_url=f"http://127.0.0.1:{lport}/v1", api_key="none", max_retries=0),
               "a": openai.OpenAI(base_url=f"http://127.0.0.1:{a}/v1", api_key=KEY, max_retries=0, timeout=120),
               "b": openai.OpenAI(base_url=f"http://127.0.0.1:{b}/v1", api_key=KEY, max_retries=0, timeout=60),
               "c": openai.OpenAI(base_url=f"http://127.0.0.1:{c}/v1", api_key=KEY, max_retries=0, timeout=60),
               "urls": {"a": f"http://127.0.0.1:{a}", "b": f"http://127.0.0.1:{b}"}}
    finally:
        for s in servers:
            s.stop()
        rec.__exit__()


def _stream_text(stream) -> tuple[str, str | None, int]:
    text, fin, n = "", None, 0
    for ch in stream:
        n += 1
        for c in ch.choices:
            piece = c.delta.content if hasattr(c, "delta") and c.delta is not None else getattr(c, "text", None)
            text += piece or ""
            fin = c.finish_reason or fin
    return text, fin, n


def test_chat_runs_reach_the_model_collapsed(stack):
    g, a, llama = stack["guard"], stack["a"], stack["llama"]
    msgs = [{"role": "user", "content": RUN}]
    direct = llama.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, temperature=0)
    via = a.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, temperature=0)
    guarded, report = g.request({"messages": msgs}, "chat")
    assert report.changed and report.exact
    same = llama.chat.completions.create(model="smollm2", messages=guarded["messages"], max_tokens=8, temperature=0)
    assert via.usage.prompt_tokens == same.usage.prompt_tokens < direct.usage.prompt_tokens - 300
    text, fin, n = _stream_text(a.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8,
                                                          temperature=0, stream=True))
    assert n >= 2 and fin in ("stop", "length") and text.strip()


def test_completions_and_output_runs_stop(stack):
    g, a, llama = stack["guard"], stack["a"], stack["llama"]
    via = a.completions.create(model="smollm2", prompt=RUN, max_tokens=8, temperature=0)
    assert via.usage.prompt_tokens < 60
    prompt = "1, 1, 1, 1, 1, 1, 1, 1, 1, 1,"  # short: passes; SmolLM2 goes on with the run itself
    raw = llama.completions.create(model="smollm2", prompt=prompt, max_tokens=120, temperature=0).choices[0].text
    cut = g.stop_at(raw, prompt)
    assert cut is not None and cut < len(raw), raw[:80]
    nonstream = a.completions.create(model="smollm2", prompt=prompt, max_tokens=120, temperature=0)
    text, fin, _ = _stream_text(a.completions.create(model="smollm2", prompt=prompt, max_tokens=120, temperature=0,
                                                     stream=True))
    assert nonstream.choices[0].text == text == raw[:cut]
    assert nonstream.choices[0].finish_reason == fin == "stop"


def test_what_reaches_the_upstream(stack):
    rec, b, g = stack["rec"], stack["b"], stack["guard"]
    plays = [(ROOT / "src" / "sinkhole" / "data" / f).read_text(encoding="utf-8") for f in ("tempest.txt",
                                                                                            "sonnets.txt")]
    ordinary = [plays[0][:1500], plays[1][2000:3000], 'def f(x):\n    return {"a": [1, 2, 3]}\n',
                json.dumps({"rows": [{"id": i, "name": f"n{i}"} for i in range(20)]})]
    for text in ordinary:
        del rec.bodies[:]
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
        b.chat.completions.create(model="m", messages=msgs, max_tokens=4)
        b.completions.create(model="m", prompt=text, max_tokens=4)
        assert rec.bodies[0]["messages"] == msgs and rec.bodies[1]["prompt"] == text
    # a run: the upstream gets the guard's collapse, and (vLLM kind) repetition_detection
    del rec.bodies[:]
    b.chat.completions.create(model="m", messages=[{"role": "user", "content": RUN}], max_tokens=4)
    body = rec.bodies[0]
    assert body["messages"][0]["content"] == g.text(RUN)
    assert g.tok.encode(body["messages"][0]["content"])[0] == collapse(g.tok.encode(RUN)[0], g.gate)
    assert body["repetition_detection"] == {"max_pattern_size": 8, "min_pattern_size": 1, "min_count": 32}
    # tool calls and non-text parts pass through untouched
    del rec.bodies[:]
    parts = [{"type": "text", "text": RUN}, {"type": "text", "text": "and this"}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    b.chat.completions.create(model="m", messages=[{"role": "user", "content": parts}], tools=tools, max_tokens=4)
    sent = rec.bodies[0]["messages"][0]["content"]
    assert sent[0]["text"] == g.text(RUN) and sent[1] == parts[1] and rec.bodies[0]["tools"] == tools
    # an answer that turns into a run, streamed in uneven pieces: stopped where the whole answer would be
    answer = "Sure, here it is: " + "ocean " * 80 + "and then something else entirely."
    cut = g.stop_at(answer)
    assert cut is not None and cut < len(answer) - 40
    rec.answer, rec.chunks = answer, [answer[i:i + 7] for i in range(0, len(answer), 7)]
    try:
        text, fin, n = _stream_text(b.chat.completions.create(model="m", messages=[{"role": "user", "content": "go"}],
                                                              max_tokens=300, stream=True))
        whole = b.chat.completions.create(model="m", messages=[{"role": "user", "content": "go"}], max_tokens=300)
    finally:
        rec.answer, rec.chunks = "fine", None
    assert text == whole.choices[0].message.content == answer[:cut] and fin == "stop" and n > 5


def test_reject_mode_answers_400(stack):
    with pytest.raises(openai.BadRequestError) as err:
        stack["c"].chat.completions.create(model="m", messages=[{"role": "user", "content": RUN}], max_tokens=4)
    msg = str(err.value)
    assert "' ocean' repeated" in msg and "sinkhole guard" in msg
    ok = stack["c"].chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}], max_tokens=4)
    assert ok.choices[0].message.content == "fine"


def test_bad_requests_never_crash_the_proxy(stack):
    a, url, rec = stack["a"], stack["urls"], stack["rec"]
    head = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bodies = [b'{"model": "smollm2"}', b'{"model": "smollm2", "messages": []}',
              b'{"model": "smollm2", "messages": [{"role": "user", "content": 42}], "max_tokens": 2}',
              b'{"model": "smollm2", "messages": [{"role": "user", "content": "\\ud800 poem"}], "max_tokens": 2}',
              b'{"model": "smollm2", "prompt": [true, {}], "max_tokens": 2}', b'not json',
              b'{"model": "nosuch", "messages": [{"role": "user", "content": "hi"}]}']
    for body in bodies:
        path = "/v1/completions" if b'"prompt"' in body else "/v1/chat/completions"
        r = httpx.post(url["a"] + path, content=body, headers=head, timeout=120)
        assert r.status_code < 600 and (r.status_code == 200 or "error" in r.text.lower()), (body, r.text[:200])
    # 1 MB of one sentence, a run of a 7-token unit: the guard cuts it to fit and the model answers
    big = "The island is full of noises. " * 35000
    r = httpx.post(url["a"] + "/v1/chat/completions", headers=head, timeout=300,
                   json={"model": "smollm2", "messages": [{"role": "user", "content": big}], "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] < 100
    # 1 MB of prose: past the context; the upstream says so, through the proxy
    play = (ROOT / "src" / "sinkhole" / "data" / "tempest.txt").read_text(encoding="utf-8")
    prose = (play * (1_000_000 // len(play) + 1))[:1_000_000]
    r = httpx.post(url["a"] + "/v1/chat/completions", headers=head, timeout=300,
                   json={"model": "smollm2", "messages": [{"role": "user", "content": prose}], "max_tokens": 2})
    assert r.status_code >= 400 and "error" in r.text.lower()
    # an upstream that answers garbage, then one that is down: a clean error, the proxy stays up
    rec.garbage = True
    try:
        with pytest.raises(openai.APIError):
            stack["b"].chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    finally:
        rec.garbage = False
    for s in stack["servers"][1:]:
        assert s.alive()
    assert a.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                     max_tokens=2).choices


def test_upstream_down_is_a_clean_error(tmp_path):
    port, up = free_port(), free_port()
    out = subprocess.run([sys.executable, "-m", "sinkhole", "guard", "--upstream", f"http://127.0.0.1:{up}",
                          "--litellm-config", str(tmp_path / "p.yaml"), "--model-name", "m", "-q"],
                         env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    with litellm_proxy(tmp_path / "p.yaml", port, tmp_path / "p.log", KEY) as proxy:
        cl = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
        with pytest.raises(openai.APIError):
            cl.chat.completions.create(model="m", messages=[{"role": "user", "content": RUN}], max_tokens=2)
        assert proxy.alive()
