"""Raw-socket helpers for the HTTP/1.1 tests: build requests, read exact responses, reach
into the server's loop.

`Reader` keeps the bytes after one response, so pipelined responses can be read one by one,
and checks chunk framing strictly instead of being lenient like a real client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any

from tests.conftest import TIMEOUT, RunningServer


def request(
    method: str = "GET",
    path: str = "/",
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    version: str = "1.1",
) -> bytes:
    """One request as bytes. Host is added for HTTP/1.1; Content-Length when there is a body."""
    lines = [f"{method} {path} HTTP/{version}"]
    headers = list(headers)
    names = {name.lower() for name, _ in headers}
    if version == "1.1" and "host" not in names:
        lines.append("Host: test")
    lines.extend(f"{name}: {value}" for name, value in headers)
    if body and "content-length" not in names and "transfer-encoding" not in names:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Response:
    def __init__(self, status: int, head: bytes, headers: list[tuple[str, str]]) -> None:
        self.status = status
        self.head = head  # the raw head, up to and including the blank line
        self.headers = headers  # (lower-case name, value) in order
        self.body = b""
        self.chunks: list[bytes] | None = None  # chunk payloads, for a chunked body

    def all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def get(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


class Reader:
    """Reads responses from a raw socket, keeping what follows each one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _fill(self) -> bool:
        try:
            data = self.sock.recv(262144)
        except ConnectionResetError:
            data = b""
        self.buffer += data
        return bool(data)

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            assert self._fill(), f"connection closed, wanted {size} bytes: {self.buffer[:200]!r}"
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            assert self._fill(), f"connection closed inside a line: {self.buffer[:200]!r}"
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def head(self) -> Response:
        while b"\r\n\r\n" not in self.buffer:
            assert self._fill(), f"connection closed inside a head: {self.buffer[:200]!r}"
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status, _ = status_line.split(" ", 2)
        assert version == "HTTP/1.1", status_line
        headers = []
        for line in lines:
            name, sep, value = line.partition(":")
            assert sep and name == name.strip(), f"malformed header line {line!r}"
            headers.append((name.lower(), value.strip()))
        return Response(int(status), head + b"\r\n\r\n", headers)

    def response(self, method: str = "GET") -> Response:
        """One final response (1xx must be read with `head()`), framed as the head says."""
        response = self.head()
        length = response.get("content-length")
        if method == "HEAD" or response.status in (204, 304):
            return response
        if response.get("transfer-encoding") is not None:
            assert response.get("transfer-encoding") == "chunked"
            assert length is None, "both Content-Length and Transfer-Encoding"
            response.chunks = self._chunks()
            response.body = b"".join(response.chunks)
        elif length is not None:
            response.body = self._take(int(length))
        else:
            response.body = self.until_closed()
        return response

    def _chunks(self) -> list[bytes]:
        chunks = []
        while True:
            size_line = self._line()
            assert size_line == size_line.strip() and size_line, f"bad chunk size {size_line!r}"
            size = int(size_line, 16)
            if size == 0:
                assert self._line() == b"", "trailers or junk after the last chunk"
                return chunks
            chunks.append(self._take(size))
            assert self._take(2) == b"\r\n", "chunk data not followed by CRLF"

    def until_closed(self) -> bytes:
        while self._fill():
            pass
        data, self.buffer = self.buffer, b""
        return data

    def closed(self) -> bool:
        """True when the peer closed with nothing more sent (waits up to the socket timeout)."""
        return not self.buffer and not self._fill()


def in_loop(srv: RunningServer, fn: Callable[[], Any]) -> Any:
    """Run `fn()` on the server's event loop thread and return its result."""
    assert srv.server.state is not None
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def call() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)

    srv.server.state.loop.call_soon_threadsafe(call)
    return future.result(TIMEOUT)


def open_gate(srv: RunningServer, gate: asyncio.Event) -> None:
    """Set an asyncio.Event that an app awaits on the server's loop."""
    in_loop(srv, gate.set)


def the_connection(srv: RunningServer) -> Any:
    """The server's only open connection, once it has been accepted."""
    connections: list[Any] = []

    def accepted() -> bool:
        connections[:] = in_loop(srv, lambda: list(srv.server.state.connections))
        return bool(connections)

    poll_until(accepted, "no connection was accepted")
    assert len(connections) == 1, connections
    return connections[0]


def poll_until(predicate: Callable[[], bool], message: str) -> None:
    """For server state that no event announces: check often, bounded by TIMEOUT."""
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, message
        time.sleep(0.005)


async def read_body(receive: Callable[[], Any]) -> bytes:
    body = b""
    while True:
        message = await receive()
        assert message["type"] == "http.request", message
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return body


async def respond(send: Callable[[Any], Any], body: bytes, status: int = 200, headers=()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})
    await send({"type": "http.response.body", "body": body})


async def echo_app(scope, receive, send) -> None:
    """Answers `<METHOD> <path> <body>`, so each response names its request."""
    body = await read_body(receive)
    await respond(send, f"{scope['method']} {scope['path']} ".encode() + body)
