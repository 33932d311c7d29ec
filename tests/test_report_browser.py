"""report.html in a real browser: CircuitsVis renders, and the page fetches nothing external.

Headless Chromium is driven over the DevTools protocol on a pipe
(``--remote-debugging-pipe``: no port, no websocket library). The page-level
checks, strongest first:

1. every request the page issued (``Network.requestWillBeSent``, which also
   sees failed and blocked ones) has a ``file:``/``data:``/``blob:``/``about:``
   URL, and the only file is the report itself;
2. ``performance.getEntriesByType("resource")`` lists no fetched resources
   other than ``data:`` ones;
3. after rendering, no element of the live DOM has a ``src``/``href``/``srcset``/
   ``poster``/``data`` attribute or a CSS ``url(...)`` pointing outside the file.

Name resolution is also switched off (``--host-resolver-rules``), so even a
missed request could not leave the machine. A negative control (a page using
CircuitsVis' CDN rendering and a remote image) must trip check 1, proving the
detector can fail. Chromium's own background traffic (e.g. component and time
updates, seen in a browser-wide net log even with ``--disable-background-networking``)
is not the page's and is not counted.

Skips only when no Chromium binary exists (CI installs the ``chromium`` package).
Set ``TL_TRANSPLANT_ARTIFACTS=dir`` to keep the report and its screenshot.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND",
)
LOCAL_SCHEMES = ("file:", "data:", "blob:", "about:")


def find_chromium() -> str | None:
    env = os.environ.get("TL_TRANSPLANT_CHROMIUM")
    if env:
        return env
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """Headless Chromium driven by the DevTools protocol over ``--remote-debugging-pipe``.

    Chromium reads commands on fd 3 and writes replies/events on fd 4, each a
    JSON message ended by a NUL byte.
    """

    def __init__(self, exe: str, user_data_dir: Path) -> None:
        to_chrome_r, to_chrome_w = os.pipe()
        from_chrome_r, from_chrome_w = os.pipe()
        # Copies above fd 10, so that bash's 3<&a 4>&b cannot clobber one with the other
        # (bash, not sh: dash takes single-digit fd numbers only).
        a = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
        b = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        args = [*FLAGS, "--remote-debugging-pipe", f"--user-data-dir={user_data_dir}",
                "about:blank"]
        self.proc = subprocess.Popen(
            [shutil.which("bash") or "/bin/bash", "-c", f'exec "$0" "$@" 3<&{a} 4>&{b}', exe,
             *args],
            pass_fds=(a, b),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for fd in (to_chrome_r, from_chrome_w, a, b):
            os.close(fd)
        self._w = os.fdopen(to_chrome_w, "wb", buffering=0)
        self._r = os.fdopen(from_chrome_r, "rb", buffering=0)
        self._q: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self._id = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = self._r.read(1 << 16)
            if not chunk:
                self._q.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                msg, buf = buf.split(b"\0", 1)
                self._q.put(json.loads(msg))

    def _next(self, timeout: float) -> dict[str, Any] | None:
        try:
            m = self._q.get(timeout=max(0.01, timeout))
        except queue.Empty:
            return None
        if m is None:
            raise RuntimeError("Chromium closed the DevTools pipe (did it crash?)")
        return m

    def send(self, method: str, params: dict | None = None, session: str | None = None,
             timeout: float = 30.0) -> dict[str, Any]:
        self._id += 1
        mid = self._id
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self._w.write(json.dumps(msg).encode() + b"\0")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = self._next(end - time.monotonic())
            if m is None:
                continue
            if m.get("id") == mid:
                if "error" in m:
                    raise RuntimeError(f"{method}: {m['error']}")
                return m.get("result", {})
            self.events.append(m)
        raise TimeoutError(f"no reply to {method} within {timeout}s")

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            m = self._next(min(0.05, end - time.monotonic()))
            if m is not None:
                self.events.append(m)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:  # noqa: BLE001 - best effort; kill below
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


_CV_STATE = """JSON.stringify([...document.querySelectorAll('.tlt-cv')].map(e => ({
  id: e.id, component: e.dataset.cvComponent, status: e.getAttribute('data-cv-status'),
  children: e.childElementCount, height: e.getBoundingClientRect().height,
  text: (e.innerText || '').length, svg: e.querySelectorAll('svg,canvas').length})))"""

_EXTERNAL_REFS = """(() => {
  const bad = [];
  const ok = v => !v || /^(data:|blob:|about:|#|javascript:void)/i.test(v.trim());
  for (const el of document.querySelectorAll('*')) {
    for (const a of ['src', 'href', 'srcset', 'poster', 'data', 'action', 'xlink:href']) {
      const v = el.getAttribute(a);
      if (v !== null && !ok(v)) bad.push(el.tagName + '[' + a + ']=' + v.slice(0, 80));
    }
    const st = el.getAttribute('style') || '';
    for (const m of st.matchAll(/url\\(([^)]*)\\)/g)) {
      if (!ok(m[1].replace(/["']/g, ''))) bad.push(el.tagName + ' style url ' + m[1]);
    }
  }
  for (const s of document.styleSheets) {
    for (const r of s.cssRules) {
      for (const m of r.cssText.matchAll(/url\\(([^)]*)\\)/g)) {
        if (!ok(m[1].replace(/["']/g, ''))) bad.push('css url ' + m[1]);
      }
    }
  }
  const fetched = performance.getEntriesByType('resource').map(e => e.name)
    .filter(n => !/^data:/.test(n));
  const imgs = [...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0]);
  return JSON.stringify({bad, fetched, imgs});
})()"""


def visit(browser: Chromium, path: Path, *, want_rendered: bool, screenshot: bool = False,
          timeout: float = 30.0) -> dict[str, Any]:
    """Load a file in a fresh tab; wait for CircuitsVis; return requests, DOM facts, PNG."""
    tid = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    sid = browser.send("Target.attachToTarget", {"targetId": tid, "flatten": True})["sessionId"]
    for m in ("Network.enable", "Page.enable", "Runtime.enable"):
        browser.send(m, session=sid)
    browser.send("Emulation.setDeviceMetricsOverride",
                 {"width": 1400, "height": 1000, "deviceScaleFactor": 1, "mobile": False},
                 session=sid)
    start = len(browser.events)

    def mine(name: str) -> list[dict[str, Any]]:
        return [e for e in browser.events[start:]
                if e.get("method") == name and e.get("sessionId") == sid]

    browser.send("Page.navigate", {"url": path.resolve().as_uri()}, session=sid)
    end = time.monotonic() + timeout
    while not mine("Page.loadEventFired"):
        if time.monotonic() > end:
            raise TimeoutError(f"{path.name} did not finish loading")
        browser.pump(0.05)
    state: list[dict[str, Any]] = []
    while time.monotonic() < end:
        r = browser.send("Runtime.evaluate", {"expression": _CV_STATE, "returnByValue": True},
                         session=sid)
        state = json.loads(r["result"]["value"])
        done = all(s["status"] is not None for s in state)
        if done and (not want_rendered or all(s["children"] > 0 for s in state)):
            break
        browser.pump(0.1)
    browser.pump(0.5)  # late requests (lazy images, timers) still get recorded
    r = browser.send("Runtime.evaluate", {"expression": _EXTERNAL_REFS, "returnByValue": True},
                     session=sid)
    dom = json.loads(r["result"]["value"])
    png = None
    if screenshot:
        m = browser.send("Page.getLayoutMetrics", session=sid)
        size = m.get("cssContentSize") or m["contentSize"]
        clip = {"x": 0, "y": 0, "width": 1400, "height": min(float(size["height"]), 16000.0),
                "scale": 1}
        shot = browser.send("Page.captureScreenshot",
                            {"format": "png", "captureBeyondViewport": True, "clip": clip},
                            session=sid)
        png = base64.b64decode(shot["data"])
    browser.send("Target.closeTarget", {"targetId": tid})
    requests = [e["params"]["request"]["url"] for e in mine("Network.requestWillBeSent")]
    sockets = [e["params"]["url"] for e in mine("Network.webSocketCreated")]
    errors = [e["params"]["exceptionDetails"].get("text", "") + " " + json.dumps(
        e["params"]["exceptionDetails"].get("exception", {}).get("description", ""))[:300]
        for e in mine("Runtime.exceptionThrown")]
    return {"cv": state, "requests": requests + sockets, "dom": dom, "errors": errors,
            "png": png}


def external(requests: list[str]) -> list[str]:
    return [u for u in requests if not u.startswith(LOCAL_SCHEMES)]


# ---- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium(tmp_path_factory: pytest.TempPathFactory):
    exe = find_chromium()
    if exe is None:
        pytest.skip(
            "Chromium is not installed, so report.html cannot be checked in a real browser; "
            "install it with `apt-get install -y chromium` (.ci/run does this)"
        )
    b = Chromium(exe, tmp_path_factory.mktemp("chromium-profile"))
    try:
        b.send("Browser.getVersion", timeout=60)
        yield b
    finally:
        b.close()


def labelled(side: Any, prompts: list[str], name: str) -> Any:
    """A task whose answers are ``side``'s own greedy next tokens (special tokens dropped)."""
    import torch

    from tl_transplant.tasks.task import Task
    from tl_transplant.tasks.tokens import encode

    tok = side.tokenizer
    enc = encode(tok, prompts, None, prepend_bos=True)
    with torch.inference_mode():
        logits = side.bridge(enc.input_ids)
    pred = logits[torch.arange(len(prompts)), enc.prompt_len - 1].argmax(-1).tolist()
    keep = [i for i, t in enumerate(pred) if t >= 4]
    return Task(name, [prompts[i] for i in keep],
                [" " + tok.convert_ids_to_tokens(pred[i]) for i in keep], prepend_bos=True)


@pytest.fixture(scope="module")
def report(pair_dirs, tmp_path_factory: pytest.TempPathFactory):
    """A full report of a tiny llama pair: a task the source gets right, a control the
    target gets right, two score methods, a sweep with a retention limit."""
    from tl_transplant import ModelPair
    from tl_transplant.report import save_sweep
    from tl_transplant.scoring import score
    from tl_transplant.sweeps.protocol import sweep
    from tl_transplant.tasks.builtin import builtin_task

    pair = ModelPair.load(*pair_dirs("llama"))
    pool = builtin_task("induction", n=60, seed=0).prompts
    task = labelled(pair.source, pool[:30], "induction <b>&amp;</b>")  # must come out escaped
    control = labelled(pair.target, pool[30:], "control")
    scores = {
        "weight_diff": score(pair, None, "weight_diff", units=("head", "neuron"), progress=False),
        "attribution": score(pair, task.replace(metric="answer_logprob"), "attribution",
                             units=("head", "neuron"), progress=False),
    }
    res = sweep(pair, task, scores, ks=[1, 2, 4, 8], alphas=[0.5, 1.0],
                control_tasks=[control], units=("head", "neuron"), max_retention_drop=0.6,
                progress=False, n_boot=200)
    out = tmp_path_factory.mktemp("report")
    save_sweep(res, out, pair=pair, task=task, scores=scores)
    path = out / "report.html"
    keep = os.environ.get("TL_TRANSPLANT_ARTIFACTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / "report.html")
    return path


# ---- tests -------------------------------------------------------------------------------


def test_report_renders_in_chromium_without_external_requests(chromium, report):
    html = report.read_text(encoding="utf-8")
    assert "unpkg.com" not in html and "<title>" in html
    assert "induction &lt;b&gt;&amp;amp;&lt;/b&gt;" in html  # task name escaped, not markup
    got = visit(chromium, report, want_rendered=True, screenshot=True)

    cv = got["cv"]
    assert len(cv) >= 6, cv  # 3 attention panels + neuron panels
    assert {c["component"] for c in cv} >= {"AttentionHeads", "ColoredTokens"}
    for c in cv:
        assert c["status"] == "rendered", c
        assert c["children"] > 0 and c["height"] > 10, c  # the React tree is really there
    attn = [c for c in cv if c["component"] == "AttentionHeads"]
    assert all(c["svg"] > 0 or c["text"] > 20 for c in attn), attn
    assert got["errors"] == []

    assert external(got["requests"]) == [], got["requests"]
    files = [u for u in got["requests"] if u.startswith("file:")]
    assert files == [report.resolve().as_uri()]
    assert got["dom"]["bad"] == [] and got["dom"]["fetched"] == [], got["dom"]
    imgs = got["dom"]["imgs"]
    assert len(imgs) >= 3 and all(ok for _, ok in imgs), imgs  # sweep plot + heatmaps decode

    png = got["png"]
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    img = imread(io.BytesIO(png))
    assert img.shape[1] == 1400 and img.shape[0] > 1500
    assert float(img[..., :3].std()) > 0.05  # not a blank page
    keep = os.environ.get("TL_TRANSPLANT_ARTIFACTS")
    if keep:
        (Path(keep) / "report.png").write_bytes(png)


def test_detector_sees_cdn_and_remote_requests(chromium, tmp_path):
    """Negative control: CircuitsVis' default (CDN) HTML and a remote image are caught."""
    import circuitsvis as cv

    from tl_transplant.report.views import CircuitsVisView, CVPanel

    cdn = str(cv.tokens.colored_tokens(["a", "b"], [1.0, -1.0]))  # str() = the CDN form
    assert "unpkg.com" in cdn
    view = CircuitsVisView("x", [("", [CVPanel("ColoredTokens", {"tokens": ["a"],
                                                                  "values": [1.0]})])])
    body = view.to_html(include_bundle=False)  # no bundle: the panel must report an error
    page = tmp_path / "bad.html"
    page.write_text(f"<html><body>{cdn}<img src='http://example.invalid/x.png'>{body}"
                    "</body></html>")
    got = visit(chromium, page, want_rendered=False)
    ext = external(got["requests"])
    assert any("unpkg.com" in u for u in ext), got["requests"]
    assert any("example.invalid" in u for u in ext), got["requests"]
    assert any("example.invalid" in b for b in got["dom"]["bad"]), got["dom"]
    assert [c["status"] for c in got["cv"]] == ["error"]


def test_saved_view_is_self_contained(chromium, pair_dirs, tmp_path):
    """A CircuitsVisView saved on its own also renders offline (interactive neuron view)."""
    from tl_transplant import ModelPair
    from tl_transplant.report.views import neuron_compare

    pair = ModelPair.load(*pair_dirs("llama"))
    view = neuron_compare(pair, ["w1 w2 w3", "w4 w5"], ["L0.N1", "L1.N3"], view="interactive")
    path = view.save(tmp_path / "neurons.html")
    got = visit(chromium, path, want_rendered=True)
    assert [c["component"] for c in got["cv"]] == ["TextNeuronActivations"] * 3
    assert all(c["status"] == "rendered" and c["children"] > 0 for c in got["cv"]), got["cv"]
    assert external(got["requests"]) == [] and got["errors"] == []
