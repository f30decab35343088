"""WebSocket consumers (`--interface consumer`): ASGI 1 messages over fulmen's WebSocket cycle.

Real servers and the `websockets` client; the examples run unmodified, through the CLI and over
every engine, parser and loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from examples.legacy import ws_echo_async, ws_greet_sync
from fulmen.consumers import ConsumerMiddleware
from tests.conftest import TIMEOUT, recv_until_closed
from tests.helpers import Fulmen
from tests.test_consumers import serve_example

SHAPES = ["sync", "async"]
Handle = Callable[[dict[str, Any]], list[dict[str, Any]]]


def client(url: str) -> ClientConnection:
    """The `websockets` client, every wait bounded, no keepalive pings."""
    return connect(url, open_timeout=TIMEOUT, close_timeout=TIMEOUT, ping_interval=None)


def ws_url(srv: Any, path: str = "/") -> str:
    return f"ws://{srv.host}:{srv.port}{path}"


class Recorder:
    """The messages a consumer was called with (without its channels), for the test thread."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self._cond = threading.Condition()

    def add(self, message: dict[str, Any]) -> None:
        with self._cond:
            hidden = ("reply_channel", "channel_layer")
            self.messages.append({k: v for k, v in message.items() if k not in hidden})
            self._cond.notify_all()

    def wait_for(self, channel: str) -> dict[str, Any]:
        with self._cond:
            assert self._cond.wait_for(lambda: channel in self.channels, TIMEOUT)
            return next(m for m in self.messages if m["channel"] == channel)

    @property
    def channels(self) -> list[str]:
        return [m["channel"] for m in self.messages]


def make_consumer(shape: str, handle: Handle) -> Callable[..., Any]:
    """A consumer of `shape` that sends the replies `handle(message)` returns, in order."""
    if shape == "sync":

        def sync_consumer(message: dict[str, Any]) -> None:
            for reply in handle(message):
                message["reply_channel"].send(reply)

        return sync_consumer

    async def async_consumer(message: dict[str, Any], channels: dict[str, Any]) -> None:
        assert set(channels) == {"reply", "groups"}
        assert message["reply_channel"] is channels["reply"]
        for reply in handle(message):
            await channels["reply"].send(reply)

    return async_consumer


def closed_code(ws: ClientConnection) -> int:
    with pytest.raises(ConnectionClosed) as info:
        ws.recv(timeout=TIMEOUT)
    assert info.value.rcvd is not None
    return info.value.rcvd.code


# The examples


def test_async_echo_example_through_the_cli() -> None:
    with (
        serve_example("examples.legacy.ws_echo_async:app") as server,
        client(ws_url_of(server)) as ws,
    ):
        ws.send("hello")
        assert ws.recv(timeout=TIMEOUT) == "hello"
        ws.send(b"\x00\xff")
        assert ws.recv(timeout=TIMEOUT) == b"\x00\xff"


def test_sync_greeting_example_through_the_cli() -> None:
    target = "examples.legacy.ws_greet_sync:consumer"
    with (
        serve_example(target, "--interface", "consumer") as server,
        client(ws_url_of(server, "/room")) as ws,
    ):
        assert ws.recv(timeout=TIMEOUT) == "hello, you are on /room"
        ws.send("one")
        assert ws.recv(timeout=TIMEOUT) == "one"
        ws.send(b"two")
        assert ws.recv(timeout=TIMEOUT) == b"two"
        ws.send("bye")
        assert ws.recv(timeout=TIMEOUT) == "bye after 3 messages"
        assert closed_code(ws) == 4000


def ws_url_of(server: Fulmen, path: str = "/") -> str:
    return server.url.replace("http://", "ws://", 1) + path


@pytest.mark.parametrize(
    ("app", "greeting"),
    [(ws_echo_async.app, None), (ws_greet_sync.consumer, "hello, you are on /")],
)
def test_examples_over_every_engine(serve_ws, app, greeting) -> None:
    with serve_ws(app, interface="consumer") as srv, client(ws_url(srv)) as ws:
        if greeting is not None:
            assert ws.recv(timeout=TIMEOUT) == greeting
        for data in ("text", b"bytes", "é" * 70_000, bytes(range(256)) * 300):
            ws.send(data)
            assert ws.recv(timeout=TIMEOUT) == data


# The messages


@pytest.mark.parametrize("shape", SHAPES)
def test_the_messages_a_consumer_is_called_with(shape, serve_one) -> None:
    recorder = Recorder()

    def handle(message):
        recorder.add(message)
        return []

    with serve_one(make_consumer(shape, handle), interface="consumer", root_path="/r") as srv:
        with client(ws_url(srv, "/chat?x=1")) as ws:
            ws.send("text")
            ws.send(b"bytes")
        disconnect = recorder.wait_for("websocket.disconnect")
    connect, text, data = recorder.messages[:3]
    assert connect["channel"] == "websocket.connect"
    assert connect["order"] == 0
    assert connect["path"] == "/r/chat"
    assert connect["root_path"] == "/r"
    assert connect["query_string"] == b"x=1"
    assert connect["scheme"] == "ws"
    assert [b"host", f"127.0.0.1:{srv.port}".encode()] in connect["headers"]
    assert connect["client"][0] == "127.0.0.1"
    assert connect["server"] == ("127.0.0.1", srv.port)
    assert text == {
        "channel": "websocket.receive",
        "path": "/r/chat",
        "order": 1,
        "text": "text",
        "bytes": None,
    }
    assert data["order"] == 2 and data["bytes"] == b"bytes" and data["text"] is None
    assert disconnect == {
        "channel": "websocket.disconnect",
        "path": "/r/chat",
        "order": 3,
        "code": 1000,
    }
    assert recorder.channels[3:] == ["websocket.disconnect"]


def test_sync_events_come_one_at_a_time_in_order(serve_one) -> None:
    active = 0
    most = 0
    lock = threading.Lock()
    release = threading.Event()

    def consumer(message):
        nonlocal active, most
        with lock:
            active += 1
            most = max(most, active)
        if message["order"] == 1:
            release.wait(TIMEOUT)  # later messages arrive meanwhile; none may overtake
        with lock:
            active -= 1
        if message["channel"] == "websocket.receive":
            message["reply_channel"].send({"text": f"{message['order']}:{message['text']}"})

    with serve_one(consumer, interface="consumer") as srv, client(ws_url(srv)) as ws:
        for number in range(5):
            ws.send(str(number))
        release.set()
        answers = [ws.recv(timeout=TIMEOUT) for _ in range(5)]
    assert answers == [f"{n + 1}:{n}" for n in range(5)]
    assert most == 1


# Answers to the handshake and closing


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("refusal", [{"accept": False}, {"close": True}, {"close": 4000}])
def test_refusal_is_403(shape, refusal, serve_one) -> None:
    recorder = Recorder()

    def handle(message):
        recorder.add(message)
        return [refusal, {"text": "dropped"}]

    with (
        serve_one(make_consumer(shape, handle), interface="consumer") as srv,
        pytest.raises(InvalidStatus) as info,
    ):
        client(ws_url(srv))
    assert info.value.response.status_code == 403
    assert recorder.channels == ["websocket.connect"]  # no disconnect after a refusal


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("answer", "received"),
    [
        ({"text": "hi"}, "hi"),  # data before accepting accepts (an empty reply does not)
        ({"bytes": b"hi"}, b"hi"),
        ({"accept": True, "text": "hi", "bytes": b"there"}, "hi"),
    ],
)
def test_data_accepts(shape, answer, received, serve_one) -> None:
    def handle(message):
        return [{}, answer] if message["channel"] == "websocket.connect" else []

    with (
        serve_one(make_consumer(shape, handle), interface="consumer") as srv,
        client(ws_url(srv)) as ws,
    ):
        assert ws.recv(timeout=TIMEOUT) == received


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("answer", "code"),
    [
        ({"text": "last", "close": True}, 1000),
        ({"text": "last", "close": 4001}, 4001),
        ({"accept": True, "text": "last", "close": 1001}, 1001),
    ],
)
def test_close_codes(shape, answer, code, serve_ws) -> None:
    recorder = Recorder()

    def handle(message):
        recorder.add(message)
        if message["channel"] == "websocket.receive":
            return [{"accept": False}, answer, {"text": "after the close: dropped"}]
        return []

    with (
        serve_ws(make_consumer(shape, handle), interface="consumer") as srv,
        client(ws_url(srv)) as ws,
    ):
        ws.send("close please")
        assert ws.recv(timeout=TIMEOUT) == "last"
        assert closed_code(ws) == code
        assert recorder.wait_for("websocket.disconnect")["code"] == code


@pytest.mark.parametrize("shape", SHAPES)
def test_accept_and_close_in_one_reply(shape, serve_one) -> None:
    def handle(message):
        return [{"accept": True, "close": True}] if message["order"] == 0 else []

    with (
        serve_one(make_consumer(shape, handle), interface="consumer") as srv,
        client(ws_url(srv)) as ws,
    ):
        assert closed_code(ws) == 1000


@pytest.mark.parametrize("shape", SHAPES)
def test_replies_to_a_departed_client_are_dropped(shape, serve_one) -> None:
    recorder = Recorder()

    def handle(message):
        recorder.add(message)
        return [{"text": "too late"}] if message["channel"] == "websocket.disconnect" else []

    with serve_one(make_consumer(shape, handle), interface="consumer") as srv:
        with client(ws_url(srv)):
            pass  # the client closes at once
        recorder.wait_for("websocket.disconnect")
    assert not [r for r in srv.records if r.levelname == "ERROR"]


# Errors


def raising(order: int) -> Handle:
    def handle(message):
        if message["order"] == order:
            raise ValueError(f"boom at {message['channel']}")
        return []

    return handle


@pytest.mark.parametrize("shape", SHAPES)
def test_raising_on_connect_is_500(shape, serve_one) -> None:
    with (
        serve_one(make_consumer(shape, raising(0)), interface="consumer") as srv,
        pytest.raises(InvalidStatus) as info,
    ):
        client(ws_url(srv))
    assert info.value.response.status_code == 500
    assert_logged(srv, "boom at websocket.connect")


@pytest.mark.parametrize("shape", SHAPES)
def test_raising_later_closes_with_1011(shape, serve_ws) -> None:
    with (
        serve_ws(make_consumer(shape, raising(1)), interface="consumer") as srv,
        client(ws_url(srv)) as ws,
    ):
        ws.send("x")
        assert closed_code(ws) == 1011
    assert_logged(srv, "boom at websocket.receive")


def assert_logged(srv: Any, error: str) -> None:
    records = [r for r in srv.records if r.getMessage() == "Exception in ASGI application"]
    assert records and records[0].exc_info is not None
    assert str(records[0].exc_info[1]) == error


def test_http_only_consumer_fails_the_handshake(serve_one) -> None:
    from examples.legacy import echo_async  # reads message['content'], which is not there

    with serve_one(echo_async.app) as srv, srv.connect() as sock:
        sock.sendall(
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        assert recv_until_closed(sock).startswith(b"HTTP/1.1 500")


# Sync consumers deferring to the loop


def deferring(hook: Callable[[dict[str, Any]], None], accept: bool = False) -> Any:
    """An ASGI app serving a sync consumer that reads `channel_layer.loop` on connect (and
    accepts if `accept`), so its answer is deferred, and echoes from the loop later.

    `hook(connect_message)` plays the deferred work: it runs on the loop once the server waits
    for that work (the second `receive()`, after the connect consumer returned).
    """
    connected: list[dict[str, Any]] = []

    def consumer(message):
        loop = message["channel_layer"].loop
        if message["channel"] == "websocket.connect":
            connected.append(message)
            if accept:
                message["reply_channel"].send({"accept": True})
        elif message["channel"] == "websocket.receive":
            loop.call_soon(message["reply_channel"].send, {"text": message["text"]})

    middleware = ConsumerMiddleware(consumer, asynchronous=False)

    async def app(scope, receive, send):
        calls = 0

        async def watched_receive():
            nonlocal calls
            calls += 1
            if calls == 2:
                hook(connected[0])
            return await receive()

        await middleware(scope, watched_receive, send)

    return app


def test_deferred_accept(serve_one) -> None:
    def accept_later(message):
        message["reply_channel"].send({"accept": True})  # on the loop: queued, in order
        message["reply_channel"].send({"text": "welcome"})

    with serve_one(deferring(accept_later)) as srv, client(ws_url(srv)) as ws:
        assert ws.recv(timeout=TIMEOUT) == "welcome"
        for number in range(20):
            ws.send(str(number))
        assert [ws.recv(timeout=TIMEOUT) for _ in range(20)] == [str(n) for n in range(20)]


def test_deferred_refusal(serve_one) -> None:
    def refuse_later(message):
        message["reply_channel"].send({"accept": False})

    with serve_one(deferring(refuse_later)) as srv, pytest.raises(InvalidStatus) as info:
        client(ws_url(srv))
    assert info.value.response.status_code == 403


def test_client_leaving_before_the_deferred_answer(serve_one) -> None:
    recorder = Recorder()
    held: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
    waiting = threading.Event()

    async def never_answer(message):
        future = asyncio.get_running_loop().create_future()
        held.append((asyncio.get_running_loop(), future))
        waiting.set()
        await future
        message["reply_channel"].send({"accept": True})  # the client is gone: dropped

    def consumer(message):
        recorder.add(message)
        if message["channel"] == "websocket.connect":
            message["channel_layer"].loop.create_task(never_answer(message))

    with serve_one(consumer, interface="consumer") as srv:
        sock = srv.connect()
        sock.sendall(handshake())
        assert waiting.wait(TIMEOUT)
        sock.close()
        assert recorder.wait_for("websocket.disconnect")["code"] == 1006
        loop, future = held[0]
        loop.call_soon_threadsafe(future.set_result, None)
    assert recorder.channels == ["websocket.connect", "websocket.disconnect"]
    assert not [r for r in srv.records if r.levelname == "ERROR"]


def handshake() -> bytes:
    return (
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )


def test_deferred_task_failing_before_the_answer_is_500(serve_one) -> None:
    async def fail():
        raise ValueError("deferred boom")

    def start_failing_task(message):
        message["channel_layer"].loop.create_task(fail())

    with serve_one(deferring(start_failing_task)) as srv, pytest.raises(InvalidStatus) as info:
        client(ws_url(srv))
    assert info.value.response.status_code == 500
    messages = [r.getMessage() for r in srv.records]
    assert "Exception in a task started by a consumer" in messages
    assert "Exception in ASGI application" in messages


def test_a_failed_send_from_the_loop_closes_with_1011(serve_one) -> None:
    """An invalid close code sent on the loop: nobody waits for that send, so its failure
    fails the connection while the server waits for the next event."""

    def bad_close(message):
        message["reply_channel"].send({"text": "x", "close": 1005})

    with serve_one(deferring(bad_close, accept=True)) as srv, client(ws_url(srv)) as ws:
        assert ws.recv(timeout=TIMEOUT) == "x"
        assert closed_code(ws) == 1011
    record = next(r for r in srv.records if r.getMessage() == "Exception in ASGI application")
    assert "1005" in str(record.exc_info[1])
