"""The ASGI lifespan protocol under `--lifespan auto|on|off`."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading

import httpx
import pytest

from fulmen import Config, Server
from tests.conftest import TIMEOUT
from tests.helpers import messages, record_logs, run_fulmen


def lifespan_app(events: list[str], *, on_startup=None, shutdown_message=None, started=None):
    """An app recording lifespan and request events; `on_startup(state)` runs at startup and
    `started` (a threading.Event) is set when a request begins."""

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            assert scope["asgi"] == {"version": "3.0", "spec_version": "2.0"}
            assert (await receive())["type"] == "lifespan.startup"
            events.append("startup")
            if on_startup is not None:
                on_startup(scope["state"])
            await send({"type": "lifespan.startup.complete"})
            assert (await receive())["type"] == "lifespan.shutdown"
            events.append("shutdown")
            await send(shutdown_message or {"type": "lifespan.shutdown.complete"})
            return
        events.append("request start")
        if started is not None:
            started.set()
        await asyncio.sleep(0.2)  # still running when the server is told to stop
        events.append("request end")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})

    return app


@pytest.mark.parametrize("mode", ["on", "auto"])
def test_startup_before_serving_and_shutdown_after_last_request(mode, serve, monkeypatch) -> None:
    events: list[str] = []
    responses: list[httpx.Response] = []
    started = threading.Event()
    app = lifespan_app(events, started=started)
    with record_logs(monkeypatch) as logs, serve(app, lifespan=mode) as srv:
        assert events == ["startup"]
        client = threading.Thread(
            target=lambda: responses.append(httpx.get(srv.url, timeout=TIMEOUT))
        )
        client.start()
        assert started.wait(TIMEOUT)
        srv.server.should_exit = True
        client.join(TIMEOUT)
    assert [r.text for r in responses] == ["done"]
    assert events == ["startup", "request start", "request end", "shutdown"]
    lines = messages(logs)
    order = [
        "Waiting for application startup.",
        "Application startup complete.",
        "Shutting down",
        "Waiting for application shutdown.",
        "Application shutdown complete.",
    ]
    assert [line for line in lines if line in order] == order


def test_lifespan_off_never_runs_it(serve_one) -> None:
    events: list[str] = []
    with serve_one(lifespan_app(events), lifespan="off") as srv:
        assert httpx.get(srv.url, timeout=TIMEOUT).text == "done"
    assert events == ["request start", "request end"]


def test_state_is_shallow_copied_into_each_request(serve_one) -> None:
    def on_startup(state):
        state["db"] = "connection"
        state["hits"] = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await lifespan_app([], on_startup=on_startup)(scope, receive, send)
            return
        state = scope["state"]
        seen = {"keys": sorted(state), "db": state["db"], "hits": len(state["hits"])}
        state["hits"].append(scope["path"])  # shared: the copy is shallow
        state["local"] = scope["path"]  # not shared: each request has its own copy
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps(seen).encode()})

    with serve_one(app, lifespan="on") as srv, httpx.Client(timeout=TIMEOUT) as client:
        first = client.get(srv.url + "/a").json()
        second = client.get(srv.url + "/b").json()
    assert first == {"keys": ["db", "hits"], "db": "connection", "hits": 0}
    assert second == {"keys": ["db", "hits"], "db": "connection", "hits": 1}


async def no_lifespan(scope, receive, send):
    if scope["type"] != "http":
        raise RuntimeError(f"unsupported scope {scope['type']}")
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"served"})


def test_unsupported_lifespan_under_auto_keeps_serving(serve_one, monkeypatch) -> None:
    with record_logs(monkeypatch) as logs, serve_one(no_lifespan, lifespan="auto") as srv:
        assert httpx.get(srv.url, timeout=TIMEOUT).text == "served"
    lines = messages(logs)
    assert "ASGI 'lifespan' protocol appears unsupported." in lines
    assert "Application startup complete." not in lines
    assert "Waiting for application shutdown." not in lines
    assert not [r for r in logs.records if r.levelname == "ERROR"]


async def startup_fails(scope, receive, send):
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "database unreachable"})


async def fails_then_raises(scope, receive, send):
    await receive()
    await send({"type": "lifespan.startup.failed", "message": "database unreachable"})
    raise RuntimeError("already reported")


async def fails_silently(scope, receive, send):
    await receive()
    await send({"type": "lifespan.startup.failed"})


async def sends_bogus(scope, receive, send):
    await receive()
    await send({"type": "lifespan.bogus"})


def run_to_completion(app, monkeypatch, **options):
    """Serve in this thread's own loop until `serve()` returns: (server, log handler, refused)."""
    with socket.socket() as sock, record_logs(monkeypatch) as logs:
        sock.bind(("127.0.0.1", 0))
        server = Server(Config(app, log_level="debug", **options))
        asyncio.run(asyncio.wait_for(server.serve(sockets=[sock]), TIMEOUT))
        try:
            socket.create_connection(sock.getsockname(), timeout=TIMEOUT).close()
        except ConnectionRefusedError:
            refused = True
        else:
            refused = False
    return server, logs, refused


@pytest.mark.parametrize(
    ("app", "mode", "error"),
    [
        (startup_fails, "auto", "database unreachable"),
        (startup_fails, "on", "database unreachable"),
        (no_lifespan, "on", "Exception in 'lifespan' protocol"),
        (sends_bogus, "on", "Exception in 'lifespan' protocol"),
    ],
)
def test_startup_failure_never_serves(app, mode, error, monkeypatch) -> None:
    server, logs, refused = run_to_completion(app, monkeypatch, lifespan=mode)
    lines = messages(logs)
    assert not server.started
    assert refused
    assert error in lines
    assert lines.index(error) < lines.index("Application startup failed. Exiting.")


@pytest.mark.parametrize(
    ("app", "errors"),
    [
        # The failure was reported; the exception that follows adds nothing.
        (fails_then_raises, ["database unreachable"]),
        (fails_silently, []),
    ],
)
def test_startup_failure_reported_once(app, errors, monkeypatch) -> None:
    server, logs, refused = run_to_completion(app, monkeypatch, lifespan="auto")
    assert not server.started and refused
    assert messages(logs, logging.ERROR) == [*errors, "Application startup failed. Exiting."]


def test_lifespan_exception_is_logged_with_traceback(monkeypatch) -> None:
    with socket.socket() as sock, record_logs(monkeypatch) as logs:
        sock.bind(("127.0.0.1", 0))
        server = Server(Config(sends_bogus, lifespan="on"))
        asyncio.run(asyncio.wait_for(server.serve(sockets=[sock]), TIMEOUT))
    [record] = [r for r in logs.records if r.getMessage() == "Exception in 'lifespan' protocol"]
    assert isinstance(record.exc_info[1], RuntimeError)
    assert "Unexpected lifespan message 'lifespan.bogus'" in str(record.exc_info[1])


@pytest.mark.parametrize(
    ("app", "mode", "message"),
    [
        ("tests.apps:startup_fails", "auto", "ERROR:    database unreachable"),
        ("tests.apps:startup_raises", "on", "ERROR:    Exception in 'lifespan' protocol"),
    ],
)
def test_startup_failure_exits_with_status_3(app, mode, message) -> None:
    result = run_fulmen(app, "--port", "0", "--lifespan", mode)
    assert result.returncode == 3
    assert message in result.stderr.splitlines()
    assert "ERROR:    Application startup failed. Exiting." in result.stderr.splitlines()
    assert "Fulmen running on" not in result.stderr


@pytest.mark.parametrize(
    ("shutdown_message", "errors"),
    [
        ({"type": "lifespan.shutdown.failed", "message": "flush failed"}, ["flush failed"]),
        ({"type": "lifespan.shutdown.failed"}, []),
        ({"type": "lifespan.bogus"}, ["Exception in 'lifespan' protocol"]),
    ],
)
def test_shutdown_failure_is_logged(shutdown_message, errors, serve_one, monkeypatch) -> None:
    events: list[str] = []
    app = lifespan_app(events, shutdown_message=shutdown_message)
    with record_logs(monkeypatch) as logs, serve_one(app, lifespan="on"):
        pass
    assert events == ["startup", "shutdown"]
    logged = [r.getMessage() for r in logs.records if r.levelname == "ERROR"]
    assert logged == [*errors, "Application shutdown failed. Exiting."]
    assert "Application shutdown complete." not in messages(logs)


def test_app_returning_after_startup_skips_shutdown(serve_one, monkeypatch) -> None:
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.complete"})
            return
        await no_lifespan(scope, receive, send)

    with record_logs(monkeypatch) as logs, serve_one(app, lifespan="on") as srv:
        assert httpx.get(srv.url, timeout=TIMEOUT).text == "served"
    lines = messages(logs)
    assert "Application startup complete." in lines
    assert "Waiting for application shutdown." not in lines
