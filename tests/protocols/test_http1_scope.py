"""The HTTP scope handed to the application, and the default response headers."""

from __future__ import annotations

import asyncio
import contextvars
import re
from email.utils import parsedate_to_datetime

import pytest

from tests.protocols.http1_raw import Reader, request, respond


def get(srv, *requests: bytes) -> list:
    """Send requests on one connection and read their responses."""
    with srv.connect() as sock:
        reader = Reader(sock)
        sock.sendall(b"".join(requests))
        return [reader.response() for _ in requests]


def recording_app(seen: list):
    async def app(scope, receive, send) -> None:
        seen.append(scope)
        await respond(send, b"ok")

    return app


# Default headers


async def plain_app(scope, receive, send) -> None:
    await respond(send, b"ok")


def test_default_server_and_date_headers(serve) -> None:
    with serve(plain_app) as srv:
        (response,) = get(srv, request())
    assert response.all("server") == ["fulmen"]
    (date,) = response.all("date")
    assert parsedate_to_datetime(date).tzname() == "UTC"
    assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT", date)


@pytest.mark.parametrize(("name", "other"), [("server", "date"), ("date", "server")])
def test_app_header_replaces_default(serve, name: str, other: str) -> None:
    async def app(scope, receive, send) -> None:
        await respond(send, b"ok", headers=[(name.title().encode(), b"custom")])

    with serve(app) as srv:
        (response,) = get(srv, request())
    assert response.all(name) == ["custom"]
    assert len(response.all(other)) == 1


@pytest.mark.parametrize(
    ("option", "name", "kept"),
    [("server_header", "server", "date"), ("date_header", "date", "server")],
)
def test_default_header_can_be_turned_off(serve, option: str, name: str, kept: str) -> None:
    with serve(plain_app, **{option: False}) as srv:
        (response,) = get(srv, request())
    assert response.all(name) == []
    assert len(response.all(kept)) == 1


def test_extra_default_headers(serve) -> None:
    with serve(plain_app, headers=["X-A: b", "X-Other: two words"]) as srv:
        (response,) = get(srv, request())
    assert b"\r\nX-A: b\r\n" in response.head
    assert response.all("x-a") == ["b"]
    assert response.all("x-other") == ["two words"]


# Scope


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_scope(serve, version: str) -> None:
    seen: list = []
    raw = request(
        "GET",
        "/caf%C3%A9/a%20b?x=1&y=%20",
        headers=[("Host", "example.com"), ("X-Mixed-Case", "  padded value \t")],
        version=version,
    )
    with serve(recording_app(seen)) as srv:
        with srv.connect() as sock:
            client = sock.getsockname()
            sock.sendall(raw)
            assert Reader(sock).response().body == b"ok"
        port = srv.port
    (scope,) = seen
    assert scope["type"] == "http"
    assert scope["asgi"]["version"] == "3.0"
    assert re.fullmatch(r"2\.\d+", scope["asgi"]["spec_version"])
    assert scope["http_version"] == version
    assert scope["method"] == "GET"
    assert scope["scheme"] == "http"
    assert scope["path"] == "/café/a b"
    assert scope["raw_path"] == b"/caf%C3%A9/a%20b"
    assert scope["query_string"] == b"x=1&y=%20"
    assert scope["root_path"] == ""
    assert scope["headers"] == [(b"host", b"example.com"), (b"x-mixed-case", b"padded value")]
    assert tuple(scope["client"]) == client
    assert tuple(scope["server"]) == ("127.0.0.1", port)
    assert scope["state"] == {}
    assert isinstance(scope["extensions"], dict)


def test_scope_root_path(serve) -> None:
    seen: list = []
    with serve(recording_app(seen), root_path="/api") as srv:
        get(srv, request(path="/users?id=1"))
    (scope,) = seen
    assert scope["root_path"] == "/api"
    assert scope["path"] == "/api/users"
    assert scope["raw_path"] == b"/api/users"
    assert scope["query_string"] == b"id=1"


def test_scope_state_is_a_copy_per_request(serve) -> None:
    states: list = []

    async def app(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    scope["state"]["greeting"] = "hello"
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        states.append(dict(scope["state"]))
        scope["state"]["greeting"] = "changed"
        scope["state"]["added"] = True
        await respond(send, b"ok")

    with serve(app, lifespan="on") as srv:
        get(srv, request(), request())
        get(srv, request())
    assert states == [{"greeting": "hello"}] * 3


# Context: each request runs in a context of its own, also when the app finishes without
# waiting (on Python 3.12+ its eager Task is then never scheduled). See also test_tasks.py.

REQUEST_VAR: contextvars.ContextVar[str] = contextvars.ContextVar("request_var", default="unset")


async def context_app(scope, receive, send) -> None:
    seen = REQUEST_VAR.get()
    REQUEST_VAR.set(scope["path"])
    if scope["query_string"] == b"wait":
        await asyncio.sleep(0)  # this request's Task is scheduled again
    await respond(send, seen.encode())


@pytest.mark.parametrize("query", ["", "wait"])
def test_context_variables_do_not_leak_between_requests(serve, query: str) -> None:
    with serve(context_app) as srv:
        responses = get(srv, request(path=f"/a?{query}"), request(path=f"/b?{query}"))
        (other,) = get(srv, request(path="/c"))
    assert [r.body for r in responses] == [b"unset", b"unset"]
    assert other.body == b"unset"


# Objects shared between requests and connections (memory: see docs/benchmarks.md)


def test_header_names_are_lowered_and_shared_between_requests(serve) -> None:
    seen: list = []
    with serve(recording_app(seen)) as srv:
        get(srv, request(headers=[("X-Mixed-Case", "1")]), request(headers=[("x-mixed-CASE", "2")]))
    first, second = ([h for h in scope["headers"] if h[0] == b"x-mixed-case"] for scope in seen)
    assert first == [(b"x-mixed-case", b"1")] and second == [(b"x-mixed-case", b"2")]
    if srv.server.config.http == "httptools":  # h11 lowers names itself
        assert first[0][0] is second[0][0]


def test_header_names_beyond_the_shared_ones_are_still_lowered(
    serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fulmen.protocols.parsers import httptools

    monkeypatch.setattr(httptools, "_NAMES", {})
    monkeypatch.setattr(httptools, "_NAMES_MAX", 2)
    seen: list = []
    names = [(f"X-Name-{i}", str(i)) for i in range(5)]
    with serve(recording_app(seen)) as srv:
        get(srv, request(headers=names))
    received = [h for h in seen[0]["headers"] if h[0].startswith(b"x-name-")]
    assert received == [(f"x-name-{i}".encode(), str(i).encode()) for i in range(5)]


def test_connections_share_the_server_address_and_the_client_host(serve) -> None:
    seen: list = []
    with serve(recording_app(seen)) as srv:
        get(srv, request())
        get(srv, request())
    first, second = seen
    assert first["server"] == ("127.0.0.1", srv.port) and first["server"] is second["server"]
    assert first["client"][0] == "127.0.0.1" and first["client"][0] is second["client"][0]
    assert first["client"][1] != second["client"][1]


def test_server_addresses_beyond_the_shared_ones_are_forgotten(serve, monkeypatch) -> None:
    from fulmen.protocols import scope

    monkeypatch.setattr(scope, "_SERVERS", {("192.0.2.1", 80): ("192.0.2.1", 80)})
    monkeypatch.setattr(scope, "_SERVERS_MAX", 1)
    seen: list = []
    with serve(recording_app(seen)) as srv:
        get(srv, request())
        get(srv, request())
    assert seen[0]["server"] is seen[1]["server"]
    address = ("127.0.0.1", srv.port)
    assert list(scope._SERVERS.items()) == [(address, address)]
