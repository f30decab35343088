"""Zero lost requests under sustained load while workers are replaced or removed: SIGHUP rolling
restarts, SIGTTOU, and `--limit-max-requests` recycling, with eight client threads that never
retry, over plain TCP and over TLS, with WebSockets open meanwhile.

Four threads keep one connection each (raw sockets: a request, its response, the next request
on the same connection; a new connection only once a response says `connection: close`), two
are httpx clients keeping their connections alive (without retries), and two open a new
connection per request. Every request must be answered with 200. WebSockets open during a
restart must get the 1012 close (service restart) and reconnect. The load runs
`FULMEN_LOAD_SECONDS` seconds (3 by default, as CI runs it; 10 for the long local runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from tests.conftest import TIMEOUT, Certs
from tests.helpers import BOOTING, Fulmen, Gunicorn

pytestmark = pytest.mark.timeout(120)

APP = "tests.apps_workers:app"
SECONDS = float(os.environ.get("FULMEN_LOAD_SECONDS", "3"))
KEEP_ALIVE_THREADS = 4
HTTPX_THREADS = 2
NEW_CONNECTION_THREADS = 2
REQUEST = b"GET / HTTP/1.1\r\nhost: test\r\n\r\n"
_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)\r\n", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection: *close\r\n", re.IGNORECASE)


def _response(sock: socket.socket, buffer: bytes) -> tuple[bytes, bytes, bool]:
    """Read one response: (status line, what follows it, whether the server closes after)."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"closed before a response ({len(buffer)} bytes read)")
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    match = _LENGTH.search(head + b"\r\n")
    length = int(match.group(1)) if match else 0
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed in the body")
        rest += data
    return head.split(b"\r\n", 1)[0], rest[length:], _CLOSE.search(head + b"\r\n") is not None


class Clients:
    """The client threads, counting answers and failures until `stop`."""

    def __init__(self, port: int, tls: ssl.SSLContext | None = None) -> None:
        self.port = port
        self.tls = tls
        self.answered = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(keep,), daemon=True)
            for keep in [True] * KEEP_ALIVE_THREADS + [False] * NEW_CONNECTION_THREADS
        ]
        self.threads += [
            threading.Thread(target=self._run_httpx, daemon=True) for _ in range(HTTPX_THREADS)
        ]
        for thread in self.threads:
            thread.start()

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        if self.tls is None:
            return sock
        return self.tls.wrap_socket(sock, server_hostname="127.0.0.1")

    def _count(self, failure: str | None) -> None:
        with self.lock:
            if failure is None:
                self.answered += 1
            else:
                self.failures.append(f"{time.monotonic():.3f} {failure}")

    def _run_httpx(self) -> None:
        """An httpx client: its pool keeps connections alive, and it never retries a request."""
        scheme = "http" if self.tls is None else "https"
        transport = httpx.HTTPTransport(retries=0, verify=self.tls or True)
        with httpx.Client(transport=transport, timeout=TIMEOUT) as client:
            while not self.done.is_set():
                try:
                    response = client.get(f"{scheme}://127.0.0.1:{self.port}/")
                    ok = response.status_code == 200
                    self._count(None if ok else f"status {response.status_code}")
                except httpx.HTTPError as exc:
                    self._count(f"httpx {exc!r}")

    def _run(self, keep_alive: bool) -> None:
        sock: socket.socket | None = None
        buffer = b""
        while not self.done.is_set():
            try:
                if sock is None:
                    sock = self._connect()
                    buffer = b""
                sock.sendall(REQUEST if keep_alive else REQUEST[:-2] + b"connection: close\r\n\r\n")
                status, buffer, close = _response(sock, buffer)
                assert status == b"HTTP/1.1 200 OK", status
                self._count(None)
            except (OSError, AssertionError) as exc:
                self._count(repr(exc))
                close = True
            if close or not keep_alive:
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()

    def stop(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(TIMEOUT)


class WebSockets:
    """WebSocket clients that stay connected; each close must be 1012 (service restart), after
    which the client reconnects, as a browser app would.

    Each runs websockets' asyncio client on its own loop in its thread. Its sync client reads
    in a background thread while another thread sends, which a Python TLS socket does not
    support (one OpenSSL object used from two threads at once; see CPython gh-137583): now
    and then a wss handshake request was lost that way, never reaching the server, which
    closed the idle connection at the restart (seen in about one run in twenty)."""

    def __init__(self, port: int, tls: ssl.SSLContext | None, count: int) -> None:
        self.url = f"{'ws' if tls is None else 'wss'}://127.0.0.1:{port}/"
        self.tls = tls
        self.restarts = 0
        self.failures: list[str] = []
        self.done = threading.Event()
        self.threads = [
            threading.Thread(target=asyncio.run, args=(self._run(),), daemon=True)
            for _ in range(count)
        ]
        for thread in self.threads:
            thread.start()

    async def _run(self) -> None:
        while not self.done.is_set():
            ws = None
            try:
                async with connect(self.url, ssl=self.tls, open_timeout=TIMEOUT) as ws:
                    await asyncio.wait_for(ws.recv(), TIMEOUT)  # the worker's pid: accepted
                    while not self.done.is_set():
                        # (asyncio.TimeoutError: the builtin one only from Python 3.11 on)
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(ws.recv(), 0.1)
            except ConnectionClosed as exc:
                if exc.rcvd is not None and exc.rcvd.code == 1012:
                    self.restarts += 1
                else:
                    self.failures.append(f"{time.monotonic():.3f} closed: {exc!r}")
            except (OSError, asyncio.TimeoutError, InvalidHandshake) as exc:
                self.failures.append(f"{time.monotonic():.3f} {exc!r}")
            finally:
                if ws is not None:  # Python 3.10's TLS transport warns if collected unclosed
                    ws.transport.close()

    def stop(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(TIMEOUT)


def _load(
    server: Fulmen | Gunicorn,
    during: Callable[[float], None],
    tls: ssl.SSLContext | None = None,
    websockets: int = 0,
) -> None:
    """The clients against `server` for `SECONDS`, calling `during(elapsed)` every 0.1 s.
    Every request must succeed, and every WebSocket close be a 1012."""
    clients = Clients(server.port, tls)
    sockets = WebSockets(server.port, tls, websockets)
    began = time.monotonic()
    try:
        while (elapsed := time.monotonic() - began) < SECONDS:
            during(elapsed)
            time.sleep(0.1)
    finally:
        clients.stop()
        sockets.stop()
    assert clients.failures == [], clients.failures[:5]
    assert clients.answered > 100 * SECONDS
    assert sockets.failures == [], sockets.failures[:5]
    if websockets:
        assert sockets.restarts >= websockets  # each was closed by a restart at least once
    print(f"{clients.answered} requests in {SECONDS} s, none failed")


def _under_load(
    args: tuple[str, ...],
    during: Callable[[Fulmen], Callable[[float], None]],
    tls: Certs | None = None,
    websockets: int = 0,
) -> str:
    """Serve `APP` with two workers and `args` under the clients, calling `during(server)(elapsed)`
    every 0.1 s; the server's log."""
    if tls is not None:
        args += ("--ssl-certfile", tls.cert, "--ssl-keyfile", tls.key)
    with Fulmen(APP, "--port", "0", "--workers", "2", "--no-access-log", *args) as server:
        for _ in range(2):
            server.stderr.wait_for(r"Worker process \[\d+\] is ready")
        _load(server, during(server), tls and tls.context(), websockets)
        return server.stderr.text


def _every(seconds: float, action: Callable[[int], None]) -> Callable[[float], None]:
    """A `during` callback calling `action(n)` for the n-th time every `seconds`, from
    `seconds / 2` on."""
    done: list[float] = []

    def during(elapsed: float) -> None:
        if elapsed >= (len(done) + 0.5) * seconds:
            action(len(done))
            done.append(elapsed)

    return during


def _signals(server: Fulmen | Gunicorn, every: float, *sigs: int) -> Callable[[float], None]:
    """Send `sigs` to `server` by turns, every `every` seconds."""
    return _every(every, lambda n: server.signal(sigs[n % len(sigs)]))


def test_sighup_rolling_restarts_lose_no_request() -> None:
    """SIGHUP every second: each restart replaces both workers under load."""
    text = _under_load((), lambda server: _signals(server, 1.0, signal.SIGHUP))
    assert text.count("Received SIGHUP") >= 2
    assert "stopped (exit code 0)" in text


def test_sighup_over_tls_with_websockets_open_loses_no_request(certs: Certs) -> None:
    """The same over TLS, which cannot half-close, with two WebSockets open that get 1012 at
    each restart and reconnect."""
    text = _under_load((), lambda server: _signals(server, 1.0, signal.SIGHUP), certs, 2)
    assert text.count("Received SIGHUP") >= 2


def test_sighup_with_websockets_open_loses_no_request() -> None:
    text = _under_load((), lambda server: _signals(server, 1.0, signal.SIGHUP), websockets=2)
    assert text.count("Received SIGHUP") >= 2


def test_removing_workers_loses_no_request() -> None:
    """SIGTTOU and SIGTTIN by turns, every half second: a worker serving keep-alive clients is
    stopped, then one is added."""
    text = _under_load((), lambda server: _signals(server, 0.5, signal.SIGTTOU, signal.SIGTTIN))
    assert text.count("Received SIGTTOU, decreasing the number of workers to 1") >= 2


def test_request_limit_recycling_loses_no_request() -> None:
    text = _under_load(
        ("--limit-max-requests", "200", "--limit-max-requests-jitter", "50"),
        lambda server: lambda elapsed: None,
    )
    assert text.count("reached its request limit; starting a replacement") >= 2


def test_gunicorn_hup_and_max_requests_lose_no_request() -> None:
    """gunicorn with `FulmenWorker`: SIGHUP every second, and workers recycled every 300 to
    350 requests (`--max-requests`, `--max-requests-jitter`)."""
    args = ("--max-requests", "300", "--max-requests-jitter", "50")
    with Gunicorn(*args, workers=2) as server:
        server.stderr.wait_count(BOOTING.pattern, 2)
        _load(server, _signals(server, 1.0, signal.SIGHUP))
        assert server.stderr.count(BOOTING.pattern) >= 6
