"""Groups (`--interface consumer`): pub/sub broadcast to reply channels, in one server process.

Real servers, the `websockets` client and httpx. `Commands` is a consumer of each shape that
does what its clients ask, so one test covers both shapes; `Served` serves it through a
`ConsumerMiddleware` the test holds, to look at the middleware's registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import threading
from typing import Any

import httpx
import pytest

from examples.legacy import chat_async, chat_rooms_sync
from fulmen.consumers import ConsumerMiddleware
from tests.conftest import TIMEOUT, recv_until_closed
from tests.test_consumers import serve_example
from tests.test_consumers_websocket import SHAPES, client, closed_code, ws_url, ws_url_of

# The chat examples


def test_chat_example_through_the_cli() -> None:
    """Three clients: whatever each sends reaches every client, its sender included, and the
    messages of one sender arrive in the order it sent them."""
    with serve_example("examples.legacy.chat_async:app") as server, contextlib.ExitStack() as stack:
        clients = [stack.enter_context(client(ws_url_of(server))) for _ in range(3)]
        clients[0].send("hello")
        assert [ws.recv(timeout=TIMEOUT) for ws in clients] == ["hello"] * 3
        for turn in range(4):
            for number, ws in enumerate(clients):
                ws.send(f"{number}.{turn}")
        clients[2].send(b"2.bytes")
        for ws in clients:
            received = [ws.recv(timeout=TIMEOUT) for _ in range(13)]
            for number in range(3):
                said = [data for data in received if sender(data) == str(number)]
                expected: list[str | bytes] = [f"{number}.{turn}" for turn in range(4)]
                assert said == expected + [b"2.bytes"] * (number == 2)


def sender(data: str | bytes) -> str:
    return (data.decode() if isinstance(data, bytes) else data).partition(".")[0]


def test_chat_example_over_every_engine(serve_ws) -> None:
    with serve_ws(chat_async.app) as srv, client(ws_url(srv)) as one, client(ws_url(srv)) as two:
        for data in ("é" * 70_000, bytes(range(256)) * 300):
            two.send(data)
            assert one.recv(timeout=TIMEOUT) == data
            assert two.recv(timeout=TIMEOUT) == data


def test_rooms_example(serve_one) -> None:
    with (
        serve_one(chat_rooms_sync.consumer, interface="consumer") as srv,
        client(ws_url(srv, "/lobby")) as alice,
    ):
        alice_id = joined(alice, "/lobby")
        with client(ws_url(srv, "/lobby")) as bob, client(ws_url(srv, "/games")) as carol:
            bob_id = joined(bob, "/lobby")
            assert alice.recv(timeout=TIMEOUT) == f"* {bob_id} joined /lobby"
            carol_id = joined(carol, "/games")
            carol.send("gg")  # to the games room only
            assert carol.recv(timeout=TIMEOUT) == f"{carol_id}: gg"
            bob.send("hi")
            assert bob.recv(timeout=TIMEOUT) == f"{bob_id}: hi"
            assert alice.recv(timeout=TIMEOUT) == f"{bob_id}: hi"
        assert alice.recv(timeout=TIMEOUT) == f"* {bob_id} left"
        alice.send("alone")
        assert alice.recv(timeout=TIMEOUT) == f"{alice_id}: alone"


def joined(ws: Any, path: str) -> str:
    """The short name a rooms client got: it hears its own arrival first."""
    match = re.fullmatch(rf"\* (\w+) joined {path}", ws.recv(timeout=TIMEOUT))
    assert match is not None
    return match.group(1)


# A consumer of each shape, driven by its clients


def plan(message: dict[str, Any], me: str) -> tuple[str, list[dict[str, Any]]]:
    """What the client asks for: a verb and its steps, each a groups command (as the async form
    sends it) or `{'reply': reply}` for the client's own reply channel.

    WebSocket: `/?G` joins G on connect; texts `join G`, `leave G`, `add G NAME` (adds the
    reply channel NAME), `say G TEXT` (TEXT to G) and `post G TEXT` (as `say`; a sync consumer
    does it on the loop), each answered `ok VERB`.
    HTTP: `/listen?G` joins G and starts a response left to G's messages; `/publish?G` sends
    its body to G (the body `end` ends their responses); `/stale?G` completes its response,
    then joins G and holds until released.
    """
    if message["channel"] == "http.request":
        verb, group = message["path"][1:], message["query_string"].decode()
        data = message["content"]
    elif message["channel"] == "websocket.receive":
        verb, _, rest = message["text"].partition(" ")
        group, _, data = rest.partition(" ")
    else:
        verb, group, data = message["channel"], message.get("query_string", b"").decode(), ""
    join = {"group": group, "add": me}
    ok = {"reply": {"text": f"ok {verb}"}}
    plans = {
        "websocket.connect": [join] if group else [],
        "join": [join, ok],
        "leave": [{"group": group, "discard": me}, ok],
        "add": [{"group": group, "add": data}, ok],
        "say": [{"group": group, "send": {"text": data}}, ok],
        "listen": [join, {"reply": {"content": b"listening\n", "more_content": True}}],
        "publish": [
            {"group": group, "send": {"content": data, "more_content": data != b"end\n"}},
            {"reply": {"content": b"ok"}},
        ],
        "stale": [{"reply": {"content": b"stale"}}, join],
    }
    plans["post"] = [plans["say"][0], ok]
    return verb, plans.get(verb, [])


class Commands:
    """`sync` and `asynchronous`: the consumers carrying out `plan`, noting the reply channel
    name of each message in `names` as (channel, name)."""

    def __init__(self) -> None:
        self.names: list[tuple[str, str]] = []
        self.stale = threading.Event()  # a `/stale` request has joined its group
        self.release = threading.Event()

    def sync(self, message: dict[str, Any]) -> None:
        layer, reply = message["channel_layer"], message["reply_channel"]
        self.names.append((message["channel"], reply.name))
        verb, steps = plan(message, reply.name)
        if verb == "post":
            layer.loop.call_soon(carry_out, layer, reply, steps)
        else:
            carry_out(layer, reply, steps)
        if verb == "stale":
            self.stale.set()
            self.release.wait(TIMEOUT)

    async def asynchronous(self, message: dict[str, Any], channels: dict[str, Any]) -> None:
        reply = channels["reply"]
        self.names.append((message["channel"], reply.name))
        if message.get("path") == "/publish":  # the body comes through channels['body']
            message = {**message, "content": await read_body(channels)}
        verb, steps = plan(message, reply.name)
        for step in steps:
            if "reply" in step:
                await reply.send(step["reply"])
            else:
                await channels["groups"].send(step)
        if verb == "stale":
            self.stale.set()
            await asyncio.to_thread(self.release.wait, TIMEOUT)


async def read_body(channels: dict[str, Any]) -> bytes:
    body = b""
    while True:
        chunk = await channels["body"].receive()
        body += chunk["content"]
        if not chunk["more_content"]:
            return body


def carry_out(layer: Any, reply: Any, steps: list[dict[str, Any]]) -> None:
    """The steps of `plan` through the groups methods of the sync form's channel layer."""
    for step in steps:
        if "reply" in step:
            reply.send(step["reply"])
        elif "add" in step:
            layer.group_add(step["group"], step["add"])
        elif "discard" in step:
            layer.group_discard(step["group"], step["discard"])
        else:
            layer.send_group(step["group"], step["send"])


class Served:
    """An ASGI app serving a `Commands` consumer of `shape` through one `ConsumerMiddleware`,
    counting the requests and connections it finished serving (so that its groups are looked
    at once they are done)."""

    def __init__(self, commands: Commands, shape: str) -> None:
        self.commands = commands
        consumer = commands.sync if shape == "sync" else commands.asynchronous
        self.middleware = ConsumerMiddleware(consumer, asynchronous=shape == "async")
        self.finished = 0
        self._cond = threading.Condition()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await self.middleware(scope, receive, send)
        finally:
            with self._cond:
                self.finished += 1
                self._cond.notify_all()

    def wait_finished(self, count: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.finished >= count, TIMEOUT)

    @property
    def groups(self) -> dict[str, list[str]]:
        return self.middleware.groups.snapshot()


def answered(ws: Any, *expected: str) -> None:
    assert [ws.recv(timeout=TIMEOUT) for _ in expected] == list(expected)


# Reply channel names and membership


@pytest.mark.parametrize("shape", SHAPES)
def test_reply_channel_names(shape, serve_one) -> None:
    commands = Commands()
    served = Served(commands, shape)
    with serve_one(served) as srv:
        for _ in range(2):
            with client(ws_url(srv)) as ws:
                ws.send("join g")
                answered(ws, "ok join")
        assert httpx.post(f"{srv.url}/publish", timeout=TIMEOUT).text == "ok"
        served.wait_finished(3)
    channels: dict[str, list[str]] = {}
    for channel, name in commands.names:
        channels.setdefault(name, []).append(channel)
    websocket = ["websocket.connect", "websocket.receive", "websocket.disconnect"]
    assert sorted(channels.values()) == [["http.request"], websocket, websocket]
    assert all(re.fullmatch(r"reply\.[0-9a-f]{24}", name) for name in channels)


@pytest.mark.parametrize("shape", SHAPES)
def test_discard_stops_delivery(shape, serve_one) -> None:
    served = Served(Commands(), shape)
    with serve_one(served) as srv, client(ws_url(srv)) as one, client(ws_url(srv)) as two:
        for ws in (one, two):
            ws.send("join g")
            answered(ws, "ok join")
        two.send("say g first")
        answered(two, "first", "ok say")
        answered(one, "first")
        one.send("leave g")
        answered(one, "ok leave")
        assert served.groups == {"g": [served_name(served, 1)]}
        two.send("say g second")
        answered(two, "second", "ok say")
        one.send("leave g")  # not a member: nothing to do
        answered(one, "ok leave")  # and "second" never came before it
        two.send("leave g")
        answered(two, "ok leave")
        assert served.groups == {}  # a group without members is gone


def served_name(served: Served, number: int) -> str:
    """The reply channel name of the `number`th request or connection served (from 0)."""
    firsts = ("http.request", "websocket.connect")
    return [name for channel, name in served.commands.names if channel in firsts][number]


@pytest.mark.parametrize("shape", SHAPES)
def test_sending_to_an_unknown_or_emptied_group(shape, serve_one) -> None:
    served = Served(Commands(), shape)
    with serve_one(served) as srv, client(ws_url(srv, "/?g")) as ws:
        ws.send("say nobody hello")
        answered(ws, "ok say")
        ws.send("leave g")
        answered(ws, "ok leave")
        ws.send("say g hello")
        answered(ws, "ok say")
        ws.send("add g reply.000000000000000000000000")  # no such reply channel: ignored
        answered(ws, "ok add")
    assert served.groups == {}


@pytest.mark.parametrize("shape", SHAPES)
def test_a_departed_websocket_leaves_its_groups(shape, serve_one) -> None:
    """No `leave`: the connection's end takes its reply channel out of every group."""
    served = Served(Commands(), shape)
    with serve_one(served) as srv, client(ws_url(srv, "/?a")) as staying:
        with client(ws_url(srv, "/?a")) as leaving:
            for ws in (leaving, staying):
                ws.send("join b")
                answered(ws, "ok join")
        served.wait_finished(1)
        me = served_name(served, 0)
        assert served.groups == {"a": [me], "b": [me]}
        staying.send("leave b")
        answered(staying, "ok leave")
        staying.send("say a still here")
        answered(staying, "still here", "ok say")
        assert served.groups == {"a": [me]}
    served.wait_finished(2)
    assert served.groups == {}
    assert not served.middleware.groups.joined(served_name(served, 1))


# HTTP reply channels as members


@pytest.mark.parametrize("shape", SHAPES)
def test_an_http_response_fed_by_its_group(shape, serve_one) -> None:
    """A consumer that joins a group and returns with its response started: the response
    stays open to the group's messages until one completes it."""
    served = Served(Commands(), shape)
    with serve_one(served) as srv:
        with httpx.stream("GET", f"{srv.url}/listen?news", timeout=TIMEOUT) as response:
            lines = response.iter_lines()
            assert next(lines) == "listening"
            for text in ("one\n", "two\n", "end\n"):
                url = f"{srv.url}/publish?news"
                assert httpx.post(url, content=text, timeout=TIMEOUT).text == "ok"
            assert list(lines) == ["one", "two", "end"]
        served.wait_finished(4)
        assert served.groups == {}


@pytest.mark.parametrize("shape", SHAPES)
def test_an_http_listener_that_leaves(shape, serve_one) -> None:
    served = Served(Commands(), shape)
    with serve_one(served) as srv:
        with httpx.stream("GET", f"{srv.url}/listen?news", timeout=TIMEOUT) as response:
            lines = response.iter_lines()  # kept: dropping it would close the connection
            assert next(lines) == "listening"
            assert served.groups == {"news": [served_name(served, 0)]}
        served.wait_finished(1)  # closed mid-response: the client is gone
        assert served.groups == {}


def test_an_async_listener_leaving_its_body_unread(serve_one) -> None:
    served = Served(Commands(), "async")
    with serve_one(served) as srv, srv.connect() as sock:
        head = b"POST /listen?news HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n"
        sock.sendall(head + b"Connection: close\r\n\r\nabc")
        data = b""
        while b"listening\n" not in data:
            data += sock.recv(65536)
        sock.sendall(b"def")  # read and dropped after the consumer returned
        httpx.post(f"{srv.url}/publish?news", content=b"end\n", timeout=TIMEOUT)
        data += recv_until_closed(sock)
    assert data.endswith(b"4\r\nend\n\r\n0\r\n\r\n")
    served.wait_finished(2)
    assert served.groups == {}


# Failures


@pytest.mark.parametrize(("shape", "verb"), [("async", "say"), ("sync", "say"), ("sync", "post")])
def test_a_failing_member_does_not_stop_the_others(shape, verb, serve_one) -> None:
    """A `/stale` request is a member whose response is complete: it cannot take the message,
    leaves the group (logged at debug) and the members after it still get the message."""
    commands = Commands()
    served = Served(commands, shape)
    with serve_one(served) as srv, client(ws_url(srv, "/?g")) as first:
        assert httpx.get(f"{srv.url}/stale?g", timeout=TIMEOUT).text == "stale"
        assert commands.stale.wait(TIMEOUT)
        with client(ws_url(srv, "/?g")) as last:
            assert len(served.groups["g"]) == 3
            last.send(f"{verb} g hello")
            answered(last, "hello", f"ok {verb}")
            answered(first, "hello")
            assert served.groups == {"g": [served_name(served, 0), served_name(served, 2)]}
        commands.release.set()
    stale = served_name(served, 1)
    dropped = [m for m in srv.messages() if m.startswith(f"Group message not sent to {stale}")]
    assert "after the response was complete" in dropped[0]


def test_a_group_message_the_server_rejects_from_the_loop(serve_one) -> None:
    """Queued from the loop, a message the server refuses (close code 1005) fails each member
    as its own queued reply would, and takes it out of its groups."""

    def consumer(message):
        layer = message["channel_layer"]
        if message["channel"] == "websocket.connect":
            layer.group_add("g", message["reply_channel"].name)
        elif message["channel"] == "websocket.receive":
            layer.loop.call_soon(layer.send_group, "g", {"text": "last", "close": 1005})

    with (
        serve_one(consumer, interface="consumer") as srv,
        client(ws_url(srv)) as one,
        client(ws_url(srv)) as two,
    ):
        one.send("go")
        for ws in (one, two):
            answered(ws, "last")
            assert closed_code(ws) == 1011
    dropped = [m for m in srv.messages() if m.startswith("Group message not sent to")]
    assert len(dropped) == 2 and "1005" in dropped[0]


def test_invalid_group_commands(serve_one) -> None:
    async def consumer(message, channels):
        if message["channel"] == "websocket.receive":
            try:
                await channels["groups"].send(json.loads(message["text"]))
            except (TypeError, ValueError) as exc:
                await channels["reply"].send({"text": f"{type(exc).__name__}: {exc}"})

    bad = {
        '{"group": "g"}': "ValueError: A groups message has 'group' and one of",
        '{"add": "x"}': "ValueError",
        '{"group": "g", "add": "x", "send": {}}': "ValueError",
        '{"group": "g", "publish": {}}': "ValueError",
        '{"group": 1, "add": "x"}': "TypeError: Group and reply channel names are str, not int",
        '{"group": "g", "discard": null}': "TypeError",
        '{"group": ["g"], "send": {}}': "TypeError",
        '{"group": "g", "send": "text"}': "TypeError: A group message is a dict, not str",
    }
    with serve_one(consumer) as srv, client(ws_url(srv)) as ws:
        for command, error in bad.items():
            ws.send(command)
            assert ws.recv(timeout=TIMEOUT).startswith(error)


def test_group_methods_do_not_defer_the_handshake(serve_one) -> None:
    """A sync consumer that only joins a group on connect is accepted when it returns (reading
    `channel_layer.loop` would have left the answer to deferred work instead)."""
    served = Served(Commands(), "sync")
    with serve_one(served) as srv, client(ws_url(srv, "/?g")) as ws:
        ws.send("post g queued")  # on the loop: the group's message, then the answer
        answered(ws, "queued", "ok post")
        assert served.groups == {"g": [served_name(served, 0)]}
