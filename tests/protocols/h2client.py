"""An HTTP/2 client over a real socket, for exact frames: h2's client state machine, with every
event it reports kept, so that tests can assert on resets, GOAWAY and flow control."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from tests.conftest import CLIENT_SOCKETS, TIMEOUT

OPEN = CLIENT_SOCKETS  # closed as the test's server stops


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    informational: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None  # the RST_STREAM error code, if the server reset the stream

    @property
    def fields(self) -> dict[bytes, bytes]:
        return dict(self.headers)


def split_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """The whole frames at the start of `data` (9-byte header, then the payload), and the rest."""
    frames = []
    while len(data) >= 9:
        end = 9 + int.from_bytes(data[:3], "big")
        if len(data) < end:
            break
        frames.append(data[:end])
        data = data[end:]
    return frames, data


@dataclass
class GoAway:
    last_stream_id: int
    error_code: int


class H2Client:
    """`H2Client(sock)` sends the connection preface and SETTINGS; `request` opens a stream,
    `response` reads until it ends. Received DATA is credited back at once unless
    `auto_ack=False`."""

    def __init__(
        self,
        sock: socket.socket,
        settings: dict[int, int] | None = None,
        auto_ack: bool = True,
        preface: bool = True,
    ) -> None:
        self.sock = sock
        OPEN.append(sock)
        self.sock.settimeout(TIMEOUT)
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,  # malformed requests are sent as written
            normalize_outbound_headers=False,
        )
        self.conn = h2.connection.H2Connection(config)
        if settings:
            self.conn.local_settings.update(settings)
        self.auto_ack = auto_ack
        self.responses: dict[int, Response] = {}
        self.events: list[h2.events.Event] = []
        self.goaway: GoAway | None = None
        self.buffer = b""
        self.closed = False
        self.error: h2.exceptions.ProtocolError | None = None  # what the server got wrong
        if preface:
            self.conn.initiate_connection()
            self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def request(
        self,
        path: str = "/",
        method: str = "GET",
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes = b"",
        end: bool = True,
        authority: bytes = b"test",
    ) -> int:
        stream_id = self.conn.get_next_available_stream_id()
        block = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", authority),
            (b":path", path.encode()),
            *headers,
        ]
        self.send_headers(stream_id, block, end_stream=end and not body)
        if body:
            self.send_body(stream_id, body, end)
        return stream_id

    def send_headers(
        self, stream_id: int, block: list[tuple[bytes, bytes]], end_stream: bool
    ) -> None:
        self.responses[stream_id] = Response()
        self.conn.send_headers(stream_id, block, end_stream=end_stream)
        self.flush()

    def send_body(self, stream_id: int, body: bytes, end: bool = True) -> None:
        """Send `body`, waiting for send window as needed."""
        sent = 0
        while sent < len(body):
            window = min(self.conn.local_flow_control_window(stream_id), 16384)
            if window <= 0:
                self.read_once()
                continue
            chunk = body[sent : sent + window]
            sent += len(chunk)
            self.conn.send_data(stream_id, chunk, end_stream=end and sent == len(body))
            self.flush()
        if end and not body:
            self.conn.end_stream(stream_id)
            self.flush()

    def read_once(self, timeout: float = TIMEOUT) -> bool:
        """Read what the socket has (waiting up to `timeout`) and handle it; False once the
        server closed the connection."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True  # nothing came in time: the caller's deadline decides
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        if not data:
            self.closed = True
            return False
        frames, self.buffer = split_frames(self.buffer + data)
        for frame in frames:
            if not self._frame(frame):
                self.closed = True
                return False
        self.flush()
        return True

    def _frame(self, frame: bytes) -> bool:
        if frame[3] == 7:
            # GOAWAY is read here: h2's client takes nothing after it, not even the streams a
            # graceful GOAWAY lets finish (python-hyper/h2#1181).
            self.goaway = GoAway(
                int.from_bytes(frame[9:13], "big") & 0x7FFFFFFF,
                int.from_bytes(frame[13:17], "big"),
            )
            return True
        try:
            events = self.conn.receive_data(frame)
        except h2.exceptions.ProtocolError as exc:
            self.error = exc
            return False
        for event in events:
            self._handle(event)
        return True

    def _handle(self, event: h2.events.Event) -> None:
        self.events.append(event)
        stream_id = getattr(event, "stream_id", None)
        response = self.responses.setdefault(stream_id, Response()) if stream_id else None
        if isinstance(event, h2.events.ResponseReceived):
            assert response is not None
            response.headers = [(n, v) for n, v in event.headers if not n.startswith(b":")]
            response.status = int(dict(event.headers)[b":status"])
        elif isinstance(event, h2.events.InformationalResponseReceived):
            assert response is not None
            response.informational.append(list(event.headers))
        elif isinstance(event, h2.events.DataReceived):
            assert response is not None
            response.body += event.data or b""
            length = event.flow_controlled_length
            if self.auto_ack and length:  # exact credit, frame by frame, on both windows
                self.conn.increment_flow_control_window(length)
                if not response.ended:
                    with contextlib.suppress(h2.exceptions.StreamClosedError):
                        self.conn.increment_flow_control_window(length, stream_id=event.stream_id)
        elif isinstance(event, h2.events.TrailersReceived):
            assert response is not None
            response.trailers = list(event.headers or [])
        elif isinstance(event, h2.events.StreamEnded):
            assert response is not None
            response.ended = True
        elif isinstance(event, h2.events.StreamReset):
            assert response is not None
            response.reset = event.error_code

    def until(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
        """Read until `predicate()` holds, the connection closes or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while not predicate():
            left = deadline - time.monotonic()
            if left <= 0 or self.closed or not self.read_once(left):
                return predicate()
        return True

    def response(self, stream_id: int, timeout: float = TIMEOUT) -> Response:
        """The response on `stream_id`, once it ended or was reset."""
        response = self.responses.setdefault(stream_id, Response())
        assert self.until(lambda: response.ended or response.reset is not None, timeout), (
            f"stream {stream_id}: no complete response (closed={self.closed}, {self.error!r})"
        )
        return response

    def get(self, path: str = "/", **kwargs: Any) -> Response:
        return self.response(self.request(path, **kwargs))


def connect(port: int, **kwargs: Any) -> H2Client:
    return H2Client(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT), **kwargs)
