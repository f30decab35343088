"""Bodies from `LARGE_CHUNK` (16 KiB) up leave beside their head or chunk framing in one
`writelines` instead of being copied into it (`fulmen.protocols.h1response`): the bytes on the
wire must be exactly those of the smaller bodies' path.

Every test runs on both parsers and both loops (the `serve` fixture).
"""

from __future__ import annotations

import logging

import pytest

from fulmen.protocols.h1response import LARGE_CHUNK
from tests.protocols.http1_raw import Reader, request

BIG = bytes(range(256)) * (LARGE_CHUNK // 256 + 3)  # over the threshold, not a round size


def app_sending(*bodies: bytes, headers=()):
    """Sends `bodies` as body messages, the last one ending the response."""

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": list(headers)})
        for index, body in enumerate(bodies):
            more = index < len(bodies) - 1
            await send({"type": "http.response.body", "body": body, "more_body": more})

    return app


@pytest.mark.parametrize(
    "bodies",
    [(BIG,), (b"small", BIG, b"", BIG), (BIG, b"tail")],
    ids=["whole", "streamed", "large-first"],
)
def test_large_bodies_arrive_whole(serve, bodies) -> None:
    with serve(app_sending(*bodies)) as srv, srv.connect() as sock:
        reader = Reader(sock)
        for _ in range(2):  # and the connection stays usable
            sock.sendall(request())
            response = reader.response()
            assert response.status == 200
            assert response.body == b"".join(bodies)
            if len(bodies) == 1:
                assert response.get("content-length") == str(len(BIG))
            else:
                assert response.get("transfer-encoding") == "chunked"
                assert response.chunks == [body for body in bodies if body]


def test_a_large_body_to_head_sends_the_head_only(serve) -> None:
    length = [(b"content-length", str(len(BIG)).encode())]
    with serve(app_sending(BIG, headers=length)) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request("HEAD") + request())
        head = reader.response("HEAD")
        assert head.get("content-length") == str(len(BIG)) and head.body == b""
        assert reader.response().body == BIG  # nothing of the HEAD's body came before it


def test_a_large_body_longer_than_its_length_is_refused_unsent(serve, caplog) -> None:
    length = [(b"content-length", b"10")]
    caplog.set_level(logging.ERROR, logger="fulmen.error")
    with serve(app_sending(BIG, headers=length)) as srv, srv.connect() as sock:
        sock.sendall(request())
        response = Reader(sock).response()
        assert response.status == 500  # the head was not sent: the error policy answers
        assert BIG[:100] not in response.body
