"""The contract of `RequestCycle` with its `Framer`, whatever the protocol: message order,
the error policy, cancellation, rejections, the access log and the request count.

Small ASGI apps run through `cycle.run(app)` over a `RecordingFramer`
(`tests.protocols.harness`), and the framer calls they cause are checked exactly. A protocol's
own framer (HTTP/2 per stream) can be checked against the same calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from fulmen.protocols.cycle import DONE, HEAD, RequestCycle
from tests.protocols.harness import (
    ERROR_500,
    FRAMERS,
    PLAIN,
    TEXT,
    RecordingFramer,
    app_sending,
    body,
    errors,
    framer_under_test,
    make_cycle,
    run,
    serve,
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


# Message order


def test_start_then_whole_body() -> None:
    cycle, framer = run(serve(app_sending(start(), body(b"hello"))))
    assert framer.calls == [("head", 200, TEXT, b"hello", False), ("complete",)]
    assert cycle.phase is DONE
    assert cycle.server.total_requests == 1


def test_start_then_streamed_body() -> None:
    app = app_sending(start(201), body(b"a", True), body(b"b", True), body(b"c", True), body())
    _, framer = run(serve(app))
    assert framer.calls == [
        ("head", 201, TEXT, b"a", True),
        ("body", b"b", True),
        ("body", b"c", True),
        ("body", b"", False),
        ("complete",),
    ]


def test_head_is_held_until_the_first_body_message() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        gate = asyncio.get_running_loop().create_future()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            await gate
            await send(body(b"x"))

        task = asyncio.ensure_future(cycle.run(app))
        assert await until(lambda: cycle.phase is HEAD)
        await settle()
        assert framer.calls == [], "the head must wait for the first body message"
        gate.set_result(None)
        await task
        assert framer.calls == [("head", 200, TEXT, b"x", False), ("complete",)]

    run(main())


def test_start_without_headers_key() -> None:
    app = app_sending(
        {"type": "http.response.start", "status": 204}, {"type": "http.response.body"}
    )
    _, framer = run(serve(app))
    assert framer.calls == [("head", 204, [], b"", False), ("complete",)]


@pytest.mark.parametrize(
    "messages",
    [
        pytest.param((body(b"x"),), id="body-before-start"),
        pytest.param((start(), start()), id="two-starts"),
        pytest.param(({"type": "http.response.push", "path": "/"},), id="unknown-before-start"),
        pytest.param((start(), {"type": "http.response.trailers"}), id="unknown-after-start"),
    ],
)
def test_wrong_message_before_the_head_is_a_500(logs: Any, messages: Any) -> None:
    cycle, framer = run(serve(app_sending(*messages)))
    assert framer.calls == [ERROR_500, ("complete",)]
    assert cycle.status == 500
    [record] = errors(logs)
    assert record.getMessage() == "Exception in ASGI application"
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError


def test_unknown_message_while_streaming_aborts(logs: Any) -> None:
    app = app_sending(start(), body(b"a", True), {"type": "http.response.zerocopysend"})
    _, framer = run(serve(app))
    assert framer.calls == [("head", 200, TEXT, b"a", True), ("abort",)]
    assert len(errors(logs)) == 1


def test_send_after_completion_raises() -> None:
    caught: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(start())
        await send(body(b"done"))
        for message in (body(b"more"), start()):
            try:
                await send(message)
            except RuntimeError as exc:
                caught.append(exc)

    _, framer = run(serve(app))
    assert len(caught) == 2
    assert all("DONE" in str(exc) for exc in caught)
    assert framer.calls == [("head", 200, TEXT, b"done", False), ("complete",)]


def test_uncaught_send_after_completion_changes_nothing(logs: Any) -> None:
    _, framer = run(serve(app_sending(start(), body(b"done"), body(b"again"))))
    assert framer.calls == [("head", 200, TEXT, b"done", False), ("complete",)]
    assert len(errors(logs)) == 1  # the app's error is logged, the response stays whole


# Error policy


def test_error_before_start_is_a_500(logs: Any) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise ValueError("boom")

    cycle, framer = run(serve(app))
    assert framer.calls == [ERROR_500, ("complete",)]
    assert cycle.phase is DONE
    [record] = errors(logs)
    assert record.exc_info is not None and record.exc_info[0] is ValueError


def test_error_after_start_before_body_is_still_a_500() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(start(200, [(b"x-app", b"1")]))
        raise ValueError("boom")

    _, framer = run(serve(app))
    assert framer.calls == [ERROR_500, ("complete",)], "a held head can still become a 500"


def test_error_after_head_aborts_never_500(logs: Any) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(start())
        await send(body(b"part", True))
        raise ValueError("boom")

    cycle, framer = run(serve(app))
    assert framer.calls == [("head", 200, TEXT, b"part", True), ("abort",)]
    assert cycle.server.total_requests == 0
    assert len(errors(logs)) == 1


def test_app_returning_without_response_is_a_500(logs: Any) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        return None

    _, framer = run(serve(app))
    assert framer.calls == [ERROR_500, ("complete",)]
    [record] = errors(logs)
    assert "without sending a response" in record.getMessage()


def test_app_returning_after_start_only_is_a_500() -> None:
    _, framer = run(serve(app_sending(start())))
    assert framer.calls == [ERROR_500, ("complete",)]


def test_app_returning_mid_body_aborts(logs: Any) -> None:
    _, framer = run(serve(app_sending(start(), body(b"a", True))))
    assert framer.calls == [("head", 200, TEXT, b"a", True), ("abort",)]
    [record] = errors(logs)
    assert "without completing the response" in record.getMessage()


def test_invalid_header_refused_by_framer_is_a_500() -> None:
    caught: list[BaseException] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send(start(200, [(b"x-bad", b"a\r\nset-cookie: evil")]))
        try:
            await send(body(b"x"))
        except RuntimeError as exc:
            caught.append(exc)
            raise

    cycle, framer = run(serve(app))
    assert len(caught) == 1
    assert framer.calls == [ERROR_500, ("complete",)]
    assert cycle.status == 500


def test_body_shorter_than_content_length_on_the_head_is_a_500() -> None:
    app = app_sending(start(200, [(b"content-length", b"5")]), body(b"hi"))
    _, framer = run(serve(app))
    assert framer.calls == [ERROR_500, ("complete",)]


def test_body_longer_than_content_length_while_streaming_aborts() -> None:
    length = [(b"content-length", b"2")]
    app = app_sending(start(200, length), body(b"a", True), body(b"bcd"))
    _, framer = run(serve(app))
    assert framer.calls == [("head", 200, length, b"a", True), ("abort",)]


def test_body_matching_content_length_completes() -> None:
    length = [(b"content-length", b"3")]
    app = app_sending(start(200, length), body(b"a", True), body(b"bc"))
    _, framer = run(serve(app))
    assert framer.calls == [
        ("head", 200, length, b"a", True),
        ("body", b"bc", False),
        ("complete",),
    ]


# Cancellation


def test_cancelled_while_receiving_aborts() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        cycle.more_body = True

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()

        task = asyncio.ensure_future(cycle.run(app))
        assert await until(lambda: cycle.waiter is not None)
        task.cancel()
        await asyncio.wait([task], timeout=TIMEOUT)
        assert framer.calls == [("abort",)]
        assert cycle.server.total_requests == 0

    run(main())


def test_cancelled_while_streaming_aborts() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        gate = asyncio.get_running_loop().create_future()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            await send(body(b"a", True))
            await gate

        task = asyncio.ensure_future(cycle.run(app))
        assert await until(lambda: len(framer.calls) == 1)
        task.cancel()
        await asyncio.wait([task], timeout=TIMEOUT)
        assert framer.calls == [("head", 200, TEXT, b"a", True), ("abort",)]

    run(main())


def test_cancelled_task_is_discarded_from_server_tasks() -> None:
    async def main() -> None:
        cycle, _ = make_cycle()
        cycle.more_body = True

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await receive()

        task = cycle.task = asyncio.ensure_future(cycle.run(app))
        cycle.server.tasks.add(task)
        assert await until(lambda: cycle.waiter is not None)
        task.cancel()
        await asyncio.wait([task], timeout=TIMEOUT)
        assert not cycle.server.tasks

    run(main())


def test_cancelled_after_completion_does_not_abort() -> None:
    """abort() comes instead of complete(), never after it: a finished response stays whole."""

    async def main() -> None:
        cycle, framer = make_cycle()
        gate = asyncio.get_running_loop().create_future()

        async def app(scope: Any, receive: Any, send: Any) -> None:
            await send(start())
            await send(body(b"done"))
            await gate  # work after the response, e.g. a background task

        task = asyncio.ensure_future(cycle.run(app))
        assert await until(lambda: cycle.phase is DONE)
        task.cancel()
        await asyncio.wait([task], timeout=TIMEOUT)
        assert framer.kinds() == ["head", "complete"], "abort() after complete()"

    run(main())


# Trailers (the `http.response.trailers` extension)


def test_announced_trailers_end_the_response() -> None:
    async def main() -> None:
        cycle, framer = await serve(
            app_sending(
                {**start(), "trailers": True},
                body(b"a", more=True),
                body(b"b"),
                {
                    "type": "http.response.trailers",
                    "headers": [(b"x-a", b"1")],
                    "more_trailers": True,
                },
                {"type": "http.response.trailers", "headers": [(b"x-b", b"2")]},
            )
        )
        assert framer.calls == [
            ("head", 200, TEXT, b"a", True),
            ("body", b"b", True),  # the body does not end the response: the trailers do
            ("trailers", [(b"x-a", b"1"), (b"x-b", b"2")]),
            ("complete",),
        ]
        assert cycle.phase is DONE

    run(main())


def test_body_after_the_last_body_while_awaiting_trailers_is_an_error(logs: Any) -> None:
    async def main() -> None:
        app = app_sending({**start(), "trailers": True}, body(b"x"), body(b"again"))
        _, framer = await serve(app)
        assert framer.kinds() == ["head", "abort"]

    run(main())
    assert "Unexpected ASGI message 'http.response.body'" in str(errors(logs)[0].exc_info[1])


# Early hints (the `http.response.early_hint` extension)


def test_early_hints_are_interim_responses_before_the_head() -> None:
    async def main() -> None:
        hint = {"type": "http.response.early_hint", "links": [b"</a.css>; rel=preload"]}
        _, framer = await serve(app_sending(hint, start(), hint, body(b"x")))
        link = ("interim", 103, [(b"link", b"</a.css>; rel=preload")])
        assert framer.calls == [link, link, ("head", 200, TEXT, b"x", False), ("complete",)]

    run(main())


# Rejections


def test_reject_sends_plain_and_completes() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        cycle.reject(503, b"Service Unavailable")
        assert framer.calls == [("plain", 503, b"Service Unavailable", [PLAIN]), ("complete",)]
        assert cycle.phase is DONE and cycle.status == 503
        assert cycle.server.total_requests == 1

    run(main())


def test_reject_with_extra_headers() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        cycle.reject(403, b"Forbidden", [(b"x-reason", b"origin")])
        assert framer.calls == [
            ("plain", 403, b"Forbidden", [PLAIN, (b"x-reason", b"origin")]),
            ("complete",),
        ]

    run(main())


def test_reject_after_disconnect_sends_nothing() -> None:
    async def main() -> None:
        cycle, framer = make_cycle()
        cycle.on_disconnect()
        cycle.reject(503, b"Service Unavailable")
        assert "plain" not in framer.kinds()
        assert cycle.phase is DONE

    run(main())


# Access log, request count, scope


def test_access_log_on_completion(logs: Any) -> None:
    async def main() -> None:
        cycle, _ = make_cycle(access_log=True)
        cycle.scope["query_string"] = b"a=1"
        await cycle.run(app_sending(start(201), body(b"a", True), body(b"b")))

    run(main())
    [record] = [r for r in logs.records if r.name == "fulmen.access"]
    assert record.getMessage() == '127.0.0.1:50000 - "GET /?a=1 HTTP/1.1" 201 Created'
    assert record.status_code == 201  # type: ignore[attr-defined]


def test_access_log_of_a_500(logs: Any) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise ValueError("boom")

    run(serve(app, access_log=True))
    [record] = [r for r in logs.records if r.name == "fulmen.access"]
    assert record.getMessage().endswith('"GET / HTTP/1.1" 500 Internal Server Error')


def test_no_access_log_when_disabled(logs: Any) -> None:
    run(serve(app_sending(start(), body()), access_log=False))
    assert [r for r in logs.records if r.name == "fulmen.access"] == []


def test_total_requests_counted_once_per_response() -> None:
    async def main() -> None:
        cycle, _ = make_cycle()
        await cycle.run(app_sending(start(), body(b"a", True), body(b"b", True), body()))
        assert cycle.server.total_requests == 1
        second = RequestCycle(cycle.server, RecordingFramer(), dict(cycle.scope))
        second.reject(503, b"Service Unavailable")
        assert cycle.server.total_requests == 2

    run(main())


def test_max_requests_reached_once() -> None:
    async def main() -> None:
        cycle, _ = make_cycle(limit_max_requests=2)
        reached: list[int] = []
        cycle.server.on_max_requests = lambda: reached.append(cycle.server.total_requests)
        await cycle.run(app_sending(start(), body()))
        assert reached == []
        for _ in range(2):
            other = RequestCycle(cycle.server, RecordingFramer(), dict(cycle.scope))
            await other.run(app_sending(start(), body()))
        assert reached == [2]

    run(main())


def test_scope_carries_a_copy_of_the_app_state() -> None:
    async def main() -> None:
        app_state = {"db": "conn"}
        cycle, _ = make_cycle(app_state=app_state)
        seen: list[Any] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            seen.append(scope)
            scope["state"]["db"] = "changed"
            await send(start())
            await send(body())

        await cycle.run(app)
        assert seen[0]["type"] == "http" and seen[0]["client"] == ("127.0.0.1", 50000)
        assert app_state == {"db": "conn"}

    run(main())
