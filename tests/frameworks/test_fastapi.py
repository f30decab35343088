"""FastAPI under fulmen: async and plain `def` routes, `yield` dependencies, background tasks,
timeouts in routes, request bodies, streaming, WebSockets, lifespan and the error page, in
process on both loops and in real processes (gunicorn's FulmenWorker and `fulmen --workers`)
(tests/frameworks/apps_fastapi.py)."""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
import uuid

import httpx
import pytest

from tests.conftest import TIMEOUT
from tests.frameworks import apps_fastapi
from tests.frameworks.apps_fastapi import app
from tests.frameworks.conftest import APP_ERROR, ServeApp, check_websocket_echo
from tests.helpers import Fulmen, Gunicorn
from tests.test_workers import ready_pids

APP = "tests.frameworks.apps_fastapi:app"


def test_async_route_runs_in_a_task(serve_app: ServeApp) -> None:
    with serve_app(app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        for _ in range(3):
            response = client.get("/async")
            assert response.status_code == 200
            assert response.json()["task"] is True


def test_def_route_runs_in_anyio_worker_thread(serve_app: ServeApp) -> None:
    """Regression: a plain `def` route raised anyio's NoEventLoopError when the request's first
    step ran outside a Task."""
    with serve_app(app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        loop_thread = client.get("/async").json()["thread"]
        for _ in range(3):
            response = client.get("/sync")
            assert response.status_code == 200
            assert response.json()["thread"] != loop_thread
    assert APP_ERROR not in srv.messages()


def test_yield_dependency_teardown_runs(serve_app: ServeApp) -> None:
    token = uuid.uuid4().hex
    with serve_app(app) as srv:
        response = httpx.get(f"{srv.url}/dependency", params={"token": token}, timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.json() == {"value": f"resource {token}"}
        assert apps_fastapi.TEARDOWN[token].wait(TIMEOUT), "the dependency's teardown did not run"


def test_background_task_runs_after_the_response(serve_app: ServeApp) -> None:
    token = uuid.uuid4().hex
    with serve_app(app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        response = client.get("/background", params={"token": token})
        assert response.status_code == 200
        assert response.json() == {"queued": token}
        # The task waits for this: had the response waited for the task, we would not be here.
        apps_fastapi.RELEASE[token].set()
        assert apps_fastapi.BACKGROUND[token].wait(TIMEOUT), "the background task did not run"
        assert client.get(f"/background/{token}").json() == {"done": True, "released": True}


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout is new in Python 3.11")
def test_asyncio_timeout_in_a_route(serve_app: ServeApp) -> None:
    """Regression: `async with asyncio.timeout(...)` raised "Timeout should be used inside a
    task" when the request's first step ran outside a Task."""
    with serve_app(app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        response = client.get("/timeout")
        assert response.status_code == 200
        assert response.json() == {"timed_out": False}
        response = client.get("/timeout", params={"seconds": TIMEOUT})
        assert response.status_code == 200
        assert response.json() == {"timed_out": True}
    assert APP_ERROR not in srv.messages()


def test_anyio_fail_after_in_a_route(serve_app: ServeApp) -> None:
    with serve_app(app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        response = client.get("/fail-after")
        assert response.status_code == 200
        assert response.json() == {"timed_out": False, "task": True}
        response = client.get("/fail-after", params={"seconds": TIMEOUT})
        assert response.status_code == 200
        assert response.json() == {"timed_out": True, "task": True}
    assert APP_ERROR not in srv.messages()


def test_pydantic_json_body(serve_app: ServeApp) -> None:
    with serve_app(app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        item = {"name": "lamp", "price": 2.5, "tags": ["b", "a"]}
        response = client.post("/items", json=item)
        assert response.status_code == 200
        assert response.json() == {"name": "LAMP", "total": 5.0, "tags": ["a", "b"]}
        invalid = client.post("/items", json={"name": "lamp"})
        assert invalid.status_code == 422
        assert invalid.json()["detail"][0]["loc"] == ["body", "price"]


def test_large_raw_body(serve_app: ServeApp) -> None:
    body = os.urandom(1 << 20)
    with serve_app(app) as srv:
        response = httpx.post(f"{srv.url}/raw", content=body, timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.json() == {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_streaming_response(serve_app: ServeApp, kind: str) -> None:
    path = "/stream" if kind == "async" else "/stream-sync"
    with (
        serve_app(app) as srv,
        httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client,
        client.stream("GET", path, params={"parts": 4}) as response,
    ):
        assert response.status_code == 200
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.read() == b"".join(f"{kind} {i}\n".encode() for i in range(4))


def test_websocket_echo_and_close_code(serve_app: ServeApp) -> None:
    with serve_app(app) as srv:
        check_websocket_echo(srv, b"\xffbytes")


def test_lifespan_startup_and_shutdown(
    serve_app: ServeApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    monkeypatch.setattr(apps_fastapi, "EVENTS", events)
    with serve_app(app, lifespan="on") as srv:
        assert events == ["startup"]
        response = httpx.get(f"{srv.url}/pid", timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.json() == {"pid": os.getpid(), "started_by": os.getpid()}
    assert events == ["startup", "shutdown"]


def test_error_page_and_the_next_request(serve_app: ServeApp) -> None:
    with serve_app(app) as srv, httpx.Client(base_url=srv.url, timeout=TIMEOUT) as client:
        for path in ("/error", "/sync-error"):
            response = client.get(path)
            assert response.status_code == 500
            assert response.text == "Internal Server Error"
            assert client.get("/async").status_code == 200
    # Starlette (under FastAPI) sends its 500, then re-raises for the server to log.
    logged = [r for r in srv.records if r.getMessage() == APP_ERROR]
    assert [r.levelno for r in logged] == [logging.ERROR, logging.ERROR]
    assert [str(r.exc_info[1]) for r in logged if r.exc_info] == [
        "boom from a FastAPI route",
        "boom from a FastAPI def route",
    ]


def exercise(url: str, rounds: int = 20) -> set[int]:
    """`rounds` x (def route, async route, JSON body, error page), each on a new connection;
    the process ids that answered."""
    pids = set()
    for i in range(rounds):
        response = httpx.get(f"{url}/sync", timeout=TIMEOUT)
        assert response.status_code == 200
        pids.add(response.json()["pid"])
        response = httpx.get(f"{url}/pid", timeout=TIMEOUT)
        assert response.status_code == 200
        body = response.json()
        assert body["started_by"] == body["pid"]  # the lifespan ran in this worker
        response = httpx.post(f"{url}/items", json={"name": f"n{i}", "price": i}, timeout=TIMEOUT)
        assert response.status_code == 200
        assert response.json() == {"name": f"N{i}", "total": 2.0 * i, "tags": []}
        response = httpx.get(f"{url}/error", timeout=TIMEOUT)
        assert response.status_code == 500
        assert response.text == "Internal Server Error"
    return pids


def test_under_gunicorn_with_two_workers() -> None:
    with Gunicorn(app=APP, workers=2) as server:
        pids = exercise(server.url)
        assert pids <= set(server.worker_pids())
        server.stderr.wait_for("boom from a FastAPI route")  # the worker logged the error
        server.signal(signal.SIGTERM)
        assert server.wait() == 0


def test_under_fulmen_workers() -> None:
    with Fulmen(APP, "--port", "0", "--workers", "2") as server:
        workers = ready_pids(server, 2)
        pids = exercise(server.url)
        assert pids <= workers
        server.stderr.wait_for("boom from a FastAPI route")
        server.signal(signal.SIGTERM)
        assert server.wait() == 0
