"""Shared fixtures: a real fulmen server on an ephemeral port, in a thread with its own loop.

`serve(app, **options)` starts `fulmen.Server` with the parametrized parser (`http`) and loop
(`loop`) and yields a `RunningServer` with `.url`, `.port`, `.records` (log records of the
`fulmen` loggers) and `.server`. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from fulmen import Config, Server
from fulmen.loops import loop_factory

TIMEOUT = 10.0  # the bound on every wait in the tests
# Client sockets a test leaves open: closed as its server stops, before the server's graceful
# shutdown, which would otherwise wait out its grace for clients that will never answer.
CLIENT_SOCKETS: list[socket.socket] = []
PASSWORD = "correct horse"  # of the test key's encrypted form (`Certs.encrypted_key`)


class RecordingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=1)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class RunningServer:
    def __init__(self, server: Server, sock: socket.socket, handler: RecordingHandler) -> None:
        self.server = server
        self.sock = sock
        self.handler = handler
        host, port = sock.getsockname()[:2]
        self.host = host
        self.port = port
        self.url = f"http://{host}:{port}"

    @property
    def records(self) -> list[logging.LogRecord]:
        return self.handler.records

    def messages(self, level: int = logging.DEBUG) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]

    def connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=TIMEOUT)
        return sock


def start_server(app: Any, loop_name: str, options: dict[str, Any]) -> Iterator[RunningServer]:
    """A real server in a thread, on an ephemeral port, until the generator is closed."""
    options.setdefault("lifespan", "off")
    options.setdefault("log_level", "debug")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = Config(app, loop=loop_name, **options)
    server = Server(config)
    handler = RecordingHandler()
    ready = threading.Event()
    errors: list[BaseException] = []

    async def main() -> None:
        task = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.005)
        for name in ("fulmen", "fulmen.access"):  # fulmen.error propagates to fulmen
            logging.getLogger(name).addHandler(handler)
        ready.set()
        await task

    def target() -> None:
        try:
            _run(main(), loop_name)
        except BaseException as exc:
            errors.append(exc)
        finally:
            ready.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    assert ready.wait(TIMEOUT), "server did not start"
    if errors:
        raise errors[0]
    try:
        yield RunningServer(server, sock, handler)
    finally:
        while CLIENT_SOCKETS:
            CLIENT_SOCKETS.pop().close()
        server.should_exit = True
        thread.join(TIMEOUT)
        for name in ("fulmen", "fulmen.access"):
            logging.getLogger(name).removeHandler(handler)
        sock.close()
        # Collect now, so a transport or socket left unclosed is reported (ResourceWarning,
        # an error under filterwarnings) against the test that started this server.
        gc.collect()
        assert not thread.is_alive(), "server did not stop"
        if errors:
            raise errors[0]


def _run(coro: Any, loop_name: str) -> None:
    from fulmen.loops import run

    run(coro, loop_factory(loop_name))


@pytest.fixture(params=["h11", "httptools"])
def http(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def serve(http: str, loop: str) -> Callable[..., contextlib.AbstractContextManager[RunningServer]]:
    """`with serve(app, **options) as srv:` over every parser and loop."""

    @contextlib.contextmanager
    def start(app: Any, **options: Any) -> Iterator[RunningServer]:
        options.setdefault("http", http)
        yield from start_server(app, loop, options)

    return start


@pytest.fixture(params=["websockets", "wsproto"])
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def serve_ws(
    engine: str, http: str, loop: str
) -> Callable[..., contextlib.AbstractContextManager[RunningServer]]:
    """`with serve_ws(app, **options) as srv:` over every WebSocket engine, parser and loop."""

    @contextlib.contextmanager
    def start(app: Any, **options: Any) -> Iterator[RunningServer]:
        options.setdefault("http", http)
        options.setdefault("ws", engine)
        yield from start_server(app, loop, options)

    return start


@pytest.fixture
def serve_one() -> Callable[..., contextlib.AbstractContextManager[RunningServer]]:
    """Like `serve`, for tests that do not depend on the parser or loop (httptools, asyncio)."""

    @contextlib.contextmanager
    def start(app: Any, **options: Any) -> Iterator[RunningServer]:
        options.setdefault("http", "httptools")
        yield from start_server(app, options.pop("loop", "asyncio"), options)

    return start


def recv_until_closed(sock: socket.socket, limit: int = 1 << 20) -> bytes:
    """Read until the peer closes (bounded by the socket timeout and `limit` bytes)."""
    chunks = []
    total = 0
    while total < limit:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
        total += len(data)
    return b"".join(chunks)


def wss_first_message(uri: str, context: ssl.SSLContext, sock: socket.socket | None = None) -> Any:
    """Open a wss WebSocket (over `sock` if given) and return the first message it receives.

    With websockets' asyncio client: its sync client reads in a background thread while
    another thread sends, which a Python TLS socket does not support (CPython gh-137583);
    now and then that loses the handshake request."""
    from websockets.asyncio.client import connect

    async def first() -> Any:
        async with connect(uri, ssl=context, sock=sock, open_timeout=TIMEOUT) as websocket:
            try:
                return await asyncio.wait_for(websocket.recv(), TIMEOUT)
            finally:  # Python 3.10's TLS transport warns when collected unclosed
                websocket.transport.close()

    return asyncio.run(first())


def recv_response(sock: socket.socket) -> bytes:
    """Read one response with a Content-Length body (or none) from a raw socket."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


@dataclass
class Certs:
    ca: trustme.CA
    ca_file: str
    cert: str  # the server's certificate (localhost, 127.0.0.1, ::1)
    key: str
    combined: str  # certificate and key in one file
    encrypted_key: str  # `key`, encrypted with PASSWORD
    other_key: str  # a key that belongs to another certificate
    junk: str  # not PEM at all
    client: trustme.LeafCert  # a client certificate from `ca`
    stranger: trustme.LeafCert  # a client certificate from another CA

    def context(self, client_cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
        """A client context trusting the test CA, optionally presenting a certificate."""
        context = ssl.create_default_context(cafile=self.ca_file)
        if client_cert is not None:
            client_cert.configure_cert(context)
        return context


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A test CA, the server's certificate and key in several forms, and client certificates."""
    root = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1", "::1")

    def write(name: str, data: bytes) -> str:
        path = root / name
        path.write_bytes(data)
        return str(path)

    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    encrypted = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(PASSWORD.encode()),
    )
    chain = b"".join(pem.bytes() for pem in leaf.cert_chain_pems)
    return Certs(
        ca=ca,
        ca_file=write("ca.pem", ca.cert_pem.bytes()),
        cert=write("cert.pem", chain),
        key=write("key.pem", leaf.private_key_pem.bytes()),
        combined=write("combined.pem", leaf.private_key_and_cert_chain_pem.bytes()),
        encrypted_key=write("encrypted.pem", encrypted),
        other_key=write("other.pem", ca.issue_cert("other.test").private_key_pem.bytes()),
        junk=write("junk.pem", b"not a certificate\n"),
        client=ca.issue_cert("client@example.com"),
        stranger=trustme.CA().issue_cert("client@example.com"),
    )
