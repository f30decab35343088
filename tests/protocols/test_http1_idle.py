"""Idle keep-alive connections give their parser back (`fulmen.protocols.parsers.Parked`): the
server tick drops the parser of a connection idle between requests, and the connection makes a
new one when the next request comes. Nothing a client sends may be lost to it.

Every test runs on both parsers and both loops (the `serve` fixture).
"""

from __future__ import annotations

import pytest

from fulmen.protocols.parsers import PARKED
from tests.protocols.http1_raw import (
    Reader,
    echo_app,
    in_loop,
    poll_until,
    request,
    the_connection,
)


def tick(srv, conn) -> None:
    """Run the connection's part of the server tick now, on the server's loop."""
    in_loop(srv, lambda: conn.check_timeout(srv.server.state.clock))


def test_an_idle_connection_drops_its_parser_and_serves_the_next_requests(serve) -> None:
    with serve(echo_app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(request(path="/first"))
        assert reader.response().body == b"GET /first "
        conn = the_connection(srv)
        poll_until(lambda: in_loop(srv, lambda: conn.parser is PARKED), "not parked by a tick")
        sock.sendall(request("POST", "/second", body=b"0123456789"))
        response = reader.response()
        assert response.status == 200
        assert response.body == b"POST /second 0123456789"
        assert in_loop(srv, lambda: conn.parser is not PARKED)
        sock.sendall(request(path="/third"))
        assert reader.response().body == b"GET /third "


def test_a_new_connection_idle_before_its_first_request_is_served(serve) -> None:
    with serve(echo_app) as srv, srv.connect() as sock:
        conn = the_connection(srv)
        tick(srv, conn)
        assert in_loop(srv, lambda: conn.parser is PARKED)
        sock.sendall(request(path="/late"))
        assert Reader(sock).response().body == b"GET /late "


def test_the_start_of_the_next_request_keeps_the_parser(serve) -> None:
    """Bytes of the next request that came with the previous one are in the parser: it is
    not dropped, and the request completes."""
    with serve(echo_app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        second = request(path="/second")
        sock.sendall(request(path="/first") + second[:9])
        assert reader.response().body == b"GET /first "
        conn = the_connection(srv)
        tick(srv, conn)
        assert in_loop(srv, lambda: conn.parser is not PARKED)
        sock.sendall(second[9:])
        assert reader.response().body == b"GET /second "


def test_a_request_whose_body_is_arriving_keeps_the_parser(serve) -> None:
    with serve(echo_app) as srv, srv.connect() as sock:
        whole = request("POST", "/upload", body=b"x" * 100)
        sock.sendall(whole[:-40])
        conn = the_connection(srv)
        poll_until(lambda: in_loop(srv, lambda: conn.cycle is not None), "request not started")
        tick(srv, conn)
        assert in_loop(srv, lambda: conn.parser is not PARKED)
        sock.sendall(whole[-40:])
        assert Reader(sock).response().body == b"POST /upload " + b"x" * 100


def test_the_parked_stand_in_is_never_fed() -> None:
    assert PARKED.at_rest() and not PARKED.upgraded and PARKED.trailing == b""
    PARKED.close()  # a connection lost while parked: nothing to drop
    with pytest.raises(RuntimeError):
        PARKED.feed(b"GET / HTTP/1.1\r\n")
