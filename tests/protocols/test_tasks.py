"""Each request runs in a real asyncio Task, in one context, from its first step to its last.

Frameworks rely on it: sniffio and anyio ask `asyncio.current_task()` which loop runs them
(FastAPI's plain `def` routes go through anyio's threads), `asyncio.timeout` needs the Task to
cancel, and asgiref resets in a later step a context variable it set in the first (a token
cannot be reset in another context). Each case here failed when the first step ran outside any
Task and the rest in a copy of its context.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import sys
from typing import Any

import anyio.to_thread
import httpx
import pytest
import sniffio
from websockets.sync.client import connect

from fulmen.adapters import ASGIAdapter
from fulmen.consumers import ConsumerMiddleware
from tests.conftest import TIMEOUT
from tests.protocols.http1_raw import Reader, read_body, request, respond

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("fulmen_test_var", default="unset")


def task_facts(first: asyncio.Task[Any] | None) -> dict[str, Any]:
    """What the request sees of its Task and context after a wait, against its first step."""
    return {"task": first is not None, "same_task": asyncio.current_task() is first}


async def waits(mode: str, receive: Any) -> None:
    if mode == "sleep":
        await asyncio.sleep(0)
    elif mode == "body":
        await read_body(receive)
    elif mode == "thread":  # anyio's thread pool, as FastAPI runs a plain `def` route
        assert await anyio.to_thread.run_sync(lambda: 41 + 1) == 42


async def task_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """First step: note the Task and set a context variable; after the wait (by the query
    string), reset it with its token: that fails in another context."""
    first = asyncio.current_task()
    seen = VAR.get()
    token = VAR.set(scope["path"])
    library = sniffio.current_async_library()
    await waits(scope["query_string"].decode(), receive)
    VAR.reset(token)
    facts = {**task_facts(first), "seen": seen, "library": library, "after": VAR.get()}
    await respond(send, json.dumps(facts).encode())


EXPECTED = {"task": True, "same_task": True, "seen": "unset", "library": "asyncio"}


@pytest.mark.parametrize("mode", ["none", "sleep", "body", "thread"])
def test_each_request_runs_in_one_task_and_one_context(serve, mode: str) -> None:
    with serve(task_app) as srv:
        body = json.dumps({"data": "x" * 1000})
        response = httpx.post(f"{srv.url}/r?{mode}", content=body, timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.json() == {**EXPECTED, "after": "unset"}
    assert not srv.messages(40)  # nothing logged at ERROR


@pytest.mark.parametrize("mode", ["none", "sleep"])
def test_pipelined_requests_each_get_a_task_of_their_own(serve, mode: str) -> None:
    tasks: list[asyncio.Task[Any] | None] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        tasks.append(asyncio.current_task())
        await task_app(scope, receive, send)

    with serve(app) as srv, srv.connect() as sock:
        sock.sendall(b"".join(request(path=f"/{n}?{mode}") for n in range(3)))
        reader = Reader(sock)
        responses = [reader.response() for _ in range(3)]
    assert [json.loads(r.body) for r in responses] == [{**EXPECTED, "after": "unset"}] * 3
    assert None not in tasks
    assert len(set(map(id, tasks))) == 3  # the list keeps them alive: ids are distinct


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in Python 3.11")
def test_asyncio_timeout_in_the_first_step(serve) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            async with asyncio.timeout(0.01):  # type: ignore[attr-defined]
                await asyncio.Event().wait()
        except TimeoutError:
            await respond(send, b"timed out")

    with serve(app) as srv:
        response = httpx.get(srv.url, timeout=TIMEOUT)
    assert response.text == "timed out"


def test_websocket_runs_in_one_task_and_one_context(serve_ws) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        first = asyncio.current_task()
        token = VAR.set("websocket")
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        message = await receive()
        VAR.reset(token)
        facts = {**task_facts(first), "text": message["text"], "after": VAR.get()}
        await send({"type": "websocket.send", "text": json.dumps(facts)})
        await send({"type": "websocket.close", "code": 1000})

    with serve_ws(app) as srv, connect(f"ws://127.0.0.1:{srv.port}/", open_timeout=TIMEOUT) as ws:
        ws.send("hello")
        reply = json.loads(ws.recv(TIMEOUT))
    assert reply == {"task": True, "same_task": True, "text": "hello", "after": "unset"}


def test_lifespan_runs_in_one_task_and_one_context(serve_one) -> None:
    facts: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            first = asyncio.current_task()
            await receive()
            token = VAR.set("lifespan")
            await send({"type": "lifespan.startup.complete"})
            await receive()
            VAR.reset(token)
            facts.append({**task_facts(first), "after": VAR.get()})
            await send({"type": "lifespan.shutdown.complete"})
        else:
            await respond(send, b"ok")

    with serve_one(app, lifespan="on") as srv:
        assert httpx.get(srv.url, timeout=TIMEOUT).text == "ok"
    assert facts == [{"task": True, "same_task": True, "after": "unset"}]


def test_wsgi_app_sees_the_request_context(serve_one) -> None:
    """A WSGI app runs in a thread with a copy of its request's context, as `asyncio.to_thread`
    runs a function: a variable an ASGI middleware set is seen by the WSGI app."""

    def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("content-type", "text/plain")])
        return [VAR.get().encode()]

    inner = ASGIAdapter(wsgi_app)

    async def middleware(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert asyncio.current_task() is not None
        VAR.set("from middleware")
        await inner(scope, receive, send)

    with serve_one(middleware) as srv:
        assert httpx.get(srv.url, timeout=TIMEOUT).text == "from middleware"


def test_consumers_run_in_a_task(serve_one) -> None:
    seen: list[bool] = []

    async def consumer(message: dict[str, Any], channels: dict[str, Any]) -> None:
        seen.append(asyncio.current_task() is not None)
        await channels["reply"].send({"status": 200, "content": VAR.get().encode()})

    inner = ConsumerMiddleware(consumer, asynchronous=True)

    async def middleware(scope: dict[str, Any], receive: Any, send: Any) -> None:
        VAR.set("consumer")
        await inner(scope, receive, send)

    with serve_one(middleware) as srv:
        assert httpx.get(srv.url, timeout=TIMEOUT).text == "consumer"
    assert seen == [True]
