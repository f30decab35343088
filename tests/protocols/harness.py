"""An in-memory harness for the protocol-neutral request cycle and the real HTTP/1.1 connection.

- `RecordingFramer`: a `fulmen.protocols.cycle.Framer` that records every call as a tuple in
  `calls`, validates headers and an app-given Content-Length the way the real framers do, and
  lets a test hold writes back (`blocked`).
- `make_cycle(...)`: a `RequestCycle` over a `RecordingFramer`, with a real `ServerState` on the
  running loop and an ordinary `GET /` scope. Inside `framer_under_test("h2")` the framer is an
  `H2RecordingFramer` (`tests.protocols.h2harness`): the same recording, with a real HTTP/2
  stream underneath whose frames are checked when the block ends.
- `FakeTransport` and `H1Peer`: a real `H1Connection` fed scripted bytes, with what it writes
  collected, its read pauses recorded, and write pauses triggered on demand (which a socket
  cannot produce on demand).

Everything runs on the test's own event loop: call these inside a coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import Any

import pytest

from fulmen import Config
from fulmen.protocols.cycle import RequestCycle
from fulmen.protocols.fields import CONTENT_LENGTH, check, content_length
from fulmen.protocols.http1 import H1Connection
from fulmen.protocols.scope import http_scope
from fulmen.state import ServerState
from fulmen.types import ASGIApp

SETTLE = 20  # loop turns for apps to run; they wait only on receive(), send() and the test
CLIENT = ("127.0.0.1", 50000)
SERVER = ("127.0.0.1", 8000)
ENDPOINTS = (CLIENT, SERVER, "http")
REQUEST_HEADERS = [(b"host", b"test")]
FRAMERS = ("recording", "h2")  # what `make_cycle` can build, see `framer_under_test`
FRAMER = "recording"
BUILT: list[Any] = []  # the H2RecordingFramers `make_cycle` built, checked at the end


async def settle(turns: int = SETTLE) -> None:
    """Let the loop run `turns` times: enough for tasks that wait on nothing else."""
    for _ in range(turns):
        await asyncio.sleep(0)


async def until(predicate: Callable[[], bool], turns: int = SETTLE) -> bool:
    """Turn the loop until `predicate()` holds, at most `turns` times; whether it held."""
    for _ in range(turns):
        if predicate():
            return True
        await asyncio.sleep(0)
    return predicate()


# The protocol-neutral cycle over a recording framer


class RecordingFramer:
    """A `Framer` that records each call in `calls`:

    ("head", status, headers, body, more_body), ("body", body, more_body), ("interim", status),
    ("plain", status, body, headers), ("consumed", n), ("abort",), ("complete",)

    `send_head` and `send_body` raise RuntimeError, recording nothing, for an invalid header
    or a body longer or shorter than an app-given Content-Length, as HTTP/1.1 does. Its
    `flow` is write-paused while the test has set `blocked` to a future: `drain()` returns it,
    and the writer waits for it.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.blocked: asyncio.Future[None] | None = None
        self.drains = 0  # drain() calls, not in `calls`
        self.flow = RecordingFlow(self)
        self.remaining: int | None = None  # body bytes an app-given Content-Length still owes

    def kinds(self) -> list[str]:
        return [call[0] for call in self.calls]

    def send_head(self, status: int, headers: Iterable[Any], body: bytes, more_body: bool) -> None:
        headers = list(headers)
        length: int | None = None
        for header in headers:
            _, kind = check(header)
            if kind is CONTENT_LENGTH:
                length = content_length(header[1])
        self.remaining = _framed(length, body, more_body)
        self.calls.append(("head", status, headers, body, more_body))

    def send_body(self, body: bytes, more_body: bool) -> None:
        self.remaining = _framed(self.remaining, body, more_body)
        self.calls.append(("body", body, more_body))

    def send_interim(self, status: int, headers: Iterable[Any] = ()) -> None:
        headers = list(headers)
        for header in headers:
            check(header)
        self.calls.append(("interim", status, headers) if headers else ("interim", status))

    def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        self.calls.append(("trailers", list(headers)))

    def send_plain(self, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.calls.append(("plain", status, body, headers))

    def consumed(self, size: int) -> None:
        self.calls.append(("consumed", size))

    def abort(self) -> None:
        self.calls.append(("abort",))

    def complete(self) -> None:
        self.calls.append(("complete",))


class RecordingFlow:
    """The `Flow` of a `RecordingFramer`: paused for writing while its `blocked` is set."""

    def __init__(self, framer: RecordingFramer) -> None:
        self.framer = framer
        self.read_paused = False

    @property
    def write_paused(self) -> bool:
        return self.framer.blocked is not None

    def pause_reading(self) -> None:
        self.read_paused = True

    def resume_reading(self) -> None:
        self.read_paused = False

    def drain(self) -> Awaitable[None]:
        self.framer.drains += 1
        assert self.framer.blocked is not None
        return self.framer.blocked


def _framed(remaining: int | None, body: bytes, more_body: bool) -> int | None:
    """What a Content-Length still owes after `body` (None: no Content-Length was given)."""
    if remaining is None:
        return None
    remaining -= len(body)
    if remaining < 0:
        raise RuntimeError("Response content longer than Content-Length")
    if not more_body and remaining:
        raise RuntimeError("Response content shorter than Content-Length")
    return remaining


async def _no_app(scope: Any, receive: Any, send: Any) -> None:
    raise AssertionError("the cycle runs the app given to run(), not the configured one")


def make_cycle(
    app_state: dict[str, Any] | None = None, **config_kwargs: Any
) -> tuple[RequestCycle, RecordingFramer]:
    """A `RequestCycle` for `GET /` from CLIENT, over a fresh `RecordingFramer` (an
    `H2RecordingFramer`, over its own HTTP/2 connection, when `FRAMER` is "h2").

    The `ServerState` is built from `Config(app, **config_kwargs)` on the running loop, with
    the access log and proxy headers off unless asked for. Set `cycle.more_body = True` for a
    request with a body, then feed it with `cycle.on_body` and `cycle.on_message_complete`.
    """
    loop = asyncio.get_running_loop()
    options = {"access_log": False, "proxy_headers": False, **config_kwargs}
    config = Config(_no_app, **options)
    state = ServerState(config, _no_app, {} if app_state is None else app_state, loop)
    scope = http_scope(state, b"GET", b"/", b"", "1.1", list(REQUEST_HEADERS), ENDPOINTS, None, {})
    if FRAMER == "h2":
        from tests.protocols.h2harness import h2_cycle  # it builds on this module

        cycle, h2_framer = h2_cycle(state, scope)
        BUILT.append(h2_framer)
        return cycle, h2_framer
    framer = RecordingFramer()
    return RequestCycle(state, framer, scope), framer


@contextlib.contextmanager
def framer_under_test(kind: str) -> Iterator[None]:
    """Inside, `make_cycle` builds `kind` framers ("recording" or "h2"); at the end, the frames
    of each HTTP/2 one are checked against its calls (`H2RecordingFramer.check`)."""
    global FRAMER
    assert kind in FRAMERS
    FRAMER = kind
    BUILT.clear()
    try:
        yield
    finally:
        FRAMER = "recording"
    built = list(BUILT)
    BUILT.clear()
    for framer in built:
        framer.check()


# A real H1Connection over a fake transport


class FakeTransport:
    """What `H1Connection` and `H2Connection` use of an asyncio transport; `close()` ends the
    connection soon, as asyncio does. It has no addresses: `get_extra_info` gives the default.

    `written` collects what the protocol wrote; `read_calls` records "pause" and "resume" of
    reading. `trigger_pause_writing()` and `trigger_resume_writing()` call the protocol as
    asyncio does when the write buffer passes its high and low water marks.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol) -> None:
        self.loop = loop
        self.protocol = protocol
        self.written = b""
        self.closing = False
        self.read_calls: list[str] = []

    def write(self, data: bytes) -> None:
        if not self.closing:
            self.written += data

    def close(self) -> None:
        if not self.closing:
            self.closing = True
            self.loop.call_soon(self.protocol.connection_lost, None)

    abort = close

    def is_closing(self) -> bool:
        return self.closing

    def can_write_eof(self) -> bool:
        return False  # as a TLS transport: a lingering close is a plain close here

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def pause_reading(self) -> None:
        self.read_calls.append("pause")

    def resume_reading(self) -> None:
        self.read_calls.append("resume")

    def trigger_pause_writing(self) -> None:
        self.protocol.pause_writing()

    def trigger_resume_writing(self) -> None:
        self.protocol.resume_writing()


class H1Peer:
    """A client of a real `H1Connection`: `feed` scripted bytes, read `written` back.

    Build it inside the test's coroutine. `close()` is the client leaving.
    """

    def __init__(self, app: ASGIApp, **config_kwargs: Any) -> None:
        loop = asyncio.get_running_loop()
        options = {"access_log": False, "proxy_headers": False, "ws": "none", **config_kwargs}
        self.state = ServerState(Config(app, **options), app, {}, loop)
        self.conn = H1Connection(self.state)
        self.transport = FakeTransport(loop, self.conn)
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]

    @property
    def written(self) -> bytes:
        return self.transport.written

    @property
    def closed(self) -> bool:
        return self.transport.closing

    async def feed(self, data: bytes, turns: int = SETTLE) -> None:
        self.conn.data_received(data)
        await settle(turns)

    async def close(self) -> None:
        """The client leaves; every app still running must then finish."""
        self.transport.close()
        await settle()
        assert not self.state.tasks, "an app did not finish after the client left"


async def drive_h1(app: ASGIApp, *pieces: bytes, **config_kwargs: Any) -> H1Peer:
    """Feed `pieces` one by one (the loop settling after each) to a fresh connection."""
    peer = H1Peer(app, **config_kwargs)
    for piece in pieces:
        await peer.feed(piece)
    return peer


# Shared by the contract tests

CONTRACT_TIMEOUT = 5.0
PLAIN = (b"content-type", b"text/plain; charset=utf-8")
ERROR_500 = ("plain", 500, b"Internal Server Error", [PLAIN])
TEXT = [(b"content-type", b"text/plain")]


def run(main: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(main, timeout=CONTRACT_TIMEOUT))


async def serve(app: Any, **config: Any) -> tuple[RequestCycle, RecordingFramer]:
    cycle, framer = make_cycle(**config)
    await asyncio.wait_for(cycle.run(app), timeout=CONTRACT_TIMEOUT)
    return cycle, framer


def start(status: int = 200, headers: Any = TEXT) -> dict[str, Any]:
    return {"type": "http.response.start", "status": status, "headers": headers}


def body(data: bytes = b"", more: bool = False) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


def app_sending(*messages: dict[str, Any]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in messages:
            await send(message)

    return app


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "fulmen.error" and r.levelno >= logging.ERROR]
