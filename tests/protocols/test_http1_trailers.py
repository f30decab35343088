"""The ASGI `http.response.trailers` extension on HTTP/1.1: advertised to clients that send
`TE: trailers`, sent as the trailer section of a chunked body (RFC 9112 §7.1.2), and left out
where HTTP/1.1 framing has no place for it. Both parsers, both loops (the `serve` fixture)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import recv_until_closed
from tests.protocols.http1_raw import Reader, request

TE = [("TE", "trailers"), ("Connection", "close")]


def trailers_app(start_headers: list[Any], parts: list[bytes], trailers: list[Any]) -> Any:
    """Records whether the scope offers trailers, then answers with `parts` and `trailers`
    (given in two `http.response.trailers` messages when there are several)."""
    seen: list[bool] = []

    async def app(scope, receive, send) -> None:
        seen.append("http.response.trailers" in scope["extensions"])
        start = {"type": "http.response.start", "status": 200, "headers": start_headers}
        await send({**start, "trailers": True})
        for i, part in enumerate(parts):
            more = i < len(parts) - 1
            await send({"type": "http.response.body", "body": part, "more_body": more})
        for i, trailer in enumerate(trailers):
            more = i < len(trailers) - 1
            await send(
                {"type": "http.response.trailers", "headers": [trailer], "more_trailers": more}
            )

    app.seen = seen  # type: ignore[attr-defined]
    return app


@pytest.mark.parametrize("parts", [[b"whole"], [b"str", b"eam", b""]], ids=["whole", "streamed"])
def test_trailers_follow_the_last_chunk(serve, parts: list[bytes]) -> None:
    trailers = [(b"x-checksum", b"abc123"), (b"server-timing", b"app;dur=1")]
    app = trailers_app([(b"content-type", b"text/plain")], parts, trailers)
    with serve(app) as srv, srv.connect() as sock:
        sock.sendall(request(headers=TE))
        raw = recv_until_closed(sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower() and b"content-length" not in head.lower()
    chunks = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts if p)
    assert body == chunks + b"0\r\nx-checksum: abc123\r\nserver-timing: app;dur=1\r\n\r\n"
    assert app.seen == [True]


def test_trailers_are_offered_only_to_clients_that_accept_them(serve) -> None:
    app = trailers_app([], [b"x"], [(b"x-a", b"1")])
    with serve(app) as srv, srv.connect() as sock:
        sock.sendall(request(headers=[("Connection", "close")]))
        raw = recv_until_closed(sock)
    assert app.seen == [False]
    # Sent anyway (RFC 9110 §6.5: a recipient may discard them), still as valid chunking.
    assert raw.endswith(b"1\r\nx\r\n0\r\nx-a: 1\r\n\r\n")


def test_content_length_response_drops_trailers_and_keeps_the_connection(serve) -> None:
    app = trailers_app([(b"content-length", b"4")], [b"da", b"ta"], [(b"x-a", b"1")])
    with serve(app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        for _ in range(2):
            sock.sendall(request(headers=[("TE", "trailers")]))
            response = reader.response()
            assert response.status == 200 and response.body == b"data"
            assert response.get("x-a") is None


def test_http10_response_ends_by_close_without_trailers(serve) -> None:
    app = trailers_app([], [b"old"], [(b"x-a", b"1")])
    with serve(app) as srv, srv.connect() as sock:
        sock.sendall(request(version="1.0", headers=[("TE", "trailers")]))
        raw = recv_until_closed(sock)
    assert raw.endswith(b"\r\n\r\nold") and app.seen == [False]


@pytest.mark.parametrize("name", [b"content-length", b"transfer-encoding", b"connection"])
def test_framing_fields_in_trailers_abort_the_response(serve, name: bytes) -> None:
    app = trailers_app([], [b"body"], [(name, b"1")])
    with serve(app) as srv, srv.connect() as sock:
        sock.sendall(request(headers=TE))
        raw = recv_until_closed(sock)
    assert raw.endswith(b"4\r\nbody\r\n"), raw  # the body, then the close: no last chunk
    assert name not in raw.partition(b"\r\n\r\n")[2]


def test_trailers_message_without_announcing_them_is_an_error(serve) -> None:
    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.trailers", "headers": []})

    with serve(app) as srv, srv.connect() as sock:
        sock.sendall(request(headers=TE))
        raw = recv_until_closed(sock)
    assert raw.startswith(b"HTTP/1.1 500 ")
