"""A guarded serving stack on loopback, started and stopped by the caller (the tests and the serving benchmark):
llama-cpp-python's OpenAI-compatible server, the LiteLLM proxy with the sinkhole guardrail in front of it, and a
recording upstream that keeps every request body it is sent (what reaches the model, byte for byte).

Every server listens on 127.0.0.1 only, is waited for until it answers, and is stopped (terminate, then kill) when
its ``with`` block ends; a server that does not come up raises with the tail of its log.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..errors import SinkholeError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class Server:
    """One server process: started on entry, waited for (``health`` answers 200), stopped on exit."""

    def __init__(self, cmd: list[str], health: str, log: Path, env: dict | None = None, cwd=None,
                 timeout: float = 120):
        self.cmd, self.health, self.log, self.env, self.cwd, self.timeout = cmd, health, Path(log), env, cwd, timeout
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Server":
        self._fh = open(self.log, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=self.env, cwd=self.cwd, start_new_session=True)
        return self

    def wait(self) -> "Server":
        t0 = time.monotonic()
        while time.monotonic() - t0 < self.timeout:
            if self.proc.poll() is not None:
                break
            if _up(self.health):
                return self
            time.sleep(0.3)
        tail = self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""
        self.stop()
        raise SinkholeError(f"{Path(self.cmd[2] if self.cmd[1] == '-m' else self.cmd[0]).name} did not come up at "
                            f"{self.health} within {self.timeout:.0f} s; its log ends: {tail[-300:]!r}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and _up(self.health)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_fh", None):
            self._fh.close()

    def __enter__(self):
        return self.start().wait()

    def __exit__(self, *exc):
        self.stop()
        return False


def llama_server(gguf, port: int, log: Path, n_ctx: int = 8192) -> Server:
    """llama-cpp-python's OpenAI-compatible server on the GGUF (chat template chatml, as SmolLM2's)."""
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", str(n_ctx), "--chat_format", "chatml", "--n_threads", str(max(1, (os.cpu_count() or 2)))]
    return Server(cmd, f"http://127.0.0.1:{port}/v1/models", log)


def litellm_proxy(config, port: int, log: Path, master_key: str = "sk-sinkhole-test") -> Server:
    """LiteLLM's proxy on a config ``sinkhole guard`` wrote (offline: the local price map)."""
    exe = Path(sys.executable).with_name("litellm")
    env = {**os.environ, "LITELLM_MASTER_KEY": master_key, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "LITELLM_LOG": os.environ.get("LITELLM_LOG", "ERROR"), "HF_HUB_OFFLINE": "1"}
    cmd = [str(exe), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    return Server(cmd, f"http://127.0.0.1:{port}/health/liveliness", log, env=env, cwd=str(Path(config).parent))


class RecordingUpstream:
    """An OpenAI-compatible stand-in that records every request body (parsed JSON) and answers with a fixed text,
    streaming or not; ``garbage`` makes it answer bytes that are not JSON. A thread on 127.0.0.1."""

    def __init__(self, answer: str = "ok"):
        self.answer, self.bodies, self.garbage = answer, [], False
        self.chunks: list[str] | None = None  # the streamed answer's pieces (default: the answer in one piece)
        rec = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def do_GET(self):
                self._send(200, {"object": "list", "data": [{"id": "m", "object": "model"}]})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {"_raw": raw.decode("utf-8", "replace")}
                rec.bodies.append(body)
                if rec.garbage:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.end_headers()
                    self.wfile.write(b"\x00not json{{")
                    return
                chat = self.path.rstrip("/").endswith("chat/completions")
                usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
                if body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.end_headers()
                    pieces = list(rec.chunks or [rec.answer]) + [""]
                    for i, piece in enumerate(pieces):
                        fin = "stop" if i == len(pieces) - 1 else None
                        ch = ({"index": 0, "delta": {"role": "assistant", "content": piece}, "finish_reason": fin}
                              if chat else {"index": 0, "text": piece, "finish_reason": fin})
                        obj = {"id": "x", "object": "chat.completion.chunk" if chat else "text_completion",
                               "created": 0, "model": body.get("model", "m"), "choices": [ch]}
                        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
                    self.wfile.write(b"data: [DONE]\n\n")
                    return
                ch = ({"index": 0, "message": {"role": "assistant", "content": rec.answer}, "finish_reason": "stop"}
                      if chat else {"index": 0, "text": rec.answer, "finish_reason": "stop"})
                self._send(200, {"id": "x", "object": "chat.completion" if chat else "text_completion", "created": 0,
                                 "model": body.get("model", "m"), "choices": [ch], "usage": usage})

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        return False
