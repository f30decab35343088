"""Sync consumers that defer their work to the event loop through `message['channel_layer']`.

The consumer runs in a worker thread, schedules work on `channel_layer.loop` and returns; the
work replies later on the loop with the synchronous `reply_channel.send`, which queues.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import httpx
import pytest

from examples.legacy import deferred_sync
from fulmen.consumers import ConsumerMiddleware
from tests.conftest import TIMEOUT, recv_until_closed
from tests.test_consumers import get_from_example


def test_deferred_example_through_the_cli() -> None:
    target = "examples.legacy.deferred_sync:consumer"
    response = get_from_example(target, "/?delay=0.05", "--interface", "consumer")
    assert response.status_code == 200
    assert response.text == "waiting...\ndone after 0.05 s\n"


def test_deferred_example(serve) -> None:
    with serve(deferred_sync.consumer, interface="consumer") as srv:
        responses = [httpx.get(f"{srv.url}/?delay=0", timeout=TIMEOUT) for _ in range(3)]
    assert [r.text for r in responses] == ["waiting...\ndone after 0.0 s\n"] * 3


def test_replies_from_the_loop_keep_their_order(serve) -> None:
    """Hundreds of replies queued at once on the loop (megabytes, so the transport pauses
    writing and the outbox waits for it) leave in the order they were sent."""
    chunks = [bytes([48 + n % 10]) * (1000 + 997 * n) for n in range(200)]

    def send_all(reply_channel):
        for chunk in chunks:
            reply_channel.send({"content": chunk, "more_content": True})
        reply_channel.send({"content": b"end"})

    def consumer(message):
        reply = message["reply_channel"]
        reply.send({"status": 201, "content": b"start", "more_content": True})  # from the thread
        message["channel_layer"].loop.call_soon(send_all, reply)

    with serve(consumer, interface="consumer") as srv:
        response = httpx.get(srv.url, timeout=TIMEOUT)
    assert response.status_code == 201
    assert response.content == b"start" + b"".join(chunks) + b"end"


def test_scheduling_through_the_loop(serve_one) -> None:
    """What era consumers did with `channel_layer.loop`, from the worker thread and on the
    loop: every way of scheduling runs, and the last one to run replies."""
    expected = {"ensure_future", "coroutine", "awaitable", "call_later", "call_at", "threadsafe"}
    expected.add("nested")
    seen: list[str] = []
    errors: list[BaseException] = []

    def consumer(message):
        loop = message["channel_layer"].loop
        assert loop.is_running()

        def note(name):
            seen.append(name)
            if set(seen) == expected:
                message["reply_channel"].send({"content": ",".join(sorted(seen)).encode()})

        async def coroutine(name):
            note(name)

        async def nested():
            # On the loop itself, through the same proxy; a cancelled task is no failure.
            loop.create_task(asyncio.sleep(TIMEOUT), name="cancelled").cancel()
            future = asyncio.get_running_loop().create_future()
            assert loop.ensure_future(future) is future
            loop.call_later(0, note, "nested")

        asyncio.ensure_future(coroutine("ensure_future"), loop=loop)  # noqa: RUF006 - the era's way
        loop.ensure_future(coroutine("coroutine"))
        loop.ensure_future(Awaitable(coroutine("awaitable")))
        loop.call_later(0.001, note, "call_later")
        loop.call_at(loop.time(), note, "call_at")
        loop.call_soon_threadsafe(note, "threadsafe")
        loop.create_task(nested())
        try:
            loop.create_task(42)  # handed over and raised back to the thread
        except TypeError as exc:
            errors.append(exc)

    with serve_one(consumer, interface="consumer") as srv:
        response = httpx.get(srv.url, timeout=TIMEOUT)
    assert response.text == ",".join(sorted(expected))
    assert len(errors) == 1
    assert not [r for r in srv.records if r.levelname == "ERROR"]


class Awaitable:
    """An awaitable that is not a coroutine: `ensure_future` wraps it in a task."""

    def __init__(self, coro: Any) -> None:
        self.coro = coro

    def __await__(self):
        return self.coro.__await__()


class Held:
    """A future of the server's loop that deferred work waits on, released by the test."""

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.done = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.future: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.future = self.loop.create_future()
        self.ready.set()
        await self.future

    def release(self) -> None:
        assert self.loop is not None and self.future is not None
        self.loop.call_soon_threadsafe(self.future.set_result, None)


def waiting_consumer(held: Held, errors: list[BaseException]):
    """Defers a reply that waits until `held` is released; records what that reply raised."""

    async def reply_later(message):
        await held.wait()
        try:
            message["reply_channel"].send({"content": b"late"})
        except Exception as exc:
            errors.append(exc)
        held.done.set()

    def consumer(message):
        message["channel_layer"].loop.create_task(reply_later(message))

    return consumer


def test_waits_until_the_client_leaves(serve_one) -> None:
    held = Held()
    errors: list[BaseException] = []
    finished = threading.Event()
    consumer = ConsumerMiddleware(waiting_consumer(held, errors), asynchronous=False)

    async def app(scope, receive, send):
        await consumer(scope, receive, send)
        finished.set()

    with serve_one(app) as srv:
        with srv.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert held.ready.wait(TIMEOUT)
            assert not finished.is_set()  # the reply is still to come
        assert finished.wait(TIMEOUT)  # the client left: nothing more to wait for
        held.release()
        assert held.done.wait(TIMEOUT)
    assert errors == []  # the late reply was dropped, as for any departed client
    assert not [r for r in srv.records if r.levelname == "ERROR"]


def test_shutdown_while_a_reply_is_awaited(serve_one) -> None:
    held = Held()
    with serve_one(
        waiting_consumer(held, []), interface="consumer", timeout_graceful_shutdown=0.1
    ) as srv:
        sock = srv.connect()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held.ready.wait(TIMEOUT)
    # The fixture saw the server stop; the request was cancelled and its connection closed
    # (recv_until_closed returns: the server closed it).
    with sock:
        assert b"late" not in recv_until_closed(sock)
    assert "Cancelling 1 running request(s)." in srv.messages()


@pytest.mark.parametrize("replied", [False, True])
def test_a_failing_task(replied, serve_one) -> None:
    """A task that raises is logged; before the response is complete it is also a 500."""

    async def fail(message):
        await asyncio.sleep(0)
        if replied:
            message["reply_channel"].send({"content": b"fine"})
        raise ValueError("deferred boom")

    async def fail_too():
        raise ValueError("another")

    def consumer(message):
        message["channel_layer"].loop.create_task(fail(message))
        message["channel_layer"].loop.create_task(fail_too())

    with serve_one(consumer, interface="consumer") as srv:
        response = httpx.get(srv.url, timeout=TIMEOUT)
    logged = [
        r for r in srv.records if r.getMessage() == "Exception in a task started by a consumer"
    ]
    assert sorted(str(r.exc_info[1]) for r in logged) == ["another", "deferred boom"]
    app_error = "Exception in ASGI application" in srv.messages()
    if replied:
        assert response.text == "fine" and not app_error
    else:
        assert response.status_code == 500 and app_error


def test_a_failed_send_from_the_loop(serve_one) -> None:
    """Nobody waits for a reply sent on the loop: its failure fails the request (500 before
    anything was written) and makes later replies raise it."""
    errors: list[BaseException] = []

    def bad_then_good(reply_channel):
        reply_channel.send({"headers": [(b"bad name", b"x")], "more_content": True})
        asyncio.get_running_loop().call_soon(late, reply_channel)

    def late(reply_channel):
        try:
            reply_channel.send({"content": b"y"})
        except RuntimeError as exc:
            errors.append(exc)

    def consumer(message):
        message["channel_layer"].loop.call_soon(bad_then_good, message["reply_channel"])

    with serve_one(consumer, interface="consumer") as srv:
        response = httpx.get(srv.url, timeout=TIMEOUT)
    assert response.status_code == 500
    assert len(errors) == 1
    record = next(r for r in srv.records if r.getMessage() == "Exception in ASGI application")
    assert "Invalid HTTP header name" in str(record.exc_info[1])


def test_a_failed_send_caught_by_the_thread(serve_one) -> None:
    """The thread sees its failed send; catching it does not make the response whole."""
    caught: list[BaseException] = []

    def consumer(message):
        try:
            message["reply_channel"].send({"headers": [(b"x", b"bad\r\nvalue")]})
        except RuntimeError as exc:
            caught.append(exc)

    with serve_one(consumer, interface="consumer") as srv:
        response = httpx.get(srv.url, timeout=TIMEOUT)
    assert response.status_code == 500
    assert "Invalid HTTP header value" in str(caught[0])
    assert "Exception in ASGI application" in srv.messages()
