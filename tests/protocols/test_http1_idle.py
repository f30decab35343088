"""Connections between requests hold no parser (`fulmen.protocols.parsers.SpareParsers`): a
connection gives its parser back when a response is complete and nothing of a next request has
come, and takes one (a spare, or a new one) when bytes come. Nothing a client sends may be lost
to it, and a parser never carries one connection's state into another.

Every test runs on both parsers and both loops (the `serve` fixture).
"""

from __future__ import annotations

import logging

import pytest

from fulmen.protocols.parsers import PARKED, base
from tests.protocols.http1_raw import (
    Reader,
    echo_app,
    in_loop,
    poll_until,
    request,
    the_connection,
)


def parked(srv, conn) -> bool:
    """Whether `conn` holds no parser (read on the server's loop, after what it is doing)."""
    return bool(in_loop(srv, lambda: conn.parser is PARKED))


def conns(srv) -> list:
    return list(in_loop(srv, lambda: list(srv.server.state.connections)))


def tick(srv, conn) -> None:
    """The connection's part of the server tick, now, on the server's loop."""
    in_loop(srv, lambda: conn.check_timeout(srv.server.state.clock))


def spares(srv) -> list:
    return list(in_loop(srv, lambda: srv.server.state.parsers.spare))


def test_an_idle_connection_holds_no_parser_and_serves_the_next_requests(serve) -> None:
    with serve(echo_app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        conn = the_connection(srv)
        assert parked(srv, conn)  # none before the first bytes
        sock.sendall(request(path="/first"))
        assert reader.response().body == b"GET /first "
        assert parked(srv, conn)
        sock.sendall(request("POST", "/second", body=b"0123456789"))
        response = reader.response()
        assert response.status == 200
        assert response.body == b"POST /second 0123456789"
        assert parked(srv, conn)
        sock.sendall(request(path="/third"))
        assert reader.response().body == b"GET /third "


def test_a_parser_passes_to_the_next_connection_without_its_state(serve) -> None:
    with serve(echo_app) as srv:
        with srv.connect() as first:
            first.sendall(request(path="/a", headers=[("X-Seen", "first")]))
            assert Reader(first).response().body == b"GET /a "
            (spare,) = spares(srv)
            with srv.connect() as second:
                second.sendall(request("POST", "/b", body=b"data"))
                assert Reader(second).response().body == b"POST /b data"
                assert spares(srv) == [spare]  # the same parser served the second
        poll_until(lambda: not in_loop(srv, lambda: srv.server.state.connections), "open")


def test_the_start_of_the_next_request_keeps_the_parser(serve) -> None:
    """Bytes of the next request that came with the previous one are in the parser: it is
    kept, and the request completes."""
    with serve(echo_app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        second = request(path="/second")
        sock.sendall(request(path="/first") + second[:9])
        assert reader.response().body == b"GET /first "
        conn = the_connection(srv)
        assert not parked(srv, conn)
        assert spares(srv) == []
        sock.sendall(second[9:])
        assert reader.response().body == b"GET /second "
        assert parked(srv, conn)


def test_a_connection_that_closes_gives_no_parser_back(serve) -> None:
    with serve(echo_app) as srv, srv.connect() as sock:
        sock.sendall(request(path="/bye", headers=[("Connection", "close")]))
        reader = Reader(sock)
        assert reader.response().body == b"GET /bye "
        assert reader.closed()
        assert spares(srv) == []


def test_beyond_the_spares_a_connection_keeps_its_parser_until_a_tick(
    serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `MAX_SPARE` spares kept, a connection between requests keeps its parser (no new
    one per request); the server tick frees it once the connection is found idle."""
    monkeypatch.setattr(base, "MAX_SPARE", 1)
    with serve(echo_app) as srv, srv.connect() as one, srv.connect() as two:
        readers = Reader(one), Reader(two)
        for round in range(3):
            one.sendall(request("POST", "/1", body=b"x" * 100)[:-50])  # both parsers in use
            two.sendall(request(path="/2"))
            assert readers[1].response().body == b"GET /2 "
            one.sendall(b"x" * 50)
            assert readers[0].response().body == b"POST /1 " + b"x" * 100, round
            (spare,) = spares(srv)
            holders = [conn for conn in conns(srv) if not parked(srv, conn)]
            assert len(holders) == 1 and holders[0].parser is not spare
            tick(srv, holders[0])
            assert parked(srv, holders[0]) and spares(srv) == [spare]  # the other was freed
    assert not [r for r in srv.records if r.levelno >= logging.WARNING]


def test_the_tick_leaves_a_parser_holding_the_next_request(serve) -> None:
    with serve(echo_app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        second = request(path="/second")
        sock.sendall(request(path="/first") + second[:9])  # the parser holds the second's start
        assert reader.response().body == b"GET /first "
        conn = the_connection(srv)
        tick(srv, conn)
        assert not parked(srv, conn)  # not at rest: kept
        sock.sendall(second[9:])
        assert reader.response().body == b"GET /second "
        assert parked(srv, conn)


def test_the_parked_stand_in_is_never_fed() -> None:
    assert not PARKED.release() and not PARKED.upgraded and PARKED.trailing == b""
    PARKED.attach(object())  # type: ignore[arg-type]
    PARKED.close()  # a connection lost while parked: nothing to drop
    with pytest.raises(RuntimeError):
        PARKED.feed(b"GET / HTTP/1.1\r\n")
