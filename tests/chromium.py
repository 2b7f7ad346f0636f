"""A real headless Chromium for tests, driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: no port, no extra package): load a page, collect console errors,
uncaught exceptions and network requests, evaluate a script, take a full-page screenshot.

Chromium reads commands from its fd 3 and writes replies to fd 4, NUL-separated JSON; a shell
``exec`` puts the two pipes there (no ``preexec_fn`` in a process that runs Ray's threads)."""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from typing import Any, Optional

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> Optional[str]:
    return os.environ.get("EMBEDJOB_CHROMIUM") or next((p for p in map(shutil.which, NAMES) if p), None)


class Chromium:
    """``with Chromium(exe, profile_dir) as c: c.load(url); c.evaluate(js); c.screenshot(path)``."""

    def __init__(self, exe: str, profile_dir: str, *, width: int = 1280, height: int = 900):
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-extensions", "--disable-background-networking", "--hide-scrollbars", "--mute-audio",
                 "--remote-debugging-pipe", f"--user-data-dir={profile_dir}", f"--window-size={width},{height}"]
        self.log_path = os.path.join(profile_dir, "chromium.log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["bash", "-c", 'exec "$0" "$@" 3<&0 4>&1 0</dev/null 1>&2', exe, *flags],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self.width, self._id, self._buf = width, 0, b""
        self.events: list[dict[str, Any]] = []
        self.session: Optional[str] = None

    def __enter__(self) -> "Chromium":
        target = self.call("Target.createTarget", {"url": "about:blank"}, browser=True)["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True},
                                 browser=True)["sessionId"]
        for domain in ("Runtime", "Log", "Page", "Network"):
            self.call(f"{domain}.enable")
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.call("Browser.close", browser=True, timeout=10)
        except Exception:  # noqa: BLE001 - it may already be gone
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.time()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise TimeoutError(f"no reply from chromium (log: {self.log_path})")
            chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium exited (log: {self.log_path})")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def call(self, method: str, params: Optional[dict[str, Any]] = None, *, browser: bool = False,
             timeout: float = 60) -> dict[str, Any]:
        """Send one command and wait for its reply; events that come first are kept in ``events``."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if not browser:
            msg["sessionId"] = self.session
        self.proc.stdin.write(json.dumps(msg).encode() + b"\0")
        self.proc.stdin.flush()
        deadline = time.time() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.time() + timeout
        for e in self.events:
            if e.get("method") == method:
                return e
        while True:
            e = self._read(deadline)
            self.events.append(e)
            if e.get("method") == method:
                return e

    def load(self, url: str) -> None:
        self.call("Page.navigate", {"url": url})
        self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        r = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('text')} {p['exceptionDetails'].get('exception', {})}")
            elif m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value') for a in p.get('args', [])]}")
            elif m == "Log.entryAdded" and p["entry"].get("level") == "error":
                out.append(f"log: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Network.loadingFailed":
                out.append(f"load failed: {p.get('errorText')}")
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: str, max_height: int = 16000) -> tuple[int, int]:
        """A PNG of the whole page (up to ``max_height`` px); returns (width, height)."""
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        height = min(int(size["height"]) + 1, max_height)
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        data = self.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": False})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return self.width, height
