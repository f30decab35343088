"""Channels-style consumers (`--interface consumer`): the examples, detection and the adapter."""

from __future__ import annotations

import asyncio
import threading

import httpx
import pytest

from examples.legacy import content_length_sync, echo_async, hello_sync, stream_async
from fulmen.consumers import ConsumerMiddleware
from fulmen.consumers.channels import BodyChannel
from fulmen.interfaces import adapt, detect_interface
from tests.conftest import TIMEOUT, recv_response, recv_until_closed
from tests.helpers import Fulmen, clean_env, messages, record_logs


def serve_example(target: str, *options: str) -> Fulmen:
    """`python -m fulmen TARGET --port 0 --lifespan off OPTIONS`: an example, unmodified."""
    return Fulmen(target, "--port", "0", "--lifespan", "off", *options, env=clean_env())


def get_from_example(target: str, path: str, *options: str) -> httpx.Response:
    """`GET path` from the example `target` run through the CLI."""
    with serve_example(target, *options) as server:
        return httpx.get(f"{server.url}{path}", timeout=TIMEOUT)


def test_sync_example_through_the_cli() -> None:
    target = "examples.legacy.hello_sync:hello_world"
    response = get_from_example(target, "/there?fulmen", "--interface", "consumer")
    assert response.status_code == 200
    assert response.text == "Hello, fulmen! (GET /there)"
    assert response.headers["content-type"] == "text/plain; charset=utf-8"


def test_async_example_auto_detected_through_the_cli() -> None:
    with serve_example("examples.legacy.echo_async:app", "--lifespan", "on") as server:
        # --lifespan on, yet no lifespan scope is sent to consumers
        response = httpx.post(server.url, content=b"echo me", timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.content == b"echo me"
    assert "lifespan" not in server.stderr.text


def test_streaming_example_through_the_cli() -> None:
    response = get_from_example("examples.legacy.stream_async:app", "/?2")
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.text == "start\nline 0\nline 1\nend\n"


def test_content_length_example_through_the_cli() -> None:
    target = "examples.legacy.content_length_sync:consumer"
    with serve_example(target, "--interface", "consumer") as server:
        response = httpx.post(f"{server.url}/json", content=b"12345", timeout=TIMEOUT)
    assert response.json() == {"method": "POST", "path": "/json", "received": 5}
    assert response.headers["content-length"] == str(len(response.content))
    assert "transfer-encoding" not in response.headers


def test_content_length_example(serve) -> None:
    with serve(content_length_sync.consumer, interface="consumer") as srv, srv.connect() as sock:
        answers = []
        for path in ("/a", "/b"):  # one connection, kept alive
            sock.sendall(b"GET %b HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
            answers.append((recv_response(sock), path))
    for data, path in answers:
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert b"content-length: %d" % len(body) in head
        assert body == b'{"method": "GET", "path": "%s", "received": 0}' % path.encode()


async def era_echo(message, channels):
    """The era's way to read a body: only from `channels['body']`, if there is one."""
    body = message.get("body", b"")
    if "body" in channels:
        while True:
            chunk = await channels["body"].receive()
            body += chunk["content"]
            if not chunk.get("more_content", False):
                break
    await channels["reply"].send({"status": 200, "headers": [], "content": body})


@pytest.mark.parametrize(
    "content",
    [b"", b"short", [b"x" * 70_000, b"", b"y" * 3, b"z" * 100_000]],
    ids=["none", "content-length", "chunked"],
)
def test_era_body_reading_gets_every_byte(serve, content) -> None:
    expected = content if isinstance(content, bytes) else b"".join(content)
    with serve(era_echo, interface="consumer") as srv:
        body = content if isinstance(content, bytes) else iter(content)
        response = httpx.post(srv.url, content=body, timeout=TIMEOUT)
        assert httpx.get(srv.url, timeout=TIMEOUT).content == b""  # no body: no wait
    assert response.status_code == 200
    assert response.content == expected


def test_async_message_carries_no_body_bytes(serve_one) -> None:
    seen: list[dict] = []

    async def consumer(message, channels):
        seen.append(message)
        await channels["reply"].send({"content": b""})

    with serve_one(consumer, interface="consumer") as srv:
        httpx.post(srv.url, content=b"abc", timeout=TIMEOUT)
        httpx.get(srv.url, timeout=TIMEOUT)
    assert [(m["content"], m["body"], m["more_content"]) for m in seen] == [
        (b"", b"", True),
        (b"", b"", False),
    ]


def test_async_echo_reads_a_streamed_body(serve) -> None:
    chunks = [bytes([65 + n]) * 70_000 for n in range(5)]
    with serve(echo_async.app, interface="consumer") as srv:
        response = httpx.post(srv.url, content=iter(chunks), timeout=TIMEOUT)
    assert response.status_code == 200
    assert response.content == b"".join(chunks)


def test_sync_consumer_gets_the_whole_body(serve_one) -> None:
    seen: list[dict] = []

    def consumer(message):
        seen.append({k: v for k, v in message.items() if k != "reply_channel"})
        message["reply_channel"].send({"content": str(len(message["content"])).encode()})

    body = b"x" * 300_000
    with serve_one(consumer, interface="consumer") as srv:
        response = httpx.post(
            f"{srv.url}/p?a=1",
            content=iter([body[:1000], body[1000:]]),
            timeout=TIMEOUT,
        )
    assert response.status_code == 200  # status defaults to 200
    assert response.text == "300000"
    message = seen[0]
    assert message["content"] == message["body"] == body
    assert message["more_content"] is False
    assert message["method"] == "POST"
    assert message["path"] == "/p"
    assert message["query_string"] == b"a=1"
    assert message["channel"] == "http.request"
    assert [b"host", f"127.0.0.1:{srv.port}".encode()] in message["headers"]


def test_streaming_example(serve) -> None:
    with serve(stream_async.app) as srv, srv.connect() as sock:
        sock.sendall(b"GET /?4 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = recv_until_closed(sock)
    head, _, _ = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower()
    text = _dechunk(data.partition(b"\r\n\r\n")[2])
    assert text == b"start\nline 0\nline 1\nline 2\nline 3\nend\n"


def _dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out += body[:size]
        body = body[size + 2 :]


def test_sync_consumer_streams_with_more_content(serve_one) -> None:
    def consumer(message):
        send = message["reply_channel"].send
        send({"status": 201, "headers": [("x-kind", "str")], "content": "a", "more_content": True})
        send({"content": b"b", "more_content": True})
        send({"content": b"c"})

    with serve_one(consumer, interface="consumer") as srv:
        response = httpx.get(srv.url, timeout=TIMEOUT)
    assert response.status_code == 201
    assert response.headers["x-kind"] == "str"
    assert response.headers["transfer-encoding"] == "chunked"
    assert response.text == "abc"


def test_slow_sync_consumer_does_not_block_the_loop(serve_one) -> None:
    release = threading.Event()
    started = threading.Event()

    def consumer(message):
        if message["path"] == "/slow":
            started.set()
            release.wait(TIMEOUT)
        message["reply_channel"].send({"content": message["path"].encode()})

    with serve_one(consumer, interface="consumer") as srv:
        result: list[httpx.Response] = []
        thread = threading.Thread(
            target=lambda: result.append(httpx.get(f"{srv.url}/slow", timeout=TIMEOUT))
        )
        thread.start()
        assert started.wait(TIMEOUT)
        assert httpx.get(f"{srv.url}/fast", timeout=TIMEOUT).text == "/fast"
        release.set()
        thread.join(TIMEOUT)
    assert result[0].text == "/slow"


async def returns_early(message, channels):
    await channels["reply"].send({"status": 200, "content": b"part", "more_content": True})


async def replies_twice(message, channels):
    await message["reply_channel"].send({"content": b"one"})
    await channels["reply"].send({"content": b"two"})


async def never_replies(message, channels):
    return None


def sync_never_replies(message):
    message["reply_channel"].send({"content": b"half", "more_content": True})


@pytest.mark.parametrize(
    ("app", "error"),
    [
        (never_replies, "returned before its response was complete"),
        (replies_twice, "Reply sent after the response was complete"),
        (sync_never_replies, "returned before its response was complete"),
    ],
)
def test_consumer_errors_are_logged(app, error, serve_one, monkeypatch) -> None:
    with record_logs(monkeypatch) as logs, serve_one(app, interface="consumer") as srv:
        if app is sync_never_replies:
            with pytest.raises(httpx.RemoteProtocolError):  # the body is cut short
                httpx.get(srv.url, timeout=TIMEOUT)
        else:
            response = httpx.get(srv.url, timeout=TIMEOUT)
    text = "\n".join(messages(logs))
    assert "Exception in ASGI application" in text
    if app is never_replies:
        assert response.status_code == 500
    elif app is replies_twice:
        assert response.text == "one"
    assert any(error in str(r.exc_info[1]) for r in logs.records if r.exc_info)


def test_response_cut_short_closes_the_connection(serve_one, monkeypatch) -> None:
    with record_logs(monkeypatch), serve_one(returns_early) as srv, srv.connect() as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = recv_until_closed(sock)
    assert data.startswith(b"HTTP/1.1 200")
    assert b"part" in data
    assert not data.endswith(b"0\r\n\r\n")  # no terminating chunk: the body is truncated


def test_lifespan_scope_raises() -> None:
    app = ConsumerMiddleware(echo_async.app, asynchronous=True)

    async def main() -> None:
        await app({"type": "lifespan"}, _never, _never)

    with pytest.raises(RuntimeError, match="cannot serve scope type 'lifespan'"):
        asyncio.run(main())


async def _never():  # pragma: no cover - never awaited
    raise AssertionError


def test_sync_consumer_not_called_when_the_client_leaves() -> None:
    called: list[object] = []
    app = ConsumerMiddleware(called.append, asynchronous=False)
    incoming = [
        {"type": "http.request", "body": b"a", "more_body": True},
        {"type": "http.disconnect"},
    ]

    async def receive():
        return incoming.pop(0)

    async def send(message):  # pragma: no cover - nothing is sent
        raise AssertionError(message)

    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"", "headers": []}
    asyncio.run(app({**scope, "http_version": "1.1"}, receive, send))
    assert called == []
    assert app.executor is not None
    app.executor.shutdown()


def test_body_channel_ends_on_disconnect() -> None:
    async def receive():
        return {"type": "http.disconnect"}

    async def main() -> list[dict]:
        channel = BodyChannel(receive, more=True)
        return [await channel.receive(), await channel.receive()]

    assert asyncio.run(main()) == [{"content": b"", "more_content": False}] * 2


class AsyncConsumerInstance:
    async def __call__(self, message, channels):
        await channels["reply"].send({"content": b"instance"})


class UnreadableSignature:
    __signature__ = "not a signature"  # inspect.signature raises TypeError

    async def __call__(self, scope, receive, send):  # pragma: no cover - only inspected
        pass


async def asgi3_with_default(scope, receive=None, send=None):  # pragma: no cover - only inspected
    pass


async def consumer_varargs(*args):  # pragma: no cover - only inspected
    pass


@pytest.mark.parametrize(
    ("app", "interface"),
    [
        (echo_async.app, "consumer"),
        (stream_async.app, "consumer"),
        (AsyncConsumerInstance(), "consumer"),
        (asgi3_with_default, "asgi3"),
        (consumer_varargs, "asgi3"),
        (UnreadableSignature(), "asgi3"),
        (hello_sync.hello_world, "asgi2"),  # the one-argument form must be asked for
        (len, "asgi2"),
    ],
)
def test_detection(app, interface) -> None:
    assert detect_interface(app) == interface


def test_async_instance_served(serve_one) -> None:
    assert isinstance(adapt(AsyncConsumerInstance(), "consumer"), ConsumerMiddleware)
    with serve_one(AsyncConsumerInstance()) as srv:
        assert httpx.get(srv.url, timeout=TIMEOUT).text == "instance"
