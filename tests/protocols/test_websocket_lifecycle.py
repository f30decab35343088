"""The WebSocket lifecycle at its edges: an app the graceful shutdown must cancel, `send()` on a
gone client (also while waiting for the socket to drain), messages the app must not send, a
handshake accepted during the shutdown or after the client left, the closing timeout, frames
after the close frame, and queued messages delivered before the disconnect.

Real server, real sockets: the `websockets` client, or a raw socket where the test must not
answer (or must send exact frames). Tests whose timing rests on the server's one-second tick
or a shutdown timeout run on one parser and loop (`serve_one`), over both engines.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close, Opcode

from fulmen.protocols import websocket
from fulmen.protocols.websocket import ClientDisconnected
from tests.conftest import TIMEOUT, RunningServer
from tests.protocols.http1_raw import in_loop, open_gate, poll_until
from tests.protocols.test_websocket_handshake import (
    ACCEPT_MESSAGE,
    DENIAL_START,
    Recorder,
    connect_client,
    handshake,
)
from tests.protocols.test_websocket_messages import (
    ENGINES,
    EchoApp,
    FloodApp,
    FrameReader,
    frame,
    numbered,
    raw_client,
    the_websocket,
)

DISCONNECTED_DEBUG = "WebSocket client disconnected while the app was sending."


def close_frame(code: int, reason: str = "") -> bytes:
    """A client's close frame (masked) with `code` and `reason`."""
    return frame(Opcode.CLOSE, Close(code, reason).serialize())


def errors(srv: RunningServer) -> list[str]:
    """Log lines at WARNING or above."""
    return srv.messages(logging.WARNING)


def connections(srv: RunningServer) -> list[Any]:
    return list(in_loop(srv, lambda: list(srv.server.state.connections)))


# 1. Graceful shutdown cancels an app that never finishes


async def wait_forever(recorder: Recorder) -> None:
    try:
        await asyncio.get_running_loop().create_future()  # never resolved
    except asyncio.CancelledError:
        recorder.add("cancelled")
        raise


def ignores_disconnect(recorder: Recorder) -> Callable[..., Awaitable[None]]:
    """Receives the 1001 disconnect, then goes on waiting."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(ACCEPT_MESSAGE)
        recorder.add(await receive())
        await wait_forever(recorder)

    return app


def never_receives(recorder: Recorder) -> Callable[..., Awaitable[None]]:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(ACCEPT_MESSAGE)
        await wait_forever(recorder)

    return app


@pytest.mark.parametrize(
    ("make_app", "seen"),
    [
        pytest.param(
            ignores_disconnect,
            [{"type": "websocket.disconnect", "code": 1001, "reason": ""}, "cancelled"],
            id="ignores-disconnect",
        ),
        pytest.param(never_receives, ["cancelled"], id="never-receives"),
    ],
)
@pytest.mark.parametrize("engine", ENGINES)
def test_shutdown_cancels_an_app_that_never_finishes(
    serve_one: Any, engine: str, make_app: Any, seen: list[Any]
) -> None:
    """The client reads the 1001 close frame but never answers it, and the app never returns:
    after `timeout_graceful_shutdown` the app's task is cancelled, the connection closed and
    the server stops."""
    recorder = Recorder()
    timeout = 0.5
    options = {"ws": engine, "timeout_graceful_shutdown": timeout}
    with serve_one(make_app(recorder), **options) as srv, raw_client(srv) as reader:
        srv.server.should_exit = True
        shutdown = time.monotonic()
        assert reader.close_code() == 1001
        assert reader.closed(), "the connection stayed open"  # EOF, within TIMEOUT
        closed = time.monotonic() - shutdown
    stopped = time.monotonic() - shutdown
    assert timeout <= closed < timeout + 1.0, closed
    assert stopped < timeout + 1.5, stopped
    assert recorder.items == seen
    messages = srv.messages()
    assert f"Graceful shutdown timed out after {timeout} seconds." in messages
    assert "Cancelling 1 running request(s)." in messages
    assert srv.messages(logging.ERROR) == []


# 2. send() raises ClientDisconnected and the app lets it propagate


def test_uncaught_client_disconnected_is_not_an_error(serve_ws: Any) -> None:
    """An app that sends after the client left and does not catch ClientDisconnected: a debug
    line, no traceback, and the server serves the next WebSocket."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(ACCEPT_MESSAGE)
        while (await receive())["type"] != "websocket.disconnect":
            await send({"type": "websocket.send", "text": "echo"})
        await send({"type": "websocket.send", "text": "too late"})  # raises

    def serve_one_client(srv: RunningServer, count: int) -> None:
        with connect_client(srv) as ws:
            ws.send("hi")
            assert ws.recv(timeout=TIMEOUT) == "echo"
        poll_until(lambda: srv.messages().count(DISCONNECTED_DEBUG) == count, "no debug line")

    with serve_ws(app) as srv:
        serve_one_client(srv, 1)
        serve_one_client(srv, 2)  # the server goes on serving
        records = [r for r in srv.records if r.getMessage() == DISCONNECTED_DEBUG]
    assert all(r.levelno == logging.DEBUG and r.exc_info is None for r in records)
    assert not any("Exception in ASGI application" in m for m in srv.messages())
    assert errors(srv) == []


# 3. A send waiting for the socket to drain when the client goes


def test_send_waiting_to_drain_raises_when_the_client_resets(serve_ws: Any) -> None:
    recorder = Recorder()
    flood = FloodApp(100_000)  # more than the socket buffers hold: its send() ends up waiting

    async def app(scope: Any, receive: Any, send: Any) -> None:
        try:
            await flood(scope, receive, send)
        except OSError as exc:
            recorder.add(exc)
            recorder.done()
            raise

    with serve_ws(app, ws_per_message_deflate=False) as srv:
        with raw_client(srv) as reader:
            ws = the_websocket(srv)
            poll_until(
                lambda: bool(in_loop(srv, lambda: ws.flow.write_paused)), "never paused writing"
            )
            started, done = in_loop(srv, lambda: (flood.started, flood.done))
            assert started == done + 1  # the app waits inside send()
            # Reset, not a FIN: SO_LINGER with a zero timeout.
            reader.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        (error,) = recorder.wait()
        poll_until(lambda: not connections(srv), "the connection was kept")
    assert isinstance(error, ClientDisconnected) and isinstance(error, OSError)
    assert str(error) == "WebSocket closed while waiting to send"
    assert flood.done == done  # the waiting send never completed
    assert errors(srv) == []


# 4. Messages the app must not send


def record_errors(recorder: Recorder, messages: list[dict[str, Any]]) -> Any:
    """Sends `messages` in order after `websocket.connect`; records a RuntimeError, and lets
    it propagate."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        try:
            for message in messages:
                await send(message)
        except RuntimeError as exc:
            recorder.add(exc)
            raise

    return app


@pytest.mark.parametrize(
    ("messages", "error", "answer"),
    [
        pytest.param(
            [ACCEPT_MESSAGE, {"type": "websocket.send"}],
            "websocket.send needs 'bytes' or 'text'",
            1011,
            id="send-without-data",
        ),
        pytest.param(
            [ACCEPT_MESSAGE, {"type": "websocket.send", "bytes": None, "text": None}],
            "websocket.send needs 'bytes' or 'text'",
            1011,
            id="send-with-none",
        ),
        pytest.param(
            [ACCEPT_MESSAGE, {"type": "http.response.start", "status": 200}],
            "Unexpected ASGI message 'http.response.start' on an open WebSocket",
            1011,
            id="http-message-when-open",
        ),
        pytest.param(
            [{"type": "websocket.send", "text": "hi"}],
            "Expected 'websocket.accept', 'websocket.close' or "
            "'websocket.http.response.start', got 'websocket.send'",
            500,
            id="send-before-accept",
        ),
        pytest.param(
            [DENIAL_START, ACCEPT_MESSAGE],
            "Expected 'websocket.http.response.body', got 'websocket.accept'",
            500,
            id="accept-during-denial",
        ),
    ],
)
def test_unexpected_message_raises(
    serve_ws: Any, messages: list[dict[str, Any]], error: str, answer: int
) -> None:
    """RuntimeError in the app; uncaught, it is logged and the client gets close 1011 after
    the accept, or 500 before it (also after a denial's start: nothing was sent yet)."""
    recorder = Recorder()
    with serve_ws(record_errors(recorder, messages)) as srv:
        if answer == 500:
            with pytest.raises(InvalidStatus) as refused:
                connect_client(srv)
            assert refused.value.response.status_code == 500
            assert refused.value.response.body == b"Internal Server Error"
        else:
            with connect_client(srv) as ws, pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=TIMEOUT)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == answer
        (exc,) = recorder.items  # recorded before the answer was sent
        logged = [r for r in srv.records if r.levelno >= logging.ERROR]
    assert isinstance(exc, RuntimeError) and str(exc) == error
    (record,) = logged
    assert record.getMessage() == "Exception in ASGI application"
    assert record.exc_info is not None and record.exc_info[1] is exc


# 5. Accepted during the graceful shutdown


def test_accept_during_restart_closes_with_1012(serve_ws: Any) -> None:
    """The 101, then at once a close frame with 1012 (a restart); the app sees the 1012
    disconnect."""
    recorder = Recorder()
    connected = threading.Event()
    gate = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        connected.set()
        await gate.wait()
        await send(ACCEPT_MESSAGE)
        recorder.add(await receive())
        recorder.done()

    with serve_ws(app) as srv, srv.connect() as sock:
        reader = FrameReader(sock)
        sock.sendall(handshake())
        assert connected.wait(TIMEOUT)
        srv.server.restart()
        poll_until(lambda: bool(srv.server.state.shutting_down), "the shutdown did not start")
        open_gate(srv, gate)
        reader.handshake()
        assert reader.close_code() == 1012
        sock.sendall(close_frame(1012))  # the client answers the close
        assert reader.closed()
        assert recorder.wait() == [{"type": "websocket.disconnect", "code": 1012, "reason": ""}]
        leaving = time.monotonic()
    assert time.monotonic() - leaving < 2.0  # nothing left to wait for
    assert errors(srv) == []


# 6. The client leaves before the app accepts


class LeaveAndLose:
    """The connection is lost (the server has run `connection_lost`) before the accept: the
    accept raises ClientDisconnected."""

    accept_raises = True

    def __init__(self) -> None:
        self.waiting = threading.Event()
        self.gate = asyncio.Event()

    async def app_waits(self) -> None:
        self.waiting.set()
        await self.gate.wait()

    def leave(self, srv: RunningServer, sock: socket.socket) -> None:
        sock.close()
        poll_until(lambda: not connections(srv), "the server kept the connection")
        open_gate(srv, self.gate)


class LeaveUnnoticed:
    """The server has read the client's EOF (its transport is closing) but not yet run
    `connection_lost` when the app accepts: the accept succeeds into a closed WebSocket.

    The app blocks the loop thread while the client closes and the FIN reaches the server's
    socket; then it resumes through a future resolved by a callback queued before that
    socket's read event, so the EOF is read (the transport closes and queues
    `connection_lost`) between the future's resolution and the app's next step.
    """

    accept_raises = False

    def __init__(self) -> None:
        self.waiting = threading.Event()
        self.client_gone = threading.Event()

    async def app_waits(self) -> None:
        await asyncio.sleep(0)  # run as a task from here
        loop = asyncio.get_running_loop()
        resumed = loop.create_future()
        loop.call_soon(resumed.set_result, None)  # queued before the socket's EOF event
        self.waiting.set()
        assert self.client_gone.wait(TIMEOUT)  # blocks the loop thread while the client closes
        await resumed

    def leave(self, srv: RunningServer, sock: socket.socket) -> None:
        (conn,) = srv.server.state.connections  # read while the loop thread is blocked
        server_socket = conn.transport.get_extra_info("socket")
        sock.close()
        readable, _, _ = select.select([server_socket], [], [], TIMEOUT)
        assert readable, "the FIN did not arrive"
        self.client_gone.set()


@pytest.mark.parametrize("how", [LeaveAndLose, LeaveUnnoticed], ids=["lost", "closing"])
@pytest.mark.parametrize("engine", ENGINES)
def test_client_leaves_before_accept(serve_one: Any, engine: str, how: Any) -> None:
    """The accept raises ClientDisconnected, or succeeds into a WebSocket that is gone at once;
    either way the next receive() is the 1006 disconnect, nothing is logged as an error and
    the server keeps no connection. (`closing` rests on asyncio's callback order: one loop.)"""
    leaving = how()
    recorder = Recorder()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await leaving.app_waits()
        try:
            await send(ACCEPT_MESSAGE)
        except ClientDisconnected as exc:
            recorder.add(exc)
        else:  # the server's connections, right after the accept
            recorder.add(list(srv.server.state.connections))
        recorder.add(await receive())
        recorder.done()

    with serve_one(app, ws=engine) as srv, srv.connect() as sock:
        sock.sendall(handshake())
        assert leaving.waiting.wait(TIMEOUT)
        leaving.leave(srv, sock)
        accepted, disconnect = recorder.wait()
        poll_until(lambda: not connections(srv), "the connection was kept")
    assert disconnect == {"type": "websocket.disconnect", "code": 1006, "reason": ""}
    if how.accept_raises:
        assert isinstance(accepted, ClientDisconnected)
    else:
        assert accepted == []  # the accepted WebSocket saw its transport closing: gone at once
    assert errors(srv) == []


# 7. The closing timeout


@pytest.mark.parametrize("engine", ENGINES)
def test_close_timeout_drops_a_client_that_never_answers(
    serve_one: Any, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app closes; the client reads the close frame and never answers: the server closes
    the TCP connection once CLOSE_TIMEOUT has passed (checked by the one-second tick)."""
    timeout = 0.5
    monkeypatch.setattr(websocket, "CLOSE_TIMEOUT", timeout)
    recorder = Recorder()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(ACCEPT_MESSAGE)
        await send({"type": "websocket.close", "code": 4000})
        recorder.add(await receive())
        recorder.done()

    with serve_one(app, ws=engine) as srv, raw_client(srv) as reader:
        assert reader.close_code() == 4000
        sent = time.monotonic()
        assert reader.closed(), "the connection stayed open"
        elapsed = time.monotonic() - sent
        assert recorder.wait() == [{"type": "websocket.disconnect", "code": 4000, "reason": ""}]
    # At least the timeout; at most the timeout plus two ticks (the coarse clock lags).
    assert timeout <= elapsed < timeout + 2.5, elapsed
    assert errors(srv) == []


# 8. Frames after the close frame


@pytest.mark.parametrize("with_upgrade", [False, True], ids=["after-accept", "with-upgrade"])
def test_frames_after_the_close_frame_are_ignored(serve_ws: Any, with_upgrade: bool) -> None:
    """One write: a message, the close frame, then another message. The first is delivered;
    the close is answered, the connection closed, and the message after it is dropped."""
    app = EchoApp(echo=False)
    data = frame(Opcode.TEXT, b"before") + close_frame(4000, "bye") + frame(Opcode.TEXT, b"after")
    with serve_ws(app) as srv:
        with raw_client(srv, after=data if with_upgrade else b"") as reader:
            if not with_upgrade:
                reader.sock.sendall(data)
            opcode, payload = reader.frame()
            assert (opcode, payload) == (Opcode.CLOSE, Close(4000, "bye").serialize())
            assert reader.closed(), "the connection stayed open"
        assert app.disconnect() == {"type": "websocket.disconnect", "code": 4000, "reason": "bye"}
    assert app.received["/"] == [{"type": "websocket.receive", "text": "before"}]
    assert errors(srv) == []


# 9. Queued messages come before the disconnect


@pytest.mark.parametrize("close_read", ["with-messages", "after-pause"])
def test_queued_messages_come_before_the_disconnect(serve_ws: Any, close_read: str) -> None:
    """ws_max_queue=2 and an app that does not receive yet: the client sends 20 messages and
    closes. The close is read with the messages (`with-messages`), or once the app has drained
    the queue enough for reading to resume (`after-pause`). Either way the app receives every
    message, in order, then the client's disconnect."""
    count = 20
    gate = asyncio.Event()
    app = EchoApp(echo=False, gate=gate)
    messages = b"".join(frame(Opcode.BINARY, numbered(i, 1000)) for i in range(count))
    close = close_frame(4001, "bye")
    # A short graceful timeout: if an assertion fails while the app waits at its gate, the
    # server still stops promptly.
    with serve_ws(app, ws_max_queue=2, timeout_graceful_shutdown=1) as srv:
        together = close_read == "with-messages"
        with raw_client(srv, after=messages + close if together else messages) as reader:
            if together:  # the close frame is read at once: the connection ends
                poll_until(lambda: not connections(srv), "the close was not read")
            else:
                ws = the_websocket(srv)
                poll_until(lambda: not in_loop(srv, ws.transport.is_reading), "kept reading")
                reader.sock.sendall(close)
                assert in_loop(
                    srv, lambda: ws.session.closed is None and len(ws.session.queue) >= 2
                )
            assert app.received["/"] == []
            open_gate(srv, gate)
            assert reader.close_code() == 4001
            assert reader.closed()
        assert app.disconnect() == {"type": "websocket.disconnect", "code": 4001, "reason": "bye"}
    assert [m["bytes"] for m in app.received["/"]] == [numbered(i, 1000) for i in range(count)]


# 10. A bad message during the closing handshake


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(frame(Opcode.BINARY, bytes(2000)), id="too-big"),
        pytest.param(frame(Opcode.TEXT, b"bad \xc3\x28"), id="invalid-utf8"),
    ],
)
def test_bad_message_while_closing_sends_no_second_close(serve_ws: Any, bad: bytes) -> None:
    """The app has closed; before answering, the client sends a message the server must fail
    the connection for: no second close frame (RFC 6455 §5.5.1), the TCP connection ends at
    once, and the app still sees the code it closed with."""
    recorder = Recorder()
    gate = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(ACCEPT_MESSAGE)
        await send({"type": "websocket.close", "code": 4000})
        await gate.wait()
        recorder.add(await receive())
        recorder.done()

    with serve_ws(app, ws_max_size=1000) as srv:
        with raw_client(srv) as reader:
            assert reader.close_code() == 4000
            sent = time.monotonic()
            reader.sock.sendall(bad)
            assert reader.closed(), "more bytes after the close frame"
            assert time.monotonic() - sent < 2.0  # not the closing timeout
        poll_until(lambda: not connections(srv), "the connection was kept")
        open_gate(srv, gate)
        assert recorder.wait() == [{"type": "websocket.disconnect", "code": 4000, "reason": ""}]
    assert errors(srv) == []
