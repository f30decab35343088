"""The ASGI `http.response.early_hint` extension on HTTP/1.1: 103 Early Hints (RFC 8297) with
one `link` field per entry of `links`, before the final response. Both parsers, both loops."""

from __future__ import annotations

from typing import Any

from tests.conftest import recv_until_closed
from tests.protocols.http1_raw import request

CLOSE = [("Connection", "close")]
LINKS = [b"</style.css>; rel=preload; as=style", b"</app.js>; rel=preload; as=script"]


def hinting_app(messages: list[dict[str, Any]]) -> Any:
    seen: list[bool] = []

    async def app(scope, receive, send) -> None:
        seen.append("http.response.early_hint" in scope["extensions"])
        for message in messages:
            await send(message)

    app.seen = seen  # type: ignore[attr-defined]
    return app


HINT = {"type": "http.response.early_hint", "links": LINKS}
START = {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
BODY = {"type": "http.response.body", "body": b"ok"}
EXPECTED_103 = (
    b"HTTP/1.1 103 Early Hints\r\n"
    b"link: </style.css>; rel=preload; as=style\r\n"
    b"link: </app.js>; rel=preload; as=script\r\n\r\n"
)


def test_early_hints_come_before_the_response(serve) -> None:
    app = hinting_app([HINT, START, BODY])
    with serve(app) as srv, srv.connect() as sock:
        sock.sendall(request(headers=CLOSE))
        raw = recv_until_closed(sock)
    assert raw.startswith(EXPECTED_103 + b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"\r\n\r\nok")
    assert app.seen == [True]


def test_an_early_hint_between_start_and_body_still_precedes_the_head(serve) -> None:
    app = hinting_app([START, HINT, BODY])
    with serve(app) as srv, srv.connect() as sock:
        sock.sendall(request(headers=CLOSE))
        raw = recv_until_closed(sock)
    assert raw.startswith(EXPECTED_103 + b"HTTP/1.1 200 OK\r\n")


def test_no_early_hints_for_http10(serve) -> None:
    app = hinting_app([START, BODY])
    with serve(app) as srv, srv.connect() as sock:
        sock.sendall(request(version="1.0"))
        raw = recv_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and app.seen == [False]


def test_an_early_hint_after_the_head_is_an_error(serve) -> None:
    more = {"type": "http.response.body", "body": b"o", "more_body": True}
    app = hinting_app([START, more, HINT])
    with serve(app) as srv, srv.connect() as sock:
        sock.sendall(request(headers=CLOSE))
        raw = recv_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and b"103" not in raw
    assert raw.endswith(b"\r\n\r\no")  # the response is broken off: the connection closes


def test_a_link_with_crlf_is_refused(serve) -> None:
    app = hinting_app(
        [{"type": "http.response.early_hint", "links": [b"<a>\r\nx: y"]}, START, BODY]
    )
    with serve(app) as srv, srv.connect() as sock:
        sock.sendall(request(headers=CLOSE))
        raw = recv_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 500 ") and b"x: y" not in raw
