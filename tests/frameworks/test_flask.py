"""Flask under fulmen through `interface="wsgi"` (tests/frameworks/apps_flask.py): request
bodies, a streamed response whose first chunk arrives before the rest is produced, and the 500
page followed by a request that is still served, over a real server and a real client.

Two tests guard fulmen bugs this matrix found: a chunked request body (the WSGI environ needs
`wsgi.input_terminated`), and a keep-alive request that arrives while the app is finishing its
response (Werkzeug's final message comes after the iterable is closed).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

import httpx

from tests.conftest import TIMEOUT, RunningServer, recv_response
from tests.frameworks import apps_flask
from tests.frameworks.apps_flask import app

ServeApp = Callable[..., contextlib.AbstractContextManager[RunningServer]]


def client_for(srv: RunningServer) -> httpx.Client:
    """A keep-alive client: every request after the first reuses the connection."""
    return httpx.Client(base_url=srv.url, timeout=TIMEOUT)


def test_hello_and_not_found(serve_app: ServeApp) -> None:
    with serve_app(app, interface="wsgi") as srv, client_for(srv) as client:
        response = client.get("/hello")
        assert response.status_code == 200
        assert response.text == "hello from flask"
        assert client.get("/missing").status_code == 404


def test_post_echoes_a_large_body(serve_app: ServeApp) -> None:
    body = os.urandom(100 * 1024)
    with serve_app(app, interface="wsgi") as srv, client_for(srv) as client:
        response = client.post("/echo", content=body)
        assert response.status_code == 200
        assert response.content == body


def test_streamed_response_arrives_in_chunks(serve_app: ServeApp) -> None:
    with serve_app(app, interface="wsgi") as srv, client_for(srv) as client:
        apps_flask.GATE.clear()
        with client.stream("GET", "/stream", params={"name": "tester"}) as response:
            assert response.status_code == 200
            assert "content-length" not in response.headers
            chunks = response.iter_raw()
            first = next(chunks)  # sent while the generator waits for this very read
            apps_flask.GATE.set()
            rest = b"".join(chunks)
        assert first == b"first\n"
        assert rest == b"released\nbye tester\n"


def test_error_page_then_the_next_request(serve_app: ServeApp) -> None:
    with serve_app(app, interface="wsgi") as srv, client_for(srv) as client:
        failed = client.get("/error")
        assert failed.status_code == 500
        assert "boom" not in failed.text
        assert client.get("/hello").text == "hello from flask"
        assert srv.messages(logging.ERROR) == []  # Flask handled it: fulmen has nothing to log


def test_chunked_request_body_reaches_flask(serve_app: ServeApp) -> None:
    body = os.urandom(64 * 1024)
    with serve_app(app, interface="wsgi") as srv, client_for(srv) as client:
        response = client.post("/echo", content=iter([body[:1000], body[1000:]]))  # chunked
        assert response.status_code == 200
        assert response.content == body


def test_keep_alive_request_sent_while_the_app_finishes(serve_app: ServeApp) -> None:
    with serve_app(app, interface="wsgi") as srv, contextlib.closing(srv.connect()) as sock:
        apps_flask.GATE.clear()
        sock.sendall(b"GET /linger HTTP/1.1\r\nHost: test\r\n\r\n")
        assert recv_response(sock).endswith(b"\r\n\r\ndone")  # whole; the app still runs
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: test\r\n\r\n")
        apps_flask.GATE.set()
        sock.settimeout(3.0)  # the answer comes at once, or never
        assert recv_response(sock).endswith(b"\r\n\r\nhello from flask")
