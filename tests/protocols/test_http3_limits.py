"""HTTP/3 under the server's limits and timeouts, over real UDP sockets with aioquic's client:
the keep-alive close, QUIC's idle timeout kept off a busy connection, request body limits and
timeouts, a client that stops acknowledging, concurrency, back-pressure on request bodies,
bodies from files, metrics, and the options' checks."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from fulmen import Config
from fulmen.protocols import quic as quic_module
from fulmen.tls import TLSError, check_tls_options
from tests.conftest import TIMEOUT, Certs
from tests.protocols.conftest import ServeH3
from tests.protocols.h3client import connect, run
from tests.protocols.test_http3 import _wait_for, hello, read_body

H3_REQUEST_CANCELLED = 0x10C


def test_keep_alive_closes_idle_connection(serve_h3: ServeH3, certs: Certs) -> None:
    async def main(port: int) -> Any:
        async with connect(port, certs) as client:
            response = await client.get()
            await asyncio.wait_for(client.closed.wait(), TIMEOUT)
            return response, client.terminated

    with serve_h3(hello, timeout_keep_alive=1) as srv:
        response, terminated = run(main(srv.port))
    assert response.status == 200
    assert terminated is not None and terminated.error_code == 0x100  # H3_NO_ERROR


def test_busy_connection_outlives_idle_timeout(
    serve_h3: ServeH3, certs: Certs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app busier than QUIC's idle timeout: the server's PINGs keep the connection up."""
    monkeypatch.setattr(quic_module, "MIN_IDLE_TIMEOUT", 3.0)

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(6.5)
        await hello(scope, receive, send)

    async def main(port: int) -> Any:
        async with connect(port, certs, idle_timeout=60.0) as client:
            return await client.get()

    with serve_h3(slow, timeout_keep_alive=1) as srv:
        response = run(main(srv.port))
    assert response.status == 200


def test_limit_request_body(serve_h3: ServeH3, certs: Certs) -> None:
    async def main(port: int) -> Any:
        async with connect(port, certs) as client:
            over = await client.get(method=b"POST", body=b"x" * 2000)
            under = await client.get(method=b"POST", body=b"x" * 1000)
            return over, under

    with serve_h3(hello, limit_request_body=1000) as srv:
        over, under = run(main(srv.port))
    assert over.status == 413
    assert under.status == 200


def test_request_body_timeout(serve_h3: ServeH3, certs: Certs) -> None:
    async def main(port: int) -> Any:
        async with connect(port, certs) as client:
            stream_id = client.request(b"POST", body=b"part", end=False)
            return await client.response(stream_id)

    with serve_h3(hello, timeout_request_body=1) as srv:
        response = run(main(srv.port))
    assert response.status == 408


def test_limit_concurrency(serve_h3: ServeH3, certs: Certs) -> None:
    release = threading.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/hold":
            await asyncio.to_thread(release.wait, TIMEOUT)
        await hello(scope, receive, send)

    async def main(port: int) -> Any:
        async with connect(port, certs) as client:
            held = client.request(path=b"/hold")
            await asyncio.sleep(0.2)
            refused = await client.get(b"/other")
            release.set()
            return await client.response(held), refused

    with serve_h3(app, limit_concurrency=1) as srv:
        held, refused = run(main(srv.port))
    assert (held.status, refused.status) == (200, 503)


def test_unread_body_holds_the_window(serve_h3: ServeH3, certs: Certs) -> None:
    """An app that does not read: the client may send what its stream window allows when the
    server holds it (past 512 KiB unread; the window is then 1 or 2 MiB), no more; once the app
    reads, the rest comes."""
    reading = threading.Event()
    received: list[int] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.to_thread(reading.wait, TIMEOUT)
        received.append(len(await read_body(receive)))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"read"})

    async def main(srv: Any) -> Any:
        async with connect(srv.port, certs) as client:
            stream_id = client.request(b"POST", body=b"", end=False)
            chunk = b"y" * 65536
            for _ in range(128):  # 8 MiB
                client.send(stream_id, chunk)
            client.send(stream_id, b"", end=True)
            conn = next(iter(srv.server.quic_listeners[0].connections))
            buffered = await settled(lambda: getattr(conn.streams.get(stream_id), "unread", 0))
            reading.set()
            response = await client.response(stream_id)
            return buffered, response

    with serve_h3(app) as srv:
        buffered, response = run(main(srv))
    assert 512 * 1024 < buffered <= 2 * 1024 * 1024
    assert response.status == 200
    assert received == [128 * 65536]


async def settled(value: Any) -> int:
    """`value()` once it is positive and has not changed for 0.3 s (bounded)."""
    deadline = time.monotonic() + TIMEOUT
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        now = value()
        if now != last:
            last, since = now, time.monotonic()
        elif now > 0 and time.monotonic() - since >= 0.3:
            break
        await asyncio.sleep(0.02)
    return int(last)


def test_client_that_stops_acknowledging(serve_h3: ServeH3, certs: Certs) -> None:
    """`timeout_send`: a client gone silent mid-response; the stream is reset, the app's
    send returns and its receive() gives http.disconnect."""
    ended: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b"z" * 65536
        for _ in range(1000):
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        ended.append(await receive())

    async def main(port: int) -> None:
        async with connect(port, certs) as client:
            stream_id = client.request()
            response = client.responses[stream_id]
            await asyncio.wait_for(response.data.wait(), TIMEOUT)
            client._transport.abort()  # gone: nothing more is acknowledged

    with serve_h3(app, timeout_send=1) as srv:
        run(main(srv.port))
        assert _wait_for(lambda: bool(ended))
    assert ended == [{"type": "http.disconnect"}]


def test_pathsend(serve_h3: ServeH3, certs: Certs, tmp_path: Path) -> None:
    data = bytes(range(256)) * 4096 * 3  # 3 MiB
    path = tmp_path / "file.bin"
    path.write_bytes(data)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert "http.response.pathsend" in scope["extensions"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.pathsend", "path": str(path)})

    async def main(port: int) -> Any:
        async with connect(port, certs) as client:
            return await client.get()

    with serve_h3(app) as srv:
        response = run(main(srv.port))
    assert response.status == 200
    assert response.header(b"content-length") == str(len(data)).encode()
    assert bytes(response.body) == data


def test_metrics_count_http3(serve_h3: ServeH3, certs: Certs) -> None:
    async def main(port: int) -> Any:
        async with connect(port, certs) as client:
            return [await client.get(b"/%d" % i) for i in range(3)]

    with serve_h3(hello, metrics_bind="127.0.0.1:0") as srv:
        responses = run(main(srv.port))
        metrics_port = srv.server.servers[0].sockets[0].getsockname()[1]
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=TIMEOUT).text
    assert [r.status for r in responses] == [200, 200, 200]
    assert 'fulmen_requests_total{status="200"} 3' in text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "http3 given without ssl_certfile"),
        ({"ssl_cert_reqs": 2, "ssl_ca_certs": "ca.pem"}, "ssl_cert_reqs 2"),
    ],
)
def test_options_checked(options: dict[str, Any], message: str, certs: Certs) -> None:
    if options:
        options["ssl_certfile"] = certs.cert
    with pytest.raises(TLSError, match=message):
        check_tls_options(Config("tests.apps:app", http3=True, **options))


def test_needs_aioquic(monkeypatch: pytest.MonkeyPatch, certs: Certs) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "aioquic" else real(name)
    )
    with pytest.raises(TLSError, match="pip install 'fulmen\\[http3\\]'"):
        check_tls_options(Config("tests.apps:app", http3=True, ssl_certfile=certs.cert))


def test_needs_a_tcp_listener(serve_one: Any, certs: Certs, tmp_path: Path) -> None:
    """Only a Unix socket: there is no port to share, and the server says so."""
    from fulmen import Server

    config = Config(
        hello, uds=str(tmp_path / "s.sock"), ssl_certfile=certs.cert, ssl_keyfile=certs.key,
        http3=True, lifespan="off", loop="asyncio",
    )  # fmt: skip
    server = Server(config)
    asyncio.run(asyncio.wait_for(server.serve(), TIMEOUT))
    assert not server.started
