"""`--log-level trace` logs every ASGI scope and message on `fulmen.asgi` (MessageLogger).

Real servers and clients: an HTTP request with a body, a WebSocket echo, the lifespan
messages, payload truncation, escaping of hostile paths and bodies, a raising application, and
at `debug` the application left unwrapped. One subprocess test runs the CLI end to end.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect

from fulmen.logging import TRACE_LEVEL
from fulmen.middleware.message_logger import MessageLogger, message_repr
from tests.conftest import TIMEOUT, RunningServer, recv_response
from tests.helpers import Fulmen, record_logs
from tests.protocols.http1_raw import poll_until, read_body


async def echo_app(scope: Any, receive: Any, send: Any) -> None:
    """HTTP: answers the request body; `/boom` raises. WebSocket: echoes one message."""
    if scope["type"] == "websocket":
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        message = await receive()
        await send({"type": "websocket.send", "text": message.get("text")})
        await receive()  # the client's close
        return
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": message["type"] + ".complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["path"] == "/boom":
        raise RuntimeError("boom\nFAKE LINE")
    body = await read_body(receive)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})


def trace_lines(srv: RunningServer) -> list[str]:
    return [r.getMessage() for r in srv.records if r.name == "fulmen.asgi"]


def wait_line(srv: RunningServer, text: str) -> None:
    """The access path answers before `Completed` is logged: wait for it, bounded."""
    poll_until(lambda: any(text in line for line in trace_lines(srv)), f"no line with {text!r}")


def test_http_request_with_body(serve_one: Any) -> None:
    with serve_one(echo_app, log_level="trace") as srv:
        response = httpx.post(srv.url + "/echo?q=1", content=b"hello", timeout=TIMEOUT)
        assert response.content == b"hello"
        wait_line(srv, "Completed")
    assert isinstance(srv.server.state.app, MessageLogger)
    lines = trace_lines(srv)
    assert all(r.levelno == TRACE_LEVEL for r in srv.records if r.name == "fulmen.asgi")
    started, receive, start, body, completed = lines
    prefix = started.split(" - ")[0] + " - ASGI [1] "
    assert prefix.startswith("127.0.0.1:")
    assert all(line.startswith(prefix) for line in lines)
    assert started.startswith(prefix + "Started scope={'type': 'http'")
    assert "'path': '/echo'" in started and "'query_string': b'q=1'" in started
    assert "(b'content-length', b'5')" in started  # headers are shown
    assert "'state': <...>" in started
    assert receive == (
        prefix + "Receive {'type': 'http.request', 'body': <5 bytes: b'hello'>, 'more_body': False}"
    )
    assert start == prefix + "Send {'type': 'http.response.start', 'status': 200, 'headers': []}"
    assert body == prefix + "Send {'type': 'http.response.body', 'body': <5 bytes: b'hello'>}"
    assert completed == prefix + "Completed"


def test_calls_are_numbered_per_server(serve_one: Any) -> None:
    with serve_one(echo_app, log_level="trace") as srv, httpx.Client(timeout=TIMEOUT) as client:
        for _ in range(3):
            client.post(srv.url, content=b"x")
        wait_line(srv, "ASGI [3] Completed")
    started = [line.split(" - ", 1)[1].split(" scope=")[0] for line in trace_lines(srv)]
    assert [line for line in started if "Started" in line] == [
        f"ASGI [{n}] Started" for n in (1, 2, 3)
    ]


def test_long_body_is_truncated(serve_one: Any) -> None:
    payload = b"a" * 100 + b"b" * 412
    with serve_one(echo_app, log_level="trace") as srv:
        httpx.post(srv.url, content=payload, timeout=TIMEOUT)
        wait_line(srv, "Completed")
    shown = "<512 bytes: b'" + "a" * 100 + "'...>"
    sends = [line for line in trace_lines(srv) if "http.response.body" in line]
    assert sends and shown in sends[0]
    assert "b" * 10 not in "".join(trace_lines(srv))


def test_websocket_exchange(serve_one: Any) -> None:
    with serve_one(echo_app, log_level="trace", ws="websockets") as srv:
        with connect(f"ws://{srv.host}:{srv.port}/chat", open_timeout=TIMEOUT) as ws:
            ws.send("x" * 150)
            assert ws.recv(timeout=TIMEOUT) == "x" * 150
        wait_line(srv, "Completed")
    text = "\n".join(trace_lines(srv))
    assert "Started scope={'type': 'websocket'" in text and "'path': '/chat'" in text
    assert "Receive {'type': 'websocket.connect'}" in text
    assert "Send {'type': 'websocket.accept'}" in text
    preview = "<150 chars: '" + "x" * 100 + "'...>"
    assert f"Receive {{'type': 'websocket.receive', 'text': {preview}}}" in text
    assert f"Send {{'type': 'websocket.send', 'text': {preview}}}" in text
    assert "Receive {'type': 'websocket.disconnect'" in text


def test_lifespan(serve_one: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with record_logs(monkeypatch) as handler, serve_one(echo_app, log_level="trace", lifespan="on"):
        pass
    lines = [r.getMessage() for r in handler.records if r.name == "fulmen.asgi"]
    assert lines[0].startswith("ASGI [1] Started scope={'type': 'lifespan'")  # no client
    assert "'state': <...>" in lines[0]
    assert lines[1:] == [
        "ASGI [1] Receive {'type': 'lifespan.startup'}",
        "ASGI [1] Send {'type': 'lifespan.startup.complete'}",
        "ASGI [1] Receive {'type': 'lifespan.shutdown'}",
        "ASGI [1] Send {'type': 'lifespan.shutdown.complete'}",
        "ASGI [1] Completed",
    ]


def test_control_characters_are_escaped(serve_one: Any) -> None:
    with serve_one(echo_app, log_level="trace") as srv, srv.connect() as sock:
        body = b"line\nFAKE \x1b[31m"
        # %0A and %1B decode to LF and ESC in scope["path"].
        head = b"POST /a%0Ab%1B%E2%80%A8 HTTP/1.1\r\nHost: x\r\nContent-Length: "
        sock.sendall(head + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert recv_response(sock).endswith(body)
        wait_line(srv, "Completed")
    lines = trace_lines(srv)
    for line in lines:
        assert line.isprintable(), line
    text = "\n".join(lines)
    assert "'path': '/a\\nb\\x1b\\u2028'" in text
    assert "b'line\\nFAKE \\x1b[31m'" in text


def test_exception_is_logged(serve_one: Any) -> None:
    with serve_one(echo_app, log_level="trace") as srv:
        assert httpx.get(srv.url + "/boom", timeout=TIMEOUT).status_code == 500
        wait_line(srv, "Raised exception")
    raised = [line for line in trace_lines(srv) if "Raised exception" in line]
    assert raised == [raised[0]]
    assert raised[0].endswith("ASGI [1] Raised exception RuntimeError('boom\\nFAKE LINE')")
    assert not any("Completed" in line for line in trace_lines(srv))


def test_debug_level_does_not_wrap(serve_one: Any) -> None:
    with serve_one(echo_app, log_level="debug", lifespan="on") as srv:
        assert httpx.post(srv.url, content=b"hi", timeout=TIMEOUT).content == b"hi"
        assert srv.server.state.app is echo_app
    assert not any(r.levelno < logging.DEBUG for r in srv.records)


def test_message_repr_of_other_values() -> None:
    assert message_repr("not\na dict") == "'not\\na dict'"
    assert message_repr({"type": "x", "body": memoryview(b"ab")}) == (
        "{'type': 'x', 'body': <2 bytes: b'ab'>}"
    )
    assert message_repr({"type": "x", "bytes": None}) == "{'type': 'x', 'bytes': None}"


def test_cli_trace() -> None:
    args = ("tests.apps:app", "--port", "0", "--lifespan", "off", "--log-level", "trace")
    with Fulmen(*args) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            sock.sendall(b"GET /hi HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert recv_response(sock).startswith(b"HTTP/1.1 200")
        server.stderr.wait_for(r"TRACE: +127\.0\.0\.1:\d+ - ASGI \[1\] Completed$")
        started = server.stderr.wait_for(r"ASGI \[1\] Started scope=(.*)$")
    assert started[1].startswith("{'type': 'http'") and "'path': '/hi'" in started[1]
