"""Both parsers give one answer over a real socket, at once: a request head that its bytes
show malformed is answered before it ends (never at the header timeout, 60 s here, while the
client waits at most 5 s), a malformed body gets 400 while the app has not begun its
response, and HTTP/2's preface is never an HTTP/1.1 request. Over both parsers and both
loops; the bytes are sent as they are, with no end of stream after them."""

from __future__ import annotations

import logging
import threading
from typing import Any

import pytest

from tests.conftest import TIMEOUT
from tests.protocols.http1_raw import Reader
from tests.protocols.test_llhttp_corpus import parse

HEAD_TIMEOUT = 60  # the server's --timeout-request-header
WAIT = 5.0  # how long the client waits for an answer
HOST = b"Host: a\r\n"


def post(*headers: bytes, body: bytes = b"") -> bytes:
    return b"POST / HTTP/1.1\r\n" + HOST + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


CHUNKED = b"Transfer-Encoding: chunked"

# Heads cut short: their bytes so far can never become a valid head.
INCOMPLETE = {
    "duplicate-content-length": (
        b"PUT /url HTTP/1.1\r\n" + HOST + b"Content-Length: 1\r\nContent-Length: 2\r\n",
        400,
    ),
    "content-length-overflow": (
        b"PUT /url HTTP/1.1\r\n" + HOST + b"Content-Length: 1000000000000000000000\r\n",
        400,
    ),
    "missing-crlfcrlf-before-body": (
        b"PUT /url HTTP/1.1\r\n" + HOST + b"Content-Length: 3\r\n\rabc",
        400,
    ),
    "headers-separated-by-junk": (
        b"GET / HTTP/1.1\r\n" + HOST + b"\rZGET /evil: HTTP/1.1\r\n",
        400,
    ),
    "invalid-version": (b"GET / HTTP/5.6", 505),
    "space-after-start-line": (b"GET / HTTP/1.1\r\n Host: foo", 400),
    "cr-without-lf": (b"POST / HTTP/1.1\r\n" + HOST + b"x:\rTransfer-Encoding: chunked\r\n", 400),
    "two-spaces-before-target": (b"GET  / HTTP/1.1\r\n", 400),
}

# Whole requests, the body (if any) in the same send.
WHOLE = {
    "two-spaces-before-target": (b"GET  / HTTP/1.1\r\n" + HOST + b"\r\n", 400),
    "two-spaces-before-version": (b"GET /  HTTP/1.1\r\n" + HOST + b"\r\n", 400),
    "h2-preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "pri-method": (b"PRI * HTTP/1.1\r\n" + HOST + b"\r\n", 400),
    "empty-coding-after-chunked": (post(b"Transfer-Encoding: chunked,", body=b"0\r\n\r\n"), 400),
    "empty-transfer-encoding-field": (
        post(b"Transfer-Encoding:", CHUNKED, body=b"0\r\n\r\n"),
        400,
    ),
    "empty-chunk-size": (post(CHUNKED, body=b"\r\na\r\n0\r\n\r\n"), 400),
    "invalid-chunk-size": (post(CHUNKED, body=b"zz\r\na\r\n0\r\n\r\n"), 400),
    "bare-lf-after-chunk-size": (post(CHUNKED, body=b"1\na\r\n0\r\n\r\n"), 400),
    "chunk-data-longer-than-size": (post(CHUNKED, body=b"1\r\nabc\r\n0\r\n\r\n"), 400),
    "chunk-data-without-crlf": (post(CHUNKED, body=b"1\r\naXY0\r\n\r\n"), 400),
    "bad-chunk-then-a-request": (
        post(CHUNKED, body=b"zz\r\n") + b"GET /next HTTP/1.1\r\n" + HOST + b"\r\n",
        400,
    ),
    "content-length-in-trailers": (
        post(CHUNKED, body=b"1\r\na\r\n0\r\nContent-Length: 5\r\n\r\n"),
        400,
    ),
    "transfer-encoding-in-trailers": (
        post(CHUNKED, body=b"1\r\na\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        400,
    ),
}


class EchoApp:
    """Answers 200 with the request body; notes each request's path and whether its app saw
    `http.disconnect`."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.disconnected = threading.Event()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.paths.append(scope["path"])
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
                return
            body += message["body"]
            if not message["more_body"]:
                break
        headers = [(b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def answer(serve: Any, raw: bytes) -> tuple[int, bool, EchoApp, Any]:
    """Send `raw` alone on a connection: the status answered within `WAIT` seconds, whether
    the connection then closed, the app, and the server (for its log)."""
    app = EchoApp()
    options = {"http2": False, "timeout_request_header": HEAD_TIMEOUT}
    with serve(app, **options) as srv, srv.connect() as sock:
        sock.settimeout(WAIT)
        sock.sendall(raw)
        reader = Reader(sock)
        status = reader.response().status
        closed = reader.closed()
    return status, closed, app, srv


@pytest.mark.parametrize("name", list(INCOMPLETE))
def test_a_head_is_refused_as_soon_as_its_bytes_show_it(serve, name: str) -> None:
    raw, status = INCOMPLETE[name]
    answered, closed, app, _ = answer(serve, raw)
    assert (answered, closed, app.paths) == (status, True, [])


@pytest.mark.parametrize("name", list(WHOLE))
def test_a_malformed_request_is_refused(serve, name: str) -> None:
    raw, status = WHOLE[name]
    answered, closed, app, srv = answer(serve, raw)
    assert (answered, closed) == (status, True)
    assert "/next" not in app.paths
    assert srv.messages(logging.ERROR) == []


def test_empty_list_elements_before_chunked_are_ignored(serve) -> None:
    """RFC 9110 §5.6.1: `Transfer-Encoding: ,chunked` is `chunked`."""
    app = EchoApp()
    raw = post(b"Transfer-Encoding: , chunked", body=b"3\r\nabc\r\n0\r\n\r\n")
    with serve(app) as srv, srv.connect() as sock:
        sock.sendall(raw)
        response = Reader(sock).response()
    assert (response.status, response.body) == (200, b"abc")


def test_a_malformed_body_while_the_app_reads_it_gets_400(serve) -> None:
    """The app has taken the first chunk and waits for more: the bad chunk that follows is
    answered 400, the connection closes, and the app sees `http.disconnect`."""
    app = EchoApp()
    first = threading.Event()

    async def reading(scope: Any, receive: Any, send: Any) -> None:
        message = await receive()
        assert message["body"] == b"abc" and message["more_body"]
        first.set()
        await app(scope, receive, send)

    with serve(reading) as srv, srv.connect() as sock:
        sock.sendall(post(CHUNKED, body=b"3\r\nabc\r\n"))
        assert first.wait(TIMEOUT)
        sock.sendall(b"zz\r\n")
        reader = Reader(sock)
        assert reader.response().status == 400
        assert reader.closed()
        assert app.disconnected.wait(TIMEOUT)
    assert srv.messages(logging.ERROR) == []


def test_a_malformed_body_after_the_response_began_cuts_it(serve) -> None:
    """Once the head of the response is sent, a bad chunk can only end the connection: the
    response stops short of its end, and the app sees `http.disconnect`."""
    disconnected = threading.Event()

    async def streaming(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"begun", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected.set()

    with serve(streaming) as srv, srv.connect() as sock:
        sock.sendall(post(CHUNKED, body=b"3\r\nabc\r\n"))
        reader = Reader(sock)
        head = reader.head()
        assert (head.status, head.get("transfer-encoding")) == (200, "chunked")
        sock.sendall(b"zz\r\n")
        rest = reader.until_closed()
        assert rest.startswith(b"5\r\nbegun\r\n") and not rest.endswith(b"0\r\n\r\n"), rest
        assert disconnected.wait(TIMEOUT)
    assert srv.messages(logging.ERROR) == []


SPLIT_INPUTS = [
    b"GET / HTTP/1.1\r\n" + HOST + b"\r\nGET /b HTTP/1.1\r\n" + HOST + b"\r\n",
    post(b"Content-Length: 3", body=b"abc") + b"GET  / HTTP/1.1\r\n" + HOST + b"\r\n",
    b"\r\nGET / HTTP/1.1\r\n" + HOST + b"\r\nGET /  HTTP/1.1\r\n" + HOST + b"\r\n",
    post(CHUNKED, body=b"2\r\n  \r\n0\r\n\r\n") + b"GET / HTTP/1.1\r\n" + HOST + b"\r\n",
    b"GET / HTTP/1.1\r\n" + HOST + b"\r\nGET  / HTTP/1.1\r\n" + HOST + b"\r\n",
    b"GET / HTTP/1.1\r\nX: a  b\r\n" + HOST + b"\r\nGET / HTTP/1.1\r\n" + HOST + b"\r\n",
]


@pytest.mark.parametrize("raw", SPLIT_INPUTS, ids=range(len(SPLIT_INPUTS)))
def test_the_adapters_agree_however_the_bytes_are_split(raw: bytes) -> None:
    """Cut into three pieces at every pair of places, each input gets one verdict from both
    adapters (what they completed, and the status they raised, if any)."""
    verdicts = {
        (parser, parse(parser, *[p for p in (raw[:i], raw[i:j], raw[j:]) if p]))
        for parser in ("h11", "httptools")
        for i in range(len(raw) + 1)
        for j in range(i, len(raw) + 1)
    }
    assert len({verdict for _, verdict in verdicts}) == 1, verdicts
