"""Malformed and hostile requests: each gets its defined status and a closed connection, the
same from both parsers, the app never sees it, and the server keeps serving afterwards.

One table holds every case; each is sent in one piece and again in many small pieces (TCP
without Nagle), so that the parsers' incremental paths see the same bytes split anywhere.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.conftest import RunningServer, recv_response, recv_until_closed
from tests.protocols.test_llhttp_corpus import parse

HOST = b"Host: example.test\r\n"


def get(head: bytes = HOST, target: bytes = b"/", version: bytes = b"1.1") -> bytes:
    return b"GET %b HTTP/%b\r\n%b\r\n" % (target, version, head)


def post(*headers: bytes, body: bytes = b"") -> bytes:
    return b"POST / HTTP/1.1\r\n" + HOST + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def many_headers(total: int) -> bytes:
    """About `total` bytes of ordinary 100-byte header lines."""
    return b"".join(b"X-Filler-%04d: %s\r\n" % (i, b"v" * 84) for i in range(total // 100 + 1))


@dataclass(frozen=True)
class Case:
    raw: bytes
    status: int
    options: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {
    # Malformed request line (RFC 9112 §3)
    "garbage-line": Case(b"GARBAGE\r\n\r\n", 400),
    "bad-method-char": Case(b"G(T / HTTP/1.1\r\n" + HOST + b"\r\n", 400),
    "space-in-target": Case(get(target=b"/a b"), 400),
    "control-in-target": Case(get(target=b"/a\x01b"), 400),
    "non-ascii-target": Case(get(target=b"/caf\xc3\xa9"), 400),
    "lowercase-http": Case(b"GET / http/1.1\r\n" + HOST + b"\r\n", 400),
    "relative-target": Case(get(target=b"foo"), 400),
    # Malformed header lines (RFC 9110 §5.1, §5.5; RFC 9112 §5)
    "bad-header-name": Case(get(HOST + b"Fo@: x\r\n"), 400),
    "header-without-colon": Case(get(HOST + b"Foo\r\n"), 400),
    "space-before-colon": Case(get(HOST + b"Foo : x\r\n"), 400),
    "empty-header-name": Case(get(HOST + b": x\r\n"), 400),
    "nul-in-value": Case(get(HOST + b"Foo: a\x00b\r\n"), 400),
    "escape-in-value": Case(get(HOST + b"Foo: a\x1b[2Jb\r\n"), 400),
    "del-in-value": Case(get(HOST + b"Foo: a\x7fb\r\n"), 400),
    "whitespace-before-first-header": Case(b"GET / HTTP/1.1\r\n Foo: x\r\n" + HOST + b"\r\n", 400),
    # Line endings and folding (RFC 9112 §2.2, §5.2)
    "obs-fold-space": Case(get(HOST + b"Foo: a\r\n b\r\n"), 400),
    "obs-fold-tab": Case(get(HOST + b"Foo: a\r\n\tb\r\n"), 400),
    "bare-lf-everywhere": Case(b"GET / HTTP/1.1\n" + HOST[:-2] + b"\n\n", 400),
    "bare-lf-in-headers": Case(b"GET / HTTP/1.1\r\nFoo: a\n" + HOST + b"\r\n", 400),
    "bare-lf-after-request-line": Case(b"GET / HTTP/1.1\n" + HOST + b"\r\n", 400),
    "bare-cr-in-headers": Case(b"GET / HTTP/1.1\r\nFoo: a\rBar: b\r\n" + HOST + b"\r\n", 400),
    # Host (RFC 9112 §3.2)
    "missing-host": Case(get(b""), 400),
    "duplicate-host": Case(get(HOST + HOST), 400),
    "host-with-space": Case(get(b"Host: a b\r\n"), 400),
    "host-with-slash": Case(get(b"Host: a/b\r\n"), 400),
    "host-with-at": Case(get(b"Host: user@a\r\n"), 400),
    # Versions (RFC 9110 §15.6.6)
    "http-2.0": Case(get(version=b"2.0"), 505),
    "http-3.0": Case(get(version=b"3.0"), 505),
    "http-0.9-with-headers": Case(get(version=b"0.9"), 505),
    "http-1.2": Case(get(version=b"1.2"), 505),
    "http-0.9-simple-request": Case(b"GET /\r\n\r\n", 505),
    # Framing (RFC 9112 §6)
    "length-and-chunked": Case(
        post(b"Content-Length: 5", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400
    ),
    "chunked-and-length": Case(
        post(b"Transfer-Encoding: chunked", b"Content-Length: 5", body=b"0\r\n\r\n"), 400
    ),
    "duplicate-length-same": Case(
        post(b"Content-Length: 5", b"Content-Length: 5", body=b"hello"), 400
    ),
    "duplicate-length-different": Case(
        post(b"Content-Length: 5", b"Content-Length: 6", body=b"hello!"), 400
    ),
    "length-list": Case(post(b"Content-Length: 5, 5", body=b"hello"), 400),
    "length-plus": Case(post(b"Content-Length: +5", body=b"hello"), 400),
    "length-negative": Case(post(b"Content-Length: -1"), 400),
    "length-letters": Case(post(b"Content-Length: abc"), 400),
    "length-empty": Case(post(b"Content-Length: "), 400),
    "length-hex": Case(post(b"Content-Length: 0x5", body=b"hello"), 400),
    "length-overflow": Case(post(b"Content-Length: 1" + b"0" * 24), 400),
    "coding-gzip": Case(post(b"Transfer-Encoding: gzip"), 400),
    "coding-gzip-chunked": Case(post(b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"), 501),
    "coding-identity": Case(post(b"Transfer-Encoding: identity"), 400),
    "coding-chunked-not-last": Case(
        post(b"Transfer-Encoding: chunked, gzip", body=b"0\r\n\r\n"), 400
    ),
    "coding-chunked-twice": Case(
        post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400
    ),
    # Sizes: 414 for the request line, 431 for the whole head (line and fields)
    "line-over-default-limit": Case(get(target=b"/" + b"a" * 9000), 414),
    "line-over-configured-limit": Case(
        get(target=b"/" + b"a" * 1100), 414, {"limit_request_line": 1024}
    ),
    "line-over-limit-unterminated": Case(b"GET /" + b"a" * 9000, 414),
    "line-over-head-limit-unterminated": Case(b"GET /" + b"a" * 20000, 414),
    "headers-over-default-limit": Case(get(HOST + many_headers(17000)), 431),
    "headers-over-configured-limit": Case(
        get(HOST + many_headers(5000)), 431, {"h11_max_incomplete_event_size": 4096}
    ),
    "line-and-headers-over-configured-limit": Case(
        get(HOST + many_headers(1500), b"/" + b"a" * 3000),
        431,
        {"h11_max_incomplete_event_size": 4096},
    ),
    "giant-header-line": Case(get(HOST + b"X-Big: " + b"v" * 17000 + b"\r\n"), 431),
    "giant-header-line-configured": Case(
        get(HOST + b"X-Big: " + b"v" * 5000 + b"\r\n"), 431, {"h11_max_incomplete_event_size": 4096}
    ),
    "giant-header-unterminated": Case(
        b"GET / HTTP/1.1\r\n" + HOST + b"X-Big: " + b"v" * 17000, 431
    ),
}

app_calls: list[str] = []


async def ok_app(scope, receive, send) -> None:
    app_calls.append(scope["path"])
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def send_in_pieces(sock: socket.socket, raw: bytes, pieces: int) -> None:
    """Send `raw` in up to `pieces` writes; stop quietly if the server has already closed."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    size = max(1, -(-len(raw) // pieces))
    try:
        for start in range(0, len(raw), size):
            sock.sendall(raw[start : start + size])
    except (BrokenPipeError, ConnectionResetError):
        pass  # rejected before the end: the response is still there to read


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response[9:12])


def assert_single_closing_response(response: bytes) -> None:
    """One complete response announcing `connection: close`, and nothing after it."""
    head, sep, body = response.partition(b"\r\n\r\n")
    assert sep, response[:200]
    lines = head.lower().split(b"\r\n")
    assert b"connection: close" in lines, head
    lengths = [line.split(b":", 1)[1] for line in lines if line.startswith(b"content-length:")]
    assert len(lengths) == 1 and int(lengths[0]) == len(body), head


def assert_still_serving(srv: RunningServer) -> None:
    with srv.connect() as sock:
        sock.sendall(get())
        response = recv_response(sock)
    assert status_of(response) == 200, response[:200]


@pytest.mark.parametrize("pieces", [1, 40], ids=["whole", "pieces"])
@pytest.mark.parametrize("name", list(CASES))
def test_rejected(serve, name: str, pieces: int) -> None:
    case = CASES[name]
    app_calls.clear()
    with serve(ok_app, **case.options) as srv:
        with srv.connect() as sock:
            send_in_pieces(sock, case.raw, pieces)
            response = recv_until_closed(sock)  # returns only once the server has closed
        assert status_of(response) == case.status, response[:300]
        assert_single_closing_response(response)
        assert app_calls == [], "the app saw a rejected request"
        assert_still_serving(srv)
        assert app_calls == ["/"]


@pytest.mark.parametrize("version", [b"1.0", b"1.1"])
def test_http10_needs_no_host(serve, version: bytes) -> None:
    """RFC 9112 §3.2: Host is required of HTTP/1.1 requests only."""
    app_calls.clear()
    with serve(ok_app) as srv, srv.connect() as sock:
        sock.sendall(get(b"Connection: close\r\n", version=version))
        response = recv_until_closed(sock)
    assert status_of(response) == (200 if version == b"1.0" else 400), response[:200]


# Control bytes in logs

INJECTIONS = {
    "crlf-in-path": b"/%0d%0aINJECTED",
    "crlf-in-query": b"/q?a=%0d%0aINJECTED&b=\\r\\n",
    "escape-sequence": b"/%1b[31mred%1b[0m",
    "nul-and-del": b"/%00%7f",
    "unicode-line-breaks": b"/%c2%85x%e2%80%a8y%e2%80%a9z",
}


@pytest.mark.parametrize("target", list(INJECTIONS.values()), ids=list(INJECTIONS))
def test_control_bytes_never_reach_the_log_raw(serve, target: bytes) -> None:
    with serve(ok_app, log_level="info", access_log=True) as srv, srv.connect() as sock:
        sock.sendall(get(b"Connection: close\r\n" + HOST, target=target))
        response = recv_until_closed(sock)
    assert status_of(response) == 200
    access = [r for r in srv.records if r.name == "fulmen.access"]
    assert access, "no access log line"
    formatter = logging.Formatter("%(levelname)s %(message)s")
    for record in access:
        for text in (record.getMessage(), formatter.format(record)):
            assert len(text.splitlines()) == 1, text
            assert not any(ord(char) < 32 or 127 <= ord(char) < 160 for char in text), text
    message = access[0].getMessage()
    if b"%0d%0a" in target.partition(b"?")[0]:
        assert "\\x0d\\x0aINJECTED" in message, message


def test_rejection_reason_is_escaped_in_the_log(serve) -> None:
    """The debug line for a rejection quotes what the client sent, escaped."""
    with serve(ok_app, log_level="debug") as srv, srv.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n" + HOST + b"Foo: a\x1b[2J\r\n\r\n")
        response = recv_until_closed(sock)
    assert status_of(response) == 400
    messages = srv.messages()
    assert any("Rejected request (400)" in m for m in messages), messages
    for message in messages:
        assert "\x1b" not in message and len(message.splitlines()) <= 1, message


@pytest.mark.parametrize("body", [b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n"])
def test_malformed_chunked_body_gets_400_without_error_log(serve, body: bytes) -> None:
    """The head was fine; the bad body is answered 400 (no response had begun) and ends the
    connection, with no traceback."""
    app_calls.clear()
    with serve(ok_app) as srv:
        with srv.connect() as sock:
            sock.sendall(post(b"Transfer-Encoding: chunked", body=body))
            response = recv_until_closed(sock)
        assert status_of(response) == 400, response[:200]
        assert_single_closing_response(response)
        assert_still_serving(srv)
    errors = [r for r in srv.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]


# Chunked framing, where smuggling hides (RFC 9112 §7.1), checked at the adapters directly,
# whole and in pieces (over a socket, each is a 400: tests/protocols/test_parser_parity.py).

CHUNKED = post(b"Transfer-Encoding: chunked")
CHUNKED_BODIES = {
    # accepted
    "plain": (b"5\r\nhello\r\n0\r\n\r\n", True),
    "extensions": (b"5;a=b;c\r\nhello\r\n0\r\n\r\n", True),
    "quoted-extension": (b'5;a="b \\" c"\r\nhello\r\n0\r\n\r\n', True),
    "leading-zeros": (b"005\r\nhello\r\n000\r\n\r\n", True),
    "trailer": (b"5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n", True),
    # rejected
    "bare-cr-in-extension": (b"5;a\rb\r\nhello\r\n0\r\n\r\n", False),
    "bare-lf-in-extension": (b"5;a\nb\r\nhello\r\n0\r\n\r\n", False),
    "nul-in-extension": (b"5;a\x00\r\nhello\r\n0\r\n\r\n", False),
    "empty-extension": (b"5;\r\nhello\r\n0\r\n\r\n", False),
    "unbalanced-quote": (b'5;a="b\r\nhello\r\n0\r\n\r\n', False),
    "space-after-size": (b"5 \r\nhello\r\n0\r\n\r\n", False),
    "hex-prefix": (b"0x5\r\nhello\r\n0\r\n\r\n", False),
    "size-overflow": (b"1" + b"0" * 16 + b"\r\nhello\r\n0\r\n\r\n", False),
    "bare-lf-after-size": (b"5\nhello\r\n0\r\n\r\n", False),
    "no-crlf-after-data": (b"5\r\nhelloXX0\r\n\r\n", False),
    "bare-lf-after-data": (b"5\r\nhello\n0\r\n\r\n", False),
    "bare-lf-ends-trailers": (b"5\r\nhello\r\n0\r\n\n", False),
    "bare-lf-in-trailer": (b"5\r\nhello\r\n0\r\nX: y\n\r\n", False),
    "obs-fold-in-trailer": (b"5\r\nhello\r\n0\r\nX: y\r\n z\r\n\r\n", False),
    "bad-trailer-name": (b"5\r\nhello\r\n0\r\nX y: z\r\n\r\n", False),
    "content-length-trailer": (b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n", False),
    "transfer-encoding-trailer": (b"5\r\nhello\r\n0\r\ntransfer-encoding: x\r\n\r\n", False),
}


@pytest.mark.parametrize("pieces", [1, 3], ids=["whole", "pieces"])
@pytest.mark.parametrize("name", list(CHUNKED_BODIES))
@pytest.mark.parametrize("parser", ["h11", "httptools"])
def test_chunked_framing(parser: str, name: str, pieces: int) -> None:
    body, accepted = CHUNKED_BODIES[name]
    raw = CHUNKED + body
    if pieces == 1:
        verdict = parse(parser, raw)
    else:  # the head whole, then the body split inside its lines
        cut = len(CHUNKED) + len(body) // 2
        verdict = parse(parser, raw[:cut], raw[cut:])
    assert (verdict.error is None, verdict.completed) == (accepted, int(accepted)), verdict
