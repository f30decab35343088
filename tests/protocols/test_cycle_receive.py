"""The request side of the `RequestCycle` contract (see `test_cycle_contract`): body delivery,
disconnects, backpressure and 100-continue; then what those calls become on the HTTP/1.1 wire,
through the real `H1Connection` over a fake transport."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from fulmen.protocols.cycle import START
from tests.protocols.harness import (
    FRAMERS,
    TEXT,
    H1Peer,
    app_sending,
    body,
    errors,
    framer_under_test,
    make_cycle,
    run,
    settle,
    start,
    until,
)

TIMEOUT = 5.0


@pytest.fixture(autouse=True, params=FRAMERS)
def framer_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test twice: over the `RecordingFramer`, then with the HTTP/2 stream framer
    underneath, whose frames are checked after the test (`harness.framer_under_test`)."""
    with framer_under_test(request.param):
        yield request.param


@pytest.fixture
def h1_only(framer_kind: str) -> None:
    """For the tests of the HTTP/1.1 wire itself (`H1Peer`): they build no cycle framer."""
    if framer_kind == "h2":
        pytest.skip("HTTP/1.1 wire test through H1Peer: there is no cycle framer to swap")


def reading_app(received: list[Any]) -> Any:
    """Records every message up to the last body part, then answers 200 with no body."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            received.append(message)
            if not message["more_body"]:
                break
        await send(start())
        await send(body())

    return app


# Request body


def test_body_fed_before_receive() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        cycle.more_body = True
        cycle.on_body(b"ab")
        cycle.on_body(b"cd")
        cycle.on_message_complete()
        received: list[Any] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            received.append(await receive())
            await send(start())
            await send(body())

        await cycle.run(app)
        assert received == [{"type": "http.request", "body": b"abcd", "more_body": False}]
        assert ("consumed", 4) not in framer.calls, "nothing more to ask for"
        assert framer.kinds() == ["head", "complete"]

    run(main())


def test_body_fed_during_receive() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        cycle.more_body = True
        received: list[Any] = []
        app = reading_app(received)

        task = asyncio.ensure_future(cycle.run(app))
        assert await until(lambda: cycle.waiter is not None)
        cycle.on_body(b"a")
        assert await until(lambda: len(received) == 1)
        assert framer.calls == [("consumed", 1)]
        assert await until(lambda: cycle.waiter is not None)
        cycle.on_body(b"bc")
        assert await until(lambda: len(received) == 2)
        assert framer.calls == [("consumed", 1), ("consumed", 2)]
        assert await until(lambda: cycle.waiter is not None)
        cycle.on_message_complete()
        await task
        assert received == [
            {"type": "http.request", "body": b"a", "more_body": True},
            {"type": "http.request", "body": b"bc", "more_body": True},
            {"type": "http.request", "body": b"", "more_body": False},
        ]
        assert framer.calls == [
            ("consumed", 1),
            ("consumed", 2),
            ("head", 200, TEXT, b"", False),
            ("complete",),
        ]

    run(main())


def test_last_chunk_and_end_together_need_no_consumed() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        cycle.more_body = True
        received: list[Any] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            received.append(await receive())
            await send(start())
            await send(body())

        task = asyncio.ensure_future(cycle.run(app))
        assert await until(lambda: cycle.waiter is not None)
        cycle.on_body(b"xyz")
        cycle.on_message_complete()  # before the app's receive() resumes
        await task
        assert received == [{"type": "http.request", "body": b"xyz", "more_body": False}]
        assert "consumed" not in framer.kinds()

    run(main())


def test_request_without_body() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        received: list[Any] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            received.append(await receive())
            await send(start())
            await send(body())

        await cycle.run(app)
        assert received == [{"type": "http.request", "body": b"", "more_body": False}]
        assert framer.kinds() == ["head", "complete"]

    run(main())


# Disconnect


def test_disconnect_while_waiting_in_receive(logs: Any) -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        received: list[Any] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            received.append(await receive())
            received.append(await receive())  # nothing more comes: waits for the end

        task = asyncio.ensure_future(cycle.run(app))
        assert await until(lambda: cycle.waiter is not None)
        cycle.on_disconnect()
        await task
        assert received[1] == {"type": "http.disconnect"}
        assert framer.calls == [], "a client that left needs no response"
        assert errors(logs) == []

    run(main())


def test_disconnect_while_waiting_for_more_body() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        cycle.more_body = True
        received: list[Any] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            received.append(await receive())
            received.append(await receive())  # after a disconnect, it stays disconnected

        task = asyncio.ensure_future(cycle.run(app))
        assert await until(lambda: cycle.waiter is not None)
        cycle.on_body(b"partial")  # buffered, but the client leaves before the app resumes
        cycle.on_disconnect()
        await task
        assert received == [{"type": "http.disconnect"}, {"type": "http.disconnect"}]
        assert framer.calls == []

    run(main())


def test_disconnect_while_streaming_drops_sends(logs: Any) -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        gate = asyncio.get_running_loop().create_future()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            await send(body(b"a", True))
            await gate
            await send(body(b"b", True))
            await send(body(b"c"))

        task = asyncio.ensure_future(cycle.run(app))
        assert await until(lambda: len(framer.calls) == 1)
        drains = framer.drains
        cycle.on_disconnect()
        gate.set_result(None)
        await task
        assert framer.calls == [("head", 200, TEXT, b"a", True)], "no call after the disconnect"
        assert framer.drains == drains, "no waiting for a peer that left"
        assert cycle.server.total_requests == 0
        assert errors(logs) == []

    run(main())


def test_disconnect_then_app_returns_mid_body_is_no_error(logs: Any) -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        gate = asyncio.get_running_loop().create_future()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            await send(body(b"a", True))
            await gate

        task = asyncio.ensure_future(cycle.run(app))
        assert await until(lambda: len(framer.calls) == 1)
        cycle.on_disconnect()
        gate.set_result(None)
        await task
        assert framer.kinds() == ["head"], "neither abort nor 500 for a client that left"
        assert errors(logs) == []

    run(main())


def test_disconnect_before_start_then_full_response_is_dropped() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        cycle.on_disconnect()
        await cycle.run(app_sending(start(), body(b"a", True), body(b"b")))
        assert framer.calls == []

    run(main())


def test_receive_after_response_complete_is_disconnect() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        cycle.more_body = True  # the request body is never read
        received: list[Any] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            await send(body(b"early"))
            received.append(await receive())

        await cycle.run(app)
        assert received == [{"type": "http.disconnect"}]
        assert framer.kinds() == ["head", "complete"]

    run(main())


def test_waiting_receive_wakes_when_response_completes() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        received: list[Any] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()

            async def listen() -> None:  # as frameworks watch for a disconnect
                received.append(await receive())

            listener = asyncio.ensure_future(listen())
            assert await until(lambda: cycle.waiter is not None)
            await send(start())
            await send(body(b"ok"))
            await asyncio.wait_for(listener, TIMEOUT)

        await cycle.run(app)
        assert received == [{"type": "http.disconnect"}]
        assert framer.kinds() == ["head", "complete"]

    run(main())


# Backpressure


def test_drain_future_blocks_send_until_resolved() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        sent: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            sent.append("start")
            await send(body(b"a", True))
            sent.append("a")
            await send(body(b"b"))
            sent.append("b")

        framer.blocked = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(cycle.run(app))
        await settle()
        assert sent == [] and cycle.phase is START, "send must wait for the drain"
        framer.blocked.set_result(None)
        framer.blocked = None
        assert await until(lambda: sent == ["start", "a", "b"])
        await task
        assert framer.kinds() == ["head", "body", "complete"]

    run(main())


def test_drain_blocks_mid_stream() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        gate = asyncio.get_running_loop().create_future()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            await send(body(b"a", True))
            await gate
            await send(body(b"b"))

        task = asyncio.ensure_future(cycle.run(app))
        assert await until(lambda: len(framer.calls) == 1)
        blocked = framer.blocked = asyncio.get_running_loop().create_future()
        gate.set_result(None)
        await settle()
        assert framer.calls == [("head", 200, TEXT, b"a", True)]
        assert not task.done()
        framer.blocked = None
        blocked.set_result(None)
        await task
        assert framer.calls[1:] == [("body", b"b", False), ("complete",)]

    run(main())


def test_disconnect_while_blocked_in_drain_drops_the_send() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            await send(body(b"a"))

        blocked = framer.blocked = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(cycle.run(app))
        await settle()
        assert not task.done()
        cycle.on_disconnect()
        blocked.set_result(None)  # a framer releases its writers when the peer leaves
        await task
        assert framer.calls == []

    run(main())


# 100-continue


def test_100_continue_sent_once_on_first_receive() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        cycle.more_body = True
        cycle.expect_100 = True
        received: list[Any] = []
        app = reading_app(received)

        task = asyncio.ensure_future(cycle.run(app))
        assert await until(lambda: cycle.waiter is not None)
        assert framer.calls == [("interim", 100)]
        cycle.on_body(b"a")
        assert await until(lambda: len(received) == 1)
        assert await until(lambda: cycle.waiter is not None)
        cycle.on_body(b"b")
        cycle.on_message_complete()
        await task
        assert framer.calls.count(("interim", 100)) == 1
        assert framer.calls == [
            ("interim", 100),
            ("consumed", 1),
            ("head", 200, TEXT, b"", False),
            ("complete",),
        ]

    run(main())


def test_no_100_continue_without_receive() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        cycle.more_body = True
        cycle.expect_100 = True
        await cycle.run(app_sending(start(417), body(b"no")))
        assert framer.kinds() == ["head", "complete"]

    run(main())


def test_no_100_continue_once_the_response_started() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        cycle.more_body = True
        cycle.expect_100 = True
        received: list[Any] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            received.append(await receive())
            await send(body(b"x"))

        task = asyncio.ensure_future(cycle.run(app))
        assert await until(lambda: cycle.waiter is not None)
        cycle.on_body(b"q")
        cycle.on_message_complete()
        await task
        assert "interim" not in framer.kinds(), "100 Continue after the final status started"
        assert received == [{"type": "http.request", "body": b"q", "more_body": False}]

    run(main())


def test_no_100_continue_to_a_client_that_left() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        cycle.more_body = True
        cycle.expect_100 = True
        cycle.on_disconnect()
        received: list[Any] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            received.append(await receive())

        await cycle.run(app)
        assert received == [{"type": "http.disconnect"}]
        assert framer.calls == []

    run(main())


# Through the real H1Connection

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@pytest.mark.usefixtures("h1_only")
def test_h1_100_continue_on_the_wire() -> None:
    async def main() -> None:
        gate = asyncio.get_running_loop().create_future()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await gate
            message = await receive()
            await send(start(200, [(b"content-length", b"%d" % len(message["body"]))]))
            await send(body(message["body"]))

        peer = H1Peer(app)
        await peer.feed(
            b"POST / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        assert peer.written == b"", "100 Continue only once the app asks for the body"
        gate.set_result(None)
        assert await until(lambda: peer.written == CONTINUE)
        await peer.feed(b"ping")
        assert peer.written.startswith(CONTINUE + b"HTTP/1.1 200 OK\r\n")
        assert peer.written.endswith(b"\r\n\r\nping")
        assert peer.written.count(b"100 Continue") == 1
        await peer.close()

    run(main())


@pytest.mark.usefixtures("h1_only")
def test_h1_pause_writing_holds_send_until_resume() -> None:
    async def main() -> None:
        sent: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            await send(body(b"one", True))
            sent.append("one")
            await send(body(b"two"))
            sent.append("two")

        peer = H1Peer(app)
        peer.transport.trigger_pause_writing()
        await peer.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert peer.written == b"" and sent == [], "send must wait while writing is paused"
        assert peer.state.tasks, "the app is waiting in send()"
        peer.transport.trigger_resume_writing()
        assert await until(lambda: sent == ["one", "two"])
        assert peer.written.startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"transfer-encoding: chunked\r\n" in peer.written
        assert peer.written.endswith(b"3\r\none\r\n3\r\ntwo\r\n0\r\n\r\n")
        assert not peer.closed, "keep-alive after a whole response"
        await peer.close()

    run(main())


@pytest.mark.usefixtures("h1_only")
def test_h1_app_error_after_head_closes_the_transport(logs: Any) -> None:
    async def main() -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            await send(body(b"part", True))
            raise ValueError("boom")

        peer = H1Peer(app)
        await peer.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert peer.closed, "a broken response ends the connection"
        assert peer.written.startswith(b"HTTP/1.1 200 OK\r\n")
        assert peer.written.endswith(b"4\r\npart\r\n"), "no last chunk: the peer sees it broken"
        assert b" 500 " not in peer.written
        await peer.close()

    run(main())
    assert len(errors(logs)) == 1


@pytest.mark.usefixtures("h1_only")
def test_h1_app_error_before_head_is_500_and_close() -> None:
    async def main() -> None:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            raise ValueError("boom")

        peer = H1Peer(app)
        await peer.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        assert peer.written.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
        assert peer.written.endswith(b"\r\n\r\nInternal Server Error")
        assert b"connection: close\r\n" in peer.written
        assert peer.closed
        await peer.close()

    run(main())


@pytest.mark.usefixtures("h1_only")
def test_h1_large_body_pauses_reading_until_consumed() -> None:
    async def main() -> None:
        received: list[int] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            while True:
                message = await receive()
                received.append(len(message["body"]))
                if not message["more_body"]:
                    break
            await send(start())
            await send(body(b"ok"))

        size = 100_000
        peer = H1Peer(app)
        head = b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size
        first = 70_000
        await peer.feed(head + b"x" * first)
        assert peer.transport.read_calls == ["pause", "resume"], "paused above the high water"
        assert received == [first]
        await peer.feed(b"x" * (size - first))
        assert sum(received) == size and received[-1] == size - first
        assert peer.written.endswith(b"\r\n\r\nok")
        await peer.close()

    run(main())
