"""A response body from a file, over real sockets: ASGI `http.response.pathsend` and
`http.response.zerocopysend` on HTTP/1.1 (zero-copy `os.sendfile` on plain TCP, read in pieces
over TLS and for chunked framing), with the length the file gives, HEAD, a file missing or
shrinking (500, or the connection cut, and the error logged), a client that leaves or stops
reading mid-file, and the extensions each scope offers. Over both parsers and both loops.
On HTTP/2, within small flow-control windows. Starlette's `FileResponse`, which uses pathsend
when offered, is tested in the framework suite."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import h2.settings
import httpx
import pytest

from fulmen.protocols import filesend
from tests.conftest import TIMEOUT, Certs
from tests.helpers import Fulmen
from tests.protocols.h2client import connect as h2_connect
from tests.protocols.http1_raw import Reader, in_loop, poll_until, request
from tests.protocols.test_slow_clients import read_all, small_buffer_client

pytestmark = pytest.mark.timeout(60)

SIZE = 3 * 1024 * 1024 + 17  # more than a socket buffer holds: the writer has to wait
APP_ERROR = "Exception in ASGI application"


@pytest.fixture
def data_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


class FileApp:
    """`/path`: pathsend of `file` (`?length`: with the app's own Content-Length);
    `/zero`: the file as zerocopysend pieces (`?length`: with the length, else chunked);
    `/shrink`: the length of the file, which is then cut to half before its pathsend;
    `/missing`: pathsend of a file that does not exist; `/small`: two bytes, no file; any
    other path (`/ext`): pathsend of `file`. The scope's extensions are kept."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.sends_returned = threading.Event()
        self.extensions: list[dict[str, Any]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.extensions.append(scope["extensions"])
        path, query = scope["path"], scope["query_string"]
        size = self.file.stat().st_size
        if path == "/small":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})
            return
        headers = [(b"content-type", b"application/octet-stream")]
        if query == b"length" or path == "/shrink":
            headers.append((b"content-length", b"%d" % size))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if path == "/zero":
            await self._zero(send, size)
        elif path == "/shrink":
            os.truncate(self.file, size // 2)
            await send({"type": "http.response.pathsend", "path": str(self.file)})
        elif path == "/missing":
            await send({"type": "http.response.pathsend", "path": str(self.file) + ".gone"})
        else:
            await send({"type": "http.response.pathsend", "path": str(self.file)})
        self.sends_returned.set()

    async def _zero(self, send: Any, size: int) -> None:
        """Three pieces: an offset and a count, then from the file's position (moved by the
        first), then the rest."""
        with open(self.file, "rb") as file:
            third = size // 3
            file.seek(third)
            message = {"type": "http.response.zerocopysend", "file": file, "more_body": True}
            await send({**message, "offset": 0, "count": third})
            assert file.tell() == third  # an explicit offset leaves the position alone
            await send({**message, "count": third})
            assert file.tell() == 2 * third  # none: sent from the position, which moves on
            await send({**message, "more_body": False})
            assert file.tell() == size


def get(sock: socket.socket, path: str, method: str = "GET") -> None:
    sock.sendall(request(method, path))


def count_sendfile(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The `count` of each `os.sendfile` call the server makes from now on."""
    calls: list[int] = []
    real_sendfile = os.sendfile

    def counting(out: int, fd: int, offset: int, count: int) -> int:
        calls.append(count)
        return real_sendfile(out, fd, offset, count)

    monkeypatch.setattr(filesend.os, "sendfile", counting)
    return calls


def test_pathsend_serves_the_file_with_its_length(serve, data_file, monkeypatch) -> None:
    """Zero copy on plain TCP: the bytes come through `os.sendfile`; the length is the file's,
    and the connection serves the next request."""
    calls = count_sendfile(monkeypatch)
    app = FileApp(data_file)
    with serve(app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        for path in ("/path", "/path?length"):
            get(sock, path)
            response = reader.response()
            assert response.status == 200
            assert response.get("content-length") == str(SIZE)
            assert response.body == data_file.read_bytes()
    assert calls and calls[0] == SIZE


def test_zerocopysend_pieces(serve, data_file) -> None:
    """Several zerocopysend messages make one body, with the length (sent zero-copy) or
    chunked (read and framed)."""
    app = FileApp(data_file)
    with serve(app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        get(sock, "/zero?length")
        response = reader.response()
        assert response.get("content-length") == str(SIZE)
        assert response.body == data_file.read_bytes()
        get(sock, "/zero")
        response = reader.response()
        assert response.get("transfer-encoding") == "chunked"
        assert response.body == data_file.read_bytes()


def test_head_gets_the_length_and_no_body(serve, data_file) -> None:
    app = FileApp(data_file)
    with serve(app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        get(sock, "/path", "HEAD")
        response = reader.response("HEAD")
        assert response.get("content-length") == str(SIZE)
        get(sock, "/ext")  # nothing of the file came between the two
        assert reader.response().body == data_file.read_bytes()


def test_http10_client(serve, data_file) -> None:
    app = FileApp(data_file)
    with serve(app) as srv, srv.connect() as sock:
        sock.sendall(request("GET", "/path", version="1.0"))
        data = read_all(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"content-length: %d" % SIZE in head.lower()
    assert body == data_file.read_bytes()


def test_a_missing_file_is_a_500_and_the_server_goes_on(serve, data_file) -> None:
    """The app failed: 500 with the error logged, and (as after any 500) the connection
    closes; the next one is served."""
    app = FileApp(data_file)
    with serve(app) as srv:
        with srv.connect() as sock:
            reader = Reader(sock)
            get(sock, "/missing")
            assert reader.response().status == 500
            assert reader.closed()
        assert any(record.msg == APP_ERROR for record in srv.records)
        with srv.connect() as sock:
            get(sock, "/path")
            assert Reader(sock).response().body == data_file.read_bytes()


@pytest.mark.parametrize("path", ["/shrink", "/zero?length"])
def test_a_file_shorter_than_its_length_cuts_the_response(serve, data_file, path) -> None:
    """The file shrank after the app gave its length: the client gets what there is, then the
    close, never a hang; the error is logged and the server serves the next client."""
    app = FileApp(data_file)
    if path != "/shrink":
        real = app._zero

        async def shrinking(send: Any, size: int) -> None:
            os.truncate(data_file, size // 2)
            await real(send, size)

        app._zero = shrinking  # type: ignore[method-assign]
    with serve(app) as srv:
        with srv.connect() as sock:
            get(sock, path)
            data = read_all(sock)
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"content-length: %d" % SIZE in head.lower()
        assert len(body) < SIZE
        assert any(record.msg == APP_ERROR for record in srv.records)
        with srv.connect() as sock:
            get(sock, "/ext")
            assert Reader(sock).response().status == 200


def assert_no_error_after(srv: Any, tls: ssl.SSLContext | None = None) -> None:
    """Nothing was logged as an error for the request before: checked once a request on a new
    connection is answered, by when the server has ended the earlier request's Task (which
    returned right after its send)."""
    plain = srv.connect()
    with plain if tls is None else tls.wrap_socket(plain, server_hostname="127.0.0.1") as sock:
        get(sock, "/small")
        assert Reader(sock).response().body == b"ok"
    assert srv.messages(logging.ERROR) == []


def test_a_client_leaving_mid_file_ends_the_send(serve, data_file) -> None:
    """The client reads a little of a large file and closes: the app's send returns (the
    rest is dropped) and nothing is logged as an error."""
    big = data_file.parent / "big.bin"
    with open(big, "wb") as file:
        file.truncate(64 * 1024 * 1024)
    app = FileApp(big)
    with serve(app) as srv:
        sock = srv.connect()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        get(sock, "/path")
        assert len(sock.recv(65536)) > 0
        sock.close()  # with unread bytes: a reset
        assert app.sends_returned.wait(TIMEOUT)
        assert_no_error_after(srv)


def test_a_client_reading_nothing_is_dropped_at_timeout_send(serve, data_file) -> None:
    """Zero-copy writing waits for the socket like any response: a client that reads nothing
    is dropped after `--timeout-send`, and the app's send returns."""
    big = data_file.parent / "big.bin"
    with open(big, "wb") as file:
        file.truncate(64 * 1024 * 1024)
    app = FileApp(big)
    with serve(app, timeout_send=1.0) as srv, small_buffer_client(srv) as sock:
        get(sock, "/path")
        began = time.monotonic()
        assert app.sends_returned.wait(TIMEOUT)
        elapsed = time.monotonic() - began
        state = srv.server.state
        poll_until(lambda: not in_loop(srv, lambda: len(state.connections)), "still open")
    assert 1.0 <= elapsed < 5.0, elapsed


def test_a_slow_steady_reader_gets_the_whole_file(serve_one, data_file) -> None:
    """Progress counts, not time: a reader slower than `--timeout-send` for the whole file,
    but steady, is not cut off."""
    app = FileApp(data_file)
    with serve_one(app, timeout_send=1.0) as srv, small_buffer_client(srv) as sock:
        get(sock, "/path")
        received = b""
        stop = threading.Event()
        while b"\r\n\r\n" not in received or len(received.partition(b"\r\n\r\n")[2]) < SIZE:
            chunk = sock.recv(256 * 1024)
            assert chunk, "closed before the end"
            received += chunk
            stop.wait(0.02)  # about 2.5 s in all for 3 MiB: longer than the timeout
        assert received.partition(b"\r\n\r\n")[2] == data_file.read_bytes()


def test_pathsend_over_tls_reads_the_file(serve_one, certs: Certs, data_file) -> None:
    options = {"ssl_certfile": certs.cert, "ssl_keyfile": certs.key}
    app = FileApp(data_file)
    with serve_one(app, **options) as srv:
        url = f"https://127.0.0.1:{srv.port}"
        with httpx.Client(verify=certs.context(), timeout=TIMEOUT) as client:
            for path in ("/path", "/zero", "/zero?length"):
                response = client.get(url + path)
                assert response.status_code == 200
                assert response.content == data_file.read_bytes()


def test_unix_socket(data_file, tmp_path) -> None:
    """Zero copy into a Unix socket too (behind a local proxy)."""
    path = str(tmp_path / "fulmen.sock")
    with Fulmen("tests.apps:pathsend", "--uds", path, "--lifespan", "off"):
        transport = httpx.HTTPTransport(uds=path)
        with httpx.Client(transport=transport, timeout=TIMEOUT) as client:
            response = client.get(f"http://localhost/?{data_file}")
    assert response.headers["content-length"] == str(SIZE)
    assert response.content == data_file.read_bytes()


def test_extensions_offered(serve, data_file) -> None:
    app = FileApp(data_file)
    with serve(app) as srv, srv.connect() as sock:
        reader = Reader(sock)
        for version in ("1.1", "1.0"):
            sock.sendall(
                request("GET", "/ext", headers=[("connection", "keep-alive")], version=version)
            )
            assert reader.response().status == 200
    for extensions in app.extensions:
        assert extensions["http.response.pathsend"] == {}
        assert extensions["http.response.zerocopysend"] == {}


# HTTP/2: the file is read in pieces, sent within the flow-control windows


def test_http2_streams_within_small_windows(serve, data_file) -> None:
    """Three streams at once with 16 KiB stream windows, the client crediting as it reads:
    every body whole, HEAD without DATA."""
    app = FileApp(data_file)
    settings = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16384}
    with serve(app) as srv:
        client = h2_connect(srv.port, settings=settings)
        streams = [client.request(path) for path in ("/path", "/zero", "/zero?length")]
        head = client.request("/path", method="HEAD")
        for stream_id in streams:
            response = client.response(stream_id)
            assert response.status == 200
            assert response.body == data_file.read_bytes()
        response = client.response(head)
        assert response.fields[b"content-length"] == str(SIZE).encode()
        assert response.body == b""


def test_http2_a_shrinking_file_resets_its_stream_only(serve, data_file) -> None:
    app = FileApp(data_file)
    with serve(app) as srv:
        client = h2_connect(srv.port)
        response = client.get("/shrink")
        assert response.reset is not None
        assert len(response.body) < SIZE
        assert client.get("/ext").status == 200  # the connection goes on
        assert any(record.msg == APP_ERROR for record in srv.records)


# Edge cases


def one_message_app(message: dict[str, Any], headers: list[Any] | None = None) -> Any:
    """Starts a 200 response (with `headers`), then sends `message`."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers or []})
        await send(message)

    return app


def test_a_directory_is_a_500(serve_one, tmp_path) -> None:
    with serve_one(
        one_message_app({"type": "http.response.pathsend", "path": str(tmp_path)})
    ) as srv:
        with srv.connect() as sock:
            get(sock, "/")
            assert Reader(sock).response().status == 500
        assert any(record.msg == APP_ERROR for record in srv.records)


def test_a_named_pipe_is_a_500_not_a_blocked_server(serve_one, tmp_path) -> None:
    """Opening a FIFO for reading waits for a writer: the server must not wait with it."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with serve_one(one_message_app({"type": "http.response.pathsend", "path": str(fifo)})) as srv:
        for _ in range(2):  # the server still answers after the first
            with srv.connect() as sock:
                get(sock, "/")
                assert Reader(sock).response().status == 500
        assert sum(record.msg == APP_ERROR for record in srv.records) == 2


def test_an_empty_file(serve, tmp_path) -> None:
    empty = tmp_path / "empty"
    empty.touch()
    app = one_message_app({"type": "http.response.pathsend", "path": str(empty)})
    with serve(app) as srv, srv.connect() as sock:
        get(sock, "/")
        response = Reader(sock).response()
    assert (response.status, response.get("content-length"), response.body) == (200, "0", b"")


def test_a_file_longer_than_the_apps_length_is_refused(serve, data_file) -> None:
    """Nothing of the file goes out: the head is sent, then the connection closes."""
    message = {"type": "http.response.pathsend", "path": str(data_file)}
    with serve(one_message_app(message, [(b"content-length", b"10")])) as srv:
        with srv.connect() as sock:
            get(sock, "/")
            data = read_all(sock)
        assert data.endswith(b"\r\n\r\n")
        assert any(record.msg == APP_ERROR for record in srv.records)


def test_trailers_after_a_file(serve, data_file) -> None:
    """With trailers announced, the file goes chunked and the trailers follow it."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "trailers": True})
        await send({"type": "http.response.pathsend", "path": str(data_file)})
        await send({"type": "http.response.trailers", "headers": [(b"x-digest", b"done")]})

    with serve(app) as srv, srv.connect() as sock:
        sock.sendall(request(headers=[("te", "trailers")]))
        data = read_all_until(sock, b"x-digest: done\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    assert len(body) > SIZE


def read_all_until(sock: socket.socket, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(1 << 20)
        assert chunk, "closed before the end"
        data += chunk
    return data


def test_a_client_leaving_mid_file_over_tls(serve_one, certs: Certs, tmp_path) -> None:
    """The file is read in pieces over TLS: when the client leaves, the reading stops and the
    app's send returns."""
    big = tmp_path / "big.bin"
    with open(big, "wb") as file:
        file.truncate(64 * 1024 * 1024)
    app = FileApp(big)
    options = {"ssl_certfile": certs.cert, "ssl_keyfile": certs.key}
    with serve_one(app, **options) as srv:
        url = f"https://127.0.0.1:{srv.port}/path"
        client = httpx.Client(verify=certs.context(), timeout=TIMEOUT)
        with client, client.stream("GET", url) as response:
            assert len(next(response.iter_raw(65536))) > 0
        assert app.sends_returned.wait(TIMEOUT)
        assert_no_error_after(srv, certs.context())
