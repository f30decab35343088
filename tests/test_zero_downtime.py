"""Zero lost requests under sustained load while workers are replaced or removed: SIGHUP rolling
restarts, SIGTTOU, and `--limit-max-requests` recycling, with eight client threads that never
retry.

Six threads keep one connection each (raw sockets: a request, its response, the next request
on the same connection; a new connection only once a response says `connection: close`) and
two open a new connection per request. Every request must be answered with 200. The load runs
`FULMEN_LOAD_SECONDS` seconds (3 by default, as CI runs it; 10 for the long local runs).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable

import pytest

from tests.conftest import TIMEOUT
from tests.helpers import Fulmen

pytestmark = pytest.mark.timeout(120)

APP = "tests.apps_workers:app"
SECONDS = float(os.environ.get("FULMEN_LOAD_SECONDS", "3"))
KEEP_ALIVE_THREADS = 6
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

    def __init__(self, port: int) -> None:
        self.port = port
        self.answered = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.threads = [
            threading.Thread(target=self._run, args=(keep,), daemon=True)
            for keep in [True] * KEEP_ALIVE_THREADS + [False] * NEW_CONNECTION_THREADS
        ]
        for thread in self.threads:
            thread.start()

    def _run(self, keep_alive: bool) -> None:
        sock: socket.socket | None = None
        buffer = b""
        while not self.done.is_set():
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
                    buffer = b""
                sock.sendall(REQUEST if keep_alive else REQUEST[:-2] + b"connection: close\r\n\r\n")
                status, buffer, close = _response(sock, buffer)
                assert status == b"HTTP/1.1 200 OK", status
                with self.lock:
                    self.answered += 1
            except (OSError, AssertionError) as exc:
                with self.lock:
                    self.failures.append(f"{time.monotonic():.3f} {exc!r}")
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


def _under_load(args: tuple[str, ...], during: Callable[[Fulmen, float], None]) -> str:
    """Serve `APP` with two workers and `args` under the clients for `SECONDS`, calling
    `during(server, elapsed)` every 0.1 s; the server's log. Every request must succeed."""
    with Fulmen(APP, "--port", "0", "--workers", "2", "--no-access-log", *args) as server:
        for _ in range(2):
            server.stderr.wait_for(r"Worker process \[\d+\] is ready")
        clients = Clients(server.port)
        began = time.monotonic()
        try:
            while (elapsed := time.monotonic() - began) < SECONDS:
                during(server, elapsed)
                time.sleep(0.1)
        finally:
            clients.stop()
        assert clients.failures == [], clients.failures[:5]
        assert clients.answered > 100 * SECONDS
        print(f"{clients.answered} requests in {SECONDS} s, none failed")
        return server.stderr.text


def test_sighup_rolling_restarts_lose_no_request() -> None:
    """SIGHUP every second: each restart replaces both workers under load."""
    sent: list[float] = []

    def hup(server: Fulmen, elapsed: float) -> None:
        if elapsed >= len(sent) + 0.5:
            server.signal(signal.SIGHUP)
            sent.append(elapsed)

    text = _under_load((), hup)
    assert text.count("Received SIGHUP") == len(sent) >= 2
    assert "stopped (exit code 0)" in text


def test_removing_workers_loses_no_request() -> None:
    """SIGTTOU and SIGTTIN by turns, every half second: a worker serving keep-alive clients is
    stopped, then one is added."""
    sent: list[float] = []

    def ttin_ttou(server: Fulmen, elapsed: float) -> None:
        if elapsed >= len(sent) * 0.5 + 0.5:
            server.signal(signal.SIGTTIN if len(sent) % 2 else signal.SIGTTOU)
            sent.append(elapsed)

    text = _under_load((), ttin_ttou)
    assert text.count("Received SIGTTOU, decreasing the number of workers to 1") >= 2


def test_request_limit_recycling_loses_no_request() -> None:
    text = _under_load(
        ("--limit-max-requests", "200", "--limit-max-requests-jitter", "50"),
        lambda server, elapsed: None,
    )
    assert text.count("reached its request limit; starting a replacement") >= 2
