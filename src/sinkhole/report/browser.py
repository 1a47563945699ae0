"""Open a report in headless chromium (Debian's ``chromium``) and check it, standard library only.

Talks the DevTools protocol over ``--remote-debugging-pipe`` (file descriptors 3 and 4, JSON
messages ending in NUL): no network, no websocket package, no selenium. Used by the browser test
and by ``sinkhole report DIR --screenshot FILE``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from ..errors import SinkholeError
from ..results import write_atomic

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
    "--disable-dev-shm-usage", "--hide-scrollbars",
    # nothing may come from the network: any external resource fails (and shows up as a console error)
    "--host-resolver-rules=MAP * ~NOTFOUND",
]

# Collected on the page after load: figures, their images and sizes, and the table of contents.
PROBE = """(() => {
  const figs = [...document.querySelectorAll('figure[data-figure]')].map(f => {
    const im = f.querySelector('img'); const cap = f.querySelector('figcaption');
    const r = f.getBoundingClientRect();
    return {name: f.dataset.figure, loaded: !!(im && im.complete && im.naturalWidth > 0),
            natural_width: im ? im.naturalWidth : 0, width: Math.round(r.width), height: Math.round(r.height),
            caption: cap ? cap.textContent.trim() : ''};
  });
  const ext = [...document.querySelectorAll('[src],link[href],script[src]')]
    .map(e => e.getAttribute('src') || e.getAttribute('href'))
    .filter(u => u && !u.startsWith('data:') && !u.startsWith('#'));
  return {title: document.title, figures: figs, figures_ok: document.documentElement.getAttribute('data-figures-ok'),
          toc: [...document.querySelectorAll('nav.toc a')].map(a => a.textContent.trim()),
          sections: [...document.querySelectorAll('[data-section]')].map(s => s.dataset.section),
          verdict: (document.querySelector('.verdict') || {}).textContent || null,
          section_errors: document.querySelectorAll('.section-error').length,
          external: ext, scroll_width: document.documentElement.scrollWidth,
          page_height: document.documentElement.scrollHeight};
})()"""


def find_chromium() -> str | None:
    env = os.environ.get("SINKHOLE_CHROMIUM")
    if env:
        return env if shutil.which(env) or Path(env).exists() else None
    for c in CANDIDATES:
        p = shutil.which(c)
        if p:
            return p
    return None


class _Pipe:
    def __init__(self, proc, wfd: int, rfd: int):
        self.proc, self.w, self.r = proc, wfd, rfd
        self.buf = b""
        self.next_id = 0
        self.events: list[dict] = []

    def _read_msg(self, deadline: float) -> dict:
        import select

        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            ready, _, _ = select.select([self.r], [], [], left)
            if ready:
                chunk = os.read(self.r, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self.buf += chunk
        msg, self.buf = self.buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30):
        self.next_id += 1
        mid = self.next_id
        m = {"id": mid, "method": method, "params": params or {}}
        if session:
            m["sessionId"] = session
        os.write(self.w, json.dumps(m).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            r = self._read_msg(deadline)
            if r.get("id") == mid:
                if "error" in r:
                    raise RuntimeError(f"{method}: {r['error'].get('message')}")
                return r.get("result", {})
            self.events.append(r)

    def wait_event(self, method: str, timeout: float = 30) -> dict:
        for i, e in enumerate(self.events):
            if e.get("method") == method:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            r = self._read_msg(deadline)
            if r.get("method") == method:
                return r
            self.events.append(r)

    def drain(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        try:
            while True:
                self.events.append(self._read_msg(deadline))
        except TimeoutError:
            pass


def _console_problems(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        m, p = e.get("method"), e.get("params", {})
        if m == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
        elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            out.append("console.error: " + " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif m == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            en = p["entry"]
            out.append(f"log ({en.get('source')}): {en.get('text')} {en.get('url', '')}".strip())
    return out


def check_page(path: str | os.PathLike, screenshot: str | os.PathLike | None = None, width: int = 1366,
               height: int = 800, full_page: bool = False, timeout: float = 60, chromium: str | None = None) -> dict:
    """Load an HTML file in headless chromium; return what the page shows and any console errors.

    Returns ``{"console_errors": [...], "title", "figures": [{name, loaded, width, height, caption}],
    "figures_ok", "toc", "sections", "verdict", "section_errors", "external", "scroll_width", "page_height"}``.
    With ``screenshot``, also writes a PNG of the first screen (or the whole page with ``full_page``)
    at ``width`` x ``height`` CSS pixels.
    """
    exe = chromium or find_chromium()
    if not exe:
        raise SinkholeError("chromium not found; install it (scripts/install-chromium.sh) or set SINKHOLE_CHROMIUM")
    url = Path(path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="sinkhole-chromium-") as ud:
        r_cmd, w_cmd = os.pipe()  # we write commands -> chromium reads fd 3
        r_res, w_res = os.pipe()  # chromium writes results on fd 4 -> we read
        def _fds():  # in the child: put the pipe ends on 3 and 4 (via high numbers: they may be 3 or 4 already)
            a, b = os.dup2(r_cmd, 100), os.dup2(w_res, 101)
            os.dup2(a, 3)
            os.dup2(b, 4)
        proc = subprocess.Popen([exe, *FLAGS, f"--user-data-dir={ud}", "--remote-debugging-pipe",
                                 f"--window-size={width},{height}", "about:blank"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=_fds, pass_fds=(3, 4), close_fds=True)
        os.close(r_cmd)
        os.close(w_res)
        pipe = _Pipe(proc, w_cmd, r_res)
        try:
            tid = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            sid = pipe.send("Target.attachToTarget", {"targetId": tid, "flatten": True})["sessionId"]
            for dom in ("Runtime.enable", "Log.enable", "Page.enable"):
                pipe.send(dom, session=sid)
            pipe.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                            "deviceScaleFactor": 1, "mobile": False}, session=sid)
            pipe.events.clear()
            pipe.send("Page.navigate", {"url": url}, session=sid)
            pipe.wait_event("Page.loadEventFired", timeout=timeout)
            pipe.drain(0.3)  # late console messages
            res = pipe.send("Runtime.evaluate", {"expression": PROBE, "returnByValue": True}, session=sid)
            if "exceptionDetails" in res:
                raise RuntimeError(f"page probe failed: {res['exceptionDetails'].get('text')}")
            info = res["result"]["value"]
            if screenshot is not None:
                import base64

                shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": full_page,
                                                            **({"clip": {"x": 0, "y": 0, "width": width,
                                                                         "height": info["page_height"], "scale": 1}}
                                                               if full_page else {})}, session=sid, timeout=timeout)

                write_atomic(screenshot, base64.b64decode(shot["data"]))
            pipe.drain(0.1)
            info["console_errors"] = _console_problems(pipe.events)
            try:
                pipe.send("Browser.close", timeout=5)
            except Exception:
                pass
            return info
        finally:
            os.close(w_cmd)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            os.close(r_res)
