"""HTTP/3 (`--http3`) against aioquic's client over real UDP sockets on loopback: requests and
responses, streaming both ways, trailers, early hints, the error policy per stream, Alt-Svc on
the TCP protocols, and graceful shutdown. Every case runs on both loops."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aioquic.h3.connection as aioquic_h3
import httpx
import pytest

from tests.conftest import TIMEOUT, Certs, RunningServer
from tests.protocols.conftest import ServeH3
from tests.protocols.h3client import H3Client, connect, run

H3_INTERNAL_ERROR = 0x102
H3_MESSAGE_ERROR = 0x10E


async def read_body(receive: Any) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def hello(scope: Any, receive: Any, send: Any) -> None:
    body = await read_body(receive)
    text = f"{scope['http_version']} {scope['scheme']} {scope['method']} {scope['path']} "
    text += f"{scope['query_string'].decode()} {len(body)} {'tls' in scope['extensions']}"
    await send({"type": "http.response.start", "status": 200, "headers": [(b"x-a", b"1")]})
    await send({"type": "http.response.body", "body": text.encode()})


def test_get_and_post(serve_h3: ServeH3, certs: Certs) -> None:
    async def main(port: int) -> list[Any]:
        async with connect(port, certs) as client:
            get = await client.get(b"/path?q=1")
            post = await client.get(b"/p", method=b"POST", body=b"x" * 100_000)
            many = await asyncio.gather(*(client.get(b"/%d" % i) for i in range(40)))
            return [get, post, many]

    with serve_h3(hello) as srv:
        get, post, many = run(main(srv.port))
        access = [m for m in srv.messages(logging.INFO) if "HTTP/3" in m]
    assert get.status == 200
    assert bytes(get.body) == b"3 https GET /path q=1 0 True"
    assert get.header(b"x-a") == b"1"
    assert get.header(b"content-length") == str(len(get.body)).encode()
    assert get.header(b"alt-svc") == f'h3=":{srv.port}"; ma=86400'.encode()
    assert bytes(post.body) == b"3 https POST /p  100000 True"
    assert [bytes(r.body).split()[3] for r in many] == [b"/%d" % i for i in range(40)]
    assert any('"GET /path?q=1 HTTP/3" 200 OK' in line for line in access)


def test_alt_svc_on_tcp(serve_h3: ServeH3, certs: Certs) -> None:
    with serve_h3(hello) as srv:
        url = f"https://localhost:{srv.port}/"
        with httpx.Client(verify=certs.context(), http2=True, timeout=TIMEOUT) as client:
            h2 = client.get(url)
        with httpx.Client(verify=certs.context(), timeout=TIMEOUT) as client:
            h1 = client.get(url)
    assert (h2.http_version, h1.http_version) == ("HTTP/2", "HTTP/1.1")
    for response in (h1, h2):
        assert response.headers["alt-svc"] == f'h3=":{srv.port}"; ma=86400'


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """Streams the request body back as it comes, chunk by chunk."""
    await send({"type": "http.response.start", "status": 200, "headers": []})
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        await send({"type": "http.response.body", "body": message["body"], "more_body": True})
        if not message.get("more_body"):
            break
    await send({"type": "http.response.body", "body": b""})


def test_streaming_both_ways(serve_h3: ServeH3, certs: Certs) -> None:
    """The response to the first chunk arrives before the request is whole; 4 MiB each way,
    past the stream's flow-control window and the send high-water mark."""

    async def main(port: int) -> tuple[bytes, bytes, int]:
        async with connect(port, certs) as client:
            stream_id = client.request(b"POST", b"/", body=b"first", end=False)
            response = client.responses[stream_id]
            await asyncio.wait_for(response.data.wait(), TIMEOUT)
            first = bytes(response.body)
            big = bytes(range(256)) * 4096  # 1 MiB
            for _ in range(4):
                client.send(stream_id, big)
            client.send(stream_id, b"", end=True)
            await client.response(stream_id)
            return first, bytes(response.body), response.status

    with serve_h3(echo) as srv:
        first, body, status = run(main(srv.port))
    assert (first, status) == (b"first", 200)
    assert len(body) == 5 + 4 * 1024 * 1024
    assert body[5:] == (bytes(range(256)) * 4096) * 4


async def trailers(scope: Any, receive: Any, send: Any) -> None:
    await read_body(receive)
    assert "http.response.trailers" in scope["extensions"]
    if scope["path"] == "/hints":
        await send({"type": "http.response.early_hint", "links": [b"</s.css>; rel=preload"]})
    await send({"type": "http.response.start", "status": 200, "headers": [], "trailers": True})
    await send({"type": "http.response.body", "body": b"part", "more_body": True})
    await send({"type": "http.response.body", "body": b""})
    await send({"type": "http.response.trailers", "headers": [(b"X-Checksum", b"abc")]})


def test_trailers(serve_h3: ServeH3, certs: Certs) -> None:
    async def main(port: int) -> Any:
        async with connect(port, certs) as client:
            return await client.get(headers=[(b"te", b"trailers")])

    with serve_h3(trailers) as srv:
        response = run(main(srv.port))
    assert (response.status, bytes(response.body)) == (200, b"part")
    assert response.trailers == [(b"x-checksum", b"abc")]


# aioquic's client reads interim responses from 1.4 on (Python 3.11+).
INTERIM = hasattr(aioquic_h3, "is_interim_response")


@pytest.mark.skipif(not INTERIM, reason="this aioquic client does not read 1xx responses")
def test_early_hints(serve_h3: ServeH3, certs: Certs) -> None:
    async def main(port: int) -> Any:
        async with connect(port, certs) as client:
            return await client.get(b"/hints", headers=[(b"te", b"trailers")])

    with serve_h3(trailers) as srv:
        response = run(main(srv.port))
    assert response.interim == [[(b":status", b"103"), (b"link", b"</s.css>; rel=preload")]]
    assert (response.status, bytes(response.body)) == (200, b"part")
    assert response.trailers == [(b"x-checksum", b"abc")]


async def failing(scope: Any, receive: Any, send: Any) -> None:
    if scope["path"] == "/before":
        raise RuntimeError("boom before")
    if scope["path"] == "/after":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"half", "more_body": True})
        raise RuntimeError("boom after")
    await hello(scope, receive, send)


def test_failures_end_one_stream(serve_h3: ServeH3, certs: Certs) -> None:
    """500 before the head, RESET_STREAM H3_INTERNAL_ERROR after it; a malformed request is
    reset with H3_MESSAGE_ERROR. The connection serves the next request every time."""

    async def main(port: int) -> list[Any]:
        async with connect(port, certs) as client:
            before = await client.get(b"/before")
            after = await client.get(b"/after")
            no_path = client.request(pseudo=[(b":method", b"GET"), (b":scheme", b"https")])
            malformed = await client.response(no_path)
            upper = await client.get(headers=[(b"Bad-Name", b"1")])
            fine = await client.get(b"/fine")
            return [before, after, malformed, upper, fine]

    with serve_h3(failing) as srv:
        before, after, malformed, upper, fine = run(main(srv.port))
        errors = [r for r in srv.records if r.getMessage() == "Exception in ASGI application"]
    assert before.status == 500
    assert after.reset == H3_INTERNAL_ERROR
    assert malformed.reset == H3_MESSAGE_ERROR and malformed.headers is None
    assert upper.reset == H3_MESSAGE_ERROR
    assert fine.status == 200 and bytes(fine.body).startswith(b"3 https GET /fine")
    assert len(errors) == 2


def test_client_reset_disconnects_app(serve_h3: ServeH3, certs: Certs) -> None:
    """RESET_STREAM from the client: the app sees http.disconnect; the connection goes on."""
    seen: list[Any] = []
    received = _ThreadEvent()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/next":
            await hello(scope, receive, send)
            return
        seen.append(await receive())
        received.set()
        seen.append(await receive())

    async def main(port: int) -> Any:
        async with connect(port, certs) as client:
            stream_id = client.request(b"POST", body=b"part", end=False)
            await asyncio.to_thread(received.wait)
            client.reset(stream_id)
            return await client.get(b"/next")

    with serve_h3(app) as srv:
        after = run(main(srv.port))
        assert _wait_for(lambda: len(seen) == 2)
    assert seen[0] == {"type": "http.request", "body": b"part", "more_body": True}
    assert seen[1] == {"type": "http.disconnect"}
    assert after.status == 200


class _ThreadEvent:
    """A threading.Event set from the server's thread, waited on (bounded) from the test's."""

    def __init__(self) -> None:
        import threading

        self.event = threading.Event()

    def set(self) -> None:
        self.event.set()

    def wait(self) -> bool:
        return self.event.wait(TIMEOUT)


def _wait_for(condition: Callable[[], bool]) -> bool:
    """`condition()` within TIMEOUT, polled."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_shutdown_finishes_open_requests(serve_h3: ServeH3, certs: Certs) -> None:
    """Graceful shutdown: GOAWAY, the request in flight is answered, then the connection
    closes with H3_NO_ERROR."""
    started = _ThreadEvent()
    release = _ThreadEvent()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        started.set()
        await asyncio.to_thread(release.wait)
        await hello(scope, receive, send)

    async def main(srv: RunningServer) -> tuple[Any, H3Client]:
        async with connect(srv.port, certs) as client:
            stream_id = client.request()
            await asyncio.to_thread(started.wait)
            srv.server.should_exit = True
            await asyncio.sleep(0.2)
            release.set()
            response = await client.response(stream_id)
            await asyncio.wait_for(client.closed.wait(), TIMEOUT)
            return response, client

    with serve_h3(slow) as srv:
        response, client = run(main(srv))
    assert response.status == 200
    assert client.terminated is not None and client.terminated.error_code == 0x100


def test_shutdown_with_a_silent_client(serve_h3: ServeH3, certs: Certs) -> None:
    """A client gone without a word does not hold the shutdown: its connection closes after
    the grace, not QUIC's 30 s idle timeout."""

    async def main(port: int) -> Any:
        async with connect(port, certs) as client:
            response = await client.get()
            client._transport.abort()  # gone: nothing more is acknowledged or sent
            return response

    with serve_h3(hello) as srv:
        response = run(main(srv.port))
        started = time.monotonic()
        srv.server.should_exit = True
        assert _wait_for(lambda: not srv.server.state.connections)
        elapsed = time.monotonic() - started
    assert response.status == 200
    assert elapsed < 5


def test_alt_svc_given_by_the_operator(serve_h3: ServeH3, certs: Certs) -> None:
    """`--header 'Alt-Svc: ...'` (a port mapping in front): sent instead of fulmen's own."""

    async def main(port: int) -> Any:
        async with connect(port, certs) as client:
            return await client.get()

    with serve_h3(hello, headers=['Alt-Svc: h3=":443"']) as srv:
        response = run(main(srv.port))
    assert response.headers is not None
    assert [value for name, value in response.headers if name == b"alt-svc"] == [b'h3=":443"']


async def fields_app(scope: Any, receive: Any, send: Any) -> None:
    headers = [(b"Content-Length", b"5"), (b"Connection", b"keep-alive"), (b"Server", b"mine")]
    headers.append((b"X-Edge", b" v "))
    if scope["path"] == "/short":
        headers[0] = (b"Content-Length", b"10")
    status = 204 if scope["path"] == "/204" else 200
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"hello", "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def test_response_fields(serve_h3: ServeH3, certs: Certs) -> None:
    """The application's fields as on HTTP/2: names lower-cased, edge whitespace trimmed,
    connection-specific fields dropped, its own `server` kept alone, its Content-Length held
    to the body (a shorter body resets the stream); a 204 has no DATA and no Content-Length
    (RFC 9110 §8.6). (HEAD is not asked: aioquic's client holds a HEAD response's
    Content-Length to its body, and closes the connection.)"""

    async def main(port: int) -> list[Any]:
        async with connect(port, certs) as client:
            return [
                await client.get(b"/"),
                await client.get(b"/short"),
                await client.get(b"/204"),
            ]

    with serve_h3(fields_app) as srv:
        whole, short, no_content = run(main(srv.port))
    assert whole.headers is not None
    names = [name for name, _ in whole.headers]
    assert names.count(b"server") == 1 and b"connection" not in names
    assert (whole.header(b"server"), whole.header(b"x-edge")) == (b"mine", b"v")
    assert (whole.header(b"content-length"), bytes(whole.body)) == (b"5", b"hello")
    assert short.reset == H3_INTERNAL_ERROR
    assert (no_content.status, bytes(no_content.body)) == (204, b"")
    assert no_content.header(b"content-length") is None
