"""An HTTP/3 test client: aioquic's QUIC and HTTP/3 client over a real UDP socket.

`connect(port, certs)` opens a connection (an async context manager yielding `H3Client`);
`client.request(...)` starts a request and returns its stream id, `client.response(id)` waits
(bounded) for the whole response: interim responses, head, body, trailers, or the stream's
reset code.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aioquic.asyncio.client import connect as quic_connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.h3.connection import H3Connection
from aioquic.h3.events import DataReceived, HeadersReceived
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import (
    ConnectionTerminated,
    QuicEvent,
    StopSendingReceived,
    StreamReset,
)

from tests.conftest import TIMEOUT, Certs

Pairs = list[tuple[bytes, bytes]]


class Response:
    def __init__(self) -> None:
        self.interim: list[Pairs] = []
        self.headers: Pairs | None = None
        self.trailers: Pairs | None = None
        self.body = bytearray()
        self.chunks: list[bytes] = []
        self.reset: int | None = None  # the RESET_STREAM code, if the server reset the stream
        self.done = asyncio.Event()
        self.data = asyncio.Event()  # set on each DATA

    @property
    def status(self) -> int:
        assert self.headers is not None, f"no response head (reset {self.reset})"
        return int(dict(self.headers)[b":status"])

    def header(self, name: bytes) -> bytes | None:
        assert self.headers is not None
        return dict(self.headers).get(name)


class H3Client(QuicConnectionProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.h3 = H3Connection(self._quic)
        self.responses: dict[int, Response] = {}
        self.terminated: ConnectionTerminated | None = None
        self.closed = asyncio.Event()
        self.stops: dict[int, int] = {}  # STOP_SENDING from the server: stream id -> code
        self.stopped = asyncio.Event()  # set on each STOP_SENDING

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StreamReset):
            response = self.responses.get(event.stream_id)
            if response is not None:
                response.reset = event.error_code
                response.done.set()
        elif isinstance(event, ConnectionTerminated):
            self.terminated = event
            self.closed.set()
            for response in self.responses.values():
                response.done.set()
        elif isinstance(event, StopSendingReceived):
            self.stops[event.stream_id] = event.error_code
            self.stopped.set()
        for h3_event in self.h3.handle_event(event):
            response = self.responses.get(getattr(h3_event, "stream_id", -1))
            if response is None:
                continue
            if isinstance(h3_event, HeadersReceived):
                status = dict(h3_event.headers).get(b":status", b"")
                if response.headers is None and status.startswith(b"1"):
                    response.interim.append(h3_event.headers)
                elif response.headers is None:
                    response.headers = h3_event.headers
                else:
                    response.trailers = h3_event.headers
            elif isinstance(h3_event, DataReceived):
                response.body += h3_event.data
                response.chunks.append(h3_event.data)
                response.data.set()
            if getattr(h3_event, "stream_ended", False):
                response.done.set()

    def request(
        self,
        method: bytes = b"GET",
        path: bytes = b"/",
        headers: Pairs | None = None,
        body: bytes | None = None,
        end: bool = True,
        pseudo: Pairs | None = None,
    ) -> int:
        """Send a request's head (and `body`); `end`: the request is whole after it."""
        stream_id = self._quic.get_next_available_stream_id()
        self.responses[stream_id] = Response()
        fields = pseudo or [
            (b":method", method),
            (b":scheme", b"https"),
            (b":authority", b"localhost"),
            (b":path", path),
        ]
        self.h3.send_headers(stream_id, fields + (headers or []), end_stream=end and body is None)
        if body is not None:
            self.h3.send_data(stream_id, body, end)
        self.transmit()
        return stream_id

    def send(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self.h3.send_data(stream_id, data, end)
        self.transmit()

    def raw(self, stream_id: int, data: bytes, end: bool = False) -> None:
        """Bytes on a stream as they are, past aioquic's HTTP/3 layer."""
        self._quic.send_stream_data(stream_id, data, end)
        self.transmit()

    def raw_request(self, data: bytes, end: bool = True) -> int:
        """Bytes as they are (frames made by hand) on a new request stream, whose response is
        read like any other's; its id."""
        stream_id = self._quic.get_next_available_stream_id()
        self.responses[stream_id] = Response()
        self.raw(stream_id, data, end)
        return stream_id

    def raw_unidirectional(self, data: bytes, end: bool = False) -> int:
        """Bytes as they are on a new unidirectional stream (its type first); its id."""
        stream_id = self._quic.get_next_available_stream_id(is_unidirectional=True)
        self.raw(stream_id, data, end)
        return stream_id

    async def closed_with(self) -> int:
        """The error code of CONNECTION_CLOSE, once the connection is over (bounded)."""
        await asyncio.wait_for(self.closed.wait(), TIMEOUT)
        assert self.terminated is not None
        return self.terminated.error_code

    def stop(self, stream_id: int, code: int = 0x10C) -> None:
        """STOP_SENDING: the response is not wanted (the server resets the stream)."""
        self._quic.stop_stream(stream_id, code)
        self.transmit()

    def reset(self, stream_id: int, code: int = 0x10C) -> None:
        self._quic.reset_stream(stream_id, code)
        self.transmit()

    async def response(self, stream_id: int) -> Response:
        response = self.responses[stream_id]
        await asyncio.wait_for(response.done.wait(), TIMEOUT)
        return response

    async def get(self, path: bytes = b"/", **kwargs: Any) -> Response:
        return await self.response(self.request(path=path, **kwargs))


def configuration(certs: Certs, **options: Any) -> QuicConfiguration:
    config = QuicConfiguration(is_client=True, alpn_protocols=["h3"], **options)
    config.load_verify_locations(certs.ca_file)
    return config


@contextlib.asynccontextmanager
async def connect(port: int, certs: Certs, **options: Any) -> AsyncIterator[H3Client]:
    """An HTTP/3 connection to 127.0.0.1:`port` (the handshake bounded by TIMEOUT)."""
    opened = quic_connect(
        "127.0.0.1",
        port,
        configuration=configuration(certs, **options),
        create_protocol=H3Client,
        wait_connected=True,
    )
    client = await asyncio.wait_for(opened.__aenter__(), TIMEOUT)
    assert isinstance(client, H3Client)
    try:
        yield client
    finally:
        client.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(opened.__aexit__(None, None, None), TIMEOUT)


def run(coro: Any) -> Any:
    """Run a client coroutine, bounded."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro, TIMEOUT * 2)

    return asyncio.run(bounded())
