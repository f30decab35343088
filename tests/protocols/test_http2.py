"""HTTP/2 streams over the shared request cycle (RFC 9113), with h2's client over real sockets:
prior knowledge, scopes, bodies both ways, flow control, and per-stream failures."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.errors
import h2.events
import httpx
import pytest

from tests.protocols.h2client import H2Client, connect
from tests.test_metrics import _metrics_url

pytestmark = pytest.mark.timeout(60)


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """Echoes the request body; the scope's facts in headers."""
    assert scope["type"] == "http"
    body = b""
    while True:
        message = await receive()
        assert message["type"] == "http.request"
        body += message["body"]
        if not message["more_body"]:
            break
    headers = dict(scope["headers"])
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"x-version", scope["http_version"].encode()),
                (b"x-method", scope["method"].encode()),
                (b"x-path", scope["path"].encode()),
                (b"x-query", scope["query_string"]),
                (b"x-host", headers.get(b"host", b"-")),
                (b"x-cookie", headers.get(b"cookie", b"-")),
                (b"x-scheme", scope["scheme"].encode()),
                (b"x-extensions", ",".join(sorted(scope["extensions"])).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def test_prior_knowledge_get(serve) -> None:
    with serve(echo) as srv:
        client = connect(srv.port)
        response = client.get("/a%20b?x=1", headers=[(b"cookie", b"a=1"), (b"cookie", b"b=2")])
    assert response.status == 200
    fields = response.fields
    assert fields[b"x-version"] == b"2"
    assert fields[b"x-method"] == b"GET"
    assert fields[b"x-path"] == b"/a b"
    assert fields[b"x-query"] == b"x=1"
    assert fields[b"x-host"] == b"test"  # :authority, as the host header
    assert fields[b"x-cookie"] == b"a=1; b=2"  # RFC 9113 §8.2.3
    assert fields[b"x-scheme"] == b"http"
    assert fields[b"x-extensions"] == (
        b"http.response.early_hint,http.response.pathsend,http.response.zerocopysend"
    )
    assert fields[b"content-length"] == b"0"
    assert fields[b"server"] == b"fulmen"
    assert b"date" in fields
    assert response.body == b""
    assert any(m.endswith('"GET /a b?x=1 HTTP/2" 200 OK') for m in srv.messages())


def test_get_without_body_gets_its_request_message_at_once(serve_one) -> None:
    """A framework awaiting receive() on a GET gets `more_body: False` at once."""
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(await asyncio.wait_for(receive(), 5))
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})

    with serve_one(app) as srv:
        response = connect(srv.port).get()
    assert response.status == 204
    assert seen == [{"type": "http.request", "body": b"", "more_body": False}]


def test_many_streams_on_one_connection(serve) -> None:
    with serve(echo) as srv:
        client = connect(srv.port)
        streams = [client.request(f"/{n}", method="POST", body=b"x" * n) for n in range(1, 40)]
        responses = [client.response(stream) for stream in streams]
    assert [len(r.body) for r in responses] == list(range(1, 40))
    assert [r.fields[b"x-path"] for r in responses] == [b"/%d" % n for n in range(1, 40)]


def test_large_request_body_is_credited_as_the_app_reads(serve_one) -> None:
    """1 MiB through a 64 KiB stream window: WINDOW_UPDATE follows the app's reads."""
    body = bytes(range(256)) * 4096
    with serve_one(echo) as srv:
        client = connect(srv.port)
        response = client.response(client.request("/", method="POST", body=body))
    assert response.status == 200
    assert response.body == body


def test_large_response_waits_for_window_and_others_go_on(serve_one) -> None:
    """A stream whose client grants no window holds up no other stream."""
    big = b"y" * 300_000

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        if scope["path"] == "/big":
            for offset in range(0, len(big), 50_000):
                await send(
                    {
                        "type": "http.response.body",
                        "body": big[offset : offset + 50_000],
                        "more_body": True,
                    }
                )
        await send({"type": "http.response.body", "body": b"small"})

    with serve_one(app) as srv:
        client = connect(srv.port, auto_ack=False)
        slow = client.request("/big")
        assert client.until(lambda: len(client.responses[slow].body) >= 65535)
        assert len(client.responses[slow].body) == 65535  # the initial window, no more
        # The connection window is spent too, by our own rule of not acking: credit the
        # connection (not the stream) and a second stream is served while the first waits.
        client.conn.increment_flow_control_window(1 << 20)
        client.flush()
        fast = client.response(client.request("/small"))
        assert fast.body == b"small"
        assert len(client.responses[slow].body) == 65535
        client.conn.increment_flow_control_window(len(big) + 10, stream_id=slow)
        client.flush()
        done = client.response(slow)
    assert done.body == big + b"small"


def test_data_frames_fit_the_peer_frame_size(serve_one) -> None:
    big = b"z" * 100_000

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": big})

    with serve_one(app) as srv:
        client = connect(srv.port)
        response = client.get()
    assert response.body == big
    sizes = [len(e.data) for e in client.events if isinstance(e, h2.events.DataReceived)]
    assert max(sizes) <= 16384


@pytest.mark.parametrize(
    "block",
    [
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"Upper", b"x")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"connection", b"close")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"te", b"gzip")],
        [(b":method", b"GET"), (b":scheme", b"http")],
        [(b":method", b"GET"), (b"x", b"1"), (b":scheme", b"http"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":status", b"200")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"a")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"x", b" padded")],
        [(b":scheme", b"http"), (b":path", b"/")],
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b":protocol", b"ws")],
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b"host", b"a"),
            (b"host", b"a"),
        ],
        [(b":method", b"CONNECT"), (b":authority", b"a:443"), (b":path", b"/")],
        [
            (b":method", b"CONNECT"),
            (b":protocol", b"websocket"),
            (b":scheme", b"http"),
            (b":path", b"/"),
        ],
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":path", b"/"),
            (b":authority", b"a"),
            (b"host", b"b"),
        ],
    ],
)
def test_malformed_request_resets_its_stream_only(serve_one, block) -> None:
    with serve_one(echo) as srv:
        client = connect(srv.port)
        client.send_headers(1, block, end_stream=True)
        bad = client.response(1)
        good = client.get("/ok")
    assert bad.reset == h2.errors.ErrorCodes.PROTOCOL_ERROR
    assert good.status == 200
    assert not any(r.exc_info for r in srv.records)


def test_app_error_before_head_is_500_and_after_is_a_reset(serve_one) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/late":
            await send({"type": "http.response.start", "status": 200})
            await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise RuntimeError("boom")

    with serve_one(app) as srv:
        client = connect(srv.port)
        early = client.get("/early")
        late = client.get("/late")
        again = client.get("/early")
    assert early.status == 500
    assert early.body == b"Internal Server Error"
    assert late.status == 200 and late.reset == h2.errors.ErrorCodes.INTERNAL_ERROR
    assert again.status == 500  # the connection went on
    assert sum("Exception in ASGI application" in m for m in srv.messages()) == 3


@pytest.mark.parametrize(("method", "status"), [("HEAD", 200), ("GET", 204), ("GET", 304)])
def test_no_data_frames_for_head_204_304(serve_one, method, status) -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = [(b"content-length", b"10")]  # dropped on a 204 (RFC 9110 §8.6)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"ignored", "more_body": True})
        await send({"type": "http.response.body", "body": b"too"})

    with serve_one(app) as srv:
        client = connect(srv.port)
        response = client.get(method=method)
    assert response.status == status
    assert response.body == b""
    assert response.fields.get(b"content-length") == (None if status == 204 else b"10")
    assert not any(isinstance(e, h2.events.DataReceived) for e in client.events)


def trailing(trailers: list[tuple[bytes, bytes]], hints: tuple[bytes, ...] = ()) -> Any:
    """An app answering `data` with these trailers, after these early hints."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        assert "http.response.trailers" in scope["extensions"]
        if hints:
            await send({"type": "http.response.early_hint", "links": list(hints)})
        await send({"type": "http.response.start", "status": 200, "trailers": True})
        await send({"type": "http.response.body", "body": b"data"})
        await send({"type": "http.response.trailers", "headers": trailers})

    return app


def test_trailers_and_early_hints(serve_one) -> None:
    app = trailing([(b"x-sum", b"42")], (b"</a.css>; rel=preload",))
    with serve_one(app) as srv:
        client = connect(srv.port)
        response = client.get(headers=[(b"te", b"trailers")])
    assert response.informational == [[(b":status", b"103"), (b"link", b"</a.css>; rel=preload")]]
    assert response.body == b"data"
    assert response.trailers == [(b"x-sum", b"42")]


def test_client_reset_is_a_disconnect_for_the_app(serve_one) -> None:
    seen: list[str] = []
    done = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/wait":
            for _ in range(3):  # the body (unless the reset came first), then the disconnect
                message = await receive()
                if message["type"] == "http.disconnect":
                    break
                assert message == {"type": "http.request", "body": b"x", "more_body": True}
            seen.append(message["type"])
            done.set()
            return
        await asyncio.wait_for(done.wait(), 5)
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": str(seen).encode()})

    with serve_one(app) as srv:
        client = connect(srv.port)
        stream = client.request("/wait", method="POST", body=b"x", end=False)
        client.conn.reset_stream(stream, h2.errors.ErrorCodes.CANCEL)
        client.flush()
        after = client.get("/after")
    assert after.body == b"['http.disconnect']"


def test_request_body_over_the_limit_is_413(serve_one) -> None:
    with serve_one(echo, limit_request_body=1000) as srv:
        client = connect(srv.port)
        response = client.response(client.request("/", method="POST", body=b"x" * 5000))
        again = client.get()
    assert response.status == 413
    assert again.status == 200


def test_invalid_preface_gets_goaway_protocol_error(serve_one) -> None:
    with serve_one(echo) as srv:
        client = H2Client(srv.connect(), preface=False)
        client.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n")
        client.conn.initiate_connection()  # the client side, to read the server's frames
        client.conn.data_to_send()
        client.until(lambda: client.goaway is not None)
    assert client.goaway is not None
    assert client.goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR


def test_graceful_shutdown_sends_goaway_and_finishes_the_stream(serve_one) -> None:
    release = asyncio.Event()
    loop_box: list[asyncio.AbstractEventLoop] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        loop_box.append(asyncio.get_running_loop())
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"un", "more_body": True})
        await asyncio.wait_for(release.wait(), 10)
        await send({"type": "http.response.body", "body": b"finished"})

    with serve_one(app) as srv:
        client = connect(srv.port)
        stream = client.request("/")
        assert client.until(lambda: client.responses[stream].status == 200)
        srv.server.should_exit = True
        # First a GOAWAY naming no stream yet (2^31-1), then, once the client has answered
        # the PING that came with it, the final one naming the last stream served.
        assert client.until(lambda: client.goaway is not None)
        assert client.goaway.last_stream_id == 2**31 - 1
        assert client.until(lambda: client.goaway.last_stream_id != 2**31 - 1)
        assert client.goaway.error_code == 0
        assert client.goaway.last_stream_id == stream
        loop_box[0].call_soon_threadsafe(release.set)
        response = client.response(stream)
        assert response.body == b"unfinished"
        assert client.until(lambda: client.closed)


def test_idle_connection_closes_after_keep_alive(serve_one) -> None:
    with serve_one(echo, timeout_keep_alive=1) as srv:
        client = connect(srv.port)
        assert client.get().status == 200
        assert client.until(lambda: client.goaway is not None, timeout=5)
        assert client.until(lambda: client.closed, timeout=5)


def test_no_http2_serves_http1_only(serve_one) -> None:
    with serve_one(echo, http2=False) as srv:
        sock = srv.connect()
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        data = sock.recv(1024)
        sock.close()
    assert data.startswith(b"HTTP/1.1 4")


def test_preface_split_across_packets(serve_one) -> None:
    with serve_one(echo) as srv:
        client = H2Client(srv.connect(), preface=False)
        client.conn.initiate_connection()
        data = client.conn.data_to_send()
        client.sock.sendall(data[:2])
        # Too few bytes to tell HTTP/1.1 from HTTP/2: the server waits, and says nothing.
        assert not client.until(lambda: client.closed or bool(client.events), timeout=0.2)
        client.sock.sendall(data[2:])
        response = client.get()
    assert response.status == 200


def test_proxy_headers_and_root_path(serve_one) -> None:
    seen: list[dict[str, Any]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(scope)
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body"})

    with serve_one(app, forwarded_allow_ips="127.0.0.1", root_path="/api") as srv:
        headers = [(b"x-forwarded-for", b"203.0.113.9"), (b"x-forwarded-proto", b"https")]
        assert connect(srv.port).get("/items", headers=headers).status == 204
    scope = seen[0]
    assert scope["client"] == ("203.0.113.9", 0)
    assert scope["scheme"] == "https"
    assert scope["root_path"] == "/api"
    assert scope["path"] == "/api/items"


def test_metrics_and_message_logger_see_h2_requests(serve_one) -> None:
    with serve_one(echo, metrics_bind="127.0.0.1:0", log_level="trace") as srv:
        client = connect(srv.port)
        for _ in range(3):
            assert client.get("/m").status == 200
        text = httpx.get(_metrics_url(srv), timeout=10).text
    assert 'fulmen_requests_total{status="200"} 3' in text
    traced = [m for m in srv.messages(0) if " - ASGI [" in m]  # TRACE is below DEBUG
    assert any("'http_version': '2'" in m for m in traced)
    assert sum(m.endswith("Completed") for m in traced) == 3


def test_response_fields_http2_forbids_are_fixed_or_dropped(serve_one) -> None:
    """Edge whitespace is stripped (RFC 9113 §8.2.1) and `te` dropped (§8.2.2): an h2 client
    would otherwise end the whole connection."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.early_hint", "links": [b" </a.css>; rel=preload "]})
        headers = [(b"x-a", b"v "), (b"x-b", b"\tw"), (b"te", b"gzip"), (b"keep-alive", b"5")]
        await send(
            {"type": "http.response.start", "status": 200, "headers": headers, "trailers": True}
        )
        await send({"type": "http.response.body", "body": b"x"})
        await send({"type": "http.response.trailers", "headers": [(b"x-t", b" t ")]})

    with serve_one(app) as srv:
        client = connect(srv.port)
        response = client.get(headers=[(b"te", b"trailers")])
        assert client.get(headers=[(b"te", b"trailers")]).status == 200  # the connection went on
    fields = response.fields
    assert (fields[b"x-a"], fields[b"x-b"]) == (b"v", b"w")
    assert b"te" not in fields and b"keep-alive" not in fields
    assert response.informational[0][1] == (b"link", b"</a.css>; rel=preload")
    assert response.trailers == [(b"x-t", b"t")]


def test_limit_concurrency_counts_streams(serve_one) -> None:
    release = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["path"] == "/wait":
            await asyncio.wait_for(release.wait(), 5)
        await send({"type": "http.response.start", "status": 200})
        await send({"type": "http.response.body", "body": b"done"})

    with serve_one(app, limit_concurrency=1) as srv:
        client = connect(srv.port)
        waiting = client.request("/wait")
        busy = client.get("/now")
        loop = srv.server.state.loop
        loop.call_soon_threadsafe(release.set)
        assert client.response(waiting).body == b"done"
        after = client.get("/now")
    assert busy.status == 503
    assert after.status == 200


def test_plain_connect_expect_continue_and_own_server_header(serve_one) -> None:
    seen: list[tuple[str, str]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["method"], scope["path"]))
        message = await receive()  # asks for the body: 100 Continue first
        headers = [(b"server", b"mine")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": message.get("body", b"")})

    with serve_one(app) as srv:
        client = connect(srv.port)
        tunnel = client.conn.get_next_available_stream_id()
        client.send_headers(tunnel, [(b":method", b"CONNECT"), (b":authority", b"a:443")], True)
        connected = client.response(tunnel)
        stream = client.request(
            "/c", method="POST", headers=[(b"expect", b"100-continue")], end=False
        )
        assert client.until(lambda: bool(client.responses[stream].informational))
        client.send_body(stream, b"after 100")
        continued = client.response(stream)
    assert seen == [("CONNECT", ""), ("POST", "/c")]
    assert connected.fields[b"server"] == b"mine"
    assert continued.informational == [[(b":status", b"100")]]
    assert continued.body == b"after 100"


def test_forbidden_trailer_resets_the_stream(serve_one) -> None:
    with serve_one(trailing([(b"content-length", b"4")])) as srv:
        client = connect(srv.port)
        response = client.get(headers=[(b"te", b"trailers")])
        assert client.get(headers=[(b"te", b"trailers")]).reset is not None  # and again
    assert response.body == b"data"
    assert response.reset == h2.errors.ErrorCodes.INTERNAL_ERROR


def test_padded_data_is_credited(serve_one) -> None:
    """Padding counts against flow control and never reaches the app: 200 KB in padded
    frames, through 64 KiB windows."""
    with serve_one(echo) as srv:
        client = connect(srv.port)
        stream = client.request("/", method="POST", end=False)
        sent = b""
        for n in range(100):
            chunk = bytes([n]) * 2000
            while client.conn.local_flow_control_window(stream) < 2256:  # 1 + 255 + 2000
                assert client.read_once(), "no window credit came back"
            client.conn.send_data(stream, chunk, pad_length=255)
            client.flush()
            sent += chunk
        client.conn.end_stream(stream)
        client.flush()
        response = client.response(stream)
    assert response.body == sent
