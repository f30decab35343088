"""A real browser (headless Chromium) talks WebSocket to fulmen, over both engines.

The page at `/` opens `ws://<host>/ws`, sends non-ASCII text, and reports the echo (or an
unclean close) back with `fetch("/result?...")`; the test waits for that report, then stops the
browser. Skipped when Chromium is not installed (`.ci/run` installs it where apt-get is
available).
"""

from __future__ import annotations

import json
import threading
from typing import Any
from urllib.parse import parse_qs

import pytest

from tests.chromium import CHROMIUM, browser
from tests.conftest import TIMEOUT

TEXT = "héllo wörld ✓ 日本語 🚀"

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>fulmen</title></head><body><script>
const sent = %s;  // JSON: ASCII escapes, so the page encoding cannot alter it
const report = (key, value) => fetch("/result?" + key + "=" + encodeURIComponent(value));
const scheme = location.protocol === "https:" ? "wss://" : "ws://";
const ws = new WebSocket(scheme + location.host + "/ws");
ws.onopen = () => ws.send(sent);
ws.onmessage = (event) => { ws.close(1000); report("echo", event.data); };
ws.onclose = (event) => { if (!event.wasClean) report("error", "closed " + event.code); };
</script></body></html>
"""


class Recorder:
    """What the server saw, written from the server's thread and read by the test."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.first_message = ""
        self.connect_headers: dict[str, str] = {}
        self.versions: dict[str, str] = {}  # scope type -> http_version
        self.received: list[str] = []
        self.result: dict[str, str] = {}

    async def app(self, scope: Any, receive: Any, send: Any) -> None:
        with self.lock:
            self.versions[scope["type"]] = scope["http_version"]
        if scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
            return
        if scope["path"] == "/result":
            query = parse_qs(scope["query_string"].decode("ascii"))
            with self.lock:
                self.result = {key: values[0] for key, values in query.items()}
            self.done.set()
            body, content_type = b"ok", b"text/plain"
        else:
            body, content_type = (PAGE % json.dumps(TEXT)).encode(), b"text/html; charset=utf-8"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", content_type)],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def websocket(self, scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        with self.lock:
            self.first_message = message["type"]
            self.connect_headers = {k.decode(): v.decode() for k, v in scope["headers"]}
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            with self.lock:
                self.received.append(message["text"])
            await send({"type": "websocket.send", "text": message["text"]})


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("engine", ["websockets", "wsproto"])
def test_browser_websocket_echo(serve_one: Any, engine: str) -> None:
    """Chromium's WebSocket echoes non-ASCII text through fulmen (with its deflate offer)."""
    recorder = Recorder()
    with (
        serve_one(recorder.app, ws=engine) as srv,
        browser(srv.url + "/", "--disable-quic") as output,
    ):
        assert recorder.done.wait(TIMEOUT), f"no result from the browser:\n{output()}"
    with recorder.lock:
        assert recorder.result == {"echo": TEXT}
        assert recorder.received == [TEXT]
        assert recorder.first_message == "websocket.connect"
        headers = recorder.connect_headers
    assert headers["origin"] == srv.url
    assert "permessage-deflate" in headers["sec-websocket-extensions"]


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("engine", ["websockets", "wsproto"])
def test_browser_websocket_over_http2(serve_one: Any, certs: Any, engine: str) -> None:
    """Over TLS, Chromium loads the page with HTTP/2 (ALPN h2) and, offered extended CONNECT,
    opens its WebSocket as a stream of that connection (RFC 8441)."""
    recorder = Recorder()
    tls = {"ssl_certfile": certs.cert, "ssl_keyfile": certs.key}
    with serve_one(recorder.app, ws=engine, **tls) as srv:
        url = f"https://localhost:{srv.port}/"
        with browser(url, "--disable-quic", "--ignore-certificate-errors") as output:
            assert recorder.done.wait(TIMEOUT), f"no result from the browser:\n{output()}"
    with recorder.lock:
        assert recorder.result == {"echo": TEXT}
        assert recorder.received == [TEXT]
        assert recorder.versions == {"http": "2", "websocket": "2"}
        headers = recorder.connect_headers
    assert "permessage-deflate" in headers["sec-websocket-extensions"]
