"""Headless Chromium fetches from fulmen over HTTP/3: after the Alt-Svc of an HTTP/2 response,
and with QUIC forced from the first request (`tests.chromium` says which flags this takes and
why). Skipped when Chromium is not installed (`.ci/run` installs it where apt-get is
available)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from tests.chromium import CHROMIUM, browser, http3_flags
from tests.conftest import TIMEOUT, Certs

# The page asks /ping (POSTing a body, echoed back with the protocol the server saw) until
# the server sees HTTP/3, at most 30 times, then reports what it saw to /result.
PAGE = b"""<!doctype html><html><head><meta charset="utf-8"><title>h3</title></head><body>
<script>
(async () => {
  const seen = [];
  for (let i = 0; i < 30; i++) {
    const response = await fetch("/ping?i=" + i, {method: "POST", body: "body " + i});
    const text = await response.text();
    seen.push(text);
    if (text.startsWith("3 ")) break;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  await fetch("/result?seen=" + encodeURIComponent(seen.join(",")));
})();
</script></body></html>"""


class Recorder:
    """What the server saw, written from the server's thread and read by the test."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.versions: list[tuple[str, str]] = []  # (path, http_version)
        self.seen = ""

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        with self.lock:
            self.versions.append((scope["path"], scope["http_version"]))
        if scope["path"] == "/ping":
            answer, content_type = f"{scope['http_version']} {body.decode()}", b"text/plain"
        elif scope["path"] == "/result":
            with self.lock:
                self.seen = parse_qs(scope["query_string"].decode())["seen"][0]
            self.done.set()
            answer, content_type = "ok", b"text/plain"
        else:
            answer, content_type = PAGE.decode(), b"text/html; charset=utf-8"
        headers = [(b"content-type", content_type), (b"cache-control", b"no-store")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": answer.encode()})


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("force", [False, True], ids=["alt-svc", "forced"])
def test_chromium_over_http3(serve_one: Any, certs: Certs, force: bool) -> None:
    """Alt-Svc: the page comes over HTTP/2 and a later fetch over HTTP/3. Forced: every
    request is HTTP/3. Either way a POST body arrives whole and its echo comes back."""
    recorder = Recorder()
    tls = {"ssl_certfile": certs.cert, "ssl_keyfile": certs.key, "http3": True}
    with serve_one(recorder.app, **tls) as srv:
        flags = http3_flags("127.0.0.1", srv.port, Path(certs.cert).read_bytes(), force=force)
        with browser(f"https://127.0.0.1:{srv.port}/", *flags) as output:
            assert recorder.done.wait(TIMEOUT), f"no result from the browser:\n{output()}"
    with recorder.lock:
        versions = dict(recorder.versions)
        seen = recorder.seen.split(",")
    assert seen[-1].startswith("3 body "), seen
    assert versions["/result"] == "3"
    assert versions["/"] == ("3" if force else "2")
    if not force:
        assert seen[0] == "2 body 0", seen
